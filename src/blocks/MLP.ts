/**
 * Dense feed-forward block `[..., d] → [..., d]` through `hidden` neurons.
 *
 * Gated activations (`swiglu`, `geglu`): `down(act(x·gate) ⊙ x·up)`, params `gate [d, h]`,
 * `up [d, h]`, `down [h, d]`, FLOPs/token 6·d·h. Plain activations (`gelu`, `gelu_tanh`, `relu`,
 * `silu`): `down(act(x·up))`, params `up [d, h]`, `down [h, d]`, FLOPs/token 4·d·h.
 * `bias` adds `[h]` biases to gate/up and `[d]` to down. Reported under part "mlp".
 *
 * The same parameter layout serves routed and shared experts ({@link ffnParams}).
 *
 * @since 0.1.0
 */
import { Schema } from "effect"
import * as Cost from "../cost/Cost.ts"
import { type Block, type BlockKind, leaf, type Named, type ParamDecl } from "../graph/Block.ts"
import { Dim, PartName, withDefault } from "../graph/Spec.ts"
import { ffn } from "./ops.ts"

export const Activation = Schema.Literals(["swiglu", "geglu", "gelu", "gelu_tanh", "relu", "silu"])
export type Activation = typeof Activation.Type

/** Whether an activation is gated (three matrices) or plain (two). */
export const isGated = (a: Activation): boolean => a === "swiglu" || a === "geglu"

/** Number of d×h matrices of one FFN. */
export const ffnMatrices = (a: Activation): number => (isGated(a) ? 3 : 2)

/**
 * The parameters of an FFN of `hidden` neurons, optionally stacked over `experts` with `topK`
 * active per token.
 */
export const ffnParams = (options: {
  readonly prefix: string
  readonly d: number
  readonly hidden: number
  readonly activation: Activation
  readonly bias: boolean
  readonly part: string
  readonly stack?: { readonly experts: number; readonly topK: number }
}): Array<ParamDecl> => {
  const { bias, d, hidden, part, prefix, stack } = options
  const lead = stack === undefined ? [] : [stack.experts]
  const active = stack === undefined ? {} : { active: { used: stack.topK, of: stack.experts } }
  const p = (name: string, shape: ReadonlyArray<number>): ParamDecl => ({ name: `${prefix}${name}`, shape: [...lead, ...shape], part, ...active })
  return [
    ...(isGated(options.activation) ? [p("gate.weight", [d, hidden])] : []),
    p("up.weight", [d, hidden]),
    p("down.weight", [hidden, d]),
    ...(bias
      ? [...(isGated(options.activation) ? [p("gate.bias", [hidden])] : []), p("up.bias", [hidden]), p("down.bias", [d])]
        .map((b): ParamDecl => ({ ...b, init: "zeros" }))
      : [])
  ]
}

export const MLPSpec = Schema.Struct({
  d: Dim,
  hidden: Dim,
  activation: withDefault(Activation, "swiglu"),
  bias: withDefault(Schema.Boolean, false),
  part: withDefault(PartName, "mlp")
})
export type MLPSpec = typeof MLPSpec.Type

export const MLP: BlockKind<MLPSpec> = {
  name: "mlp",
  summary: "dense feed-forward (SwiGLU, GeGLU, GELU, ReLU, SiLU)",
  spec: MLPSpec,
  io: (s) => ({ in: s?.d, out: s?.d }),
  params: (s) => ffnParams({ prefix: "", ...s }),
  cost: (s) => Cost.make({ flops: { [s.part]: 2 * ffnMatrices(s.activation) * s.d * s.hidden } }),
  stream: "local",
  apply: (ctx, s, x, p) => ffn(ctx, x, (name) => p[name], s.activation)
}

/** @category constructors */
export const mlp = <const D extends number>(
  spec: { readonly d: D; readonly hidden: number } & Partial<Omit<MLPSpec, "d" | "hidden">> & Named
): Block<D, D> => leaf(MLP, spec)
