/**
 * Rotary position embedding (RoPE) on `[..., heads·headDim]`: rotates the first `dim` features of
 * each head by position-dependent angles with base `base`.
 *
 * Params: none. FLOPs: none counted (elementwise). The `inv_freq` outer product transformers computes
 * once per forward (`dim`·T FLOPs) is excluded from model FLOPs and reported separately.
 *
 * The {@link RopeSpec} is also what attention blocks take to describe their own rotary embedding,
 * with an optional {@link RopeScaling} for a context longer than the one trained at, as Hugging Face
 * configs give it in `rope_scaling` (`models/HuggingFace.ts` resolves their fields):
 *
 * - `linear`: every inverse frequency divided by `factor` (positions interpolated).
 * - `yarn`: per frequency, a blend of the plain one (extrapolation) and the one divided by `factor`
 *   (interpolation): frequency pair j has `d_j = j`, and the ramp `r_j = clamp((j − low) / (high −
 *   low), 0, 1)` over `low`, `high` = the pair indices where a wave of the original context
 *   `originalContext` turns `betaFast` and `betaSlow` times (`dim·ln(L / (2π·β)) / (2·ln base)`,
 *   floored and ceiled unless `truncate` is false, clamped to `[0, dim − 1]`; `high` one above
 *   `low` when equal is avoided by adding 0.001); `inv_j = inv_j^interp·r_j + inv_j^extrap·(1 − r_j)`.
 *   cos and sin are multiplied by `attention` (YaRN's attention temperature).
 *
 * @since 0.1.0
 */
import { Schema } from "effect"
import * as Cost from "../cost/Cost.ts"
import type { ForwardContext } from "../graph/Apply.ts"
import { type Block, type BlockKind, leaf, type Named } from "../graph/Block.ts"
import { crossCheck, Dim, PositiveNumber, withDefault } from "../graph/Spec.ts"
import { applyRope, ropeTables, ropeTablesFor } from "./ops.ts"

const AtLeastOne = Schema.Finite.pipe(Schema.check(Schema.isGreaterThanOrEqualTo(1)))

/** How the rotary frequencies are scaled for a longer context (see the module's doc). */
export const RopeScaling = Schema.Union([
  Schema.Struct({ type: Schema.Literal("linear"), factor: AtLeastOne }),
  Schema.Struct({
    type: Schema.Literal("yarn"),
    factor: AtLeastOne,
    /** The context length trained at (Hugging Face: `original_max_position_embeddings`, else `max_position_embeddings`). */
    originalContext: Dim,
    betaFast: withDefault(PositiveNumber, 32),
    betaSlow: withDefault(PositiveNumber, 1),
    /** The factor on cos and sin (Hugging Face: `attention_factor`, or from `factor`, `mscale` and `mscale_all_dim`). */
    attention: withDefault(PositiveNumber, 1),
    truncate: withDefault(Schema.Boolean, true)
  })
])
export type RopeScaling = typeof RopeScaling.Type

/** Rotary settings of an attention layer: rotated features per head, the base, and an optional scaling. */
export const RopeSpec = Schema.Struct({
  dim: Dim.pipe(Schema.check(Schema.isMultipleOf(2))),
  base: withDefault(PositiveNumber, 10000),
  scaling: Schema.optionalKey(Schema.NullOr(RopeScaling))
})
export type RopeSpec = typeof RopeSpec.Type

/**
 * The inverse frequency of each rotated pair (`dim / 2` of them) under `scaling`, and the factor on
 * cos and sin; without scaling, `base^(−2j/dim)` and 1.
 */
export const ropeFrequencies = (dim: number, base: number, scaling: RopeScaling | null): { readonly inverse: Float64Array; readonly attention: number } => {
  const half = dim / 2
  const plain = Float64Array.from({ length: half }, (_, j) => base ** (-(2 * j) / dim))
  if (scaling === null) return { inverse: plain, attention: 1 }
  if (scaling.type === "linear") return { inverse: plain.map((f) => f / scaling.factor), attention: 1 }
  // the pair index at which a wave of the original context turns `turns` times
  const pairAt = (turns: number) => (dim * Math.log(scaling.originalContext / (turns * 2 * Math.PI))) / (2 * Math.log(base))
  let low = pairAt(scaling.betaFast)
  let high = pairAt(scaling.betaSlow)
  if (scaling.truncate) {
    low = Math.floor(low)
    high = Math.ceil(high)
  }
  low = Math.max(low, 0)
  high = Math.min(high, dim - 1)
  if (low === high) high += 0.001
  const inverse = plain.map((f, j) => {
    const interpolated = Math.min(1, Math.max(0, (j - low) / (high - low)))
    return (f / scaling.factor) * interpolated + f * (1 - interpolated)
  })
  return { inverse, attention: scaling.attention }
}

/**
 * cos and sin `[N, 1, dim/2]` of a {@link RopeSpec} for the pass's positions: `ops.ropeTables`
 * without scaling; with it, the scaled frequencies, cos and sin times the attention factor.
 */
export const ropeTablesOf = (ctx: ForwardContext, rope: { readonly dim: number; readonly base: number; readonly scaling?: RopeScaling | null }) => {
  const scaling = rope.scaling ?? null
  if (scaling === null) return ropeTables(ctx, rope.dim, rope.base)
  const f = ropeFrequencies(rope.dim, rope.base, scaling)
  return ropeTablesFor(ctx, f.inverse, f.attention)
}

export const RotarySpec = Schema.Struct({
  heads: Dim,
  headDim: Dim,
  dim: Dim.pipe(Schema.check(Schema.isMultipleOf(2))),
  base: withDefault(PositiveNumber, 10000),
  scaling: Schema.optionalKey(Schema.NullOr(RopeScaling))
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
    const y = applyRope(ctx, ctx.tf.reshape(x, [n, s.heads, s.headDim]), s.dim, ropeTablesOf(ctx, s))
    return ctx.tf.reshape(y, [n, s.heads * s.headDim])
  }
}

/** @category constructors */
export const rotary = (
  spec: { readonly heads: number; readonly headDim: number; readonly dim: number; readonly base?: number; readonly scaling?: RopeScaling | null } & Named
): Block<number, number> => leaf(Rotary, spec)
