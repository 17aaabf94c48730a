/**
 * CPU training steps against PyTorch, in one run: `npm run bench:train [-- options]`.
 *
 * For the workloads of bench/gpu/train-step.ts (dense-2L-d128, moe-tiny, conceptmoe-1L-top7-R2: the
 * same models, batch and token ids) and each thread count, it times our step (forward, backward,
 * clipping, AdamW; wasm backend; 1 thread in this process, more through `src/train/Parallel.ts`'s
 * worker threads) between two runs of the PyTorch eager peer (bench/peers/torch_lm.py, CPU,
 * `torch.set_num_threads`), so that both sides see the same machine load, and prints the ratio
 * ours ÷ PyTorch (against the mean of PyTorch's two runs). Then, for one thread, where our step's
 * time goes: one step under `tf.profile`, its kernels by kind (matmul, batched matmul, transpose,
 * elementwise, reductions, gather/segment, copies and reshapes, and the optimizer: clipping and
 * AdamW, the kernels of a whole step beyond those of its gradients alone), with their count and
 * summed kernel time, and the rest of the step's time outside kernels (host: tfjs's dispatch,
 * JS between kernels, garbage collection). For several threads, where the step's time goes between
 * the threads' shards, the wait and the serial part (`ParallelTrainer.timings`).
 *
 * Writes `results.jsonl` (one line per measurement), `summary.md` (the tables) and `train.svg` (the
 * plot) under `--out` (default runs/bench-train). PyTorch comes from `.venv/bin/python` (else
 * `python3`); where neither imports torch, the benchmark says so and prints ours alone.
 *
 * Options: --models a,b  --threads 1,2  --steps N (timed; default 5)  --warmup N (untimed steps
 *          first, ours and PyTorch's alike; default 10: with two threads on two cores V8's background
 *          compilation of the MoE steps' code competes with the threads for about the first 15 steps)
 *          --out DIR  --no-torch  --no-profile  --label TEXT (tags every line, e.g. "before")
 */
import { Effect, Schema } from "effect"
import { execFileSync } from "node:child_process"
import * as fs from "node:fs"
import * as path from "node:path"
import type { TopLevelSpec } from "vega-lite"
import type { Tf } from "../src/graph/Apply.ts"
import { modelFromJson } from "../src/models/Load.ts"
import { toSvg } from "../src/report/Plots.ts"
import { load } from "../src/runtime/Backend.ts"
import { type Batch, loss, materialize, release } from "../src/runtime/Lower.ts"
import { newOptimizer, stepOptions, trainStep, TrainSettings } from "../src/train/Step.ts"
const root = path.join(import.meta.dirname, "..")

// the workloads of bench/gpu/train-step.ts (which runs when imported, so they are repeated here)
const moe = JSON.parse(fs.readFileSync(path.join(root, "examples", "compare", "moe-tiny.json"), "utf8"))
const dense = (layers: number, d: number, heads: number) => ({ kind: "dense", vocab: 256, hidden: d, layers, heads, ffnHidden: 4 * d, activation: "gelu", contextLength: 256 })
const workloads = [
  { name: "dense-2L-d128", config: dense(2, 128, 4), rows: 8, length: 128 },
  { name: "moe-tiny", config: moe, rows: 8, length: 128 },
  { name: "conceptmoe-1L-top7-R2", config: { kind: "conceptmoe", baseline: moe, ratio: 2, encoderLayers: 2, decoderLayers: 2, topK: 7 }, rows: 8, length: 128 }
] as const
const argv = process.argv.slice(2)
const option = (name: string): string | undefined => {
  const i = argv.indexOf(name)
  return i >= 0 ? argv[i + 1] : undefined
}
const flag = (name: string) => argv.includes(name)
const names = (option("--models") ?? "dense-2L-d128,moe-tiny,conceptmoe-1L-top7-R2").split(",")
const threadCounts = (option("--threads") ?? "1,2").split(",").map(Number)
const timed = Number(option("--steps") ?? 5)
const warmup = Number(option("--warmup") ?? 10)
const out = path.resolve(option("--out") ?? path.join(root, "runs", "bench-train"))
const label = option("--label")
for (const t of threadCounts) if (!Number.isInteger(t) || t < 1) throw new Error(`--threads: expected whole numbers ≥ 1, got "${option("--threads")}"`)
if (!Number.isInteger(timed) || timed < 1) throw new Error(`--steps: expected a whole number ≥ 1, got "${option("--steps")}"`)
if (!Number.isInteger(warmup) || warmup < 0) throw new Error(`--warmup: expected a whole number ≥ 0, got "${option("--warmup")}"`)
const chosen = workloads.filter((w) => names.includes(w.name))
if (chosen.length !== names.length) throw new Error(`--models: expected names among ${workloads.map((w) => w.name).join(", ")}`)

/** The batch of bench/gpu/train-step.ts and torch_lm.py (the same token ids and targets). */
const batchOf = (rows: number, length: number): Batch => ({
  rows,
  length,
  ids: new Int32Array(rows * length).map((_, i) => (i * 7 + (i % 13) * 5) % 256),
  targets: new Int32Array(rows * length).map((_, i) => (i * 11 + 3) % 256)
})

const median = (xs: ReadonlyArray<number>) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)]!
const round = (x: number, d = 2) => Number(x.toFixed(d))

// ---- PyTorch ----------------------------------------------------------------------------------

const python = [path.join(root, ".venv", "bin", "python"), "python3"].find((p) => {
  try {
    execFileSync(p, ["-c", "import torch"], { stdio: "ignore" })
    return true
  } catch {
    return false
  }
})
const torchVersion = python === undefined || flag("--no-torch") ? undefined : execFileSync(python, ["-c", "import torch; print(torch.__version__)"], { encoding: "utf8" }).trim()

type TorchLine = { model: string; stepMsMedian: number; firstLoss: number; params: number; threads: number }
const runTorch = (threads: number): Array<TorchLine> => {
  if (python === undefined || torchVersion === undefined) return []
  const text = execFileSync(python, [path.join(root, "bench", "peers", "torch_lm.py"), "cpu", chosen.map((w) => w.name).join(","), "--threads", String(threads), "--steps", String(timed), "--warmup", String(warmup)], { encoding: "utf8" })
  return text.split("\n").filter((l) => l.startsWith("{")).map((l) => JSON.parse(l) as TorchLine)
}

// ---- ours -------------------------------------------------------------------------------------

const settingsOf = (w: typeof workloads[number], threads: number) =>
  Schema.decodeUnknownSync(TrainSettings)({ steps: 100, batchSize: w.rows, seqLen: w.length, seed: 0, ...(threads > 1 ? { threads } : {}) })

/** Times `timed` steps after `warmup` untimed ones at `threads` threads; the first loss and the step times. */
const timeOurs = async (tf: Tf, w: typeof workloads[number], threads: number) => {
  const m = await Effect.runPromise(modelFromJson(w.config, `${w.name}.json`))
  const settings = settingsOf(w, threads)
  const batch = batchOf(w.rows, w.length)
  const times: Array<number> = []
  let first = NaN
  let parallel: Record<string, number> | undefined
  if (threads === 1) {
    const low = materialize(tf, m.analysis, 1)
    const opt = newOptimizer(low)
    try {
      for (let s = 0; s < warmup + timed; s++) {
        const t0 = performance.now()
        const r = trainStep(low, opt, batch, settings, s)
        if (s === 0) first = r.loss
        if (s >= warmup) times.push(performance.now() - t0)
      }
    } finally {
      release(low)
      tf.dispose([...opt.m.values(), ...opt.v.values()])
    }
  } else {
    const { parallelTrainer } = await import("../src/train/Parallel.ts")
    const low = materialize(tf, m.analysis, 1)
    const opt = newOptimizer(low)
    const trainer = await parallelTrainer(low, opt, m.config, settings, threads)
    const spent: Array<ReturnType<typeof trainer.timings>> = []
    try {
      for (let s = 0; s < warmup + timed; s++) {
        const t0 = performance.now()
        const r = await trainer.step(batch, s)
        if (s === 0) first = r.loss
        if (s >= warmup) {
          times.push(performance.now() - t0)
          spent.push(trainer.timings())
        }
      }
      const med = (f: (t: typeof spent[number]) => number) => round(median(spent.map(f)))
      parallel = {
        ownShard: med((t) => t.own),
        wait: med((t) => t.wait),
        workerShard: med((t) => t.worker.shard),
        publish: med((t) => t.publish),
        workerLoadWrite: med((t) => t.worker.load + t.worker.write),
        combine: med((t) => t.combine),
        apply: med((t) => t.apply)
      }
    } finally {
      await trainer.dispose()
      release(low)
      tf.dispose([...opt.m.values(), ...opt.v.values()])
    }
  }
  return { params: m.analysis.rows[0]!.params, stepMs: median(times), firstLoss: first, ...(parallel === undefined ? {} : { parallel }) }
}

/** The kind of a kernel, for the breakdown; undefined for wrappers that time other kernels inside them. */
const kindOf = (tf: Tf, name: string, shapes: ReadonlyArray<ReadonlyArray<number> | undefined>): string | undefined => {
  if (tf.getKernel(name, tf.getBackend()) === undefined) return undefined
  if (name === "BatchMatMul" || name === "_FusedMatMul" || name === "ConceptmoeMatMul" || name === "ConceptmoeTriangularMatMul") {
    const a = shapes[0] ?? []
    const b = shapes[1] ?? []
    const batch = Math.max(a.slice(0, -2).reduce((x, y) => x * y, 1), b.slice(0, -2).reduce((x, y) => x * y, 1))
    return batch > 1 ? "batched matmul" : "matmul"
  }
  if (name === "Transpose") return "transpose"
  if (/^(Sum|Max|Min|Mean|Prod|Cumsum|Cumprod|ArgMax|ArgMin|All|Any|Softmax|ConceptmoeSumSquares)$/.test(name)) return "reductions"
  if (/^(GatherV2|GatherNd|UnsortedSegmentSum|ScatterNd|SparseToDense|TopK|OneHot|SearchSorted|TensorScatterUpdate)$/.test(name)) return "gather/segment"
  if (/^(Reshape|Identity|Cast|Slice|StridedSlice|Concat|Pack|Unpack|SplitV|PadV2|Fill|Range|Tile|Reverse|ZerosLike|OnesLike)$/.test(name)) return "copies/reshapes"
  if (/Adam/.test(name)) return "optimizer"
  return "elementwise"
}

type Kinds = Map<string, { kernels: number; ms: number }>
const profileKinds = async (tf: Tf, f: () => void): Promise<Kinds> => {
  const info = await tf.profile(f)
  const kinds: Kinds = new Map()
  for (const k of info.kernels) {
    const kind = kindOf(tf, k.name, k.inputShapes as never)
    if (kind === undefined) continue
    const e = kinds.get(kind) ?? { kernels: 0, ms: 0 }
    e.kernels++
    e.ms += k.kernelTimeMs as number
    kinds.set(kind, e)
  }
  return kinds
}

/**
 * Where a one-thread step's time goes: kernels by kind (a whole step's, with the kernels beyond its
 * gradients' counted as the optimizer's), and the step's time outside kernels.
 */
const profileOurs = async (tf: Tf, w: typeof workloads[number]) => {
  const m = await Effect.runPromise(modelFromJson(w.config, `${w.name}.json`))
  const settings = settingsOf(w, 1)
  const batch = batchOf(w.rows, w.length)
  const low = materialize(tf, m.analysis, 1)
  const opt = newOptimizer(low)
  try {
    for (let s = 0; s < 2; s++) trainStep(low, opt, batch, settings, s)
    const plain: Array<number> = []
    for (let s = 2; s < 5; s++) {
      const t0 = performance.now()
      trainStep(low, opt, batch, settings, s)
      plain.push(performance.now() - t0)
    }
    const whole = await profileKinds(tf, () => void trainStep(low, opt, batch, settings, 5))
    const vars = [...low.variables.values()]
    const grads = await profileKinds(tf, () =>
      tf.tidy(() => {
        const { value } = tf.variableGrads(() => loss(low, batch, stepOptions(low, settings, 6)).total, vars)
        value.dataSync()
      }))
    const sum = (k: Kinds, f: (e: { kernels: number; ms: number }) => number) => [...k.values()].reduce((a, e) => a + f(e), 0)
    const kinds: Record<string, { kernels: number; ms: number }> = {}
    for (const [kind, e] of grads) if (kind !== "optimizer") kinds[kind] = { kernels: e.kernels, ms: round(e.ms) }
    kinds["optimizer"] = { kernels: sum(whole, (e) => e.kernels) - sum(grads, (e) => e.kernels), ms: round(Math.max(0, sum(whole, (e) => e.ms) - sum(grads, (e) => e.ms))) }
    const stepMs = median(plain)
    const kernelMs = sum(whole, (e) => e.ms)
    return { stepMs: round(stepMs), kernels: sum(whole, (e) => e.kernels), kernelMs: round(kernelMs), hostMs: round(Math.max(0, stepMs - kernelMs)), kinds }
  } finally {
    release(low)
    tf.dispose([...opt.m.values(), ...opt.v.values()])
  }
}

// ---- the run ----------------------------------------------------------------------------------

const main = async () => {
  const { tf, description } = await Effect.runPromise(load("wasm"))
  fs.mkdirSync(out, { recursive: true })
  const lines: Array<Record<string, unknown>> = []
  const emit = (line: Record<string, unknown>) => {
    const l = { ...(label === undefined ? {} : { label }), ...line }
    lines.push(l)
    console.log(JSON.stringify(l))
  }
  emit({ ours: description, torch: torchVersion ?? (flag("--no-torch") ? "not run (--no-torch)" : "no PyTorch installed (create .venv: python3 -m venv .venv && .venv/bin/pip install torch numpy)"), cores: (await import("node:os")).cpus().length, loadAverage: (await import("node:os")).loadavg().map((x) => round(x)) })
  const rows: Array<{ model: string; threads: number; oursMs: number; torchMs?: number; ratio?: number }> = []
  const spentBy: Array<{ model: string; threads: number; ownShard: number; wait: number; workerShard: number; publish: number; workerLoadWrite: number; combine: number; apply: number }> = []
  for (const threads of threadCounts) {
    const before = runTorch(threads)
    const ours = new Map<string, Awaited<ReturnType<typeof timeOurs>>>()
    for (const w of chosen) {
      const r = await timeOurs(tf, w, threads).catch((e: unknown) => ({ error: (e instanceof Error ? e.message : String(e)).split("\n")[0]! }))
      if ("error" in r) {
        emit({ side: "ours", model: w.name, threads, error: r.error })
        continue
      }
      ours.set(w.name, r)
      emit({ side: "ours", model: w.name, threads, params: r.params, stepMsMedian: round(r.stepMs), firstLoss: r.firstLoss, ...(r.parallel === undefined ? {} : { parallel: r.parallel }) })
      if (r.parallel !== undefined) spentBy.push({ model: w.name, threads, ...r.parallel } as typeof spentBy[number])
    }
    const after = runTorch(threads)
    for (const w of chosen) {
      const t = [before, after].flatMap((run) => run.filter((l) => l.model === w.name))
      for (const l of t) emit({ side: "torch", torch: torchVersion, ...l })
      const o = ours.get(w.name)
      if (o === undefined) continue
      const torchMs = t.length > 0 ? t.reduce((a, l) => a + l.stepMsMedian, 0) / t.length : undefined
      rows.push({ model: w.name, threads, oursMs: round(o.stepMs), ...(torchMs === undefined ? {} : { torchMs: round(torchMs), ratio: round(o.stepMs / torchMs) }) })
    }
  }
  const profiles = new Map<string, Awaited<ReturnType<typeof profileOurs>>>()
  if (!flag("--no-profile")) {
    for (const w of chosen) {
      const p = await profileOurs(tf, w)
      profiles.set(w.name, p)
      emit({ side: "profile", model: w.name, threads: 1, ...p })
    }
  }
  // tables
  const md: Array<string> = []
  md.push(`ours: ${description}; PyTorch: ${torchVersion ?? "not installed"}; ${timed} timed steps after ${warmup} warm-ups (each side), medians; PyTorch run before and after ours, mean of the two${label === undefined ? "" : `; label ${label}`}`)
  md.push("", "| model | threads | ours ms/step | PyTorch ms/step | ours ÷ PyTorch |", "|---|---|---|---|---|")
  for (const r of rows) md.push(`| ${r.model} | ${r.threads} | ${r.oursMs} | ${r.torchMs ?? "—"} | ${r.ratio === undefined ? "—" : `${r.ratio}×`} |`)
  const scaling = chosen.flatMap((w) => {
    const one = rows.find((r) => r.model === w.name && r.threads === 1)
    return rows.filter((r) => r.model === w.name && r.threads > 1 && one !== undefined).map((r) => `| ${w.name} | 1 → ${r.threads} | ${round(one!.oursMs / r.oursMs)}× | ${one!.torchMs !== undefined && r.torchMs !== undefined ? `${round(one!.torchMs / r.torchMs)}×` : "—"} |`)
  })
  if (scaling.length > 0) md.push("", "| model | threads | ours: speed-up | PyTorch: speed-up |", "|---|---|---|---|", ...scaling)
  if (spentBy.length > 0) {
    md.push("", "Several threads: where a step's time goes (ms, medians; src/train/Parallel.ts's timings): this thread's shard, then its wait for the workers; the slowest worker's shard; the serial part: copying the parameters out (this thread) and in (a worker, with writing its gradients), summing the gradients, clipping and AdamW.", "")
    md.push("| model | threads | own shard | wait | worker's shard | parameters out | worker: in + gradients out | sum | clip + AdamW |", "|---|---|---|---|---|---|---|---|---|")
    for (const p of spentBy) md.push(`| ${p.model} | ${p.threads} | ${p.ownShard} | ${p.wait} | ${p.workerShard} | ${p.publish} | ${p.workerLoadWrite} | ${p.combine} | ${p.apply} |`)
  }
  if (profiles.size > 0) {
    const kinds = ["matmul", "batched matmul", "transpose", "elementwise", "reductions", "gather/segment", "copies/reshapes", "optimizer"]
    md.push("", "One thread, one step under tf.profile: kernels (count) and kernel ms by kind; host = the unprofiled step's time outside kernels.", "")
    md.push(`| model | step ms | ${kinds.join(" | ")} | all kernels | host |`, `|${"---|".repeat(kinds.length + 4)}`)
    for (const [model, p] of profiles) {
      md.push(`| ${model} | ${p.stepMs} | ${kinds.map((k) => p.kinds[k] === undefined ? "—" : `${p.kinds[k]!.ms} (${p.kinds[k]!.kernels})`).join(" | ")} | ${p.kernelMs} (${p.kernels}) | ${p.hostMs} |`)
    }
  }
  const summary = md.join("\n")
  console.log(`\n${summary}\n`)
  const write = (name: string, text: string) => {
    const file = path.join(out, name)
    fs.writeFileSync(`${file}.tmp-${process.pid}`, text)
    fs.renameSync(`${file}.tmp-${process.pid}`, file)
  }
  write("results.jsonl", lines.map((l) => JSON.stringify(l)).join("\n") + "\n")
  write("summary.md", summary + "\n")
  // the plot: ms per step, ours and PyTorch's, per model and thread count; and one thread's breakdown
  const bars = rows.flatMap((r) => [
    { model: r.model, what: `ours, ${r.threads} thread${r.threads > 1 ? "s" : ""}`, ms: r.oursMs },
    ...(r.torchMs === undefined ? [] : [{ model: r.model, what: `PyTorch ${torchVersion}, ${r.threads} thread${r.threads > 1 ? "s" : ""}`, ms: r.torchMs }])
  ])
  const parts = [...profiles].flatMap(([model, p]) => [
    ...Object.entries(p.kinds).map(([kind, e]) => ({ model, part: kind, ms: e.ms })),
    { model, part: "host (outside kernels)", ms: p.hostMs }
  ])
  const spec: TopLevelSpec = {
    $schema: "https://vega.github.io/schema/vega-lite/v6.json",
    vconcat: [
      {
        title: `Training step on CPU: ours (${description}) and PyTorch eager, ms per step`,
        width: 520,
        data: { values: bars },
        mark: "bar",
        encoding: {
          y: { field: "model", type: "nominal", title: null, sort: null },
          yOffset: { field: "what", sort: null },
          x: { field: "ms", type: "quantitative", title: "ms per step (median)" },
          color: { field: "what", type: "nominal", title: "", sort: null, legend: { labelLimit: 400 } }
        }
      },
      ...(parts.length === 0 ? [] : [{
        title: "Our one-thread step by kernel kind (tf.profile), ms",
        width: 520,
        data: { values: parts },
        mark: "bar" as const,
        encoding: {
          y: { field: "model", type: "nominal" as const, title: null, sort: null },
          x: { field: "ms", type: "quantitative" as const, title: "ms per step" },
          color: { field: "part", type: "nominal" as const, title: "kind", sort: null, legend: { labelLimit: 400 } }
        }
      }])
    ]
  }
  write("train.svg", await toSvg(spec))
  console.log(`wrote ${path.join(out, "results.jsonl")}, summary.md and train.svg`)
}

main().then(() => process.exit(0), (e) => {
  console.error(e)
  process.exit(1)
})
