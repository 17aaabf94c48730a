/**
 * Export to PyTorch: the graph JSON and weight layout here; the PyTorch side (parity with this
 * runtime for every case, torchrun with DDP and FSDP) by running python/tests with pytest in the
 * repository's .venv (created by .ci/run).
 */
import { assert, describe, it } from "@effect/vitest"
import { Effect } from "effect"
import { spawnSync } from "node:child_process"
import * as fs from "node:fs"
import * as path from "node:path"
import { exportGraph, UnsupportedKind } from "../src/layout/Graph.ts"
import { fromTorchTensors, graphOf, torchTensors, transposeLast } from "../src/export/Export.ts"
import { FactorizedMLP } from "../examples/extending/FactorizedMLP.ts"
import { analyzeResult } from "../src/graph/Analyze.ts"
import { make } from "../src/graph/Block.ts"
import { Result } from "effect"
import { load, root } from "./support/models.ts"

const moe = { kind: "moe", name: "m", vocab: 32, hidden: 8, layers: 1, heads: 2, experts: 3, topK: 2, expertHidden: 4, contextLength: 16 }

describe("export", () => {
  it("transposes the last two axes of stacked matrices", () => {
    const x = Float32Array.from({ length: 12 }, (_, i) => i)
    assert.deepStrictEqual([...transposeLast(x, [2, 2, 3])], [0, 3, 1, 4, 2, 5, 6, 9, 7, 10, 8, 11])
    assert.deepStrictEqual([...transposeLast(transposeLast(x, [2, 2, 3]), [2, 3, 2])], [...x])
  })

  it.effect("an MoE decoder gets Hugging Face names, experts one tensor each, and round-trips bit for bit", () =>
    Effect.gen(function*() {
      const model = yield* load(moe)
      const graph = graphOf(model)
      if (graph instanceof UnsupportedKind) return assert.fail(graph.message)
      assert.strictEqual(graph.names, "conceptmoe/moe")
      const up = graph.params.find((p) => p.path === "layers/0/ffn/moe/experts.up.weight")!
      assert.deepStrictEqual(up.file, [0, 1, 2].map((e) => `model.layers.0.mlp.experts.${e}.up_proj.weight`))
      assert.deepStrictEqual(up.torchShape, [3, 4, 8])
      assert.strictEqual(graph.params.find((p) => p.path === "layers/0/mixer/attn/q.weight")!.file, "model.layers.0.self_attn.q_proj.weight")
      const values = new Map(graph.params.filter((p) => p.tiedTo === null).map((p) => [p.path, Float32Array.from({ length: p.shape.reduce((a, b) => a * b, 1) }, () => Math.random())]))
      const tensors = torchTensors(graph, values)
      assert.deepStrictEqual([...tensors.get("model.layers.0.mlp.experts.1.up_proj.weight")!.shape], [4, 8])
      const back = yield* fromTorchTensors(graph, tensors, "mem")
      for (const [k, v] of values) assert.deepStrictEqual([...back.get(k)!], [...v], k)
    }))

  it("a user block kind without a PyTorch module is a typed error naming the kind", () => {
    const block = make(FactorizedMLP, { d: 8, hidden: 16, rank: 2 }, { name: "mlp" })
    const analysis = analyzeResult(block)
    if (Result.isFailure(analysis)) return assert.fail(analysis.failure.message)
    const r = exportGraph(analysis.success, "x")
    assert.instanceOf(r, UnsupportedKind)
    assert.match((r as UnsupportedKind).message, /block kind "factorized-mlp" at \(root\) has no PyTorch module/)
    const withModule = exportGraph(analyzeResult(make({ ...FactorizedMLP, pytorch: "# module" } as typeof FactorizedMLP, { d: 8, hidden: 16, rank: 2 })).pipe(Result.getOrThrow), "x")
    assert.notInstanceOf(withModule, UnsupportedKind)
  })
})

const python = path.join(root, ".venv", "bin", "python")
const hasTorch = fs.existsSync(python) && spawnSync(python, ["-c", "import torch, safetensors, numpy, pytest"]).status === 0

describe.skipIf(!hasTorch)("PyTorch side (pytest python/tests)", () => {
  it("parity with this runtime on every case, and torchrun DDP/FSDP equal to one process", () => {
    const r = spawnSync(python, ["-m", "pytest", "-q", "-p", "no:cacheprovider"], { cwd: path.join(root, "python"), encoding: "utf8", timeout: 1_500_000 })
    const tail = `${r.stdout}\n${r.stderr}`.slice(-4000)
    // pytest: 0 all passed; 5 would be "no tests collected", which is a failure here
    assert.strictEqual(r.status, 0, tail)
    assert.match(r.stdout, /\d+ passed/)
  }, 1_600_000)
})

if (!hasTorch) {
  describe("PyTorch side", () => {
    it.skip(`skipped: ${python} with torch, safetensors, numpy and pytest is not installed (.ci/run installs them with pip)`, () => {})
  })
}
