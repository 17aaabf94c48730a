/**
 * The package as a library consumer sees it: everything through `conceptmoe` and its subpaths
 * `conceptmoe/runtime`, `conceptmoe/train`, `conceptmoe/export` and `conceptmoe/report` (resolved to the sources inside this repository by the exports condition
 * "conceptmoe-source"), never through deep imports. A user-defined block kind (the extension
 * example) is registered, lowered, verified against its static cost and trained.
 */
import { assert, describe, it } from "@effect/vitest"
import { NodeServices } from "@effect/platform-node"
import { Effect, Layer, Result, Schema } from "effect"
import { spawnSync } from "node:child_process"
import * as fs from "node:fs"
import * as os from "node:os"
import * as path from "node:path"
import { Budget, ConceptMoE, Cost, Load, Reallocate, Registry } from "conceptmoe"
import { Backend, Lower, Verify } from "conceptmoe/runtime"
import { Checkpoint, Compare, Convert, Data, Train } from "conceptmoe/train"
import { Export, Import, Reference } from "conceptmoe/export"
import { Plots, Reallocation } from "conceptmoe/report"
import { FactorizedMLP } from "../examples/extending/FactorizedMLP.ts"
import { root } from "./support/models.ts"

const graphJson = () => JSON.parse(fs.readFileSync(path.join(root, "examples/extending/factorized-graph.json"), "utf8"))
const withRegistry = Effect.provideService(Registry.BlockRegistry, Result.getOrThrow(Registry.register(Registry.builtins, FactorizedMLP)))
const cpu = Effect.provide(Layer.merge(Backend.layer("cpu"), NodeServices.layer))

describe("the package's public entry points", () => {
  it.effect("build, cost, match and reallocate a ConceptMoE from the root entry point", () =>
    Effect.gen(function*() {
      const base = yield* Load.modelFromJson(JSON.parse(fs.readFileSync(path.join(root, "examples/compare/moe-tiny.json"), "utf8")), "moe-tiny.json")
      assert.isDefined(base.decoder)
      const [best] = yield* Reallocate.reallocate(base.decoder!, base.analysis, { ratio: 2, strategy: "topk", encoderLayers: 2, decoderLayers: 2, limit: 1 })
      assert.isDefined(best)
      // the solver's proof of the match is a Budget.Matched value
      assert.isAtMost(Math.abs(best!.matched.residual.flops), 0.01)
      assert.strictEqual(typeof ConceptMoE.buildConceptMoE, "function")
      assert.isAbove(Cost.total(best!.analysis.cost.params), 0)
      const self = yield* Budget.match(base.analysis, base.analysis)
      assert.deepStrictEqual(self.residual, { params: 0, flops: 0 })
      // an unmatched pair is a typed failure, not a Matched value
      const e = yield* Effect.flip(Budget.match(base.analysis, best!.analysis, { tolerance: 1e-9 }))
      assert.strictEqual(e._tag, "BudgetMismatch")
    }))

  it.effect("a user-defined block kind lowers, runs its own apply with the static FLOPs, and trains", () =>
    Effect.gen(function*() {
      const m = yield* Load.modelFromJson(graphJson(), "factorized-graph.json").pipe(withRegistry)
      const { tf } = yield* Backend.Tensors
      const low = Lower.materialize(tf, m.analysis, 3)
      assert.strictEqual(Lower.runtimeParamCount(low), Cost.total(m.analysis.cost.params))
      const data = Data.sotuSplits(Data.byteTokenizer, 0)
      const report = Verify.verify(low, Data.trainBatch(data.validation, 2, 32, 0, 0))
      assert.strictEqual(report.flops.executed, report.flops.staticAtMeasured)
      Lower.release(low)

      const out = fs.mkdtempSync(path.join(os.tmpdir(), "cmoe-consumer-"))
      const settings = Schema.decodeUnknownSync(Train.TrainSettings)({ steps: 12, batchSize: 4, seqLen: 32, logEvery: 12, evalEvery: 12, evalBatches: 1, checkpointEvery: 12, optimizer: { lr: 0.01, warmup: 2 } })
      const r = yield* Train.train(m, settings, { out, resume: false, quiet: true, data }).pipe(withRegistry)
      const losses = r.metrics.map((x) => x.loss)
      assert.strictEqual(losses.length, 12)
      assert.isTrue(losses.every(Number.isFinite))
      // it learns: the last steps' mean loss is below the first steps'
      const mean = (xs: ReadonlyArray<number>) => xs.reduce((a, b) => a + b, 0) / xs.length
      assert.isBelow(mean(losses.slice(-3)), mean(losses.slice(0, 3)) - 0.2)
      const ck = yield* Checkpoint.read(r.checkpoint)
      assert.isTrue(ck.tensors.has("param/ffn/mlp/gate.a"))
    }).pipe(cpu), 120_000)

  it.effect("compare, convert, export, import, reference and report from their subpaths", () =>
    Effect.gen(function*() {
      const base = yield* Load.modelFromJson(JSON.parse(fs.readFileSync(path.join(root, "examples/compare/moe-tiny.json"), "utf8")), "moe-tiny.json")
      const [best] = yield* Reallocate.reallocate(base.decoder!, base.analysis, { ratio: 2, strategy: "topk", encoderLayers: 2, decoderLayers: 2, limit: 1 })
      // Compare: a model against itself differs by nothing; the ConceptMoE matched under the paper's
      // convention (chunk module and joint decoding left out) differs by at most 1% of FLOPs there, more with them counted
      const self = Compare.residuals(base.analysis, base.analysis)
      assert.deepStrictEqual(self, { include: { params: 0, flops: 0 }, exclude: { params: 0, flops: 0 } })
      const r = Compare.residuals(base.analysis, best!.analysis)
      assert.isAtMost(Math.abs(r.exclude.flops), 0.01)
      assert.isAbove(Math.abs(r.include.flops), 0.05)
      assert.strictEqual(Compare.realisedFlopsPerToken(base.analysis, undefined), Cost.matmulPerToken(base.analysis.cost))
      // Convert: which trained MoE layer a converted parameter starts from (6 layers, 2 + 2 outer)
      assert.strictEqual(Convert.sourcePath("decoder/1/ffn/router.weight", 6, 2, 2), "layers/5/ffn/router.weight")
      assert.strictEqual(Convert.sourcePath("concept/model/0/ffn/router.weight", 6, 2, 2), "layers/2/ffn/router.weight")
      assert.isUndefined(Convert.sourcePath("concept/chunk/q.weight", 6, 2, 2))

      // Export then Import: the written weights read back as the values exported
      const { tf } = yield* Backend.Tensors
      const low = Lower.materialize(tf, base.analysis, 5)
      const params = new Map<string, Float32Array>()
      for (const [p, v] of low.variables) params.set(p, v.dataSync() as Float32Array)
      Lower.release(low)
      const out = path.join(fs.mkdtempSync(path.join(os.tmpdir(), "cmoe-consumer-export-")), "torch")
      const graph = yield* Export.writeExport(base, params, out, {})
      const expected = Export.torchTensors(graph, params)
      const stored = yield* Import.readHeader(path.join(out, "model.safetensors"))
      assert.deepStrictEqual([...stored.keys()].sort(), [...expected.keys()].sort())
      const [name, want] = [...expected].find(([, t]) => t.shape.length === 2)!
      assert.deepStrictEqual([...stored.get(name)!.shape], [...want.shape])
      assert.deepStrictEqual(yield* Import.readTensor(stored.get(name)!), Float32Array.from(want.data))
      // Reference: the check batch's targets are the next ids, cut at row ends and at the document start
      const b = Reference.referenceBatch(256, 2, 8, 3)
      assert.deepStrictEqual([...b.documentStarts!], [12])
      assert.deepStrictEqual([...b.targets!].map((t, i) => (t === -1 ? i : -1)).filter((i) => i >= 0), [7, 11, 15])
      assert.strictEqual(b.targets![0], b.ids[1])

      // Report: a chart renders to SVG with its title; the report's lengths run from 4K to 1M
      const svg = yield* Effect.promise(() => Plots.toSvg(Plots.lineChart({ title: "consumer check", x: "n", y: "y", rows: [{ series: "a", x: 1, y: 2 }, { series: "a", x: 2, y: 4 }] })))
      assert.match(svg, /^<svg/)
      assert.include(svg, "consumer check")
      assert.deepStrictEqual([Reallocation.lengths[0], Reallocation.lengths.at(-1)], [4096, 1048576])
    }).pipe(cpu), 120_000)

  it("plain Node resolves `conceptmoe` to the sources with the condition (no build needed)", () => {
    const script = `const m = await import("conceptmoe"); const r = await import("conceptmoe/runtime"); ` +
      `const e = await import("conceptmoe/export"); const p = await import("conceptmoe/report"); ` +
      `console.log(typeof m.Analyze.analyze, typeof r.Lower.materialize, typeof e.Export.writeExport, typeof p.Plots.toSvg)`
    const node = path.join(root, "node_modules", "node", "bin", "node")
    const r = spawnSync(fs.existsSync(node) ? node : process.execPath, ["--conditions=conceptmoe-source", "--input-type=module", "-e", script], { cwd: root, encoding: "utf8" })
    assert.strictEqual(r.status, 0, r.stderr)
    assert.strictEqual(r.stdout.trim(), "function function function function")
  })
})
