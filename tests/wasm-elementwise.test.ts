/**
 * Fixes 11–13 (src/runtime/wasm/Fixes.ts, Elementwise.ts): wasm's `Add`, `Sub`, `Multiply`,
 * `Transpose`, `Sin` and `Cos` as our loops over the heap, against the cpu backend, on the shapes they take (same
 * shapes, trailing dimensions, one number, merged axes, runs of vectors and element by element) and
 * those they leave to the stock kernel (odd sizes, other broadcasts, int32 arithmetic, more than four
 * loops).
 */
import { assert, describe, it } from "@effect/vitest"
import { Effect } from "effect"
import type { Tensor } from "../src/graph/Apply.ts"
import { load } from "../src/runtime/Backend.ts"
import { permutedAxes } from "../src/runtime/wasm/Elementwise.ts"
import { elementwiseCalls } from "../src/runtime/wasm/Fixes.ts"

type Tfjs = Awaited<ReturnType<typeof runtime>>["tf"]
const runtime = (name: "cpu" | "wasm") => Effect.runPromise(load(name))

/** `f` on cpu and on wasm: the values (exactly equal expected: these ops round once, the same way) and wasm's kernels. */
const both = async (f: (tf: Tfjs) => Array<Tensor>) => {
  const values = async (tf: Tfjs) => {
    const profile = await tf.profile(() => tf.tidy(() => f(tf)) as never)
    const outs = profile.result as unknown as Array<Tensor>
    const v = outs.map((t) => ({ shape: t.shape, data: Array.from(t.dataSync()) }))
    tf.dispose(outs)
    return { v, kernels: profile.kernelNames }
  }
  const cpu = await values((await runtime("cpu")).tf)
  const wasm = await values((await runtime("wasm")).tf)
  return { cpu: cpu.v, wasm: wasm.v }
}

const seq = (tf: Tfjs, shape: Array<number>, seed: number, dtype: "float32" | "int32" = "float32") => {
  const n = shape.reduce((a, b) => a * b, 1)
  return tf.tensor(Array.from({ length: n }, (_, i) => (dtype === "int32" ? ((i * 7 + seed) % 23) - 11 : Math.sin(i * 1.3 + seed) * 10)), shape, dtype)
}

describe("wasm Add, Sub, Multiply and Transpose (fixes 11, 12) equal cpu", () => {
  it("Add, Sub, Multiply, RealDiv: same shapes, trailing dimensions either side, one number either side, one per row, odd sizes, int32", async () => {
    const pairs: Array<[Array<number>, Array<number>]> = [
      [[1024, 128], [1024, 128]],
      [[32, 8, 12], [8, 12]],
      [[8, 12], [32, 8, 12]],
      [[6, 8], [1, 8]],
      [[6, 8], []],
      [[], [6, 8]],
      [[1, 16], [16]],
      [[5, 3], [5, 3]],
      [[6, 8], [6, 1]],
      [[4, 1], [1, 4]],
      // one number per row (an [n, 1] side), either side, and with leading axes
      [[24, 64], [24, 1]],
      [[24, 1], [24, 64]],
      [[3, 5, 16], [3, 5, 1]],
      [[3, 5, 16], [5, 1]],
      [[6, 6], [6, 1]]
    ]
    for (const [sa, sb] of pairs) {
      for (const dtype of ["float32", "int32"] as const) {
        const { cpu, wasm } = await both((tf) => {
          const [a, b] = [seq(tf, sa, 1, dtype), seq(tf, sb, 2, dtype)]
          return [tf.add(a, b), tf.sub(a, b), tf.mul(a, b), ...(dtype === "float32" ? [tf.div(a, b)] : [])]
        })
        assert.deepStrictEqual(wasm, cpu, `${dtype} [${sa}] and [${sb}]`)
      }
    }
  })

  it("NaN and infinities pass through", async () => {
    const { cpu, wasm } = await both((tf) => {
      const a = tf.tensor1d([NaN, Infinity, -Infinity, 1, 0, -0, 3e38, 1e-40])
      const b = tf.tensor1d([1, Infinity, Infinity, NaN, -0, -0, 3e38, 1e-40])
      return [tf.add(a, b), tf.sub(a, b), tf.mul(a, b)]
    })
    assert.deepStrictEqual(wasm, cpu)
  })

  it("Transpose: the attention's head split and merge, axes of 1, merged axes, element by element, int32, five loops", async () => {
    const cases: Array<[Array<number>, Array<number>]> = [
      [[8, 128, 4, 32], [0, 2, 1, 3]],
      [[8, 128, 4, 32], [0, 2, 3, 1]],
      [[8, 4, 32, 128], [0, 3, 1, 2]],
      [[1024, 128], [1, 0]],
      [[3, 1, 5, 4], [2, 1, 0, 3]],
      [[2, 3, 4, 5, 8], [0, 1, 3, 2, 4]],
      [[2, 3, 2, 3, 2], [4, 3, 2, 1, 0]],
      [[7], [0]],
      [[2, 3, 6], [2, 0, 1]]
    ]
    for (const [shape, perm] of cases) {
      for (const dtype of ["float32", "int32"] as const) {
        const { cpu, wasm } = await both((tf) => [tf.transpose(seq(tf, shape, 3, dtype), perm)])
        assert.deepStrictEqual(wasm, cpu, `${dtype} [${shape}] by [${perm}]`)
      }
    }
  })

  it("Sin and Cos (fix 13): equal to cpu's (both Math.sin and Math.cos rounded to float32), angles up to 1024", async () => {
    const { cpu, wasm } = await both((tf) => {
      const x = tf.mul(tf.reshape(tf.range(0, 1024), [1024, 1, 1]), tf.tensor3d(Array.from({ length: 16 }, (_, j) => 10000 ** (-j / 16)), [1, 1, 16]))
      return [tf.sin(x), tf.cos(x), tf.cos(tf.tensor1d([NaN, Infinity, -0, 1e30]))]
    })
    assert.deepStrictEqual(wasm, cpu)
  })

  it("the loops replace the stock kernels where they apply, and only there", async () => {
    const { tf } = await runtime("wasm")
    const calls = (f: (tf: Tfjs) => Tensor) => {
      const before = { ...elementwiseCalls }
      tf.tidy(() => void f(tf).dataSync())
      return [elementwiseCalls.binary - before.binary, elementwiseCalls.transpose - before.transpose]
    }
    assert.deepStrictEqual(calls((t) => t.add(t.ones([1024, 128]), t.ones([1024, 128]))), [1, 0])
    assert.deepStrictEqual(calls((t) => t.add(t.ones([32, 8, 12]), t.ones([8, 12]))), [1, 0])
    assert.deepStrictEqual(calls((t) => t.mul(t.scalar(2), t.ones([4, 4]))), [1, 0])
    assert.deepStrictEqual(calls((t) => t.sub(t.scalar(2), t.ones([4, 4]))), [0, 0])
    assert.deepStrictEqual(calls((t) => t.add(t.ones([5, 3]), t.ones([5, 3]))), [0, 0])
    assert.deepStrictEqual(calls((t) => t.mul(t.ones([1024, 1]), t.ones([1024, 64]))), [1, 0])
    assert.deepStrictEqual(calls((t) => t.sub(t.ones([1024, 64]), t.ones([1024, 1]))), [1, 0])
    assert.deepStrictEqual(calls((t) => t.sub(t.ones([1024, 1]), t.ones([1024, 64]))), [0, 0])
    assert.deepStrictEqual(calls((t) => t.div(t.ones([1024, 64]), t.ones([1024, 1]))), [1, 0])
    assert.deepStrictEqual(calls((t) => t.div(t.ones([1024, 1]), t.ones([1024, 64]))), [0, 0])
    assert.deepStrictEqual(calls((t) => t.add(t.ones([8, 1024, 64]), t.ones([1024, 1]))), [0, 0])
    assert.deepStrictEqual(calls((t) => t.add(t.ones([6, 8], "int32"), t.ones([6, 8], "int32"))), [0, 0])
    assert.deepStrictEqual(calls((t) => t.transpose(t.ones([8, 128, 4, 32]), [0, 2, 1, 3])), [0, 1])
    assert.deepStrictEqual(calls((t) => t.transpose(t.ones([2, 3, 2, 3, 2]), [4, 3, 2, 1, 0])), [0, 0])
    // the merged axes: [8, 128, 4, 32] by [0, 2, 1, 3] is four loops, [2, 3, 4, 5, 8] by [0, 1, 3, 2, 4] three
    assert.deepStrictEqual(permutedAxes([8, 128, 4, 32], [0, 2, 1, 3]), [[8, 16384], [4, 32], [128, 128], [32, 1]])
    assert.deepStrictEqual(permutedAxes([2, 3, 4, 5, 8], [0, 1, 3, 2, 4]), [[6, 160], [5, 8], [4, 40], [8, 1]])
    assert.deepStrictEqual(permutedAxes([3, 1, 5], [1, 0, 2]), [[15, 1]])
  })
})
