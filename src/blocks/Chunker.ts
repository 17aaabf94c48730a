/**
 * ConceptMoE's chunk module (boundary router), `[batch, seq, d] → [batch, seq, d]` plus side outputs
 * `p` (boundary probabilities) and `b` (boundaries).
 *
 * p_n = ½(1 − cos(W_q h_n, W_k h_{n−1})), p_1 = 1; b_n ~ Bernoulli(sharpen_τ(p_n)) in training,
 * b_n = 1[p_n ≥ 0.5] at evaluation (method spec §2–§3). The ratio loss
 * L = R/(R−1)·((R−1)·F·G + (1−F)(1−G)), weight λ, steers the boundary rate F towards 1/R (§4).
 *
 * Params: `q [d, d]`, `k [d, d]`, no bias (part "chunk"). FLOPs/token: 2·2·d² (part "chunk"); the
 * cosine, the sampling and the loss are not matmuls.
 *
 * @since 0.1.0
 */
import { Schema } from "effect"
import * as Cost from "../cost/Cost.ts"
import { type Block, type BlockKind, leaf, type Named } from "../graph/Block.ts"
import { crossCheck, Dim, PositiveNumber, withDefault } from "../graph/Spec.ts"

export const ChunkerSpec = Schema.Struct({
  d: Dim,
  /** Target compression ratio R > 1. */
  ratio: PositiveNumber,
  /** Sharpening exponent τ of the training-time Bernoulli. */
  tau: withDefault(PositiveNumber, 6),
  /** Weight λ of the ratio loss. */
  lambda: withDefault(Schema.Finite.pipe(Schema.check(Schema.isGreaterThanOrEqualTo(0))), 0.03)
}).pipe(Schema.check(crossCheck((s) => s.ratio <= 1 ? ["ratio", `the compression ratio must exceed 1, got ${s.ratio}`] : undefined)))
export type ChunkerSpec = typeof ChunkerSpec.Type

export const Chunker: BlockKind<ChunkerSpec> = {
  name: "chunk",
  summary: "boundary router: cosine of adjacent query/key projections",
  spec: ChunkerSpec,
  io: (s) => ({ in: s?.d, out: s?.d }),
  params: (s) => [
    { name: "q.weight", shape: [s.d, s.d], part: "chunk" },
    { name: "k.weight", shape: [s.d, s.d], part: "chunk" }
  ],
  cost: (s) => Cost.make({ flops: { chunk: 2 * 2 * s.d * s.d } })
}

/** @category constructors */
export const chunker = <const D extends number>(
  spec: { readonly d: D; readonly ratio: number; readonly tau?: number; readonly lambda?: number } & Named
): Block<D, D> => leaf(Chunker, spec)
