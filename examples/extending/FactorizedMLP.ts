/**
 * A block kind defined outside the library, in one file: a SwiGLU MLP whose three matrices are each
 * factorised through rank r (W ≈ A·B), as in low-rank compression of FFNs.
 *
 * `[..., d] → [..., d]`. Params: gate and up `A [d, r]`, `B [r, h]`; down `A [h, r]`, `B [r, d]`:
 * 3·r·(d + h) in all. FLOPs/token: 2 × that (part "mlp").
 *
 * Everything the library needs is here: the Schema'd spec (with a cross-field check), the declared
 * sizes, the parameters and the cost. Registration (for JSON graphs) is one call; see
 * docs/extending.md.
 */
import { Schema } from "effect"
import { Block, Cost, Spec } from "../../src/index.ts"

export const FactorizedMLPSpec = Schema.Struct({
  d: Spec.Dim,
  hidden: Spec.Dim,
  rank: Spec.Dim
}).pipe(Schema.check(Spec.crossCheck((s) =>
  s.rank >= Math.min(s.d, s.hidden)
    ? ["rank", `rank ${s.rank} saves nothing: it must be below min(d, hidden) = ${Math.min(s.d, s.hidden)}`]
    : undefined
)))
export type FactorizedMLPSpec = typeof FactorizedMLPSpec.Type

const factor = (name: string, dIn: number, rank: number, dOut: number): ReadonlyArray<Block.ParamDecl> => [
  { name: `${name}.a`, shape: [dIn, rank], part: "mlp" },
  { name: `${name}.b`, shape: [rank, dOut], part: "mlp" }
]

export const FactorizedMLP: Block.BlockKind<FactorizedMLPSpec> = {
  name: "factorized-mlp",
  summary: "SwiGLU MLP with rank-r factorised matrices",
  spec: FactorizedMLPSpec,
  io: (s) => ({ in: s?.d, out: s?.d }),
  params: (s) => [...factor("gate", s.d, s.rank, s.hidden), ...factor("up", s.d, s.rank, s.hidden), ...factor("down", s.hidden, s.rank, s.d)],
  cost: (s) => Cost.make({ flops: { mlp: 2 * 3 * s.rank * (s.d + s.hidden) } })
}

/** Typed constructor: `factorizedMlp({ d: 128, hidden: 896, rank: 64 })` is a `Block<128, 128>`. */
export const factorizedMlp = <const D extends number>(
  spec: { readonly d: D; readonly hidden: number; readonly rank: number } & Block.Named
): Block.Block<D, D> => Block.leaf(FactorizedMLP, spec)
