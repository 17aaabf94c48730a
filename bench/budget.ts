/**
 * How long static costing takes: JSON → Schema decode → graph → analysis → report, per config.
 * Run: node bench/budget.ts   (prints the median of 20 runs after 3 warm-ups)
 */
import { Effect } from "effect"
import * as fs from "node:fs"
import * as path from "node:path"
import { budgetReport } from "../src/cost/Report.ts"
import { modelFromJson } from "../src/models/Load.ts"

const dir = path.join(import.meta.dirname, "..", "examples", "hf")
for (const file of fs.readdirSync(dir).sort()) {
  const json = JSON.parse(fs.readFileSync(path.join(dir, file), "utf8"))
  const once = () => {
    const t0 = performance.now()
    const m = Effect.runSync(modelFromJson(json, file))
    budgetReport(m, { seqLen: 4096 })
    return performance.now() - t0
  }
  for (let i = 0; i < 3; i++) once()
  const times = Array.from({ length: 20 }, once).sort((a, b) => a - b)
  const params = budgetReport(Effect.runSync(modelFromJson(json, file)), { seqLen: 1 }).params.total
  console.log(`${file.padEnd(26)} ${params.toLocaleString("en-US").padStart(19)} params  median ${times[10]!.toFixed(2)} ms`)
}
