/**
 * A block kind defined outside the library, in one file: a SwiGLU MLP whose three matrices are each
 * factorised through rank r (W ≈ A·B), as in low-rank compression of FFNs.
 *
 * `[..., d] → [..., d]`. Params: gate and up `A [d, r]`, `B [r, h]`; down `A [h, r]`, `B [r, d]`:
 * 3·r·(d + h) in all. FLOPs/token: 2 × that (part "mlp").
 *
 * Everything the library needs is here: the Schema'd spec (with a cross-field check), the declared
 * sizes, the parameters, the cost, and how it runs on tensors (`apply`, written against the exported
 * `Apply` types only), so `lower`, `train`, `verify` and `generate` run it too. Registration (for
 * JSON graphs) is one call; see docs/extending.md.
 *
 * It also declares a context key of its own, {@link Bottleneck}: what it needs from the context
 * beyond tensor operations, here a watcher of its rank-r intermediate values, which a caller can
 * provide for a pass (docs/extending.md, "Context keys").
 */
import { Schema } from "effect"
import { Apply, Block, Cost, Spec } from "conceptmoe"

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

/**
 * Sees each rank-r intermediate `x·A` (`[n, rank]`) of a factorised product: `scope` is the node's
 * path, `name` the matrix (`gate`, `up`, `down`). By default it sees nothing; a caller provides a
 * watcher for a pass with `Lower.forward(…, { provide: [Apply.provide(Bottleneck, () => watcher)] })`.
 */
export interface Bottleneck {
  readonly observe: (scope: string, name: string, h: Apply.Tensor) => void
}

/** The context key of {@link Bottleneck}, with its default (made once per pass when nothing provides it). */
export const Bottleneck = Apply.ContextKey<Bottleneck>("factorized-mlp/Bottleneck", { make: () => ({ observe: () => {} }) })

/** `x·A·B`: both products counted as weight FLOPs (so `verify` checks the static cost). */
const product = (ctx: Apply.ForwardContext, x: Apply.Tensor, p: Readonly<Record<string, Apply.Tensor>>, name: string) => {
  const h = ctx.matMul(x, p[`${name}.a`]!, "weights")
  ctx.get(Bottleneck).observe(ctx.scope, name, h)
  return ctx.matMul(h, p[`${name}.b`]!, "weights")
}

/** SwiGLU: down(silu(gate(x)) · up(x)), each matrix through its rank-r factors. */
const applyFactorized: Apply.ApplyFn<FactorizedMLPSpec> = (ctx, _s, x, p) =>
  product(ctx, ctx.tf.mul(ctx.activate(product(ctx, x, p, "gate"), "silu"), product(ctx, x, p, "up")), p, "down")

export const FactorizedMLP: Block.BlockKind<FactorizedMLPSpec> = {
  name: "factorized-mlp",
  summary: "SwiGLU MLP with rank-r factorised matrices",
  spec: FactorizedMLPSpec,
  io: (s) => ({ in: s?.d, out: s?.d }),
  params: (s) => [...factor("gate", s.d, s.rank, s.hidden), ...factor("up", s.d, s.rank, s.hidden), ...factor("down", s.hidden, s.rank, s.d)],
  cost: (s) => Cost.make({ flops: { mlp: 2 * 3 * s.rank * (s.d + s.hidden) } }),
  stream: "local",
  apply: applyFactorized
}

/** Typed constructor: `factorizedMlp({ d: 128, hidden: 896, rank: 64 })` is a `Block<128, 128>`. */
export const factorizedMlp = <const D extends number>(
  spec: { readonly d: D; readonly hidden: number; readonly rank: number } & Block.Named
): Block.Block<D, D> => Block.leaf(FactorizedMLP, spec)
