/**
 * Resuming a run: a checkpoint's tensors checked against the model and assigned, the model and
 * settings compared with those the checkpoint records, the metrics before its step, the ratio
 * controller's state and the matmul kernels the run had chosen.
 *
 * @since 0.6.0
 */
import { Console, Effect, FileSystem, Schema } from "effect"
import type * as TF from "@tensorflow/tfjs"
import { type ChunkerSpec, controlledRate, initialRatioControl, rampSpec, type RatioControl, ratioControlStep } from "../blocks/Chunker.ts"
import { type LoadedModel, modelFromJson, parseJson } from "../models/Load.ts"
import type { Lowered } from "../runtime/Lower.ts"
import { backendOps } from "../runtime/Ops.ts"
import { CheckpointError, type Metadata, readChecked, type SettingChange, type TensorData } from "./Checkpoint.ts"
import { DataMismatch, type DataInfo } from "./Data.ts"
import { readMetrics, type StepMetrics } from "./Metrics.ts"
import type { Optimizer, TrainSettings } from "./Step.ts"

/** A checkpoint that does not belong to this model. */
export class CheckpointMismatch extends Schema.TaggedError<CheckpointMismatch>()("CheckpointMismatch", {
  file: Schema.String,
  message: Schema.String
}) {}

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

export const restore = (low: Lowered, opt: Optimizer, file: string, tensors: Map<string, TensorData>) =>
  assignChecked(low, file, tensors, [["param", (_, w) => w], ["adam.m", (p) => opt.m.get(p)!], ["adam.v", (p) => opt.v.get(p)!]])

/** Loads a checkpoint's parameters into a lowered model (no optimizer state), checking names and shapes. */
export const loadParams = (low: Lowered, file: string, tensors: ReadonlyMap<string, TensorData>) =>
  assignChecked(low, file, tensors, [["param", (_, w) => w]])

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

/**
 * The ratio controller after a step with metrics `m` (`Chunker.ratioControlStep` on the rate it
 * holds); unchanged for a model without one concept stage. The trainer folds it over its steps, and
 * a resume over the restored metrics of a checkpoint written before the controller.
 */
export const nextControl = (control: RatioControl, chunk: ChunkerSpec | undefined, ramp: number | undefined, m: StepMetrics): RatioControl =>
  chunk === undefined || m.boundaryRate === undefined
    ? control
    : ratioControlStep(control, rampSpec(chunk, ramp).ratio, controlledRate(chunk, m.boundaryRate, m.thresholdRate ?? m.boundaryRate))

/** What a resumed run continues from. */
export interface Resumed {
  readonly start: number
  /** The metrics of the steps before `start` (lines written past it by a killed run are dropped). */
  readonly metrics: Array<StepMetrics>
  /** Every setting change of the run so far, the ones made now included. */
  readonly changes: Array<SettingChange>
  /** The changes made now, and the steps before `start` whose metrics are missing. */
  readonly now: ReadonlyArray<SettingChange>
  readonly missingMetrics: ReadonlyArray<number>
  readonly control: RatioControl
}

/**
 * Continues a run from `checkpointFile`: refuses other data (by SHA-256) or another model (but for
 * the fields the checkpoint lists as changing), assigns parameters and optimizer state, reads the
 * metrics before the checkpoint's step, and restores the ratio controller (from the checkpoint,
 * or folded over those metrics for a checkpoint written before it) and the chosen matmul kernels.
 */
export const resumeRun = (args: {
  readonly model: LoadedModel
  readonly settings: TrainSettings
  readonly low: Lowered
  readonly opt: Optimizer
  readonly checkpointFile: string
  readonly metricsFile: string
  readonly data: { readonly info?: DataInfo | undefined }
  readonly chunk: ChunkerSpec | undefined
  readonly rampAt: (step: number) => number | undefined
  readonly log: (line: string) => Effect.Effect<void>
}) =>
  Effect.gen(function*() {
    const { model, settings, low, opt, checkpointFile, metricsFile, data, chunk, rampAt, log } = args
    const { tf } = low
    const fs = yield* FileSystem.FileSystem
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
    const start = ck.metadata.step
    opt.step = start
    // the model must be the checkpoint's (but for fields it lists as changing); settings may change, and are recorded
    const now = [
      ...yield* sameModel(model, ck.metadata, checkpointFile, start),
      ...(ck.metadata.settings === undefined ? [] : differences(ck.metadata.settings, settings).map((d): SettingChange => ({ step: start, ...d })))
    ]
    const changes = [...ck.metadata.changes, ...now]
    for (const c of now) yield* log(`resumed with a changed setting: ${c.field} ${show(c.from)} → ${show(c.to)}`)
    // metrics: lines past the checkpoint's step (written before a kill) are dropped; missing ones are reported
    const old = yield* readMetrics(fs, metricsFile)
    const metrics = old.filter((m) => m.step < start)
    const have = new Set(metrics.map((m) => m.step))
    const missingMetrics = Array.from({ length: start }, (_, i) => i).filter((i) => !have.has(i))
    if (missingMetrics.length > 0) {
      yield* Console.error(`warning: ${metricsFile} lacks the metrics of ${missingMetrics.length} step(s) before the checkpoint's step ${start} (first: step ${missingMetrics[0]}); they are not recomputed`)
    }
    let control: RatioControl = initialRatioControl
    const storedControl = ck.metadata.raw["ratioControl"]
    if (storedControl !== undefined) {
      const where = `${checkpointFile} (metadata "ratioControl")`
      control = yield* parseJson(storedControl, where).pipe(
        Effect.flatMap(Schema.decodeUnknownEffect(Schema.Struct({ integral: Schema.Finite }))),
        Effect.mapError((e) => new CheckpointError({ file: where, message: `expected { "integral": number }: ${e.message}` }))
      )
    } else if (chunk !== undefined) {
      // a checkpoint written before the controller: its state from the restored metrics
      for (const m of metrics) control = nextControl(control, chunk, rampAt(m.step), m)
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
      const { taken, unknown } = backendOps(tf).kernelChoices?.take(choices) ?? { taken: 0, unknown: [] }
      if (taken > 0) yield* log(`matmul: the run's kernels for ${taken} product shape(s) taken from the checkpoint`)
      if (unknown.length > 0) yield* log(`matmul: unknown kernels in the checkpoint (${unknown.join(", ")}); those products are tuned again`)
    }
    return { start, metrics, changes, now, missingMetrics, control } satisfies Resumed
  })
