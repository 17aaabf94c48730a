/**
 * A training worker of `Parallel.ts`: the model of `workerData.config` on its own single-threaded
 * backend; for each step it takes the parameters and a shard of the batch and answers that shard's
 * loss parts and gradients (`shardGradients`).
 *
 * @since 0.4.0
 */
import { Effect } from "effect"
import { parentPort, workerData } from "node:worker_threads"
import { modelFromJson } from "../models/Load.ts"
import { load } from "../runtime/Backend.ts"
import { type Batch, materialize } from "../runtime/Lower.ts"
import { type PassOptions, shardGradients } from "./Parallel.ts"
import type { TrainSettings } from "./Step.ts"

const data = workerData as { config: unknown; settings: TrainSettings; backend: "wasm" | "cpu" }
const port = parentPort!

type Message =
  | { readonly kind: "ready" }
  | {
    readonly kind: "step"
    readonly step: number
    readonly pass: PassOptions
    readonly drawOffset: number
    readonly batch: Omit<Batch, "documentStarts"> & { readonly documentStarts?: ReadonlyArray<number> }
    readonly params: ReadonlyArray<Float32Array>
  }

const started = (async () => {
  const { tf } = await Effect.runPromise(load(data.backend))
  const model = await Effect.runPromise(modelFromJson(data.config, "(training worker)"))
  return materialize(tf, model.analysis, 0)
})()

port.on("message", (m: Message) => {
  started.then((low) => {
    if (m.kind === "ready") return port.postMessage({ ok: true })
    const vars = [...low.variables.values()]
    vars.forEach((v, i) => low.tf.tidy(() => v.assign(low.tf.tensor(m.params[i]!, v.shape))))
    const { documentStarts, ...rest } = m.batch
    const batch: Batch = { ...rest, ...(documentStarts === undefined ? {} : { documentStarts: new Set(documentStarts) }) }
    const result = shardGradients(low, batch, data.settings, m.step, m.drawOffset, m.pass)
    port.postMessage({ ok: true, result }, result.grads.map((g) => g.buffer as ArrayBuffer))
  }).catch((e: unknown) => port.postMessage({ ok: false, error: e instanceof Error ? e.message : String(e) }))
})
