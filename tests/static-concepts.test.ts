/**
 * ConceptMoE training with static shapes (`ConceptFeeds`: padded concept slots, fed Bernoulli
 * draws and document starts), against the host path it replaces, on the cpu backend: with enough
 * slots it gives the same boundaries, loss and gradients; with too few it drops sampled boundaries
 * (never forced ones) and says how many.
 */
import { assert, describe, it } from "@effect/vitest"
import { Effect } from "effect"
import type { Tensor, Tf } from "../src/graph/Apply.ts"
import type { Dispatch } from "../src/blocks/MoE.ts"
import { conceptSlots } from "../src/blocks/Chunker.ts"
import { load as loadBackend } from "../src/runtime/Backend.ts"
import { type Batch, conceptFeedValues, loss, materialize, release } from "../src/runtime/Lower.ts"
import { load } from "./support/models.ts"

const { tf } = await Effect.runPromise(loadBackend("cpu"))
const moe = { kind: "moe", vocab: 64, hidden: 32, layers: 3, heads: 4, kvHeads: 2, experts: 4, topK: 2, expertHidden: 16, sharedHidden: 16, tiedEmbeddings: true, contextLength: 24 }
const variants: ReadonlyArray<readonly [string, Record<string, unknown>]> = [
  ["sum merge", { kind: "conceptmoe", baseline: moe, ratio: 2, encoderLayers: 1, decoderLayers: 1, topK: 3 }],
  ["last merge", { kind: "conceptmoe", baseline: moe, ratio: 2, encoderLayers: 1, decoderLayers: 1, topK: 3, merge: "last" }],
  ["looped concept model", { kind: "conceptmoe", baseline: moe, ratio: 1.5, encoderLayers: 1, decoderLayers: 1, topK: 2, loopLayers: 1, loopTimes: 2 }]
]
const L = 24
const rows = 3
const batch: Batch = {
  rows,
  length: L,
  ids: new Int32Array(rows * L).map((_, i) => (i * 7 + (i % 5) * 3) % 64),
  targets: new Int32Array(rows * L).map((_, i) => (i % 11 === 4 ? -1 : (i * 13 + 1) % 64)),
  // documents start inside rows 0 and 2
  documentStarts: new Set([13, 2 * L + 8, 2 * L + 21])
}
const seed = 12345

/**
 * Loss parts and gradients of one training pass (the static one with `capacity`), plus its
 * boundaries; MoE layers dispatch densely unless `dispatch` says otherwise.
 */
const pass = (tf: Tf, low: ReturnType<typeof materialize>, capacity?: number, dispatch: Dispatch = "dense", integral?: number) => {
  const feeds = capacity === undefined ? undefined : (() => {
    const v = conceptFeedValues(batch, seed)
    return {
      random: tf.tensor1d(v.random),
      documentStart: tf.tensor1d(v.documentStart),
      capacity,
      ...(integral === undefined ? {} : { ratioIntegral: tf.tensor1d([integral]) })
    }
  })()
  const vars = [...low.variables.values()]
  let info: { boundaries: Array<number>; concepts: number; threshold: number; dropped: number; ce: number; aux: number } | undefined
  const { value, grads } = tf.variableGrads(() => {
    // the host path takes the controller's integral as a constant, the static one as a feed
    const control = integral === undefined || feeds !== undefined ? {} : { ratioControl: { integral } }
    const r = loss(low, batch, { training: true, seed, dispatch, ...control, ...(feeds === undefined ? {} : { concept: feeds }) })
    const ch = r.ctx.chunk!
    const dc = r.ctx.deviceCompression
    info = {
      boundaries: ch.slots === undefined ? Array.from(ch.boundaries) : Array.from(ch.slots.b.dataSync()),
      concepts: dc === undefined ? r.ctx.compression.concepts : dc.concepts.dataSync()[0]!,
      threshold: dc === undefined ? r.ctx.compression.thresholdConcepts : dc.threshold.dataSync()[0]!,
      dropped: dc === undefined ? 0 : dc.dropped.dataSync()[0]!,
      ce: r.ce.dataSync()[0]!,
      aux: r.aux.dataSync()[0]!
    }
    return r.total
  }, vars)
  const out = { total: value.dataSync()[0]!, grads: vars.map((v) => Array.from(grads[v.name]!.dataSync())), ...info! }
  tf.dispose([value, ...Object.values(grads)])
  if (feeds !== undefined) tf.dispose([feeds.random, feeds.documentStart, ...(feeds.ratioIntegral === undefined ? [] : [feeds.ratioIntegral])])
  return out
}

const maxDiff = (a: ReadonlyArray<number>, b: ReadonlyArray<number>) => a.reduce((m, x, i) => Math.max(m, Math.abs(x - b[i]!)), 0)

describe("static-shape ConceptMoE training", () => {
  for (const [name, cfg] of variants) {
    it(`${name}: with enough slots, the boundaries, loss and gradients of the host path`, async () => {
      const m = await Effect.runPromise(load(cfg))
      const low = materialize(tf, m.analysis, 7)
      const ratio = (cfg["ratio"] as number)
      const host = pass(tf, low)
      const perRow = Array.from({ length: rows }, (_, r) => host.boundaries.slice(r * L, (r + 1) * L).reduce((a, b) => a + b, 0))
      // every row padded to L slots, and to exactly the busiest row's count (the others padded)
      // MoE layers dense, grouped (as webgpu trains them), or by capacity with a row for every pair (4 experts, top-2: factor 2)
      for (const [capacity, dispatch] of [[ratio, "dense"], [(Math.max(...perRow) * ratio) / L, "dense"], [ratio, "grouped"], [ratio, { capacity: 2 }]] as const) {
        assert.strictEqual(conceptSlots(L, ratio, capacity), capacity === ratio ? L : Math.max(...perRow))
        const before = tf.memory()
        const fixed = pass(tf, low, capacity, dispatch)
        // nothing left behind (tensors off the tape share their data, and hold a reference to it)
        assert.deepInclude(tf.memory(), { numTensors: before.numTensors, numBytes: before.numBytes })
        assert.deepStrictEqual(fixed.boundaries, host.boundaries)
        assert.strictEqual(fixed.concepts, host.concepts)
        // the boundaries at p ≥ ½ (the controller's second rate): the same count on both paths
        assert.strictEqual(fixed.threshold, host.threshold)
        assert.strictEqual(fixed.dropped, 0)
        assert.closeTo(fixed.ce, host.ce, 1e-5)
        // the ratio and balance losses (balance over real concepts only, not the padding)
        assert.closeTo(fixed.aux, host.aux, 1e-6)
        fixed.grads.forEach((g, i) => assert.isAtMost(maxDiff(g, host.grads[i]!), 1e-5, `gradient ${i}`))
      }
      // rows differ in their counts, so the busiest-row capacity did pad some rows
      assert.isAbove(Math.max(...perRow), Math.min(...perRow))
      // a document start closes a chunk of more than itself (which then holds only that token)
      if (name === "sum merge") assert.isTrue([...batch.documentStarts!].some((d) => host.boundaries[d - 1] === 0))
      release(low)
    })
  }

  it("the ratio controller's integral fed as a tensor (as a recorded step replays it) gives the host path's loss and gradients", async () => {
    const m = await Effect.runPromise(load(variants[0]![1]))
    const low = materialize(tf, m.analysis, 7)
    const without = pass(tf, low, 2, "dense", 0)
    for (const integral of [3, -7.5]) {
      const host = pass(tf, low, undefined, "dense", integral)
      const fixed = pass(tf, low, 2, "dense", integral)
      assert.closeTo(fixed.aux, host.aux, 1e-6)
      fixed.grads.forEach((g, i) => assert.isAtMost(maxDiff(g, host.grads[i]!), 1e-5, `gradient ${i}`))
      // and the integral does change the loss (ki·R/(R−1)·I·G with G of order ½)
      assert.isAbove(Math.abs(fixed.aux - without.aux), 0.05)
    }
    release(low)
  })

  it("a concept model with bidirectional attention does not attend to the padded slots", async () => {
    const m = await Effect.runPromise(load(variants[0]![1]))
    // the concept model's attention made non-causal on the analysed graph (a graph config can say so)
    const specs = m.analysis.specs as Map<string, Record<string, unknown>>
    const concept = m.analysis.rows.filter((r) => r.kind === "attention" && r.path.includes("concept"))
    assert.isAbove(concept.length, 0)
    for (const r of concept) specs.set(r.path, { ...specs.get(r.path), causal: false })
    const low = materialize(tf, m.analysis, 7)
    const host = pass(tf, low)
    const fixed = pass(tf, low, 2)
    assert.closeTo(fixed.ce, host.ce, 1e-5)
    fixed.grads.forEach((g, i) => assert.isAtMost(maxDiff(g, host.grads[i]!), 1e-5, `gradient ${i}`))
    release(low)
  })

  it("a row with more forced boundaries than slots is refused, naming the row", async () => {
    const m = await Effect.runPromise(load(variants[0]![1]))
    const low = materialize(tf, m.analysis, 7)
    // rows of 24 at R 2 and capacity 0.2: 3 slots; row 2 has its start and two document starts, row 0 two
    assert.strictEqual(conceptSlots(L, 2, 0.2), 3)
    assert.doesNotThrow(() => pass(tf, low, 0.2))
    assert.throws(() => pass(tf, low, 0.15), /row 2 has 3 forced boundaries .* more than its 2 concept slots/)
    release(low)
  })

  it("with too few slots, sampled boundaries are dropped (forced ones kept) and counted", async () => {
    const m = await Effect.runPromise(load(variants[0]![1]))
    const low = materialize(tf, m.analysis, 7)
    const host = pass(tf, low)
    const capacity = 0.6
    const C = conceptSlots(L, 2, capacity)
    const fixed = pass(tf, low, capacity)
    const forced = (t: number) => t % L === 0 || batch.documentStarts!.has(t)
    for (let r = 0; r < rows; r++) {
      const b = fixed.boundaries.slice(r * L, (r + 1) * L)
      assert.isAtMost(b.reduce((a, x) => a + x, 0), C, `row ${r}`)
      b.forEach((x, i) => {
        if (forced(r * L + i)) assert.strictEqual(x, 1, `forced boundary ${r * L + i}`)
        // only boundaries of the host path survive
        if (x === 1) assert.strictEqual(host.boundaries[r * L + i], 1)
      })
    }
    assert.isAbove(fixed.dropped, 0)
    assert.strictEqual(fixed.concepts + fixed.dropped, host.concepts)
    assert.isTrue(Number.isFinite(fixed.total))
    release(low)
  })
})

// keep the type import used
export type { Tensor }
