/**
 * Token embedding: `[batch, seq] ids → [batch, seq, embedding]`, optionally plus learned absolute
 * position embeddings (GPT-2's `wpe`).
 *
 * Params: `weight [vocab, d]` (+ `positions [maxPositions, d]`). FLOPs: 0, a lookup is not a matmul
 * (FlopCounterMode, TRL). Counted as activated in full (Mixtral/Qwen/OLMoE convention).
 *
 * @since 0.1.0
 */
import { Schema } from "effect"
import * as Cost from "../cost/Cost.ts"
import { type Block, type BlockKind, leaf, type Named } from "../graph/Block.ts"
import { Dim, withDefault } from "../graph/Spec.ts"

export const EmbeddingSpec = Schema.Struct({
  vocab: Dim,
  d: Dim,
  /** Learned absolute positions (GPT-2), or null. */
  positions: withDefault(Schema.NullOr(Dim), null)
})
export type EmbeddingSpec = typeof EmbeddingSpec.Type

export const Embedding: BlockKind<EmbeddingSpec> = {
  name: "embedding",
  summary: "token (and learned position) embedding",
  spec: EmbeddingSpec,
  io: (s) => ({ in: "ids", out: s?.d }),
  params: (s) => [
    { name: "weight", shape: [s.vocab, s.d], part: "embedding" },
    ...(s.positions === null ? [] : [{ name: "positions", shape: [s.positions, s.d], part: "embedding" }])
  ],
  cost: () => Cost.zero,
  stream: "local",
  apply: (ctx, _s, ids, p) => {
    const { tf } = ctx
    const x = tf.gather(p["weight"]!, ids)
    return p["positions"] === undefined ? x : tf.add(x, tf.gather(p["positions"], ctx.positionIds()))
  }
}

/** @category constructors */
export const embedding = <const D extends number>(
  spec: { readonly vocab: number; readonly d: D; readonly positions?: number | null } & Named
): Block<"ids", D> => leaf(Embedding, spec)
