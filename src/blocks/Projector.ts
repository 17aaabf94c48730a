/**
 * A width projector between the token stream and a wider concept model (ConceptMoE strategy 3):
 * ĥ → c (`d → d_c`) before the concept model and ĉ → z (`d_c → d`) after it (method spec §5).
 *
 * Params: `weight [dIn, dOut]` (+ `bias [dOut]`), part "projector". FLOPs/token: 2·dIn·dOut.
 *
 * @since 0.1.0
 */
import { Schema } from "effect"
import * as Cost from "../cost/Cost.ts"
import { type Block, type BlockKind, leaf, type Named } from "../graph/Block.ts"
import { Dim, withDefault } from "../graph/Spec.ts"
import * as ops from "./ops.ts"

export const ProjectorSpec = Schema.Struct({ dIn: Dim, dOut: Dim, bias: withDefault(Schema.Boolean, false) })
export type ProjectorSpec = typeof ProjectorSpec.Type

export const Projector: BlockKind<ProjectorSpec> = {
  name: "projector",
  summary: "width projector of a wider concept model",
  spec: ProjectorSpec,
  io: (s) => ({ in: s?.dIn, out: s?.dOut }),
  params: (s) => [
    { name: "weight", shape: [s.dIn, s.dOut], part: "projector" },
    ...(s.bias ? [{ name: "bias", shape: [s.dOut], part: "projector" }] : [])
  ],
  cost: (s) => Cost.make({ flops: { projector: 2 * s.dIn * s.dOut } }),
  apply: (ctx, _s, x, p) => ops.linear(ctx, x, p["weight"]!, p["bias"])
}

/** @category constructors */
export const projector = <const I extends number, const O extends number>(
  spec: { readonly dIn: I; readonly dOut: O; readonly bias?: boolean } & Named
): Block<I, O> => leaf(Projector, spec)
