/**
 * LayerNorm `[..., d] → [..., d]`: (x − mean) / std · g (+ b).
 *
 * Params: `weight [d]` (+ `bias [d]`), part "norm". FLOPs: not counted (not a matmul).
 *
 * @since 0.1.0
 */
import { Schema } from "effect"
import * as Cost from "../cost/Cost.ts"
import { type Block, type BlockKind, leaf, type Named } from "../graph/Block.ts"
import { Dim, PositiveNumber, withDefault } from "../graph/Spec.ts"
import * as ops from "./ops.ts"

export const LayerNormSpec = Schema.Struct({
  d: Dim,
  bias: withDefault(Schema.Boolean, true),
  eps: withDefault(PositiveNumber, 1e-5)
})
export type LayerNormSpec = typeof LayerNormSpec.Type

export const LayerNorm: BlockKind<LayerNormSpec> = {
  name: "layernorm",
  summary: "layer norm with gain (and bias)",
  spec: LayerNormSpec,
  io: (s) => ({ in: s?.d, out: s?.d }),
  params: (s) => [
    { name: "weight", shape: [s.d], part: "norm", init: "ones" },
    ...(s.bias ? [{ name: "bias", shape: [s.d], part: "norm", init: "zeros" as const }] : [])
  ],
  cost: () => Cost.zero,
  stream: "local",
  apply: (ctx, s, x, p) => ops.layerNorm(ctx, x, p["weight"]!, p["bias"], s.eps)
}

/** @category constructors */
export const layerNorm = <const D extends number>(
  spec: { readonly d: D; readonly bias?: boolean; readonly eps?: number } & Named
): Block<D, D> => leaf(LayerNorm, spec)
