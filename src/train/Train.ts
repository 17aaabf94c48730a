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
import { type LoadedModel, modelFromJson, parseJson } from "../models/Load.ts"
import { lineChart, toSvg } from "../report/Plots.ts"
import { Tensors } from "../runtime/Backend.ts"
import { fitsInMemory } from "../runtime/Memory.ts"
import { type Lowered, materialize, release } from "../runtime/Lower.ts"
import { CheckpointError, checkpointFiles, type Metadata, readChecked, type SettingChange, type TensorData } from "./Checkpoint.ts"
import { commit, ensureDir, lock as lockRun, removeStaleTemps } from "./RunDir.ts"
import * as Stop from "./Stop.ts"
import * as Progress from "../internal/Progress.ts"
import { type DataInfo, DataMismatch, type Stream, sotuData, trainBatch, validationBatches } from "./Data.ts"
import { capturedTrainer } from "./Captured.ts"
import { parallelTrainer, trainingThreads } from "./Parallel.ts"
import { describeTuning, takeChoices, tunedChoices } from "../runtime/MatMul.ts"
import { evaluate, evaluateAsync, newOptimizer, type Optimizer, type PassOptions, syncReads, trainStep, type TrainSettings } from "./Step.ts"
import { type ChunkerSpec, controlledRate, initialRatioControl, rampSpec, type RatioControl, ratioControlStep, ratioLossValue } from "../blocks/Chunker.ts"
import { compressionSummary, type CompressionSummary } from "./Compression.ts"

export * from "./Step.ts"

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
  /** Sampled boundaries dropped for want of concept slots (webgpu's static-shape ConceptMoE steps). */
  readonly droppedBoundaries?: number
  /** Token-expert pairs dropped for want of expert slots, as a fraction of those routed (capacity dispatch, webgpu). */
  readonly droppedExpertPairs?: number
  /** Sampled boundary rate F of a ConceptMoE step (concepts / tokens; `compression` is its inverse, the sampled R). */
  readonly boundaryRate?: number
  /** Mean boundary probability G over the step's tokens (the ratio loss's differentiable part). */
  readonly boundaryProb?: number
  /**
   * The boundary rate the step's batch would have at evaluation (tokens with p ≥ ½, forced ones
   * included, over tokens): the training-time counterpart of `valCompression`.
   */
  readonly thresholdRate?: number
  /** The ratio loss as added to the step's loss (weighted; `Chunker.ratioLossValue`). */
  readonly ratioLoss?: number
  readonly valBitsPerByte?: number
  /** Threshold R on the validation batches at an evaluation step (tokens / boundaries with p ≥ ½). */
  readonly valCompression?: number
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
  /** For a resumed run: where it resumed, the metrics lines before that step that were missing, and the settings changed. */
  readonly resumed?: { readonly step: number; readonly missingMetrics: ReadonlyArray<number>; readonly changes: ReadonlyArray<SettingChange> }
  readonly metrics: ReadonlyArray<StepMetrics>
  readonly finalValBitsPerByte: number
  readonly checkpoint: string
  readonly tokensPerSecond: number
  /** A ConceptMoE's measured compression (`Compression.compressionSummary`); undefined for other models. */
  readonly compression?: CompressionSummary
}

/** What must match between a checkpoint's model and the model it resumes into: the normalised config, less its name. */
const identity = (m: LoadedModel): unknown => {
  const unnamed = (x: unknown) => {
    if (typeof x !== "object" || x === null) return x
    const { name: _n, ...rest } = x as Record<string, unknown>
    return rest
  }
  if (m.concept !== undefined) return { ...(unnamed(m.concept.spec) as object), baseline: unnamed(m.concept.baseline) }
  if (m.decoder !== undefined) return unnamed(m.decoder)
  return unnamed(m.config)
}

/** Every leaf of a JSON value by path (`a.b[0]`). */
const leaves = (x: unknown, at = "", out = new Map<string, unknown>()): Map<string, unknown> => {
  if (Array.isArray(x)) {
    if (x.length === 0) out.set(at, [])
    x.forEach((v, i) => leaves(v, `${at}[${i}]`, out))
  } else if (typeof x === "object" && x !== null) {
    const keys = Object.keys(x)
    if (keys.length === 0) out.set(at, {})
    for (const k of keys) leaves((x as Record<string, unknown>)[k], at === "" ? k : `${at}.${k}`, out)
  } else {
    out.set(at, x)
  }
  return out
}

/** The fields whose values differ between two JSON values (a missing field counts as `undefined`). */
const differences = (a: unknown, b: unknown): Array<{ readonly field: string; readonly from: unknown; readonly to: unknown }> => {
  const la = leaves(JSON.parse(JSON.stringify(a ?? null)))
  const lb = leaves(JSON.parse(JSON.stringify(b ?? null)))
  const out: Array<{ field: string; from: unknown; to: unknown }> = []
  for (const field of new Set([...la.keys(), ...lb.keys()])) {
    const from = la.get(field)
    const to = lb.get(field)
    if (JSON.stringify(from) !== JSON.stringify(to)) out.push({ field, from, to })
  }
  return out
}

const show = (v: unknown) => (v === undefined ? "nothing" : JSON.stringify(v))

/**
 * Refuses a checkpoint whose model differs from `model` (architecture, top-k, R, strategy,
 * vocabulary, …), naming the first field; fields the checkpoint lists in `mayChange` may differ and
 * are returned as changes.
 */
const sameModel = (model: LoadedModel, meta: Metadata, file: string, step: number) =>
  Effect.gen(function*() {
    if (meta.config === undefined) return []
    const stored = yield* modelFromJson(meta.config, `${file} (metadata "config")`).pipe(
      Effect.mapError((e) => new CheckpointError({ file, field: "config", message: `metadata "config" is not a model config: ${e.message}` }))
    )
    // the normalised models decide (a default written out is no change); the config's own fields name the change
    const normalised = differences(identity(stored), identity(model))
    if (normalised.length === 0) return []
    const raw = differences(meta.config, model.config).filter((d) => !/(^|\.)name$/.test(d.field))
    const allowed = (field: string) => meta.mayChange.some((f) => field === f || field.startsWith(`${f}.`) || field.startsWith(`${f}[`))
    const refused = raw.find((d) => !allowed(d.field)) ?? (raw.length === 0 ? normalised[0] : undefined)
    if (refused !== undefined) {
      const count = raw.length > 0 ? raw.length : normalised.length
      return yield* new CheckpointMismatch({
        file,
        message: `was written for a different model: "${refused.field}" is ${show(refused.from)} in the checkpoint and ${show(refused.to)} in this config` +
          (count > 1 ? ` (${count} fields differ)` : "") + `; resume with the checkpoint's config or start a new run directory`
      })
    }
    return raw.map((d): SettingChange => ({ step, field: `model.${d.field}`, from: d.from, to: d.to }))
  })

const MetricsLine = Schema.Struct({ step: Schema.Int.pipe(Schema.check(Schema.isGreaterThanOrEqualTo(0))) })

/** Reads `metrics.jsonl` (absent: none); a line that is not a metrics record is a typed error naming its number. */
const readMetrics = (fs: FileSystem.FileSystem, file: string) =>
  Effect.gen(function*() {
    if (!(yield* fs.exists(file).pipe(Effect.orElseSucceed(() => false)))) return []
    const text = yield* fs.readFileString(file).pipe(Effect.mapError((e) => new CheckpointError({ file, message: `cannot read: ${e.message}` })))
    const out: Array<StepMetrics> = []
    const lines = text.split("\n")
    for (let i = 0; i < lines.length; i++) {
      if (lines[i]!.trim() === "") continue
      const json = yield* parseJson(lines[i]!, file).pipe(Effect.mapError(() => new CheckpointError({ file, field: `line ${i + 1}`, message: `line ${i + 1} is not JSON` })))
      yield* Schema.decodeUnknownEffect(MetricsLine)(json).pipe(
        Effect.mapError(() => new CheckpointError({ file, field: `line ${i + 1}`, message: `line ${i + 1}: expected a metrics record with a whole-number "step"` }))
      )
      out.push(json as StepMetrics)
    }
    return out
  })

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
    /** The splits (default: SOTU, `Data.sotuData`); with `info`, it is recorded in the checkpoint and checked on resume. */
    readonly data?: { readonly train: Stream; readonly validation: Stream; readonly info?: DataInfo }
    /** Stop (with a checkpoint) after this many steps, keeping the schedule of `settings.steps`. */
    readonly until?: number
  }
) =>
  Effect.gen(function*() {
    const { description, tf } = yield* Tensors
    const fs = yield* FileSystem.FileSystem
    const path = yield* Path.Path
    const log = (s: string) => (options.quiet === true ? Effect.void : Progress.line(s))
    if (settings.seqLen > model.contextLength) {
      return yield* new SettingsError({ field: "seqLen", message: `seqLen ${settings.seqLen} exceeds the context length of ${model.name} (${model.contextLength} tokens); use a seqLen of at most ${model.contextLength}` })
    }
    yield* fitsInMemory(model, (yield* Tensors).name, "train")
    // the run directory: created, locked for this process, cleared of temporary files a killed run left
    yield* ensureDir(options.out)
    yield* lockRun(options.out)
    const stale = yield* removeStaleTemps(options.out)
    if (stale.length > 0) yield* log(`removed ${stale.length} temporary file(s) an interrupted run left: ${stale.join(", ")}`)
    // SIGINT/SIGTERM from here on stop at the end of a step, with a checkpoint (Stop.ts)
    yield* Stop.watch
    const checkpointFile = path.join(options.out, "checkpoint.safetensors")
    const metricsFile = path.join(options.out, "metrics.jsonl")
    const data = options.data ?? sotuData(settings.seed)
    const validation = validationBatches(data.validation, settings.batchSize, settings.seqLen, settings.evalBatches)
    const low = materialize(tf, model.analysis, settings.seed)
    const opt = newOptimizer(low)
    const sync = syncReads(tf)
    let start = 0
    let metrics: Array<StepMetrics> = []
    // the ratio controller (Chunker.ts) of a model with one concept stage: its state before each step
    const chunks = model.analysis.rows.filter((r) => r.kind === "chunk").map((r) => model.analysis.specs.get(r.path) as ChunkerSpec)
    const chunk = chunks.length === 1 ? chunks[0] : undefined
    // a converted model ramps from its source's function to R over rampSteps (train/Convert.ts)
    const rampSteps = model.concept?.spec.rampSteps
    const rampAt = (step: number) => (rampSteps === undefined ? undefined : Math.min(1, step / rampSteps))
    let control: RatioControl = initialRatioControl
    let changes: Array<SettingChange> = []
    let resumed: TrainResult["resumed"]
    if (options.resume) {
      const ck = yield* readChecked(checkpointFile)
      // the data must be the run's: its SHA-256 as recorded (checkpoints written before this record none)
      const recorded = ck.metadata.raw["data"]
      if (recorded !== undefined && data.info !== undefined) {
        const sha = yield* parseJson(recorded, `${checkpointFile} (metadata "data")`).pipe(
          Effect.map((j) => (typeof j === "object" && j !== null && typeof (j as { sha256?: unknown }).sha256 === "string" ? (j as { sha256: string }).sha256 : undefined))
        )
        if (sha !== undefined && sha !== data.info.sha256) return yield* new DataMismatch({ file: checkpointFile, recorded: sha, given: data.info.sha256 })
      }
      yield* restore(low, opt, checkpointFile, ck.tensors)
      start = ck.metadata.step
      opt.step = start
      // the model must be the checkpoint's (but for fields it lists as changing); settings may change, and are recorded
      const now = [
        ...yield* sameModel(model, ck.metadata, checkpointFile, start),
        ...(ck.metadata.settings === undefined ? [] : differences(ck.metadata.settings, settings).map((d): SettingChange => ({ step: start, ...d })))
      ]
      changes = [...ck.metadata.changes, ...now]
      for (const c of now) yield* log(`resumed with a changed setting: ${c.field} ${show(c.from)} → ${show(c.to)}`)
      // metrics: lines past the checkpoint's step (written before a kill) are dropped; missing ones are reported
      const old = yield* readMetrics(fs, metricsFile)
      metrics = old.filter((m) => m.step < start)
      const have = new Set(metrics.map((m) => m.step))
      const missingMetrics = Array.from({ length: start }, (_, i) => i).filter((i) => !have.has(i))
      if (missingMetrics.length > 0) {
        yield* Console.error(`warning: ${metricsFile} lacks the metrics of ${missingMetrics.length} step(s) before the checkpoint's step ${start} (first: step ${missingMetrics[0]}); they are not recomputed`)
      }
      resumed = { step: start, missingMetrics, changes: now }
      const storedControl = ck.metadata.raw["ratioControl"]
      if (storedControl !== undefined) {
        const where = `${checkpointFile} (metadata "ratioControl")`
        control = yield* parseJson(storedControl, where).pipe(
          Effect.flatMap(Schema.decodeUnknownEffect(Schema.Struct({ integral: Schema.Finite }))),
          Effect.mapError((e) => new CheckpointError({ file: where, message: `expected { "integral": number }: ${e.message}` }))
        )
      } else if (chunk !== undefined) {
        // a checkpoint written before the controller: its state from the restored metrics
        for (const m of metrics) {
          if (m.boundaryRate !== undefined) control = ratioControlStep(control, rampSpec(chunk, rampAt(m.step)).ratio, controlledRate(chunk, m.boundaryRate, m.thresholdRate ?? m.boundaryRate))
        }
      }
      yield* log(`resumed ${model.name} from ${checkpointFile} at step ${start}`)
      // the matmul kernels the run had chosen (webgpu, CONCEPTMOE_MATMUL=auto): the same ones again
      const stored = ck.metadata.matmul
      if (stored !== undefined) {
        const where = `${checkpointFile} (metadata "matmul")`
        const choices = yield* parseJson(stored, where).pipe(
          Effect.flatMap(Schema.decodeUnknownEffect(Schema.Record(Schema.String, Schema.String))),
          Effect.mapError((e) => new CheckpointError({ file: where, message: `expected an object of kernel names: ${e.message}` }))
        )
        const { taken, unknown } = takeChoices(tf, choices)
        if (taken > 0) yield* log(`matmul: the run's kernels for ${taken} product shape(s) taken from the checkpoint`)
        if (unknown.length > 0) yield* log(`matmul: unknown kernels in the checkpoint (${unknown.join(", ")}); those products are tuned again`)
      }
    }
    yield* log(`training ${model.name} on ${description}: ${settings.steps} steps × ${settings.batchSize}×${settings.seqLen} tokens, ${data.info === undefined || data.info.kind === "sotu" ? "SOTU" : data.info.source} train ${data.train.tokens.length.toLocaleString("en-US")} bytes`)
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
        const loss = checked ?? (sync ? evaluate(low, probe, rampAt(step - 1)) : yield* Effect.promise(() => evaluateAsync(low, probe, rampAt(step - 1)))).bitsPerByte
        const tensors = yield* Effect.promise(() => checkpointTensors(low, opt))
        const bad = Number.isFinite(loss) ? [...tensors].find(([, t]) => !t.data.every(Number.isFinite))?.[0] : undefined
        if (!Number.isFinite(loss) || bad !== undefined) {
          return yield* new DivergedError({ step, loss, checkpoint: lastCheckpoint, checkpointStep: lastStep, during: "checkpoint", ...(bad === undefined ? {} : { tensor: bad }) })
        }
        const metadata: Record<string, string> = {
          step: String(step),
          model: model.name,
          format: "conceptmoe/v1",
          ...(Object.keys(tunedChoices()).length > 0 ? { matmul: JSON.stringify(tunedChoices()) } : {}),
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
    let windowTokens = 0
    let windowDropped = 0
    const windowExperts = { routed: 0, dropped: 0 }
    let windowStart = performance.now()
    let totalTokens = 0
    let totalTime = 0
    const end = Math.min(settings.steps, options.until ?? settings.steps)
    // webgpu: steps are recorded once and replayed where the model allows it (Captured.ts)
    const trainer = sync ? undefined : capturedTrainer(low, opt, settings, settings.batchSize, settings.seqLen)
    // CPU backends: the batch's rows split over worker threads (Parallel.ts) when threads > 1
    const threads = sync ? trainingThreads(settings, tf.getBackend()) : 1
    const parallel = threads > 1 ? yield* Effect.promise(() => parallelTrainer(low, opt, model.config, settings, threads)) : undefined
    let mode = trainer?.mode().mode
    for (let step = start; step < end; step++) {
      const batch = trainBatch(data.train, settings.batchSize, settings.seqLen, settings.seed, step)
      const used = control
      // the trainer's state this step's passes take (Step.PassOptions)
      const pass: PassOptions = { ramp: rampAt(step), ...(chunk === undefined ? {} : { ratioControl: used }) }
      const t0 = performance.now()
      const r = trainer !== undefined
        ? yield* Effect.promise(() => trainer.step(batch, step, { pass }))
        : parallel !== undefined
        ? yield* Effect.promise(() => parallel.step(batch, step, pass))
        : trainStep(low, opt, batch, settings, step, pass)
      const now = trainer?.mode()
      if (step === start + 1 && trainer !== undefined && trainer.tuned().length > 0) yield* log(`matmul: ${describeTuning(trainer.tuned())}`)
      if (now !== undefined && now.mode !== mode) {
        mode = now.mode
        if (now.mode === "replay") yield* log(`steps from ${step + 2} on replay a recorded step (${now.dispatches} GPU dispatches)`)
        if (now.mode === "eager") yield* log(`steps run through tfjs: ${now.reason}`)
      }
      const dt = performance.now() - t0
      totalTime += dt
      totalTokens += batch.rows * batch.length
      windowTokens += batch.rows * batch.length
      windowDropped += "dropped" in r ? r.dropped ?? 0 : 0
      const experts = "expertPairs" in r && r.expertPairs !== undefined && r.expertPairs > 0 ? { routed: r.expertPairs, dropped: r.expertDropped ?? 0 } : undefined
      windowExperts.routed += experts?.routed ?? 0
      windowExperts.dropped += experts?.dropped ?? 0
      if (!Number.isFinite(r.loss)) {
        trainer?.dispose()
        return yield* new DivergedError({ step, loss: r.loss, checkpoint: lastCheckpoint, checkpointStep: lastStep, during: "step" })
      }
      const F = r.concepts > 0 ? r.concepts / r.tokens : undefined
      // the rate the controller holds (Chunker.controlledRate): sampled, or its mean with the rate at p ≥ ½
      const held = chunk === undefined || F === undefined ? undefined : controlledRate(chunk, F, r.thresholdConcepts / r.tokens)
      if (chunk !== undefined && held !== undefined) control = ratioControlStep(control, rampSpec(chunk, rampAt(step)).ratio, held)
      const last = step === end - 1
      const doEval = (step + 1) % settings.evalEvery === 0 || last
      const val = !doEval ? undefined : sync ? evaluate(low, validation, rampAt(step)) : yield* Effect.promise(() => evaluateAsync(low, validation, rampAt(step)))
      const m: StepMetrics = {
        step,
        loss: r.loss,
        ce: r.ce,
        aux: r.aux,
        lr: r.lr,
        tokensPerSecond: (batch.rows * batch.length) / (dt / 1000),
        ...(F === undefined ? {} : { compression: r.tokens / r.concepts, boundaryRate: F, boundaryProb: r.boundaryProbSum / r.tokens, thresholdRate: r.thresholdConcepts / r.tokens }),
        ...(held === undefined || chunk === undefined ? {} : { ratioLoss: ratioLossValue(rampSpec(chunk, rampAt(step)), used, held, r.boundaryProbSum / r.tokens) }),
        ...("dropped" in r && r.dropped !== undefined && r.dropped > 0 ? { droppedBoundaries: r.dropped } : {}),
        ...(experts === undefined || experts.dropped === 0 ? {} : { droppedExpertPairs: experts.dropped / experts.routed }),
        ...(val === undefined ? {} : { valBitsPerByte: val.bitsPerByte }),
        ...(val?.compression === undefined ? {} : { valCompression: val.compression })
      }
      metrics.push(m)
      if (options.quiet !== true) yield* Progress.tick(model.name, step + 1, end)
      if ((step + 1) % settings.logEvery === 0 || doEval || step === start) {
        const now = performance.now()
        const tps = windowTokens / ((now - windowStart) / 1000)
        windowTokens = 0
        windowStart = now
        yield* log(
          `step ${String(step + 1).padStart(5)}/${settings.steps}  loss ${r.loss.toFixed(4)}  ${tps.toFixed(0)} tok/s  lr ${r.lr.toExponential(2)}` +
            (m.compression === undefined ? "" : `  R ${m.compression.toFixed(2)}  F ${m.boundaryRate!.toFixed(3)}  F(p≥½) ${m.thresholdRate!.toFixed(3)}  G ${m.boundaryProb!.toFixed(3)}`) +
            (m.ratioLoss === undefined ? "" : `  ratio loss ${m.ratioLoss.toFixed(4)}`) +
            (windowDropped === 0 ? "" : `  ${windowDropped} sampled boundaries dropped (concept slots full; conceptCapacity)`) +
            (windowExperts.dropped === 0 ? "" : `  ${(100 * windowExperts.dropped / windowExperts.routed).toFixed(1)}% of token-expert pairs dropped (expert slots full; expertCapacity)`) +
            (val === undefined ? "" : `  val ${val.bitsPerByte.toFixed(4)} bits/byte`) +
            (val?.compression === undefined ? "" : `  val R ${val.compression.toFixed(2)} (p ≥ ½)`)
        )
        windowDropped = 0
        windowExperts.routed = 0
        windowExperts.dropped = 0
      }
      if ((step + 1) % settings.checkpointEvery === 0 || last) yield* save(step + 1, val?.bitsPerByte)
      // a signal (Stop.ts) is acted on here, between steps: the step is committed, then the run stops
      const signal = yield* Stop.poll
      if (signal !== undefined && !last) {
        if (lastStep !== step + 1) yield* save(step + 1, val?.bitsPerByte)
        trainer?.dispose()
        return yield* new Stop.Stopped({ signal, step: step + 1, steps: settings.steps, out: options.out, checkpoint: checkpointFile })
      }
    }
    trainer?.dispose()
    if (parallel !== undefined) yield* Effect.promise(() => parallel.dispose())
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
    yield* commit([{ file: path.join(options.out, "loss.svg"), bytes: svg }])
    const finalVal = [...metrics].reverse().find((m) => m.valBitsPerByte !== undefined)?.valBitsPerByte ?? NaN
    release(low)
    for (const v of [...opt.m.values(), ...opt.v.values()]) v.dispose()
    return {
      metrics,
      finalValBitsPerByte: finalVal,
      checkpoint: checkpointFile,
      tokensPerSecond: totalTime > 0 ? totalTokens / (totalTime / 1000) : 0,
      ...(chunks.length === 0 ? {} : { compression: compressionSummary(metrics, { steps: settings.steps }) }),
      ...(resumed === undefined ? {} : { resumed })
    } satisfies TrainResult
  }).pipe(Effect.scoped)

export { CheckpointError }
