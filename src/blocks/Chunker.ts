/**
 * ConceptMoE's chunk module (boundary router), `[batch, seq, d] → [batch, seq, d]` plus side outputs
 * `p` (boundary probabilities) and `b` (boundaries).
 *
 * p_n = ½(1 − cos(W_q h_n, W_k h_{n−1})), p_1 = 1; b_n ~ Bernoulli(sharpen_τ(p_n)) in training,
 * b_n = 1[p_n ≥ 0.5] at evaluation (method spec §2–§3). The ratio loss
 * L = R/(R−1)·((R−1)·F·G + (1−F)(1−G)), weight λ, steers the boundary rate F towards 1/R (§4).
 *
 * Params: `q [d, d]`, `k [d, d]`, no bias (part "chunk"), initialised to the identity as H-Net does,
 * so p starts from the similarity of adjacent encoder outputs (the paper's random init puts every p
 * near ½); see docs/training.md. FLOPs/token: 2·2·d² (part "chunk"); the
 * cosine, the sampling and the loss are not matmuls.
 *
 * @since 0.1.0
 */
import { Schema } from "effect"
import * as Cost from "../cost/Cost.ts"
import { type Block, type BlockKind, leaf, type Named } from "../graph/Block.ts"
import type { ForwardContext, Tensor, Tensor2D } from "../graph/Apply.ts"
import { type ChunkState, type ConceptFeeds, ConceptOps } from "./ConceptContext.ts"
import { crossCheck, Dim, PositiveNumber, withDefault } from "../graph/Spec.ts"
import * as ops from "./ops.ts"
import { prng } from "../internal/Random.ts"
import { Unsupported } from "../internal/RunErrors.ts"

const NonNegative = Schema.Finite.pipe(Schema.check(Schema.isGreaterThanOrEqualTo(0)))

/** Default gains of `ratioControl: "pi"` (chosen by measurement: docs/training.md, "Compression control"). */
export const DEFAULT_KP = 0.3
export const DEFAULT_KI = 0.03
export const DEFAULT_THRESHOLD_WEIGHT = 0.4

const UnitInterval = Schema.Finite.pipe(Schema.check(Schema.isBetween({ minimum: 0, maximum: 1 })))

export const ChunkerSpec = Schema.Struct({
  d: Dim,
  /** Target compression ratio R > 1. */
  ratio: PositiveNumber,
  /** Sharpening exponent τ of the training-time Bernoulli. */
  tau: withDefault(PositiveNumber, 6),
  /** Weight λ of the ratio loss (`ratioControl` "plain", the paper's). */
  lambda: withDefault(NonNegative, 0.03),
  /**
   * How the boundary rate is held at 1/R: "plain" is the paper's ratio loss with weight λ; "pi" (the
   * default) weighs it by `kp` and adds an integral term, `ki` times the sum of the past steps'
   * errors, carried by the trainer ({@link ratioControlStep}). See docs/training.md.
   */
  ratioControl: withDefault(Schema.Literals(["plain", "pi"]), "pi"),
  /** Proportional weight of "pi" (the ratio loss's weight in that mode). */
  kp: withDefault(NonNegative, DEFAULT_KP),
  /** Integral weight of "pi". */
  ki: withDefault(NonNegative, DEFAULT_KI),
  /**
   * What the integral of "pi" holds at 1/R: the rate (1 − w)·F + w·F½, F the sampled boundary rate
   * (training's compute) and F½ the rate at p ≥ ½ on the same batch (inference's); the
   * proportional term acts on F alone. See {@link controlledRate}.
   */
  thresholdWeight: withDefault(UnitInterval, DEFAULT_THRESHOLD_WEIGHT)
}).pipe(Schema.check(crossCheck((s) => s.ratio <= 1 ? ["ratio", `the compression ratio must exceed 1, got ${s.ratio}`] : undefined)))
export type ChunkerSpec = typeof ChunkerSpec.Type

/**
 * The ratio controller's state between steps: the sum of the past steps' errors e = R·F − 1 (F the
 * sampled boundary rate), clamped to ±{@link INTEGRAL_LIMIT}. Zero at step 0; a pure function of the
 * run's boundary rates, saved in checkpoints so a resumed run continues it exactly.
 */
export interface RatioControl {
  readonly integral: number
}

export const initialRatioControl: RatioControl = { integral: 0 }

/** Anti-windup bound of the integral (in steps of full error). */
export const INTEGRAL_LIMIT = 50

/**
 * Conditional integration (anti-windup): a step adds its error e = R·F − 1 to the integral only when
 * |e| ≤ this band. Far from the target the proportional term acts alone; without the band, the
 * start of a run (the identity init makes few boundaries: e ≈ −0.9 for the first steps) winds the
 * integral up by several units, which then holds the rate past the target for tens of steps (the
 * second half of 100-step runs sat 6–9% below R: docs/training.md, "Compression control").
 */
export const INTEGRATE_WITHIN = 0.25

/**
 * The controller's update after a step whose sampled boundary rate was F: integral + (R·F − 1) when
 * that error is within {@link INTEGRATE_WITHIN}, clamped to ±{@link INTEGRAL_LIMIT}. Deterministic
 * and pure (the trainer folds it over the steps).
 */
export const ratioControlStep = (state: RatioControl, ratio: number, boundaryRate: number): RatioControl => {
  const e = ratio * boundaryRate - 1
  return Math.abs(e) > INTEGRATE_WITHIN
    ? state
    : { integral: Math.max(-INTEGRAL_LIMIT, Math.min(INTEGRAL_LIMIT, state.integral + e)) }
}

/**
 * The boundary rate whose error the integral of "pi" sums ({@link ratioControlStep}), from a
 * batch's sampled rate F and its rate at threshold F½ (p ≥ ½): F for "plain", (1 − w)·F + w·F½ for
 * "pi" (w = `thresholdWeight`). The sharpened Bernoulli fires on some p under ½ and skips some over
 * it, so where many p sit near ½ the two differ (at R 4 the threshold R ran 15–35% above the sampled
 * one): w > 0 moves part of that gap from inference's compression to training's (the default 0.4
 * held both in more 100-step runs than 0 did: docs/training.md). Only the integral
 * holds the mix; the proportional term acts on F, whose dependence on p is smooth (the count at
 * p ≥ ½ jumps as p cross ½, and feeding it back made the rate oscillate). See docs/training.md,
 * "Compression control".
 */
export const controlledRate = (s: ChunkerSpec, F: number, thresholdF: number): number => {
  const w = thresholdWeightOf(s)
  return (1 - w) * F + w * thresholdF
}

/** The weight of the rate at p ≥ ½ in the controlled rate: `thresholdWeight` with "pi", 0 with "plain". */
const thresholdWeightOf = (s: ChunkerSpec): number => (s.ratioControl === "plain" ? 0 : s.thresholdWeight)

/**
 * The ratio loss's weights for a step: L = a·R/(R−1)·((R−1)·F·G + (1−F)(1−G)) + b·G, F without
 * gradient, G = mean p. "plain": a = λ, b = 0 (the paper). "pi": a = kp, b = ki·R/(R−1)·integral,
 * so ∂L/∂G = R/(R−1)·(kp·(R·F − 1) + ki·integral).
 */
export const ratioLossWeights = (s: ChunkerSpec, control: RatioControl | undefined): { readonly a: number; readonly b: number } =>
  s.ratioControl === "plain"
    ? { a: s.lambda, b: 0 }
    : { a: s.kp, b: (s.ki * s.ratio / (s.ratio - 1)) * (control ?? initialRatioControl).integral }

/** The value of the weighted ratio loss for boundary rate F and mean probability G (host arithmetic). */
export const ratioLossValue = (s: ChunkerSpec, control: RatioControl | undefined, F: number, G: number): number => {
  const { a, b } = ratioLossWeights(s, control)
  const R = s.ratio
  return a * (R / (R - 1)) * ((R - 1) * F * G + (1 - F) * (1 - G)) + b * G
}

/** sharpen_τ(p) = p^(1/τ) above ½, 1 − (1 − p)^(1/τ) below (method spec §3, §17). */
export const sharpen = (p: number, tau: number): number => (p > 0.5 ? p ** (1 / tau) : 1 - (1 - p) ** (1 / tau))

/**
 * Boundary probabilities and boundaries of the token stream. Row starts and document starts are
 * forced boundaries with p = 1. Training samples b ~ Bernoulli(sharpen_τ(p)); evaluation takes
 * p ≥ ½. Adds λ·L_ratio to the auxiliary losses, adds its measures to the pass's, and hands its
 * {@link ChunkState} to the concept stage running it (`StageScope.chunked`), for the dechunk.
 *
 * Decoding incrementally, the first new token of a row compares with the row's previous token,
 * whose key the chunk module keeps; `receive` then indexes `[carried concept of each row; new
 * concepts]` (a token with no new boundary before it in this piece receives its row's carried one).
 */
const applyChunker = (ctx: ForwardContext, spec: ChunkerSpec, x: Tensor, p: Readonly<Record<string, Tensor>>): Tensor => {
  const concepts = ctx.get(ConceptOps)
  const s = rampSpec(spec, concepts.ramp)
  const { tf, cache } = ctx
  const n = x.shape[0]!
  const rows = ctx.stream.layout
  const d = x.shape[1]!
  if (cache !== undefined && ctx.training) throw new Unsupported({ at: ctx.scope, problem: "incremental decoding runs in evaluation mode (training: false)" })
  // decoding: the previous token's unit key of each row, and the tokens seen per row
  const state = cache?.state(ctx.scope, () => ({ prevK: tf.keep(tf.zeros([rows.length, d])) as Tensor, seen: new Array<number>(rows.length).fill(0) }))
  const carried = state === undefined ? 0 : rows.length
  const forced = new Float32Array(n)
  const prev = new Int32Array(n)
  let start = 0
  rows.forEach((L, r) => {
    const seen = state?.seen[r] ?? 0
    for (let i = 0; i < L; i++) {
      prev[start + i] = i === 0 ? (state === undefined ? start : r) : carried + start + i - 1
      if (seen + i === 0 || ctx.stream.documentStarts.has(start + i)) forced[start + i] = 1
    }
    start += L
  })
  // t/(|t| + 1e-12): tfjs's norm, whose Abs and Pow (and their gradients) cost a dozen kernels, as
  // the same sums (bit for bit on cpu)
  const unit = (t: Tensor) => tf.div(t, tf.add(tf.sqrt(tf.sum(tf.square(t), -1, true)), 1e-12))
  const q = unit(ops.linear(ctx, x, p["q.weight"]!))
  const k = unit(ops.linear(ctx, x, p["k.weight"]!))
  const keys = state === undefined ? k : tf.concat([state.prevK, k], 0)
  const cos = tf.sum(tf.mul(q, tf.gather(keys, tf.tensor1d(prev, "int32"))), -1)
  const raw0 = tf.clipByValue(tf.mul(tf.sub(1, cos), 0.5), 0, 1)
  // a converted model's ramp (ConceptOps.ramp): p floored at 1 − s·(1 − p)
  const raw = concepts.ramp === undefined ? raw0 : tf.sub(1, tf.mul(tf.sub(1, raw0), concepts.ramp))
  const feeds = ctx.training && state === undefined ? concepts.feeds : undefined
  // static shapes: the forced boundaries are the row starts (constant) and the fed document starts
  const f = feeds === undefined ? tf.tensor1d(forced) : tf.maximum(tf.tensor1d(forced.map((_, t) => (prev[t] === t ? 1 : 0))), feeds.documentStart)
  const probs = tf.add(f, tf.mul(tf.sub(1, f), raw))
  if (feeds !== undefined) return staticBoundaries(ctx, concepts, s, x, probs, f, feeds)
  const imposed = cache?.forcedBoundary
  // imposed boundaries (benchmarks) need no probabilities on the host
  const host = imposed === undefined ? ctx.read(probs) : undefined
  const boundaries = new Uint8Array(n)
  const random = prng(ctx.nextSeed())
  let count = 0
  start = 0
  rows.forEach((L, r) => {
    const seen = state?.seen[r] ?? 0
    for (let i = 0; i < L; i++) {
      const t = start + i
      const b = forced[t] === 1 ||
        (imposed !== undefined ? imposed(r, seen + i) : ctx.training ? random() < sharpen(host![t]!, s.tau) : host![t]! >= 0.5)
      boundaries[t] = b ? 1 : 0
      count += boundaries[t]!
    }
    start += L
  })
  const perRow: Array<number> = []
  const receive = new Int32Array(n)
  let offset = carried
  start = 0
  rows.forEach((L, r) => {
    let m = 0
    for (let i = 0; i < L; i++) {
      m += boundaries[start + i]!
      receive[start + i] = m === 0 ? r : offset + m - 1
    }
    perRow.push(m)
    offset += m
    start += L
  })
  if (state !== undefined) {
    // keep each row's last key for the next piece
    let end = 0
    const last = rows.map((L, r) => {
      end += L
      return L > 0 ? carried + end - 1 : r
    })
    const next = tf.keep(tf.gather(keys, tf.tensor1d(last, "int32")))
    state.prevK.dispose()
    state.prevK = next
    rows.forEach((L, r) => (state.seen[r]! += L))
  }
  // Σp and the boundaries at p ≥ ½ (imposed boundaries, with no host probabilities, stand for those)
  let sum = 0
  let above = 0
  for (const p of host ?? []) {
    sum += p
    if (p >= 0.5) above++
  }
  const atThreshold = host === undefined ? count : above
  // the proportional term acts on the sampled rate (the integral, on the host, on controlledRate's mix)
  const F = count / n
  const G = tf.mean(probs)
  const R = s.ratio
  // L = a·R/(R−1)·((R−1)·F·G + (1−F)(1−G)) + b·G (ratioLossWeights)
  const w = ratioLossWeights(s, concepts.ratioControl)
  const paper = tf.mul(tf.add(tf.mul(G, (R - 1) * F), tf.mul(tf.sub(1, G), 1 - F)), (R / (R - 1)) * w.a)
  const ratioLoss = w.b === 0 ? paper : tf.add(paper, tf.mul(G, w.b))
  if (ctx.training && (w.a > 0 || w.b !== 0)) ctx.auxLosses.push(ratioLoss)
  concepts.measure({ tokens: n, concepts: count, boundaryProbSum: sum, thresholdConcepts: atThreshold })
  concepts.stage().chunked?.({ h: x as Tensor2D, p: probs, boundaries, receive, concepts: perRow })
  return x
}

/**
 * The spec a converted model's chunk module runs with at ramp position s (`ConceptOps.ramp`,
 * `train/Convert.ts`): target R_s = 1 + s·(R − 1), at least 1 + 10⁻³·(R − 1) (at s = 0 every p is
 * 1, so the ratio loss has no gradient whatever R_s is). Unchanged without a ramp.
 */
export const rampSpec = (s: ChunkerSpec, ramp: number | undefined): ChunkerSpec =>
  ramp === undefined || ramp >= 1 ? s : { ...s, ratio: 1 + Math.max(ramp, 1e-3) * (s.ratio - 1) }

/** Concept slots per row for rows of `length` tokens at ratio R: ceil(capacity·T/R), at most T. */
export const conceptSlots = (length: number, ratio: number, capacity: number): number => Math.min(length, Math.max(1, Math.ceil((capacity * length) / ratio)))

/**
 * The boundaries of a training step on the device, with static shapes (`ConceptFeeds`): b = forced,
 * or fed draw < sharpen_τ(p); each row keeps at most C = {@link conceptSlots} boundaries (a sampled
 * one is dropped when the boundaries up to it plus the forced ones still to come would exceed C).
 * The same ratio loss, with F measured on the device.
 */
const staticBoundaries = (ctx: ForwardContext, concepts: ConceptOps, s: ChunkerSpec, x: Tensor, probs: Tensor, forced: Tensor, feeds: ConceptFeeds): Tensor => {
  const { tf } = ctx
  const rows = ctx.stream.layout
  const n = x.shape[0]!
  const L = rows[0] ?? 0
  // an earlier chunk module of the pass (they all run with the feeds) has measured on the device
  if (concepts.measured().device !== undefined || !rows.every((r) => r === L)) {
    throw new Unsupported({ at: ctx.scope, problem: "static-shape concept stages need one stage over rows of equal length" })
  }
  const R = rows.length
  const C = conceptSlots(L, s.ratio, feeds.capacity)
  // forced boundaries are always kept: a row with more of them than slots cannot run this way
  for (let r = 0; r < R; r++) {
    let count = 1
    for (let i = 1; i < L; i++) if (ctx.stream.documentStarts.has(r * L + i)) count++
    if (count > C) throw new Unsupported({ at: ctx.scope, problem: `row ${r} has ${count} forced boundaries (its start and document starts), more than its ${C} concept slots; raise conceptCapacity or train it on the host path` })
  }
  // the sampling and the capping have no gradient: computed off the tape, as the host path does
  const pr = ctx.stop(probs)
  const sharp = tf.where(tf.greater(pr, 0.5), tf.pow(pr, 1 / s.tau), tf.sub(1, tf.pow(tf.sub(1, pr), 1 / s.tau)))
  const sampled2 = tf.reshape(tf.maximum(forced, tf.cast(tf.less(feeds.random, sharp), "float32")), [R, L])
  const f2 = tf.reshape(ctx.stop(forced), [R, L])
  const forcedAfter = tf.sub(tf.sum(f2, 1, true), tf.cumsum(f2, 1))
  const fits = tf.cast(tf.lessEqual(tf.add(tf.cumsum(sampled2, 1), forcedAfter), C), "float32")
  const b2 = tf.maximum(f2, tf.mul(sampled2, fits))
  const b = tf.reshape(b2, [n])
  // slot row·C + (boundaries up to the token) − 1: the concept each token receives
  const rowBase = tf.reshape(tf.tensor1d(Array.from({ length: R }, (_, r) => r * C)), [R, 1])
  const receive = tf.cast(tf.reshape(tf.add(tf.sub(tf.cumsum(b2, 1), 1), rowBase), [n]), "int32")
  const sampled = tf.sum(sampled2)
  const count = tf.sum(b)
  // the boundaries evaluation would take (p ≥ ½; forced ones have p = 1)
  const atThreshold = tf.sum(tf.cast(tf.greaterEqual(pr, 0.5), "float32"))
  const G = tf.mean(probs)
  const ratio = s.ratio
  // the proportional term acts on the sampled rate, as the host path's
  const F = tf.div(count, n)
  // L = a·R/(R−1)·((R−1)·F·G + (1−F)(1−G)) + b·G (ratioLossWeights)
  const w = ratioLossWeights(s, concepts.ratioControl)
  const paper = tf.mul(tf.add(tf.mul(tf.mul(G, F), ratio - 1), tf.mul(tf.sub(1, G), tf.sub(1, F))), (ratio / (ratio - 1)) * w.a)
  // b = ki·R/(R−1)·integral, from the fed integral when there is one (ratioLossWeights with integral 1 gives the factor)
  const fed = feeds.ratioIntegral !== undefined && s.ratioControl === "pi" && s.ki > 0
  const integralWeight = fed ? tf.mul(tf.reshape(ctx.stop(feeds.ratioIntegral!), []), ratioLossWeights(s, { integral: 1 }).b) : w.b
  const ratioLoss = integralWeight === 0 ? paper : tf.add(paper, tf.mul(G, integralWeight))
  if (w.a > 0 || integralWeight !== 0) ctx.auxLosses.push(ratioLoss)
  const state: ChunkState = { h: x as Tensor2D, p: probs, boundaries: new Uint8Array(0), receive: new Int32Array(0), concepts: [], slots: { b, receive, capacity: C, documentStart: feeds.documentStart } }
  concepts.measure({ tokens: n, concepts: 0, boundaryProbSum: 0, thresholdConcepts: 0 })
  const probSum = tf.sum(pr)
  concepts.measureDevice({ concepts: count, boundaryProbSum: probSum, dropped: tf.sub(sampled, count), threshold: atThreshold })
  concepts.stage().chunked?.(state)
  return x
}

export const Chunker: BlockKind<ChunkerSpec> = {
  name: "chunk",
  summary: "boundary router: cosine of adjacent query/key projections",
  spec: ChunkerSpec,
  io: (s) => ({ in: s?.d, out: s?.d }),
  params: (s) => [
    { name: "q.weight", shape: [s.d, s.d], part: "chunk", init: "identity" },
    { name: "k.weight", shape: [s.d, s.d], part: "chunk", init: "identity" }
  ],
  cost: (s) => Cost.make({ flops: { chunk: 2 * 2 * s.d * s.d } }),
  stream: "stateful",
  apply: applyChunker
}

/** @category constructors */
export const chunker = <const D extends number>(
  spec: {
    readonly d: D
    readonly ratio: number
    readonly tau?: number
    readonly lambda?: number
    readonly ratioControl?: "plain" | "pi"
    readonly kp?: number
    readonly ki?: number
    readonly thresholdWeight?: number
  } & Named
): Block<D, D> => leaf(Chunker, spec)
