/**
 * Ratios of ours to PyTorch eager's, from the JSON lines of the benchmark pairs:
 * - training steps (bench/gpu/train-step.ts and bench/peers/torch_lm.py), per model: our ms / theirs,
 *   and each side's rate on the model's FLOPs per step (`flopsPerStep`, from our cost model);
 * - fp32 matmul (bench/gpu/matmul.ts and bench/peers/torch_matmul.py), per size: our GFLOP/s / theirs.
 * Lines of ours with a `label` (a variant's run, BENCH_LABEL) keep it.
 * Run: node bench/gpu/ratio.ts [--brief] ours.jsonl torch.jsonl
 * (--brief: one aligned line per row instead of JSON; for matmul only the best of our valid kernels per size and tfjs's).
 */
import * as fs from "node:fs"

type Row = Record<string, unknown>

const rows = (file: string): Array<Row> =>
  fs.readFileSync(file, "utf8").split("\n").flatMap((line) => {
    try {
      const v = JSON.parse(line) as unknown
      return typeof v === "object" && v !== null && ("model" in v || "n" in v) ? [v as Row] : []
    } catch {
      return []
    }
  })

const args = process.argv.slice(2)
const brief = args.includes("--brief")
const [oursFile, torchFile] = args.filter((a) => a !== "--brief")
if (oursFile === undefined || torchFile === undefined) {
  console.error("usage: node bench/gpu/ratio.ts [--brief] ours.jsonl torch.jsonl")
  process.exit(2)
}
const keyOf = (r: Row) => String(r["model"] ?? `n=${String(r["n"])}`)
const torch = new Map(rows(torchFile).map((r) => [keyOf(r), r]))
const num = (x: unknown) => (typeof x === "number" && Number.isFinite(x) ? x : undefined)
const ratio = (a: unknown, b: unknown) => {
  const [x, y] = [num(a), num(b)]
  return x !== undefined && y !== undefined && y !== 0 ? Number((x / y).toFixed(2)) : null
}
/** TFLOP/s of `flops` done in `ms` (3 significant digits). */
const tflops = (flops: unknown, ms: unknown) => {
  const [f, t] = [num(flops), num(ms)]
  return f !== undefined && t !== undefined && t > 0 ? Number((f / t / 1e9).toPrecision(3)) : null
}

const ours = rows(oursFile)
const matmuls = ours.filter((o) => "n" in o).map((o) => {
  const t = torch.get(keyOf(o))
  const gflops = o["kernelGflops"] ?? o["wallGflops"]
  // a kernel that the device refused, or whose product differs from tfjs's kernel, is not a result
  // (a NaN difference is written as null: not a result either)
  const wrong = o["error"] !== undefined || ("maxRelDiff" in o && !((num(o["maxRelDiff"]) ?? Infinity) <= 1e-3))
  return {
    kernel: o["kernel"],
    n: o["n"],
    oursGflops: gflops,
    torchGflops: t?.["torchGflops"] ?? null,
    // a fraction of PyTorch's throughput (the target is ≥ 0.8)
    ofTorch: ratio(gflops, t?.["torchGflops"]),
    ...(wrong ? { invalid: o["error"] ?? `maxRelDiff ${String(o["maxRelDiff"])}` } : {})
  }
})
const steps = ours.filter((o) => !("n" in o)).map((o) => {
  const t = torch.get(keyOf(o))
  // a training step: how many times PyTorch's time (ours has a "tfjs" and a "replay" line on webgpu)
  return {
    model: o["model"],
    ...(o["label"] === undefined ? {} : { label: o["label"] }),
    mode: o["mode"],
    oursMs: o["stepMsMedian"],
    issueMs: o["issueMsMedian"],
    gpuStepMs: o["gpuStepMs"],
    torchMs: t?.["stepMsMedian"] ?? null,
    ratio: ratio(o["stepMsMedian"], t?.["stepMsMedian"]),
    oursTflops: tflops(o["flopsPerStep"], o["stepMsMedian"]),
    torchTflops: tflops(o["flopsPerStep"], t?.["stepMsMedian"]),
    paramsEqual: t === undefined ? null : t["params"] === o["params"],
    firstLoss: [o["firstLoss"], t?.["firstLoss"]],
    dispatchesPerStep: o["dispatchesPerStep"],
    ...(o["error"] === undefined ? {} : { error: o["error"] })
  }
})

const show = (x: unknown) => (x === undefined || x === null ? "-" : String(x))
const table = (head: ReadonlyArray<string>, body: ReadonlyArray<ReadonlyArray<unknown>>) => {
  const cells = [head, ...body.map((r) => r.map(show))]
  const widths = head.map((_, i) => Math.max(...cells.map((r) => r[i]!.length)))
  for (const r of cells) console.log(r.map((c, i) => c.padStart(widths[i]!)).join("  "))
}

if (!brief) console.log(JSON.stringify([...matmuls, ...steps], null, 2))
else {
  if (matmuls.length > 0) {
    const sizes = [...new Set(matmuls.map((m) => m.n))]
    table(["n", "tfjs GFLOP/s", "best of ours", "kernel", "PyTorch", "best/PyTorch"], sizes.map((n) => {
      const atN = matmuls.filter((m) => m.n === n)
      const tfjs = atN.find((m) => m.kernel === "tfjs")
      const best = atN.filter((m) => m.kernel !== "tfjs" && !("invalid" in m)).sort((a, b) => (num(b.oursGflops) ?? 0) - (num(a.oursGflops) ?? 0))[0]
      return [n, tfjs?.oursGflops, best?.oursGflops, best?.kernel, atN[0]?.torchGflops, best?.ofTorch]
    }))
    for (const m of matmuls) if ("invalid" in m) console.log(`${String(m.kernel)} at ${String(m.n)}: ${String(m.invalid)} (left out)`)
  }
  if (steps.length > 0) {
    table(["model", "label", "mode", "ours ms", "issue ms", "GPU ms", "PyTorch ms", "ratio", "ours TFLOP/s", "PyTorch TFLOP/s"],
      steps.map((s) => [s.model, s.label, s.mode, s.oursMs, s.issueMs, s.gpuStepMs, s.torchMs, s.ratio, s.oursTflops, s.torchTflops]))
    for (const s of steps) if ("error" in s) console.log(`${String(s.model)} ${show(s.mode)}: ${String(s.error)}`)
  }
}
