/**
 * ConceptMoE's joint-decoding attention (method spec §7, paper Eq. 11): a decoder attention layer
 * whose queries, keys and values also read the dechunked concept ĉ^ema:
 * q = z·W_q + ĉ·W_q^c, k = z·W_k + ĉ·W_k^c, v = z·W_v + ĉ·W_v^c.
 * `[batch, seq, d]` (+ side input `concept [batch, seq, d]`) `→ [batch, seq, d]`.
 *
 * Params: those of {@link Attention} plus `qc [d, H·hd]`, `kc [d, KV·hd]`, `vc [d, KV·hd]` with the
 * same GQA shapes as W_q, W_k, W_v (part "jointDecoding"; zero-initialised when converting a
 * trained MoE). FLOPs/token: the attention's plus 2·d·hd·(H + 2KV) (part "jointDecoding"). The
 * attention map and KV cache are the attention's.
 *
 * @since 0.1.0
 */
import * as Cost from "../cost/Cost.ts"
import { type Block, type BlockKind, leaf } from "../graph/Block.ts"
import type { ForwardContext, Tensor } from "../graph/Apply.ts"
import { Unsupported } from "../internal/RunErrors.ts"
import { applyAttention, Attention, type AttentionArgs, AttentionSpec } from "./Attention.ts"
import { ConceptOps } from "./ConceptContext.ts"

/** The concept per token of the concept stage before this layer (`ConceptOps.concept`). */
const conceptOf = (ctx: ForwardContext): Tensor => {
  const c = ctx.get(ConceptOps).concept()
  if (c === undefined) {
    throw new Unsupported({ at: ctx.scope, problem: "joint-decoding attention runs after a concept stage, which sets the concept side input; place it after one" })
  }
  return c
}

export const JointAttention: BlockKind<AttentionSpec> = {
  name: "joint-attention",
  summary: "decoder attention with concept projections added into q, k and v (joint decoding)",
  spec: AttentionSpec,
  io: Attention.io,
  params: (s) => [
    ...Attention.params!(s),
    { name: "qc.weight", shape: [s.d, s.heads * s.headDim], part: "jointDecoding", init: "zeros" },
    { name: "kc.weight", shape: [s.d, s.kvHeads * s.headDim], part: "jointDecoding", init: "zeros" },
    { name: "vc.weight", shape: [s.d, s.kvHeads * s.headDim], part: "jointDecoding", init: "zeros" }
  ],
  cost: (s, ctx) =>
    Cost.add(
      Attention.cost(s, ctx),
      Cost.make({ flops: { jointDecoding: 2 * s.d * s.headDim * (s.heads + 2 * s.kvHeads) } })
    ),
  stream: "stateful",
  apply: (ctx, s, x, p) => applyAttention(ctx, s, x, p, conceptOf(ctx))
}

/** @category constructors */
export const jointAttention = <const D extends number>(spec: AttentionArgs<D>): Block<D, D> =>
  leaf(JointAttention, { ...spec, kvHeads: spec.kvHeads ?? spec.heads, headDim: spec.headDim ?? spec.d / spec.heads })

