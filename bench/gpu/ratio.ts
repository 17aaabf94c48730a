/**
 * Ratios of our step time to PyTorch eager's, per model, from the JSON lines of
 * bench/gpu/train-step.ts and bench/peers/torch_lm.py: node bench/gpu/ratio.ts ours.jsonl torch.jsonl
 */
import * as fs from "node:fs"

const rows = (file: string): Array<Record<string, unknown>> =>
  fs.readFileSync(file, "utf8").split("\n").flatMap((line) => {
    try {
      const v = JSON.parse(line) as unknown
      return typeof v === "object" && v !== null && "model" in v ? [v as Record<string, unknown>] : []
    } catch {
      return []
    }
  })

const [oursFile, torchFile] = process.argv.slice(2)
if (oursFile === undefined || torchFile === undefined) {
  console.error("usage: node bench/gpu/ratio.ts ours.jsonl torch.jsonl")
  process.exit(2)
}
const torch = new Map(rows(torchFile).map((r) => [r["model"], r]))
const out = rows(oursFile).map((o) => {
  // ours has a "tfjs" and a "replay" line per model on webgpu
  const t = torch.get(o["model"])
  const ours = o["stepMsMedian"] as number | undefined
  const theirs = t?.["stepMsMedian"] as number | undefined
  return {
    model: o["model"],
    mode: o["mode"],
    oursMs: ours,
    issueMs: o["issueMsMedian"],
    torchMs: theirs,
    ratio: ours !== undefined && theirs !== undefined ? Number((ours / theirs).toFixed(2)) : null,
    paramsEqual: t === undefined ? null : t["params"] === o["params"],
    firstLoss: [o["firstLoss"], t?.["firstLoss"]],
    dispatchesPerStep: o["dispatchesPerStep"]
  }
})
console.log(JSON.stringify(out, null, 2))
