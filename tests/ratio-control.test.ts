/**
 * Compression held at the target: the ratio controller (Chunker.ts), the windowed summaries
 * (train/Compression.ts), and training runs that use them.
 */
import { NodeServices } from "@effect/platform-node"
import { assert, describe, it } from "@effect/vitest"
import { Effect, Layer, Schema } from "effect"
import * as fs from "node:fs"
import * as os from "node:os"
import * as path from "node:path"
import { ChunkerSpec, controlledRate, INTEGRAL_LIMIT, INTEGRATE_WITHIN, initialRatioControl, type RatioControl, ratioControlStep, ratioLossValue, ratioLossWeights } from "../src/blocks/Chunker.ts"
import { layer as backendLayer } from "../src/runtime/Backend.ts"
import { compressionSummary, lastValCompression, meanSampledR, secondHalf, windowedSampledR, within } from "../src/train/Compression.ts"
import { byteTokenizer, sotuSplits } from "../src/train/Data.ts"
import { train, TrainSettings } from "../src/train/Train.ts"
import { load } from "./support/models.ts"

const spec = (extra: Record<string, unknown>) => Schema.decodeUnknownSync(ChunkerSpec)({ d: 8, ratio: 2, ...extra })

describe("compression summaries", () => {
  const steps = (rates: ReadonlyArray<number>) => rates.map((f, step) => ({ step, boundaryRate: f, compression: 1 / f }))

  it("mean sampled R is total tokens over total concepts, not the mean of the ratios", () => {
    // two steps of equal tokens at F = 0.5 and 0.25: concepts 0.75·n over 2n tokens, R = 8/3
    assert.closeTo(meanSampledR(steps([0.5, 0.25]))!, 8 / 3, 1e-12)
    assert.isUndefined(meanSampledR([{ step: 0 }]))
    // compression alone (no boundaryRate) gives the same
    assert.closeTo(meanSampledR([{ step: 0, compression: 2 }, { step: 1, compression: 4 }])!, 8 / 3, 1e-12)
  })

  it("the second half, windows, and the last threshold R", () => {
    const m = steps(Array.from({ length: 40 }, (_, i) => (i < 20 ? 0.05 : i < 30 ? 0.5 : 0.25)))
    assert.deepStrictEqual(secondHalf(m).map((x) => x.step), Array.from({ length: 20 }, (_, i) => 20 + i))
    assert.deepStrictEqual(windowedSampledR(secondHalf(m), 10).map((w) => [w.from, w.to, w.r]), [[20, 29, 2], [30, 39, 4]])
    const withVal = [...m.slice(0, 39), { ...m[39]!, valCompression: 3.5 }]
    assert.strictEqual(lastValCompression(withVal), 3.5)
    const s = compressionSummary(withVal)
    assert.closeTo(s.meanSampledR!, 1 / 0.375, 1e-12)
    assert.deepStrictEqual(s.windows, { min: 2, max: 4 })
    assert.strictEqual(s.valCompression, 3.5)
    // with the run's length given, a run stopped early still halves at the schedule's middle
    assert.strictEqual(secondHalf(m, 80).length, 0)
    assert.isTrue(within(2.19, 2, 0.1))
    assert.isFalse(within(2.21, 2, 0.1))
    assert.isFalse(within(undefined, 2, 0.1))
  })
})

describe("the ratio controller", () => {
  it("plain is the paper's loss with weight λ; pi adds the integral term", () => {
    const plain = spec({ ratioControl: "plain", lambda: 0.03 })
    const F = 0.3
    const G = 0.4
    // L = λ·R/(R−1)·((R−1)·F·G + (1−F)(1−G)) at R = 2
    assert.closeTo(ratioLossValue(plain, { integral: 7 }, F, G), 0.03 * 2 * (F * G + (1 - F) * (1 - G)), 1e-15)
    assert.deepStrictEqual(ratioLossWeights(plain, { integral: 7 }), { a: 0.03, b: 0 })
    const pi = spec({ ratioControl: "pi", kp: 0.3, ki: 0.01 })
    assert.deepStrictEqual(ratioLossWeights(pi, undefined), { a: 0.3, b: 0 })
    const w = ratioLossWeights(pi, { integral: -4 })
    assert.closeTo(w.b, 0.01 * 2 * -4, 1e-15)
    // ∂L/∂G = R/(R−1)·(kp·(R·F − 1) + ki·integral)
    const dG = (ratioLossValue(pi, { integral: -4 }, F, G + 1e-6) - ratioLossValue(pi, { integral: -4 }, F, G)) / 1e-6
    assert.closeTo(dG, 2 * (0.3 * (2 * F - 1) + 0.01 * -4), 1e-6)
  })

  it("the default is pi; the state integrates R·F − 1 near the target only, clamped, deterministically", () => {
    assert.strictEqual(spec({}).ratioControl, "pi")
    let s: RatioControl = initialRatioControl
    // errors 2F − 1: −0.2 and +0.1 are integrated; −0.8 and +0.4 (beyond ±INTEGRATE_WITHIN) are not
    for (const f of [0.4, 0.1, 0.55, 0.7]) s = ratioControlStep(s, 2, f)
    assert.closeTo(s.integral, -0.2 + 0.1, 1e-12)
    // a start far below the target (few boundaries) leaves the integral at zero: no wind-up
    let start: RatioControl = initialRatioControl
    for (let i = 0; i < 20; i++) start = ratioControlStep(start, 4, 0.05)
    assert.strictEqual(start.integral, 0)
    // the clamp: 400 steps of error +0.2 reach +INTEGRAL_LIMIT and stay there
    let high: RatioControl = initialRatioControl
    for (let i = 0; i < 400; i++) high = ratioControlStep(high, 4, 0.3)
    assert.strictEqual(high.integral, INTEGRAL_LIMIT)
    assert.closeTo(ratioControlStep(high, 4, 0.2).integral, INTEGRAL_LIMIT - 0.2, 1e-12)
    assert.strictEqual(INTEGRATE_WITHIN, 0.25)
  })

  it("pi holds a mix of the sampled rate and the rate at p ≥ ½ (thresholdWeight, 0.4 by default); plain the sampled one", () => {
    assert.strictEqual(spec({}).thresholdWeight, 0.4)
    assert.closeTo(controlledRate(spec({}), 0.3, 0.2), 0.26, 1e-15)
    assert.closeTo(controlledRate(spec({ thresholdWeight: 0.5 }), 0.3, 0.2), 0.25, 1e-15)
    assert.closeTo(controlledRate(spec({ thresholdWeight: 0.25 }), 0.3, 0.2), 0.275, 1e-15)
    assert.strictEqual(controlledRate(spec({ thresholdWeight: 0 }), 0.3, 0.2), 0.3)
    assert.strictEqual(controlledRate(spec({ ratioControl: "plain", thresholdWeight: 1 }), 0.3, 0.2), 0.3)
    assert.throws(() => spec({ thresholdWeight: 1.5 }))
  })
})

const tiny = { kind: "moe", name: "tiny", vocab: 256, hidden: 16, layers: 3, heads: 2, experts: 2, topK: 1, expertHidden: 16, tiedEmbeddings: true, contextLength: 32 }
const concept = (control: Record<string, unknown>) => ({ kind: "conceptmoe", name: "tiny-concept", baseline: tiny, ratio: 2, encoderLayers: 1, decoderLayers: 1, topK: 2, ...control })
const data = sotuSplits(byteTokenizer, 0)
const settings = (steps: number, optimizer: Record<string, unknown> = {}) =>
  Schema.decodeUnknownSync(TrainSettings)({ seqLen: 32, batchSize: 4, steps, logEvery: 1000, evalEvery: steps, evalBatches: 1, checkpointEvery: 1000, optimizer })
const tmp = () => fs.mkdtempSync(path.join(os.tmpdir(), "conceptmoe-ratio-"))
const cpu = Effect.provide(Layer.merge(backendLayer("cpu"), NodeServices.layer))

describe("training with the ratio controller (cpu)", () => {
  it.effect("the default holds the sampled R of every 10-step window of the second half near 2 (60 steps), thresholdWeight ½ the mean of sampled and threshold rates; the paper's λ = 0.03 does neither, and with momentum in the chunk module runs far off", () =>
    Effect.gen(function*() {
      const held = yield* train(yield* load(concept({})), settings(60), { out: tmp(), resume: false, quiet: true, data })
      const mixed = yield* train(yield* load(concept({ thresholdWeight: 0.5 })), settings(60), { out: tmp(), resume: false, quiet: true, data })
      const plain = yield* train(yield* load(concept({ ratioControl: "plain" })), settings(40), { out: tmp(), resume: false, quiet: true, data })
      const plainMomentum = yield* train(yield* load(concept({ ratioControl: "plain" })), settings(40, { partBeta1: {} }), { out: tmp(), resume: false, quiet: true, data })
      const h = held.compression!
      const p = plain.compression!
      assert.isTrue(within(h.windows!.min, 2, 0.1) && within(h.windows!.max, 2, 0.1), `default: windows ${JSON.stringify(h.windows)}`)
      assert.isTrue(within(h.valCompression, 2, 0.15), `default: threshold R ${h.valCompression}`)
      // with thresholdWeight ½, the rate held (Chunker.controlledRate) over 10-step windows of the second half, as R
      const mixedRates = secondHalf(mixed.metrics).map((m) => ({ step: m.step, boundaryRate: (m.boundaryRate! + m.thresholdRate!) / 2 }))
      const mixedR = windowedSampledR(mixedRates, 10).map((w) => w.r!)
      assert.isTrue(mixedR.every((r) => within(r, 2, 0.1)), `thresholdWeight ½: held R per window ${mixedR.join(", ")}`)
      // the plain loss does not hold the windows within ±10% (2.19–2.63 in this run), and with β₁ 0.9 in
      // the chunk module (partBeta1 {}) it lets R run far off (10–30 in this run's second half)
      assert.isFalse(within(p.windows!.min, 2, 0.1) && within(p.windows!.max, 2, 0.1), `plain: windows ${JSON.stringify(p.windows)}`)
      assert.isAbove(plainMomentum.compression!.windows!.max, 4, `plain, β₁ 0.9: windows ${JSON.stringify(plainMomentum.compression!.windows)}`)
      // the log carries F, G, the ratio loss and the sampled R per step, the threshold R at the evaluation
      const m = held.metrics[10]!
      assert.closeTo(m.compression!, 1 / m.boundaryRate!, 1e-12)
      assert.isTrue(m.boundaryProb! > 0 && m.boundaryProb! < 1)
      assert.isTrue(Number.isFinite(m.ratioLoss!))
      // the rate at p ≥ ½ of the training batch: at least the forced row starts (1 of 32 tokens)
      assert.isTrue(m.thresholdRate! >= 1 / 32 && m.thresholdRate! <= 1, `thresholdRate ${m.thresholdRate}`)
      assert.strictEqual(held.metrics[59]!.valCompression, h.valCompression)
      assert.isDefined(h.valCompression)
    }).pipe(cpu), 300_000)

  it.effect("resuming continues the controller's state: the losses and ratio losses of an uninterrupted run, exactly", () =>
    Effect.gen(function*() {
      // a large integral weight, so that a lost state would change the losses
      const m = yield* load(concept({ ki: 0.05 }))
      const whole = yield* train(m, settings(30), { out: tmp(), resume: false, quiet: true, data })
      // resume two steps after the integral first moves (it stays zero while the rate is far from 1/R)
      let s = initialRatioControl
      let moved = -1
      for (const [i, x] of whole.metrics.entries()) {
        s = ratioControlStep(s, 2, controlledRate(spec({ ki: 0.05 }), x.boundaryRate!, x.thresholdRate!))
        if (moved < 0 && s.integral !== 0) moved = i + 1
      }
      assert.isTrue(moved > 0 && moved + 2 < 30, `the integral never moved before step 28 (first at ${moved})`)
      const out = tmp()
      yield* train(m, settings(30), { out, resume: false, quiet: true, data, until: moved + 2 })
      const resumed = yield* train(m, settings(30), { out, resume: true, quiet: true, data })
      assert.deepStrictEqual(resumed.metrics.map((x) => [x.loss, x.ratioLoss]), whole.metrics.map((x) => [x.loss, x.ratioLoss]))
    }).pipe(cpu), 300_000)
})
