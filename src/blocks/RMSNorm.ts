/**
 * RMSNorm `[..., d] → [..., d]`: x / rms(x) · g.
 *
 * Params: `weight [d]` (part "norm"). FLOPs: not counted (not a matmul).
 *
 * @since 0.1.0
 */
import { Schema } from "effect"
import * as Cost from "../cost/Cost.ts"
import { type Block, type BlockKind, leaf, type Named } from "../graph/Block.ts"
import { Dim, PositiveNumber, withDefault } from "../graph/Spec.ts"
import * as ops from "./ops.ts"

export const RMSNormSpec = Schema.Struct({ d: Dim, eps: withDefault(PositiveNumber, 1e-6) })
export type RMSNormSpec = typeof RMSNormSpec.Type

export const RMSNorm: BlockKind<RMSNormSpec> = {
  name: "rmsnorm",
  summary: "root-mean-square norm with a gain",
  spec: RMSNormSpec,
  io: (s) => ({ in: s?.d, out: s?.d }),
  params: (s) => [{ name: "weight", shape: [s.d], part: "norm", init: "ones" }],
  cost: () => Cost.zero,
  stream: "local",
  apply: (ctx, s, x, p) => ops.rmsNorm(ctx, x, p["weight"]!, s.eps)
}

/** @category constructors */
export const rmsNorm = <const D extends number>(spec: { readonly d: D; readonly eps?: number } & Named): Block<D, D> =>
  leaf(RMSNorm, spec)
