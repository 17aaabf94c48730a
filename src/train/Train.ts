/**
 * Training: AdamW with decoupled weight decay, linear warm-up then cosine decay, global-norm
 * gradient clipping, deterministic data and sampling (a pure function of seed and step, so a resumed
 * run repeats an uninterrupted one), progress lines, JSONL metrics, safetensors checkpoints with the
 * optimizer state, and an SVG loss curve.
 *
 * @since 0.1.0
 */
import { Console, Effect, FileSystem, Path, Schema } from "effect"
import type * as TF from "@tensorflow/tfjs"
import { Dim, PositiveNumber, withDefault } from "../graph/Spec.ts"
import type { LoadedModel } from "../models/Load.ts"
import { lineChart, toSvg } from "../report/Plots.ts"
import { Tensors } from "../runtime/Backend.ts"
import { type Batch, loss, type Lowered, materialize, mixSeed, recordReads, replay } from "../runtime/Lower.ts"
import { CheckpointError, read as readCheckpoint, type TensorData, write as writeCheckpoint } from "./Checkpoint.ts"
import { byteTokenizer, type Stream, sotuSplits, trainBatch, validationBatches } from "./Data.ts"

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
  partLr: withDefault(Schema.Record(Schema.String, Schema.Finite.pipe(Schema.check(Schema.isGreaterThanOrEqualTo(0)))), {})
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
  optimizer: withDefault(OptimizerConfig, {})
})
export type TrainSettings = typeof TrainSettings.Type

/** The loss became NaN or infinite: training stopped; the last good checkpoint is kept. */
export class DivergedError extends Schema.TaggedError<DivergedError>()("DivergedError", {
  step: Schema.Number,
  loss: Schema.Number,
  checkpoint: Schema.NullOr(Schema.String)
}) {
  override get message(): string {
    return `the loss became ${this.loss} at step ${this.step}; training stopped` +
      (this.checkpoint === null ? " (no checkpoint was written yet)" : `; the last good checkpoint is ${this.checkpoint}`)
  }
}

/** A checkpoint that does not belong to this model. */
export class CheckpointMismatch extends Schema.TaggedError<CheckpointMismatch>()("CheckpointMismatch", {
  file: Schema.String,
  message: Schema.String
}) {}

export interface StepMetrics {
  readonly step: number
  readonly loss: number
  readonly ce: number
  readonly aux: number
  readonly lr: number
  readonly tokensPerSecond: number
  readonly compression?: number
  readonly boundaryRate?: number
  readonly valBitsPerByte?: number
}

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
  for (const [p, w] of low.variables) {
    m.set(p, tf.variable(tf.zerosLike(w), false))
    v.set(p, tf.variable(tf.zerosLike(w), false))
  }
  return { m, v, step: 0 }
}

/**
 * One optimisation step on the device, with host reads through `read` (see `Lower.recordReads`):
 * gradients, global-norm clipping (the norm stays a tensor), AdamW. Returns the loss tensors, kept,
 * for the caller to read, and the stage statistics.
 */
const stepOnDevice = (
  low: Lowered,
  opt: Optimizer,
  batch: Batch,
  settings: TrainSettings,
  step: number,
  read: ((t: TF.Tensor) => Float32Array | Int32Array) | undefined
) => {
  const { tf } = low
  const o = settings.optimizer
  const lr = learningRate(o, settings.steps, step)
  const names = [...low.variables.keys()]
  const vars = names.map((n) => low.variables.get(n)!)
  const partOf = new Map(low.analysis.params.map((p) => [p.path, p.part]))
  let stats = { tokens: 0, concepts: 0, boundaryProbSum: 0 }
  let parts: { ce: TF.Scalar; aux: TF.Scalar } | undefined
  const total = tf.tidy(() => {
    const { grads, value } = tf.variableGrads(() => {
      const r = loss(low, batch, { ...stepOptions(settings, step), ...(read === undefined ? {} : { read }) })
      stats = { tokens: r.ctx.compression.tokens, concepts: r.ctx.compression.concepts, boundaryProbSum: r.ctx.compression.boundaryProbSum }
      parts = { ce: tf.keep(r.ce), aux: tf.keep(r.aux) }
      return r.total
    }, vars)
    const gs = vars.map((w) => grads[w.name] ?? tf.zerosLike(w))
    const norm = tf.sqrt(tf.addN(gs.map((g) => tf.sum(tf.square(g)))))
    const scale = tf.minimum(tf.div(o.clip, norm), 1)
    const t = step + 1
    const c1 = 1 - o.beta1 ** t
    const c2 = 1 - o.beta2 ** t
    names.forEach((n, i) => {
      const g = tf.mul(gs[i]!, scale)
      const m = opt.m.get(n)!
      const v = opt.v.get(n)!
      m.assign(tf.add(tf.mul(m, o.beta1), tf.mul(g, 1 - o.beta1)))
      v.assign(tf.add(tf.mul(v, o.beta2), tf.mul(tf.square(g), 1 - o.beta2)))
      const w = vars[i]!
      const update = tf.div(tf.div(m, c1), tf.add(tf.sqrt(tf.div(v, c2)), o.eps))
      const decay = w.rank >= 2 ? tf.mul(w, o.weightDecay) : tf.zerosLike(w)
      w.assign(tf.sub(w, tf.mul(tf.add(update, decay), lr * (o.partLr[partOf.get(n) ?? ""] ?? 1))))
    })
    return value
  })
  opt.step = step + 1
  return { total, ce: parts!.ce, aux: parts!.aux, lr, stats }
}

const stepOptions = (settings: TrainSettings, step: number) =>
  ({ training: true, seed: mixSeed(settings.seed, step), balanceWeight: settings.balanceWeight }) as const

/** Reads and frees a step's loss tensors. */
const stepResult = (r: ReturnType<typeof stepOnDevice>, values: readonly [number, number, number]) => {
  r.total.dispose()
  r.ce.dispose()
  r.aux.dispose()
  return { loss: values[0], ce: values[1], aux: values[2], lr: r.lr, ...r.stats }
}

/** One optimisation step; returns the loss parts and the stage statistics. */
export const trainStep = (low: Lowered, opt: Optimizer, batch: Batch, settings: TrainSettings, step: number) => {
  const r = stepOnDevice(low, opt, batch, settings, step, undefined)
  return stepResult(r, [r.total.dataSync()[0]!, r.ce.dataSync()[0]!, r.aux.dataSync()[0]!])
}

/**
 * The same step for backends that read only asynchronously (webgpu in Node): the host decisions
 * (boundaries; MoE routing unless dispatch is dense) are read in an untaped recording pass first.
 */
export const trainStepAsync = async (low: Lowered, opt: Optimizer, batch: Batch, settings: TrainSettings, step: number) => {
  const reads = await recordReads(low, batch, stepOptions(settings, step))
  const r = stepOnDevice(low, opt, batch, settings, step, replay(reads))
  const [total, ce, aux] = await Promise.all([r.total.data(), r.ce.data(), r.aux.data()])
  return stepResult(r, [total[0]!, ce[0]!, aux[0]!])
}

/** Whether the current backend reads tensors synchronously (not webgpu in Node). */
export const syncReads = (tf: Lowered["tf"]): boolean => tf.getBackend() !== "webgpu"

/** One validation batch: its mean cross-entropy (a tensor, kept), tokens and compression counts. */
const evalBatch = (low: Lowered, b: Batch, read?: (t: TF.Tensor) => Float32Array | Int32Array) =>
  low.tf.tidy(() => {
    const x = loss(low, b, { training: false, seed: 0, ...(read === undefined ? {} : { read }) })
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

/** Mean validation bits per byte (cross-entropy in bits per token of the byte tokenizer). */
export const evaluate = (low: Lowered, batches: ReadonlyArray<Batch>): { readonly bitsPerByte: number; readonly compression: number | undefined } =>
  summarize(batches.map((b) => {
    const r = evalBatch(low, b)
    const ce = r.ce.dataSync()[0]!
    r.ce.dispose()
    return { ...r, ce }
  }))

/** {@link evaluate} for backends that read only asynchronously (reads recorded first). */
export const evaluateAsync = async (low: Lowered, batches: ReadonlyArray<Batch>) => {
  const parts: Array<EvalPart> = []
  for (const b of batches) {
    const reads = await recordReads(low, b, { training: false, seed: 0 })
    const r = evalBatch(low, b, replay(reads))
    const ce = (await r.ce.data())[0]!
    r.ce.dispose()
    parts.push({ ...r, ce })
  }
  return summarize(parts)
}

/** The parameters and Adam's moments, read back (asynchronously, so on every backend). */
const checkpointTensors = async (low: Lowered, opt: Optimizer): Promise<Map<string, TensorData>> => {
  const out = new Map<string, TensorData>()
  for (const [p, w] of low.variables) {
    for (const [prefix, t] of [["param", w], ["adam.m", opt.m.get(p)!], ["adam.v", opt.v.get(p)!]] as const) {
      out.set(`${prefix}/${p}`, { shape: t.shape, data: (await t.data()) as Float32Array })
    }
  }
  return out
}

/**
 * Checks a checkpoint's tensors against the model's variables (every `prefix/path` present with the
 * variable's shape, no parameter the model lacks) and assigns them; `targets` gives, per prefix, the
 * tensor each variable's entry goes to.
 */
const assignChecked = (
  low: Lowered,
  file: string,
  tensors: ReadonlyMap<string, TensorData>,
  prefixes: ReadonlyArray<readonly [string, (path: string, w: TF.Variable) => TF.Variable]>
) =>
  Effect.gen(function*() {
    const { tf } = low
    for (const [p, w] of low.variables) {
      for (const [prefix, target] of prefixes) {
        const t = tensors.get(`${prefix}/${p}`)
        if (t === undefined) return yield* new CheckpointMismatch({ file, message: `has no tensor ${prefix}/${p}: it was written for another model` })
        if (t.shape.join(",") !== w.shape.join(",")) {
          return yield* new CheckpointMismatch({ file, message: `${prefix}/${p} has shape [${t.shape}], the model's is [${w.shape}]` })
        }
        target(p, w).assign(tf.tensor(t.data, [...t.shape]))
      }
    }
    const extra = [...tensors.keys()].filter((k) => /^(param|adam\.m|adam\.v)\//.test(k) && !low.variables.has(k.replace(/^(param|adam\.m|adam\.v)\//, "")))
    if (extra.length > 0) return yield* new CheckpointMismatch({ file, message: `has tensors the model lacks, e.g. ${extra[0]}` })
  })

const restore = (low: Lowered, opt: Optimizer, file: string, tensors: Map<string, TensorData>) =>
  assignChecked(low, file, tensors, [["param", (_, w) => w], ["adam.m", (p) => opt.m.get(p)!], ["adam.v", (p) => opt.v.get(p)!]])

/** Loads a checkpoint's parameters into a lowered model (no optimizer state), checking names and shapes. */
export const loadParams = (low: Lowered, file: string, tensors: ReadonlyMap<string, TensorData>) =>
  assignChecked(low, file, tensors, [["param", (_, w) => w]])

export interface TrainResult {
  readonly metrics: ReadonlyArray<StepMetrics>
  readonly finalValBitsPerByte: number
  readonly checkpoint: string
  readonly tokensPerSecond: number
}

/**
 * Trains a model on the SOTU corpus, writing into `out`: `metrics.jsonl`, `checkpoint.safetensors`,
 * `loss.svg`. With `resume`, continues from the checkpoint in `out`.
 */
export const train = (
  model: LoadedModel,
  settings: TrainSettings,
  options: {
    readonly out: string
    readonly resume: boolean
    readonly quiet?: boolean
    readonly data?: { readonly train: Stream; readonly validation: Stream }
    /** Stop (with a checkpoint) after this many steps, keeping the schedule of `settings.steps`. */
    readonly until?: number
  }
) =>
  Effect.gen(function*() {
    const { description, tf } = yield* Tensors
    const fs = yield* FileSystem.FileSystem
    const path = yield* Path.Path
    const log = (s: string) => (options.quiet === true ? Effect.void : Console.log(s))
    yield* fs.makeDirectory(options.out, { recursive: true })
    const checkpointFile = path.join(options.out, "checkpoint.safetensors")
    const metricsFile = path.join(options.out, "metrics.jsonl")
    const data = options.data ?? sotuSplits(byteTokenizer, settings.seed)
    const validation = validationBatches(data.validation, settings.batchSize, settings.seqLen, settings.evalBatches)
    const low = materialize(tf, model.analysis, settings.seed)
    const opt = newOptimizer(low)
    const sync = syncReads(tf)
    let start = 0
    let metrics: Array<StepMetrics> = []
    if (options.resume) {
      const ck = yield* readCheckpoint(checkpointFile)
      yield* restore(low, opt, checkpointFile, ck.tensors)
      start = Number(ck.metadata["step"] ?? "0")
      opt.step = start
      const old = yield* fs.readFileString(metricsFile).pipe(Effect.orElseSucceed(() => ""))
      metrics = old.split("\n").filter((l) => l.trim() !== "").map((l) => JSON.parse(l) as StepMetrics).filter((m) => m.step < start)
      yield* log(`resumed ${model.name} from ${checkpointFile} at step ${start}`)
    }
    yield* log(`training ${model.name} on ${description}: ${settings.steps} steps × ${settings.batchSize}×${settings.seqLen} tokens, SOTU train ${data.train.tokens.length.toLocaleString("en-US")} bytes`)
    let lastCheckpoint: string | null = options.resume ? checkpointFile : null
    const save = (step: number) =>
      Effect.gen(function*() {
        yield* writeCheckpoint(checkpointFile, yield* Effect.promise(() => checkpointTensors(low, opt)), {
          step: String(step),
          model: model.name,
          format: "conceptmoe/v1",
          config: JSON.stringify(model.config)
        })
        const lines = metrics.map((m) => JSON.stringify(m)).join("\n") + "\n"
        const tmp = `${metricsFile}.tmp-${process.pid}`
        yield* fs.writeFileString(tmp, lines)
        yield* fs.rename(tmp, metricsFile)
        lastCheckpoint = checkpointFile
      })
    let windowTokens = 0
    let windowStart = performance.now()
    let totalTokens = 0
    let totalTime = 0
    const end = Math.min(settings.steps, options.until ?? settings.steps)
    for (let step = start; step < end; step++) {
      const batch = trainBatch(data.train, settings.batchSize, settings.seqLen, settings.seed, step)
      const t0 = performance.now()
      const r = sync ? trainStep(low, opt, batch, settings, step) : yield* Effect.promise(() => trainStepAsync(low, opt, batch, settings, step))
      const dt = performance.now() - t0
      totalTime += dt
      totalTokens += batch.rows * batch.length
      windowTokens += batch.rows * batch.length
      if (!Number.isFinite(r.loss)) return yield* new DivergedError({ step, loss: r.loss, checkpoint: lastCheckpoint })
      const last = step === end - 1
      const doEval = (step + 1) % settings.evalEvery === 0 || last
      const val = !doEval ? undefined : sync ? evaluate(low, validation) : yield* Effect.promise(() => evaluateAsync(low, validation))
      const m: StepMetrics = {
        step,
        loss: r.loss,
        ce: r.ce,
        aux: r.aux,
        lr: r.lr,
        tokensPerSecond: (batch.rows * batch.length) / (dt / 1000),
        ...(r.concepts > 0 ? { compression: r.tokens / r.concepts, boundaryRate: r.concepts / r.tokens } : {}),
        ...(val === undefined ? {} : { valBitsPerByte: val.bitsPerByte })
      }
      metrics.push(m)
      if ((step + 1) % settings.logEvery === 0 || doEval || step === start) {
        const now = performance.now()
        const tps = windowTokens / ((now - windowStart) / 1000)
        windowTokens = 0
        windowStart = now
        yield* log(
          `step ${String(step + 1).padStart(5)}/${settings.steps}  loss ${r.loss.toFixed(4)}  ${tps.toFixed(0)} tok/s  lr ${r.lr.toExponential(2)}` +
            (m.compression === undefined ? "" : `  R ${m.compression.toFixed(2)}  boundary rate ${m.boundaryRate!.toFixed(3)}`) +
            (val === undefined ? "" : `  val ${val.bitsPerByte.toFixed(4)} bits/byte`)
        )
      }
      if ((step + 1) % settings.checkpointEvery === 0 || last) yield* save(step + 1)
    }
    const svg = yield* Effect.promise(() =>
      toSvg(lineChart({
        title: `${model.name}: training loss and validation bits per byte`,
        x: "step",
        y: "loss (nats/token) / validation bits per byte",
        linear: true,
        rows: [
          ...metrics.map((m) => ({ series: "train loss", x: m.step + 1, y: m.loss })),
          ...metrics.filter((m) => m.valBitsPerByte !== undefined).map((m) => ({ series: "val bits/byte", x: m.step + 1, y: m.valBitsPerByte! }))
        ]
      }))
    )
    const svgTmp = path.join(options.out, `loss.svg.tmp-${process.pid}`)
    yield* fs.writeFileString(svgTmp, svg)
    yield* fs.rename(svgTmp, path.join(options.out, "loss.svg"))
    const finalVal = [...metrics].reverse().find((m) => m.valBitsPerByte !== undefined)?.valBitsPerByte ?? NaN
    for (const v of low.variables.values()) v.dispose()
    for (const v of [...opt.m.values(), ...opt.v.values()]) v.dispose()
    return { metrics, finalValBitsPerByte: finalVal, checkpoint: checkpointFile, tokensPerSecond: totalTime > 0 ? totalTokens / (totalTime / 1000) : 0 } satisfies TrainResult
  })

export { CheckpointError }
