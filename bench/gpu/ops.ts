/**
 * Per-op costs of the webgpu backend, to tell host time from GPU time: for chains of N ops on
 * [size, size] tensors, the host time to issue each op, the total per op until one read-back, and
 * the GPU's kernel time per op from tfjs's timestamp queries (`tf.time`, where the adapter has
 * `timestamp-query`). Run: node bench/gpu/ops.ts [size] (on the GPU machine, or on lavapipe).
 */
import { Effect } from "effect"
import type { Tensor } from "../../src/graph/Apply.ts"
import { load } from "../../src/runtime/Backend.ts"

const { tf } = await Effect.runPromise(load("webgpu"))
const size = Number(process.argv[2] ?? 128)
const a = tf.randomNormal([size, size], 0, 1 / Math.sqrt(size))
const b = tf.randomNormal([size, size], 0, 1 / Math.sqrt(size))
await a.data()
await b.data()

const chain = (f: (x: Tensor) => Tensor, n: number) => {
  let x = a
  const made: Array<Tensor> = []
  for (let i = 0; i < n; i++) made.push(x = f(x))
  return { last: x, made }
}

const ops: ReadonlyArray<readonly [string, (x: Tensor) => Tensor, number]> = [
  ["add", (x) => tf.add(x, b), 200],
  ["tanh", (x) => tf.tanh(x), 200],
  ["matMul", (x) => tf.matMul(x, b), 100],
  ["batched matMul (2 matrices)", (x) => tf.reshape(tf.matMul(tf.reshape(x, [2, size / 2, size]), tf.stack([b, b])), [size, size]), 50]
]
for (const [name, f, n] of ops) {
  for (let warm = 0; warm < 2; warm++) {
    const t0 = performance.now()
    const { last, made } = chain(f, n)
    const t1 = performance.now()
    await last.data()
    const t2 = performance.now()
    tf.dispose(made)
    if (warm === 0) continue
    const timing = await tf.time(() => tf.dispose(chain(f, n).made))
    const kernel = (timing as unknown as { kernelMs: number | { error: string } }).kernelMs
    console.log(JSON.stringify({
      op: name,
      size,
      issueUsPerOp: Number(((t1 - t0) * 1000 / n).toFixed(1)),
      totalUsPerOp: Number(((t2 - t0) * 1000 / n).toFixed(1)),
      gpuUsPerOp: typeof kernel === "number" ? Number((kernel * 1000 / n).toFixed(1)) : String(kernel.error ?? kernel)
    }))
  }
}
process.exit(0)
