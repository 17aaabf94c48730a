/**
 * A training worker of `Parallel.ts`: the model of `workerData.config` on its own single-threaded
 * backend. For each step it copies the parameters from the shared buffer into its variables, takes
 * a shard of the batch, writes that shard's gradients into its own shared buffer and answers the
 * shard's loss parts and statistics (`shardTensors`).
 *
 * @since 0.4.0
 */
import { Effect } from "effect"
import { parentPort, workerData } from "node:worker_threads"
import { modelFromJson } from "../models/Load.ts"
import { load } from "../runtime/Backend.ts"
import { type Batch, materialize } from "../runtime/Lower.ts"
import { backendOps } from "../runtime/Ops.ts"
import { layoutOf, type PassOptions, shardTensors, valuesOf, type WorkerData } from "./Parallel.ts"

const data = workerData as WorkerData
const port = parentPort!

type Message =
  | { readonly kind: "ready" }
  | {
    readonly kind: "step"
    readonly step: number
    readonly pass: PassOptions
    readonly drawOffset: number
    readonly batch: Omit<Batch, "documentStarts"> & { readonly documentStarts?: ReadonlyArray<number> }
  }

const started = (async () => {
  const { tf } = await Effect.runPromise(load(data.backend))
  const model = await Effect.runPromise(modelFromJson(data.config, "(training worker)"))
  const low = materialize(tf, model.analysis, 0)
  const vars = [...low.variables.values()]
  const sizes = vars.map((v) => v.size)
  if (sizes.length !== data.sizes.length || sizes.some((n, i) => n !== data.sizes[i])) {
    throw new Error(`the worker's model has variables of sizes [${sizes.join(", ")}], the trainer's [${data.sizes.join(", ")}]`)
  }
  const { offsets } = layoutOf(sizes)
  const params = vars.map((_, i) => new Float32Array(data.params, offsets[i]! * 4, sizes[i]!))
  const grads = vars.map((_, i) => new Float32Array(data.grads, offsets[i]! * 4, sizes[i]!))
  return { low, vars, params, grads }
})()

port.on("message", (m: Message) => {
  started.then(({ grads, low, params, vars }) => {
    if (m.kind === "ready") return port.postMessage({ ok: true })
    const { tf } = low
    const t0 = performance.now()
    const storage = backendOps(tf).storage
    const refs = (tf.backend() as unknown as { refCount?: (dataId: object) => number }).refCount
    vars.forEach((v, i) => {
      // in place where the variable alone holds its storage; else a new tensor of a copy (the cpu
      // backend keeps the array it is given, and the shared buffer changes every step)
      const own = storage !== undefined && refs?.call(tf.backend(), v.dataId) === 1 ? storage(v) : undefined
      if (own !== undefined) own.set(params[i]!)
      else tf.tidy(() => v.assign(tf.tensor(params[i]!.slice(), v.shape)))
    })
    const { documentStarts, ...rest } = m.batch
    const batch: Batch = { ...rest, ...(documentStarts === undefined ? {} : { documentStarts: new Set(documentStarts) }) }
    const t1 = performance.now()
    const { grads: gs, ...result } = shardTensors(low, batch, data.settings, m.step, m.drawOffset, m.pass)
    const t2 = performance.now()
    gs.forEach((g, i) => grads[i]!.set(valuesOf(tf, g)))
    tf.dispose(gs)
    port.postMessage({ ok: true, result, spent: { load: t1 - t0, shard: t2 - t1, write: performance.now() - t2 } })
  }).catch((e: unknown) => port.postMessage({ ok: false, error: e instanceof Error ? e.message : String(e) }))
})
