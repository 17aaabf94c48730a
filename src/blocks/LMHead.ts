/**
 * Language-model head `[..., d] → [..., vocab]` logits.
 *
 * Untied: params `weight [d, vocab]` (+ `bias [vocab]`). Tied: the weight is the embedding table
 * named by `tiedTo` (an absolute parameter path such as `"embed/weight"`), counted once, there.
 * FLOPs/token: 2·d·vocab either way (part "lmHead").
 *
 * @since 0.1.0
 */
import { Schema } from "effect"
import * as Cost from "../cost/Cost.ts"
import { type Block, type BlockKind, leaf, type Named } from "../graph/Block.ts"
import { Dim, withDefault } from "../graph/Spec.ts"

export const LMHeadSpec = Schema.Struct({
  d: Dim,
  vocab: Dim,
  tiedTo: withDefault(Schema.NullOr(Schema.String), null),
  bias: withDefault(Schema.Boolean, false)
})
export type LMHeadSpec = typeof LMHeadSpec.Type

export const LMHead: BlockKind<LMHeadSpec> = {
  name: "lmhead",
  summary: "logits over the vocabulary (tied or untied)",
  spec: LMHeadSpec,
  io: (s) => ({ in: s?.d, out: s?.vocab }),
  params: (s) => [
    s.tiedTo === null
      ? { name: "weight", shape: [s.d, s.vocab], part: "lmHead" }
      : { name: "weight", shape: [s.vocab, s.d], part: "lmHead", tiedTo: s.tiedTo },
    ...(s.bias ? [{ name: "bias", shape: [s.vocab], part: "lmHead", init: "zeros" as const }] : [])
  ],
  cost: (s) => Cost.make({ flops: { lmHead: 2 * s.d * s.vocab } }),
  stream: "local",
  apply: (ctx, s, x, p) => {
    const w = s.tiedTo === null ? p["weight"]! : ctx.tf.transpose(p["weight"]!)
    const y = ctx.matMul(x, w, "weights")
    return p["bias"] === undefined ? y : ctx.tf.add(y, p["bias"])
  }
}

/** @category constructors */
export const lmHead = <const D extends number, const V extends number>(
  spec: { readonly d: D; readonly vocab: V; readonly tiedTo?: string | null; readonly bias?: boolean } & Named
): Block<D, V> => leaf(LMHead, spec)
