/**
 * The plot of docs/performance.md: per model, the host time per training step until its work is
 * handed to the GPU, through tfjs and replayed from a recording, and the whole step where a PyTorch
 * peer ran. Input: the JSON lines of bench/gpu/train-step.ts (and optionally of
 * bench/peers/torch_lm.py). Run: node bench/gpu/plot.ts ours.jsonl [torch.jsonl] out.svg
 */
import * as fs from "node:fs"
import type { TopLevelSpec } from "vega-lite"
import { toSvg } from "../../src/report/Plots.ts"

const lines = (file: string): Array<Record<string, unknown>> =>
  fs.readFileSync(file, "utf8").split("\n").flatMap((l) => {
    try {
      const v = JSON.parse(l) as unknown
      return typeof v === "object" && v !== null && "model" in v ? [v as Record<string, unknown>] : []
    } catch {
      return []
    }
  })

const args = process.argv.slice(2)
const out = args.pop()
if (out === undefined || args.length === 0) {
  console.error("usage: node bench/gpu/plot.ts ours.jsonl [torch.jsonl] out.svg")
  process.exit(2)
}
const rows: Array<{ model: string; what: string; ms: number }> = []
for (const r of lines(args[0]!)) {
  const model = String(r["model"])
  const mode = r["mode"] === "replay" ? "replayed" : "through tfjs"
  if (typeof r["issueMsMedian"] === "number") rows.push({ model, what: `host time, ${mode}`, ms: r["issueMsMedian"] })
  if (typeof r["stepMsMedian"] === "number") rows.push({ model, what: `whole step, ${mode}`, ms: r["stepMsMedian"] })
}
if (args[1] !== undefined) {
  for (const r of lines(args[1])) if (typeof r["stepMsMedian"] === "number") rows.push({ model: String(r["model"]), what: "whole step, PyTorch eager", ms: r["stepMsMedian"] })
}
const spec: TopLevelSpec = {
  $schema: "https://vega.github.io/schema/vega-lite/v6.json",
  title: "Training step on the webgpu backend: ms per step (median)",
  width: 520,
  data: { values: rows },
  mark: "bar",
  encoding: {
    y: { field: "model", type: "nominal", title: null, sort: null },
    yOffset: { field: "what", sort: null },
    // a log scale cannot hold the bars' zero baseline: bars start at 1 ms
    x: { field: "ms", type: "quantitative", title: "ms per step (log)", scale: { type: "log", domainMin: 1 } },
    x2: { datum: 1 },
    color: { field: "what", type: "nominal", title: "", sort: null, legend: { labelLimit: 400 } },
    tooltip: [{ field: "model" }, { field: "what" }, { field: "ms", format: ",.2f" }]
  }
}
const tmp = `${out}.tmp-${process.pid}`
fs.writeFileSync(tmp, await toSvg(spec))
fs.renameSync(tmp, out)
console.log(`wrote ${out} (${rows.length} bars)`)
