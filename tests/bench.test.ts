/**
 * The inference benchmark's static prediction and boundary forcing, and `conceptmoe bench inference`
 * as a user runs it (structure and realised ratios; timings are never asserted).
 */
import { assert, describe, it } from "@effect/vitest"
import { Effect } from "effect"
import { spawnSync } from "node:child_process"
import * as fs from "node:fs"
import * as os from "node:os"
import * as path from "node:path"
import * as Cost from "../src/cost/Cost.ts"
import { decodeFlops, forcedEvery, prefillFlops, timeModel } from "../src/infer/Bench.ts"
import { load, root } from "./support/models.ts"

const moe = { kind: "moe", vocab: 256, hidden: 32, layers: 6, heads: 4, experts: 8, topK: 2, expertHidden: 24, tiedEmbeddings: true, contextLength: 4096 }

describe("inference prediction", () => {
  it.effect("prefill and decode FLOPs: weights per token plus the causal attention map, concept layers at rate 1/R", () =>
    Effect.gen(function*() {
      const base = yield* load(moe)
      const F = Cost.matmulPerToken(base.analysis.cost)
      // 6 layers, 4 heads of 8: 2·H·(dqk + dv) = 128 FLOPs per attended pair
      assert.strictEqual(prefillFlops(base.analysis, 100), F * 100 + 6 * 128 * (100 * 101) / 2)
      assert.strictEqual(decodeFlops(base.analysis, 100), F + 6 * 128 * 100)
      const concept = yield* load({ kind: "conceptmoe", baseline: moe, ratio: 2, encoderLayers: 1, decoderLayers: 1, topK: 5 })
      const Fc = Cost.matmulPerToken(concept.analysis.cost)
      // 2 layers at token rate, 4 concept layers over 50 of 100 positions, running on half the steps
      assert.strictEqual(prefillFlops(concept.analysis, 100), Fc * 100 + 2 * 128 * (100 * 101) / 2 + 4 * 128 * (50 * 51) / 2)
      assert.strictEqual(decodeFlops(concept.analysis, 100), Fc + 2 * 128 * 100 + 4 * 0.5 * 128 * 50)
      // the predicted speedup grows with length towards the attention-map limit
      const speedup = (L: number) => prefillFlops(base.analysis, L) / prefillFlops(concept.analysis, L) - 1
      assert.isBelow(speedup(256), speedup(4096))
      assert.isBelow(speedup(1 << 20), (6 / (2 + 4 / 4)) - 1)
    }))

  it("the time model: a·FLOPs with the phase's ms per GFLOP, plus b·kernels", () => {
    const c = { msPerGflopPrefill: 20, msPerGflopDecode: 500, usPerKernel: 10, usPerTinyKernel: 6 }
    // 3 GFLOP at 20 ms/GFLOP = 60 ms; 1,000 kernels at 10 µs = 10 ms
    assert.closeTo(timeModel(c, "prefill", 3e9, 1000), 70, 1e-9)
    // 0.02 GFLOP at 500 ms/GFLOP = 10 ms; 800 kernels = 8 ms
    assert.closeTo(timeModel(c, "decode", 2e7, 800), 18, 1e-9)
    // a variant with half the FLOPs but 1.5× the kernels: 5 + 12 = 17 ms, so +5.9% where the FLOP prediction says +100%
    const base = timeModel(c, "decode", 2e7, 800)
    const concept = timeModel(c, "decode", 1e7, 1200)
    assert.closeTo(concept, 17, 1e-9)
    assert.closeTo(base / concept - 1, 18 / 17 - 1, 1e-12)
  })

  it("forced boundaries close one concept every R tokens, at different steps on different rows", () => {
    for (const R of [1.5, 2, 4]) {
      const f = forcedEvery(R)
      for (const row of [0, 1, 2]) {
        let n = 0
        for (let i = 1; i <= 1200; i++) n += f(row, i) ? 1 : 0
        assert.closeTo(1200 / n, R, 0.01)
      }
      const pattern = (row: number) => Array.from({ length: 12 }, (_, i) => (f(row, i + 1) ? 1 : 0)).join("")
      assert.notStrictEqual(pattern(0), pattern(1))
    }
  })
})

describe("conceptmoe bench inference", () => {
  it("--format json lists measured and predicted speedups per variant, phase and length; writes JSON and SVG", () => {
    const out = fs.mkdtempSync(path.join(os.tmpdir(), "cmoe-bench-"))
    const r = spawnSync(process.execPath, [path.join(root, "bin/conceptmoe.js"), "bench", "inference", "--quick", "--lengths", "16,32", "--rows", "1", "--format", "json", "--out", out], {
      cwd: root,
      encoding: "utf8"
    })
    assert.strictEqual(r.status, 0, r.stderr)
    const rows = JSON.parse(r.stdout) as Array<Record<string, unknown>>
    // 3 ratios × 2 strategies × 2 phases × 2 lengths
    assert.strictEqual(rows.length, 24)
    for (const row of rows) {
      for (const key of ["model", "ratio", "strategy", "phase", "length", "speedupMeasured", "speedupPredicted"]) assert.property(row, key)
      // the time ratio and the time model's numbers, from the row's own measured and predicted values
      const x = row as Record<string, number>
      assert.closeTo(x["timeRatio"]!, (1 + x["speedupMeasured"]!) / (1 + x["speedupPredicted"]!), 1e-9)
      assert.closeTo(x["speedupPredicted"]!, x["flopsBaseline"]! / x["flopsConcept"]! - 1, 1e-9)
      assert.isAbove(x["kernelsBaseline"]!, 0)
      assert.isAbove(x["kernelsConcept"]!, 0)
      assert.closeTo(x["speedupTimeModel"]!, x["msModelBaseline"]! / x["msModelConcept"]! - 1, 1e-9)
      assert.closeTo(x["timeRatioModel"]!, (1 + x["speedupMeasured"]!) / (1 + x["speedupTimeModel"]!), 1e-9)
      assert.oneOf(row["phase"], ["prefill", "decode"])
      assert.oneOf(row["strategy"], ["topk", "loop"])
      assert.strictEqual(row["boundaries"], "forced")
      assert.isTrue(Number.isFinite(row["speedupMeasured"]))
    }
    // the prefill realised the forced ratio (the first token is always a boundary)
    for (const row of rows.filter((x) => x["phase"] === "prefill" && x["length"] === 32)) {
      assert.closeTo(row["compression"] as number, row["ratio"] as number, 0.25 * (row["ratio"] as number))
    }
    const saved = JSON.parse(fs.readFileSync(path.join(out, "inference.json"), "utf8"))
    assert.strictEqual(saved.rows.length, 24)
    assert.strictEqual(saved.models.length, 7)
    // the calibration the time model used, and each row's time model from it and the row's FLOPs and kernels
    const c = saved.calibration
    for (const key of ["msPerGflopPrefill", "msPerGflopDecode", "usPerKernel", "usPerTinyKernel"]) assert.isAbove(c[key], 0)
    for (const row of saved.rows) {
      const a = row.phase === "prefill" ? c.msPerGflopPrefill : c.msPerGflopDecode
      assert.closeTo(row.msModelConcept, (a * row.flopsConcept) / 1e9 + (c.usPerKernel * row.kernelsConcept) / 1000, 1e-9)
    }
    // a decode step of the baseline runs the same kernels whatever the length (no per-expert kernels: fitted dispatch on wasm)
    const decode = saved.rows.filter((x: { phase: string }) => x.phase === "decode")
    assert.strictEqual(decode[0].kernelsBaseline, decode[decode.length - 1].kernelsBaseline)
    // cache bytes per model and part: the baseline first, then each variant's smaller concept-model cache at R ≥ 2 (topk)
    const at32 = saved.caches.filter((c: { length: number }) => c.length === Math.max(...saved.caches.map((x: { length: number }) => x.length)))
    assert.strictEqual(at32.length, 7)
    const top2 = at32.find((c: { model: string }) => c.model === "1L-top6-R2")
    assert.isBelow(top2.conceptModel, at32[0].conceptModel)
    assert.strictEqual(top2.encoder, at32[0].encoder)
    assert.match(fs.readFileSync(path.join(out, "inference.svg"), "utf8"), /^<svg/)
  }, 120_000)

  it("bad input: a config that is not a MoE, bad lengths", () => {
    const run = (...args: Array<string>) => spawnSync(process.execPath, [path.join(root, "bin/conceptmoe.js"), "bench", "inference", ...args], { cwd: root, encoding: "utf8" })
    const a = run("--baseline", "examples/conceptmoe-base-top.json", "--quick")
    // usage errors (a wrong kind of file for --baseline, a malformed flag) exit 2
    assert.strictEqual(a.status, 2)
    assert.match(a.stderr, /conceptmoe-base-top\.json: the baseline must be a decoder \(MoE\) config/)
    const b = run("--lengths", "16,x", "--quick")
    assert.strictEqual(b.status, 2)
    assert.match(b.stderr, /--lengths must be whole numbers/)
    const c = run("--repeats", "0", "--quick")
    assert.strictEqual(c.status, 2)
    assert.match(c.stderr, /--repeats: "0"\. Expected: an integer from 1 to 100/)
  }, 60_000)
})
