/**
 * Checkpoints in the safetensors format: an 8-byte little-endian header length, a JSON header
 * (`name → {dtype, shape, data_offsets}` and string `__metadata__`), then the raw little-endian
 * float32 data. Written to a temporary file and renamed, so a crash never leaves a half-written
 * checkpoint. The header is decoded with a Schema when read.
 *
 * @since 0.1.0
 */
import { Effect, FileSystem, Schema } from "effect"

export const TensorEntry = Schema.Struct({
  dtype: Schema.Literal("F32"),
  shape: Schema.Array(Schema.Int.pipe(Schema.check(Schema.isGreaterThanOrEqualTo(0)))),
  data_offsets: Schema.Tuple([Schema.Int, Schema.Int])
})

/** A checkpoint file could not be read or is not what was expected. */
export class CheckpointError extends Schema.TaggedError<CheckpointError>()("CheckpointError", {
  file: Schema.String,
  message: Schema.String
}) {}

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
    const n = Number(new DataView(bytes.buffer, bytes.byteOffset, 8).getBigUint64(0, true))
    if (8 + n > bytes.length) return yield* fail(`header length ${n} exceeds the file`)
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

/** Writes a checkpoint atomically: temporary file, then rename. */
export const write = Effect.fnUntraced(function*(file: string, tensors: ReadonlyMap<string, TensorData>, metadata: Record<string, string>) {
  const fs = yield* FileSystem.FileSystem
  const tmp = `${file}.tmp-${process.pid}`
  yield* fs.writeFile(tmp, encode(tensors, metadata))
  yield* fs.rename(tmp, file)
})

/** Reads a checkpoint. */
export const read = Effect.fnUntraced(function*(file: string) {
  const fs = yield* FileSystem.FileSystem
  const bytes = yield* fs.readFile(file).pipe(Effect.mapError((e) => new CheckpointError({ file, message: `cannot read: ${e.message}` })))
  return yield* decode(bytes, file)
})
