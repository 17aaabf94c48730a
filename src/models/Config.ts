/**
 * conceptmoe's own model config format: a flat record with a `kind`.
 *
 * ```json
 * { "kind": "moe", "name": "moe-small", "vocab": 256, "hidden": 128, "layers": 4, "heads": 4,
 *   "experts": 8, "topK": 2, "expertHidden": 128 }
 * ```
 *
 * `kind: "dense"` takes `ffnHidden` instead of the expert fields. Every other field has a default
 * (see {@link MoEConfig}); docs/cost-model.md lists them.
 *
 * @since 0.1.0
 */
import { Schema } from "effect"
import { Activation } from "../blocks/MLP.ts"
import { CountAtMost, DimAtMost } from "../graph/Limits.ts"
import { crossCheck, PositiveNumber, withDefault } from "../graph/Spec.ts"
import { attentionMixer, type DecoderConfig, type FFN, type Mixer } from "./Decoder.ts"

const common = {
  /** Defaults to the file's base name. */
  name: Schema.optionalKey(Schema.String),
  vocab: DimAtMost("vocab"),
  hidden: DimAtMost("width"),
  layers: DimAtMost("layers"),
  heads: DimAtMost("heads"),
  kvHeads: Schema.optionalKey(DimAtMost("heads")),
  headDim: Schema.optionalKey(DimAtMost("headDim")),
  activation: withDefault(Activation, "swiglu"),
  norm: withDefault(Schema.Literals(["rms", "layer"]), "rms"),
  normEps: withDefault(PositiveNumber, 1e-6),
  positions: withDefault(Schema.Literals(["rope", "learned", "none"]), "rope"),
  ropeBase: withDefault(PositiveNumber, 10000),
  qkNorm: withDefault(Schema.Literals(["none", "head", "full"]), "none"),
  attentionBias: withDefault(Schema.Boolean, false),
  window: withDefault(Schema.NullOr(DimAtMost("seqLen")), null),
  tiedEmbeddings: withDefault(Schema.Boolean, false),
  contextLength: withDefault(DimAtMost("seqLen"), 2048)
}

type Common = {
  readonly hidden: number
  readonly heads: number
  readonly kvHeads?: number
  readonly headDim?: number
  readonly positions: "rope" | "learned" | "none"
}

const attentionChecks = (c: Common): readonly [string, string] | undefined => {
  if (c.headDim === undefined && c.hidden % c.heads !== 0) {
    return ["heads", `hidden (${c.hidden}) is not divisible by heads (${c.heads}) and no headDim is given`]
  }
  if (c.kvHeads !== undefined && c.heads % c.kvHeads !== 0) {
    return ["kvHeads", `heads (${c.heads}) is not a multiple of kvHeads (${c.kvHeads})`]
  }
  // rotary positions rotate pairs of a head's channels
  const size = c.headDim ?? c.hidden / c.heads
  if (c.positions === "rope" && size % 2 !== 0) {
    return c.headDim !== undefined
      ? ["headDim", `headDim (${c.headDim}) is odd; rotary positions need an even head size`]
      : ["heads", `hidden (${c.hidden}) / heads (${c.heads}) gives a head size of ${size}, which is odd; rotary positions need an even head size (or positions "learned" or "none")`]
  }
  return undefined
}

export const DenseConfig = Schema.Struct({
  kind: Schema.Literal("dense"),
  ...common,
  ffnHidden: DimAtMost("ffnWidth")
}).pipe(Schema.check(crossCheck(attentionChecks)))
export type DenseConfig = typeof DenseConfig.Type

export const MoEConfig = Schema.Struct({
  kind: Schema.Literal("moe"),
  ...common,
  experts: DimAtMost("experts"),
  topK: DimAtMost("topK"),
  expertHidden: DimAtMost("ffnWidth"),
  /** Neurons of the shared experts (0: none). */
  sharedHidden: withDefault(CountAtMost("ffnWidth"), 0),
  sharedGate: withDefault(Schema.Boolean, false),
  /** The first `denseLayers` layers use a dense FFN of `denseHidden` neurons (DeepSeek's first-k-dense). */
  denseLayers: withDefault(CountAtMost("layers"), 0),
  denseHidden: Schema.optionalKey(DimAtMost("ffnWidth")),
  scoring: withDefault(Schema.Literals(["softmax", "sigmoid"]), "softmax")
}).pipe(Schema.check(crossCheck((c) =>
  attentionChecks(c) ??
    (c.topK > c.experts
      ? ["topK", `topK (${c.topK}) exceeds experts (${c.experts})`]
      : c.denseLayers > c.layers
      ? ["denseLayers", `denseLayers (${c.denseLayers}) exceeds layers (${c.layers})`]
      : c.denseLayers > 0 && c.denseHidden === undefined
      ? ["denseHidden", `is required when denseLayers (${c.denseLayers}) > 0`]
      : undefined)
)))
export type MoEConfig = typeof MoEConfig.Type

export const ModelConfig = Schema.Union([DenseConfig, MoEConfig])
export type ModelConfig = typeof ModelConfig.Type

/** The `kind`s of model config this module reads. */
export const modelKinds = ["dense", "moe"] as const

const mixer = (c: ModelConfig): Mixer =>
  attentionMixer({ ...c, ropeBase: c.positions === "rope" ? c.ropeBase : null }, {
    qkvBias: c.attentionBias,
    outBias: c.attentionBias,
    qkNorm: c.qkNorm,
    window: c.window
  })

/**
 * The normalised decoder of a conceptmoe config.
 *
 * @category builders
 */
export const toDecoder = (c: ModelConfig, name: string): DecoderConfig => {
  const m = mixer(c)
  const dense = (hidden: number): FFN => ({ kind: "mlp", spec: { hidden, activation: c.activation } })
  const ffnAt = (i: number): FFN => {
    if (c.kind === "dense") return dense(c.ffnHidden)
    if (i < c.denseLayers) return dense(c.denseHidden!)
    return {
      kind: "moe",
      spec: {
        experts: c.experts,
        topK: c.topK,
        expertHidden: c.expertHidden,
        activation: c.activation,
        scoring: c.scoring,
        shared: c.sharedHidden > 0 ? { hidden: c.sharedHidden, gate: c.sharedGate } : null
      }
    }
  }
  return {
    name: c.name ?? name,
    vocab: c.vocab,
    d: c.hidden,
    positions: c.positions === "learned" ? c.contextLength : null,
    norm: { kind: c.norm, eps: c.normEps },
    layers: Array.from({ length: c.layers }, (_, i) => ({ mixer: m, ffn: ffnAt(i) })),
    tiedEmbeddings: c.tiedEmbeddings,
    contextLength: c.contextLength
  }
}
