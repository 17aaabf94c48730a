/**
 * fp32 matmul throughput of the webgpu backend (issue 6's third target: ≥ 0.8× cuBLAS), for square
 * sizes, with tfjs's kernel and each of ours (`src/runtime/MatMul.ts`): GFLOP/s from wall time over
 * `reps` chained products ended by one read-back, and from the GPU's kernel time (timestamp queries,
 * where the adapter has them), and each kernel's first product against tfjs's kernel (`maxRelDiff`;
 * `error` when the device reported one). bench/peers/torch_matmul.py measures PyTorch on the same sizes.
 * Run: node bench/gpu/matmul.ts [sizes, e.g. 1024,4096] [reps] [kernels, e.g. tfjs,128x128x8/8x8/v4]
 */
import { Effect } from "effect"
import type { Tensor } from "../../src/graph/Apply.ts"
import { load } from "../../src/runtime/Backend.ts"
import { gpuErrors } from "../../src/runtime/webgpu/Fixes.ts"
import { kernelNames, parseTiles, useMatMul } from "../../src/runtime/webgpu/MatMul.ts"

const { tf } = await Effect.runPromise(load("webgpu"))
const sizes = (process.argv[2] ?? "1024,2048,4096").split(",").map(Number)
const reps = Number(process.argv[3] ?? 10)
const kernels = process.argv[4]?.split(",") ?? ["tfjs", ...kernelNames]
for (const kernel of kernels) {
  if (kernel !== "tfjs" && parseTiles(kernel) === undefined) throw new Error(`not a kernel: ${kernel}`)
}
/** The largest difference between two tensors, over the largest magnitude of the second. */
const relDiff = async (x: Tensor, ref: Tensor) => {
  const [d, m] = tf.tidy(() => [tf.max(tf.abs(tf.sub(x, ref))), tf.max(tf.abs(ref))])
  const [dv, mv] = [(await d!.data())[0]!, (await m!.data())[0]!]
  tf.dispose([d!, m!])
  return dv / Math.max(mv, 1e-30)
}
gpuErrors(tf)
for (const n of sizes) {
  const a = tf.randomNormal([n, n], 0, 1 / Math.sqrt(n))
  const b = tf.randomNormal([n, n], 0, 1 / Math.sqrt(n))
  for (const [j, kernel] of kernels.entries()) {
    // checked against tfjs's kernel on operands of its own: a kernel that the device refused, or that
    // leaves its output unwritten, would otherwise keep an earlier kernel's product in its pooled
    // buffer and time as a dropped (instant) command buffer
    const check = tf.randomNormal([n, n], 0, 1 / Math.sqrt(n), "float32", 1000 + j)
    useMatMul(tf, "tfjs")
    const reference = tf.matMul(check, b)
    useMatMul(tf, parseTiles(kernel) ?? "tfjs")
    const chain = () => {
      let x: Tensor = a
      const made: Array<Tensor> = []
      for (let i = 0; i < reps; i++) made.push(x = tf.matMul(x, b))
      return made
    }
    try {
      const checked = tf.matMul(check, b)
      const maxRelDiff = await relDiff(checked, reference)
      tf.dispose(checked)
      // warm-up (shader compile)
      const warm = chain()
      await warm[warm.length - 1]!.data()
      tf.dispose(warm)
      const t0 = performance.now()
      const made = chain()
      await made[made.length - 1]!.data()
      const wallMs = (performance.now() - t0) / reps
      tf.dispose(made)
      const timing = await tf.time(() => tf.dispose(chain()))
      const kernelMs = (timing as unknown as { kernelMs: number | { error: string } }).kernelMs
      const flops = 2 * n ** 3
      const errors = gpuErrors(tf)
      console.log(JSON.stringify({
        kernel,
        n,
        wallGflops: Number((flops / (wallMs * 1e6)).toFixed(1)),
        kernelGflops: typeof kernelMs === "number" ? Number((flops / ((kernelMs / reps) * 1e6)).toFixed(1)) : null,
        maxRelDiff: Number(maxRelDiff.toPrecision(3)),
        ...(errors.length > 0 ? { error: errors[0] } : {})
      }))
    } catch (e) {
      // one kernel that throws does not end the sweep
      console.log(JSON.stringify({ kernel, n, error: (e instanceof Error ? e.message : String(e)).split("\n")[0] }))
    } finally {
      tf.dispose([check, reference])
    }
  }
  tf.dispose([a, b])
}
process.exit(0)
