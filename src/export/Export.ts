/**
 * `conceptmoe export --to pytorch`: a self-contained directory a PyTorch user can train from.
 *
 * ```
 * DIR/graph.json             the analysed graph (see Graph.ts)
 * DIR/model.safetensors      the weights in PyTorch layout, Hugging Face names where the model has them
 * DIR/conceptmoe_torch/      the Python package that builds the torch.nn.Module of any graph
 * DIR/train.py               torchrun entry point (DDP by default, FSDP with --fsdp)
 * DIR/data/                  the training and validation token streams (SOTU, bytes), for train.py
 * ```
 *
 * The directory is written under a temporary name next to `DIR` and renamed when complete, so a
 * failed export leaves nothing half-written.
 *
 * @since 0.4.0
 */
import { Effect, FileSystem, Path } from "effect"
import { fileURLToPath } from "node:url"
import type { LoadedModel } from "../models/Load.ts"
import { nativeName, UnsupportedKind } from "../layout/Graph.ts"
import { ExportError, graphOf, torchTensors } from "../layout/Tensors.ts"
import { encode } from "../train/Checkpoint.ts"
import type { Stream } from "../train/Data.ts"

/** The Python package shipped with this library. */
export const pythonPackageDir = fileURLToPath(new URL("../../python/conceptmoe_torch", import.meta.url))

/** The export's entry point: `torchrun --nproc_per_node N train.py` (see `conceptmoe_torch/train.py`). */
const trainShim = `"""Train the exported model: torchrun --nproc_per_node N train.py [--fsdp] [--steps S] (see --help)."""
from conceptmoe_torch.train import main

if __name__ == "__main__":
    main()
`

/** Data files for `train.py`: tokens as little-endian int32, document starts as JSON. */
const streamFiles = (name: string, s: Stream): Array<[string, Uint8Array]> => [
  [`data/${name}.tokens.i32`, new Uint8Array(s.tokens.buffer, s.tokens.byteOffset, s.tokens.byteLength)],
  [`data/${name}.starts.json`, new TextEncoder().encode(JSON.stringify(s.starts))]
]

/**
 * Writes the export directory. `params`: each owned parameter's value in our layout, by path.
 * `settings`: the training settings `train.py` defaults to (the `conceptmoe train` schema).
 */
export const writeExport = Effect.fnUntraced(function*(
  model: LoadedModel,
  params: ReadonlyMap<string, Float32Array>,
  out: string,
  options: { readonly settings?: unknown; readonly data?: { readonly train: Stream; readonly validation: Stream }; readonly step?: number }
) {
  const fs = yield* FileSystem.FileSystem
  const path = yield* Path.Path
  const graph = graphOf(model)
  if (graph instanceof UnsupportedKind) return yield* graph
  if (yield* fs.exists(out).pipe(Effect.orElseSucceed(() => false))) {
    const entries = yield* fs.readDirectory(out).pipe(Effect.orElseSucceed(() => ["?"]))
    if (entries.length > 0) return yield* new ExportError({ file: out, message: "exists and is not empty; give a new --out directory" })
  }
  const tmp = `${out.replace(/[\\/]+$/, "")}.tmp-${process.pid}`
  const fail = (e: { readonly message: string }) => new ExportError({ file: out, message: e.message })
  const files: Array<[string, Uint8Array]> = [
    ["graph.json", new TextEncoder().encode(JSON.stringify({ ...graph, config: model.config, format_of: model.format, contextLength: model.contextLength }, null, 1))],
    ["model.safetensors", encode(torchTensors(graph, params), { format: "pt", conceptmoe: "export/1", names: graph.names, step: String(options.step ?? 0) })],
    ["train.py", new TextEncoder().encode(trainShim)],
    ["train_settings.json", new TextEncoder().encode(JSON.stringify(options.settings ?? {}, null, 1))],
    ...(options.data === undefined ? [] : [...streamFiles("train", options.data.train), ...streamFiles("validation", options.data.validation)])
  ]
  for (const [kind, source] of Object.entries(graph.userModules)) files.push([`conceptmoe_torch/user_${kind.replace(/[^A-Za-z0-9_]/g, "_")}.py`, new TextEncoder().encode(source)])
  yield* Effect.gen(function*() {
    yield* fs.remove(tmp, { recursive: true }).pipe(Effect.ignore)
    yield* fs.makeDirectory(tmp, { recursive: true })
    yield* fs.copy(pythonPackageDir, path.join(tmp, "conceptmoe_torch"))
    for (const junk of ["__pycache__", "blocks/__pycache__"]) yield* fs.remove(path.join(tmp, "conceptmoe_torch", junk), { recursive: true }).pipe(Effect.ignore)
    for (const [name, bytes] of files) {
      yield* fs.makeDirectory(path.dirname(path.join(tmp, name)), { recursive: true })
      yield* fs.writeFile(path.join(tmp, name), bytes)
    }
    yield* fs.remove(out, { recursive: true }).pipe(Effect.ignore)
    yield* fs.rename(tmp, out)
  }).pipe(Effect.mapError(fail), Effect.tapError(() => fs.remove(tmp, { recursive: true }).pipe(Effect.ignore)))
  return graph
})

export { nativeName }
export { ExportError, type FileParam, fromFileLayout, fromTorchTensors, graphOf, ourShape, toFileLayout, torchTensors, transposeLast } from "../layout/Tensors.ts"
