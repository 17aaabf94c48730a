/**
 * Budget-checks a model that uses the user-defined FactorizedMLP: the dense example model with every
 * MLP replaced (by path surgery) by a rank-64 factorised MLP, widened until parameters and FLOPs
 * match the dense baseline exactly.
 *
 * Run: node examples/extending/budget.ts
 */
import { Effect } from "effect"
import * as fs from "node:fs"
import * as path from "node:path"
import { Analyze, Budget, Load, Surgery } from "conceptmoe"
import { factorizedMlp } from "./FactorizedMLP.ts"

const here = import.meta.dirname

/** The dense baseline and its factorised variant, with the budgets matched. */
export const program = Effect.gen(function*() {
  const file = path.join(here, "..", "dense-small.json")
  const dense = yield* Load.modelFromJson(JSON.parse(fs.readFileSync(file, "utf8")), file)
  const d = 128
  const denseHidden = 512
  const rank = 64
  // equal parameters: 3·d·h0 = 3·r·(d + h)  ⇒  h = d·h0/r − d
  const hidden = (d * denseHidden) / rank - d
  const variant = Surgery.replaceAt(dense.graph, "layers/*/ffn/mlp", () => factorizedMlp({ d, hidden, rank }))
  const analysis = yield* Analyze.analyze(variant, { input: "ids" })
  const matched = yield* Budget.match(dense.analysis, analysis, { names: ["dense", "factorized"] })
  return { dense, analysis, matched, hidden }
})

if (import.meta.main) {
  const { hidden, matched } = await Effect.runPromise(program)
  console.log(`factorised MLP: rank 64, hidden ${hidden}`)
  console.log(Budget.renderDiff(matched.rows, ["dense", "factorized"]))
  console.log(`matched: params ${matched.residual.params}, FLOPs/token ${matched.residual.flops}`)
}
