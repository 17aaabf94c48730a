/**
 * `--data FILE|DIR`: reading, splitting, hashing, refusing bad input; and the unigram/bigram floors.
 */
import { NodeServices } from "@effect/platform-node"
import { assert, describe, it } from "@effect/vitest"
import { Effect, Result } from "effect"
import { createHash } from "node:crypto"
import * as fs from "node:fs"
import * as os from "node:os"
import * as path from "node:path"
import {
  byteStream,
  checkSplits,
  loadData,
  ngramCounts,
  referenceOnBatches,
  referenceOnPairs,
  referenceOnStream,
  sotuData,
  validatesDocument,
  validationBatches
} from "../src/train/Data.ts"

const tmp = () => fs.mkdtempSync(path.join(os.tmpdir(), "conceptmoe-data-"))
const sha = (b: string | Uint8Array) => createHash("sha256").update(b).digest("hex")
const failure = <A, E>(r: Result.Result<A, E>): E | undefined => (Result.isFailure(r) ? r.failure : undefined)
const load = (p: string, o?: Parameters<typeof loadData>[1]) => loadData(p, o).pipe(Effect.result, Effect.provide(NodeServices.layer))

describe("--data", () => {
  it.effect("a file: the last 10% validates, the SHA-256 is the file's", () =>
    Effect.gen(function*() {
      const dir = tmp()
      const file = path.join(dir, "corpus.txt")
      const text = "abcdefghij".repeat(100)
      fs.writeFileSync(file, text)
      const r = yield* load(file)
      assert.isTrue(Result.isSuccess(r))
      const s = Result.getOrThrow(r)
      assert.strictEqual(s.train.tokens.length, 900)
      assert.strictEqual(s.validation.tokens.length, 100)
      assert.strictEqual(s.validation.tokens[0], "a".charCodeAt(0))
      assert.strictEqual(s.info.sha256, sha(text))
      assert.strictEqual(s.info.bytes, 1000)
      assert.strictEqual(s.info.kind, "file")
      const r2 = Result.getOrThrow(yield* load(file, { valFraction: 0.25 }))
      assert.strictEqual(r2.validation.tokens.length, 250)
    }))

  it.effect("a directory: one document per file in sorted order, every 10th validates; raw bytes, not text", () =>
    Effect.gen(function*() {
      const dir = tmp()
      const names = Array.from({ length: 20 }, (_, i) => `doc-${String(i).padStart(2, "0")}.bin`)
      // written out of order, with a byte that is not valid UTF-8
      for (const n of [...names].reverse()) fs.writeFileSync(path.join(dir, n), Uint8Array.from([0xff, ...Buffer.from(n)]))
      fs.writeFileSync(path.join(dir, ".hidden"), "skipped")
      fs.mkdirSync(path.join(dir, "sub"))
      const s = Result.getOrThrow(yield* load(dir))
      assert.strictEqual(s.info.documents, 20)
      assert.strictEqual(s.validation.documents, 2)
      assert.strictEqual(s.train.documents, 18)
      // documents 10 and 20 (0-based 9 and 19) validate, in order
      const val = Buffer.from(Uint8Array.from(s.validation.tokens)).toString("latin1")
      assert.strictEqual(val, "\xffdoc-09.bin\xffdoc-19.bin")
      assert.deepStrictEqual(s.validation.starts, [0, 11])
      // the SHA-256 is that of `sha256sum *` in name order
      const manifest = names.map((n) => `${sha(Uint8Array.from([0xff, ...Buffer.from(n)]))}  ${n}\n`).join("")
      assert.strictEqual(s.info.sha256, sha(manifest))
      // training documents are shuffled by seed; the validation split is not
      const other = Result.getOrThrow(yield* load(dir, { seed: 1 }))
      assert.deepStrictEqual([...other.validation.tokens], [...s.validation.tokens])
      assert.notDeepEqual([...other.train.tokens], [...s.train.tokens])
    }))

  it("validatesDocument: the 10th, 20th, … for 0.1; every other for 0.5", () => {
    const pick = (f: number, n: number) => Array.from({ length: n }, (_, i) => i).filter((i) => validatesDocument(i, f))
    assert.deepStrictEqual(pick(0.1, 35), [9, 19, 29])
    assert.deepStrictEqual(pick(0.5, 6), [1, 3, 5])
    assert.deepStrictEqual(pick(0.3, 10), [3, 6, 9])
  })

  it.effect("missing, empty or unsplittable input, and a bad fraction, are DataErrors naming the input", () =>
    Effect.gen(function*() {
      const dir = tmp()
      const missing = yield* load(path.join(dir, "nope"))
      assert.isTrue(Result.isFailure(missing))
      assert.match(failure(missing)!.message, /no such file or directory/)
      assert.strictEqual((failure(missing) as { file: string }).file, path.join(dir, "nope"))
      const empty = path.join(dir, "empty.txt")
      fs.writeFileSync(empty, "")
      assert.match(failure(yield* load(empty))!.message, /is empty/)
      const emptyDir = path.join(dir, "none")
      fs.mkdirSync(emptyDir)
      assert.match(failure(yield* load(emptyDir))!.message, /holds no files/)
      const few = path.join(dir, "few")
      fs.mkdirSync(few)
      for (const n of ["a", "b", "c"]) fs.writeFileSync(path.join(few, n), "text")
      assert.match(failure(yield* load(few))!.message, /validation split is empty/)
      assert.match(failure(yield* load(empty, { valFraction: 1 }))!.message, /--val-fraction must be a number between 0 and 1/)
      const f = failure(yield* load(few, { valFraction: 0 }))!
      assert.strictEqual(f._tag, "DataError")
    }))

  it.effect("a split with fewer bytes than one batch is refused, with the numbers", () =>
    Effect.gen(function*() {
      const dir = tmp()
      const file = path.join(dir, "small.txt")
      fs.writeFileSync(file, "x".repeat(1000))
      const s = Result.getOrThrow(yield* load(file))
      const r = yield* checkSplits(s, 2, 64).pipe(Effect.result)
      assert.isTrue(Result.isFailure(r))
      assert.match(failure(r)!.message, /validation split has 100 bytes, fewer than one batch of 2×64 \(129 bytes needed\)/)
      assert.isTrue(Result.isSuccess(yield* checkSplits(s, 1, 64).pipe(Effect.result)))
      // validation batches never read past the stream
      assert.strictEqual(validationBatches(s.validation, 1, 32, 10).length, 3)
    }))
})

describe("reference floors", () => {
  it("unigram and bigram with add-0.1 smoothing, by hand", () => {
    // training "abab": unigram a 2, b 2; bigrams a→b 2, b→a 1
    const c = ngramCounts(byteStream([Uint8Array.from([97, 98, 97, 98])]))
    const r = referenceOnPairs(c, [97], [98])
    assert.closeTo(r.unigram, -Math.log2(2.1 / (4 + 25.6)), 1e-12)
    assert.closeTo(r.bigram, -Math.log2(2.1 / (2 + 25.6)), 1e-12)
    // no bigram crosses a document start: "ab" + "ab" has one a→b per document and no b→a
    const two = ngramCounts(byteStream([Uint8Array.from([97, 98]), Uint8Array.from([97, 98])]))
    assert.strictEqual(two.bigram[98 * 256 + 97], 0)
    assert.strictEqual(two.bigram[97 * 256 + 98], 2)
    // a document's first byte falls back to the unigram
    const s = referenceOnStream(two, byteStream([Uint8Array.from([97])]))
    assert.strictEqual(s.bigram, s.unigram)
  })

  it("SOTU: unigram 4.459 and bigram 3.592 bits/byte on the 2000+ addresses; the evaluated windows are scored the same way", () => {
    const d = sotuData(0)
    const c = ngramCounts(d.train)
    const r = referenceOnStream(c, d.validation)
    assert.closeTo(r.unigram, 4.4593, 5e-4)
    assert.closeTo(r.bigram, 3.5922, 5e-4)
    assert.strictEqual(r.bytes, d.info.validationBytes)
    const w = referenceOnBatches(c, validationBatches(d.validation, 2, 16, 1))
    assert.strictEqual(w.bytes, 32) // every position of a window has a target (the next byte of the stream)
    assert.isTrue(w.bigram < w.unigram)
  })
})
