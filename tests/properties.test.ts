/**
 * Property tests: the algebra over random valid graphs, and rejection of random invalid configs
 * with a typed error (never a crash).
 */
import { assert, describe, it } from "@effect/vitest"
import { Cause, Effect, Exit } from "effect"
import * as fc from "fast-check"
import { attention } from "../src/blocks/Attention.ts"
import { mlp } from "../src/blocks/MLP.ts"
import { moe } from "../src/blocks/MoE.ts"
import * as Cost from "../src/cost/Cost.ts"
import { analyzeResult } from "../src/graph/Analyze.ts"
import type { AnyBlock } from "../src/graph/Block.ts"
import { loop, sequence } from "../src/graph/Combinators.ts"
import { modelFromJson } from "../src/models/Load.ts"

const runs = { numRuns: 200 }

/** A random valid block of width d. */
const blockOf = (d: number): fc.Arbitrary<AnyBlock> =>
  fc.oneof(
    fc.record({ heads: fc.constantFrom(...[1, 2, 4, 8].filter((h) => d % h === 0)), group: fc.constantFrom(1, 2), window: fc.option(fc.integer({ min: 1, max: 64 }), { nil: null }) })
      .map(({ group, heads, window }) => attention({ d, heads, kvHeads: heads % group === 0 ? heads / group : heads, window })),
    fc.record({ hidden: fc.integer({ min: 1, max: 96 }), activation: fc.constantFrom("swiglu" as const, "gelu" as const, "relu" as const) })
      .map((s) => mlp({ d, ...s })),
    fc.record({ experts: fc.integer({ min: 1, max: 16 }), hidden: fc.integer({ min: 1, max: 48 }), k: fc.nat(), shared: fc.nat({ max: 32 }) })
      .map((s) => moe({ d, experts: s.experts, topK: 1 + (s.k % s.experts), expertHidden: s.hidden, shared: s.shared > 0 ? { hidden: s.shared } : null }))
  )

const width = fc.constantFrom(8, 16, 24, 32)
const pair = width.chain((d) => fc.tuple(blockOf(d), blockOf(d)))

const costOf = (b: AnyBlock): Cost.Cost => {
  const r = analyzeResult(b)
  if (r._tag === "Failure") throw new Error(r.failure.message)
  return r.success.cost
}

const isCount = (n: number) => Number.isInteger(n) && n >= 0

describe("the algebra over random valid graphs", () => {
  it("sequence adds every field", () =>
    fc.assert(
      fc.property(pair, ([a, b]) => {
        const s = costOf(sequence([a, b]))
        const ca = costOf(a)
        const cb = costOf(b)
        return Cost.total(s.params) === Cost.total(ca.params) + Cost.total(cb.params) &&
          Cost.total(s.activated) === Cost.total(ca.activated) + Cost.total(cb.activated) &&
          Cost.matmulPerToken(s) === Cost.matmulPerToken(ca) + Cost.matmulPerToken(cb) &&
          Cost.attentionMapFlops(s, 37) === Cost.attentionMapFlops(ca, 37) + Cost.attentionMapFlops(cb, 37) &&
          Cost.kvElements(s, 37) === Cost.kvElements(ca, 37) + Cost.kvElements(cb, 37)
      }),
      runs
    ))

  it("loop multiplies compute only", () =>
    fc.assert(
      fc.property(pair, fc.integer({ min: 1, max: 6 }), ([a, b], n) => {
        const body = sequence([a, b])
        const once = costOf(body)
        const looped = costOf(loop(body, n))
        return Cost.total(looped.params) === Cost.total(once.params) &&
          Cost.total(looped.activated) === Cost.total(once.activated) &&
          Cost.matmulPerToken(looped) === n * Cost.matmulPerToken(once) &&
          Cost.attentionMapFlops(looped, 50, true) === n * Cost.attentionMapFlops(once, 50, true)
      }),
      runs
    ))

  it("counts are non-negative integers; activated ≤ total; causal map ≤ full map", () =>
    fc.assert(
      fc.property(pair, fc.integer({ min: 1, max: 4096 }), ([a, b], T) => {
        const c = costOf(sequence([a, b]))
        const counts = [
          ...Object.values(c.params),
          ...Object.values(c.activated),
          ...Object.values(c.flops),
          Cost.attentionMapFlops(c, T),
          Cost.attentionMapFlops(c, T, true),
          Cost.kvElements(c, T)
        ]
        return counts.every(isCount) &&
          Cost.total(c.activated) <= Cost.total(c.params) &&
          Cost.attentionMapFlops(c, T, true) <= Cost.attentionMapFlops(c, T)
      }),
      runs
    ))
})

/** A random valid conceptmoe MoE config. */
const validConfig = fc.record({
  vocab: fc.integer({ min: 2, max: 512 }),
  heads: fc.constantFrom(1, 2, 4),
  headDim: fc.constantFrom(4, 8, 16),
  layers: fc.integer({ min: 1, max: 6 }),
  experts: fc.integer({ min: 1, max: 16 }),
  k: fc.nat(),
  expertHidden: fc.integer({ min: 1, max: 64 }),
  tiedEmbeddings: fc.boolean()
}).map((c) => ({
  kind: "moe",
  vocab: c.vocab,
  hidden: c.heads * c.headDim,
  layers: c.layers,
  heads: c.heads,
  experts: c.experts,
  topK: 1 + (c.k % c.experts),
  expertHidden: c.expertHidden,
  tiedEmbeddings: c.tiedEmbeddings
}))

const badValue = fc.constantFrom<unknown>(0, -1, 2.5, "8", null, true, [], {}, Number.NaN, 1e400)

/** A valid config with one field broken (or removed), or a cross-field constraint violated. */
const invalidConfig = fc.oneof(
  fc.tuple(validConfig, fc.constantFrom("vocab", "hidden", "layers", "heads", "experts", "topK", "expertHidden"), badValue)
    .map(([c, key, v]) => ({ ...c, [key]: v })),
  fc.tuple(validConfig, fc.constantFrom("vocab", "hidden", "layers", "heads", "experts", "topK", "expertHidden"))
    .map(([c, key]) => {
      const { [key]: _, ...rest } = c as Record<string, unknown>
      return rest
    }),
  validConfig.map((c) => ({ ...c, topK: c.experts + 1 })),
  validConfig.map((c) => ({ ...c, hidden: c.hidden + 1, heads: c.heads * 2 })),
  validConfig.map((c) => ({ ...c, kind: "transformer" })),
  validConfig.map((c) => ({ ...c, denseLayers: c.layers + 1, denseHidden: 8 }))
)

describe("config decoding", () => {
  it.effect("every random valid config analyses; parameters listed equal parameters counted", () =>
    Effect.sync(() =>
      fc.assert(
        fc.property(validConfig, (c) => {
          const exit = Effect.runSyncExit(modelFromJson(c, "random.json"))
          if (!Exit.isSuccess(exit)) return false
          const a = exit.value.analysis
          const listed = a.params.filter((p) => p.tiedTo === undefined).reduce((s, p) => s + p.numel, 0)
          return listed === Cost.total(a.cost.params)
        }),
        runs
      )
    ))

  it.effect("every random invalid config fails with a typed ConfigError naming the file, never a defect", () =>
    Effect.sync(() =>
      fc.assert(
        fc.property(invalidConfig, (c) => {
          const exit = Effect.runSyncExit(modelFromJson(c, "random.json"))
          if (Exit.isSuccess(exit)) return false
          const err = Cause.findErrorOption(exit.cause)
          if (err._tag !== "Some") return false
          return err.value._tag === "ConfigError" && err.value.message.startsWith("random.json:") &&
            err.value.problems.length > 0
        }),
        runs
      )
    ))
})

it("sanity: the invalid generator really breaks configs", () => {
  assert.strictEqual(Exit.isFailure(Effect.runSyncExit(modelFromJson({ kind: "moe" }, "x.json"))), true)
})
