/**
 * The webgpu backend on a GPU machine: correctness against cpu and first timings. Imports only the
 * runtime and the models (no data, no plots), so a trimmed node_modules suffices on the device.
 *
 * Run: node bench/gpu/smoke.ts   (set VK_DRIVER_FILES to the NVIDIA ICD where needed; `cpu` as an
 * argument dry-runs it without a GPU)
 * Prints, for a dense 2-layer d128 LM and the compare pair (MoE and matched ConceptMoE):
 * runtime params against the static count, the host reads per pass, executed against static weight
 * FLOPs (MoE dispatch is grouped on webgpu: the rows of the worst case), the loss on webgpu and on cpu with the same seeded
 * parameters, and the median forward+backward time (reads recorded first) over 5 steps after 2
 * warm-ups. Runs on lavapipe (bench/gpu/lavapipe.sh; all three models, losses equal cpu's); not yet
 * run on a GPU since the readback-free path was added.
 */
import { Effect } from "effect"
import * as fs from "node:fs"
import * as path from "node:path"
import { modelFromJson } from "../../src/models/Load.ts"
import { load } from "../../src/runtime/Backend.ts"
import * as Cost from "../../src/cost/Cost.ts"
import { type Batch, loss, materialize, recordReads, replay, runtimeParamCount } from "../../src/runtime/Lower.ts"

const here = import.meta.dirname
const moe = JSON.parse(fs.readFileSync(path.join(here, "..", "..", "examples", "compare", "moe-tiny.json"), "utf8"))
const configs: ReadonlyArray<readonly [string, unknown]> = [
  ["dense 2-layer d128", { kind: "dense", name: "dense", vocab: 256, hidden: 128, layers: 2, heads: 4, ffnHidden: 512, activation: "gelu", contextLength: 128 }],
  ["moe-tiny", moe],
  ["1L-top7-R2 (ConceptMoE)", { kind: "conceptmoe", name: "concept", baseline: moe, ratio: 2, encoderLayers: 2, decoderLayers: 2, topK: 7 }]
]
const rows = 8
const length = 128
const batch: Batch = {
  rows,
  length,
  ids: new Int32Array(rows * length).map((_, i) => (i * 7 + (i % 13) * 5) % 256),
  targets: new Int32Array(rows * length).map((_, i) => (i * 11 + 3) % 256)
}

const main = async () => {
  // `node bench/gpu/smoke.ts cpu` dry-runs the script without a GPU
  const backend = process.argv[2] === "cpu" ? "cpu" : "webgpu"
  const gpu = await Effect.runPromise(load(backend))
  console.log(`backend: ${gpu.description}`)
  if (backend === "webgpu") {
    const adapter = await (globalThis as unknown as { navigator: { gpu: { requestAdapter: () => Promise<{ info?: Record<string, string> } | null> } } }).navigator.gpu.requestAdapter()
    console.log(`adapter: ${JSON.stringify(adapter?.info ?? {})}`)
  }
  const results: Array<Record<string, unknown>> = []
  for (const [name, cfg] of configs) {
    try {
      const m = await Effect.runPromise(modelFromJson(cfg, `${name}.json`))
      await gpu.tf.setBackend(backend)
      const tf = gpu.tf
      const low = materialize(tf, m.analysis, 1)
      const vars = [...low.variables.values()]
      const options = { training: false, seed: 1 } as const
      const times: Array<number> = []
      let gpuLoss = NaN
      let reads = 0
      let executed = { weights: 0, attentionMap: 0, other: 0 }
      for (let s = 0; s < 7; s++) {
        const t0 = performance.now()
        // webgpu in Node has no synchronous read-back: record the host decisions first (MoE
        // dispatch is grouped on webgpu, so only a concept stage's boundaries are read)
        const recorded = await recordReads(low, batch, options)
        reads = recorded.length
        const value = tf.tidy(() => {
          const { grads, value } = tf.variableGrads(() => {
            const r = loss(low, batch, { ...options, read: replay(recorded) })
            executed = { ...r.ctx.flops }
            return r.total
          }, vars)
          for (const g of Object.values(grads)) g.dispose()
          return value
        })
        gpuLoss = (await value.data())[0]!
        value.dispose()
        if (s >= 2) times.push(performance.now() - t0)
      }
      times.sort((a, b) => a - b)
      await tf.setBackend("cpu")
      const cpuLow = materialize(tf, m.analysis, 1)
      const cpuLoss = tf.tidy(() => loss(cpuLow, batch, { training: false, seed: 1 }).total.dataSync()[0]!)
      const r = {
        model: name,
        paramsEqual: runtimeParamCount(low) === m.analysis.rows[0]!.params,
        reads,
        // grouped dispatch runs the worst case's rows (n·k plus padding room): executed weight FLOPs exceed the static activated ones
        executedWeightFlops: executed.weights,
        staticWeightFlops: Cost.matmulPerToken(m.analysis.cost) * rows * length,
        gpuLoss,
        cpuLoss,
        fwdBwdMsMedian: Number(times[2]!.toFixed(1))
      }
      results.push(r)
      console.log(JSON.stringify(r))
    } catch (e) {
      const r = { model: name, error: String((e as Error).message ?? e).split("\n")[0] }
      results.push(r)
      console.log(JSON.stringify(r))
    }
  }
  if (process.env["OUT"] !== undefined) fs.writeFileSync(path.join(process.env["OUT"], "smoke.json"), JSON.stringify(results, null, 2))
}

main().then(() => process.exit(0), (e) => {
  console.error(e)
  process.exit(1)
})
