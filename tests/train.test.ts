/**
 * Data, checkpoints and the training loop.
 */
import { NodeServices } from "@effect/platform-node"
import { assert, describe, it } from "@effect/vitest"
import { Effect, Layer, Schema } from "effect"
import { spawnSync } from "node:child_process"
import * as fs from "node:fs"
import * as os from "node:os"
import * as path from "node:path"
import { layer as backendLayer, Tensors } from "../src/runtime/Backend.ts"
import { materialize } from "../src/runtime/Lower.ts"
import { newOptimizer } from "../src/train/Step.ts"
import { decode, encode } from "../src/train/Checkpoint.ts"
import { batchAt, byteTokenizer, sotu, sotuSplits, streamOf, trainBatch } from "../src/train/Data.ts"
import { learningRate, train, TrainSettings, trainStep } from "../src/train/Train.ts"
import { load, root } from "./support/models.ts"

const tiny = { kind: "moe", name: "tiny", vocab: 256, hidden: 16, layers: 3, heads: 2, experts: 2, topK: 1, expertHidden: 16, tiedEmbeddings: true, contextLength: 32 }
const tinyConcept = { kind: "conceptmoe", name: "tiny-concept", baseline: tiny, ratio: 2, encoderLayers: 1, decoderLayers: 1, topK: 2 }
const data = sotuSplits(byteTokenizer, 0)
const settings = (extra: Record<string, unknown>) =>
  Schema.decodeUnknownSync(TrainSettings)({ seqLen: 32, batchSize: 4, steps: 10, logEvery: 100, evalEvery: 100, evalBatches: 1, ...extra })
const tmp = () => fs.mkdtempSync(path.join(os.tmpdir(), "conceptmoe-train-"))
const run = (backend: string) => Effect.provide(Layer.merge(backendLayer(backend), NodeServices.layer))

describe("data", () => {
  it("SOTU splits by year: addresses before 2000 train, 2000 and later validate", () => {
    const docs = sotu()
    const before = docs.filter((d) => d.year < 2000)
    assert.strictEqual(data.train.documents, before.length)
    assert.strictEqual(data.validation.documents, docs.length - before.length)
    assert.strictEqual(data.train.tokens.length, before.reduce((n, d) => n + byteTokenizer.encode(d.text).length, 0))
  })

  it("shuffling is deterministic in the seed", () => {
    const docs = sotu().slice(0, 20)
    const a = streamOf(docs, byteTokenizer, 5)
    assert.deepStrictEqual(streamOf(docs, byteTokenizer, 5).starts, a.starts)
    assert.notDeepEqual(streamOf(docs, byteTokenizer, 6).starts, a.starts)
  })

  it("no target crosses a document start; document starts inside rows are marked", () => {
    const s = data.train
    const start = s.starts[3]!
    const b = batchAt(s, [start - 5], 10)
    assert.strictEqual(b.targets![3], s.tokens[start - 1]!)
    assert.strictEqual(b.targets![4], -1)
    assert.isTrue(b.documentStarts!.has(5))
    assert.deepStrictEqual(trainBatch(s, 2, 8, 1, 7).ids, trainBatch(s, 2, 8, 1, 7).ids)
  })

  it("the byte tokenizer round-trips UTF-8", () => {
    const text = "Fellow-Citizens — “Union” 1790"
    assert.strictEqual(byteTokenizer.decode(byteTokenizer.encode(text)), text)
  })
})

describe("checkpoints", () => {
  it.effect("safetensors round trip, and a corrupt file is a typed error", () =>
    Effect.gen(function*() {
      const t = new Map([["a/b", { shape: [2, 3], data: Float32Array.from([1, 2, 3, 4, 5, 6]) }], ["c", { shape: [1], data: Float32Array.from([7]) }]])
      const bytes = encode(t, { step: "12" })
      const back = yield* decode(bytes, "x.safetensors")
      assert.deepStrictEqual([...back.tensors.get("a/b")!.data], [1, 2, 3, 4, 5, 6])
      assert.deepStrictEqual(back.metadata, { step: "12" })
      const bad = yield* Effect.flip(decode(bytes.subarray(0, 20), "x.safetensors"))
      assert.strictEqual(bad._tag, "CheckpointError")
      assert.include(bad.message, "header length")
    }))
})

describe("training", () => {
  it("warm-up then cosine: ramps, peaks at lr, ends at minLrRatio·lr", () => {
    const o = settings({}).optimizer
    assert.closeTo(learningRate(o, 200, 0), o.lr / o.warmup, 1e-12)
    assert.closeTo(learningRate(o, 200, o.warmup), o.lr, 1e-12)
    assert.closeTo(learningRate(o, 200, 200), o.lr * o.minLrRatio, 1e-12)
  })

  it.effect("a 30-step ConceptMoE run on wasm: the loss falls, metrics and a loss plot are written", () =>
    Effect.gen(function*() {
      const m = yield* load(tinyConcept)
      const out = tmp()
      const r = yield* train(m, settings({ steps: 30, evalEvery: 30, checkpointEvery: 30 }), { out, resume: false, quiet: true, data })
      const first = r.metrics.slice(0, 5).reduce((s, x) => s + x.loss, 0) / 5
      const last = r.metrics.slice(-5).reduce((s, x) => s + x.loss, 0) / 5
      assert.isBelow(last, first - 0.5)
      assert.isTrue(r.metrics.every((x) => x.compression !== undefined && x.compression >= 1))
      assert.isTrue(Number.isFinite(r.finalValBitsPerByte))
      assert.strictEqual(fs.readFileSync(path.join(out, "metrics.jsonl"), "utf8").trim().split("\n").length, 30)
      assert.match(fs.readFileSync(path.join(out, "loss.svg"), "utf8"), /^<svg /)
    }).pipe(run("wasm")), 120_000)

  it.effect("resuming gives the same losses as an uninterrupted run (cpu)", () =>
    Effect.gen(function*() {
      const m = yield* load(tinyConcept)
      const eight = settings({ steps: 8, checkpointEvery: 100 })
      const whole = yield* train(m, eight, { out: tmp(), resume: false, quiet: true, data })
      const out = tmp()
      const half = yield* train(m, eight, { out, resume: false, quiet: true, data, until: 4 })
      assert.strictEqual(half.metrics.length, 4)
      const resumed = yield* train(m, eight, { out, resume: true, quiet: true, data })
      assert.strictEqual(resumed.metrics.length, 8)
      assert.deepStrictEqual(resumed.metrics.map((x) => x.loss), whole.metrics.map((x) => x.loss))
    }).pipe(run("cpu")), 120_000)

  it.effect("a NaN loss stops training with a typed error and keeps the last good checkpoint", () =>
    Effect.gen(function*() {
      const m = yield* load(tiny)
      const out = tmp()
      const e = yield* Effect.flip(train(m, settings({ steps: 40, checkpointEvery: 1, optimizer: { lr: 1e9, warmup: 0, clip: 1e30 } }), { out, resume: false, quiet: true, data }))
      assert.strictEqual(e._tag, "DivergedError")
      assert.include(e.message, "training stopped; the last good checkpoint is")
      assert.isTrue(fs.existsSync(path.join(out, "checkpoint.safetensors")))
      assert.deepStrictEqual(fs.readdirSync(out).filter((f) => f.includes(".tmp-")), [])
    }).pipe(run("cpu")), 120_000)

  it.effect("partLr scales a part's learning rate: at 0 the chunk module does not move, the rest does", () =>
    Effect.gen(function*() {
      const { tf } = yield* Tensors
      const m = yield* load(tinyConcept)
      const low = materialize(tf, m.analysis, 1)
      const opt = newOptimizer(low)
      const before = new Map([...low.variables].map(([p, w]) => [p, w.dataSync().slice()]))
      trainStep(low, opt, trainBatch(data.train, 2, 16, 0, 0), settings({ optimizer: { partLr: { chunk: 0 }, warmup: 0 } }), 0)
      const moved = (p: string) => low.variables.get(p)!.dataSync().some((x, i) => x !== before.get(p)![i])
      assert.isFalse(moved("concept/chunk/q.weight"))
      assert.isFalse(moved("concept/chunk/k.weight"))
      assert.isTrue(moved("encoder/0/mixer/attn/q.weight"))
    }).pipe(run("cpu")), 120_000)

  for (const backend of ["cpu", "wasm"]) {
    it.effect(`partBeta1 gives a part its own β₁ and bias correction (${backend}): the chunk module's first step is the same, its moment 10× larger, its second step differs`, () =>
      Effect.gen(function*() {
        const { tf } = yield* Tensors
        const m = yield* load(tinyConcept)
        const runTwo = (partBeta1: Record<string, number>) => {
          const low = materialize(tf, m.analysis, 1)
          const opt = newOptimizer(low)
          const s = settings({ threads: 1, optimizer: { partBeta1, warmup: 0 } })
          const snap = () => new Map([...low.variables].map(([p, w]) => [p, { w: Float32Array.from(w.dataSync()), m: opt.m.get(p)!.dataSync().slice() }]))
          trainStep(low, opt, trainBatch(data.train, 2, 16, 0, 0), s, 0)
          const first = snap()
          trainStep(low, opt, trainBatch(data.train, 2, 16, 0, 1), s, 1)
          const second = snap()
          return { first, second }
        }
        const none = runTwo({ chunk: 0 })
        const plain = runTwo({})
        const maxDiff = (a: Float32Array, b: Float32Array) => a.reduce((d, x, i) => Math.max(d, Math.abs(x - b[i]!)), 0)
        for (const p of ["concept/chunk/q.weight", "concept/chunk/k.weight"]) {
          const a = none.first.get(p)!, b = plain.first.get(p)!
          // m = (1 − β₁)·g: all of g without momentum, a tenth of it with β₁ 0.9; m/(1 − β₁) is g either way
          let big = 0
          a.m.forEach((x, i) => { if (Math.abs(x) > Math.abs(a.m[big]!)) big = i })
          assert.isAbove(Math.abs(a.m[big]!), 0)
          assert.closeTo(a.m[big]! / b.m[big]!, 10, 1e-3)
          assert.isBelow(maxDiff(a.w, b.w), 1e-6)
          assert.isAbove(maxDiff(none.second.get(p)!.w, plain.second.get(p)!.w), 1e-5)
        }
        // the other parts train alike in both runs at the first step (the chunk module's weights, equal up to rounding, feed their second)
        for (const [p, a] of none.first) if (!p.startsWith("concept/chunk/")) assert.deepStrictEqual(a.w, plain.first.get(p)!.w, p)
      }).pipe(run(backend)), 120_000)
  }

  it.effect("a checkpoint of another model is refused", () =>
    Effect.gen(function*() {
      const out = tmp()
      yield* train(yield* load(tiny), settings({ steps: 2, checkpointEvery: 2 }), { out, resume: false, quiet: true, data }).pipe(Effect.asVoid)
      const e = yield* Effect.flip(train(yield* load({ ...tiny, hidden: 32 }), settings({ steps: 4 }), { out, resume: true, quiet: true, data }))
      assert.strictEqual(e._tag, "CheckpointMismatch")
      assert.include(e.message, "has shape [256,16], the model's is [256,32]")
    }).pipe(run("cpu")), 120_000)
})

describe("CLI", () => {
  it("verify --format json: runtime params and executed FLOPs equal the static ones", () => {
    const r = spawnSync(process.execPath, ["bin/conceptmoe.js", "verify", "examples/compare/moe-tiny.json", "--format", "json", "--backend", "cpu", "--seq-len", "32", "--batch", "2"], { cwd: root, encoding: "utf8" })
    assert.strictEqual(r.status, 0, r.stderr)
    const j = JSON.parse(r.stdout)
    assert.strictEqual(j.params.runtime, j.params.static)
    assert.strictEqual(j.flops.executed, j.flops.static)
  })
})
