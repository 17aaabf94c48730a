/**
 * Import of a Hugging Face checkpoint directory: `config.json` plus `model.safetensors`, or shards
 * listed in `model.safetensors.index.json`, of a supported `model_type` (gpt2, llama, mistral,
 * mixtral, qwen2_moe, qwen3_moe, olmoe, deepseek_v2, deepseek_v3) becomes this runtime's model (the
 * graph built from `config.json`, `HuggingFace.ts`) with the checkpoint's weights.
 *
 * Names and layouts come from the export's table (`layout/Names.ts`, read backwards): the tensor of
 * each parameter, transposed from PyTorch's `[out, in]` to this runtime's `[in, out]`, experts
 * stacked from one tensor each, DeepSeek's interleaved rotary features put back in halves. GPT-2's `Conv1D` matrices are `[in, out]` already and its fused
 * `c_attn` is split in thirds (`gpt2Source`). Tensors stored as float32, bfloat16 or float16 are
 * read as float32 (bfloat16 and float16 convert exactly).
 *
 * Every tensor of the checkpoint must find its parameter, except buffers the graph recomputes or
 * does not model, which are listed in the result (`ignored`) with why; anything else is an
 * {@link ImportError} naming the file and the tensor, as is a missing tensor, a wrong shape or an
 * unsupported dtype. Simplifications of the routing the config asks for are listed in `notes`.
 *
 * `importRun` writes a run directory that `generate --checkpoint`, `verify --checkpoint`,
 * `convert --checkpoint` and `train --resume` read.
 *
 * @since 0.4.0
 */
import { Effect, Path, Schema } from "effect"
import * as fs from "node:fs"
import { fromFileLayout, graphOf } from "../layout/Tensors.ts"
import { UnsupportedKind } from "../layout/Graph.ts"
import { gpt2Source } from "../layout/Names.ts"
import { checkpointFiles, type TensorData } from "../train/Checkpoint.ts"
import { commit, ensureDir } from "../train/RunDir.ts"
import { TrainSettings } from "../train/Step.ts"
import { type LoadedModel, modelFromJson, readJson } from "../models/Load.ts"

/** A checkpoint directory that cannot be imported: the file and (when one is at fault) the tensor. */
export class ImportError extends Schema.TaggedError<ImportError>()("ImportError", {
  file: Schema.String,
  tensor: Schema.optional(Schema.String),
  problem: Schema.String
}) {
  override get message(): string {
    return `${this.file}${this.tensor === undefined ? "" : `: tensor ${this.tensor}`}: ${this.problem}`
  }
}

/** Bytes per element of the dtypes read. */
const dtypeSize: Readonly<Record<string, number>> = { F32: 4, BF16: 2, F16: 2 }

/** One tensor of a safetensors file: where its bytes are. */
export interface StoredTensor {
  readonly file: string
  readonly name: string
  readonly dtype: string
  readonly shape: ReadonlyArray<number>
  /** Absolute byte offsets in the file. */
  readonly begin: number
  readonly end: number
}

const Entry = Schema.Struct({
  dtype: Schema.String,
  shape: Schema.Array(Schema.Int.pipe(Schema.check(Schema.isGreaterThanOrEqualTo(0)))),
  data_offsets: Schema.Tuple([Schema.Int, Schema.Int])
})

/** The tensors listed in a safetensors file's header (no data read). */
export const readHeader = (file: string): Effect.Effect<Map<string, StoredTensor>, ImportError> =>
  Effect.gen(function*() {
    const fail = (problem: string, tensor?: string) => new ImportError({ file, problem, ...(tensor === undefined ? {} : { tensor }) })
    const { size, head } = yield* Effect.try({
      try: () => {
        const fd = fs.openSync(file, "r")
        try {
          const size = fs.fstatSync(fd).size
          const lenBytes = Buffer.alloc(8)
          if (size < 8 || fs.readSync(fd, lenBytes, 0, 8, 0) !== 8) return { size, head: undefined }
          const n = Number(lenBytes.readBigUInt64LE(0))
          if (8 + n > size) return { size, head: null }
          const head = Buffer.alloc(n)
          fs.readSync(fd, head, 0, n, 8)
          return { size, head: { n, text: head.toString("utf8") } }
        } finally {
          fs.closeSync(fd)
        }
      },
      catch: (e) => fail(`cannot read: ${(e as Error).message}`)
    })
    if (head === undefined) return yield* fail("too short to be a safetensors file")
    if (head === null) return yield* fail("its header length exceeds the file: not a safetensors file")
    const raw = yield* Effect.try({ try: () => JSON.parse(head.text) as unknown, catch: () => fail("the safetensors header is not JSON") })
    if (typeof raw !== "object" || raw === null || Array.isArray(raw)) return yield* fail("the safetensors header is not a JSON object")
    const out = new Map<string, StoredTensor>()
    const base = 8 + head.n
    for (const [name, entry] of Object.entries(raw)) {
      if (name === "__metadata__") continue
      const e = yield* Schema.decodeUnknownEffect(Entry)(entry).pipe(Effect.mapError(() => fail("expected { dtype, shape, data_offsets } in the header", name)))
      const [begin, end] = e.data_offsets
      const width = dtypeSize[e.dtype]
      if (width !== undefined && end - begin !== e.shape.reduce((a, b) => a * b, 1) * width) {
        return yield* fail(`data_offsets [${begin}, ${end}] do not hold shape [${e.shape}] of ${e.dtype}`, name)
      }
      if (begin > end || base + end > size) return yield* fail(`data_offsets [${begin}, ${end}] run past the end of the file`, name)
      out.set(name, { file, name, dtype: e.dtype, shape: e.shape, begin: base + begin, end: base + end })
    }
    return out
  })

/** IEEE half → float. */
const halfToFloat = (h: number): number => {
  const sign = h & 0x8000 ? -1 : 1
  const exp = (h >> 10) & 0x1f
  const frac = h & 0x3ff
  if (exp === 0) return sign * frac * 2 ** -24
  if (exp === 31) return frac === 0 ? sign * Infinity : NaN
  return sign * (1 + frac / 1024) * 2 ** (exp - 15)
}

/** Reads one tensor's data as float32 (bfloat16 and float16 convert exactly). */
export const readTensor = (t: StoredTensor): Effect.Effect<Float32Array, ImportError> =>
  Effect.gen(function*() {
    const width = dtypeSize[t.dtype]
    if (width === undefined) {
      return yield* new ImportError({ file: t.file, tensor: t.name, problem: `has dtype ${t.dtype}; import reads F32, BF16 and F16` })
    }
    const bytes = yield* Effect.try({
      try: () => {
        const fd = fs.openSync(t.file, "r")
        try {
          const buf = new Uint8Array(t.end - t.begin)
          let read = 0
          while (read < buf.length) {
            const n = fs.readSync(fd, buf, read, buf.length - read, t.begin + read)
            if (n === 0) throw new Error("unexpected end of file")
            read += n
          }
          return buf
        } finally {
          fs.closeSync(fd)
        }
      },
      catch: (e) => new ImportError({ file: t.file, tensor: t.name, problem: `cannot read its data: ${(e as Error).message}` })
    })
    const n = bytes.length / width
    const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength)
    const out = new Float32Array(n)
    if (t.dtype === "F32") for (let i = 0; i < n; i++) out[i] = view.getFloat32(4 * i, true)
    else if (t.dtype === "BF16") {
      const bits = new Uint32Array(out.buffer)
      for (let i = 0; i < n; i++) bits[i] = view.getUint16(2 * i, true) << 16
    } else for (let i = 0; i < n; i++) out[i] = halfToFloat(view.getUint16(2 * i, true))
    return out
  })

const WeightMap = Schema.Struct({ weight_map: Schema.Record(Schema.String, Schema.String) })

/**
 * The tensors of a checkpoint directory by name: from the shards that `model.safetensors.index.json`
 * lists, or from `model.safetensors`.
 */
export const checkpointTensors = (dir: string) =>
  Effect.gen(function*() {
    const path = yield* Path.Path
    const index = path.join(dir, "model.safetensors.index.json")
    const single = path.join(dir, "model.safetensors")
    if (fs.existsSync(index)) {
      const json = yield* readJson(index).pipe(Effect.mapError((e) => new ImportError({ file: index, problem: e.message })))
      const map = yield* Schema.decodeUnknownEffect(WeightMap)(json).pipe(
        Effect.mapError(() => new ImportError({ file: index, problem: `expected { "weight_map": { tensor name: shard file } }` }))
      )
      const shards = new Map<string, Map<string, StoredTensor>>()
      const out = new Map<string, StoredTensor>()
      for (const [name, shard] of Object.entries(map.weight_map)) {
        if (shard.includes("/") || shard.includes("\\")) {
          return yield* new ImportError({ file: index, tensor: name, problem: `its shard "${shard}" is not a file name in ${dir}` })
        }
        const file = path.join(dir, shard)
        if (!shards.has(file)) shards.set(file, yield* readHeader(file))
        const t = shards.get(file)!.get(name)
        if (t === undefined) return yield* new ImportError({ file, tensor: name, problem: `is listed in ${index} but not stored in this shard` })
        out.set(name, t)
      }
      return out
    }
    if (fs.existsSync(single)) return yield* readHeader(single)
    return yield* new ImportError({
      file: dir,
      problem: "has neither model.safetensors nor model.safetensors.index.json (PyTorch .bin checkpoints are not read: save them as safetensors)"
    })
  })

/** Where one parameter's value is in the checkpoint. */
interface Source {
  readonly path: string
  /** Our shape. */
  readonly shape: ReadonlyArray<number>
  /** One name, or one per slice along axis 0 (stacked experts); each with accepted spellings. */
  readonly names: ReadonlyArray<ReadonlyArray<string>>
  /** Shape of each stored tensor. */
  readonly stored: ReadonlyArray<number>
  /** The stored tensor(s), stacked along axis 0 when several, in our layout (transposed, rows reordered). */
  readonly toOurs: (data: Float32Array) => Float32Array
  /** A part of the stored tensor along its last axis (GPT-2's fused q/k/v). */
  readonly part?: { readonly index: number; readonly of: number }
}

/** The checkpoint location of every owned parameter of a Hugging Face model, from the export's table. */
const sourcesOf = (model: LoadedModel, file: string): Effect.Effect<ReadonlyArray<Source>, ImportError> =>
  Effect.gen(function*() {
    if (model.format === "hf/gpt2") {
      const out: Array<Source> = []
      for (const p of model.analysis.params) {
        if (p.tiedTo !== undefined) continue
        const s = gpt2Source(p.path)
        if (s === undefined) return yield* new ImportError({ file, problem: `no GPT-2 name for parameter ${p.path}` })
        const last = p.shape[p.shape.length - 1]!
        const stored = s.part === undefined ? p.shape : [...p.shape.slice(0, -1), last * s.part.of]
        out.push({ path: p.path, shape: p.shape, names: [[s.name, s.name.replace(/^transformer\./, "")]], stored, toOurs: (d) => d, ...(s.part === undefined ? {} : { part: s.part }) })
      }
      return out
    }
    const graph = graphOf(model)
    if (graph instanceof UnsupportedKind) return yield* new ImportError({ file, problem: graph.message })
    if (graph.names === "native") return yield* new ImportError({ file, problem: `${model.format} has no Hugging Face names for its parameters` })
    return graph.params.filter((p) => p.file !== null).map((p): Source => ({
      path: p.path,
      shape: p.shape,
      names: typeof p.file === "string" ? [[p.file]] : p.file!.map((n) => [n]),
      stored: typeof p.file === "string" ? p.torchShape : p.torchShape.slice(1),
      toOurs: (d) => fromFileLayout(p, d)
    }))
  })

/** Tensors a checkpoint may hold that the graph recomputes or does not model, and why. */
const ignorable = (name: string, modelType: string, layers: number, tied: boolean): string | undefined => {
  if (/(^|\.)rotary_emb\.inv_freq$/.test(name)) return "rotary frequencies (recomputed)"
  if (modelType === "gpt2" && /(^|\.)attn\.(masked_)?bias$/.test(name)) return "GPT-2's causal-mask buffers"
  if (tied && name === "lm_head.weight") return "the output layer is tied to the embedding (its copy is not read)"
  const layer = /^model\.layers\.(\d+)\./.exec(name)
  if ((modelType === "deepseek_v3" || modelType === "deepseek_v2") && layer !== null && Number(layer[1]) >= layers) {
    return "multi-token-prediction layers (not built, as in transformers)"
  }
  return undefined
}

/** Where the graph built from the config simplifies the routing or attention the config asks for. */
const fidelityNotes = (config: Record<string, unknown>): Array<string> => {
  const notes: Array<string> = []
  const t = config["model_type"]
  if (t === "deepseek_v3" && (config["n_group"] === undefined || config["n_group"] === null)) {
    notes.push("no n_group: routed without groups (transformers' default is 8 groups)")
  }
  const scaling = config["rope_scaling"] as { readonly rope_type?: unknown; readonly type?: unknown } | null | undefined
  const type = scaling == null ? undefined : scaling.rope_type ?? scaling.type ?? "default"
  if (type !== undefined && type !== "default" && type !== "linear" && type !== "yarn") notes.push(`rope_scaling of type ${JSON.stringify(type)} is not applied (plain RoPE; linear and yarn are)`)
  return notes
}

/** An imported checkpoint: the model and its parameters in this runtime's layout, by graph path. */
export interface Imported {
  readonly model: LoadedModel
  readonly params: Map<string, Float32Array>
  /** Tensors read, by dtype. */
  readonly dtypes: Readonly<Record<string, number>>
  /** Tensors of the checkpoint not read, with why. */
  readonly ignored: ReadonlyArray<{ readonly tensor: string; readonly why: string }>
  /** Where the model built from the config departs from the original's routing or attention. */
  readonly notes: ReadonlyArray<string>
}

/**
 * Reads a Hugging Face checkpoint directory into the model its `config.json` describes. `name`: the
 * model's name (default: the directory's name).
 */
export const importHf = (dir: string, options: { readonly name?: string } = {}) =>
  Effect.gen(function*() {
    const path = yield* Path.Path
    const configFile = path.join(dir, "config.json")
    const json = yield* readJson(configFile)
    if (typeof json !== "object" || json === null || Array.isArray(json) || !Object.hasOwn(json, "model_type")) {
      return yield* new ImportError({ file: configFile, problem: `expected a Hugging Face config with a "model_type"` })
    }
    const name = options.name ?? path.basename(path.resolve(dir))
    const config: Record<string, unknown> = { ...(json as Record<string, unknown>), name }
    const model = yield* modelFromJson(config, configFile)
    const sources = yield* sourcesOf(model, configFile)
    const stored = yield* checkpointTensors(dir)
    const used = new Set<string>()
    const dtypes: Record<string, number> = {}
    const params = new Map<string, Float32Array>()
    for (const s of sources) {
      const numel = s.shape.reduce((a, b) => a * b, 1)
      const data = new Float32Array(numel)
      const slice = numel / s.names.length
      for (const [e, spellings] of s.names.entries()) {
        const t = spellings.map((n) => stored.get(n)).find((x) => x !== undefined)
        if (t === undefined) {
          return yield* new ImportError({ file: dir, tensor: spellings[0]!, problem: `is missing: parameter ${s.path} of ${model.format} reads it` })
        }
        if (t.shape.join(",") !== s.stored.join(",")) {
          return yield* new ImportError({ file: t.file, tensor: t.name, problem: `has shape [${t.shape}]; ${s.path} needs [${s.stored}] (from config.json)` })
        }
        let v = yield* readTensor(t)
        used.add(t.name)
        dtypes[t.dtype] = (dtypes[t.dtype] ?? 0) + 1
        if (s.part !== undefined) {
          const width = s.stored[s.stored.length - 1]! / s.part.of
          const rows = v.length / s.stored[s.stored.length - 1]!
          const out = new Float32Array(rows * width)
          for (let r = 0; r < rows; r++) out.set(v.subarray(r * width * s.part.of + s.part.index * width, r * width * s.part.of + (s.part.index + 1) * width), r * width)
          v = out
        }
        data.set(v, e * slice)
      }
      params.set(s.path, s.toOurs(data))
    }
    const layers = typeof config["num_hidden_layers"] === "number" ? config["num_hidden_layers"] : Infinity
    const tied = model.analysis.params.some((p) => p.tiedTo !== undefined)
    const ignored: Array<{ tensor: string; why: string }> = []
    for (const [n, t] of stored) {
      if (used.has(n)) continue
      const why = ignorable(n, String(config["model_type"]), layers, tied)
      if (why === undefined) {
        return yield* new ImportError({ file: t.file, tensor: n, problem: `has no parameter in the ${model.format} model that config.json describes (a layer, expert or bias it does not declare?)` })
      }
      ignored.push({ tensor: n, why })
    }
    return { model, params, dtypes, ignored, notes: fidelityNotes(config) } satisfies Imported
  })

/** What {@link importRun} wrote. */
export interface ImportedRun extends Imported {
  readonly files: { readonly checkpoint: string; readonly model: string; readonly train: string }
}

/**
 * Imports a checkpoint directory into a new run directory `out`: `model.json` (the config, named),
 * `train.json` (default training settings, seqLen at most the context length, `model: "model.json"`),
 * `checkpoint.safetensors` (step 0, the weights in the standard layout: the names and layout read,
 * the config in the metadata) and `optimizer.safetensors` (Adam moments zero; `train/Checkpoint.ts`).
 * Written atomically; an `out` that already holds a checkpoint is refused.
 */
export const importRun = (dir: string, out: string, options: { readonly name?: string } = {}) =>
  Effect.gen(function*() {
    const path = yield* Path.Path
    const files = { checkpoint: path.join(out, "checkpoint.safetensors"), model: path.join(out, "model.json"), train: path.join(out, "train.json") }
    if (fs.existsSync(files.checkpoint)) {
      return yield* new ImportError({ file: files.checkpoint, problem: "exists: give a new --out run directory" })
    }
    const imported = yield* importHf(dir, options)
    const { model, params } = imported
    const tensors = new Map<string, TensorData>()
    for (const p of model.analysis.params) {
      if (p.tiedTo !== undefined) continue
      const data = params.get(p.path)!
      tensors.set(`param/${p.path}`, { shape: p.shape, data })
      tensors.set(`adam.m/${p.path}`, { shape: p.shape, data: new Float32Array(data.length) })
      tensors.set(`adam.v/${p.path}`, { shape: p.shape, data: new Float32Array(data.length) })
    }
    // the default settings, rows no longer than the model's context
    const settings = Schema.decodeUnknownSync(TrainSettings)({ seqLen: Math.min(128, model.contextLength) })
    const metadata: Record<string, string> = {
      format: "conceptmoe/v1",
      step: "0",
      model: model.name,
      config: JSON.stringify(model.config),
      settings: JSON.stringify(settings),
      imported: JSON.stringify({ source: path.resolve(dir), format: model.format, dtypes: imported.dtypes, ignored: imported.ignored, notes: imported.notes })
    }
    yield* ensureDir(out)
    // the configs first, the checkpoint last: a run directory with a checkpoint is complete
    yield* commit([
      { file: files.model, bytes: JSON.stringify(model.config, null, 2) + "\n" },
      { file: files.train, bytes: JSON.stringify({ model: "model.json", ...settings }, null, 2) + "\n" },
      ...checkpointFiles(model, files.checkpoint, tensors, metadata)
    ])
    return { ...imported, files } satisfies ImportedRun
  })
