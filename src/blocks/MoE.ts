/**
 * Mixture-of-experts feed-forward `[..., d] → [..., d]`.
 *
 * A router `[d, E]` (optional bias `[E]`) scores E routed experts; each token runs its top-k, each an
 * FFN of `expertHidden` neurons ({@link ffnParams}, stacked `[E, ...]`). Fine-grained experts are
 * simply many small ones. Optional shared experts (DeepSeek, Qwen2-MoE) form one FFN of
 * `shared.hidden` neurons that every token runs, optionally scaled by a sigmoid gate `[d, 1]` (Qwen2).
 *
 * Routing: the router's probabilities (softmax or sigmoid) choose each token's top-k; optionally
 * only among the experts of the `groupTopK` best of `groups` equal groups (DeepSeek's group-limited
 * routing; a group scores its largest probability, `max`, or the sum of its two largest, `top2`).
 * With `scoreBias` (DeepSeek-V3), a buffer `router.scoreBias [E]` is added to the probabilities that
 * choose the experts (and score the groups), not to the gates. The gates are the chosen
 * probabilities, renormalised to sum 1 with `normalizeTopK`, then times `routedScale` (DeepSeek's
 * routed scaling factor).
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
import { crossCheck, Dim, PositiveNumber, withDefault } from "../graph/Spec.ts"
import { ContextKey, type ForwardContext, type RouteLayout, type Tensor } from "../graph/Apply.ts"
import { Activation, ffnMatrices, ffnParams } from "./MLP.ts"
import * as ops from "./ops.ts"
import { Unsupported } from "../internal/RunErrors.ts"

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
  normalizeTopK: withDefault(Schema.Boolean, false),
  /** Equal groups of experts for group-limited routing (1: none). */
  groups: withDefault(Dim, 1),
  /** Groups a token's experts are chosen from (null: all). */
  groupTopK: withDefault(Schema.NullOr(Dim), null),
  /** A group's score: its largest probability, or the sum of its two largest. */
  groupScore: withDefault(Schema.Literals(["max", "top2"]), "max"),
  /** Factor on the routed experts' gates. */
  routedScale: withDefault(PositiveNumber, 1),
  /** A bias `[E]` on the scores that choose the experts (a buffer: DeepSeek-V3's score correction). */
  scoreBias: withDefault(Schema.Boolean, false)
}).pipe(Schema.check(crossCheck((s) =>
  s.topK > s.experts
    ? ["topK", `top-k (${s.topK}) exceeds the number of experts (${s.experts})`]
    : s.experts % s.groups !== 0
    ? ["groups", `the experts (${s.experts}) do not split into ${s.groups} equal groups`]
    : s.groupTopK !== null && s.groupTopK > s.groups
    ? ["groupTopK", `groupTopK (${s.groupTopK}) exceeds the groups (${s.groups})`]
    : s.groupTopK !== null && s.topK > (s.groupTopK * s.experts) / s.groups
    ? ["topK", `top-k (${s.topK}) exceeds the experts of ${s.groupTopK} group(s) (${(s.groupTopK * s.experts) / s.groups})`]
    : s.groupScore === "top2" && s.groups > 1 && s.experts / s.groups < 2
    ? ["groupScore", "top2 needs at least 2 experts per group"]
    : undefined
)))
export type MoESpec = typeof MoESpec.Type

/**
 * How MoE layers dispatch: `sparse` reads the routing back and runs each expert on its tokens
 * (executed FLOPs = activated FLOPs, nothing dropped). The others stay on the device (no read):
 * `dense` runs every expert on every token, weighted by a gate that is zero outside the top-k (E/k
 * times the expert FLOPs); `grouped` sorts the token-expert pairs by expert into groups of rows of
 * one expert each (an expert's last group padded) and runs each group with its expert's weights
 * (nothing dropped; static shapes, so every step runs the worst case, n·k rows plus room for each
 * expert's padding); `fitted` is `grouped` in as many groups as the step's routing needs (each
 * expert's pairs padded to whole groups: its counts read back, one read per layer, so the shapes
 * change from step to step; for backends that read synchronously, where it spends less than the
 * worst case: wasm trains with it); `{ capacity: c }` runs each expert on
 * `ceil(c·n·k/E)` rows (at most n) filled by its tokens in order, and a token-expert pair that finds
 * its expert's rows full is dropped (its output from that expert is zero), as in GShard and the
 * Switch Transformer (c·k/E of dense's expert FLOPs; c ≥ E/k never drops).
 */
export type Dispatch = "sparse" | "dense" | "grouped" | "fitted" | { readonly capacity: number }

export type { RouteLayout } from "../graph/Apply.ts"

/**
 * What an MoE layer needs from the context beyond tensor operations: how to dispatch, the weight
 * of its balance loss, the routing primitives (fused kernels where the runtime has them), and where
 * it counts the pairs a capacity dispatch keeps. Provided by the runtime (`Lower.forward`).
 */
export interface MoeOps {
  /** How MoE layers dispatch (see {@link Dispatch}). */
  readonly dispatch: Dispatch
  /** Weight of the Switch-style load-balancing loss. */
  readonly balanceWeight: number
  /** 1 where a score of `scores [n, E]` is among the `k` largest of its row, else 0 (no gradient). */
  readonly topMask: (scores: Tensor, k: number) => Tensor
  /** A dense dispatch's combine: `ys [E, n, d]`, `gates [n, E]` → Σ_e gates[n, e]·ys[e, n, :]. */
  readonly combine: (ys: Tensor, gates: Tensor) => Tensor
  /**
   * The routing tables for `mask [n, E]` (k experts per token) in a layout of rows by capacity or by
   * groups of `tile` rows per expert: `slots [E, n]` (the row of pair (i, e), or −1), `tokens [rows]`
   * (each row's pair as e·n + i, or −1) and, by tile, `groups` (each group's expert); earlier tokens
   * first; no gradient.
   */
  readonly route: (mask: Tensor, layout: RouteLayout, k: number) => {
    readonly slots: Tensor
    readonly tokens: Tensor
    readonly groups?: Tensor
  }
  /** `x [n, d]` → `[rows, d]`: each row's token (zeros where empty), by {@link MoeOps.route}'s tables. */
  readonly toSlots: (x: Tensor, tokens: Tensor, slots: Tensor) => Tensor
  /** `ys [rows, d]` → `[n, d]`: Σ_e w[i, e]·ys[slots[e, i]] over the experts that kept token i. */
  readonly fromSlots: (ys: Tensor, slots: Tensor, tokens: Tensor, w: Tensor) => Tensor
  /** `w [E, ...]` → `[G, ...]`: each group's expert's parameter (differentiable in w). */
  readonly gatherGroups: (w: Tensor, groups: Tensor) => Tensor
  /**
   * `x [G, T, a]` times each group's expert's matrix of `w [E, a, b]` → `[G, T, b]`, counted as
   * weight FLOPs; the same as `matMul(x, gatherGroups(w, groups))`, without the gather where the
   * runtime can.
   */
  readonly groupedMatMul: (x: Tensor, w: Tensor, groups: Tensor) => Tensor
  /** Adds a capacity dispatch's token-expert pairs routed and kept (scalars on the device) to the pass's count. */
  readonly countRouting: (routed: Tensor, kept: Tensor) => void
}

/** The context key of {@link MoeOps}. */
export const MoeOps = ContextKey<MoeOps>("conceptmoe/MoeOps")

/**
 * Sparse dispatch: route, group the tokens of each expert, run each expert on its tokens only, and
 * scatter the gated outputs back. Executed expert FLOPs are exactly the activated ones (N·k
 * token-expert pairs). Adds the Switch-style load-balancing loss E·Σ_e f_e·P_e, weighted by
 * {@link MoeOps}' `balanceWeight`.
 */
const applyMoE = (ctx: ForwardContext, s: MoESpec, x: Tensor, p: Readonly<Record<string, Tensor>>): Tensor => {
  const { tf } = ctx
  const moe = ctx.get(MoeOps)
  const n = x.shape[0]!
  const E = s.experts
  const logits = ops.linear(ctx, x, p["router.weight"]!, p["router.bias"])
  const probs = s.scoring === "softmax" ? tf.softmax(logits) : tf.sigmoid(logits)
  const r: Routing = { ctx, moe, s, x, p, probs }
  if (moe.dispatch === "dense") return denseDispatch(r)
  if (moe.dispatch === "grouped" || moe.dispatch === "fitted") return slotDispatch(r, moe.dispatch)
  if (typeof moe.dispatch === "object") return slotDispatch(r, moe.dispatch)
  if (ctx.stream.valid !== undefined) {
    throw new Unsupported({ at: ctx.scope, problem: "sparse MoE dispatch does not take padded positions (the empty slots of a static-shape concept stage); use dense or grouped dispatch" })
  }
  const { indices } = tf.topk(selectionScores(r, ctx.detach(probs)), s.topK)
  const chosen = ctx.read(indices) as Int32Array
  indices.dispose()
  // gate of each (token, slot): probs[n, e], gathered from the flat probabilities (differentiable)
  const flat = new Int32Array(n * s.topK)
  for (let i = 0; i < n * s.topK; i++) flat[i] = Math.floor(i / s.topK) * E + chosen[i]!
  let gates = tf.reshape(tf.gather(tf.reshape(probs, [n * E]), tf.tensor1d(flat, "int32")), [n, s.topK])
  if (s.normalizeTopK) gates = tf.div(gates, tf.sum(gates, 1, true))
  if (s.routedScale !== 1) gates = tf.mul(gates, s.routedScale)
  const gateFlat = tf.reshape(gates, [n * s.topK])
  // group (token, slot) pairs by expert
  const byExpert: Array<Array<number>> = Array.from({ length: E }, () => [])
  for (let i = 0; i < n * s.topK; i++) byExpert[chosen[i]!]!.push(i)
  const outs: Array<Tensor> = []
  const targets: Array<number> = []
  const expertWeight = (name: string, e: number) => {
    const w = p[`experts.${name}`]
    if (w === undefined) return undefined
    const [, a, b] = w.shape as [number, number, number]
    return tf.reshape(tf.slice(w, [e, 0, 0], [1, a, b]), [a, b])
  }
  const expertBias = (name: string, e: number) => {
    const b = p[`experts.${name}`]
    if (b === undefined) return undefined
    const [, a] = b.shape as [number, number]
    return tf.reshape(tf.slice(b, [e, 0], [1, a]), [a])
  }
  for (let e = 0; e < E; e++) {
    const pairs = byExpert[e]!
    if (pairs.length === 0) continue
    const tokens = tf.tensor1d(pairs.map((i) => Math.floor(i / s.topK)), "int32")
    const xe = tf.gather(x, tokens)
    const ye = ops.ffn(ctx, xe, (name) => (name.endsWith(".bias") ? expertBias(name, e) : expertWeight(name, e)), s.activation)
    const ge = tf.gather(gateFlat, tf.tensor1d(pairs, "int32"))
    outs.push(tf.mul(ye, tf.reshape(ge, [pairs.length, 1])))
    for (const i of pairs) targets.push(Math.floor(i / s.topK))
  }
  const routed = tf.unsortedSegmentSum(tf.concat(outs, 0), tf.tensor1d(targets, "int32"), n)
  const counts = new Float32Array(E)
  for (let i = 0; i < n * s.topK; i++) counts[chosen[i]!]! += 1 / (n * s.topK)
  return withShared(r, routed, () => tf.tensor1d(counts))
}

/** What every dispatch works from: the layer's input, spec and parameters, and the router's probabilities `[n, E]`. */
interface Routing {
  readonly ctx: ForwardContext
  readonly moe: MoeOps
  readonly s: MoESpec
  readonly x: Tensor
  readonly p: Readonly<Record<string, Tensor>>
  readonly probs: Tensor
}

/**
 * Adds the shared experts to the routed output and, in training, the Switch-style load-balancing
 * loss E·Σ_e f_e·P_e (f: the fraction of token-slot pairs routed to e; P: the mean probability).
 */
const withShared = ({ ctx, moe, s, x, p, probs }: Routing, routed: Tensor, fraction: () => Tensor): Tensor => {
  const { tf } = ctx
  let y = routed
  if (s.shared !== null) {
    let shared: Tensor = ops.ffn(ctx, x, (name) => p[`shared.${name}`], s.activation)
    if (s.shared.gate) shared = tf.mul(shared, tf.sigmoid(ops.linear(ctx, x, p["sharedGate.weight"]!)))
    y = tf.add(y, shared)
  }
  if (ctx.training && moe.balanceWeight > 0) {
    // over the real positions only (padded concept slots do not count)
    const v = ctx.stream.valid
    const meanProbs = v === undefined ? tf.mean(probs, 0) : tf.div(tf.sum(tf.mul(probs, tf.reshape(v, [-1, 1])), 0), tf.maximum(tf.sum(v), 1))
    ctx.auxLosses.push(tf.mul(tf.sum(tf.mul(meanProbs, fraction())), s.experts * moe.balanceWeight))
  }
  return y
}

/**
 * Dense dispatch, without reading the routing back: every expert runs on every token as one batched
 * product per matrix (`[E, N, d] × [E, d, h]`), and the outputs are combined with gates that are the
 * router's probabilities on each token's top-k and zero elsewhere. Same values and gradients as the
 * sparse path; E/k times its expert FLOPs.
 */
const denseDispatch = (r: Routing): Tensor => {
  const { ctx, moe, s, x, p } = r
  const { tf } = ctx
  const n = x.shape[0]!
  const E = s.experts
  const { chosen, gates } = topGates(r)
  const xs = tf.reshape(ctx.repeat(tf.reshape(x, [1, ...x.shape]), E), [E, ...x.shape])
  const ys = ops.ffn(ctx, xs, (name) => expertParam(ctx, p, name, E), s.activation)
  const routed = moe.combine(ys, gates)
  return withShared(r, routed, () => routedFraction(ctx, chosen, n, s.topK))
}

/** Slots per expert of a capacity dispatch over `n` tokens: ceil(factor·n·k/E), at least 1, at most n. */
export const expertSlots = (factor: number, n: number, topK: number, experts: number): number =>
  Math.min(n, Math.max(1, Math.ceil((factor * n * topK) / experts)))

/** Rows per group of a grouped dispatch: the mean pairs per expert up to a power of 2, at most 64. */
export const groupRows = (n: number, topK: number, experts: number): number =>
  Math.min(64, 2 ** Math.ceil(Math.log2(Math.max(1, Math.ceil((n * topK) / experts)))))

/**
 * Grouped and capacity dispatch, without reading the routing back (see `Dispatch`): the pairs get
 * rows (`MoeOps.route`: by groups of {@link groupRows} rows of one expert each, or {@link expertSlots}
 * rows per expert filled in order, the pairs beyond dropped); padded positions (`stream.valid`) are not
 * routed. The tokens are gathered into their rows, the experts run as one batched product per
 * matrix (`[G, T, d]` groups, each with its expert's matrix of `[E, d, h]` through
 * `MoeOps.groupedMatMul`, which reads it in place where the runtime can; or `[E, C, d] × [E, d, h]`),
 * and the gated outputs are gathered back per token. A capacity dispatch adds the pairs routed and
 * kept to the pass's count (`MoeOps.countRouting`). Without drops, the sparse path's values and gradients; the balance
 * loss counts the routing before drops, as the Switch Transformer's.
 */
const slotDispatch = (r: Routing, by: "grouped" | "fitted" | { readonly capacity: number }): Tensor => {
  const { ctx, moe, s, x, p } = r
  const { tf } = ctx
  const [n, d] = x.shape as [number, number]
  const E = s.experts
  const { chosen, gates } = topGates(r)
  const v = ctx.stream.valid
  const routedMask = v === undefined ? chosen : tf.mul(chosen, tf.reshape(v, [n, 1]))
  const layout = typeof by === "object" ? { capacity: expertSlots(by.capacity, n, s.topK, E) } : groupLayout(ctx, routedMask, groupRows(n, s.topK, E), by === "fitted")
  const { slots, tokens, groups } = moe.route(routedMask, layout, s.topK)
  const rows = tokens.shape[0]!
  const batch = groups === undefined ? E : groups.shape[0]!
  const xs = tf.reshape(moe.toSlots(x, tokens, slots), [batch, rows / batch, d])
  // by groups: the matrices are read in place per group's expert, the biases gathered per group
  const ys = ops.ffn(ctx, xs, (name) => {
    const w = expertParam(ctx, p, name, E)
    return w === undefined || groups === undefined || name.endsWith(".weight") ? w : moe.gatherGroups(w, groups)
  }, s.activation, groups === undefined ? undefined : (x, w) => moe.groupedMatMul(x, w, groups))
  const routed = moe.fromSlots(tf.reshape(ys, [rows, d]), slots, tokens, gates)
  if (typeof by === "object") moe.countRouting(tf.sum(routedMask), tf.sum(tf.cast(tf.greaterEqual(tokens, 0), "float32")))
  return withShared(r, routed, () => routedFraction(ctx, chosen, n, s.topK))
}

/**
 * Groups of `tile` rows: the worst case, or (`fitted`) each expert's pairs of this pass padded to
 * whole groups (at least one group), from its counts read back.
 */
const groupLayout = (ctx: ForwardContext, routedMask: Tensor, tile: number, fitted: boolean): { readonly tile: number; readonly rows?: number } => {
  if (!fitted) return { tile }
  const sums = ctx.tf.sum(routedMask, 0)
  const counts = ctx.read(sums)
  sums.dispose()
  let rows = 0
  for (const c of counts) rows += Math.ceil(Math.round(c) / tile) * tile
  return { tile, rows: Math.max(tile, rows) }
}

/**
 * The top-k as a 0/1 mask `[n, E]` (off the tape: a routing decision has no gradient) and the
 * gates, the router's probabilities on it (renormalised if the spec says so), zero elsewhere.
 */
const topGates = (r: Routing) => {
  const { ctx, moe, s, probs } = r
  const { tf } = ctx
  const chosen = moe.topMask(selectionScores(r, ctx.stop(probs)), s.topK)
  const gates = tf.mul(probs, chosen)
  const normalised = s.normalizeTopK ? tf.div(gates, tf.sum(gates, 1, true)) : gates
  return { chosen, gates: s.routedScale === 1 ? normalised : tf.mul(normalised, s.routedScale) }
}

/**
 * The scores the top-k is taken over (off the tape): the probabilities plus the score bias, if any;
 * with group-limited routing, those outside the token's `groupTopK` best groups set to 0 (as
 * DeepSeek's routers do).
 */
const selectionScores = ({ ctx, moe, s, p }: Routing, stopped: Tensor): Tensor => {
  const { tf } = ctx
  const probs = s.scoreBias ? tf.add(stopped, ctx.stop(p["router.scoreBias"]!)) : stopped
  if (s.groups === 1 || s.groupTopK === null || s.groupTopK >= s.groups) return probs
  const n = probs.shape[0]!
  const per = s.experts / s.groups
  const byGroup = tf.reshape(probs, [n * s.groups, per])
  const score = s.groupScore === "max" ? tf.max(byGroup, 1) : tf.sum(tf.mul(byGroup, moe.topMask(byGroup, 2)), 1)
  const keep = moe.topMask(tf.reshape(score, [n, s.groups]), s.groupTopK)
  return tf.mul(probs, tf.reshape(tf.tile(tf.reshape(keep, [n, s.groups, 1]), [1, 1, per]), [n, s.experts]))
}

/** An expert matrix `[E, a, b]` as stored, or a bias `[E, h]` as `[E, 1, h]` (broadcast over tokens). */
const expertParam = (ctx: ForwardContext, p: Readonly<Record<string, Tensor>>, name: string, E: number) => {
  const w = p[`experts.${name}`]
  return w === undefined || w.rank === 3 ? w : ctx.tf.reshape(w, [E, 1, w.shape[1]!])
}

/** The fraction of (real) token-slot pairs routed to each expert, from the top-k mask `[n, E]`. */
const routedFraction = (ctx: ForwardContext, chosen: Tensor, n: number, topK: number) => {
  const { tf } = ctx
  const v = ctx.stream.valid
  return v === undefined
    ? tf.div(tf.sum(chosen, 0), n * topK)
    : tf.div(tf.sum(tf.mul(chosen, tf.reshape(v, [n, 1])), 0), tf.mul(tf.maximum(tf.sum(v), 1), topK))
}

export const MoE: BlockKind<MoESpec> = {
  name: "moe",
  summary: "mixture of experts: router, top-k routed experts, optional shared experts",
  spec: MoESpec,
  io: (s) => ({ in: s?.d, out: s?.d }),
  params: (s) => [
    { name: "router.weight", shape: [s.d, s.experts], part: "router" },
    ...(s.routerBias ? [{ name: "router.bias", shape: [s.experts], part: "router", init: "zeros" as const }] : []),
    ...(s.scoreBias ? [{ name: "router.scoreBias", shape: [s.experts], part: "router", init: "zeros" as const, buffer: true as const }] : []),
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
  },
  stream: "local",
  apply: applyMoE
}

/** @category constructors */
export const moe = <const D extends number>(
  spec:
    & { readonly d: D; readonly experts: number; readonly topK: number; readonly expertHidden: number }
    & Partial<Omit<MoESpec, "d" | "experts" | "topK" | "expertHidden" | "shared">>
    & { readonly shared?: { readonly hidden: number; readonly gate?: boolean } | null }
    & Named
): Block<D, D> => leaf(MoE, spec)
