/**
 * The worked example of docs/extending.md: a block kind defined outside src/, registered, and used.
 */
import { assert, describe, it, layer } from "@effect/vitest"
import { Effect, Result, Schema } from "effect"
import { spawnSync } from "node:child_process"
import * as fs from "node:fs"
import * as path from "node:path"
import { Bottleneck, FactorizedMLP, factorizedMlp } from "../examples/extending/FactorizedMLP.ts"
import { program } from "../examples/extending/budget.ts"
import { Analyze, Apply, Block, Combinators, Cost, Embedding, Registry } from "../src/index.ts"
import { Unsupported } from "../src/internal/RunErrors.ts"
import { layer as backendLayer, Tensors } from "../src/runtime/Backend.ts"
import { forward, materialize, release } from "../src/runtime/Lower.ts"
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

layer(backendLayer("cpu"))("a context key declared by a user-defined kind", (it) => {
  const withRegistry = Effect.provideService(Registry.BlockRegistry, Result.getOrThrow(Registry.register(Registry.builtins, FactorizedMLP)))
  const graph = () => JSON.parse(fs.readFileSync(path.join(root, "examples/extending/factorized-graph.json"), "utf8"))

  it.effect("a pass's provision of the key reaches the kind's apply; without one, the key's default runs and the logits are the same", () =>
    Effect.gen(function*() {
      const { tf } = yield* Tensors
      const m = yield* load(graph(), "g.json").pipe(withRegistry)
      const low = materialize(tf, m.analysis, 5)
      const batch = { rows: 2, length: 8, ids: Int32Array.from({ length: 16 }, (_, i) => (i * 37) % 256) }
      const seen: Array<string> = []
      const watched = tf.tidy(() =>
        Array.from(forward(low, batch, {
          training: false,
          seed: 0,
          provide: [Apply.provide(Bottleneck, () => ({ observe: (scope, name, h) => seen.push(`${scope} ${name} [${h.shape.join(", ")}]`) }))]
        }).logits.dataSync())
      )
      const plain = tf.tidy(() => Array.from(forward(low, batch, { training: false, seed: 0 }).logits.dataSync()))
      assert.deepStrictEqual(seen, ["ffn/mlp gate [16, 16]", "ffn/mlp up [16, 16]", "ffn/mlp down [16, 16]"])
      assert.deepStrictEqual(watched, plain)
      release(low)
    }), 60_000)

  it.effect("a key with no default that nothing provides: Unsupported naming the node and the key", () =>
    Effect.gen(function*() {
      const { tf } = yield* Tensors
      interface Scale {
        readonly factor: number
      }
      const Scale = Apply.ContextKey<Scale>("test/Scale")
      const ScaledSpec = Schema.Struct({ d: Schema.Number })
      const Scaled: Block.BlockKind<typeof ScaledSpec.Type> = {
        name: "scaled",
        summary: "x times a factor from the context",
        spec: ScaledSpec,
        io: (s) => ({ in: s?.d, out: s?.d }),
        cost: () => Cost.zero,
        stream: "local",
        apply: (ctx, _s, x) => ctx.tf.mul(x, ctx.get(Scale).factor)
      }
      const g = Combinators.sequence([Embedding.embedding({ vocab: 16, d: 4, name: "embed" }), Block.leaf<4, 4>(Scaled, { d: 4, name: "scale" })])
      const a = yield* Analyze.analyze(g)
      const low = materialize(tf, a, 1)
      const batch = { rows: 1, length: 3, ids: Int32Array.from([1, 2, 3]) }
      let error: unknown
      tf.tidy(() => {
        try {
          forward(low, batch, { training: false, seed: 0 })
        } catch (e) {
          error = e
        }
      })
      assert.instanceOf(error, Unsupported)
      assert.strictEqual(
        (error as Unsupported).message,
        "scale: needs the context extension \"test/Scale\", which nothing provides: pass it in the forward options' `provide` (Apply.provide), or give the key a default (`make`)"
      )
      // provided for the pass, it is used
      const twice = tf.tidy(() => Array.from(forward(low, batch, { training: false, seed: 0, provide: [Apply.provide(Scale, () => ({ factor: 2 }))] }).logits.dataSync()))
      const embed = Array.from(low.variables.get("embed/weight")!.dataSync())
      assert.deepStrictEqual(twice, [1, 2, 3].flatMap((t) => embed.slice(t * 4, t * 4 + 4).map((v) => Math.fround(v * 2))))
      release(low)
    }))
})
