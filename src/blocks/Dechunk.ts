/**
 * ConceptMoE's dechunk: EMA over concepts, plug-back to tokens, STE confidence (method spec §6).
 *
 * ĉ^ema_m = p_φ(m)·ĉ_m + (1 − p_φ(m))·ĉ^ema_{m−1}; token n receives ĉ^ema_ψ(n) (ψ(n) = boundaries ≤ n,
 * minus 1) and z_n = ĥ_n + STE(c_n)·ĉ^ema_ψ(n), with c_n = p_n if b_n else 1 − p_n (forward value 1).
 * `[batch, concepts, d] → [batch, seq, d]`.
 *
 * Params: none. FLOPs: none counted (a scan and a gather, not matmuls).
 *
 * @since 0.1.0
 */
import { Schema } from "effect"
import * as Cost from "../cost/Cost.ts"
import { type Block, type BlockKind, leaf, type Named } from "../graph/Block.ts"
import type { ForwardContext, Tensor, Tensor2D } from "../graph/Apply.ts"
import { Dim } from "../graph/Spec.ts"

export const DechunkSpec = Schema.Struct({ d: Dim })
export type DechunkSpec = typeof DechunkSpec.Type

/** The smallest 1 − P kept when taking its log in the EMA (P = 1 at row starts is exact). */
export const emaFloor = 1e-6

/**
 * EMA over each row's concepts as a lower-triangular matrix, ĉ^ema = (L ⊙ P) ĉ with
 * L_mj = Π_{i=j+1..m} (1 − P_i), then plug-back to tokens and the STE-weighted residual.
 */
const applyDechunk = (ctx: ForwardContext, _s: DechunkSpec, y: Tensor): Tensor => {
  const { tf } = ctx
  const ch = ctx.chunk
  if (ch === undefined) throw new Error("a dechunk runs inside a concept stage, after its chunk module")
  const n = ch.boundaries.length
  const bounds: Array<number> = []
  for (let i = 0; i < n; i++) if (ch.boundaries[i] === 1) bounds.push(i)
  const P = tf.gather(ch.p, tf.tensor1d(bounds, "int32"))
  const parts: Array<Tensor> = []
  let offset = 0
  for (const M of ch.concepts) {
    if (M === 0) continue
    const Pr = tf.slice(P, [offset], [M])
    const yr = tf.slice(y, [offset, 0], [M, -1])
    const first = new Float32Array(M)
    first[0] = 1
    // a_i = log(1 − P_i) for i ≥ 1; a_0 = 0 (never used: L only multiplies (1 − P_i) for i > j ≥ 0)
    const a = tf.mul(tf.log(tf.maximum(tf.sub(1, Pr), emaFloor)), tf.sub(1, tf.tensor1d(first)))
    const cs = tf.cumsum(a)
    const diff = tf.minimum(tf.sub(tf.reshape(cs, [M, 1]), tf.reshape(cs, [1, M])), 0)
    const tril = new Float32Array(M * M)
    for (let i = 0; i < M; i++) for (let j = 0; j <= i; j++) tril[i * M + j] = 1
    const weights = tf.mul(tf.mul(tf.exp(diff), tf.tensor2d(tril, [M, M])), tf.reshape(Pr, [1, M]))
    parts.push(ctx.matMul(weights, yr, "other"))
    offset += M
  }
  const ema = tf.concat(parts, 0)
  const cz = tf.gather(ema, tf.tensor1d(ch.receive, "int32")) as Tensor2D
  const B = tf.tensor1d(Float32Array.from(ch.boundaries))
  const confidence = tf.add(tf.mul(B, ch.p), tf.mul(tf.sub(1, B), tf.sub(1, ch.p)))
  ctx.concept = cz
  return tf.add(ch.h, tf.mul(cz, tf.reshape(ctx.ste(confidence), [n, 1])))
}

export const Dechunk: BlockKind<DechunkSpec> = {
  name: "dechunk",
  summary: "EMA over concepts, plugged back to tokens, with STE confidence",
  spec: DechunkSpec,
  io: (s) => ({ in: s?.d, out: s?.d }),
  cost: () => Cost.zero,
  apply: applyDechunk
}

/** @category constructors */
export const dechunk = <const D extends number>(spec: { readonly d: D } & Named): Block<D, D> => leaf(Dechunk, spec)
