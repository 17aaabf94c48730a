/**
 * A width projector between the token stream and a wider concept model (ConceptMoE strategy 3):
 * ĥ → c (`d → d_c`) before the concept model and ĉ → z (`d_c → d`) after it (method spec §5).
 *
 * Params: `weight [dIn, dOut]` (+ `bias [dOut]`), part "projector". FLOPs/token: 2·dIn·dOut.
 *
 * @since 0.1.0
 */
import { Schema } from "effect"
import { type Block, type BlockKind, leaf, type Named } from "../graph/Block.ts"
import { Dim, withDefault } from "../graph/Spec.ts"
import { Linear } from "./Linear.ts"

export const ProjectorSpec = Schema.Struct({ dIn: Dim, dOut: Dim, bias: withDefault(Schema.Boolean, false) })
export type ProjectorSpec = typeof ProjectorSpec.Type

/** A linear map reported under part "projector": Linear's parameters, cost and apply. */
const asLinear = (s: ProjectorSpec) => ({ ...s, part: "projector" })

export const Projector: BlockKind<ProjectorSpec> = {
  name: "projector",
  summary: "width projector of a wider concept model",
  spec: ProjectorSpec,
  io: (s) => ({ in: s?.dIn, out: s?.dOut }),
  params: (s) => Linear.params!(asLinear(s)),
  cost: (s, ctx) => Linear.cost(asLinear(s), ctx),
  stream: "local",
  apply: (ctx, s, x, p, children) => Linear.apply!(ctx, asLinear(s), x, p, children)
}

/** @category constructors */
export const projector = <const I extends number, const O extends number>(
  spec: { readonly dIn: I; readonly dOut: O; readonly bias?: boolean } & Named
): Block<I, O> => leaf(Projector, spec)
