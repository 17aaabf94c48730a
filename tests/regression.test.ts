/**
 * Numbers unchanged (issue 21): the compare pair, trained for 20 steps on the cpu backend with a
 * fixed seed, gives the losses recorded in tests/fixtures/regression.json before the redesign, bit
 * for bit, and the same static parameters and FLOPs. The run and every setting it uses are in
 * tests/support/regression.ts; the fixture was written by tests/fixtures/record-regression.ts on
 * the tree of commit c19c380, before the redesign. (Two runs of it gave identical JSON, so the
 * comparison is exact.) The ConceptMoE trains with the paper's ratio loss ("plain"), so that a
 * retuned "pi" controller does not count as a change of numbers, and every part with β₁ 0.9
 * (`partBeta1: {}`), the optimizer of that commit.
 */
import { assert, describe, it } from "@effect/vitest"
import { Effect } from "effect"
import * as fs from "node:fs"
import * as path from "node:path"
import { matchModels } from "../src/train/Compare.ts"
import { load } from "./support/models.ts"
import { baseline, candidate, regressionRun, type RegressionRecord, settings, staticCosts } from "./support/regression.ts"

const fixture: RegressionRecord = JSON.parse(fs.readFileSync(path.join(import.meta.dirname, "fixtures", "regression.json"), "utf8"))

describe("regression: the compare pair before and after the redesign", () => {
  it.effect("static costs: parameters and matmul FLOPs per token, in total and by part", () =>
    Effect.gen(function*() {
      const a = yield* load(baseline)
      const b = yield* load(candidate)
      const statics = ({ name, params, matmulFlopsPerToken, paramsByPart, flopsByPart }: RegressionRecord["models"][number]) => ({ name, params, matmulFlopsPerToken, paramsByPart, flopsByPart })
      assert.deepStrictEqual([staticCosts(a), staticCosts(b)], fixture.models.map(statics))
      assert.deepStrictEqual([fixture.models[0].params, fixture.models[1].params], [711488, 744256])
      // the pair is matched under the paper's convention (chunk module and joint decoding not counted)
      yield* matchModels(a, b, { tolerance: 0.05, overheads: "exclude" })
    }))

  it.effect("20 steps of each on cpu: every step's loss and cross-entropy, the boundary rates and ratio losses, the final validation", () =>
    Effect.gen(function*() {
      assert.deepStrictEqual(settings, fixture.settings)
      const run = yield* regressionRun
      assert.strictEqual(run.models[0].losses.length, 20)
      assert.isDefined(run.models[1].boundaryRate)
      // exact: the cpu backend is deterministic for a fixed seed
      assert.deepStrictEqual(run, fixture)
    }), 600_000)
})
