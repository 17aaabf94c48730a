/**
 * Training: AdamW with decoupled weight decay, linear warm-up then cosine decay, global-norm
 * gradient clipping, deterministic data and sampling (a pure function of seed and step, so a resumed
 * run repeats an uninterrupted one), progress lines, JSONL metrics, safetensors checkpoints with the
 * optimizer state, and an SVG loss curve.
 *
 * @since 0.1.0
 */
import { Effect, Path, Schema } from "effect"
import type { LoadedModel } from "../models/Load.ts"
import type { Tf } from "../graph/Apply.ts"
import { lineChart, toSvg } from "../report/Plots.ts"
import { Tensors } from "../runtime/Backend.ts"
import { fitsInMemory } from "../runtime/Memory.ts"
import { type Batch, type Lowered, materialize, release } from "../runtime/Lower.ts"
import { attempt, attemptPromise, type RunFailure } from "../internal/RunErrors.ts"
import { CheckpointError, checkpointFiles, type SettingChange, type TensorData } from "./Checkpoint.ts"
import { commit, ensureDir, lock as lockRun, removeStaleTemps } from "./RunDir.ts"
import * as Stop from "./Stop.ts"
import * as Progress from "../internal/Progress.ts"
import { type DataInfo, type Stream, sotuData, trainBatch, validationBatches } from "./Data.ts"
import { capturedTrainer, type StepResult } from "./Captured.ts"
import { parallelTrainer, trainingThreads } from "./Parallel.ts"
import { backendOps } from "../runtime/Ops.ts"
import { evaluate, evaluateAsync, newOptimizer, type Optimizer, type PassOptions, syncReads, trainStep, type TrainSettings } from "./Step.ts"
import { type ChunkerSpec, initialRatioControl, rampSpec, type RatioControl, ratioLossValue } from "../blocks/Chunker.ts"
import { compressionSummary, type CompressionSummary } from "./Compression.ts"
import type { StepMetrics } from "./Metrics.ts"
import { nextControl, resumeRun } from "./Resume.ts"

export * from "./Step.ts"
export type { StepMetrics } from "./Metrics.ts"
export { CheckpointMismatch, loadParams } from "./Resume.ts"


/**
 * The loss became NaN or infinite: training stopped; the last good checkpoint is kept. `during`
 * says where it was seen: a training step's loss, or the check before a checkpoint is written (the
 * weights to be stored give a non-finite loss, or hold non-finite values), which refuses to write
 * them.
 */
export class DivergedError extends Schema.TaggedError<DivergedError>()("DivergedError", {
  step: Schema.Number,
  loss: Schema.Number,
  checkpoint: Schema.NullOr(Schema.String),
  /** The step of `checkpoint`. */
  checkpointStep: Schema.optional(Schema.NullOr(Schema.Number)),
  during: Schema.optional(Schema.Literals(["step", "checkpoint"])),
  /** For `during: "checkpoint"`: the stored tensor that was not finite, if the loss was. */
  tensor: Schema.optional(Schema.String)
}) {
  override get message(): string {
    const what = this.during === "checkpoint"
      ? (this.tensor !== undefined
        ? `the weights after step ${this.step} hold non-finite values (${this.tensor}), so they were not written; training stopped`
        : `the weights after step ${this.step} give a validation loss of ${this.loss}, so they were not written; training stopped`)
      : `the loss became ${this.loss} at step ${this.step}; training stopped`
    return what + (this.checkpoint === null
      ? " (no checkpoint was written yet)"
      : `; the last good checkpoint is ${this.checkpoint}${this.checkpointStep === undefined || this.checkpointStep === null ? "" : ` (step ${this.checkpointStep})`}`)
  }
}

/** A training setting that cannot work with the model (e.g. `seqLen` past its context length). */
export class SettingsError extends Schema.TaggedError<SettingsError>()("SettingsError", {
  field: Schema.String,
  message: Schema.String
}) {}

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

export interface TrainResult {
  /** For a resumed run: where it resumed, the metrics lines before that step that were missing, and the settings changed. */
  readonly resumed?: { readonly step: number; readonly missingMetrics: ReadonlyArray<number>; readonly changes: ReadonlyArray<SettingChange> }
  readonly metrics: ReadonlyArray<StepMetrics>
  readonly finalValBitsPerByte: number
  readonly checkpoint: string
  readonly tokensPerSecond: number
  /** A ConceptMoE's measured compression (`Compression.compressionSummary`); undefined for other models. */
  readonly compression?: CompressionSummary
}

/** The run's options beside its settings. */
export interface TrainOptions {
  readonly out: string
  readonly resume: boolean
  readonly quiet?: boolean
  /** The splits (default: SOTU, `Data.sotuData`); with `info`, it is recorded in the checkpoint and checked on resume. */
  readonly data?: { readonly train: Stream; readonly validation: Stream; readonly info?: DataInfo }
  /** Stop (with a checkpoint) after this many steps, keeping the schedule of `settings.steps`. */
  readonly until?: number
}

/** The model's concept stage, if it has exactly one: its chunk module's spec (the ratio controller's). */
const chunkOf = (model: LoadedModel): { readonly chunks: number; readonly chunk: ChunkerSpec | undefined } => {
  const chunks = model.analysis.rows.filter((r) => r.kind === "chunk").map((r) => model.analysis.specs.get(r.path) as ChunkerSpec)
  return { chunks: chunks.length, chunk: chunks.length === 1 ? chunks[0] : undefined }
}

/** A converted model's ramp position at a step (train/Convert.ts): 0 → 1 over its `rampSteps`, else none. */
const rampOf = (model: LoadedModel) => {
  const rampSteps = model.concept?.spec.rampSteps
  return (step: number) => (rampSteps === undefined ? undefined : Math.min(1, step / rampSteps))
}

/** What a step gives the metrics and the controller, whichever runner ran it. */
type StepOutcome = StepResult

/** A step's metrics record: the losses, the stage's compression measures and, at an evaluation, the validation ones. */
const stepMetrics = (
  step: number,
  r: StepOutcome,
  tokens: number,
  ms: number,
  control: { readonly chunk: ChunkerSpec | undefined; readonly used: RatioControl; readonly ramp: number | undefined },
  val: { readonly bitsPerByte: number; readonly compression: number | undefined } | undefined
): StepMetrics => {
  const F = r.concepts > 0 ? r.concepts / r.tokens : undefined
  const chunk = control.chunk
  const experts = r.expertPairs !== undefined && r.expertPairs > 0 ? { routed: r.expertPairs, dropped: r.expertDropped ?? 0 } : undefined
  return {
    step,
    loss: r.loss,
    ce: r.ce,
    aux: r.aux,
    lr: r.lr,
    tokensPerSecond: tokens / (ms / 1000),
    ...(F === undefined ? {} : { compression: r.tokens / r.concepts, boundaryRate: F, boundaryProb: r.boundaryProbSum / r.tokens, thresholdRate: r.thresholdConcepts / r.tokens }),
    ...(F === undefined || chunk === undefined ? {} : { ratioLoss: ratioLossValue(rampSpec(chunk, control.ramp), control.used, F, r.boundaryProbSum / r.tokens) }),
    ...(r.dropped !== undefined && r.dropped > 0 ? { droppedBoundaries: r.dropped } : {}),
    ...(experts === undefined || experts.dropped === 0 ? {} : { droppedExpertPairs: experts.dropped / experts.routed }),
    ...(val === undefined ? {} : { valBitsPerByte: val.bitsPerByte }),
    ...(val?.compression === undefined ? {} : { valCompression: val.compression })
  }
}

/** Counts between two progress lines: tokens, dropped boundaries and token-expert pairs. */
class ProgressWindow {
  tokens = 0
  dropped = 0
  routed = 0
  droppedPairs = 0
  start = performance.now()
  add(tokens: number, r: StepOutcome) {
    this.tokens += tokens
    this.dropped += r.dropped ?? 0
    if (r.expertPairs !== undefined && r.expertPairs > 0) {
      this.routed += r.expertPairs
      this.droppedPairs += r.expertDropped ?? 0
    }
  }
  /** The progress line of `m` over the window, which then starts again. */
  line(m: StepMetrics, steps: number): string {
    const now = performance.now()
    const tps = this.tokens / ((now - this.start) / 1000)
    const text = `step ${String(m.step + 1).padStart(5)}/${steps}  loss ${m.loss.toFixed(4)}  ${tps.toFixed(0)} tok/s  lr ${m.lr.toExponential(2)}` +
      (m.compression === undefined ? "" : `  R ${m.compression.toFixed(2)}  F ${m.boundaryRate!.toFixed(3)}  F(p≥½) ${m.thresholdRate!.toFixed(3)}  G ${m.boundaryProb!.toFixed(3)}`) +
      (m.ratioLoss === undefined ? "" : `  ratio loss ${m.ratioLoss.toFixed(4)}`) +
      (this.dropped === 0 ? "" : `  ${this.dropped} sampled boundaries dropped (concept slots full; conceptCapacity)`) +
      (this.droppedPairs === 0 ? "" : `  ${(100 * this.droppedPairs / this.routed).toFixed(1)}% of token-expert pairs dropped (expert slots full; expertCapacity)`) +
      (m.valBitsPerByte === undefined ? "" : `  val ${m.valBitsPerByte.toFixed(4)} bits/byte`) +
      (m.valCompression === undefined ? "" : `  val R ${m.valCompression.toFixed(2)} (p ≥ ½)`)
    this.tokens = 0
    this.dropped = 0
    this.routed = 0
    this.droppedPairs = 0
    this.start = now
    return text
  }
}

/** The loss curve and validation bits per byte of a run, as SVG. */
const lossChart = (name: string, metrics: ReadonlyArray<StepMetrics>) =>
  Effect.promise(() =>
    toSvg(lineChart({
      title: `${name}: training loss and validation bits per byte`,
      x: "step",
      y: "loss (nats/token) / validation bits per byte",
      linear: true,
      rows: [
        ...metrics.map((m) => ({ series: "train loss", x: m.step + 1, y: m.loss })),
        ...metrics.filter((m) => m.valBitsPerByte !== undefined).map((m) => ({ series: "val bits/byte", x: m.step + 1, y: m.valBitsPerByte! }))
      ]
    }))
  )

/**
 * The run directory made ready: created, locked for this process, cleared of the temporary files a
 * killed run left; SIGINT/SIGTERM from here on stop at the end of a step, with a checkpoint (Stop.ts).
 */
const prepareRunDir = (out: string, log: (line: string) => Effect.Effect<void>) =>
  Effect.gen(function*() {
    yield* ensureDir(out)
    yield* lockRun(out)
    const stale = yield* removeStaleTemps(out)
    if (stale.length > 0) yield* log(`removed ${stale.length} temporary file(s) an interrupted run left: ${stale.join(", ")}`)
    yield* Stop.watch
  })

/**
 * The model's variables and Adam's moments, released when the run's scope closes (every exit path);
 * a graph that cannot be lowered (a kind without `apply`) is a typed failure.
 */
const acquireModel = (tf: Parameters<typeof materialize>[0], model: LoadedModel, seed: number) =>
  Effect.acquireRelease(
    attempt(() => {
      const low = materialize(tf, model.analysis, seed)
      return { low, opt: newOptimizer(low) }
    }),
    ({ low, opt }) =>
      Effect.sync(() => {
        release(low)
        for (const v of [...opt.m.values(), ...opt.v.values()]) v.dispose()
      })
  )

/**
 * How the run's steps execute: recorded and replayed on webgpu (Captured.ts), split over worker
 * threads on CPU backends when `threads` > 1 (Parallel.ts), else one step at a time; the recording
 * and the workers are released when the run's scope closes.
 */
const stepRunner = (low: Lowered, opt: Optimizer, model: LoadedModel, settings: TrainSettings) =>
  Effect.gen(function*() {
    const sync = syncReads(low.tf)
    const trainer = sync ? undefined : yield* Effect.acquireRelease(
      Effect.sync(() => capturedTrainer(low, opt, settings, settings.batchSize, settings.seqLen)),
      (t) => Effect.sync(() => t.dispose())
    )
    const threads = sync ? trainingThreads(settings, low.tf.getBackend()) : 1
    const parallel = threads > 1
      ? yield* Effect.acquireRelease(attemptPromise(() => parallelTrainer(low, opt, model.config, settings, threads)), (p) => Effect.promise(() => p.dispose()))
      : undefined
    const run = (batch: Batch, step: number, pass: PassOptions): Effect.Effect<StepOutcome, RunFailure> =>
      trainer !== undefined
        ? attemptPromise(() => trainer.step(batch, step, { pass }))
        : parallel !== undefined
        ? attemptPromise(() => parallel.step(batch, step, pass))
        : attempt(() => trainStep(low, opt, batch, settings, step, pass))
    return { run, trainer, sync }
  })

/**
 * Trains a model on the SOTU corpus, writing into `out`: `metrics.jsonl`, the checkpoint's files
 * (Checkpoint.ts), `loss.svg`. With `resume`, continues from the checkpoint in `out`.
 */
export const train = (model: LoadedModel, settings: TrainSettings, options: TrainOptions) =>
  Effect.gen(function*() {
    const { description, tf, name: backend } = yield* Tensors
    const path = yield* Path.Path
    const log = (s: string) => (options.quiet === true ? Effect.void : Progress.line(s))
    if (settings.seqLen > model.contextLength) {
      return yield* new SettingsError({ field: "seqLen", message: `seqLen ${settings.seqLen} exceeds the context length of ${model.name} (${model.contextLength} tokens); use a seqLen of at most ${model.contextLength}` })
    }
    yield* fitsInMemory(model, backend, "train")
    // lowered before the run directory is touched: a graph that cannot run leaves nothing behind
    const { low, opt } = yield* acquireModel(tf, model, settings.seed)
    yield* prepareRunDir(options.out, log)
    const checkpointFile = path.join(options.out, "checkpoint.safetensors")
    const metricsFile = path.join(options.out, "metrics.jsonl")
    const data = options.data ?? sotuData(settings.seed)
    const validation = validationBatches(data.validation, settings.batchSize, settings.seqLen, settings.evalBatches)
    // the ratio controller (Chunker.ts) of a model with one concept stage, and a converted model's ramp
    const { chunks, chunk } = chunkOf(model)
    const rampAt = rampOf(model)
    const resumed = options.resume
      ? yield* resumeRun({ model, settings, low, opt, checkpointFile, metricsFile, data, chunk, rampAt, log })
      : undefined
    const start = resumed?.start ?? 0
    const metrics: Array<StepMetrics> = resumed?.metrics ?? []
    const changes: ReadonlyArray<SettingChange> = resumed?.changes ?? []
    let control: RatioControl = resumed?.control ?? initialRatioControl
    yield* log(`training ${model.name} on ${description}: ${settings.steps} steps × ${settings.batchSize}×${settings.seqLen} tokens, ${data.info === undefined || data.info.kind === "sotu" ? "SOTU" : data.info.source} train ${data.train.tokens.length.toLocaleString("en-US")} bytes`)
    const { run, trainer, sync } = yield* stepRunner(low, opt, model, settings)
    const evaluateAt = (batches: ReadonlyArray<Batch>, ramp: number | undefined) =>
      sync ? attempt(() => evaluate(low, batches, ramp)) : attemptPromise(() => evaluateAsync(low, batches, ramp))
    let lastCheckpoint: string | null = options.resume ? checkpointFile : null
    let lastStep: number | null = options.resume ? start : null
    /**
     * Commits the step: the weights are checked first (their loss on a validation batch, `checked`
     * when the step just evaluated them, and every stored value finite), so a diverging run never
     * replaces the last good checkpoint; then metrics and checkpoint are written as one step
     * (RunDir.commit: metrics renamed first, the checkpoint last as the commit point).
     */
    const save = (step: number, checked: number | undefined) =>
      Effect.gen(function*() {
        const probe = validation.length > 0 ? validation.slice(0, 1) : [trainBatch(data.train, settings.batchSize, settings.seqLen, settings.seed, step)]
        const loss = checked ?? (yield* evaluateAt(probe, rampAt(step - 1))).bitsPerByte
        const tensors = yield* attemptPromise(() => checkpointTensors(low, opt))
        const bad = Number.isFinite(loss) ? [...tensors].find(([, t]) => !t.data.every(Number.isFinite))?.[0] : undefined
        if (!Number.isFinite(loss) || bad !== undefined) {
          return yield* new DivergedError({ step, loss, checkpoint: lastCheckpoint, checkpointStep: lastStep, during: "checkpoint", ...(bad === undefined ? {} : { tensor: bad }) })
        }
        const metadata: Record<string, string> = {
          step: String(step),
          model: model.name,
          format: "conceptmoe/v1",
          ...kernelChoicesMetadata(tf),
          ...(chunk === undefined ? {} : { ratioControl: JSON.stringify(control) }),
          config: JSON.stringify(model.config),
          settings: JSON.stringify(settings),
          ...(data.info === undefined ? {} : { data: JSON.stringify(data.info) }),
          ...(changes.length === 0 ? {} : { changes: JSON.stringify(changes) })
        }
        const lines = metrics.map((m) => JSON.stringify(m)).join("\n") + "\n"
        yield* commit([{ file: metricsFile, bytes: lines }, ...checkpointFiles(model, checkpointFile, tensors, metadata)])
        lastCheckpoint = checkpointFile
        lastStep = step
      })
    const window = new ProgressWindow()
    let totalTokens = 0
    let totalTime = 0
    const end = Math.min(settings.steps, options.until ?? settings.steps)
    let mode = trainer?.mode().mode
    for (let step = start; step < end; step++) {
      const batch = trainBatch(data.train, settings.batchSize, settings.seqLen, settings.seed, step)
      const tokens = batch.rows * batch.length
      const used = control
      // the trainer's state this step's passes take (Step.PassOptions)
      const pass: PassOptions = { ramp: rampAt(step), ...(chunk === undefined ? {} : { ratioControl: used }) }
      const t0 = performance.now()
      const r = yield* run(batch, step, pass)
      const dt = performance.now() - t0
      const now = trainer?.mode()
      const tuning = step === start + 1 ? trainer?.tuning() : undefined
      if (tuning !== undefined) yield* log(`matmul: ${tuning}`)
      if (now !== undefined && now.mode !== mode) {
        mode = now.mode
        if (now.mode === "replay") yield* log(`steps from ${step + 2} on replay a recorded step (${now.dispatches} GPU dispatches)`)
        if (now.mode === "eager") yield* log(`steps run through tfjs: ${now.reason}`)
      }
      totalTime += dt
      totalTokens += tokens
      window.add(tokens, r)
      if (!Number.isFinite(r.loss)) {
        return yield* new DivergedError({ step, loss: r.loss, checkpoint: lastCheckpoint, checkpointStep: lastStep, during: "step" })
      }
      const last = step === end - 1
      const doEval = (step + 1) % settings.evalEvery === 0 || last
      const val = doEval ? yield* evaluateAt(validation, rampAt(step)) : undefined
      const m = stepMetrics(step, r, tokens, dt, { chunk, used, ramp: rampAt(step) }, val)
      control = nextControl(control, chunk, rampAt(step), m)
      metrics.push(m)
      if (options.quiet !== true) yield* Progress.tick(model.name, step + 1, end)
      if ((step + 1) % settings.logEvery === 0 || doEval || step === start) yield* log(window.line(m, settings.steps))
      if ((step + 1) % settings.checkpointEvery === 0 || last) yield* save(step + 1, val?.bitsPerByte)
      // a signal (Stop.ts) is acted on here, between steps: the step is committed, then the run stops
      const signal = yield* Stop.poll
      if (signal !== undefined && !last) {
        if (lastStep !== step + 1) yield* save(step + 1, val?.bitsPerByte)
        return yield* new Stop.Stopped({ signal, step: step + 1, steps: settings.steps, out: options.out, checkpoint: checkpointFile })
      }
    }
    yield* commit([{ file: path.join(options.out, "loss.svg"), bytes: yield* lossChart(model.name, metrics) }])
    const finalVal = [...metrics].reverse().find((m) => m.valBitsPerByte !== undefined)?.valBitsPerByte ?? NaN
    return {
      metrics,
      finalValBitsPerByte: finalVal,
      checkpoint: checkpointFile,
      tokensPerSecond: totalTime > 0 ? totalTokens / (totalTime / 1000) : 0,
      ...(chunks === 0 ? {} : { compression: compressionSummary(metrics, { steps: settings.steps }) }),
      ...(resumed === undefined ? {} : { resumed: { step: start, missingMetrics: resumed.missingMetrics, changes: resumed.now } })
    } satisfies TrainResult
  }).pipe(Effect.scoped)

export { CheckpointError }

/** The backend's kernel choices for a checkpoint's metadata (`matmul`), where it made any. */
const kernelChoicesMetadata = (tf: Tf): { readonly matmul?: string } => {
  const choices = backendOps(tf).kernelChoices?.saved() ?? {}
  return Object.keys(choices).length > 0 ? { matmul: JSON.stringify(choices) } : {}
}
