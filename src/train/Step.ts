/**
 * One optimisation step and evaluation, on any backend: the settings, AdamW with warm-up and cosine
 * decay, global-norm clipping on the device, and the variants for backends that read only
 * asynchronously (webgpu in Node). No data, plots or files, so a GPU benchmark can import it alone.
 *
 * @since 0.2.0
 */
import { Schema } from "effect"
import type * as TF from "@tensorflow/tfjs"
import { Dim, PositiveNumber, withDefault } from "../graph/Spec.ts"
import type { StepProfile } from "../runtime/webgpu/Capture.ts"
import { adamStepValues, adamw, makeSumSquares } from "../runtime/Fused.ts"
import type { Tensor, Tf } from "../graph/Apply.ts"
import type { ConceptFeeds } from "../blocks/ConceptContext.ts"
import { type Batch, type Feeds, loss, type Lowered, mixSeed, recordReads, replay } from "../runtime/Lower.ts"
import { backendOps } from "../runtime/Ops.ts"
import type { Dispatch } from "../blocks/MoE.ts"

const Fraction = Schema.Finite.pipe(Schema.check(Schema.isGreaterThanOrEqualTo(0), Schema.isLessThan(1)))

export const OptimizerConfig = Schema.Struct({
  lr: withDefault(PositiveNumber, 3e-3),
  warmup: withDefault(Schema.Int.pipe(Schema.check(Schema.isGreaterThanOrEqualTo(0))), 20),
  minLrRatio: withDefault(Fraction, 0.1),
  weightDecay: withDefault(Schema.Finite.pipe(Schema.check(Schema.isGreaterThanOrEqualTo(0))), 0.1),
  beta1: withDefault(Fraction, 0.9),
  beta2: withDefault(Fraction, 0.95),
  eps: withDefault(PositiveNumber, 1e-8),
  clip: withDefault(PositiveNumber, 1),
  /** Learning-rate multipliers by parameter part (e.g. `{ "chunk": 0.1 }`). */
  partLr: withDefault(Schema.Record(Schema.String, Schema.Finite.pipe(Schema.check(Schema.isGreaterThanOrEqualTo(0)))), {}),
  /**
   * β₁ by parameter part, in place of `beta1` (each with its own bias correction 1 − β₁ᵗ). The
   * default trains the chunk module without momentum: the ratio controller acts through it, and
   * momentum's lag (about ten steps at 0.9) made the boundary rate oscillate around the target
   * (docs/training.md, "Compression control"). `{}` gives every part `beta1`.
   */
  partBeta1: withDefault(Schema.Record(Schema.String, Fraction), { chunk: 0 })
})

export const TrainSettings = Schema.Struct({
  seqLen: withDefault(Dim, 128),
  batchSize: withDefault(Dim, 8),
  steps: withDefault(Dim, 200),
  seed: withDefault(Schema.Int, 0),
  logEvery: withDefault(Dim, 10),
  evalEvery: withDefault(Dim, 50),
  evalBatches: withDefault(Dim, 4),
  checkpointEvery: withDefault(Dim, 100),
  balanceWeight: withDefault(Schema.Finite.pipe(Schema.check(Schema.isGreaterThanOrEqualTo(0))), 0.01),
  /**
   * Concept slots per row when a ConceptMoE trains with static shapes (webgpu, `train/Captured.ts`):
   * ceil(conceptCapacity·T/R), at most T. Sampled boundaries beyond them are dropped (and counted).
   */
  conceptCapacity: withDefault(PositiveNumber, 1.5),
  /**
   * How MoE layers train on the device (webgpu; `Dispatch` in blocks/MoE.ts). `null` (the default):
   * grouped dispatch, the token-expert pairs sorted by expert into groups of rows (nothing dropped;
   * every step runs the worst case's rows, n·k plus room for each expert's padding). A factor: each
   * expert takes at most ceil(expertCapacity·n·k/E) of the layer's n tokens, in order, and the pairs
   * beyond are dropped (and counted). Host backends route exactly either way.
   */
  expertCapacity: withDefault(Schema.NullOr(PositiveNumber), null),
  /**
   * Threads a training step uses on a CPU backend (`Parallel.ts`: the batch's rows split over worker
   * threads, gradients summed). `null` (the default): every core on wasm, one elsewhere; 1: today's
   * one-thread step.
   */
  threads: withDefault(Schema.NullOr(Dim), null),
  optimizer: withDefault(OptimizerConfig, {})
})
export type TrainSettings = typeof TrainSettings.Type

/** Learning rate at a step: linear warm-up, then cosine decay to `minLrRatio · lr`. */
export const learningRate = (o: typeof OptimizerConfig.Type, steps: number, step: number): number => {
  if (step < o.warmup) return (o.lr * (step + 1)) / o.warmup
  const progress = Math.min(1, (step - o.warmup) / Math.max(1, steps - o.warmup))
  return o.lr * (o.minLrRatio + (1 - o.minLrRatio) * 0.5 * (1 + Math.cos(Math.PI * progress)))
}

export interface Optimizer {
  readonly m: Map<string, TF.Variable>
  readonly v: Map<string, TF.Variable>
  step: number
}

/** Adam moments, zero, for every variable. */
export const newOptimizer = (low: Lowered): Optimizer => {
  const { tf } = low
  const m = new Map<string, TF.Variable>()
  const v = new Map<string, TF.Variable>()
  // a variable shares its initial tensor's data: the initial tensor is disposed, so that disposing
  // the variable frees the data (otherwise every run would leave two tensors per parameter behind)
  const zeros = (w: TF.Variable) => {
    const z = tf.zerosLike(w)
    const x = tf.variable(z, false)
    z.dispose()
    return x
  }
  for (const [p, w] of low.variables) {
    m.set(p, zeros(w))
    v.set(p, zeros(w))
  }
  return { m, v, step: 0 }
}

/**
 * What a training pass takes from the trainer's state rather than the settings, given with each
 * step: a converted model's ramp position (`ConceptOps.ramp`, `train/Convert.ts`) and the ratio
 * controller's state (`Chunker.RatioControl`). Absent: no ramp, the controller's initial state.
 */
export interface PassOptions {
  readonly ramp?: number | undefined
  readonly ratioControl?: { readonly integral: number } | undefined
}

/** The fields of {@link PassOptions} that are set, as pass options of `Lower.loss`. */
const passFields = (pass: PassOptions) => ({
  ...(pass.ramp === undefined ? {} : { ramp: pass.ramp }),
  ...(pass.ratioControl === undefined ? {} : { ratioControl: pass.ratioControl })
})

/** A step's device inputs, for a step that is recorded and replayed (`Captured.ts`). */
export interface StepInputs {
  readonly feeds: Feeds
  /** `[lr, c1, c2]` (see `Fused.adamStepValues`) for each β₁ the model's parts use ({@link betasOf}). */
  readonly stepValues: ReadonlyMap<number, Tensor>
  /** Static-shape ConceptMoE inputs (`Lower.conceptFeedValues` for this step's seed). */
  readonly concept?: ConceptFeeds
}

/**
 * One optimisation step on the device, with host reads through `read` (see `Lower.recordReads`):
 * gradients, global-norm clipping (the norm stays a tensor), AdamW. Returns the loss tensors, kept,
 * for the caller to read, and the stage statistics. With `inputs`, the batch and the step's
 * learning rate come from those tensors (the batch's host arrays are not uploaded).
 */
export const stepOnDevice = (
  low: Lowered,
  opt: Optimizer,
  batch: Batch,
  settings: TrainSettings,
  step: number,
  read: ((t: TF.Tensor) => Float32Array | Int32Array) | undefined,
  inputs?: StepInputs,
  pass: PassOptions = {}
) => {
  const { tf } = low
  const [lr] = stepInputValues(settings, step)
  const vars = [...low.variables.values()]
  let stats = { tokens: 0, concepts: 0, boundaryProbSum: 0, thresholdConcepts: 0 }
  let parts: { ce: TF.Scalar; aux: TF.Scalar } | undefined
  let deviceStats: { concepts: Tensor; boundaryProbSum: Tensor; dropped: Tensor; threshold: Tensor } | undefined
  let routing: { routed: Tensor; kept: Tensor } | undefined
  const total = tf.tidy(() => {
    const { grads, value } = tf.variableGrads(() => {
      const r = loss(low, batch, {
        ...stepOptions(low, settings, step, pass),
        ...(read === undefined ? {} : { read }),
        ...(inputs === undefined ? {} : { feeds: inputs.feeds }),
        ...(inputs?.concept === undefined ? {} : { concept: inputs.concept })
      })
      stats = { ...r.ctx.compression }
      const dc = r.ctx.deviceCompression
      if (dc !== undefined) deviceStats = { concepts: tf.keep(dc.concepts), boundaryProbSum: tf.keep(dc.boundaryProbSum), dropped: tf.keep(dc.dropped), threshold: tf.keep(dc.threshold) }
      const er = r.ctx.expertRouting
      if (er !== undefined) routing = { routed: tf.keep(er.routed), kept: tf.keep(er.kept) }
      parts = { ce: tf.keep(r.ce), aux: tf.keep(r.aux) }
      return r.total
    }, vars)
    applyGradients(low, opt, vars.map((w) => grads[w.name] ?? tf.zerosLike(w)), settings, step, inputs?.stepValues)
    return value
  })
  opt.step = step + 1
  return { total, ce: parts!.ce, aux: parts!.aux, lr, stats, deviceStats, routing }
}

/**
 * Global-norm clipping and AdamW for gradients `gs` of `low.variables` (in their order): the
 * optimizer half of {@link stepOnDevice}, also run on gradients summed over worker threads
 * (`Parallel.ts`). Call inside `tf.tidy`.
 */
export const applyGradients = (low: Lowered, opt: Optimizer, gs: ReadonlyArray<Tensor>, settings: TrainSettings, step: number, given?: ReadonlyMap<number, Tensor>): void => {
  const { tf } = low
  const o = settings.optimizer
  const names = [...low.variables.keys()]
  const vars = names.map((n) => low.variables.get(n)!)
  const partOf = new Map(low.analysis.params.map((p) => [p.path, p.part]))
  const norm = tf.sqrt(makeSumSquares(tf)(gs))
  const scale = tf.minimum(tf.div(o.clip, norm), 1)
  // [lr, c1, c2] once per β₁ in use, as numbers and as a tensor (made here, or the recorded step's feed)
  const perBeta = new Map<number, { readonly values: readonly [number, number, number]; readonly tensor: Tensor }>()
  const forBeta = (beta1: number) => {
    const known = perBeta.get(beta1)
    if (known !== undefined) return known
    const values = stepInputValues(settings, step, beta1)
    const made = { values, tensor: given?.get(beta1) ?? adamStepValues(tf, { lr: values[0], c1: values[1], c2: values[2] }) }
    perBeta.set(beta1, made)
    return made
  }
  names.forEach((n, i) => {
    const m = opt.m.get(n)!
    const v = opt.v.get(n)!
    const w = vars[i]!
    const beta1 = betaOf(o, partOf.get(n))
    const { values: [lr, c1, c2], tensor } = forBeta(beta1)
    const next = adamw(tf, w, gs[i]!, m, v, scale, {
      beta1,
      beta2: o.beta2,
      eps: o.eps,
      c1,
      c2,
      lr,
      lrScale: o.partLr[partOf.get(n) ?? ""] ?? 1,
      decay: w.rank >= 2 ? o.weightDecay : 0
    }, tensor)
    m.assign(next.m as TF.Tensor)
    v.assign(next.v as TF.Tensor)
    w.assign(next.w as TF.Tensor)
  })
}

/**
 * A training pass's options, with the step's {@link PassOptions}; MoE layers dispatch as the backend
 * provides for training (`runtime/Ops.ts`): on webgpu grouped, or by capacity with `expertCapacity`;
 * on wasm fitted (grouped in as many groups as the step needs: the same routing and loss as sparse,
 * a few dozen ops per MoE layer instead of a gather, slices and products per expert, moe-tiny's step
 * 9,713 → 2,751 kernels; moe-tiny's 2,048 pairs per layer in 2,048 rows or a few groups more instead
 * of the worst case's 3,072).
 */
export const stepOptions = (low: Lowered, settings: TrainSettings, step: number, pass: PassOptions = {}) => ({
  training: true,
  seed: mixSeed(settings.seed, step),
  balanceWeight: settings.balanceWeight,
  ...passFields(pass),
  ...trainingDispatch(low, settings)
}) as const

const trainingDispatch = (low: Lowered, settings: TrainSettings): { readonly dispatch?: Dispatch } => {
  const dispatch = backendOps(low.tf).dispatch?.training?.(settings.expertCapacity)
  return dispatch === undefined ? {} : { dispatch }
}

/**
 * A step's scalars as one vector, read back in one transfer: the loss and its parts, then the
 * static ConceptMoE's device counts and the capacity dispatch's pairs where the step has them (see
 * {@link readStats}); one concat for a dense or MoE step. Frees the tensors it packs.
 */
export const packStats = (tf: Tf, r: ReturnType<typeof stepOnDevice>): Tensor => {
  const d = r.deviceStats
  const parts = [r.total, r.ce, r.aux, ...(d === undefined ? [] : [d.concepts, d.boundaryProbSum, d.dropped, d.threshold]), ...(r.routing === undefined ? [] : [r.routing.routed, r.routing.kept])]
  const packed = tf.tidy(() => tf.concat(parts.map((t) => tf.reshape(t, [1]))))
  tf.dispose(parts)
  return packed
}

/** The values of {@link packStats}: the static ConceptMoE's counts and the routing where the step had them. */
export const readStats = (v: ArrayLike<number>, has: { readonly concepts: boolean; readonly routing: boolean }) => {
  const at = has.concepts ? 7 : 3
  return {
    loss: v[0]!,
    ce: v[1]!,
    aux: v[2]!,
    ...(has.concepts ? { concepts: v[3]!, boundaryProbSum: v[4]!, dropped: v[5]!, thresholdConcepts: v[6]! } : {}),
    ...(has.routing ? { expertPairs: v[at]!, expertDropped: v[at]! - v[at + 1]! } : {})
  }
}

/**
 * A step's learning rate and Adam bias corrections `[lr, 1 − β₁ᵗ, 1 − β₂ᵗ]` (t = step + 1), for
 * `beta1` (default: the optimizer's).
 */
export const stepInputValues = (settings: TrainSettings, step: number, beta1 = settings.optimizer.beta1): readonly [number, number, number] => {
  const o = settings.optimizer
  return [learningRate(o, settings.steps, step), 1 - beta1 ** (step + 1), 1 - o.beta2 ** (step + 1)]
}

/** The β₁ of a parameter of `part`: its entry in `partBeta1`, else `beta1`. */
export const betaOf = (o: typeof OptimizerConfig.Type, part: string | undefined): number => (part === undefined ? undefined : o.partBeta1[part]) ?? o.beta1

/** The distinct β₁ that the parameters of `low` train with, in ascending order. */
export const betasOf = (low: Lowered, settings: TrainSettings): ReadonlyArray<number> =>
  [...new Set(low.analysis.params.map((p) => betaOf(settings.optimizer, p.part)))].sort((a, b) => a - b)

/**
 * What one optimisation step reports, whichever path ran it (`trainStep`, `trainStepAsync`, the
 * recorded and replayed step of `Captured.ts`, the worker threads of `Parallel.ts`).
 */
export interface StepResult {
  readonly loss: number
  readonly ce: number
  readonly aux: number
  readonly lr: number
  readonly tokens: number
  readonly concepts: number
  readonly boundaryProbSum: number
  /** Concepts the step's batch would have at evaluation (p ≥ ½). */
  readonly thresholdConcepts: number
  /** Sampled boundaries dropped for want of concept slots (static-shape ConceptMoE steps). */
  readonly dropped?: number
  /** Token-expert pairs routed, and dropped for want of expert slots, over the MoE layers (capacity dispatch). */
  readonly expertPairs?: number
  readonly expertDropped?: number
  /** Where a recorded step's time went (`Captured.ts`, when asked). */
  readonly profile?: StepProfile
}

/** Reads and frees a step's loss tensors. */
const stepResult = (r: ReturnType<typeof stepOnDevice>, values: readonly [number, number, number]): StepResult => {
  r.total.dispose()
  r.ce.dispose()
  r.aux.dispose()
  return { loss: values[0], ce: values[1], aux: values[2], lr: r.lr, ...r.stats }
}

/** One optimisation step; returns the loss parts and the stage statistics. */
export const trainStep = (low: Lowered, opt: Optimizer, batch: Batch, settings: TrainSettings, step: number, pass: PassOptions = {}): StepResult => {
  const r = stepOnDevice(low, opt, batch, settings, step, undefined, undefined, pass)
  return stepResult(r, [r.total.dataSync()[0]!, r.ce.dataSync()[0]!, r.aux.dataSync()[0]!])
}

/**
 * The same step for backends that read only asynchronously (webgpu in Node): the host decisions
 * (boundaries; MoE routing unless dispatch is dense) are read in an untaped recording pass first.
 */
export const trainStepAsync = async (low: Lowered, opt: Optimizer, batch: Batch, settings: TrainSettings, step: number, pass: PassOptions = {}): Promise<StepResult> => {
  const reads = await recordReads(low, batch, stepOptions(low, settings, step, pass))
  const r = stepOnDevice(low, opt, batch, settings, step, replay(reads), undefined, pass)
  const packed = packStats(low.tf, r)
  const values = await packed.data()
  packed.dispose()
  failOnGpuErrors(low.tf)
  return { ...readStats(values, { concepts: false, routing: r.routing !== undefined }), lr: r.lr, ...r.stats }
}

/**
 * Throws if the GPU device reported errors since the last check: Dawn drops a command buffer that
 * fails validation without an exception, so the values read back would be silently wrong.
 */
export const failOnGpuErrors = (tf: Tf): void => {
  const errors = backendOps(tf).deviceErrors?.() ?? []
  if (errors.length > 0) throw new Error(`the GPU device reported ${errors.length} error(s); the results are invalid: ${errors.join("; ")}`)
}

export { syncReads } from "../runtime/Backend.ts"

/** One validation batch: its mean cross-entropy (a tensor, kept), tokens and compression counts. */
const evalBatch = (low: Lowered, b: Batch, ramp: number | undefined, read?: (t: TF.Tensor) => Float32Array | Int32Array) =>
  low.tf.tidy(() => {
    const x = loss(low, b, { training: false, seed: 0, ...(ramp === undefined ? {} : { ramp }), ...(read === undefined ? {} : { read }) })
    return { ce: x.ce, tokens: x.tokens, concepts: x.ctx.compression.concepts, seen: x.ctx.compression.tokens }
  })

type EvalPart = { readonly ce: number; readonly tokens: number; readonly concepts: number; readonly seen: number }

const summarize = (parts: ReadonlyArray<EvalPart>) => {
  const sum = (f: (p: EvalPart) => number) => parts.reduce((a, p) => a + f(p), 0)
  const concepts = sum((p) => p.concepts)
  return {
    bitsPerByte: sum((p) => p.ce * p.tokens) / sum((p) => p.tokens) / Math.LN2,
    compression: concepts > 0 ? sum((p) => p.seen) / concepts : undefined
  }
}

/**
 * Mean validation bits per byte (cross-entropy in bits per token of the byte tokenizer); a
 * converted model is evaluated at its ramp position `ramp` (default: none, the paper's model).
 */
export const evaluate = (low: Lowered, batches: ReadonlyArray<Batch>, ramp?: number): { readonly bitsPerByte: number; readonly compression: number | undefined } =>
  summarize(batches.map((b) => {
    const r = evalBatch(low, b, ramp)
    const ce = r.ce.dataSync()[0]!
    r.ce.dispose()
    return { ...r, ce }
  }))

/** {@link evaluate} for backends that read only asynchronously (reads recorded first). */
export const evaluateAsync = async (low: Lowered, batches: ReadonlyArray<Batch>, ramp?: number) => {
  const parts: Array<EvalPart> = []
  for (const b of batches) {
    const reads = await recordReads(low, b, { training: false, seed: 0, ...(ramp === undefined ? {} : { ramp }) })
    const r = evalBatch(low, b, ramp, replay(reads))
    const ce = (await r.ce.data())[0]!
    r.ce.dispose()
    parts.push({ ...r, ce })
  }
  failOnGpuErrors(low.tf)
  return summarize(parts)
}

