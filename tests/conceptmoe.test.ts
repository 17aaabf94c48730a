/**
 * ConceptMoE as a graph: structure, cost in terms of R, the paper's Table 1 closed forms, the
 * latency-table configurations (method spec §10–§11.4), and bad input.
 */
import { NodeServices } from "@effect/platform-node"
import { assert, describe, it } from "@effect/vitest"
import { Effect, Result } from "effect"
import * as fc from "fast-check"
import * as fs from "node:fs"
import * as os from "node:os"
import * as path from "node:path"
import { match } from "../src/cost/Budget.ts"
import * as Cost from "../src/cost/Cost.ts"
import { baselineStages, conceptStages, stageCosts } from "../src/cost/Stages.ts"
import { buildConceptMoE, type ConceptSpec } from "../src/models/ConceptMoE.ts"
import { loadModel, modelFromJson } from "../src/models/Load.ts"
import { reallocate, type Strategy } from "../src/models/Reallocate.ts"
import { analyzeResult } from "../src/graph/Analyze.ts"
import { load, loadFile, root } from "./support/models.ts"

const spec = (s: Partial<ConceptSpec> & { ratio: number }): ConceptSpec => ({
  encoderLayers: 4,
  decoderLayers: 4,
  merge: "sum",
  tau: 6,
  lambda: 0.03,
  jointDecoding: true,
  loopLayers: 0,
  loopTimes: 2,
  ...s
})

const base = { kind: "moe", vocab: 256, hidden: 256, layers: 16, heads: 8, experts: 64, topK: 8, expertHidden: 64, tiedEmbeddings: true }

/** Concept-model attention map and KV cache, baseline ÷ ConceptMoE, at T. */
const reductions = (baselineAnalysis: any, c: { analysis: any; layout: any }, T: number) => {
  const b = stageCosts(baselineAnalysis, baselineStages(c.layout), { seqLen: T })["conceptModel"]!
  const m = stageCosts(c.analysis, conceptStages, { seqLen: T })["conceptModel"]!
  return { attention: b.attentionMap / m.attentionMap, kv: b.kvElements / m.kvElements }
}

const build = (json: unknown, s: ConceptSpec) =>
  Effect.gen(function*() {
    const m = yield* load(json)
    const built = Result.getOrThrow(buildConceptMoE(m.decoder!, s))
    const a = analyzeResult(built.graph, { input: "ids" })
    if (Result.isFailure(a)) throw new Error(a.failure.message)
    return { baseline: m, analysis: a.success, layout: built.layout }
  })

describe("the ConceptMoE graph", () => {
  it.effect("splits the baseline's layers into encoder, concept model and decoder, with stable paths", () =>
    Effect.gen(function*() {
      const m = yield* loadFile("examples/conceptmoe-base-top.json")
      const paths = m.analysis.params.map((p) => p.path)
      assert.includeMembers(paths, [
        "encoder/3/ffn/moe/router.weight",
        "concept/chunk/q.weight",
        "concept/model/7/ffn/moe/router.weight",
        "decoder/0/mixer/attn/qc.weight",
        "decoder/3/mixer/attn/vc.weight"
      ])
      assert.strictEqual(paths.filter((p) => p.startsWith("concept/model/") && p.endsWith("router.weight")).length, 8)
      assert.deepStrictEqual(m.concept!.layout.encoder, [0, 4])
      assert.deepStrictEqual(m.concept!.layout.decoder, [12, 16])
    }))

  it.effect("chunk module: 2·d² params and 4·d² FLOPs/token; joint decoding: d·hd·(H+2KV) per decoder layer; dechunk: none", () =>
    Effect.gen(function*() {
      const m = yield* loadFile("examples/conceptmoe-base-top.json")
      const d = 256
      assert.strictEqual(m.analysis.cost.params["chunk"], 2 * d * d)
      assert.strictEqual(m.analysis.cost.flops["chunk"], 4 * d * d)
      assert.strictEqual(m.analysis.cost.params["jointDecoding"], 4 * 3 * d * d)
      assert.strictEqual(m.analysis.cost.flops["jointDecoding"], 4 * 2 * 3 * d * d)
      assert.strictEqual(m.analysis.rows.find((r) => r.path === "concept/dechunk")!.params, 0)
    }))

  it.effect("with the baseline's top-k, params differ only by the chunk and joint-decoding parts; FLOPs of the concept model divide by R", () =>
    Effect.gen(function*() {
      for (const R of [1.5, 2, 3.2]) {
        const c = yield* build(base, spec({ ratio: R }))
        const b = c.baseline.analysis
        const extra = (c.analysis.cost.params["chunk"] ?? 0) + (c.analysis.cost.params["jointDecoding"] ?? 0)
        assert.strictEqual(Cost.total(c.analysis.cost.params), Cost.total(b.cost.params) + extra)
        const bs = stageCosts(b, baselineStages(c.layout), { seqLen: 1024 })
        const cs = stageCosts(c.analysis, conceptStages, { seqLen: 1024 })
        assert.closeTo(cs["conceptModel"]!.matmulPerToken, bs["conceptModel"]!.matmulPerToken / R, 1e-6)
        assert.strictEqual(cs["encoder"]!.matmulPerToken, bs["encoder"]!.matmulPerToken)
        assert.strictEqual(cs["encoder"]!.attentionMap, bs["encoder"]!.attentionMap)
      }
    }))

  it.effect("per-path rows inside the concept stage are per input token (scaled by 1/R)", () =>
    Effect.gen(function*() {
      const c = yield* build(base, spec({ ratio: 2 }))
      const layer = c.analysis.rows.find((r) => r.path === "concept/model/0")!
      const encoderLayer = c.analysis.rows.find((r) => r.path === "encoder/0")!
      assert.strictEqual(layer.flops, encoderLayer.flops / 2)
    }))
})

describe("Table 1: the concept model's attention map and KV cache, from the cost model", () => {
  const T = 8192

  it.effect("strategy 1 (more experts): R² and R", () =>
    Effect.gen(function*() {
      for (const R of [1.5, 2, 4]) {
        const c = yield* build(base, spec({ ratio: R, topK: 12 }))
        const r = reductions(c.baseline.analysis, c, T)
        assert.closeTo(r.attention, R * R, 1e-9)
        assert.closeTo(r.kv, R, 1e-9)
      }
    }))

  it.effect("strategy 2 (looping): R²·L_C/(L_C+L_loop) and R·L_C/(L_C+L_loop)", () =>
    Effect.gen(function*() {
      const lc = 8
      for (const [R, loop] of [[2, 8], [1.5, 4], [3, 2]] as const) {
        const c = yield* build(base, spec({ ratio: R, loopLayers: loop }))
        const r = reductions(c.baseline.analysis, c, T)
        assert.closeTo(r.attention, (R * R * lc) / (lc + loop), 1e-9)
        assert.closeTo(r.kv, (R * lc) / (lc + loop), 1e-9)
      }
    }))

  it.effect("strategy 3 (√R wider concept model): R^1.5 and √R", () =>
    Effect.gen(function*() {
      for (const R of [4, 2.25]) {
        const heads = 8 * Math.sqrt(R) // head size 32 kept: d_c = √R·d
        const c = yield* build(base, spec({ ratio: R, hidden: heads * 32, heads, experts: 20 }))
        const r = reductions(c.baseline.analysis, c, T)
        assert.closeTo(r.attention, R ** 1.5, 1e-9)
        assert.closeTo(r.kv, Math.sqrt(R), 1e-9)
        assert.isAbove(c.analysis.cost.params["projector"]!, 0)
      }
    }))
})

describe("the paper's latency-table configurations (method spec §10, §11.4)", () => {
  // attention costs 8 experts' FLOPs (8·d² = 8 · 6·d·h with d = 1536, h = 256), or 7 (d = 1344)
  const named = (file: string, strategy: Strategy, ratio: number) =>
    Effect.gen(function*() {
      const m = yield* loadFile(`examples/latency/${file}`)
      const candidates = yield* reallocate(m.decoder!, m.analysis, { ratio, strategy, limit: 50 })
      return candidates.map((c) => c.name)
    })

  it.effect("attention ≈ 8 experts: 1L-top24-R2 and 1L-top16-R1.5 (strategy 1), 2L-top8-R2 (strategy 2)", () =>
    Effect.gen(function*() {
      assert.strictEqual((yield* named("baseline-attn8.json", "topk", 2))[0], "1L-top24-R2")
      assert.strictEqual((yield* named("baseline-attn8.json", "topk", 1.5))[0], "1L-top16-R1.5")
      assert.include(yield* named("baseline-attn8.json", "loop", 2), "2L-top8-R2")
    }))

  it.effect("attention ≈ 7 experts: 1.5L-top13-R2 and 1.25L-top11-R1.5 (strategy 2)", () =>
    Effect.gen(function*() {
      assert.include(yield* named("baseline-attn7.json", "loop", 2), "1.5L-top13-R2")
      assert.include(yield* named("baseline-attn7.json", "loop", 1.5), "1.25L-top11-R1.5")
    }))
})

/** A random MoE baseline (12–20 layers). */
const baseline = fc.record({
  headDim: fc.constantFrom(16, 32),
  heads: fc.constantFrom(4, 8),
  layers: fc.integer({ min: 12, max: 20 }),
  experts: fc.integer({ min: 32, max: 96 }),
  topK: fc.integer({ min: 2, max: 8 }),
  expertHidden: fc.constantFrom(32, 48, 64)
}).map((b) => ({ kind: "moe", vocab: 128, hidden: b.heads * b.headDim, layers: b.layers, heads: b.heads, experts: b.experts, topK: b.topK, expertHidden: b.expertHidden }))

describe("properties over random baselines and R in [1.25, 4]", () => {
  it.effect("every returned candidate matches within tolerance and its reductions follow the closed forms", () =>
    Effect.sync(() =>
      fc.assert(
        fc.property(baseline, fc.double({ min: 1.25, max: 4, noNaN: true }), fc.constantFrom<Strategy>("topk", "loop"), (json, R, strategy) => {
          const m = Effect.runSync(modelFromJson(json, "random.json"))
          const r = Effect.runSync(Effect.result(reallocate(m.decoder!, m.analysis, { ratio: R, strategy, limit: 3 })))
          if (r._tag === "Failure") return r.failure._tag === "NoReallocation" && r.failure.nearest !== null
          return r.success.every((c) => {
            const again = Effect.runSync(Effect.result(match(m.analysis, c.analysis, { tolerance: 0.01, exclude: ["chunk", "jointDecoding"] })))
            const red = reductions(m.analysis, c, 4096)
            const lc = c.layout.concept[1] - c.layout.concept[0]
            const extra = c.layout.loop === null ? 0 : (c.layout.loop.times - 1) * c.layout.loop.layers
            return again._tag === "Success" &&
              Math.abs(red.attention - (R * R * lc) / (lc + extra)) < 1e-6 * R * R &&
              Math.abs(red.kv - (R * lc) / (lc + extra)) < 1e-6 * R
          })
        }),
        { numRuns: 25 }
      )
    ), 120_000)
})

describe("bad input", () => {
  it.effect("R ≤ 1, and R larger than the sequence", () =>
    Effect.gen(function*() {
      const m = yield* load(base)
      const low = yield* Effect.flip(reallocate(m.decoder!, m.analysis, { ratio: 1, strategy: "topk" }))
      assert.strictEqual(low._tag, "InvalidReallocation")
      assert.include(low.message, "must be a finite number above 1, got 1")
      const high = yield* Effect.flip(reallocate(m.decoder!, m.analysis, { ratio: 5000, strategy: "topk", seqLen: 4096 }))
      assert.include(high.message, "R=5000 leaves less than one concept in a sequence of 4096 tokens; at most 4096")
    }))

  it.effect("a strategy that cannot be met names the constraint and the nearest miss", () =>
    Effect.gen(function*() {
      const m = yield* load({ ...base, experts: 10, topK: 8 })
      const e = yield* Effect.flip(reallocate(m.decoder!, m.analysis, { ratio: 3, strategy: "topk" }))
      assert.strictEqual(e._tag, "NoReallocation")
      assert.include(e.message, "the concept model's top-k is between 1 and 10 experts")
      // the nearest miss: a one-layer topk candidate (the expert lever may have changed its experts), with both residuals
      assert.match(e.message, /nearest: 1L-top\d+(-e\d+)?(-h\d+)?-R3 \(params -?\d+\.\d\d%, FLOPs\/token -?\d+\.\d\d%\)/)
      assert.isTrue(e._tag === "NoReallocation" && e.nearest !== null && Math.max(Math.abs(e.nearest.params), Math.abs(e.nearest.flops)) > 0.01)
    }))

  it.effect("encoder + decoder depth must leave a concept model", () =>
    Effect.gen(function*() {
      const m = yield* load(base)
      const e = yield* Effect.flip(reallocate(m.decoder!, m.analysis, { ratio: 2, strategy: "topk", encoderLayers: 8, decoderLayers: 8 }))
      assert.include(e.message, "encoderLayers (8) + decoderLayers (8) must leave at least one concept-model layer of the baseline's 16; at most 15 in total")
    }))

  it.effect("a ConceptMoE config with a bad top-k, a missing baseline file, joint decoding on MLA", () =>
    Effect.gen(function*() {
      const top = yield* Effect.flip(load({ kind: "conceptmoe", baseline: base, ratio: 2, topK: 65 }, "c.json"))
      assert.include(top.message, "c.json: topK: top-k 65 exceeds the concept model's 64 experts; the nearest valid value is 64")
      const r = yield* Effect.flip(load({ kind: "conceptmoe", baseline: base, ratio: 0.5 }, "c.json"))
      assert.include(r.message, "ratio: the compression ratio R must exceed 1, got 0.5")
      const bad = yield* Effect.flip(load({ kind: "conceptmoe", baseline: { ...base, heads: 3 }, ratio: 2 }, "c.json"))
      assert.include(bad.message, "baseline.heads: hidden (256) is not divisible by heads (3)")
      const mla = yield* Effect.flip(loadFile("examples/hf/deepseek-v2-lite.json").pipe(
        Effect.flatMap((m) => load({ kind: "conceptmoe", baseline: JSON.parse(fs.readFileSync(path.join(root, m.file), "utf8")), ratio: 2 }, "c.json"))
      ))
      assert.include(mla.message, "jointDecoding: joint decoding is defined for multi-head (MHA/GQA) attention")
      const dir = fs.mkdtempSync(path.join(os.tmpdir(), "conceptmoe-c-"))
      fs.writeFileSync(path.join(dir, "c.json"), JSON.stringify({ kind: "conceptmoe", baseline: "nope.json", ratio: 2 }))
      const missing = yield* Effect.flip(loadModel(path.join(dir, "c.json")).pipe(Effect.provide(NodeServices.layer)))
      assert.include(missing.message, `baseline: ${path.join(dir, "nope.json")}: no such file`)
    }))

  it.effect("MLA baselines convert with joint decoding off (DeepSeek-V2-Lite)", () =>
    Effect.gen(function*() {
      const json = JSON.parse(fs.readFileSync(path.join(root, "examples/hf/deepseek-v2-lite.json"), "utf8"))
      const m = yield* load({ kind: "conceptmoe", baseline: json, ratio: 2, jointDecoding: false, topK: 12 })
      assert.strictEqual(m.analysis.cost.params["jointDecoding"], undefined)
      assert.strictEqual(m.analysis.cost.params["chunk"], 2 * 2048 * 2048)
    }))
})
