/**
 * Our training step (forward, backward, clipping, AdamW) for the models that bench/peers/torch_lm.py
 * builds in PyTorch: the 2-layer d128 and 4-layer d512 dense LMs, the compare MoE and its matched
 * ConceptMoE. Prints one JSON line per model (on webgpu two: each step through tfjs, and recorded
 * once and replayed, `src/train/Captured.ts`): params, the median step time over the timed steps
 * after 3 warm-ups, the median host time until the step's work is handed to the GPU
 * (`issueMsMedian`), the first loss (with capacity dispatch, the share of token-expert pairs dropped
 * over the timed steps, `droppedExpertPairs`), and the compute dispatches per step (for tfjs steps
 * also the host uploads and, as `top`, the count of every program dispatched, most first). A
 * replayed model then runs two more steps timed on the GPU with timestamp queries
 * (`Captured.profile`): `gpuStepMs` (the replayed step's span on the GPU), `gpuKernelsMs` (its
 * dispatches' kernel times summed, each timed in a pass of its own), `gpuMatMulMs` (the matmul
 * programs' share) and `gpuTop` (the 10 costliest program/output-shape pairs, ms per step).
 * With `CONCEPTMOE_MATMUL=auto` (the default) the first trainer of a model tunes its matmul products after step 0 (untimed): a `{ tune }` line per
 * product shape (each candidate's µs) and a `matmul` summary on the model's line. `flopsPerStep` is the
 * model's matmul FLOPs for forward and backward (3× the cost model's forward FLOPs per token, with the
 * attention maps counted whole, as both implementations compute them): bench/gpu/ratio.ts turns it into
 * each side's TFLOP/s. With `BENCH_LABEL` set, each model line carries it as `label` (run.sh's variants).
 * With `BENCH_EXPERT_CAPACITY` set (a factor), MoE layers train with that expert capacity (capacity
 * dispatch, `expertCapacity`) instead of the default grouped dispatch.
 * A model whose step fails prints `{ model, mode, error }` instead, and the next one runs.
 *
 * Run: node bench/gpu/train-step.ts [webgpu|cpu|wasm] [name,…] [timed steps, default 10]
 * (on the GPU machine through bench/gpu/run.sh; here on lavapipe, bench/gpu/lavapipe.sh, or on wasm).
 */
import { Effect, Schema } from "effect"
import * as fs from "node:fs"
import * as path from "node:path"
import { modelFromJson } from "../../src/models/Load.ts"
import { type BackendName, load } from "../../src/runtime/Backend.ts"
import type { Tf } from "../../src/graph/Apply.ts"
import { type Batch, materialize, release } from "../../src/runtime/Lower.ts"
import { capturedTrainer } from "../../src/train/Captured.ts"
import { newOptimizer, syncReads, trainStep, trainStepAsync, TrainSettings } from "../../src/train/Step.ts"
import { countDispatches, type Counts } from "./dispatches.ts"
import { describeTuning } from "../../src/runtime/webgpu/MatMul.ts"
import * as Cost from "../../src/cost/Cost.ts"

const here = import.meta.dirname
const moe = JSON.parse(fs.readFileSync(path.join(here, "..", "..", "examples", "compare", "moe-tiny.json"), "utf8"))
const dense = (layers: number, d: number, heads: number) => ({ kind: "dense", vocab: 256, hidden: d, layers, heads, ffnHidden: 4 * d, activation: "gelu", contextLength: 256 })
export const workloads = [
  { name: "dense-2L-d128", config: dense(2, 128, 4), rows: 8, length: 128 },
  { name: "dense-4L-d512", config: dense(4, 512, 8), rows: 16, length: 256 },
  { name: "moe-tiny", config: moe, rows: 8, length: 128 },
  { name: "conceptmoe-1L-top7-R2", config: { kind: "conceptmoe", baseline: moe, ratio: 2, encoderLayers: 2, decoderLayers: 2, topK: 7 }, rows: 8, length: 128 }
] as const

const batchOf = (rows: number, length: number): Batch => ({
  rows,
  length,
  ids: new Int32Array(rows * length).map((_, i) => (i * 7 + (i % 13) * 5) % 256),
  targets: new Int32Array(rows * length).map((_, i) => (i * 11 + 3) % 256)
})

const gpuTimestamps = (tf: Tf) => (tf.backend() as unknown as { device?: { features: { has: (f: string) => boolean } } }).device?.features.has("timestamp-query") === true

/**
 * The GPU side of a replayed step: its span on the GPU, the sum of its kernels' times (each in a
 * pass of its own), the share of matmul programs, and the programs (with output shape) that take most.
 */
const gpuSummary = (gpuMs: number, dispatches: ReadonlyArray<{ program: string; shape: string; us: number }>) => {
  const total = (ds: ReadonlyArray<{ us: number }>) => Number((ds.reduce((a, d) => a + d.us, 0) / 1000).toFixed(3))
  const byKernel = new Map<string, { n: number; us: number }>()
  for (const d of dispatches) {
    const key = `${d.program} → ${d.shape}`
    const e = byKernel.get(key) ?? { n: 0, us: 0 }
    byKernel.set(key, { n: e.n + 1, us: e.us + d.us })
  }
  return {
    gpuStepMs: Number(gpuMs.toFixed(3)),
    gpuKernelsMs: total(dispatches),
    gpuMatMulMs: total(dispatches.filter((d) => /matmul/i.test(d.program))),
    gpuTop: Object.fromEntries([...byKernel].sort((a, b) => b[1].us - a[1].us).slice(0, 10).map(([k, e]) => [`${k} ×${e.n}`, Number((e.us / 1000).toFixed(3))]))
  }
}

const label = process.env["BENCH_LABEL"] || undefined
const expertCapacity = process.env["BENCH_EXPERT_CAPACITY"] || undefined

/** Forward and backward matmul FLOPs of one step on `rows × length` tokens (ConceptMoE at its nominal rate). */
const stepFlops = (cost: Cost.Cost, rows: number, length: number) =>
  3 * rows * (Cost.matmulPerToken(cost) * length + Cost.attentionMapFlops(cost, length, false))

const median = (xs: ReadonlyArray<number>) => {
  const v = [...xs].sort((a, b) => a - b)
  return v.length === 0 ? NaN : Number(v[Math.floor(v.length / 2)]!.toFixed(2))
}

/** Times `timed` steps after 3 untimed ones; on webgpu in one of the captured trainer's modes. */
const measure = async (tf: Tf, backend: BackendName, w: typeof workloads[number], timed: number, replay: boolean) => {
  const m = await Effect.runPromise(modelFromJson(w.config, `${w.name}.json`))
  const low = materialize(tf, m.analysis, 1)
  const opt = newOptimizer(low)
  const settings = Schema.decodeUnknownSync(TrainSettings)({ steps: 100, batchSize: w.rows, seqLen: w.length, seed: 0, ...(expertCapacity === undefined ? {} : { expertCapacity: Number(expertCapacity) }) })
  const batch = batchOf(w.rows, w.length)
  const trainer = backend === "webgpu" ? capturedTrainer(low, opt, settings, w.rows, w.length, { record: replay }) : undefined
  // freed however the steps end (a failed model leaves nothing behind for the next)
  try {
    const times: Array<number> = []
    const issue: Array<number> = []
    let first = NaN
    let counted: Counts | undefined
    const experts = { routed: 0, dropped: 0 }
    for (let s = 0; s < 3 + timed; s++) {
      // the third warm-up step of a tfjs run is counted (and not timed; the second tunes the matmuls)
      const counter = s === 2 && trainer !== undefined && !replay ? countDispatches(tf) : undefined
      const t0 = performance.now()
      const r = trainer !== undefined ? await trainer.step(batch, s) : syncReads(tf) ? trainStep(low, opt, batch, settings, s) : await trainStepAsync(low, opt, batch, settings, s)
      if (counter !== undefined) counted = counter.stop()
      if (s === 0) first = r.loss
      if (s >= 3) {
        times.push(performance.now() - t0)
        if (trainer !== undefined) issue.push(trainer.issueMs())
        if ("expertPairs" in r && r.expertPairs !== undefined) {
          experts.routed += r.expertPairs
          experts.dropped += r.expertDropped ?? 0
        }
      }
    }
    // a replayed model: two more steps timed on the GPU, the step as it runs and dispatch by dispatch
    let gpu: Record<string, unknown> = {}
    if (trainer?.mode().mode === "replay" && gpuTimestamps(tf)) {
      const whole = (await trainer.step(batch, 3 + timed, { profile: "step" })).profile
      const each = (await trainer.step(batch, 4 + timed, { profile: "dispatches" })).profile
      if (whole !== undefined && each?.dispatches !== undefined) gpu = gpuSummary(whole.gpuMs, each.dispatches)
    }
    const mode = trainer?.mode()
    const tuned = trainer?.tuned() ?? []
    for (const row of tuned) console.log(JSON.stringify({ tune: row }))
    return {
      model: w.name,
      ...(label === undefined ? {} : { label }),
      ...(trainer === undefined ? {} : { mode: mode?.mode === "replay" ? "replay" : "tfjs" }),
      params: m.analysis.rows[0]!.params,
      flopsPerStep: stepFlops(m.analysis.cost, w.rows, w.length),
      stepMsMedian: median(times),
      ...(issue.length > 0 && Number.isFinite(issue[0]) ? { issueMsMedian: median(issue) } : {}),
      firstLoss: first,
      ...(experts.routed > 0 ? { droppedExpertPairs: Number((experts.dropped / experts.routed).toFixed(4)) } : {}),
      ...(tuned.length > 0 ? { matmul: describeTuning(tuned) } : {}),
      ...(mode?.mode === "replay" ? { dispatchesPerStep: mode.dispatches } : {}),
      ...gpu,
      ...(mode?.mode === "eager" && replay ? { notReplayed: mode.reason } : {}),
      ...(counted === undefined ? {} : {
        dispatchesPerStep: counted.dispatches,
        uploadsPerStep: counted.uploads,
        top: Object.fromEntries([...counted.byProgram].sort((a, b) => b[1] - a[1]))
      })
    }
  } finally {
    trainer?.dispose()
    release(low)
    tf.dispose([...opt.m.values(), ...opt.v.values()])
  }
}

const main = async () => {
  const backend = (process.argv[2] ?? "webgpu") as BackendName
  const { tf, description } = await Effect.runPromise(load(backend))
  console.log(JSON.stringify({ backend: description }))
  const only = process.argv[3] === undefined || process.argv[3] === "" ? undefined : process.argv[3].split(",")
  const timed = Number(process.argv[4] ?? 10)
  for (const w of workloads.filter((x) => only === undefined || only.includes(x.name))) {
    // on webgpu: each step through tfjs, then recorded and replayed (where the model allows it)
    // a model that fails (a device error, say) gets an error line, and the others still run
    for (const replay of backend === "webgpu" ? [false, true] : [false]) {
      const line = await measure(tf, backend, w, timed, replay).catch((e: unknown) => ({
        model: w.name,
        ...(label === undefined ? {} : { label }),
        ...(backend === "webgpu" ? { mode: replay ? "replay" : "tfjs" } : {}),
        error: (e instanceof Error ? e.message : String(e)).split("\n")[0]
      }))
      console.log(JSON.stringify(line))
    }
  }
}

main().then(() => process.exit(0), (e) => {
  console.error(e)
  process.exit(1)
})
