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
import { Effect, FileSystem, Path, Schema } from "effect"
import { fileURLToPath } from "node:url"
import type { LoadedModel } from "../models/Load.ts"
import { encode, type TensorData } from "../train/Checkpoint.ts"
import type { Stream } from "../train/Data.ts"
import { exportGraph, type ExportedGraph, type ExportedParam, nativeName, UnsupportedKind } from "./Graph.ts"
import { hfNames, hfRow, hfRowOrder, type RowOrder } from "./Names.ts"

/** The export could not be written. */
export class ExportError extends Schema.TaggedError<ExportError>()("ExportError", {
  file: Schema.String,
  message: Schema.String
}) {}

/** The Python package shipped with this library. */
export const pythonPackageDir = fileURLToPath(new URL("../../python/conceptmoe_torch", import.meta.url))

/** `x [..., a, b]` → `[..., b, a]`. */
export const transposeLast = (data: Float32Array, shape: ReadonlyArray<number>): Float32Array => {
  if (shape.length < 2) return data
  const a = shape[shape.length - 2]!
  const b = shape[shape.length - 1]!
  const out = new Float32Array(data.length)
  for (let base = 0; base < data.length; base += a * b) {
    for (let i = 0; i < a; i++) for (let j = 0; j < b; j++) out[base + j * a + i] = data[base + i * b + j]!
  }
  return out
}

/**
 * The analysed graph of a model, with Hugging Face names where its format has them. `anyKind`:
 * names and layouts even under block kinds without a PyTorch module (for checkpoints, which need
 * no module).
 */
export const graphOf = (model: LoadedModel, options?: { readonly anyKind?: boolean }): ExportedGraph | UnsupportedKind => {
  const hf = hfNames(model.format, model.analysis.params)
  return exportGraph(
    model.analysis,
    model.name,
    hf === undefined ? undefined : { scheme: model.format, of: (p) => hf.get(p.path), rows: (kind, spec, p) => hfRowOrder(model.format, kind, spec, p.name) },
    options
  )
}

/**
 * What the file layout of one parameter needs: its path, its name(s) in the file, its PyTorch shape,
 * whether it is transposed, and its row order. The exported graph's parameters have it, and so does
 * a standard-layout checkpoint's `layout` metadata (train/Checkpoint.ts).
 */
export type FileParam = Pick<ExportedParam, "path" | "file" | "torchShape" | "transposed" | "rowOrder">

/** Reorders the rows (axis 0) of `data`: to the file's order (`toFile`) or back to ours. */
const reorderRows = (data: Float32Array, rows: number, o: RowOrder, toFile: boolean): Float32Array => {
  const cols = data.length / rows
  const out = new Float32Array(data.length)
  for (let r = 0; r < rows; r++) {
    const f = hfRow(o, r)
    if (toFile) out.set(data.subarray(r * cols, (r + 1) * cols), f * cols)
    else out.set(data.subarray(f * cols, (f + 1) * cols), r * cols)
  }
  return out
}

/** A parameter's shape in this runtime's layout (`[in, out]` matrices), from its PyTorch shape. */
export const ourShape = (p: Pick<FileParam, "torchShape" | "transposed">): ReadonlyArray<number> => {
  const s = p.torchShape
  return p.transposed && s.length >= 2 ? [...s.slice(0, -2), s[s.length - 1]!, s[s.length - 2]!] : s
}

/** A parameter's value in our layout → PyTorch layout as stored in the file (transposed, rows reordered). */
export const toFileLayout = (p: FileParam, data: Float32Array): Float32Array => {
  const t = p.transposed ? transposeLast(data, ourShape(p)) : data
  return p.rowOrder === null ? t : reorderRows(t, p.torchShape[0]!, p.rowOrder, true)
}

/** The inverse of {@link toFileLayout}: the file's PyTorch layout → ours. */
export const fromFileLayout = (p: FileParam, data: Float32Array): Float32Array => {
  const t = p.rowOrder === null ? data : reorderRows(data, p.torchShape[0]!, p.rowOrder, false)
  return p.transposed ? transposeLast(t, p.torchShape) : t
}

/**
 * The tensors of `model.safetensors`: each owned parameter (ours, by path, `[in, out]` layout) in
 * PyTorch layout under its file name(s).
 */
export const torchTensors = (graph: { readonly params: ReadonlyArray<FileParam> }, params: ReadonlyMap<string, Float32Array>): Map<string, TensorData> => {
  const out = new Map<string, TensorData>()
  for (const p of graph.params) {
    if (p.file === null) continue
    const data = params.get(p.path)
    if (data === undefined) throw new Error(`no value for parameter ${p.path}`)
    const t = toFileLayout(p, data)
    if (typeof p.file === "string") out.set(p.file, { shape: p.torchShape, data: t })
    else {
      const slice = t.length / p.file.length
      p.file.forEach((name, e) => out.set(name, { shape: p.torchShape.slice(1), data: t.slice(e * slice, (e + 1) * slice) }))
    }
  }
  return out
}

/** The inverse of {@link torchTensors}: our layout by parameter path, from `model.safetensors` tensors. */
export const fromTorchTensors = (graph: { readonly params: ReadonlyArray<FileParam> }, tensors: ReadonlyMap<string, TensorData>, file: string) =>
  Effect.gen(function*() {
    const out = new Map<string, Float32Array>()
    const take = (p: FileParam, name: string, shape: ReadonlyArray<number>) => {
      const t = tensors.get(name)
      if (t === undefined) return Effect.fail(new ExportError({ file, message: `has no tensor ${name} (parameter ${p.path})` }))
      if (t.shape.join(",") !== shape.join(",")) return Effect.fail(new ExportError({ file, message: `${name} has shape [${t.shape}], expected [${shape}]` }))
      return Effect.succeed(t.data)
    }
    for (const p of graph.params) {
      if (p.file === null) continue
      let data: Float32Array
      if (typeof p.file === "string") data = yield* take(p, p.file, p.torchShape)
      else {
        data = new Float32Array(p.torchShape.reduce((a, b) => a * b, 1))
        const slice = data.length / p.file.length
        for (const [e, name] of p.file.entries()) data.set(yield* take(p, name, p.torchShape.slice(1)), e * slice)
      }
      out.set(p.path, fromFileLayout(p, data))
    }
    return out
  })

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
