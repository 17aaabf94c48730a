/**
 * The clipping norm's Σg² on webgpu, two ways, for gradients of the 4-layer d512 LM's shapes
 * ([2048, 512], [512, 2048], [512, 512]): each gradient summed by one workgroup (as before), and in
 * chunks of at least 4,096 elements, a workgroup each (`Fused.makeSumSquares`, now). Prints, per way,
 * the median GPU kernel time of 5 runs (`tf.time`, timestamp queries) and the sum, which must agree.
 * Run: node bench/gpu/sum-squares.ts (on the GPU machine, or on lavapipe, where one workgroup runs
 * at the CPU's full speed: a hint only).
 */
import { Effect } from "effect"
import type { Tensor } from "../../src/graph/Apply.ts"
import { load } from "../../src/runtime/Backend.ts"
import { makeSumSquares, runKernel } from "../../src/runtime/Fused.ts"

const { tf } = await Effect.runPromise(load("webgpu"))
const shapes = [[2048, 512], [512, 2048], [512, 512]]
const xs = shapes.map((s) => tf.randomNormal(s, 0, 1, "float32", 1) as Tensor)
const chunked = makeSumSquares(tf)
const whole = (ts: ReadonlyArray<Tensor>) =>
  tf.addN(ts.map((x) => tf.reshape(runKernel(tf, "ConceptmoeSumSquares", { x: tf.reshape(x, [1, x.size]) }), [])))
for (const [way, f] of [["one workgroup per gradient", whole], ["chunks of at least 4,096", chunked]] as const) {
  const value = (await f(xs).data())[0]!
  const ms: Array<number> = []
  for (let r = 0; r < 5; r++) ms.push(((await tf.time(() => tf.dispose(f(xs)))) as unknown as { kernelMs: number }).kernelMs)
  ms.sort((a, b) => a - b)
  console.log(JSON.stringify({ way, kernelMsMedian: Number(ms[2]!.toFixed(3)), sum: value }))
}
