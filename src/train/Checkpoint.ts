/**
 * Checkpoints in the safetensors format: an 8-byte little-endian header length, a JSON header
 * (`name → {dtype, shape, data_offsets}` and string `__metadata__`), then the raw little-endian
 * float32 data. Written to a temporary file, fsynced and renamed (`RunDir.commit`), so a crash never
 * leaves a half-written checkpoint. The header and the metadata are decoded with Schemas when read:
 * a bad `step` (`"NaN"`, `"3.5"`, `"-5"`, `""`) is a {@link CheckpointError} naming the file and field.
 *
 * **Two layouts.** A run directory's checkpoint is two files ({@link checkpointFiles}):
 *
 * - `checkpoint.safetensors`, the model in the standard layout: the tensors and names of an export's
 *   `model.safetensors` (`layout/Tensors.ts`: Hugging Face names where the model type has them, the
 *   native name `encoder.0.mixer.attn.q.weight` otherwise; matrices `[out, in]` as `torch.nn.Linear`
 *   keeps them; experts one tensor each), with metadata `format: "pt"`, `conceptmoe: "checkpoint/2"`,
 *   `step`, `model`, `config`, `names` (the naming scheme), `layout` (each parameter path's file
 *   name(s), PyTorch shape, transposition and row order, so the file reads back without building
 *   the model), `optimizer` (the optimizer file's name beside it) and `pair`;
 * - `optimizer.safetensors`, the training state: AdamW's moments under `exp_avg/<name>` and
 *   `exp_avg_sq/<name>` (the model file's names and layout), metadata `conceptmoe: "optimizer/2"`,
 *   `step`, `pair`, and the run's settings, changes, data record, ratio controller and matmul kernels.
 *
 * `pair` is the SHA-256 of the model file's tensor data: the two files belong together when their
 * `pair` and `step` agree. The optimizer file is renamed first and the model file last (the commit
 * point); the optimizer file it replaces is kept as `optimizer.prev.safetensors` until the model file
 * is renamed, so a kill between the two renames leaves the previous model with its own optimizer
 * state, which {@link read} takes. The older single-file layout (`param/<path>`, `adam.m/<path>`,
 * `adam.v/<path>`, matrices `[in, out]`, `format: "conceptmoe/v1"`) is still read. {@link read}
 * returns either layout in the runtime's view: `param/…`, `adam.m/…`, `adam.v/…` by graph path,
 * matrices `[in, out]`, the two files' metadata in one record.
 *
 * @since 0.1.0
 */
import { Effect, FileSystem, Schema } from "effect"
import { createHash } from "node:crypto"
import * as fs from "node:fs"
import * as nodePath from "node:path"
import { type FileParam, fromTorchTensors, graphOf, ourShape, type TensorData, torchTensors } from "../layout/Tensors.ts"
import { UnsupportedKind } from "../layout/Graph.ts"
import { formatPath, problemsOf } from "../graph/Spec.ts"
import type { LoadedModel } from "../models/Load.ts"
import { commit, type CommitFile } from "./RunDir.ts"

export const TensorEntry = Schema.Struct({
  dtype: Schema.Literal("F32"),
  shape: Schema.Array(Schema.Int.pipe(Schema.check(Schema.isGreaterThanOrEqualTo(0)))),
  data_offsets: Schema.Tuple([Schema.Int, Schema.Int])
})

/** A checkpoint file could not be read or is not what was expected. */
export class CheckpointError extends Schema.TaggedError<CheckpointError>()("CheckpointError", {
  file: Schema.String,
  message: Schema.String,
  /** The metadata field at fault, when it is one. */
  field: Schema.optional(Schema.String)
}) {}

const Whole = Schema.String.pipe(Schema.check(Schema.isPattern(/^(0|[1-9][0-9]{0,14})$/, { message: "expected a whole number ≥ 0 written in decimal" })))
const Json = Schema.String.pipe(Schema.check(Schema.makeFilter((s: string) => {
  try {
    JSON.parse(s)
    return true
  } catch {
    return false
  }
}, { message: "expected JSON text" })))

/**
 * A conceptmoe checkpoint's `__metadata__` (safetensors metadata values are strings). Other keys
 * are kept as they are.
 */
export const CheckpointMetadata = Schema.Struct({
  /** `conceptmoe/v1`: today's single file; `pt`: the standard layout's model file (see `conceptmoe`). */
  format: Schema.Literals(["conceptmoe/v1", "pt"]),
  /** Optimizer steps taken. */
  step: Whole,
  model: Schema.NonEmptyString,
  /** The model config as read (JSON), for `generate` and the resume check. */
  config: Schema.optional(Json),
  /** The training settings of the run that wrote it (JSON). */
  settings: Schema.optional(Json),
  /** Settings changed at resumes (JSON: `[{ step, field, from, to }]`). */
  changes: Schema.optional(Json),
  /** webgpu's chosen matmul kernels (JSON). */
  matmul: Schema.optional(Json),
  /**
   * Model config fields that may change at a resume (JSON array of field paths, e.g. `["ratio"]` for
   * a converted model whose target R ramps up); every other field must match.
   */
  mayChange: Schema.optional(Json),
  /** The training data's size and SHA-256 (JSON; checked on resume by the training loop). */
  data: Schema.optional(Json),
  /** The ratio controller's state of a ConceptMoE (JSON). */
  ratioControl: Schema.optional(Json)
})

export interface Metadata {
  readonly step: number
  readonly model: string
  readonly config: unknown
  readonly settings: unknown
  readonly changes: ReadonlyArray<SettingChange>
  readonly matmul: string | undefined
  readonly mayChange: ReadonlyArray<string>
  readonly raw: Record<string, string>
}

/** A training setting changed at a resume. */
export interface SettingChange {
  readonly step: number
  readonly field: string
  readonly from: unknown
  readonly to: unknown
}

/** Decodes a checkpoint's metadata; a bad field is a {@link CheckpointError} naming it. */
export const decodeMetadata = (raw: Record<string, string>, file: string): Effect.Effect<Metadata, CheckpointError> =>
  Schema.decodeUnknownEffect(CheckpointMetadata)(raw).pipe(
    Effect.mapError((e) => {
      const [p] = problemsOf(e.issue)
      const field = p === undefined ? "" : formatPath(p.path)
      const present = Object.hasOwn(raw, field)
      const problem = present ? `${p?.message ?? e.message}, got ${JSON.stringify(raw[field])}` : "is missing (not a conceptmoe checkpoint?)"
      return new CheckpointError({ file, field, message: `metadata "${field}": ${problem}` })
    }),
    Effect.flatMap((m) => {
      const changes = m.changes === undefined ? [] : JSON.parse(m.changes) as unknown
      const mayChange = m.mayChange === undefined ? [] : JSON.parse(m.mayChange) as unknown
      if (!Array.isArray(changes) || !changes.every((c) => typeof c === "object" && c !== null && typeof c.field === "string")) {
        return Effect.fail(new CheckpointError({ file, field: "changes", message: `metadata "changes": expected a JSON array of { step, field, from, to }` }))
      }
      if (!Array.isArray(mayChange) || !mayChange.every((c) => typeof c === "string")) {
        return Effect.fail(new CheckpointError({ file, field: "mayChange", message: `metadata "mayChange": expected a JSON array of field names` }))
      }
      return Effect.succeed({
        step: Number(m.step),
        model: m.model,
        config: m.config === undefined ? undefined : JSON.parse(m.config) as unknown,
        settings: m.settings === undefined ? undefined : JSON.parse(m.settings) as unknown,
        changes: changes as ReadonlyArray<SettingChange>,
        matmul: m.matmul,
        mayChange: mayChange as ReadonlyArray<string>,
        raw
      })
    })
  )

export type { TensorData }

/** Serialises tensors and metadata to safetensors bytes. */
export const encode = (tensors: ReadonlyMap<string, TensorData>, metadata: Record<string, string>): Uint8Array => {
  const header: Record<string, unknown> = { __metadata__: metadata }
  let offset = 0
  for (const [name, t] of tensors) {
    header[name] = { dtype: "F32", shape: [...t.shape], data_offsets: [offset, offset + t.data.byteLength] }
    offset += t.data.byteLength
  }
  let json = JSON.stringify(header)
  while ((8 + json.length) % 8 !== 0) json += " "
  const head = new TextEncoder().encode(json)
  const out = new Uint8Array(8 + head.length + offset)
  new DataView(out.buffer).setBigUint64(0, BigInt(head.length), true)
  out.set(head, 8)
  let o = 8 + head.length
  for (const t of tensors.values()) {
    out.set(new Uint8Array(t.data.buffer, t.data.byteOffset, t.data.byteLength), o)
    o += t.data.byteLength
  }
  return out
}

/** Parses safetensors bytes (float32 tensors only). */
export const decode = (bytes: Uint8Array, file: string): Effect.Effect<{ readonly tensors: Map<string, TensorData>; readonly metadata: Record<string, string> }, CheckpointError> =>
  Effect.gen(function*() {
    const fail = (message: string) => new CheckpointError({ file, message })
    if (bytes.length < 8) return yield* fail("too short to be a safetensors file")
    const length = new DataView(bytes.buffer, bytes.byteOffset, 8).getBigUint64(0, true)
    if (8n + length > BigInt(bytes.length)) return yield* fail(`header length ${length} exceeds the file (${bytes.length} bytes)`)
    const n = Number(length)
    const raw = yield* Effect.try({ try: () => JSON.parse(new TextDecoder().decode(bytes.subarray(8, 8 + n))) as Record<string, unknown>, catch: () => fail("the header is not JSON") })
    const metadata = yield* Schema.decodeUnknownEffect(Schema.Record(Schema.String, Schema.String))(raw["__metadata__"] ?? {}).pipe(
      Effect.mapError((e) => fail(`__metadata__: ${e.message}`))
    )
    const tensors = new Map<string, TensorData>()
    const base = 8 + n
    for (const [name, entry] of Object.entries(raw)) {
      if (name === "__metadata__") continue
      const e = yield* Schema.decodeUnknownEffect(TensorEntry)(entry).pipe(Effect.mapError((err) => fail(`${name}: ${err.message}`)))
      const [begin, end] = e.data_offsets
      const numel = e.shape.reduce((a, b) => a * b, 1)
      if (end - begin !== numel * 4 || base + end > bytes.length) return yield* fail(`${name}: data_offsets do not match shape [${e.shape}]`)
      const data = new Float32Array(numel)
      new Uint8Array(data.buffer).set(bytes.subarray(base + begin, base + end))
      tensors.set(name, { shape: e.shape, data })
    }
    return { tensors, metadata }
  })

/** Writes one safetensors file atomically: temporary file, fsync, rename, fsync of the directory. */
export const write = (file: string, tensors: ReadonlyMap<string, TensorData>, metadata: Record<string, string>) =>
  commit([{ file, bytes: encode(tensors, metadata) }])

/** The model file's `conceptmoe` metadata in the standard layout; the optimizer file's. */
export const modelLayout = "checkpoint/2"
export const optimizerLayout = "optimizer/2"

/** The optimizer file beside a model file, and the previous one a commit keeps until its model file is renamed. */
export const optimizerFile = "optimizer.safetensors"
export const previousOptimizerFile = "optimizer.prev.safetensors"

/** Metadata of the training state, kept in the optimizer file; the rest stays with the model. */
export const trainingKeys: ReadonlyArray<string> = ["settings", "changes", "matmul", "mayChange", "data", "ratioControl"]

/** The optimizer file's names of the moments of a parameter stored under `name`. */
const momentNames = { "adam.m": "exp_avg", "adam.v": "exp_avg_sq" } as const

const prefixed = (file: FileParam["file"], prefix: string): FileParam["file"] =>
  file === null ? null : typeof file === "string" ? `${prefix}/${file}` : file.map((n) => `${prefix}/${n}`)

/** The SHA-256 of tensors' data in order: the data section of their safetensors file. */
const dataSha256 = (tensors: ReadonlyMap<string, TensorData>): string => {
  const h = createHash("sha256")
  for (const t of tensors.values()) h.update(new Uint8Array(t.data.buffer, t.data.byteOffset, t.data.byteLength))
  return h.digest("hex")
}

/** A safetensors file's `__metadata__`, read from its header only; undefined when absent or unreadable. */
export const headerMetadata = (file: string): Record<string, string> | undefined => {
  let fd: number | undefined
  try {
    fd = fs.openSync(file, "r")
    const size = fs.fstatSync(fd).size
    const len = Buffer.alloc(8)
    if (size < 8 || fs.readSync(fd, len, 0, 8, 0) !== 8) return undefined
    const n = Number(len.readBigUInt64LE(0))
    if (8 + n > size) return undefined
    const head = Buffer.alloc(n)
    if (fs.readSync(fd, head, 0, n, 8) !== n) return undefined
    const meta = (JSON.parse(head.toString("utf8")) as { __metadata__?: unknown }).__metadata__
    return typeof meta === "object" && meta !== null ? meta as Record<string, string> : undefined
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code === "ENOENT" || e instanceof SyntaxError) return undefined
    throw e
  } finally {
    if (fd !== undefined) fs.closeSync(fd)
  }
}

/** Whether an optimizer file's metadata belongs to a model file's. */
const pairs = (model: Record<string, string> | undefined, opt: Record<string, string> | undefined): boolean =>
  model !== undefined && opt !== undefined && model["conceptmoe"] === modelLayout && opt["conceptmoe"] === optimizerLayout &&
  typeof model["pair"] === "string" && model["pair"] === opt["pair"] && model["step"] === opt["step"]

/**
 * The files of a checkpoint in the standard layout, for `RunDir.commit` (after any other file of the
 * step): `optimizer.safetensors` (when `tensors` hold moments), then the model file `file`, the
 * commit point. `tensors`: the runtime's view (`param/<path>`, `adam.m/<path>`, `adam.v/<path>`,
 * matrices `[in, out]`); `metadata`: as for the single-file layout (`step`, `model`, `config`,
 * settings, …), split between the two files by {@link trainingKeys}.
 */
export const checkpointFiles = (
  model: LoadedModel,
  file: string,
  tensors: ReadonlyMap<string, TensorData>,
  metadata: Record<string, string>
): Array<CommitFile> => {
  const graph = graphOf(model, { anyKind: true })
  if (graph instanceof UnsupportedKind) throw new Error(graph.message)
  const values = { "param": new Map<string, Float32Array>(), "adam.m": new Map<string, Float32Array>(), "adam.v": new Map<string, Float32Array>() }
  for (const [name, t] of tensors) {
    const m = /^(param|adam\.m|adam\.v)\/(.+)$/.exec(name)
    if (m === null) throw new Error(`checkpoint tensor ${name}: expected param/, adam.m/ or adam.v/ and a parameter path`)
    values[m[1] as keyof typeof values].set(m[2]!, t.data)
  }
  const weights = torchTensors(graph, values.param)
  const pair = dataSha256(weights)
  const stored = graph.params.filter((p) => p.file !== null)
  const layout = Object.fromEntries(stored.map((p) => [p.path, {
    file: p.file,
    shape: p.torchShape,
    transposed: p.transposed,
    ...(p.rowOrder === null ? {} : { rowOrder: p.rowOrder })
  }]))
  const own: Record<string, string> = {}
  const training: Record<string, string> = {}
  for (const [k, v] of Object.entries(metadata)) {
    if (trainingKeys.includes(k)) training[k] = v
    else if (k !== "format") own[k] = v
  }
  const step = metadata["step"] ?? "0"
  const hasMoments = values["adam.m"].size > 0 || values["adam.v"].size > 0
  const modelMeta: Record<string, string> = {
    ...own,
    format: "pt",
    conceptmoe: modelLayout,
    step,
    names: graph.names,
    layout: JSON.stringify(layout),
    ...(hasMoments ? { optimizer: optimizerFile } : {}),
    pair
  }
  const dir = nodePath.dirname(file)
  const opt = nodePath.join(dir, optimizerFile)
  const prev = nodePath.join(dir, previousOptimizerFile)
  const out: Array<CommitFile> = []
  if (hasMoments) {
    const moments = new Map<string, TensorData>()
    for (const key of ["adam.m", "adam.v"] as const) {
      const named = { params: stored.map((p) => ({ ...p, file: prefixed(p.file, momentNames[key]) })) }
      for (const [n, t] of torchTensors(named, values[key])) moments.set(n, t)
    }
    const optMeta: Record<string, string> = { ...training, format: "pt", conceptmoe: optimizerLayout, optimizer: "adamw", step, model: metadata["model"] ?? "", pair }
    out.push({
      file: opt,
      bytes: encode(moments, optMeta),
      // keep the optimizer state of the model file in place until that file is replaced
      before: () => {
        const current = headerMetadata(file)
        if (current === undefined || current["conceptmoe"] !== modelLayout) fs.rmSync(prev, { force: true })
        else if (pairs(current, headerMetadata(opt))) fs.renameSync(opt, prev)
        // otherwise `prev` holds the current model's state (an interrupted commit), or nothing does
      }
    })
  }
  out.push({ file, bytes: encode(weights, modelMeta), after: () => fs.rmSync(prev, { force: true }) })
  return out
}

/** Writes a checkpoint in the standard layout (model file and optimizer file) atomically. */
export const writeCheckpoint = (model: LoadedModel, file: string, tensors: ReadonlyMap<string, TensorData>, metadata: Record<string, string>) =>
  commit(checkpointFiles(model, file, tensors, metadata))

const readFile = Effect.fnUntraced(function*(file: string) {
  const fs = yield* FileSystem.FileSystem
  return yield* fs.readFile(file).pipe(Effect.mapError((e) => {
    // the operating system's reason ("ENOTDIR: not a directory"), not the platform's tag
    const cause = "cause" in e.reason ? e.reason.cause : undefined
    const reason = e.reason._tag === "NotFound" ? "no such file" : cause instanceof Error ? cause.message.replace(/, \w+( '.*')?$/, "") : e.message
    return new CheckpointError({ file, message: `cannot read: ${reason}` })
  }))
})

const RowOrderJson = Schema.Struct({ period: Schema.Int, offset: Schema.Int, rope: Schema.Int })
const LayoutJson = Schema.Record(Schema.String, Schema.Struct({
  file: Schema.Union([Schema.String, Schema.Array(Schema.String)]),
  shape: Schema.Array(Schema.Int.pipe(Schema.check(Schema.isGreaterThanOrEqualTo(0)))),
  transposed: Schema.Boolean,
  rowOrder: Schema.optional(RowOrderJson)
}))

/** Which optimizer state {@link read} takes from a checkpoint in the standard layout. */
export interface ReadOptions {
  /**
   * `required` (the default; resuming): the paired optimizer file must be there; `optional`: read
   * when there (settings and the like), absent is fine, unpaired is not; `skip`: the model only.
   */
  readonly optimizer?: "required" | "optional" | "skip"
}

/** The paired optimizer file of a model file: the current one, or the one an interrupted commit kept. */
const pairedOptimizer = (file: string, meta: Record<string, string>, mode: "required" | "optional") =>
  Effect.gen(function*() {
    const name = meta["optimizer"] ?? optimizerFile
    if (name.includes("/") || name.includes("\\") || name === "" || name === "." || name === "..") {
      return yield* new CheckpointError({ file, field: "optimizer", message: `metadata "optimizer": expected a file name beside the checkpoint, got ${JSON.stringify(name)}` })
    }
    const dir = nodePath.dirname(file)
    const main = nodePath.join(dir, name)
    const candidates = [main, nodePath.join(dir, previousOptimizerFile)]
    const headers = yield* Effect.try({
      try: () => candidates.map((c) => ({ file: c, meta: headerMetadata(c) })),
      catch: (e) => new CheckpointError({ file: main, field: "optimizer", message: `cannot read: ${(e as Error).message}` })
    })
    const found = headers.find((h) => pairs(meta, h.meta))
    if (found !== undefined) return found.file
    const there = headers.find((h) => h.meta !== undefined)
    if (there === undefined) {
      if (mode === "optional") return undefined
      return yield* new CheckpointError({
        file: main,
        field: "optimizer",
        message: `${main}: no such file; resuming needs the optimizer state written beside ${file} (generate, verify, export and convert read the model file alone)`
      })
    }
    const m = there.meta!
    return yield* new CheckpointError({
      file: there.file,
      field: "optimizer",
      message: `${there.file} (step ${m["step"] ?? "?"}, weights ${(m["pair"] ?? "?").slice(0, 12)}) does not belong to ${file} (step ${meta["step"]}, weights ${(meta["pair"] ?? "?").slice(0, 12)}): the two files are not from the same step; the optimizer state of step ${meta["step"]} is lost (train a new run from the model file, e.g. via convert or export)`
    })
  })

/** A checkpoint in the standard layout, in the runtime's view (see the module's doc). */
const fromStandard = (file: string, ck: { readonly tensors: Map<string, TensorData>; readonly metadata: Record<string, string> }, mode: "required" | "optional" | "skip") =>
  Effect.gen(function*() {
    // the model file's own fields first (step, config), so a bad one is named as such
    yield* decodeMetadata(ck.metadata, file)
    const bad = (message: string) => new CheckpointError({ file, field: "layout", message: `metadata "layout": ${message}` })
    const json = yield* Effect.try({ try: () => JSON.parse(ck.metadata["layout"] ?? "") as unknown, catch: () => bad("expected JSON text") })
    const layout = yield* Schema.decodeUnknownEffect(LayoutJson)(json).pipe(Effect.mapError((e) => bad(`expected { path: { file, shape, transposed, rowOrder? } }: ${e.message}`)))
    const params: Array<FileParam> = Object.entries(layout).map(([path, e]) => ({
      path,
      file: typeof e.file === "string" ? e.file : [...e.file],
      torchShape: e.shape,
      transposed: e.transposed,
      rowOrder: e.rowOrder ?? null
    }))
    const toOurs = (named: ReadonlyArray<FileParam>, tensors: ReadonlyMap<string, TensorData>, from: string, prefix: string, out: Map<string, TensorData>) =>
      Effect.gen(function*() {
        const listed = new Set(named.flatMap((p) => (p.file === null ? [] : typeof p.file === "string" ? [p.file] : p.file)))
        const extra = [...tensors.keys()].find((n) => !listed.has(n))
        if (extra !== undefined) return yield* new CheckpointError({ file: from, message: `has tensor ${extra}, which its layout does not list` })
        const values = yield* fromTorchTensors({ params: named }, tensors, from).pipe(Effect.mapError((e) => new CheckpointError({ file: from, message: e.message })))
        for (const p of named) {
          out.set(`${prefix}/${p.path}`, { shape: ourShape(p), data: values.get(p.path)! })
        }
      })
    const out = new Map<string, TensorData>()
    yield* toOurs(params, ck.tensors, file, "param", out)
    const metadata = { ...ck.metadata }
    if (mode !== "skip") {
      const optFile = yield* pairedOptimizer(file, ck.metadata, mode)
      if (optFile !== undefined) {
        const opt = yield* Effect.flatMap(readFile(optFile), (bytes) => decode(bytes, optFile))
        const moments = new Map<string, TensorData>()
        for (const [key, name] of Object.entries(momentNames)) {
          const named = params.map((p) => ({ ...p, file: prefixed(p.file, name) }))
          const mine = new Map([...opt.tensors].filter(([n]) => n.startsWith(`${name}/`)))
          yield* toOurs(named, mine, optFile, key, moments)
        }
        const extra = [...opt.tensors.keys()].find((n) => !Object.values(momentNames).some((m) => n.startsWith(`${m}/`)))
        if (extra !== undefined) return yield* new CheckpointError({ file: optFile, message: `has tensor ${extra}; expected exp_avg/… and exp_avg_sq/… only` })
        for (const [k, t] of moments) out.set(k, t)
        for (const k of trainingKeys) if (opt.metadata[k] !== undefined) metadata[k] = opt.metadata[k]
      }
    }
    return { tensors: out, metadata }
  })

/**
 * Reads a checkpoint in either layout (the module's doc), in the runtime's view: `param/<path>`,
 * and unless `optimizer: "skip"`, `adam.m/<path>` and `adam.v/<path>`.
 */
export const read = Effect.fnUntraced(function*(file: string, options: ReadOptions = {}) {
  const ck = yield* Effect.flatMap(readFile(file), (bytes) => decode(bytes, file))
  if (ck.metadata["conceptmoe"] !== modelLayout) return ck
  return yield* fromStandard(file, ck, options.optimizer ?? "required")
})

/** Reads a checkpoint (either layout) and decodes its metadata. */
export const readChecked = (file: string, options: ReadOptions = {}) =>
  read(file, options).pipe(Effect.flatMap((ck) => Effect.map(decodeMetadata(ck.metadata, file), (metadata) => ({ tensors: ck.tensors, metadata }))))
