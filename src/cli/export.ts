/**
 * `conceptmoe export <config | training config | run directory> --to pytorch --out DIR`.
 *
 * @since 0.4.0
 */
import { Console, Effect, FileSystem, Option, Path, Schema } from "effect"
import { Argument, Command, Flag } from "effect/cli"
import { torchTensors, writeExport } from "../export/Export.ts"
import { perturb, reference, referenceBatch } from "../export/Reference.ts"
import { loadTrained } from "../infer/Generate.ts"
import { type LoadedModel, loadModel, readJson } from "../models/Load.ts"
import { layer as backendLayer, Tensors } from "../runtime/Backend.ts"
import { fitsInMemory } from "../runtime/Memory.ts"
import { materialize, release } from "../runtime/Lower.ts"
import { encode } from "../train/Checkpoint.ts"
import { byteTokenizer, sotuSplits } from "../train/Data.ts"
import { TrainSettings } from "../train/Train.ts"
import { blocks, format, handled, UsageError, withBlocks } from "./shared.ts"
import { loadTrainConfig } from "./train.ts"

export const exportCommand = Command.make(
  "export",
  {
    source: Argument.String("source").pipe(
      Argument.withDescription("a model config, a training config ({ model, ...settings }), or a run directory / checkpoint.safetensors written by `conceptmoe train`")
    ),
    to: Flag.Literals("to", ["pytorch"]).pipe(Flag.withDescription("the target framework")),
    out: Flag.String("out").pipe(Flag.withDescription("the directory to write (must not exist, or be empty)")),
    seed: Flag.Int("seed").pipe(Flag.withDescription("parameter seed when exporting a config (not a checkpoint)"), Flag.withDefault(0)),
    data: Flag.Boolean("data").pipe(Flag.withDescription("also write the SOTU training and validation streams (bytes) for train.py"), Flag.withDefault(false)),
    withReference: Flag.Boolean("reference").pipe(
      Flag.withDescription("perturb the weights and write reference logits, loss and gradients of this runtime (cpu) for `python -m conceptmoe_torch.check`"),
      Flag.withDefault(false)
    ),
    config: Flag.String("config").pipe(Flag.withDescription("the model config, for checkpoints that do not store theirs"), Flag.optional),
    blocks,
    format
  },
  Effect.fn("export")(function*(f) {
    const fs = yield* FileSystem.FileSystem
    const path = yield* Path.Path
    const info = yield* fs.stat(f.source).pipe(Effect.mapError(() => new UsageError({ message: `${f.source}: no such config, run directory or checkpoint` })))
    const isCheckpoint = info.type === "Directory" || f.source.endsWith(".safetensors")
    const result = yield* withBlocks(f.blocks, Effect.gen(function*() {
      const { tf } = yield* Tensors
      let model: LoadedModel
      let settings: TrainSettings = Schema.decodeUnknownSync(TrainSettings)({})
      let step = 0
      let low
      if (isCheckpoint) {
        const t = yield* loadTrained(f.source, Option.getOrUndefined(f.config))
        model = t.model
        low = t.low
        step = t.step
        const trainFile = info.type === "Directory" ? path.join(f.source, "train-config.json") : undefined
        if (trainFile !== undefined && (yield* fs.exists(trainFile))) settings = (yield* loadTrainConfig(trainFile)).settings
      } else {
        const json = yield* readJson(f.source)
        if (typeof json === "object" && json !== null && "model" in json) {
          const t = yield* loadTrainConfig(f.source)
          model = t.model
          settings = t.settings
        } else model = yield* loadModel(f.source)
        yield* fitsInMemory(model, (yield* Tensors).name, "run")
        low = materialize(tf, model.analysis, f.seed)
      }
      const refSeed = mixSeedOf(f.seed)
      let ref: ReturnType<typeof reference> | undefined
      if (f.withReference) {
        perturb(low, refSeed)
        ref = reference(tf, low, referenceBatch(vocabOf(model), 2, 24, refSeed), { seed: refSeed, balanceWeight: settings.balanceWeight })
      }
      const params = new Map<string, Float32Array>()
      for (const [p, v] of low.variables) params.set(p, v.dataSync() as Float32Array)
      release(low)
      const data = f.data ? sotuSplits(byteTokenizer, settings.seed) : undefined
      const graph = yield* writeExport(model, params, f.out, { settings: { ...settings, tokenizer: byteTokenizer.name }, ...(data === undefined ? {} : { data }), step })
      if (ref !== undefined) {
        const tensors = torchTensors(graph, ref.gradients)
        const named = new Map([...tensors].map(([k, v]) => [`grad/${k}`, v]))
        named.set("logits", { shape: ref.logitsShape, data: ref.logits })
        yield* fs.writeFile(path.join(f.out, "reference.safetensors"), encode(named, {}))
        yield* fs.writeFileString(path.join(f.out, "reference.json"), JSON.stringify(ref.reference))
      }
      return { model, graph, step }
    }).pipe(Effect.provide(backendLayer("cpu"))))
    const tensors = result.graph.params.filter((p) => p.file !== null).length
    if (f.format === "json") {
      const files = [...(yield* fs.readDirectory(f.out))].sort()
      yield* Console.log(JSON.stringify({
        model: result.model.name,
        step: isCheckpoint ? result.step : null,
        out: f.out,
        tensors,
        names: result.graph.names,
        files: files.map((name) => path.join(f.out, name))
      }, null, 2))
      return
    }
    yield* Console.log(
      `${result.model.name}${isCheckpoint ? ` (step ${result.step})` : ""}: wrote ${f.out}/{graph.json, model.safetensors, conceptmoe_torch/, train.py} ` +
        `(${tensors} tensors, ${result.graph.names === "native" ? "native names" : `Hugging Face names (${result.graph.names})`})`
    )
  }, handled)
).pipe(Command.withDescription("Export a model (a config, or a trained checkpoint) to a self-contained PyTorch directory: graph, weights, Python package, torchrun train.py."))

const mixSeedOf = (seed: number) => (seed * 2654435761 + 12345) >>> 1

/** The vocabulary of the model's embedding (256 when it has none: bytes). */
const vocabOf = (m: LoadedModel): number => {
  const row = m.analysis.rows.find((r) => r.kind === "embedding")
  return row === undefined ? 256 : (m.analysis.specs.get(row.path) as { vocab: number }).vocab
}
