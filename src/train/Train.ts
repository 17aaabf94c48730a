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
import { type LoadedModel, parseJson } from "../models/Load.ts"
import { lineChart, toSvg } from "../report/Plots.ts"
import { Tensors } from "../runtime/Backend.ts"
import { type Lowered, materialize, release } from "../runtime/Lower.ts"
import { CheckpointError, read as readCheckpoint, type TensorData, write as writeCheckpoint } from "./Checkpoint.ts"
import { byteTokenizer, type Stream, sotuSplits, trainBatch, validationBatches } from "./Data.ts"
import { capturedTrainer } from "./Captured.ts"
import { describeTuning, takeChoices, tunedChoices } from "../runtime/MatMul.ts"
import { evaluate, evaluateAsync, newOptimizer, type Optimizer, syncReads, trainStep, type TrainSettings } from "./Step.ts"

export * from "./Step.ts"

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
  /** Sampled boundaries dropped for want of concept slots (webgpu's static-shape ConceptMoE steps). */
  readonly droppedBoundaries?: number
  /** Token-expert pairs dropped for want of expert slots, as a fraction of those routed (capacity dispatch, webgpu). */
  readonly droppedExpertPairs?: number
  readonly boundaryRate?: number
  readonly valBitsPerByte?: number
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
      // the matmul kernels the run had chosen (webgpu, CONCEPTMOE_MATMUL=auto): the same ones again
      const stored = ck.metadata["matmul"]
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
    yield* log(`training ${model.name} on ${description}: ${settings.steps} steps × ${settings.batchSize}×${settings.seqLen} tokens, SOTU train ${data.train.tokens.length.toLocaleString("en-US")} bytes`)
    let lastCheckpoint: string | null = options.resume ? checkpointFile : null
    const save = (step: number) =>
      Effect.gen(function*() {
        yield* writeCheckpoint(checkpointFile, yield* Effect.promise(() => checkpointTensors(low, opt)), {
          step: String(step),
          model: model.name,
          format: "conceptmoe/v1",
          ...(Object.keys(tunedChoices()).length > 0 ? { matmul: JSON.stringify(tunedChoices()) } : {}),
          config: JSON.stringify(model.config)
        })
        const lines = metrics.map((m) => JSON.stringify(m)).join("\n") + "\n"
        const tmp = `${metricsFile}.tmp-${process.pid}`
        yield* fs.writeFileString(tmp, lines)
        yield* fs.rename(tmp, metricsFile)
        lastCheckpoint = checkpointFile
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
    let mode = trainer?.mode().mode
    for (let step = start; step < end; step++) {
      const batch = trainBatch(data.train, settings.batchSize, settings.seqLen, settings.seed, step)
      const t0 = performance.now()
      const r = trainer === undefined ? trainStep(low, opt, batch, settings, step) : yield* Effect.promise(() => trainer.step(batch, step))
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
        return yield* new DivergedError({ step, loss: r.loss, checkpoint: lastCheckpoint })
      }
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
        ...("dropped" in r && r.dropped !== undefined && r.dropped > 0 ? { droppedBoundaries: r.dropped } : {}),
        ...(experts === undefined || experts.dropped === 0 ? {} : { droppedExpertPairs: experts.dropped / experts.routed }),
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
            (windowDropped === 0 ? "" : `  ${windowDropped} sampled boundaries dropped (concept slots full; conceptCapacity)`) +
            (windowExperts.dropped === 0 ? "" : `  ${(100 * windowExperts.dropped / windowExperts.routed).toFixed(1)}% of token-expert pairs dropped (expert slots full; expertCapacity)`) +
            (val === undefined ? "" : `  val ${val.bitsPerByte.toFixed(4)} bits/byte`)
        )
        windowDropped = 0
        windowExperts.routed = 0
        windowExperts.dropped = 0
      }
      if ((step + 1) % settings.checkpointEvery === 0 || last) yield* save(step + 1)
    }
    trainer?.dispose()
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
    release(low)
    for (const v of [...opt.m.values(), ...opt.v.values()]) v.dispose()
    return { metrics, finalValBitsPerByte: finalVal, checkpoint: checkpointFile, tokensPerSecond: totalTime > 0 ? totalTokens / (totalTime / 1000) : 0 } satisfies TrainResult
  })

export { CheckpointError }
