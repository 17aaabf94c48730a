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
 * caches; a naive cache of decompressed K and V would hold H·(nope+rope+v)). Packed documents are
 * masked apart as in {@link ops.attend}. `ropeScaling` scales the rotary frequencies (`Rotary.ts`);
 * `scoreScale` multiplies the scores' 1/√(nope+rope) (DeepSeek under YaRN: `mscale_all_dim`'s mscale
 * squared), applied to the queries.
 *
 * @since 0.1.0
 */
import { Schema } from "effect"
import * as Cost from "../cost/Cost.ts"
import { type Block, type BlockKind, leaf, type Named, type ParamDecl } from "../graph/Block.ts"
import { Dim, PositiveNumber, withDefault } from "../graph/Spec.ts"
import * as ops from "./ops.ts"
import { RopeScaling, ropeTablesOf } from "./Rotary.ts"

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
  ropeScaling: Schema.optionalKey(Schema.NullOr(RopeScaling)),
  scoreScale: Schema.optionalKey(PositiveNumber),
  window: withDefault(Schema.NullOr(Dim), null),
  causal: withDefault(Schema.Boolean, true)
})
export type MLASpec = typeof MLASpec.Type

const params = (s: MLASpec): Array<ParamDecl> => {
  const qk = s.qkNopeHeadDim + s.qkRopeHeadDim
  const bias = (name: string, n: number): Array<ParamDecl> => s.bias ? [{ name, shape: [n], part: "attention", init: "zeros" }] : []
  const q: Array<ParamDecl> = s.qLoraRank === null
    ? [{ name: "q.weight", shape: [s.d, s.heads * qk], part: "attention" }, ...bias("q.bias", s.heads * qk)]
    : [
      { name: "qA.weight", shape: [s.d, s.qLoraRank], part: "attention" },
      ...bias("qA.bias", s.qLoraRank),
      { name: "qANorm.weight", shape: [s.qLoraRank], part: "norm", init: "ones" },
      { name: "qB.weight", shape: [s.qLoraRank, s.heads * qk], part: "attention" }
    ]
  return [
    ...q,
    { name: "kvA.weight", shape: [s.d, s.kvLoraRank + s.qkRopeHeadDim], part: "attention" },
    ...bias("kvA.bias", s.kvLoraRank + s.qkRopeHeadDim),
    { name: "kvANorm.weight", shape: [s.kvLoraRank], part: "norm", init: "ones" },
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
  },
  stream: "stateful",
  apply: (ctx, s, x, p) => {
    const { tf } = ctx
    const n = x.shape[0]!
    const H = s.heads
    const nope = s.qkNopeHeadDim
    const rope = s.qkRopeHeadDim
    const q = s.qLoraRank === null
      ? ops.linear(ctx, x, p["q.weight"]!, p["q.bias"])
      : ops.linear(ctx, ops.rmsNorm(ctx, ops.linear(ctx, x, p["qA.weight"]!, p["qA.bias"]), p["qANorm.weight"]!, 1e-6), p["qB.weight"]!)
    const q3 = tf.reshape(q, [n, H, nope + rope])
    const kvA = ops.linear(ctx, x, p["kvA.weight"]!, p["kvA.bias"])
    const latent = ops.rmsNorm(ctx, tf.slice(kvA, [0, 0], [n, s.kvLoraRank]), p["kvANorm.weight"]!, 1e-6)
    const kRope = tf.reshape(tf.slice(kvA, [0, s.kvLoraRank], [n, rope]), [n, 1, rope])
    const kv = tf.reshape(ops.linear(ctx, latent, p["kvB.weight"]!), [n, H, nope + s.vHeadDim])
    const tables = ropeTablesOf(ctx, { dim: rope, base: s.ropeBase, scaling: s.ropeScaling ?? null })
    const qRot = ops.applyRope(ctx, tf.slice(q3, [0, 0, nope], [n, H, rope]), rope, tables)
    const kRot = ops.applyRope(ctx, kRope, rope, tables)
    const qJoined = tf.concat([tf.slice(q3, [0, 0, 0], [n, H, nope]), qRot], 2)
    const qFull = s.scoreScale === undefined || s.scoreScale === 1 ? qJoined : tf.mul(qJoined, s.scoreScale)
    const kFull = tf.concat([tf.slice(kv, [0, 0, 0], [n, H, nope]), tf.tile(kRot, [1, H, 1])], 2)
    const v = tf.slice(kv, [0, 0, nope], [n, H, s.vHeadDim])
    const out = ops.attend(ctx, qFull, kFull, v, { causal: s.causal, window: s.window })
    return ops.linear(ctx, out, p["o.weight"]!, p["o.bias"])
  }
}

/** @category constructors */
export const mla = <const D extends number>(
  spec: { readonly d: D } & Omit<Partial<MLASpec>, "d"> & Pick<MLASpec, "heads" | "kvLoraRank" | "qkNopeHeadDim" | "qkRopeHeadDim" | "vHeadDim"> & Named
): Block<D, D> => leaf(MLA, spec)
