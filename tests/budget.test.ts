/**
 * Budgets: `match` returns a branded `Matched` or a `BudgetMismatch` that shows each part.
 */
import { assert, describe, it } from "@effect/vitest"
import { Effect } from "effect"
import { budgetOf, diff, match, type Matched } from "../src/cost/Budget.ts"
import { load } from "./support/models.ts"

const base = { kind: "moe", vocab: 256, hidden: 64, layers: 4, heads: 4, experts: 16, topK: 2, expertHidden: 64 }

describe("match", () => {
  it.effect("a model matches itself with zero residual", () =>
    Effect.gen(function*() {
      const a = yield* load(base)
      const m = yield* match(a.analysis, a.analysis)
      assert.deepStrictEqual(m.residual, { params: 0, flops: 0 })
      assert.strictEqual(m.tolerance, 0.01)
    }))

  it.effect("twice the experts at half the width and twice top-k: only the router differs", () =>
    Effect.gen(function*() {
      const a = yield* load(base)
      const b = yield* load({ ...base, experts: 32, expertHidden: 32, topK: 4 })
      const rows = diff(budgetOf(a.analysis), budgetOf(b.analysis))
      const experts = rows.find((r) => r.metric === "params" && r.part === "experts")!
      assert.strictEqual(experts.delta, 0)
      const router = rows.find((r) => r.metric === "params" && r.part === "router")!
      assert.strictEqual(router.delta, 4 * 64 * 16)
      const routerFlops = rows.find((r) => r.metric === "flops" && r.part === "router")!
      assert.strictEqual(routerFlops.delta, 4 * 2 * 64 * 16)
      const m = yield* match(a.analysis, b.analysis, { tolerance: 0.05 })
      assert.strictEqual(m.residual.params, (4 * 64 * 16) / budgetOf(a.analysis).params)
    }))

  it.effect("a mismatch fails with BudgetMismatch naming the metrics and showing each part", () =>
    Effect.gen(function*() {
      const a = yield* load({ ...base, name: "top2" })
      const b = yield* load({ ...base, topK: 4, name: "top4" })
      const e = yield* Effect.flip(match(a.analysis, b.analysis, { names: ["top2", "top4"] }))
      assert.strictEqual(e._tag, "BudgetMismatch")
      assert.deepStrictEqual(e.failed, ["flops"])
      const experts = e.rows.find((r) => r.metric === "flops" && r.part === "experts")!
      assert.strictEqual(experts.candidate, 2 * experts.baseline)
      assert.include(e.message, "budgets of top2 and top4 do not match within ±1.00%: activated FLOPs/token differ by +")
      assert.match(e.message, /FLOPs\/token\s+experts\s+196,608\s+393,216\s+196,608\s+\+100\.00%/)
    }))

  it.effect("the tolerance is honoured", () =>
    Effect.gen(function*() {
      const a = yield* load(base)
      const b = yield* load({ ...base, topK: 3 })
      const rel = (yield* Effect.flip(match(a.analysis, b.analysis))).rows.find((r) => r.metric === "flops" && r.part === "total")!.relative
      const m = yield* match(a.analysis, b.analysis, { tolerance: rel + 1e-9 })
      assert.strictEqual(m.residual.flops, rel)
    }))
})

describe("Matched is a brand only match can make", () => {
  it("a plain object is not a Matched", () => {
    const needsMatched = (m: Matched) => m.tolerance
    // @ts-expect-error a structurally similar object lacks the brand
    needsMatched({ baseline: null, candidate: null, tolerance: 0, residual: { params: 0, flops: 0 }, rows: [] })
    assert.isFunction(needsMatched)
  })
})
