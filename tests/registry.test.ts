/**
 * JSON graphs, the registry and path surgery.
 */
import { assert, describe, it } from "@effect/vitest"
import { Effect, Result } from "effect"
import { linear } from "../src/blocks/Linear.ts"
import { mlp } from "../src/blocks/MLP.ts"
import { moe } from "../src/blocks/MoE.ts"
import * as Cost from "../src/cost/Cost.ts"
import { analyze } from "../src/graph/Analyze.ts"
import type { BlockKind } from "../src/graph/Block.ts"
import { Linear } from "../src/blocks/Linear.ts"
import { builtins, fromJson, register, toJson } from "../src/blocks/Registry.ts"
import { pathMatches, replaceAt, select } from "../src/graph/Surgery.ts"
import { loadFile } from "./support/models.ts"

describe("JSON graphs", () => {
  it.effect("toJson then fromJson gives a graph with the same analysis (DeepSeek-V2-Lite)", () =>
    Effect.gen(function*() {
      const m = yield* loadFile("examples/hf/deepseek-v2-lite.json")
      const back = Result.getOrThrow(fromJson(JSON.parse(JSON.stringify(toJson(m.graph))), builtins))
      const a = yield* analyze(back)
      assert.deepStrictEqual(a.cost, m.analysis.cost)
      assert.deepStrictEqual(a.params.map((p) => p.path), m.analysis.params.map((p) => p.path))
    }))

  it("malformed nodes are reported with their JSON path", () => {
    const r = fromJson({ block: "sequence", children: [{ block: "linear" }, { block: "nope" }, 3] }, builtins)
    assert.isTrue(Result.isFailure(r))
    if (Result.isFailure(r)) {
      assert.deepStrictEqual(r.failure.map((p) => p.field), ["graph.children[1].block", "graph.children[2]"])
    }
  })

  it("registering a different kind under a taken name is refused; the same kind twice is fine", () => {
    const impostor: BlockKind = { ...Linear }
    assert.isTrue(Result.isFailure(register(builtins, impostor)))
    assert.isTrue(Result.isSuccess(register(builtins, Linear)))
  })
})

describe("surgery", () => {
  it("patterns: * is one segment, ** any number", () => {
    assert.isTrue(pathMatches("layers/*/ffn/moe", "layers/12/ffn/moe"))
    assert.isFalse(pathMatches("layers/*/ffn/moe", "layers/12/ffn/mlp"))
    assert.isTrue(pathMatches("**/moe", "layers/1/ffn/moe"))
    assert.isFalse(pathMatches("*/moe", "layers/1/ffn/moe"))
  })

  it.effect("replaceAt swaps every matching node, keeps paths, and leaves the original untouched", () =>
    Effect.gen(function*() {
      const m = yield* loadFile("examples/moe-small.json")
      const dense = replaceAt(m.graph, "layers/*/ffn/moe", () => mlp({ d: 128, hidden: 256 }))
      const a = yield* analyze(dense)
      // an unnamed replacement keeps the replaced node's name, so paths are stable
      assert.deepStrictEqual(select(dense, "**/moe").map((s) => s.node.kind.name), ["mlp", "mlp", "mlp", "mlp"])
      const renamed = replaceAt(m.graph, "layers/*/ffn/moe", () => mlp({ d: 128, hidden: 256, name: "mlp" }))
      assert.deepStrictEqual(select(renamed, "layers/*/ffn/mlp").map((s) => s.path), [0, 1, 2, 3].map((i) => `layers/${i}/ffn/mlp`))
      assert.deepStrictEqual(select(m.graph, "**/moe").map((s) => s.node.kind.name), ["moe", "moe", "moe", "moe"])
      assert.strictEqual(a.cost.flops["mlp"], 4 * 6 * 128 * 256)
      assert.isUndefined(a.cost.flops["experts"])
    }))

  it.effect("a replacement of the wrong size is caught by analysis", () =>
    Effect.gen(function*() {
      const m = yield* loadFile("examples/moe-small.json")
      const broken = replaceAt(m.graph, "layers/0/ffn/moe", () => linear({ dIn: 128, dOut: 64 }))
      const e = yield* Effect.flip(analyze(broken))
      assert.include(e.message, "layers/0/ffn [residual]")
      assert.strictEqual(Cost.total((yield* analyze(replaceAt(m.graph, "layers/0/ffn/moe", () => moe({ d: 128, experts: 8, topK: 2, expertHidden: 128 })))).cost.params), Cost.total(m.analysis.cost.params))
    }))
})
