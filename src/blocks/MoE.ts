/**
 * Mixture-of-experts feed-forward `[..., d] → [..., d]`.
 *
 * A router `[d, E]` (optional bias `[E]`) scores E routed experts; each token runs its top-k, each an
 * FFN of `expertHidden` neurons ({@link ffnParams}, stacked `[E, ...]`). Fine-grained experts are
 * simply many small ones. Optional shared experts (DeepSeek, Qwen2-MoE) form one FFN of
 * `shared.hidden` neurons that every token runs, optionally scaled by a sigmoid gate `[d, 1]` (Qwen2).
 *
 * Params: router d·E; experts E·m·d·h (m = 3 gated, 2 plain); shared m·d·h_s; gate d.
 * Activated per token: the router, k/E of the experts, the shared experts and gate.
 * FLOPs/token: 2·d·E (router) + 2·k·m·d·h (experts) + 2·m·d·h_s (shared) + 2·d (gate).
 * Top-k selection, the softmax and the weighted combine are not matmuls and are not counted.
 *
 * @since 0.1.0
 */
import { Schema } from "effect"
import * as Cost from "../cost/Cost.ts"
import { type Block, type BlockKind, leaf, type Named } from "../graph/Block.ts"
import { crossCheck, Dim, withDefault } from "../graph/Spec.ts"
import { Activation, ffnMatrices, ffnParams } from "./MLP.ts"

export const SharedExperts = Schema.Struct({
  /** Neurons of the shared FFN (DeepSeek: n_shared · moe_intermediate_size). */
  hidden: Dim,
  /** A sigmoid gate `[d, 1]` on the shared output (Qwen2-MoE). */
  gate: withDefault(Schema.Boolean, false)
})

export const MoESpec = Schema.Struct({
  d: Dim,
  experts: Dim,
  topK: Dim,
  expertHidden: Dim,
  activation: withDefault(Activation, "swiglu"),
  bias: withDefault(Schema.Boolean, false),
  shared: withDefault(Schema.NullOr(SharedExperts), null),
  routerBias: withDefault(Schema.Boolean, false),
  scoring: withDefault(Schema.Literals(["softmax", "sigmoid"]), "softmax"),
  normalizeTopK: withDefault(Schema.Boolean, false)
}).pipe(Schema.check(crossCheck((s) =>
  s.topK > s.experts ? ["topK", `top-k (${s.topK}) exceeds the number of experts (${s.experts})`] : undefined
)))
export type MoESpec = typeof MoESpec.Type

export const MoE: BlockKind<MoESpec> = {
  name: "moe",
  summary: "mixture of experts: router, top-k routed experts, optional shared experts",
  spec: MoESpec,
  io: (s) => ({ in: s?.d, out: s?.d }),
  params: (s) => [
    { name: "router.weight", shape: [s.d, s.experts], part: "router" },
    ...(s.routerBias ? [{ name: "router.bias", shape: [s.experts], part: "router" }] : []),
    ...ffnParams({
      prefix: "experts.",
      d: s.d,
      hidden: s.expertHidden,
      activation: s.activation,
      bias: s.bias,
      part: "experts",
      stack: { experts: s.experts, topK: s.topK }
    }),
    ...(s.shared === null ? [] : [
      ...ffnParams({ prefix: "shared.", d: s.d, hidden: s.shared.hidden, activation: s.activation, bias: s.bias, part: "sharedExperts" }),
      ...(s.shared.gate ? [{ name: "sharedGate.weight", shape: [s.d, 1], part: "router" }] : [])
    ])
  ],
  cost: (s) => {
    const m = ffnMatrices(s.activation)
    return Cost.make({
      flops: {
        router: 2 * s.d * s.experts + (s.shared?.gate === true ? 2 * s.d : 0),
        experts: 2 * s.topK * m * s.d * s.expertHidden,
        ...(s.shared === null ? {} : { sharedExperts: 2 * m * s.d * s.shared.hidden })
      }
    })
  }
}

/** @category constructors */
export const moe = <const D extends number>(
  spec:
    & { readonly d: D; readonly experts: number; readonly topK: number; readonly expertHidden: number }
    & Partial<Omit<MoESpec, "d" | "experts" | "topK" | "expertHidden" | "shared">>
    & { readonly shared?: { readonly hidden: number; readonly gate?: boolean } | null }
    & Named
): Block<D, D> => leaf(MoE, spec)
