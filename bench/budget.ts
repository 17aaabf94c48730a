/**
 * How long static costing takes: JSON → Schema decode → graph → analysis → report.
 *
 * Run: node bench/budget.ts            the example configs (median of 20 runs after 3 warm-ups),
 *                                      then the cost time against the layer count
 *      node bench/budget.ts layers     only the layer sweep
 *
 * The layer sweep costs a Mixtral-shaped config with 1,000 layers up to the limit on layers (16,384,
 * src/graph/Limits.ts) and prints the time per layer, which stays flat when costing is linear in
 * the layer count (it was quadratic before: 16,000 layers took 9.5 s); 100,000 layers are refused.
 */
import { Effect } from "effect"
import * as fs from "node:fs"
import * as path from "node:path"
import { budgetReport } from "../src/cost/Report.ts"
import { limits } from "../src/graph/Limits.ts"
import { modelFromJson } from "../src/models/Load.ts"

const cost = (json: unknown, file: string) => {
  const t0 = performance.now()
  const m = Effect.runSync(modelFromJson(json, file))
  const r = budgetReport(m, { seqLen: 4096 })
  return { ms: performance.now() - t0, params: r.params.total }
}

if (process.argv[2] !== "layers") {
  const dir = path.join(import.meta.dirname, "..", "examples", "hf")
  for (const file of fs.readdirSync(dir).sort()) {
    const json = JSON.parse(fs.readFileSync(path.join(dir, file), "utf8"))
    for (let i = 0; i < 3; i++) cost(json, file)
    const times = Array.from({ length: 20 }, () => cost(json, file).ms).sort((a, b) => a - b)
    const params = cost(json, file).params
    console.log(`${file.padEnd(26)} ${params.toLocaleString("en-US").padStart(19)} params  median ${times[10]!.toFixed(2)} ms`)
  }
  console.log("")
}

const layered = (layers: number) => ({
  model_type: "mixtral",
  num_hidden_layers: layers,
  hidden_size: 64,
  intermediate_size: 64,
  num_attention_heads: 4,
  num_local_experts: 8,
  vocab_size: 256
})
cost(layered(1000), "warm-up.json")
console.log("layers    cost ms   µs per layer")
for (const layers of [1_000, 2_000, 4_000, 8_000, limits.layers]) {
  const { ms } = cost(layered(layers), `layers-${layers}.json`)
  console.log(`${layers.toLocaleString("en-US").padStart(7)}  ${ms.toFixed(0).padStart(8)}  ${((1000 * ms) / layers).toFixed(1).padStart(12)}`)
}
const t0 = performance.now()
const refused = Effect.runSync(Effect.flip(modelFromJson(layered(100_000), "layers-100000.json")))
console.log(`100,000  refused in ${(performance.now() - t0).toFixed(1)} ms: ${refused.message}`)
