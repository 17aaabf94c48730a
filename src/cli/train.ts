/**
 * `conceptmoe train` and `conceptmoe verify`.
 *
 * @since 0.1.0
 */
import { Console, Effect, Option, Path, Schema } from "effect"
import { Argument, Command, Flag } from "effect/cli"
import { formatNumber, renderTable } from "../internal/Table.ts"
import { attemptPromise } from "../internal/RunErrors.ts"
import { loadTrained } from "../infer/Generate.ts"
import { type LoadedModel, loadModel, modelFromJson, readJson } from "../models/Load.ts"
import { ConfigError } from "../models/Errors.ts"
import { layer as backendLayer, syncReads, Tensors } from "../runtime/Backend.ts"
import { fitsInMemory } from "../runtime/Memory.ts"
import { materialize, release } from "../runtime/Lower.ts"
import { verify as verifyModel, verifyAsync } from "../runtime/Verify.ts"
import { byteTokenizer, sotuSplits, validationBatches } from "../train/Data.ts"
import { train as trainModel, type TrainResult, TrainSettings } from "../train/Train.ts"
import * as Stop from "../train/Stop.ts"
import * as Progress from "../internal/Progress.ts"
import { problemsOf, formatPath } from "../graph/Spec.ts"
import { limits } from "../graph/Limits.ts"
import { blocks, flagLimits, format, handled, intFlag, positive, UsageError, withBlocks } from "./shared.ts"
import { dataFlag, splitsFor, valFraction } from "./data.ts"

export const backend = Flag.String("backend").pipe(
  Flag.withDescription("wasm (default), cpu, webgpu or tensorflow; or set CONCEPTMOE_BACKEND"),
  Flag.optional
)

const withBackend = <A, E, R>(name: Option.Option<string>, self: Effect.Effect<A, E, R>) =>
  self.pipe(Effect.provide(backendLayer(Option.getOrUndefined(name))))

/** A training config file: the model (inline or a path relative to the file) and the settings. */
const TrainFile = Schema.Struct({ model: Schema.Unknown })

/** Reads a training config: its model, loaded, and its settings, decoded. */
export const loadTrainConfig = Effect.fnUntraced(function*(file: string) {
  const path = yield* Path.Path
  const json = yield* readJson(file)
  const top = yield* Schema.decodeUnknownEffect(TrainFile)(json).pipe(
    Effect.mapError(() => new ConfigError({ file, reason: "invalid", problems: [{ field: "model", message: "is required: a model config object or a path to one" }] }))
  )
  const { model: _m, ...rest } = json as Record<string, unknown>
  const settings = yield* Schema.decodeUnknownEffect(TrainSettings, { errors: "all" })(rest).pipe(
    Effect.mapError((e) => new ConfigError({ file, reason: "invalid", problems: problemsOf(e.issue).map((p) => ({ field: formatPath(p.path), message: p.message })) }))
  )
  const model: LoadedModel = typeof top.model === "string"
    ? yield* loadModel(path.resolve(path.dirname(file), top.model))
    : yield* modelFromJson(top.model, file)
  return { model, settings }
})

/**
 * What `train --format json` prints: the numbers of the table's last line, the last step's metrics,
 * every evaluation, the compression of a ConceptMoE, a resume's changes, and the files written.
 */
export const trainSummary = (model: string, out: string, steps: number, r: TrainResult) => ({
  model,
  out,
  steps,
  finalValBitsPerByte: r.finalValBitsPerByte,
  tokensPerSecond: r.tokensPerSecond,
  last: r.metrics.at(-1) ?? null,
  // steps as in metrics.jsonl (from 0; the progress lines count from 1)
  evaluations: r.metrics.filter((m) => m.valBitsPerByte !== undefined).map((m) => ({
    step: m.step,
    valBitsPerByte: m.valBitsPerByte!,
    ...(m.valCompression === undefined ? {} : { valCompression: m.valCompression })
  })),
  ...(r.compression === undefined ? {} : { compression: r.compression }),
  ...(r.resumed === undefined ? {} : { resumed: r.resumed }),
  files: ["checkpoint.safetensors", "optimizer.safetensors", "metrics.jsonl", "loss.svg"].map((f) => `${out}/${f}`)
})

export const train = Command.make(
  "train",
  {
    config: Flag.String("config").pipe(Flag.withDescription("training config: { model, seqLen, batchSize, steps, seed, optimizer, ... }")),
    backend,
    out: Flag.String("out").pipe(Flag.withDescription("run directory (default runs/<model name>)"), Flag.optional),
    resume: Flag.Boolean("resume").pipe(Flag.withDescription("continue from the checkpoint in the run directory"), Flag.withDefault(false)),
    steps: intFlag("steps", 1, flagLimits.steps).pipe(Flag.withDescription("override the number of steps"), Flag.optional),
    data: dataFlag,
    valFraction,
    format,
    blocks
  },
  Effect.fn("train")(function*(f) {
    yield* positive("steps", f.steps)
    const { model, settings: base } = yield* withBlocks(f.blocks, loadTrainConfig(f.config))
    const settings = Option.isSome(f.steps) ? { ...base, steps: f.steps.value } : base
    const out = Option.getOrElse(f.out, () => `runs/${model.name}`)
    // --data: the user's bytes, refused when unreadable, empty or shorter than a batch (a resume checks their SHA-256)
    const data = Option.isSome(f.data) || Option.isSome(f.valFraction)
      ? yield* splitsFor(f.data, f.valFraction, settings.batchSize, settings.seqLen)(settings.seed)
      : undefined
    const again = [
      "conceptmoe train",
      ...Stop.shellArgs(["--config", f.config, "--out", out, ...(Option.isSome(f.blocks) ? ["--blocks", f.blocks.value] : []), ...(Option.isSome(f.backend) ? ["--backend", f.backend.value] : []), ...(Option.isSome(f.steps) ? ["--steps", String(f.steps.value)] : []), ...(Option.isSome(f.data) ? ["--data", f.data.value] : []), ...(Option.isSome(f.valFraction) ? ["--val-fraction", String(f.valFraction.value)] : [])]),
      "--resume"
    ].join(" ")
    const json = f.format === "json"
    const r = yield* withBackend(f.backend, trainModel(model, settings, { out, resume: f.resume, ...(json ? { quiet: true } : {}), ...(data === undefined ? {} : { data }) })).pipe(
      // a run that ends early (a signal, divergence) leaves no progress bar under its message
      Effect.ensuring(Progress.clear),
      Effect.catchTag("Stopped", (e) => Stop.report(e, `continue with: ${again}`).pipe(Effect.as(undefined)))
    )
    if (r === undefined) return
    if (json) {
      yield* Console.log(JSON.stringify(trainSummary(model.name, out, settings.steps, r), null, 2))
      return
    }
    yield* Console.log(`final validation ${r.finalValBitsPerByte.toFixed(4)} bits/byte; ${r.tokensPerSecond.toFixed(0)} tokens/s; wrote ${out}/{checkpoint.safetensors,optimizer.safetensors,metrics.jsonl,loss.svg}`)
  }, handled)
).pipe(Command.withDescription("Train a model on the State of the Union corpus, or on your own bytes with --data (byte-level), with checkpoints, metrics and a loss plot."))

export const verify = Command.make(
  "verify",
  {
    config: Argument.String("config").pipe(
      Argument.withDescription("a model config (with --checkpoint: the model's config, for checkpoints that do not store theirs)"),
      Argument.optional
    ),
    checkpoint: Flag.String("checkpoint").pipe(
      Flag.withDescription("verify a trained model: a run directory or checkpoint.safetensors (conceptmoe train, convert, import, or the exported train.py), with its weights"),
      Flag.optional
    ),
    backend,
    format,
    seqLen: intFlag("seq-len", 1, limits.seqLen).pipe(Flag.withDescription("tokens per row"), Flag.withDefault(128)),
    batch: intFlag("batch", 1, flagLimits.batch).pipe(Flag.withDescription("rows"), Flag.withDefault(4)),
    seed: intFlag("seed", 0, flagLimits.seed).pipe(Flag.withDescription("parameter seed (configs only)"), Flag.withDefault(0)),
    blocks
  },
  Effect.fn("verify")(function*(f) {
    yield* positive("seq-len", Option.some(f.seqLen))
    yield* positive("batch", Option.some(f.batch))
    if (Option.isNone(f.config) && Option.isNone(f.checkpoint)) {
      return yield* new UsageError({ message: "verify needs a model config or --checkpoint RUN (a run directory or checkpoint.safetensors)" })
    }
    const checkpoint = Option.getOrUndefined(f.checkpoint)
    const { model, ...report } = yield* withBackend(
      f.backend,
      withBlocks(f.blocks, Effect.gen(function*() {
        const { description, name, tf } = yield* Tensors
        const loaded = checkpoint === undefined
          ? yield* Effect.flatMap(loadModel(Option.getOrThrow(f.config)), (model) =>
            Effect.map(fitsInMemory(model, name, "run"), () => ({ model, low: materialize(tf, model.analysis, f.seed), step: undefined })))
          : yield* loadTrained(checkpoint, Option.getOrUndefined(f.config))
        const data = sotuSplits(byteTokenizer, 0)
        const b = validationBatches(data.validation, f.batch, f.seqLen, 1)[0]!
        const r = yield* attemptPromise(() => (syncReads(tf) ? Promise.resolve(verifyModel(loaded.low, b)) : verifyAsync(loaded.low, b))).pipe(
          Effect.ensuring(Effect.sync(() => release(loaded.low)))
        )
        return { model: loaded.model, backend: description, ...(loaded.step === undefined ? {} : { checkpoint, step: loaded.step }), ...r }
      }))
    )
    if (f.format === "json") {
      yield* Console.log(JSON.stringify(report, null, 2))
      return
    }
    const eq = (a: number, b: number) => (a === b ? "equal" : `differ by ${formatNumber(b - a)}`)
    const weights = report.step === undefined ? "" : ` with the weights of ${report.checkpoint} (step ${report.step})`
    yield* Console.log(`${model.name} on ${report.backend}${weights}: one forward pass of ${f.batch}×${f.seqLen} SOTU validation bytes\n`)
    yield* Console.log(renderTable(["quantity", "static", "runtime / executed", ""], [
      ["parameters", formatNumber(report.params.static), formatNumber(report.params.runtime), eq(report.params.static, report.params.runtime)],
      [
        report.compression === undefined ? "weight-matmul FLOPs" : "weight-matmul FLOPs (at measured R)",
        formatNumber(report.flops.staticAtMeasured),
        formatNumber(report.flops.executed),
        eq(report.flops.staticAtMeasured, report.flops.executed)
      ],
      ["attention-map FLOPs (no window)", formatNumber(report.flops.attentionMapDense), formatNumber(report.flops.attentionMapExecuted), eq(report.flops.attentionMapDense, report.flops.attentionMapExecuted)]
    ], [1, 2]))
    if (report.compression !== undefined) {
      yield* Console.log(`\ncompression: target R ${report.compression.target}, measured ${report.compression.actual.toFixed(3)} (${report.compression.concepts} concepts from ${report.compression.tokens} tokens; ${report.step === undefined ? "untrained" : "trained"} boundaries)`)
      yield* Console.log(`static FLOPs at the target R: ${formatNumber(report.flops.static)}; dechunk EMA as a matrix product: ${formatNumber(report.flops.otherExecuted)} (not a model FLOP)`)
    }
  }, handled)
).pipe(Command.withDescription("Run one forward pass and compare executed matmul FLOPs and runtime parameters with the static cost."))

