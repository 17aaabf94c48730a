/**
 * Combinators, the cost algebra and graph checks.
 */
import { assert, describe, it } from "@effect/vitest"
import { Effect } from "effect"
import { attention } from "../src/blocks/Attention.ts"
import { embedding } from "../src/blocks/Embedding.ts"
import { linear } from "../src/blocks/Linear.ts"
import { lmHead } from "../src/blocks/LMHead.ts"
import { mlp } from "../src/blocks/MLP.ts"
import { moe } from "../src/blocks/MoE.ts"
import { rmsNorm } from "../src/blocks/RMSNorm.ts"
import * as Cost from "../src/cost/Cost.ts"
import { analyze } from "../src/graph/Analyze.ts"
import { type AnyBlock, named } from "../src/graph/Block.ts"
import { branch, loop, repeat, residual, sequence } from "../src/graph/Combinators.ts"
import { load } from "./support/models.ts"

const costOf = (b: AnyBlock) => Effect.map(analyze(b), (a) => a.cost)
const params = (c: Cost.Cost) => Cost.total(c.params)

const layer = sequence([
  residual([rmsNorm({ d: 32, name: "norm" }), attention({ d: 32, heads: 4, name: "attn" })], { name: "mixer" }),
  residual([rmsNorm({ d: 32, name: "norm" }), moe({ d: 32, experts: 4, topK: 2, expertHidden: 16, name: "moe" })], { name: "ffn" })
])

describe("the cost algebra", () => {
  it.effect("sequence adds parameters, activated parameters, FLOPs and attention terms", () =>
    Effect.gen(function*() {
      const a = yield* costOf(attention({ d: 32, heads: 4 }))
      const m = yield* costOf(mlp({ d: 32, hidden: 64 }))
      const s = yield* costOf(sequence([attention({ d: 32, heads: 4 }), mlp({ d: 32, hidden: 64 })]))
      assert.strictEqual(params(s), params(a) + params(m))
      assert.strictEqual(Cost.matmulPerToken(s), Cost.matmulPerToken(a) + Cost.matmulPerToken(m))
      assert.strictEqual(Cost.attentionMapFlops(s, 64), Cost.attentionMapFlops(a, 64))
    }))

  it.effect("loop multiplies compute, attention map and KV cache, not parameters", () =>
    Effect.gen(function*() {
      const once = yield* costOf(layer)
      const thrice = yield* costOf(loop(layer, 3))
      assert.deepStrictEqual(thrice.params, once.params)
      assert.deepStrictEqual(thrice.activated, once.activated)
      assert.strictEqual(Cost.matmulPerToken(thrice), 3 * Cost.matmulPerToken(once))
      assert.strictEqual(Cost.attentionMapFlops(thrice, 100), 3 * Cost.attentionMapFlops(once, 100))
      assert.strictEqual(Cost.kvElements(thrice, 100), 3 * Cost.kvElements(once, 100))
    }))

  it.effect("repeat gives distinct weights: everything ×n, parameter paths 0..n-1", () =>
    Effect.gen(function*() {
      const a = yield* analyze(sequence([repeat(layer, 3, { name: "layers" })]))
      const once = yield* costOf(layer)
      assert.strictEqual(params(a.cost), 3 * params(once))
      assert.strictEqual(Cost.matmulPerToken(a.cost), 3 * Cost.matmulPerToken(once))
      assert.includeMembers(a.params.map((p) => p.path), ["layers/0/ffn/moe/router.weight", "layers/2/mixer/attn/q.weight"])
    }))

  it.effect("branch sums or concatenates outputs and adds costs", () =>
    Effect.gen(function*() {
      const s = branch([linear({ dIn: 8, dOut: 4 }), linear({ dIn: 8, dOut: 4 })], "sum")
      const c = branch([linear({ dIn: 8, dOut: 4 }), linear({ dIn: 8, dOut: 6 })], "concat")
      assert.strictEqual(s.out, 4)
      assert.strictEqual(c.out, 10)
      assert.strictEqual(params(yield* costOf(c)), 8 * 4 + 8 * 6)
    }))

  it("atRate scales per-token compute and the sequence the attention sees", () => {
    const c = Cost.make({
      flops: { attention: 100 },
      params: { attention: 7 },
      attention: [{ path: "a", heads: 2, dQK: 4, dV: 4, window: null, ropeDim: 0, passes: 1, rate: 1 }],
      kv: [{ path: "a", elements: 16, window: null, passes: 1, rate: 1 }]
    })
    const half = Cost.atRate(c, 0.5)
    assert.strictEqual(Cost.matmulPerToken(half), 50)
    assert.deepStrictEqual(half.params, { attention: 7 })
    // the map over T/2 positions is a quarter of the map over T; the cache is half
    assert.strictEqual(Cost.attentionMapFlops(half, 100), Cost.attentionMapFlops(c, 100) / 4)
    assert.strictEqual(Cost.kvElements(half, 100), Cost.kvElements(c, 100) / 2)
  })

  it("zero is the identity of add", () => {
    const c = Cost.make({ flops: { x: 3 }, params: { y: 2 } })
    assert.deepStrictEqual(Cost.add(Cost.zero, c), c)
    assert.deepStrictEqual(Cost.add(c, Cost.zero), c)
  })
})

describe("analysis errors name the path", () => {
  const d = (n: number) => n // sizes known only at run time

  it.effect("a size mismatch in a sequence", () =>
    Effect.gen(function*() {
      const g = sequence([linear({ dIn: d(8), dOut: d(16), name: "up" }), linear({ dIn: d(12), dOut: d(4), name: "down" })], { name: "net" })
      const e = yield* Effect.flip(analyze(g))
      assert.strictEqual(e._tag, "InvalidGraph")
      assert.strictEqual(e.problems[0]!.path, "")
      assert.include(e.problems[0]!.message, `child 1 ("down") expects input size 12 but child 0 ("up") outputs 16`)
    }))

  it.effect("a residual branch that changes size, a looped body that changes size", () =>
    Effect.gen(function*() {
      const r = yield* Effect.flip(analyze(sequence([residual([linear({ dIn: d(8), dOut: d(4) })], { name: "res" })])))
      assert.include(r.message, "res [residual]: the residual branch maps size 8 to 4")
      const l = yield* Effect.flip(analyze(loop(linear({ dIn: d(8), dOut: d(4) }) as AnyBlock, 2)))
      assert.include(l.message, "a looped body must keep its size")
    }))

  it.effect("invalid specs are reported with node path and field, all at once", () =>
    Effect.gen(function*() {
      const g = sequence([
        attention({ d: 30, heads: 4, kvHeads: 3, headDim: 8, name: "attn" }),
        named(moe({ d: 30, experts: 4, topK: 6, expertHidden: 8 }), "moe")
      ])
      const e = yield* Effect.flip(analyze(g))
      assert.deepStrictEqual(e.problems.map((p) => [p.path, p.field]), [["attn", "kvHeads"], ["moe", "topK"]])
      assert.include(e.message, "moe [moe] topK: top-k (6) exceeds the number of experts (4)")
    }))

  it.effect("a tied parameter whose owner is missing or of another shape", () =>
    Effect.gen(function*() {
      const missing = yield* Effect.flip(analyze(sequence([
        embedding({ vocab: 10, d: 4, name: "embed" }),
        lmHead({ d: 4, vocab: 10, tiedTo: "wte/weight", name: "head" })
      ])))
      assert.include(missing.message, `head/weight [param]: is tied to "wte/weight", which is not a parameter`)
      const shape = yield* Effect.flip(analyze(sequence([
        embedding({ vocab: 12, d: 4, name: "embed" }),
        lmHead({ d: 4, vocab: 10, tiedTo: "embed/weight", name: "head" })
      ] as ReadonlyArray<AnyBlock>)))
      assert.include(shape.message, "of shape [12,4], but has shape [10,4]")
    }))

  it.effect("two children with the same name", () =>
    Effect.gen(function*() {
      const e = yield* Effect.flip(analyze(sequence([rmsNorm({ d: 4, name: "n" }), rmsNorm({ d: 4, name: "n" })])))
      assert.include(e.message, `two children are named "n"`)
    }))

  it.effect("a model that does not start from token ids", () =>
    Effect.gen(function*() {
      const e = yield* Effect.flip(analyze(linear({ dIn: 4, dOut: 4 }), { input: "ids" }))
      assert.include(e.message, "expects input 4, but the model input is ids")
    }))
})

describe("graph values", () => {
  it.effect("decoder paths are stable and the rows cover every node", () =>
    Effect.gen(function*() {
      const m = yield* load({ kind: "moe", vocab: 64, hidden: 32, layers: 2, heads: 4, experts: 4, topK: 2, expertHidden: 16, denseLayers: 1, denseHidden: 64 })
      const paths = m.analysis.params.map((p) => p.path)
      assert.includeMembers(paths, [
        "embed/weight",
        "layers/0/mixer/norm/weight",
        "layers/0/mixer/attn/q.weight",
        "layers/0/ffn/mlp/gate.weight",
        "layers/1/ffn/moe/experts.down.weight",
        "norm/weight",
        "lmHead/weight"
      ])
      // the root row holds the totals
      const root = m.analysis.rows[0]!
      assert.strictEqual(root.params, Cost.total(m.analysis.cost.params))
      assert.strictEqual(root.flops, Cost.matmulPerToken(m.analysis.cost))
      // parameter list and cost agree
      const listed = m.analysis.params.filter((p) => p.tiedTo === undefined).reduce((s, p) => s + p.numel, 0)
      assert.strictEqual(listed, root.params)
    }))

  it("blocks are frozen values; named returns a renamed copy", () => {
    const a = linear({ dIn: 2, dOut: 3 })
    const b = named(a, "proj")
    assert.strictEqual(a.name, undefined)
    assert.strictEqual(b.name, "proj")
    assert.isTrue(Object.isFrozen(a))
  })
})
