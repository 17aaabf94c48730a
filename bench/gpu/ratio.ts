/**
 * Ratios of ours to PyTorch eager's, from the JSON lines of the benchmark pairs:
 * - training steps (bench/gpu/train-step.ts and bench/peers/torch_lm.py), per model: our ms / theirs;
 * - fp32 matmul (bench/gpu/matmul.ts and bench/peers/torch_matmul.py), per size: our GFLOP/s / theirs.
 * Run: node bench/gpu/ratio.ts ours.jsonl torch.jsonl
 */
import * as fs from "node:fs"

const rows = (file: string): Array<Record<string, unknown>> =>
  fs.readFileSync(file, "utf8").split("\n").flatMap((line) => {
    try {
      const v = JSON.parse(line) as unknown
      return typeof v === "object" && v !== null && ("model" in v || "n" in v) ? [v as Record<string, unknown>] : []
    } catch {
      return []
    }
  })

const [oursFile, torchFile] = process.argv.slice(2)
if (oursFile === undefined || torchFile === undefined) {
  console.error("usage: node bench/gpu/ratio.ts ours.jsonl torch.jsonl")
  process.exit(2)
}
const keyOf = (r: Record<string, unknown>) => String(r["model"] ?? `n=${String(r["n"])}`)
const torch = new Map(rows(torchFile).map((r) => [keyOf(r), r]))
const ratio = (a: unknown, b: unknown) => (typeof a === "number" && typeof b === "number" ? Number((a / b).toFixed(2)) : null)
const out = rows(oursFile).map((o) => {
  const t = torch.get(keyOf(o))
  if ("n" in o) {
    // matmul: a fraction of PyTorch's throughput (the target is ≥ 0.8)
    return { kernel: o["kernel"], n: o["n"], oursGflops: o["kernelGflops"] ?? o["wallGflops"], torchGflops: t?.["torchGflops"], ofTorch: ratio(o["kernelGflops"] ?? o["wallGflops"], t?.["torchGflops"]) }
  }
  // a training step: how many times PyTorch's time (ours has a "tfjs" and a "replay" line on webgpu)
  return {
    model: o["model"],
    mode: o["mode"],
    oursMs: o["stepMsMedian"],
    issueMs: o["issueMsMedian"],
    torchMs: t?.["stepMsMedian"],
    ratio: ratio(o["stepMsMedian"], t?.["stepMsMedian"]),
    paramsEqual: t === undefined ? null : t["params"] === o["params"],
    firstLoss: [o["firstLoss"], t?.["firstLoss"]],
    dispatchesPerStep: o["dispatchesPerStep"]
  }
})
console.log(JSON.stringify(out, null, 2))
