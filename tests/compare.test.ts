/**
 * The comparison: statistics over seeds, realised FLOPs at a measured R, the Matched-only entry
 * point, the solver's expert lever, and a short end-to-end run over two seeds.
 */
import { NodeServices } from "@effect/platform-node"
import { assert, describe, it } from "@effect/vitest"
import { Effect, Layer, Result, Schema } from "effect"
import * as fs from "node:fs"
import * as os from "node:os"
import * as path from "node:path"
import type { Matched } from "../src/cost/Budget.ts"
import * as Cost from "../src/cost/Cost.ts"
import type { Analysis } from "../src/graph/Analyze.ts"
import { reallocate } from "../src/models/Reallocate.ts"
import { layer as backendLayer } from "../src/runtime/Backend.ts"
import { staticFlopsAt } from "../src/runtime/Verify.ts"
import { compareMatched, comparisonReport, type MatchedModels, matchModels, realisedFlopsPerToken, type RunResult } from "../src/train/Compare.ts"
import { ngramCounts, referenceOnStream, sotuData } from "../src/train/Data.ts"
import { bands, meanInterval, pairedDifference, summarize, tCdf, tQuantile, windowMeans } from "../src/train/Stats.ts"
import { TrainSettings } from "../src/train/Train.ts"
import { load } from "./support/models.ts"

const moeTiny = { kind: "moe", name: "moe-tiny", vocab: 256, hidden: 64, layers: 6, heads: 4, experts: 16, topK: 2, expertHidden: 32, tiedEmbeddings: true, contextLength: 128 }
const loaded = (json: unknown) => Effect.runSync(load(json))

describe("statistics", () => {
  it("mean and sample sd", () => {
    const s = summarize([2, 4, 4, 4, 5, 5, 7, 9])
    assert.strictEqual(s.mean, 5)
    assert.closeTo(s.sd, Math.sqrt(32 / 7), 1e-12)
    assert.deepStrictEqual(summarize([3]), { n: 1, mean: 3, sd: 0 })
  })

  it("Student's t quantiles match the tables", () => {
    for (const [df, q] of [[1, 12.7062], [2, 4.3027], [4, 2.7764], [10, 2.2281], [30, 2.0423]] as const) {
      assert.closeTo(tQuantile(0.975, df), q, 1e-4)
    }
    assert.closeTo(tQuantile(0.95, 5), 2.0150, 1e-4)
    assert.strictEqual(tCdf(0, 3), 0.5)
    assert.closeTo(tCdf(-tQuantile(0.975, 7), 7), 0.025, 1e-9)
  })

  it("the paired difference and its 95% interval", () => {
    const a = [4.0, 4.1, 3.9]
    const b = [4.2, 4.25, 4.05]
    const d = pairedDifference(a, b)
    // differences 0.2, 0.15, 0.15: mean 0.1667, sd 0.02887, half-width 4.3027·0.02887/√3
    assert.closeTo(d.mean, 0.5 / 3, 1e-12)
    assert.closeTo(d.sd, 0.028868, 1e-6)
    assert.closeTo(d.high! - d.mean, (4.302653 * 0.0288675) / Math.sqrt(3), 1e-5)
    assert.isTrue(d.low! > 0)
    const one = meanInterval([1.5])
    assert.strictEqual(one.low, null)
    assert.throws(() => pairedDifference([1, 2], [1]))
  })

  it("bands: per-x mean ± sd over curves; window means", () => {
    const b = bands([[{ x: 1, y: 1 }, { x: 2, y: 3 }], [{ x: 1, y: 3 }, { x: 2, y: 3 }]])
    assert.deepStrictEqual(b.map((p) => [p.x, p.mean]), [[1, 2], [2, 3]])
    assert.closeTo(b[0]!.high - b[0]!.mean, Math.SQRT2, 1e-12)
    assert.strictEqual(b[1]!.low, 3)
    assert.deepStrictEqual(windowMeans([1, 2, 3, 4, 5], 2), [1.5, 3.5, 5])
  })
})

describe("realised compute", () => {
  const base = loaded(moeTiny)
  const concept = loaded({ kind: "conceptmoe", name: "c", baseline: moeTiny, ratio: 2, encoderLayers: 2, decoderLayers: 2, topK: 2, experts: 18, expertHidden: 24 })

  it("at the target R it is the static cost; it is affine in 1/R; overheads exclude subtracts the chunk module and joint decoding", () => {
    const a = concept.analysis
    assert.strictEqual(realisedFlopsPerToken(a, 2), Cost.matmulPerToken(a.cost))
    assert.strictEqual(realisedFlopsPerToken(a, undefined), Cost.matmulPerToken(a.cost))
    // f(R) = token-rate part + body/R: f(1) − f(2) = f(2) − f(∞)
    const f1 = realisedFlopsPerToken(a, 1)
    const f2 = realisedFlopsPerToken(a, 2)
    const fInf = realisedFlopsPerToken(a, 1e12)
    assert.closeTo(f1 - f2, f2 - fInf, 1e-3)
    assert.strictEqual(f1, staticFlopsAt(a, 1, 1))
    const overheads = (a.cost.flops["chunk"] ?? 0) + (a.cost.flops["jointDecoding"] ?? 0)
    assert.isTrue(overheads > 0)
    assert.strictEqual(realisedFlopsPerToken(a, 3, "exclude"), realisedFlopsPerToken(a, 3) - overheads)
    // a model without a concept stage costs the same at any R
    assert.strictEqual(realisedFlopsPerToken(base.analysis, 5), Cost.matmulPerToken(base.analysis.cost))
  })

  it("the report flags a realised cost more than 5% from the matched one, and pairs seeds", () => {
    const pair = Effect.runSync(matchModels(base, concept, { tolerance: 0.01, overheads: "include" }))
    const run = (seed: number, val: number, r?: { meanSampledR: number; valCompression: number }): RunResult => ({ seed, valBitsPerByte: val, tokensPerSecond: 1000, metrics: [], ...(r ?? {}) })
    const settings = Schema.decodeUnknownSync(TrainSettings)({})
    const d = sotuData(0)
    const ref = referenceOnStream(ngramCounts(d.train), d.validation)
    const report = comparisonReport(pair, [[run(0, 3.0), run(1, 3.1)], [run(0, 3.2, { meanSampledR: 1.2, valCompression: 2.05 }), run(1, 3.2, { meanSampledR: 1.2, valCompression: 2.05 })]], {
      overheads: "include",
      reference: { evaluated: ref, validation: ref },
      data: d.info,
      settings
    })
    const c = report.models[1]
    assert.strictEqual(c.targetRatio, 2)
    assert.closeTo(c.realisedTrain!.ratio, 1.2, 1e-12)
    assert.isTrue(c.realisedTrain!.flagged)
    assert.isTrue(c.realisedTrain!.relative > 0.05)
    assert.isFalse(c.realisedEval!.flagged)
    assert.strictEqual(report.warnings.length, 1)
    assert.match(report.warnings[0]!, /R of 1\.20 \(target 2\).*more than the matched/)
    assert.closeTo(report.difference.mean, 0.15, 1e-12)
    assert.strictEqual(report.models[0].realisedTrain, undefined)
    assert.closeTo(report.residual.include.params, 0.00324, 1e-4)
    assert.isTrue(report.residual.exclude.flops < -0.1)
  })
})

describe("the Matched-only entry point", () => {
  it("an unmatched pair from configs is a typed BudgetMismatch", () => {
    const base = loaded(moeTiny)
    const top7 = loaded({ kind: "conceptmoe", name: "1L-top7-R2", baseline: moeTiny, ratio: 2, encoderLayers: 2, decoderLayers: 2, topK: 7 })
    const r = Effect.runSync(Effect.result(matchModels(base, top7, { tolerance: 0.02, overheads: "include" })))
    assert.isTrue(Result.isFailure(r))
    if (Result.isFailure(r)) {
      assert.strictEqual(r.failure._tag, "BudgetMismatch")
      assert.match(r.failure.message, /activated FLOPs\/token differ by \+17\.3/)
    }
    // the paper's convention matches the same pair
    assert.isTrue(Result.isSuccess(Effect.runSync(Effect.result(matchModels(base, top7, { tolerance: 0.01, overheads: "exclude" })))))
  })

  it("only a Matched pair of loaded models type-checks", () => {
    const options = { settings: Schema.decodeUnknownSync(TrainSettings)({}), seeds: [0], data: () => Effect.succeed(sotuData(0)), overheads: "include" as const, out: "x" }
    const fake = { baseline: {}, candidate: {} }
    // @ts-expect-error a plain object is not a Matched proof
    void (() => compareMatched(fake, options))
    const analyses = {} as Matched<Analysis, Analysis>
    // @ts-expect-error a Matched pair of bare analyses does not carry the models
    void (() => compareMatched(analyses, options))
    const ok = {} as MatchedModels
    void (() => compareMatched(ok, options))
  })
})

describe("the solver's expert lever", () => {
  it("with every part counted, topk finds moe-tiny's match by narrower, more numerous concept-model experts", () =>
    Effect.gen(function*() {
      const base = loaded(moeTiny)
      const [best] = yield* reallocate(base.decoder!, base.analysis, { ratio: 2, strategy: "topk", overheads: "include", encoderLayers: 2, decoderLayers: 2 })
      assert.strictEqual(best!.name, "1L-top2-e18-h24-R2")
      assert.isTrue(Math.abs(best!.matched.residual.params) <= 0.01 && Math.abs(best!.matched.residual.flops) <= 0.01)
      assert.deepStrictEqual(best!.matched.excluded, [])
      const off = yield* Effect.result(reallocate(base.decoder!, base.analysis, { ratio: 2, strategy: "topk", overheads: "include", encoderLayers: 2, decoderLayers: 2, expertLever: false }))
      assert.isTrue(Result.isFailure(off))
      // the paper's convention keeps the paper's search (experts unchanged)
      const [paper] = yield* reallocate(base.decoder!, base.analysis, { ratio: 2, strategy: "topk", encoderLayers: 2, decoderLayers: 2 })
      assert.strictEqual(paper!.spec.experts, undefined)
    }).pipe(Effect.runSync))
})

describe("compareMatched", () => {
  const tiny = { kind: "moe", name: "tiny", vocab: 256, hidden: 16, layers: 3, heads: 2, experts: 4, topK: 1, expertHidden: 16, tiedEmbeddings: false, contextLength: 32 }
  const tinyConcept = { kind: "conceptmoe", name: "tiny-concept", baseline: tiny, ratio: 2, encoderLayers: 1, decoderLayers: 1, topK: 2 }
  it.effect("trains both models on two seeds and writes summary.json and losses.svg", () =>
    Effect.gen(function*() {
      // a loose tolerance: this test is about the runs and files, not the match
      const pair = yield* matchModels(loaded(tiny), loaded(tinyConcept), { tolerance: 0.5, overheads: "exclude" })
      const out = fs.mkdtempSync(path.join(os.tmpdir(), "conceptmoe-compare-"))
      const settings = Schema.decodeUnknownSync(TrainSettings)({ seqLen: 32, batchSize: 2, steps: 4, logEvery: 100, evalEvery: 2, evalBatches: 1, checkpointEvery: 4 })
      const { report, runs } = yield* compareMatched(pair, {
        settings,
        seeds: [3, 4],
        data: (seed) => Effect.succeed({ ...sotuData(seed), validation: sotuData(0).validation }),
        overheads: "exclude",
        out,
        quiet: true
      })
      assert.deepStrictEqual(report.seeds, [3, 4])
      assert.strictEqual(runs[0].length, 2)
      assert.isTrue(fs.existsSync(path.join(out, "seed-3", "tiny", "metrics.jsonl")))
      assert.isTrue(fs.existsSync(path.join(out, "seed-4", "tiny-concept", "checkpoint.safetensors")))
      const summary = JSON.parse(fs.readFileSync(path.join(out, "summary.json"), "utf8"))
      assert.strictEqual(summary.models[1].valBitsPerByte.n, 2)
      assert.strictEqual(summary.difference.n, 2)
      assert.isNumber(summary.difference.low)
      assert.isNumber(summary.models[1].realisedTrain.flopsPerToken)
      assert.strictEqual(summary.data.kind, "sotu")
      assert.match(fs.readFileSync(path.join(out, "losses.svg"), "utf8"), /^<svg/)
      // the same seed gives the same result: seed 3's baseline run equals its value in the report
      assert.strictEqual(summary.models[0].runs[0].valBitsPerByte, runs[0][0]!.valBitsPerByte)
    }).pipe(Effect.provide(Layer.merge(backendLayer("wasm"), NodeServices.layer))), 120_000)
})
