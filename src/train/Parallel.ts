/**
 * Data-parallel training steps over Node worker threads, one single-threaded tfjs backend each.
 *
 * tfjs's wasm backend runs one thread in Node, so a 2-core machine trains on one. Here a step splits
 * its batch by rows into `threads` shards: this thread computes the first shard's gradients while
 * each worker (`ParallelWorker.ts`, the same model on its own backend, parameters sent every step)
 * computes another's; the shards' gradients are summed, weighted by their share of the batch's
 * targets, and this thread clips and applies AdamW (`Step.applyGradients`) as a one-thread step does.
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
import type { Tensor } from "../graph/Apply.ts"
import { type Batch, loss, type Lowered } from "../runtime/Lower.ts"
import { applyGradients, type Optimizer, type PassOptions, stepInputValues, stepOptions, type StepResult, type TrainSettings } from "./Step.ts"

export type { PassOptions }

/** The threads a training run uses: `settings.threads`, or else every core on wasm (one elsewhere). */
export const trainingThreads = (settings: { readonly threads?: number | null }, backend: string): number =>
  settings.threads ?? (backend === "wasm" ? Math.max(1, os.availableParallelism()) : 1)

/** One shard's part of a step: its loss parts, targets, statistics and gradients (in variable order). */
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
  readonly grads: Array<Float32Array>
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

/**
 * The gradients of one shard's loss (a training pass with the step's options; the chunk module's
 * draws continue the batch's stream after `drawOffset` draws), read back.
 */
export const shardGradients = (low: Lowered, batch: Batch, settings: TrainSettings, step: number, drawOffset: number, pass: PassOptions = {}): ShardResult => {
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
  const values = tensors.map((t) => t.dataSync() as Float32Array)
  tf.dispose(tensors)
  return { total: values[0]![0]!, ce: values[1]![0]!, aux: values[2]![0]!, ...info, grads: values.slice(3) }
}

/** Weights of the shards' losses and gradients: their share of the batch's targets (of its rows if none). */
export const shardWeights = (parts: ReadonlyArray<{ readonly targets: number }>, rows: ReadonlyArray<number>): Array<number> => {
  const targets = parts.reduce((a, p) => a + p.targets, 0)
  const all = rows.reduce((a, r) => a + r, 0)
  return parts.map((p, s) => (targets > 0 ? p.targets / targets : rows[s]! / all))
}

/** The sum of the shards' gradients, each weighted (float32, shard by shard in order). */
export const combineGradients = (parts: ReadonlyArray<ShardResult>, weights: ReadonlyArray<number>): Array<Float32Array> =>
  parts[0]!.grads.map((_, i) => {
    const out = new Float32Array(parts[0]!.grads[i]!.length)
    parts.forEach((p, s) => {
      const g = p.grads[i]!
      const w = weights[s]!
      for (let j = 0; j < out.length; j++) out[j] = out[j]! + w * g[j]!
    })
    return out
  })


export interface ParallelTrainer {
  /** One optimisation step on `batch`, with the same result as `Step.trainStep` (never a profile, dropped boundaries or expert pairs). */
  readonly step: (batch: Batch, step: number, pass?: PassOptions) => Promise<StepResult>
  readonly threads: number
  /** Ends the workers. */
  readonly dispose: () => Promise<void>
}

type Reply = { readonly ok: true; readonly result?: ShardResult } | { readonly ok: false; readonly error: string }

/** The worker entry beside this module (TypeScript from the sources, JavaScript when built). */
const workerUrl = new URL(import.meta.url.endsWith(".ts") ? "./ParallelWorker.ts" : "./ParallelWorker.js", import.meta.url)

/**
 * A data-parallel trainer over `threads` threads (this one and `threads − 1` workers) for the model
 * of `config` (its JSON, as `LoadedModel.config`), lowered here as `low` with optimizer `opt`. The
 * workers load the backend `low.tf` runs (wasm or cpu).
 */
export const parallelTrainer = async (low: Lowered, opt: Optimizer, config: unknown, settings: TrainSettings, threads: number): Promise<ParallelTrainer> => {
  const { tf } = low
  const backend = tf.getBackend()
  if (backend !== "wasm" && backend !== "cpu") throw new Error(`threads > 1 runs on the wasm or cpu backend, not ${backend}`)
  const workers = Array.from({ length: threads - 1 }, () => new Worker(workerUrl, { workerData: { config, settings, backend } }))
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
  const ask = (w: Worker, message: unknown, transfer: Array<ArrayBuffer> = []) =>
    new Promise<Reply>((resolve) => {
      if (failed.length > 0) return resolve({ ok: false, error: failed[0]! })
      pending.set(w, { resolve })
      w.postMessage(message, transfer)
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
  const vars = [...low.variables.values()]
  return {
    threads,
    dispose,
    step: async (batch, step, pass = {}) => {
      const rows = shardRows(batch.rows, threads)
      const starts = rows.map((_, s) => rows.slice(0, s).reduce((a, r) => a + r, 0))
      const params = vars.map((v) => v.dataSync() as Float32Array)
      // the workers' shards first, then ours on this thread while they run
      const asked = workers.slice(0, rows.length - 1).map((w, i) => {
        const s = i + 1
        const shard = sliceBatch(batch, starts[s]!, rows[s]!)
        return ask(w, {
          kind: "step",
          step,
          pass,
          drawOffset: drawsBefore(batch, starts[s]!),
          batch: { ...shard, documentStarts: shard.documentStarts === undefined ? undefined : [...shard.documentStarts] },
          params: params.map((p) => p.slice())
        })
      })
      const mine = shardGradients(low, sliceBatch(batch, 0, rows[0]!), settings, step, 0, pass)
      const replies = await Promise.all(asked)
      const parts: Array<ShardResult> = [mine]
      for (const r of replies) {
        if (!r.ok) throw new Error(`a training worker failed: ${r.error}`)
        parts.push(r.result!)
      }
      const weights = shardWeights(parts, rows)
      const summed = combineGradients(parts, weights)
      tf.tidy(() => {
        applyGradients(low, opt, summed.map((g, i) => tf.tensor(g, vars[i]!.shape)), settings, step)
      })
      opt.step = step + 1
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
    }
  }
}
