/**
 * How evenly a trained MoE routes: for a checkpoint, the share of token-expert pairs that a capacity
 * dispatch (`expertCapacity`, docs/conceptmoe.md choice 10) would drop at each factor, on the first
 * validation batches of the State of the Union corpus (the batches `train` evaluates on), on cpu.
 *
 * Run: node bench/expert-load.ts <checkpoint or run directory> [factors, default 1,2,4,8]
 * [rows×length, default 8x128] [batches, default 4]
 */
import { NodeServices } from "@effect/platform-node"
import { Effect, Layer } from "effect"
import { loadTrained } from "../src/infer/Generate.ts"
import { layer as backendLayer, Tensors } from "../src/runtime/Backend.ts"
import { loss, release } from "../src/runtime/Lower.ts"
import { byteTokenizer, sotuSplits, validationBatches } from "../src/train/Data.ts"

const [checkpoint, factorList = "1,2,4,8", shape = "8x128", count = "4"] = process.argv.slice(2)
if (checkpoint === undefined) {
  console.error("usage: node bench/expert-load.ts <checkpoint or run directory> [factors] [rowsxlength] [batches]")
  process.exit(1)
}
const [rows, length] = shape.split("x").map(Number) as [number, number]

const main = Effect.gen(function*() {
  const { tf } = yield* Tensors
  const { low, step } = yield* loadTrained(checkpoint)
  const batches = validationBatches(sotuSplits(byteTokenizer, 0).validation, rows, length, Number(count))
  for (const factor of factorList.split(",").map(Number)) {
    let routed = 0
    let kept = 0
    for (const batch of batches) {
      const [r, k] = tf.tidy(() => {
        const e = loss(low, batch, { training: true, seed: 1, dispatch: { capacity: factor } }).ctx.expertRouting
        return e === undefined ? [0, 0] : [e.routed.dataSync()[0]!, e.kept.dataSync()[0]!]
      })
      routed += r!
      kept += k!
    }
    if (routed === 0) return yield* Effect.fail(new Error(`${checkpoint} has no MoE layer`))
    console.log(JSON.stringify({ checkpoint, step, factor, rows, length, batches: batches.length, routed, dropped: routed - kept, droppedShare: Number(((routed - kept) / routed).toFixed(4)) }))
  }
  release(low)
})

Effect.runPromise(main.pipe(Effect.provide(Layer.mergeAll(backendLayer("cpu"), NodeServices.layer)))).catch((e: unknown) => {
  console.error(`error: ${e instanceof Error ? e.message : String(e)}`)
  process.exit(1)
})
