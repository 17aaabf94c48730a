/**
 * The worked example of docs/extending.md: a block kind defined outside src/, registered, and used.
 */
import { assert, describe, it } from "@effect/vitest"
import { Effect, Result } from "effect"
import { spawnSync } from "node:child_process"
import * as fs from "node:fs"
import * as path from "node:path"
import { FactorizedMLP, factorizedMlp } from "../examples/extending/FactorizedMLP.ts"
import { program } from "../examples/extending/budget.ts"
import { Analyze, Cost, Registry } from "../src/index.ts"
import { load, root } from "./support/models.ts"

describe("a user-defined block kind", () => {
  it.effect("costs by its own formula: 3·r·(d + h) params, twice that in FLOPs", () =>
    Effect.gen(function*() {
      const a = yield* Analyze.analyze(factorizedMlp({ d: 64, hidden: 256, rank: 16 }))
      assert.strictEqual(Cost.total(a.cost.params), 3 * 16 * (64 + 256))
      assert.deepStrictEqual(a.cost.flops, { mlp: 2 * 3 * 16 * (64 + 256) })
    }))

  it.effect("its spec is checked like any other", () =>
    Effect.gen(function*() {
      const e = yield* Effect.flip(Analyze.analyze(factorizedMlp({ d: 64, hidden: 256, rank: 64, name: "mlp" })))
      assert.include(e.message, "(root) [factorized-mlp] rank: rank 64 saves nothing: it must be below min(d, hidden) = 64")
    }))

  it.effect("the example's surgery keeps the budget exactly (examples/extending/budget.ts)", () =>
    Effect.gen(function*() {
      const { analysis, hidden, matched } = yield* program
      assert.strictEqual(hidden, 896)
      assert.deepStrictEqual(matched.residual, { params: 0, flops: 0 })
      const kinds = analysis.rows.filter((r) => r.path.endsWith("/ffn/mlp")).map((r) => r.kind)
      assert.deepStrictEqual(kinds, ["factorized-mlp", "factorized-mlp", "factorized-mlp", "factorized-mlp"])
    }))

  it.effect("a JSON graph naming it loads once it is registered, and not before", () =>
    Effect.gen(function*() {
      const json = JSON.parse(fs.readFileSync(path.join(root, "examples/extending/factorized-graph.json"), "utf8"))
      const before = yield* Effect.flip(load(json, "g.json"))
      assert.include(before.message, `unknown block kind "factorized-mlp"`)
      const registry = Result.getOrThrow(Registry.register(Registry.builtins, FactorizedMLP))
      const m = yield* load(json, "g.json").pipe(Effect.provideService(Registry.BlockRegistry, registry))
      assert.strictEqual(Cost.total(m.analysis.cost.params), 16384 + 16384 + 3 * 64 + 3 * 16 * (64 + 256))
    }))

  it("the CLI registers kinds from --blocks modules", () => {
    const r = spawnSync(process.execPath, [
      "bin/conceptmoe.js",
      "budget",
      "examples/extending/factorized-graph.json",
      "--blocks",
      "examples/extending/FactorizedMLP.ts",
      "--format",
      "json"
    ], { cwd: root, encoding: "utf8" })
    assert.strictEqual(r.status, 0, r.stderr)
    assert.strictEqual(JSON.parse(r.stdout).params.total, 48_320)
  })
})
