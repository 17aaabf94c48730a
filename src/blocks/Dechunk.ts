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
import type * as TF from "@tensorflow/tfjs"
import { Dim } from "../graph/Spec.ts"
import { Unsupported } from "../internal/RunErrors.ts"
import { type ChunkState, ConceptOps } from "./ConceptContext.ts"

export const DechunkSpec = Schema.Struct({ d: Dim })
export type DechunkSpec = typeof DechunkSpec.Type

/** The smallest 1 − P kept when taking its log in the EMA (P = 1 at row starts is exact). */
export const emaFloor = 1e-6

/**
 * The EMA of one row's `M` concepts `y [M, d]` with probabilities `P [M]`, P_0 taken as 1:
 * (L ⊙ P) y with L_mj = Π_{i=j+1..m} (1 − P_i), a lower-triangular matrix.
 */
const emaOfRow = (ctx: ForwardContext, P: Tensor, y: Tensor, M: number): Tensor => {
  const { tf } = ctx
  const first = new Float32Array(M)
  first[0] = 1
  // a_i = log(1 − P_i) for i ≥ 1; a_0 = 0 (never used: L only multiplies (1 − P_i) for i > j ≥ 0)
  const a = tf.mul(tf.log(tf.maximum(tf.sub(1, P), emaFloor)), tf.sub(1, tf.tensor1d(first)))
  const cs = tf.cumsum(a)
  const diff = tf.minimum(tf.sub(tf.reshape(cs, [M, 1]), tf.reshape(cs, [1, M])), 0)
  const tril = new Float32Array(M * M)
  for (let i = 0; i < M; i++) for (let j = 0; j <= i; j++) tril[i * M + j] = 1
  const weights = tf.mul(tf.mul(tf.mul(tf.exp(diff), tf.tensor2d(tril, [M, M])), tf.reshape(P, [1, M])), resets(ctx, P, [M]))
  return ctx.matMul(weights, y, "other")
}

/**
 * 1 where no concept i in (j, m] has P_i = 1 exactly (a forced boundary: a document start), else
 * 0, `[..., M, M]` for `P [..., M]` (off the tape): the EMA restarts exactly at a document, where
 * the floor of 1 − P alone would leave a weight of {@link emaFloor} on the document before.
 */
const resets = (ctx: ForwardContext, P: Tensor, shape: ReadonlyArray<number>): Tensor => {
  const { tf } = ctx
  const M = shape[shape.length - 1]!
  const count = tf.cumsum(tf.cast(tf.equal(ctx.stop(P), 1), "float32"), shape.length - 1)
  const a = tf.reshape(count, [...shape.slice(0, -1), M, 1])
  const b = tf.reshape(count, [...shape.slice(0, -1), 1, M])
  return tf.sub(1, tf.minimum(tf.abs(tf.sub(a, b)), 1))
}

/**
 * EMA over each row's concepts, then plug-back to tokens and the STE-weighted residual. Decoding
 * incrementally, each row's last EMA value is carried: the new concepts continue it (it enters the
 * row's matrix as a concept with P = 1), and tokens before the row's first new boundary receive it.
 *
 * The chunk state comes from the concept stage running it (`StageScope.chunk`), and the dechunked
 * concept per token goes back to it (`StageScope.dechunked`).
 */
const applyDechunk = (ctx: ForwardContext, _s: DechunkSpec, y: Tensor): Tensor => {
  const { tf, cache } = ctx
  const stage = ctx.get(ConceptOps).stage()
  const ch = stage.chunk
  if (ch === undefined) throw new Unsupported({ at: ctx.scope, problem: "a dechunk runs inside a concept stage, after its chunk module; place it there" })
  const handBack = (concept: Tensor2D) => stage.dechunked?.(concept)
  if (ch.slots !== undefined) return staticDechunk(ctx, ch, y, handBack)
  const n = ch.boundaries.length
  const rows = ch.concepts.length
  const d = ch.h.shape[1]!
  const state = cache?.state(ctx.scope, () => ({ ema: tf.keep(tf.zeros([rows, d])) as Tensor, seen: new Array<number>(rows).fill(0) }))
  const bounds: Array<number> = []
  for (let i = 0; i < n; i++) if (ch.boundaries[i] === 1) bounds.push(i)
  const P = tf.gather(ch.p, tf.tensor1d(bounds, "int32"))
  const parts: Array<Tensor> = state === undefined ? [] : [state.ema]
  let offset = 0
  ch.concepts.forEach((M, r) => {
    if (M === 0) return
    const Pr = tf.slice(P, [offset], [M])
    const yr = tf.slice(y, [offset, 0], [M, -1])
    if (state !== undefined && state.seen[r]! > 0) {
      const carried = tf.slice(state.ema, [r, 0], [1, -1])
      const ema = emaOfRow(ctx, tf.concat([tf.ones([1]), Pr]), tf.concat([carried, yr], 0), M + 1)
      parts.push(tf.slice(ema, [1, 0], [M, -1]))
    } else {
      parts.push(emaOfRow(ctx, Pr, yr, M))
    }
    offset += M
  })
  const table = parts.length === 1 ? parts[0]! : tf.concat(parts, 0)
  const cz = tf.gather(table, tf.tensor1d(ch.receive, "int32")) as Tensor2D
  if (state !== undefined) {
    let end = rows
    const last = ch.concepts.map((M, r) => {
      end += M
      return M > 0 ? end - 1 : r
    })
    const next = tf.keep(tf.gather(table, tf.tensor1d(last, "int32")))
    state.ema.dispose()
    state.ema = next
    ch.concepts.forEach((M, r) => (state.seen[r]! += M))
  }
  const B = tf.tensor1d(Float32Array.from(ch.boundaries))
  const confidence = tf.add(tf.mul(B, ch.p), tf.mul(tf.sub(1, B), tf.sub(1, ch.p)))
  handBack(cz)
  return tf.add(ch.h, tf.mul(cz, tf.reshape(ctx.ste(confidence), [n, 1])))
}

/**
 * The dechunk with static shapes (`ConceptStage`'s padded slots): the EMA of every row at once as
 * `[rows, C, C]` matrices (a padded slot has P = 0, so it weighs nothing), then the same plug-back.
 */
const staticDechunk = (ctx: ForwardContext, ch: ChunkState, y: Tensor, handBack: (concept: Tensor2D) => void): Tensor => {
  const { tf } = ctx
  const { b, receive, capacity: C } = ch.slots!
  const n = b.shape[0]!
  const d = ch.h.shape[1]!
  const R = y.shape[0]! / C
  const closes = tf.where(tf.greater(b, 0), receive, tf.fill([n], R * C, "int32")) as TF.Tensor1D
  const P = tf.reshape(tf.slice(tf.unsortedSegmentSum(tf.mul(ch.p, b), closes, R * C + 1), [0], [R * C]), [R, C])
  // a_i = log(1 − P_i) for i ≥ 1, 0 for a row's first concept (P = 1 there)
  const notFirst = tf.tensor2d([Array.from({ length: C }, (_, i) => (i === 0 ? 0 : 1))])
  const cs = tf.cumsum(tf.mul(tf.log(tf.maximum(tf.sub(1, P), emaFloor)), notFirst), 1)
  const diff = tf.minimum(tf.sub(tf.reshape(cs, [R, C, 1]), tf.reshape(cs, [R, 1, C])), 0)
  const tril = new Float32Array(C * C)
  for (let i = 0; i < C; i++) for (let j = 0; j <= i; j++) tril[i * C + j] = 1
  const weights = tf.mul(tf.mul(tf.mul(tf.exp(diff), tf.tensor3d(tril, [1, C, C])), tf.reshape(P, [R, 1, C])), resets(ctx, P, [R, C]))
  const table = tf.reshape(ctx.matMul(weights, tf.reshape(y, [R, C, d]), "other"), [R * C, d])
  const cz = tf.gather(table, receive) as Tensor2D
  const confidence = tf.add(tf.mul(b, ch.p), tf.mul(tf.sub(1, b), tf.sub(1, ch.p)))
  handBack(cz)
  return tf.add(ch.h, tf.mul(cz, tf.reshape(ctx.ste(confidence), [n, 1])))
}

export const Dechunk: BlockKind<DechunkSpec> = {
  name: "dechunk",
  summary: "EMA over concepts, plugged back to tokens, with STE confidence",
  spec: DechunkSpec,
  io: (s) => ({ in: s?.d, out: s?.d }),
  cost: () => Cost.zero,
  stream: "stateful",
  apply: applyDechunk
}

/** @category constructors */
export const dechunk = <const D extends number>(spec: { readonly d: D } & Named): Block<D, D> => leaf(Dechunk, spec)
