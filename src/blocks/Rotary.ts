/**
 * Rotary position embedding (RoPE) on `[..., heads·headDim]`: rotates the first `dim` features of
 * each head by position-dependent angles with base `base`.
 *
 * Params: none. FLOPs: none counted (elementwise). The `inv_freq` outer product transformers computes
 * once per forward (`dim`·T FLOPs) is excluded from model FLOPs and reported separately.
 *
 * The {@link RopeSpec} is also what attention blocks take to describe their own rotary embedding.
 *
 * @since 0.1.0
 */
import { Schema } from "effect"
import * as Cost from "../cost/Cost.ts"
import { type Block, type BlockKind, leaf, type Named } from "../graph/Block.ts"
import { crossCheck, Dim, PositiveNumber, withDefault } from "../graph/Spec.ts"
import { applyRope, ropeTables } from "./ops.ts"

/** Rotary settings of an attention layer: rotated features per head, and the base. */
export const RopeSpec = Schema.Struct({
  dim: Dim.pipe(Schema.check(Schema.isMultipleOf(2))),
  base: withDefault(PositiveNumber, 10000)
})
export type RopeSpec = typeof RopeSpec.Type

export const RotarySpec = Schema.Struct({
  heads: Dim,
  headDim: Dim,
  dim: Dim.pipe(Schema.check(Schema.isMultipleOf(2))),
  base: withDefault(PositiveNumber, 10000)
}).pipe(Schema.check(crossCheck((s) => s.dim > s.headDim ? ["dim", `rotary dim ${s.dim} exceeds headDim ${s.headDim}`] : undefined)))
export type RotarySpec = typeof RotarySpec.Type

export const Rotary: BlockKind<RotarySpec> = {
  name: "rotary",
  summary: "rotary position embedding",
  spec: RotarySpec,
  io: (s) => ({ in: s?.heads * s?.headDim, out: s?.heads * s?.headDim }),
  cost: () => Cost.zero,
  stream: "local",
  apply: (ctx, s, x) => {
    const n = x.shape[0]!
    const y = applyRope(ctx, ctx.tf.reshape(x, [n, s.heads, s.headDim]), s.dim, ropeTables(ctx, s.dim, s.base))
    return ctx.tf.reshape(y, [n, s.heads * s.headDim])
  }
}

/** @category constructors */
export const rotary = (
  spec: { readonly heads: number; readonly headDim: number; readonly dim: number; readonly base?: number } & Named
): Block<number, number> => leaf(Rotary, spec)
