/**
 * The standard tensor layout of a model, shared by the PyTorch export and the checkpoints: each
 * owned parameter under its file name (Hugging Face names where the model type has them, native
 * names otherwise: `Names.ts`, `Graph.ts`), in PyTorch layout (matrices `[out, in]`, rows in the
 * file's order), and the conversions between that layout and this runtime's (`[in, out]`).
 *
 * @since 0.6.0
 */
import { Effect, Schema } from "effect"
import type { LoadedModel } from "../models/Load.ts"
import { exportGraph, type ExportedGraph, type ExportedParam, UnsupportedKind } from "./Graph.ts"
import { hfNames, hfRow, hfRowOrder, type RowOrder } from "./Names.ts"

/** A tensor's shape and float32 values, as a safetensors file holds it. */
export interface TensorData {
  readonly shape: ReadonlyArray<number>
  readonly data: Float32Array
}

/** The export could not be written. */
export class ExportError extends Schema.TaggedError<ExportError>()("ExportError", {
  file: Schema.String,
  message: Schema.String
}) {}

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
