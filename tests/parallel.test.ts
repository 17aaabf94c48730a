/**
 * Data-parallel training steps over worker threads (src/train/Parallel.ts) against the one-thread
 * step: a dense model's loss and parameters equal (float summation order aside); an MoE's and a
 * ConceptMoE's cross-entropy equal, their boundary draws the same, and their batch-statistic losses
 * the documented per-shard values.
 */
import { assert, describe, it } from "@effect/vitest"
import { Effect, Schema } from "effect"
import { prng } from "../src/internal/Random.ts"
import { modelFromJson } from "../src/models/Load.ts"
import { load } from "../src/runtime/Backend.ts"
import { type Batch, loss, materialize, mixSeed, release } from "../src/runtime/Lower.ts"
import { drawsBefore, parallelTrainer, shardRows, shardWeights, sliceBatch, trainingThreads } from "../src/train/Parallel.ts"
import { newOptimizer, stepOptions, trainStep, TrainSettings } from "../src/train/Step.ts"

const runtime = (name: "cpu" | "wasm") => Effect.runPromise(load(name))

/** max |a − b| ≤ tol · max(1, max |b|). */
const close = (a: ArrayLike<number>, b: ArrayLike<number>, tol: number, what: string) => {
  assert.strictEqual(a.length, b.length, `${what}: lengths`)
  let scale = 1
  for (let i = 0; i < b.length; i++) scale = Math.max(scale, Math.abs(b[i]!))
  for (let i = 0; i < a.length; i++) {
    if (!(Math.abs(a[i]! - b[i]!) <= tol * scale)) assert.fail(`${what}: index ${i}: ${a[i]} vs ${b[i]}`)
  }
}

const batchOf = (rows: number, length: number, vocab: number): Batch => ({
  rows,
  length,
  ids: Int32Array.from({ length: rows * length }, (_, i) => (i * 7 + (i % 13) * 5) % vocab),
  targets: Int32Array.from({ length: rows * length }, (_, i) => (i % 29 === 5 ? -1 : (i * 11 + 3) % vocab)),
  // a document starting inside row 1 and one inside the last row
  documentStarts: new Set([length + 9, (rows - 1) * length + 3])
})

const moe = { kind: "moe", vocab: 64, hidden: 32, layers: 2, heads: 2, experts: 4, topK: 2, expertHidden: 16, tiedEmbeddings: true, contextLength: 32 }
const configs = {
  dense: { kind: "dense", vocab: 64, hidden: 32, layers: 2, heads: 2, ffnHidden: 64, activation: "gelu", contextLength: 32 },
  moe,
  concept: { kind: "conceptmoe", baseline: { ...moe, layers: 3 }, ratio: 2, encoderLayers: 1, decoderLayers: 1, topK: 2 }
} as const

/** One-thread and `threads`-thread training of the same model from the same start, step by step. */
const both = async (backend: "cpu" | "wasm", config: unknown, threads: number, rows: number, steps: number) => {
  const { tf } = await runtime(backend)
  const m = await Effect.runPromise(modelFromJson(config, "test.json"))
  const settings = Schema.decodeUnknownSync(TrainSettings)({ steps: 10, batchSize: rows, seqLen: 32, optimizer: { warmup: 1 } })
  const batch = batchOf(rows, 32, 64)
  const one = materialize(tf, m.analysis, 5)
  const oneOpt = newOptimizer(one)
  const par = materialize(tf, m.analysis, 5)
  const parOpt = newOptimizer(par)
  const trainer = await parallelTrainer(par, parOpt, m.config, settings, threads)
  const results: Array<{ one: ReturnType<typeof trainStep>; par: Awaited<ReturnType<typeof trainer.step>> }> = []
  try {
    for (let s = 0; s < steps; s++) results.push({ one: trainStep(one, oneOpt, batch, settings, s), par: await trainer.step(batch, s) })
    const params = [...one.variables.keys()].map((k) => ({ one: one.variables.get(k)!.dataSync(), par: par.variables.get(k)!.dataSync(), k }))
    return { tf, m, settings, batch, results, params }
  } finally {
    await trainer.dispose()
    for (const low of [one, par]) release(low)
    tf.dispose([...oneOpt.m.values(), ...oneOpt.v.values(), ...parOpt.m.values(), ...parOpt.v.values()])
  }
}

describe("data-parallel training steps", () => {
  it("skipping draws of the chunk module's generator: k·0x6d2b79f5 further on", () => {
    const seed = mixSeed(7, 0)
    const whole = prng(seed)
    const stream = Array.from({ length: 300 }, () => whole())
    for (const k of [0, 1, 17, 250]) {
      const skipped = prng((seed + Math.imul(k, 0x6d2b79f5)) >>> 0)
      for (let i = k; i < 300; i++) assert.strictEqual(skipped(), stream[i])
    }
  })

  it("shards: rows, draws before a row, slices with their document starts, weights", () => {
    assert.deepStrictEqual(shardRows(8, 2), [4, 4])
    assert.deepStrictEqual(shardRows(5, 3), [2, 2, 1])
    assert.deepStrictEqual(shardRows(2, 4), [1, 1])
    const b = batchOf(3, 32, 64)
    // row 0: 31 draws (its start is forced); row 1: 31 − 1 (a document start at 9)
    assert.strictEqual(drawsBefore(b, 1), 31)
    assert.strictEqual(drawsBefore(b, 2), 61)
    const s = sliceBatch(b, 1, 2)
    assert.deepStrictEqual([...s.documentStarts!], [9, 32 + 3])
    assert.deepStrictEqual([...s.ids], [...b.ids.slice(32, 96)])
    assert.deepStrictEqual(shardWeights([{ targets: 30 }, { targets: 10 }], [4, 4]), [0.75, 0.25])
    assert.deepStrictEqual(shardWeights([{ targets: 0 }, { targets: 0 }], [3, 1]), [0.75, 0.25])
  })

  it("threads: every core on wasm by default, one elsewhere, or as set", () => {
    assert.isAtLeast(trainingThreads({ threads: null }, "wasm"), 1)
    assert.strictEqual(trainingThreads({ threads: null }, "cpu"), 1)
    assert.strictEqual(trainingThreads({ threads: 3 }, "cpu"), 3)
    assert.strictEqual(Schema.decodeUnknownSync(TrainSettings)({}).threads, null)
  })

  it("dense, wasm, 2 and 3 threads: loss and parameters equal the one-thread step's", async () => {
    for (const [threads, rows] of [[2, 4], [3, 5]] as const) {
      const r = await both("wasm", configs.dense, threads, rows, 3)
      close(r.results.map((x) => x.par.loss), r.results.map((x) => x.one.loss), 1e-5, `losses, ${threads} threads`)
      // the products' sums run over a shard's rows instead of the batch's, so gradients differ in
      // their last bits, and AdamW's g/√v turns that into up to ~2e-5 on a parameter whose
      // gradient nearly cancels; a gradient taken or combined wrongly moves parameters by about the
      // learning rate (3e-3 per step)
      for (const p of r.params) close(p.par, p.one, 5e-5, `${p.k}, ${threads} threads`)
    }
  })

  it("dense, cpu backend in the workers too", async () => {
    const r = await both("cpu", configs.dense, 2, 2, 2)
    close(r.results.map((x) => x.par.loss), r.results.map((x) => x.one.loss), 1e-5, "losses")
    for (const p of r.params) close(p.par, p.one, 1e-5, p.k)
  })

  for (const name of ["moe", "concept"] as const) {
    it(`${name}, wasm, 2 threads: the cross-entropy and the draws equal one thread's; the batch-statistic losses are the shards' weighted mean`, async () => {
      const r = await both("wasm", configs[name], 2, 4, 1)
      const first = r.results[0]!
      close([first.par.ce], [first.one.ce], 1e-5, "cross-entropy")
      // the same boundaries: the same number of concepts over the batch
      assert.strictEqual(first.par.concepts, first.one.concepts)
      if (name === "concept") assert.isAbove(first.one.concepts, 0)
      // the auxiliary losses as documented: each shard's own, weighted by its targets
      const { tf, m, settings, batch } = r
      const low = materialize(tf, m.analysis, 5)
      const shards = shardRows(batch.rows, 2).map((rows, s) =>
        tf.tidy(() => {
          const part = sliceBatch(batch, s * 2, rows)
          const x = loss(low, part, { ...stepOptions(low, settings, 0), drawOffset: drawsBefore(batch, s * 2) })
          return { targets: x.tokens, aux: x.aux.dataSync()[0]!, concepts: x.ctx.compression.concepts }
        })
      )
      release(low)
      const w = shardWeights(shards, [2, 2])
      close([first.par.aux], [w[0]! * shards[0]!.aux + w[1]! * shards[1]!.aux], 1e-5, "auxiliary loss")
      assert.strictEqual(shards[0]!.concepts + shards[1]!.concepts, first.one.concepts)
      assert.isAbove(first.one.aux, 0)
    })
  }
})
