/**
 * DeepSeek multi-head latent attention (MLA, DeepSeek-V2/V3), `[batch, seq, d] → [batch, seq, d]`.
 *
 * Params, with H heads, nope/rope/v head sizes and ranks r_q (optional) and r_kv:
 * - queries: `qA [d, r_q]`, `qANorm [r_q]`, `qB [r_q, H·(nope+rope)]` with q-LoRA, else `q [d, H·(nope+rope)]`;
 * - keys/values: `kvA [d, r_kv + rope]`, `kvANorm [r_kv]`, `kvB [r_kv, H·(nope+v)]`;
 * - output: `o [H·v, d]`; `bias` adds biases to qA/q, kvA and o (DeepSeek's `attention_bias`).
 *
 * FLOPs/token: 2 × the matmul weights above (part "attention"). Attention map: 2·H·(nope+rope+v)
 * per query–key pair. KV cache: the latent, r_kv + rope elements per position (what MLA inference
 * caches; a naive cache of decompressed K and V would hold H·(nope+rope+v)).
 *
 * @since 0.1.0
 */
import { Schema } from "effect"
import * as Cost from "../cost/Cost.ts"
import { type Block, type BlockKind, leaf, type Named, type ParamDecl } from "../graph/Block.ts"
import { Dim, PositiveNumber, withDefault } from "../graph/Spec.ts"

export const MLASpec = Schema.Struct({
  d: Dim,
  heads: Dim,
  qLoraRank: withDefault(Schema.NullOr(Dim), null),
  kvLoraRank: Dim,
  qkNopeHeadDim: Dim,
  qkRopeHeadDim: Dim,
  vHeadDim: Dim,
  bias: withDefault(Schema.Boolean, false),
  ropeBase: withDefault(PositiveNumber, 10000),
  window: withDefault(Schema.NullOr(Dim), null),
  causal: withDefault(Schema.Boolean, true)
})
export type MLASpec = typeof MLASpec.Type

const params = (s: MLASpec): Array<ParamDecl> => {
  const qk = s.qkNopeHeadDim + s.qkRopeHeadDim
  const bias = (name: string, n: number): Array<ParamDecl> => s.bias ? [{ name, shape: [n], part: "attention" }] : []
  const q: Array<ParamDecl> = s.qLoraRank === null
    ? [{ name: "q.weight", shape: [s.d, s.heads * qk], part: "attention" }, ...bias("q.bias", s.heads * qk)]
    : [
      { name: "qA.weight", shape: [s.d, s.qLoraRank], part: "attention" },
      ...bias("qA.bias", s.qLoraRank),
      { name: "qANorm.weight", shape: [s.qLoraRank], part: "norm" },
      { name: "qB.weight", shape: [s.qLoraRank, s.heads * qk], part: "attention" }
    ]
  return [
    ...q,
    { name: "kvA.weight", shape: [s.d, s.kvLoraRank + s.qkRopeHeadDim], part: "attention" },
    ...bias("kvA.bias", s.kvLoraRank + s.qkRopeHeadDim),
    { name: "kvANorm.weight", shape: [s.kvLoraRank], part: "norm" },
    { name: "kvB.weight", shape: [s.kvLoraRank, s.heads * (s.qkNopeHeadDim + s.vHeadDim)], part: "attention" },
    { name: "o.weight", shape: [s.heads * s.vHeadDim, s.d], part: "attention" },
    ...bias("o.bias", s.d)
  ]
}

export const MLA: BlockKind<MLASpec> = {
  name: "mla",
  summary: "multi-head latent attention (DeepSeek)",
  spec: MLASpec,
  io: (s) => ({ in: s?.d, out: s?.d }),
  params,
  cost: (s, { params: own, path }) => {
    let weights = 0
    for (const p of own) if (p.part === "attention" && p.shape.length === 2) weights += p.numel
    return Cost.make({
      flops: { attention: 2 * weights },
      attention: [{
        path,
        heads: s.heads,
        dQK: s.qkNopeHeadDim + s.qkRopeHeadDim,
        dV: s.vHeadDim,
        window: s.window,
        ropeDim: s.qkRopeHeadDim,
        passes: 1,
        rate: 1
      }],
      kv: [{ path, elements: s.kvLoraRank + s.qkRopeHeadDim, window: s.window, passes: 1, rate: 1 }]
    })
  }
}

/** @category constructors */
export const mla = <const D extends number>(
  spec: { readonly d: D } & Omit<Partial<MLASpec>, "d"> & Pick<MLASpec, "heads" | "kvLoraRank" | "qkNopeHeadDim" | "qkRopeHeadDim" | "vHeadDim"> & Named
): Block<D, D> => leaf(MLA, spec)
