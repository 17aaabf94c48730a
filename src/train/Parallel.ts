/**
 * Data-parallel training steps over Node worker threads, one single-threaded tfjs backend each.
 *
 * tfjs's wasm backend runs one thread in Node, so a 2-core machine trains on one. Here a step splits
 * its batch by rows into `threads` shards: this thread computes the first shard's gradients while
 * each worker (`ParallelWorker.ts`, the same model on its own backend, its parameters copied from
 * this thread's through shared memory every step) computes another's; the shards' gradients are
 * summed, weighted by their share of the batch's targets (on wasm in SIMD, `BackendOps.weightedSum`,
 * the same bits as the JavaScript loop {@link weightedSum}), and this thread clips and applies AdamW
 * (`Step.applyGradients`) as a one-thread step does.
 *
 * What equals a one-thread step (`tests/parallel.test.ts`):
 * - the cross-entropy and its gradients, up to float summation order: the loss is a mean over the
 *   batch's targets, and each shard's mean weighted by its targets is that mean;
 * - the ConceptMoE's boundary draws: a shard's chunk module continues the batch's random stream
 *   where the rows before it end (`ForwardOptions.drawOffset`), so every token gets the draw it gets
 *   in a one-thread step, a pure function of (seed, step) and the batch, whatever the thread count.
 *
 * What differs, by design (batch statistics computed per shard, then weighted as the
 * cross-entropy): an MoE layer's load-balancing loss E·Σ_e f_e·P_e and the ConceptMoE's ratio loss
 * (F, the sampled boundary rate, and G, the mean boundary probability) are computed over each
 * shard's tokens. With equal shards both are the batch's value plus a covariance term across
 * shards (E·Σ_e Σ_s w_s (f_{s,e} − f_e)(P_{s,e} − P_e), and likewise for F·G), small while
 * shards see alike data; the test checks the documented value: the targets-weighted mean of each
 * shard's one-thread loss. The compression statistics (tokens, concepts, boundary probabilities)
 * are sums over the shards, as in a one-thread step.
 *
 * @since 0.4.0
 */
import * as os from "node:os"
import { Worker } from "node:worker_threads"
import type * as TF from "@tensorflow/tfjs"
import type { Tensor, Tf } from "../graph/Apply.ts"
import { type Batch, loss, type Lowered } from "../runtime/Lower.ts"
import { backendOps } from "../runtime/Ops.ts"
import { applyGradients, type Optimizer, type PassOptions, stepInputValues, stepOptions, type StepResult, type TrainSettings } from "./Step.ts"

export type { PassOptions }

/** The threads a training run uses: `settings.threads`, or else every core on wasm (one elsewhere). */
export const trainingThreads = (settings: { readonly threads?: number | null }, backend: string): number =>
  settings.threads ?? (backend === "wasm" ? Math.max(1, os.availableParallelism()) : 1)

/** One shard's part of a step: its loss parts, targets and statistics. */
export interface ShardResult {
  readonly total: number
  readonly ce: number
  readonly aux: number
  /** Positions with a target (the cross-entropy's denominator). */
  readonly targets: number
  readonly tokens: number
  readonly concepts: number
  readonly boundaryProbSum: number
  readonly thresholdConcepts: number
}

/** Rows of each shard: as equal as they come, the first shards one larger. */
export const shardRows = (rows: number, shards: number): Array<number> =>
  Array.from({ length: Math.min(shards, rows) }, (_, s) => Math.floor(rows / Math.min(shards, rows)) + (s < rows % Math.min(shards, rows) ? 1 : 0))

/** The tokens before row `from` that draw a random number in the chunk module: not a row or document start. */
export const drawsBefore = (batch: Batch, from: number): number => {
  let n = 0
  for (let t = 0; t < from * batch.length; t++) if (t % batch.length !== 0 && !(batch.documentStarts?.has(t) ?? false)) n++
  return n
}

/** Rows `[from, from + rows)` of a batch (document starts renumbered). */
export const sliceBatch = (batch: Batch, from: number, rows: number): Batch => {
  const a = from * batch.length
  const b = (from + rows) * batch.length
  const starts = batch.documentStarts === undefined ? undefined : new Set([...batch.documentStarts].filter((t) => t >= a && t < b).map((t) => t - a))
  return {
    rows,
    length: batch.length,
    ids: batch.ids.slice(a, b),
    ...(batch.targets === undefined ? {} : { targets: batch.targets.slice(a, b) }),
    ...(starts === undefined ? {} : { documentStarts: starts })
  }
}

/** One shard's loss parts and statistics, and its gradients as tensors (in variable order; the caller disposes them). */
export interface ShardTensors extends ShardResult {
  readonly grads: Array<TF.Tensor>
}

/**
 * The gradients of one shard's loss (a training pass with the step's options; the chunk module's
 * draws continue the batch's stream after `drawOffset` draws), kept as tensors.
 */
export const shardTensors = (low: Lowered, batch: Batch, settings: TrainSettings, step: number, drawOffset: number, pass: PassOptions = {}): ShardTensors => {
  const { tf } = low
  const vars = [...low.variables.values()]
  let info = { targets: 0, tokens: 0, concepts: 0, boundaryProbSum: 0, thresholdConcepts: 0 }
  const tensors = tf.tidy(() => {
    let ce: Tensor | undefined
    let aux: Tensor | undefined
    const { grads, value } = tf.variableGrads(() => {
      const r = loss(low, batch, {
        ...stepOptions(low, settings, step, pass),
        drawOffset
      })
      info = { targets: r.tokens, ...r.ctx.compression }
      ce = tf.keep(r.ce)
      aux = tf.keep(r.aux)
      return r.total
    }, vars)
    return [value, ce!, aux!, ...vars.map((w) => grads[w.name] ?? tf.zerosLike(w))] as Array<TF.Tensor>
  })
  const [total, ce, aux] = tensors.slice(0, 3).map((t) => t.dataSync()[0]!)
  tf.dispose(tensors.slice(0, 3))
  return { total: total!, ce: ce!, aux: aux!, ...info, grads: tensors.slice(3) }
}

/** Weights of the shards' losses and gradients: their share of the batch's targets (of its rows if none). */
export const shardWeights = (parts: ReadonlyArray<{ readonly targets: number }>, rows: ReadonlyArray<number>): Array<number> => {
  const targets = parts.reduce((a, p) => a + p.targets, 0)
  const all = rows.reduce((a, r) => a + r, 0)
  return parts.map((p, s) => (targets > 0 ? p.targets / targets : rows[s]! / all))
}

/**
 * `out[j] = Σ_s weights[s]·gs[s][j]`, summed in float32 shard by shard in order (each term's product
 * in double precision, each partial sum rounded to float32), starting from +0.
 */
export const weightedSum = (gs: ReadonlyArray<ArrayLike<number>>, weights: ReadonlyArray<number>, out: Float32Array): Float32Array => {
  const n = out.length
  const a = gs[0]!
  const w0 = weights[0]!
  for (let j = 0; j < n; j++) out[j] = 0 + w0 * a[j]!
  for (let s = 1; s < gs.length; s++) {
    const b = gs[s]!
    const w = weights[s]!
    for (let j = 0; j < n; j++) out[j] = out[j]! + w * b[j]!
  }
  return out
}

/** Where each variable's values lie in the flat shared buffers (offset and length in floats). */
export const layoutOf = (sizes: ReadonlyArray<number>): { readonly offsets: Array<number>; readonly total: number } => {
  const offsets: Array<number> = []
  let total = 0
  for (const n of sizes) {
    offsets.push(total)
    total += n
  }
  return { offsets, total }
}

/** A tensor's float32 values: a view of its storage where the backend gives one, else a read-back. */
export const valuesOf = (tf: Tf, t: TF.Tensor): Float32Array => backendOps(tf).storage?.(t) ?? (t.dataSync() as Float32Array)

/** What the last step spent, in ms, on this thread: see {@link ParallelTrainer.timings}. */
export interface StepTimings {
  /** Copying the parameters into the buffer the workers read. */
  readonly publish: number
  /** This thread's shard (forward and backward). */
  readonly own: number
  /** Waiting for the workers after it. */
  readonly wait: number
  /** Summing the shards' gradients. */
  readonly combine: number
  /** Clipping and AdamW. */
  readonly apply: number
  /** The slowest worker's (by its shard's time). */
  readonly worker: WorkerTimings
}

/** What a worker spent on a step, in ms. */
export interface WorkerTimings {
  /** Copying the parameters into its variables. */
  readonly load: number
  /** Its shard (forward and backward). */
  readonly shard: number
  /** Writing its gradients into its shared buffer. */
  readonly write: number
}

export interface ParallelTrainer {
  /** One optimisation step on `batch`, with the same result as `Step.trainStep` (never a profile, dropped boundaries or expert pairs). */
  readonly step: (batch: Batch, step: number, pass?: PassOptions) => Promise<StepResult>
  readonly threads: number
  /** Where the last step's time went on this thread (zeros before the first). */
  readonly timings: () => StepTimings
  /** Ends the workers. */
  readonly dispose: () => Promise<void>
}

/** A worker's answer: its shard's loss parts and statistics (its gradients are in its shared buffer). */
type Reply =
  | { readonly ok: true; readonly result?: ShardResult; readonly spent?: WorkerTimings }
  | { readonly ok: false; readonly error: string }

/** What a worker is started with: the model, and the buffers it reads parameters from and writes gradients to. */
export interface WorkerData {
  readonly config: unknown
  readonly settings: TrainSettings
  readonly backend: "wasm" | "cpu"
  /** The parameters, variable after variable (float32), written by this thread before each step. */
  readonly params: SharedArrayBuffer
  /** This worker's gradients, laid out as `params`, written by the worker before it answers. */
  readonly grads: SharedArrayBuffer
  /** The variables' sizes, in order (the worker checks its model against them). */
  readonly sizes: ReadonlyArray<number>
}

/** The worker entry beside this module (TypeScript from the sources, JavaScript when built). */
const workerUrl = new URL(import.meta.url.endsWith(".ts") ? "./ParallelWorker.ts" : "./ParallelWorker.js", import.meta.url)

/**
 * A data-parallel trainer over `threads` threads (this one and `threads − 1` workers) for the model
 * of `config` (its JSON, as `LoadedModel.config`), lowered here as `low` with optimizer `opt`. The
 * workers load the backend `low.tf` runs (wasm or cpu).
 *
 * Parameters and gradients pass through shared memory, not messages: before a step this thread
 * copies its parameters into one shared buffer that every worker copies into its variables; each
 * worker writes its shard's gradients into a shared buffer of its own, and this thread sums them
 * with its own shard's, read where they lie (a view of the backend's storage), into the gradients
 * that it clips and applies. A message carries only the shard's rows and the answer's scalars.
 */
export const parallelTrainer = async (low: Lowered, opt: Optimizer, config: unknown, settings: TrainSettings, threads: number): Promise<ParallelTrainer> => {
  const { tf } = low
  const backend = tf.getBackend()
  if (backend !== "wasm" && backend !== "cpu") throw new Error(`threads > 1 runs on the wasm or cpu backend, not ${backend}`)
  const vars = [...low.variables.values()]
  const sizes = vars.map((v) => v.size)
  const { offsets, total } = layoutOf(sizes)
  const params = new SharedArrayBuffer(total * 4)
  const paramView = new Float32Array(params)
  const gradBuffers = Array.from({ length: threads - 1 }, () => new SharedArrayBuffer(total * 4))
  const workers = gradBuffers.map((grads) => new Worker(workerUrl, { workerData: { config, settings, backend, params, grads, sizes } satisfies WorkerData }))
  // idle workers do not keep the process alive (a run that stops early need not end them)
  for (const w of workers) w.unref()
  const pending = new Map<Worker, { resolve: (r: Reply) => void }>()
  const failed: Array<string> = []
  for (const w of workers) {
    w.on("message", (r: Reply) => {
      const p = pending.get(w)
      pending.delete(w)
      p?.resolve(r)
    })
    w.on("error", (e) => {
      failed.push(e.message)
      const p = pending.get(w)
      pending.delete(w)
      p?.resolve({ ok: false, error: e.message })
    })
  }
  const ask = (w: Worker, message: unknown) =>
    new Promise<Reply>((resolve) => {
      if (failed.length > 0) return resolve({ ok: false, error: failed[0]! })
      pending.set(w, { resolve })
      w.postMessage(message)
    })
  const dispose = async () => {
    await Promise.all(workers.map((w) => w.terminate()))
  }
  const ready = await Promise.all(workers.map((w) => ask(w, { kind: "ready" })))
  const bad = ready.find((r) => !r.ok)
  if (bad !== undefined && !bad.ok) {
    await dispose()
    throw new Error(`a training worker failed to start: ${bad.error}`)
  }
  const gradViews = gradBuffers.map((b) => vars.map((_, i) => new Float32Array(b, offsets[i]! * 4, sizes[i]!)))
  let timings: StepTimings = { publish: 0, own: 0, wait: 0, combine: 0, apply: 0, worker: { load: 0, shard: 0, write: 0 } }
  return {
    threads,
    dispose,
    timings: () => timings,
    step: async (batch, step, pass = {}) => {
      const t0 = performance.now()
      const rows = shardRows(batch.rows, threads)
      const starts = rows.map((_, s) => rows.slice(0, s).reduce((a, r) => a + r, 0))
      vars.forEach((v, i) => paramView.set(valuesOf(tf, v), offsets[i]!))
      const t1 = performance.now()
      // the workers' shards first, then ours on this thread while they run
      const asked = workers.slice(0, rows.length - 1).map((w, i) => {
        const s = i + 1
        const shard = sliceBatch(batch, starts[s]!, rows[s]!)
        return ask(w, {
          kind: "step",
          step,
          pass,
          drawOffset: drawsBefore(batch, starts[s]!),
          batch: { ...shard, documentStarts: shard.documentStarts === undefined ? undefined : [...shard.documentStarts] }
        })
      })
      let mine: ShardTensors
      try {
        mine = shardTensors(low, sliceBatch(batch, 0, rows[0]!), settings, step, 0, pass)
      } catch (e) {
        // the workers read the shared parameters until they answer
        await Promise.all(asked)
        throw e
      }
      const t2 = performance.now()
      try {
        const replies = await Promise.all(asked)
        const t3 = performance.now()
        const parts: Array<ShardResult> = [mine]
        for (const r of replies) {
          if (!r.ok) throw new Error(`a training worker failed: ${r.error}`)
          parts.push(r.result!)
        }
        const weights = shardWeights(parts, rows)
        const fast = backendOps(tf).weightedSum
        const summed = vars.map((v, i) => {
          const rest = replies.map((_, s) => gradViews[s]![i]!)
          if (fast !== undefined) return fast(mine.grads[i]!, rest, weights)
          return tf.tensor(weightedSum([valuesOf(tf, mine.grads[i]!), ...rest], weights, new Float32Array(sizes[i]!)), v.shape)
        })
        const t4 = performance.now()
        try {
          tf.tidy(() => {
            applyGradients(low, opt, summed, settings, step)
          })
        } finally {
          tf.dispose(summed)
        }
        opt.step = step + 1
        const spent = replies.map((r) => (r.ok ? r.spent : undefined) ?? { load: 0, shard: 0, write: 0 })
        const worker = spent.reduce((a, b) => (b.shard > a.shard ? b : a))
        timings = { publish: t1 - t0, own: t2 - t1, wait: t3 - t2, combine: t4 - t3, apply: performance.now() - t4, worker }
        const mean = (f: (p: ShardResult) => number) => parts.reduce((a, p, s) => a + weights[s]! * f(p), 0)
        const sum = (f: (p: ShardResult) => number) => parts.reduce((a, p) => a + f(p), 0)
        return {
          loss: mean((p) => p.total),
          ce: mean((p) => p.ce),
          aux: mean((p) => p.aux),
          lr: stepInputValues(settings, step)[0],
          tokens: sum((p) => p.tokens),
          concepts: sum((p) => p.concepts),
          boundaryProbSum: sum((p) => p.boundaryProbSum),
          thresholdConcepts: sum((p) => p.thresholdConcepts)
        }
      } finally {
        tf.dispose(mine.grads)
      }
    }
  }
}
