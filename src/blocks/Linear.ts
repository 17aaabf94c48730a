/**
 * Linear map `[..., dIn] → [..., dOut]`, optional bias.
 *
 * Params: `weight [dIn, dOut]` (+ `bias [dOut]`). FLOPs/token: 2·dIn·dOut (bias adds not counted).
 *
 * @since 0.1.0
 */
import { Schema } from "effect"
import * as Cost from "../cost/Cost.ts"
import { type Block, type BlockKind, leaf, type Named } from "../graph/Block.ts"
import { Dim, PartName, withDefault } from "../graph/Spec.ts"
import * as ops from "./ops.ts"

export const LinearSpec = Schema.Struct({
  dIn: Dim,
  dOut: Dim,
  bias: withDefault(Schema.Boolean, false),
  /** The part its parameters and FLOPs are reported under. */
  part: withDefault(PartName, "linear")
})
export type LinearSpec = typeof LinearSpec.Type

export const Linear: BlockKind<LinearSpec> = {
  name: "linear",
  summary: "x·W (+ b)",
  spec: LinearSpec,
  io: (s) => ({ in: s?.dIn, out: s?.dOut }),
  params: (s) => [
    { name: "weight", shape: [s.dIn, s.dOut], part: s.part },
    ...(s.bias ? [{ name: "bias", shape: [s.dOut], part: s.part }] : [])
  ],
  cost: (s) => Cost.make({ flops: { [s.part]: 2 * s.dIn * s.dOut } }),
  stream: "local",
  apply: (ctx, _s, x, p) => ops.linear(ctx, x, p["weight"]!, p["bias"])
}

/** @category constructors */
export const linear = <const I extends number, const O extends number>(
  spec: { readonly dIn: I; readonly dOut: O; readonly bias?: boolean; readonly part?: string } & Named
): Block<I, O> => leaf(Linear, spec)
