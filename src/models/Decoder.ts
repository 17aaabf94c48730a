/**
 * The decoder-only LM builder every config format lowers to.
 *
 * A {@link DecoderConfig} is a normalised, already-validated description (one entry per layer, so
 * first-k-dense and sparse-step layouts are explicit). {@link buildDecoder} turns it into a graph:
 *
 * ```
 * embed → layers/i = [ mixer: x + attn(norm(x)), ffn: x + ffn(norm(x)) ] → norm → lmHead
 * ```
 *
 * with stable paths: `embed/weight`, `layers/3/mixer/attn/q.weight`, `layers/3/ffn/moe/router.weight`,
 * `norm/weight`, `lmHead/weight`.
 *
 * @since 0.1.0
 */
import { type AttentionSpec, attention } from "../blocks/Attention.ts"
import { embedding } from "../blocks/Embedding.ts"
import { layerNorm } from "../blocks/LayerNorm.ts"
import { lmHead } from "../blocks/LMHead.ts"
import { mla, type MLASpec } from "../blocks/MLA.ts"
import { mlp, type MLPSpec } from "../blocks/MLP.ts"
import { moe, type MoESpec } from "../blocks/MoE.ts"
import { rmsNorm } from "../blocks/RMSNorm.ts"
import type { Block } from "../graph/Block.ts"
import { residual, sequence } from "../graph/Combinators.ts"

type Spec<T> = { readonly [K in keyof T]?: T[K] }

export type Mixer =
  | { readonly kind: "attention"; readonly spec: Spec<AttentionSpec> & Pick<AttentionSpec, "heads" | "kvHeads" | "headDim"> }
  | { readonly kind: "mla"; readonly spec: Spec<MLASpec> & Pick<MLASpec, "heads" | "kvLoraRank" | "qkNopeHeadDim" | "qkRopeHeadDim" | "vHeadDim"> }

export type FFN =
  | { readonly kind: "mlp"; readonly spec: Spec<MLPSpec> & Pick<MLPSpec, "hidden"> }
  | { readonly kind: "moe"; readonly spec: Spec<Omit<MoESpec, "shared">> & Pick<MoESpec, "experts" | "topK" | "expertHidden"> & { readonly shared?: { readonly hidden: number; readonly gate?: boolean } | null } }

type AttentionMixerSpec = Extract<Mixer, { kind: "attention" }>["spec"]

/**
 * An MHA/GQA mixer: `kvHeads` defaults to `heads`, `headDim` to `hidden / heads`; rotary over the
 * whole head unless `ropeBase` is null.
 */
export const attentionMixer = (o: {
  readonly hidden: number
  readonly heads: number
  readonly kvHeads?: number | null | undefined
  readonly headDim?: number | null | undefined
  readonly ropeBase: number | null
}, extra: Partial<AttentionMixerSpec> = {}): Mixer => {
  const headDim = o.headDim ?? o.hidden / o.heads
  return {
    kind: "attention",
    spec: {
      heads: o.heads,
      kvHeads: o.kvHeads ?? o.heads,
      headDim,
      rope: o.ropeBase === null ? null : { dim: headDim, base: o.ropeBase },
      ...extra
    }
  }
}

export interface DecoderLayer {
  readonly mixer: Mixer
  readonly ffn: FFN
}

export interface DecoderConfig {
  readonly name: string
  readonly vocab: number
  readonly d: number
  /** Learned absolute positions (GPT-2) or null. */
  readonly positions: number | null
  readonly norm: { readonly kind: "rms" | "layer"; readonly eps: number }
  readonly layers: ReadonlyArray<DecoderLayer>
  readonly tiedEmbeddings: boolean
  /** Longest context the model is meant for (informational). */
  readonly contextLength: number
}

/** The config's norm block. */
export const norm = (cfg: DecoderConfig, name: string): Block<number, number> =>
  cfg.norm.kind === "rms" ? rmsNorm({ d: cfg.d, eps: cfg.norm.eps, name }) : layerNorm({ d: cfg.d, eps: cfg.norm.eps, name })

const mixer = (cfg: DecoderConfig, m: Mixer): Block<number, number> =>
  m.kind === "attention" ? attention({ ...m.spec, d: cfg.d, name: "attn" }) : mla({ ...m.spec, d: cfg.d, name: "attn" })

const ffn = (cfg: DecoderConfig, f: FFN): Block<number, number> =>
  f.kind === "mlp" ? mlp({ ...f.spec, d: cfg.d, name: "mlp" }) : moe({ ...f.spec, d: cfg.d, name: "moe" })

/** One pre-norm transformer layer; `attn` replaces the mixer block built from the layer (joint decoding). */
export const decoderLayer = (
  cfg: DecoderConfig,
  layer: DecoderLayer,
  name: string,
  attn: Block<number, number> = mixer(cfg, layer.mixer)
): Block<number, number> =>
  sequence([
    residual([norm(cfg, "norm"), attn], { name: "mixer" }),
    residual([norm(cfg, "norm"), ffn(cfg, layer.ffn)], { name: "ffn" })
  ], { name })

/**
 * Builds the graph of a decoder-only LM.
 *
 * @category builders
 */
export const buildDecoder = (cfg: DecoderConfig): Block<"ids", number> =>
  sequence([
    embedding({ vocab: cfg.vocab, d: cfg.d, positions: cfg.positions, name: "embed" }),
    sequence(cfg.layers.map((l, i) => decoderLayer(cfg, l, `${i}`)), { name: "layers" }),
    norm(cfg, "norm"),
    lmHead({ d: cfg.d, vocab: cfg.vocab, tiedTo: cfg.tiedEmbeddings ? "embed/weight" : null, name: "lmHead" })
  ], { name: cfg.name })
