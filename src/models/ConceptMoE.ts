/**
 * ConceptMoE as a graph, built from an MoE baseline plus a concept spec (method spec §1–§10).
 *
 * The baseline's L layers are split: the first `encoderLayers` run on tokens (encoder), the last
 * `decoderLayers` run on tokens with joint-decoding attention (decoder), the ones between form the
 * concept model, run at rate 1/R inside a concept stage:
 *
 * ```
 * embed → encoder/0..L_E-1 → concept[ chunk → model[ (up) → layers… (loop) → (down) ] → dechunk ]
 *       → decoder/0..L_D-1 (joint attention) → norm → lmHead
 * ```
 *
 * The concept model can spend the compute freed by compression three ways (paper §3.5):
 * 1. `topK`: more activated experts; 2. `topK` + `loopLayers` (layers run `loopTimes` times, shared
 * weights); 3. `hidden` (+ `heads`, `experts`, `expertHidden`, `topK`): a wider model with fewer
 * experts, and two width projectors.
 *
 * @since 0.1.0
 */
import { Result, Schema } from "effect"
import { chunker } from "../blocks/Chunker.ts"
import { conceptStage } from "../blocks/ConceptStage.ts"
import { dechunk } from "../blocks/Dechunk.ts"
import { jointAttention } from "../blocks/JointAttention.ts"
import { projector } from "../blocks/Projector.ts"
import { type AnyBlock, type Block, make } from "../graph/Block.ts"
import { Loop, sequence } from "../graph/Combinators.ts"
import { CountAtMost, DimAtMost } from "../graph/Limits.ts"
import { crossCheck, Dim, PositiveNumber, withDefault } from "../graph/Spec.ts"
import { embedding } from "../blocks/Embedding.ts"
import { lmHead } from "../blocks/LMHead.ts"
import { buildDecoder, type DecoderConfig, decoderLayer, type DecoderLayer, norm } from "./Decoder.ts"

/** The concept part of a ConceptMoE config (everything but the baseline). */
export const conceptFields = {
  /** Target compression ratio R > 1. */
  ratio: PositiveNumber,
  encoderLayers: withDefault(CountAtMost("layers"), 4),
  decoderLayers: withDefault(CountAtMost("layers"), 4),
  merge: withDefault(Schema.Literals(["sum", "last"]), "sum"),
  tau: withDefault(PositiveNumber, 6),
  lambda: withDefault(Schema.Finite.pipe(Schema.check(Schema.isGreaterThanOrEqualTo(0))), 0.03),
  /** How the boundary rate is held at 1/R ("pi" by default; "plain": the paper's λ loss); see `Chunker.ts`. */
  ratioControl: Schema.optionalKey(Schema.Literals(["plain", "pi"])),
  /** Gains of `ratioControl` "pi" (defaults in `Chunker.ts`). */
  kp: Schema.optionalKey(Schema.Finite.pipe(Schema.check(Schema.isGreaterThanOrEqualTo(0)))),
  ki: Schema.optionalKey(Schema.Finite.pipe(Schema.check(Schema.isGreaterThanOrEqualTo(0)))),
  /** With "pi": the weight of the rate at p ≥ ½ in the rate held at 1/R (0 to 1; default 0.4, `DEFAULT_THRESHOLD_WEIGHT`; blocks/Chunker.ts). */
  thresholdWeight: Schema.optionalKey(Schema.Finite.pipe(Schema.check(Schema.isBetween({ minimum: 0, maximum: 1 })))),
  jointDecoding: withDefault(Schema.Boolean, true),
  /**
   * A model converted from a trained MoE (`train/Convert.ts`): training ramps from every token a boundary
   * (the source's function) to the target R over this many steps (`ConceptOps.ramp`).
   */
  rampSteps: Schema.optionalKey(Dim),
  /** Activated experts in the concept model (strategies 1–3); default: the baseline's. */
  topK: Schema.optionalKey(DimAtMost("topK")),
  /** Consecutive concept-model layers run `loopTimes` times with shared weights (strategy 2). */
  loopLayers: withDefault(CountAtMost("layers"), 0),
  loopTimes: withDefault(DimAtMost("loopTimes"), 2),
  /** First looped layer (index within the concept model); default: centred. */
  loopStart: Schema.optionalKey(CountAtMost("layers")),
  /** Concept-model width d_c (strategy 3); default: the baseline's. */
  hidden: Schema.optionalKey(DimAtMost("width")),
  heads: Schema.optionalKey(DimAtMost("heads")),
  kvHeads: Schema.optionalKey(DimAtMost("heads")),
  experts: Schema.optionalKey(DimAtMost("experts")),
  expertHidden: Schema.optionalKey(DimAtMost("ffnWidth"))
}

export const ConceptSpec = Schema.Struct(conceptFields).pipe(Schema.check(crossCheck((s) =>
  s.ratio <= 1 ? ["ratio", `the compression ratio R must exceed 1, got ${s.ratio}`] : undefined
)))
export type ConceptSpec = typeof ConceptSpec.Type

export const ConceptMoEConfig = Schema.Struct({
  kind: Schema.Literal("conceptmoe"),
  name: Schema.optionalKey(Schema.String),
  /** The MoE baseline: an inline config (conceptmoe or Hugging Face), or a path relative to this file. */
  baseline: Schema.Unknown,
  ...conceptFields
}).pipe(Schema.check(crossCheck((s) =>
  s.ratio <= 1 ? ["ratio", `the compression ratio R must exceed 1, got ${s.ratio}`] : undefined
)))
export type ConceptMoEConfig = typeof ConceptMoEConfig.Type

/** Where the layers of the baseline went. */
export interface ConceptLayout {
  readonly baselineLayers: number
  readonly encoder: readonly [start: number, end: number]
  readonly concept: readonly [start: number, end: number]
  readonly decoder: readonly [start: number, end: number]
  /** Concept-model layer index range that loops, and how many times. */
  readonly loop: { readonly start: number; readonly layers: number; readonly times: number } | null
  /** Layer-passes of the concept model per concept, over its layer count: (L_C + (times−1)·L_loop)/L_C. */
  readonly multiplier: number
  readonly width: number
}

/** A concept spec that cannot be applied to the baseline: which field, why, and the nearest valid value. */
export interface ConceptProblem {
  readonly field: string
  readonly message: string
}

const fail = (field: string, message: string) => Result.fail<ConceptProblem>({ field, message })

/** Checks a concept spec against a baseline and works out the layout. */
export const conceptLayout = (base: DecoderConfig, s: ConceptSpec): Result.Result<ConceptLayout, ConceptProblem> => {
  const L = base.layers.length
  if (s.encoderLayers + s.decoderLayers >= L) {
    return fail(
      "encoderLayers",
      `encoderLayers (${s.encoderLayers}) + decoderLayers (${s.decoderLayers}) must leave at least one concept-model layer of the baseline's ${L}; at most ${L - 1} in total`
    )
  }
  const lc = L - s.encoderLayers - s.decoderLayers
  const conceptLayers = base.layers.slice(s.encoderLayers, L - s.decoderLayers)
  const moeLayers = conceptLayers.filter((l) => l.ffn.kind === "moe")
  // a loop, not Math.min(...list): spreading a config-sized list into arguments overflows the stack
  let maxExperts = Infinity
  for (const l of moeLayers) if (l.ffn.kind === "moe") maxExperts = Math.min(maxExperts, l.ffn.spec.experts)
  const experts = s.experts ?? maxExperts
  if ((s.topK !== undefined || s.experts !== undefined || s.expertHidden !== undefined) && moeLayers.length === 0) {
    return fail("topK", "the baseline's concept-model layers have no MoE FFN to change")
  }
  if (s.topK !== undefined && s.topK > experts) {
    return fail("topK", `top-k ${s.topK} exceeds the concept model's ${experts} experts; the nearest valid value is ${experts}`)
  }
  if (s.loopLayers > lc) {
    return fail("loopLayers", `loopLayers (${s.loopLayers}) exceeds the ${lc} concept-model layers; the nearest valid value is ${lc}`)
  }
  const start = s.loopStart ?? Math.floor((lc - s.loopLayers) / 2)
  if (s.loopLayers > 0 && start + s.loopLayers > lc) {
    return fail("loopStart", `loopStart (${start}) + loopLayers (${s.loopLayers}) exceeds the ${lc} concept-model layers; at most ${lc - s.loopLayers}`)
  }
  if (s.jointDecoding && s.decoderLayers > 0 && base.layers.slice(L - s.decoderLayers).some((l) => l.mixer.kind !== "attention")) {
    return fail("jointDecoding", "joint decoding is defined for multi-head (MHA/GQA) attention; the baseline's decoder layers use MLA: set jointDecoding to false")
  }
  const width = s.hidden ?? base.d
  if (s.hidden !== undefined || s.heads !== undefined || s.kvHeads !== undefined) {
    if (conceptLayers.some((l) => l.mixer.kind !== "attention")) {
      return fail("hidden", "a wider concept model is supported for MHA/GQA attention baselines only")
    }
    const m = conceptLayers[0]!.mixer
    if (m.kind === "attention") {
      const heads = s.heads ?? width / m.spec.headDim
      if (!Number.isInteger(heads)) {
        return fail("hidden", `hidden ${width} is not a multiple of the baseline head size ${m.spec.headDim}; give heads, or a hidden of ${Math.round(heads) * m.spec.headDim}`)
      }
      const group = m.spec.heads / m.spec.kvHeads
      const kv = s.kvHeads ?? heads / group
      if (!Number.isInteger(kv) || heads % kv !== 0) {
        return fail("kvHeads", `concept-model heads (${heads}) do not group into KV heads keeping the baseline's ${group} queries per KV head; give kvHeads`)
      }
    }
  }
  return Result.succeed({
    baselineLayers: L,
    encoder: [0, s.encoderLayers],
    concept: [s.encoderLayers, L - s.decoderLayers],
    decoder: [L - s.decoderLayers, L],
    loop: s.loopLayers > 0 ? { start, layers: s.loopLayers, times: s.loopTimes } : null,
    multiplier: (lc + (s.loopTimes - 1) * s.loopLayers) / lc,
    width
  })
}

/** The concept model's version of a baseline layer. */
const conceptLayer = (base: DecoderConfig, s: ConceptSpec, layer: DecoderLayer): DecoderLayer => {
  const width = s.hidden ?? base.d
  const mixer = layer.mixer.kind === "attention" && width !== base.d || s.heads !== undefined || s.kvHeads !== undefined
    ? (() => {
      const m = layer.mixer as Extract<DecoderLayer["mixer"], { kind: "attention" }>
      const heads = s.heads ?? width / m.spec.headDim
      return {
        kind: "attention" as const,
        spec: { ...m.spec, heads, kvHeads: s.kvHeads ?? heads / (m.spec.heads / m.spec.kvHeads) }
      }
    })()
    : layer.mixer
  const ffn = layer.ffn.kind === "moe"
    ? {
      kind: "moe" as const,
      spec: {
        ...layer.ffn.spec,
        ...(s.topK === undefined ? {} : { topK: s.topK }),
        ...(s.experts === undefined ? {} : { experts: s.experts }),
        ...(s.expertHidden === undefined ? {} : { expertHidden: s.expertHidden })
      }
    }
    : layer.ffn
  return { mixer, ffn }
}

/**
 * Builds the ConceptMoE graph of a baseline and a concept spec.
 *
 * @category builders
 */
export const buildConceptMoE = (
  base: DecoderConfig,
  s: ConceptSpec,
  name = `${base.name}-concept`
): Result.Result<{ readonly graph: AnyBlock; readonly layout: ConceptLayout }, ConceptProblem> =>
  Result.map(conceptLayout(base, s), (layout) => {
    const d = base.d
    const width = layout.width
    const wide: DecoderConfig = { ...base, d: width }
    const encoder = base.layers.slice(...layout.encoder).map((l, i) => decoderLayer(base, l, `${i}`))
    const conceptLayers = base.layers.slice(...layout.concept).map((l, i) => decoderLayer(wide, conceptLayer(base, s, l), `${i}`))
    const decoder = base.layers.slice(...layout.decoder).map((l, i) => {
      if (!s.jointDecoding) return decoderLayer(base, l, `${i}`)
      const m = l.mixer as Extract<DecoderLayer["mixer"], { kind: "attention" }>
      return decoderLayer(base, l, `${i}`, jointAttention({ ...m.spec, d, name: "attn" }))
    })
    const body: Array<AnyBlock> = []
    if (layout.loop === null) body.push(...conceptLayers)
    else {
      const { layers, start, times } = layout.loop
      body.push(
        ...conceptLayers.slice(0, start),
        make(Loop, { times }, { name: "loop", children: conceptLayers.slice(start, start + layers) }),
        ...conceptLayers.slice(start + layers)
      )
    }
    if (width !== d) {
      body.unshift(projector({ dIn: d, dOut: width, name: "up" }))
      body.push(projector({ dIn: width, dOut: d, name: "down" }))
    }
    const stage = conceptStage({ ratio: s.ratio, merge: s.merge, name: "concept" }, [
      chunker({
        d,
        ratio: s.ratio,
        tau: s.tau,
        lambda: s.lambda,
        ...(s.ratioControl === undefined ? {} : { ratioControl: s.ratioControl }),
        ...(s.kp === undefined ? {} : { kp: s.kp }),
        ...(s.ki === undefined ? {} : { ki: s.ki }),
        ...(s.thresholdWeight === undefined ? {} : { thresholdWeight: s.thresholdWeight }),
        name: "chunk"
      }),
      sequence(body, { name: "model" }) as Block<number, number>,
      dechunk({ d, name: "dechunk" })
    ])
    const graph = sequence([
      embedding({ vocab: base.vocab, d, positions: base.positions, name: "embed" }),
      ...(encoder.length > 0 ? [sequence(encoder, { name: "encoder" })] : []),
      stage,
      ...(decoder.length > 0 ? [sequence(decoder, { name: "decoder" })] : []),
      norm(base, "norm"),
      lmHead({ d, vocab: base.vocab, tiedTo: base.tiedEmbeddings ? "embed/weight" : null, name: "lmHead" })
    ], { name })
    return { graph, layout }
  })

/** The baseline's graph (for symmetry with {@link buildConceptMoE}). */
export const buildBaseline = buildDecoder

/** A short name in the paper's style: `1.5L-top13-R2`, `w1.41-top10-R2`. */
export const shortName = (s: ConceptSpec, layout: ConceptLayout, baseTopK: number, baseD: number): string => {
  const x = Number(layout.multiplier.toFixed(2))
  const w = layout.width !== baseD ? `w${Number((layout.width / baseD).toFixed(2))}-` : ""
  const r = Number(s.ratio.toFixed(2))
  return `${w}${x}L-top${s.topK ?? baseTopK}${s.experts !== undefined ? `-e${s.experts}` : ""}-R${r}`
}
