/**
 * Multi-head self-attention with grouped KV heads: MHA (`kvHeads = heads`), GQA, MQA (`kvHeads = 1`).
 * `[batch, seq, d] → [batch, seq, d]`.
 *
 * Params: `q [d, H·hd]`, `k [d, KV·hd]`, `v [d, KV·hd]`, `o [H·hd, d]`; optional biases on q/k/v
 * (`qkvBias`, Qwen2) and on o (`outBias`, GPT-2); optional QK norms: per head (`"head"`: `[hd]` each,
 * Qwen3) or over the whole projection (`"full"`: `[H·hd]` and `[KV·hd]`, OLMoE).
 *
 * FLOPs/token: 2·d·hd·(2H + 2KV) for the projections (part "attention").
 * Attention map per layer over n positions: 2·H·(hd + hd)·pairs(n), pairs = n² full, n(n+1)/2 causal,
 * capped by `window`. KV cache: 2·KV·hd elements per position. Rows that pack several documents
 * attend within each document only (`ops.attend` with the stream's `documents`); the map's cost is the row's.
 *
 * @since 0.1.0
 */
import { Schema } from "effect"
import * as Cost from "../cost/Cost.ts"
import { type Block, type BlockKind, leaf, type Named, type ParamDecl } from "../graph/Block.ts"
import { crossCheck, Dim, withDefault } from "../graph/Spec.ts"
import type { ForwardContext, Tensor } from "../graph/Apply.ts"
import * as ops from "./ops.ts"
import { RopeSpec, ropeTablesOf } from "./Rotary.ts"

export const AttentionSpec = Schema.Struct({
  d: Dim,
  heads: Dim,
  kvHeads: Dim,
  headDim: Dim,
  qkvBias: withDefault(Schema.Boolean, false),
  outBias: withDefault(Schema.Boolean, false),
  qkNorm: withDefault(Schema.Literals(["none", "head", "full"]), "none"),
  rope: withDefault(Schema.NullOr(RopeSpec), null),
  /** Sliding window: keys a query may attend to at most, or null. */
  window: withDefault(Schema.NullOr(Dim), null),
  causal: withDefault(Schema.Boolean, true)
}).pipe(Schema.check(crossCheck((s) =>
  s.heads % s.kvHeads !== 0
    ? ["kvHeads", `heads (${s.heads}) must be a multiple of kvHeads (${s.kvHeads})`]
    : s.rope !== null && s.rope.dim > s.headDim
    ? ["rope", `rotary dim ${s.rope.dim} exceeds headDim ${s.headDim}`]
    : undefined
)))
export type AttentionSpec = typeof AttentionSpec.Type

const params = (s: AttentionSpec): Array<ParamDecl> => {
  const q = s.heads * s.headDim
  const kv = s.kvHeads * s.headDim
  const out: Array<ParamDecl> = [
    { name: "q.weight", shape: [s.d, q], part: "attention" },
    { name: "k.weight", shape: [s.d, kv], part: "attention" },
    { name: "v.weight", shape: [s.d, kv], part: "attention" },
    { name: "o.weight", shape: [q, s.d], part: "attention" }
  ]
  if (s.qkvBias) {
    out.push(
      { name: "q.bias", shape: [q], part: "attention", init: "zeros" },
      { name: "k.bias", shape: [kv], part: "attention", init: "zeros" },
      { name: "v.bias", shape: [kv], part: "attention", init: "zeros" }
    )
  }
  if (s.outBias) out.push({ name: "o.bias", shape: [s.d], part: "attention", init: "zeros" })
  if (s.qkNorm === "head") {
    out.push({ name: "qNorm.weight", shape: [s.headDim], part: "norm", init: "ones" }, { name: "kNorm.weight", shape: [s.headDim], part: "norm", init: "ones" })
  } else if (s.qkNorm === "full") {
    out.push({ name: "qNorm.weight", shape: [q], part: "norm", init: "ones" }, { name: "kNorm.weight", shape: [kv], part: "norm", init: "ones" })
  }
  return out
}

/**
 * Runs attention; with a `concept` per token (ConceptMoE joint decoding), it is projected by `qc`,
 * `kc`, `vc` and added to q, k, v.
 */
export const applyAttention = (
  ctx: ForwardContext,
  s: AttentionSpec,
  x: Tensor,
  p: Readonly<Record<string, Tensor>>,
  concept?: Tensor
): Tensor => {
  const { tf } = ctx
  const n = x.shape[0]!
  let q: Tensor = ops.linear(ctx, x, p["q.weight"]!, p["q.bias"])
  let k: Tensor = ops.linear(ctx, x, p["k.weight"]!, p["k.bias"])
  let v: Tensor = ops.linear(ctx, x, p["v.weight"]!, p["v.bias"])
  if (concept !== undefined) {
    const c = concept
    q = tf.add(q, ops.linear(ctx, c, p["qc.weight"]!))
    k = tf.add(k, ops.linear(ctx, c, p["kc.weight"]!))
    v = tf.add(v, ops.linear(ctx, c, p["vc.weight"]!))
  }
  if (s.qkNorm === "full") {
    q = ops.rmsNorm(ctx, q, p["qNorm.weight"]!, 1e-6)
    k = ops.rmsNorm(ctx, k, p["kNorm.weight"]!, 1e-6)
  }
  let q3 = tf.reshape(q, [n, s.heads, s.headDim])
  let k3 = tf.reshape(k, [n, s.kvHeads, s.headDim])
  if (s.qkNorm === "head") {
    q3 = ops.rmsNorm(ctx, q3, p["qNorm.weight"]!, 1e-6)
    k3 = ops.rmsNorm(ctx, k3, p["kNorm.weight"]!, 1e-6)
  }
  if (s.rope !== null) {
    const tables = ropeTablesOf(ctx, s.rope)
    q3 = ops.applyRope(ctx, q3, s.rope.dim, tables)
    k3 = ops.applyRope(ctx, k3, s.rope.dim, tables)
  }
  const out = ops.attend(ctx, q3, k3, tf.reshape(v, [n, s.kvHeads, s.headDim]), { causal: s.causal, window: s.window })
  return ops.linear(ctx, out, p["o.weight"]!, p["o.bias"])
}

export const Attention: BlockKind<AttentionSpec> = {
  name: "attention",
  summary: "multi-head attention (MHA / GQA / MQA)",
  spec: AttentionSpec,
  io: (s) => ({ in: s?.d, out: s?.d }),
  params,
  cost: (s, { path }) =>
    Cost.make({
      flops: { attention: 2 * s.d * s.headDim * (2 * s.heads + 2 * s.kvHeads) },
      attention: [{
        path,
        heads: s.heads,
        dQK: s.headDim,
        dV: s.headDim,
        window: s.window,
        ropeDim: s.rope?.dim ?? 0,
        passes: 1,
        rate: 1
      }],
      kv: [{ path, elements: 2 * s.kvHeads * s.headDim, window: s.window, passes: 1, rate: 1 }]
    }),
  stream: "stateful",
  apply: (ctx, s, x, p) => applyAttention(ctx, s, x, p)
}

/** Constructor argument: `kvHeads` defaults to `heads`, `headDim` to `d / heads`. */
export type AttentionArgs<D extends number> =
  & { readonly d: D; readonly heads: number; readonly kvHeads?: number; readonly headDim?: number }
  & Partial<Omit<AttentionSpec, "d" | "heads" | "kvHeads" | "headDim">>
  & Named

/** @category constructors */
export const attention = <const D extends number>(spec: AttentionArgs<D>): Block<D, D> =>
  leaf(Attention, { ...spec, kvHeads: spec.kvHeads ?? spec.heads, headDim: spec.headDim ?? spec.d / spec.heads })
