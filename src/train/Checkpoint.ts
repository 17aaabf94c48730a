/**
 * Checkpoints in the safetensors format: an 8-byte little-endian header length, a JSON header
 * (`name → {dtype, shape, data_offsets}` and string `__metadata__`), then the raw little-endian
 * float32 data. Written to a temporary file, fsynced and renamed (`RunDir.commit`), so a crash never
 * leaves a half-written checkpoint. The header and the metadata are decoded with Schemas when read:
 * a bad `step` (`"NaN"`, `"3.5"`, `"-5"`, `""`) is a {@link CheckpointError} naming the file and field.
 *
 * @since 0.1.0
 */
import { Effect, FileSystem, Schema } from "effect"
import { formatPath, problemsOf } from "../graph/Spec.ts"
import { commit } from "./RunDir.ts"

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
  format: Schema.Literal("conceptmoe/v1"),
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

export interface TensorData {
  readonly shape: ReadonlyArray<number>
  readonly data: Float32Array
}

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

/** Writes a checkpoint atomically: temporary file, fsync, rename, fsync of the directory. */
export const write = (file: string, tensors: ReadonlyMap<string, TensorData>, metadata: Record<string, string>) =>
  commit([{ file, bytes: encode(tensors, metadata) }])

/** Reads a checkpoint. */
export const read = Effect.fnUntraced(function*(file: string) {
  const fs = yield* FileSystem.FileSystem
  const bytes = yield* fs.readFile(file).pipe(Effect.mapError((e) => {
    // the operating system's reason ("ENOTDIR: not a directory"), not the platform's tag
    const cause = "cause" in e.reason ? e.reason.cause : undefined
    const reason = e.reason._tag === "NotFound" ? "no such file" : cause instanceof Error ? cause.message.replace(/, \w+( '.*')?$/, "") : e.message
    return new CheckpointError({ file, message: `cannot read: ${reason}` })
  }))
  return yield* decode(bytes, file)
})

/** Reads a checkpoint and decodes its metadata. */
export const readChecked = (file: string) =>
  read(file).pipe(Effect.flatMap((ck) => Effect.map(decodeMetadata(ck.metadata, file), (metadata) => ({ tensors: ck.tensors, metadata }))))
