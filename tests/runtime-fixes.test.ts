/**
 * Each fix in src/runtime/Fixes.ts, with a check that fails without it, and gradient checks of the
 * ConceptMoE pieces against finite differences.
 */
import { assert, describe, it } from "@effect/vitest"
import { Effect } from "effect"
import type { Scalar } from "@tensorflow/tfjs"
import type { Tensor } from "../src/graph/Apply.ts"
import { load } from "../src/runtime/Backend.ts"
import { makeDetach, makeMatMul, makeOneHot, makeSte } from "../src/runtime/Fixes.ts"
import { loss, materialize } from "../src/runtime/Lower.ts"
import { load as loadJson } from "./support/models.ts"

const runtime = (name: "cpu" | "wasm") => Effect.runPromise(load(name))
const close = (a: ArrayLike<number>, b: ArrayLike<number>, tol: number) => {
  assert.strictEqual(a.length, b.length)
  for (let i = 0; i < a.length; i++) assert.closeTo(a[i]!, b[i]!, tol, `index ${i}`)
}

describe("fixes", () => {
  it("wasm: gather's gradient needs UnsortedSegmentSum, which we register; it equals cpu's", async () => {
    const grads: Array<Float32Array> = []
    for (const name of ["cpu", "wasm"] as const) {
      const { tf } = await runtime(name)
      const x = tf.tensor2d([[1, 2], [3, 4], [5, 6]])
      const g = tf.grad((t: Tensor) => tf.sum(tf.mul(tf.gather(t, tf.tensor1d([2, 0, 2], "int32")), tf.tensor2d([[1, 2], [3, 4], [5, 6]]))))(x)
      grads.push(g.dataSync() as Float32Array)
    }
    close(grads[1]!, [3, 4, 0, 0, 6, 8], 1e-6)
    close(grads[0]!, grads[1]!, 1e-6)
  })

  it("wasm: our in-place Slice equals cpu's on boxes of rank 1 to 4 (float and int), and large batched products equal cpu's", async () => {
    const cases: ReadonlyArray<readonly [Array<number>, Array<number>, Array<number>]> = [
      [[10], [3], [4]],
      [[4, 6], [1, 2], [2, 3]],
      [[4, 6], [1, 0], [2, 6]],
      [[3, 5, 7], [1, 2, 0], [2, 2, 7]],
      [[3, 5, 7], [0, 1, 3], [3, 4, 2]],
      [[2, 3, 4, 5], [1, 0, 1, 2], [1, 3, 2, 3]],
      [[2, 3, 4, 5], [0, 1, 0, 0], [2, 2, 4, 5]]
    ]
    for (const dtype of ["float32", "int32"] as const) {
      for (const [shape, begin, size] of cases) {
        const results: Array<ArrayLike<number>> = []
        for (const name of ["cpu", "wasm"] as const) {
          const { tf } = await runtime(name)
          const n = shape.reduce((a, b) => a * b, 1)
          const x = tf.tensor(Array.from({ length: n }, (_, i) => i * 3 + 1), shape, dtype)
          results.push(tf.slice(x, begin, size).dataSync())
        }
        assert.deepStrictEqual(Array.from(results[1]!), Array.from(results[0]!), `${shape} ${begin} ${size}`)
        assert.strictEqual(results[1]!.length, size.reduce((a, b) => a * b, 1))
      }
    }
    const products: Array<ArrayLike<number>> = []
    for (const name of ["cpu", "wasm"] as const) {
      const { tf } = await runtime(name)
      const mm = makeMatMul(tf, { weights: 0, attentionMap: 0, other: 0 })
      // 3 × (256·8·256 = 2^19 multiply-adds, 256 rows): the wasm path runs three 2-D products
      products.push(mm(tf.randomNormal([3, 256, 8], 0, 1, "float32", 4), tf.randomNormal([3, 8, 256], 0, 1, "float32", 5), "other").dataSync())
    }
    close(products[1]!, products[0]!, 1e-3)
  })

  it("the explicit-transpose matmul has the stock gradient, and counts its FLOPs", async () => {
    const { tf } = await runtime("wasm")
    const counter = { weights: 0, attentionMap: 0, other: 0 }
    const mm = makeMatMul(tf, counter)
    const a = tf.randomNormal([5, 3], 0, 1, "float32", 1)
    const b = tf.randomNormal([3, 4], 0, 1, "float32", 2)
    const ours = tf.grads((x: Tensor, y: Tensor) => tf.sum(tf.square(mm(x, y, "weights"))))([a, b])
    const stock = tf.grads((x: Tensor, y: Tensor) => tf.sum(tf.square(tf.matMul(x, y))))([a, b])
    close(ours[0]!.dataSync(), stock[0]!.dataSync(), 1e-4)
    close(ours[1]!.dataSync(), stock[1]!.dataSync(), 1e-4)
    assert.strictEqual(counter.weights, 2 * 5 * 3 * 4)
  })

  it("a segment sum's gradient is one gather of dy (0 where an id is negative), on cpu and wasm", async () => {
    for (const name of ["cpu", "wasm"] as const) {
      const { tf } = await runtime(name)
      const x = tf.tensor2d([[1, 2], [3, 4], [5, 6], [7, 8]])
      const ids = tf.tensor1d([2, -1, 0, 2], "int32")
      const w = tf.tensor2d([[1, 10], [100, 1000], [3, 30]])
      const f = (t: Tensor) => tf.sum(tf.mul(tf.unsortedSegmentSum(t, ids, 3), w))
      const info = await tf.profile(() => void tf.grad(f)(x).dataSync())
      // row i gets w[ids[i]]; the row with a negative id gets nothing
      close(tf.grad(f)(x).dataSync(), [3, 30, 0, 0, 1, 10, 3, 30], 0)
      const names = info.kernels.map((k) => k.name)
      assert.isFalse(names.includes("LogicalAnd"), `${name}: ${names.join(",")}`)
      assert.strictEqual(names.filter((k) => k === "GatherV2").length, 1, `${name}: ${names.join(",")}`)
    }
  })

  it("what a gradient saves shares its data (no Identity kernel), reshapes run no dispatched kernel, and nothing leaks", async () => {
    for (const name of ["cpu", "wasm"] as const) {
      const { tf } = await runtime(name)
      const x = tf.variable(tf.tensor2d([[1, -2, 3], [4, 5, -6]]), true, `fix16-${name}`)
      const w = tf.tensor2d([[1, 2], [3, 4], [5, 6]])
      // a customGrad that saves both inputs, reshapes forward and in gradients, a same-shape Add
      const square = tf.customGrad(((a: Tensor, save: (ts: Array<Tensor>) => void) => {
        save([a])
        return { value: tf.mul(a, a), gradFunc: (dy: Tensor, [s]: Array<Tensor>) => [tf.mul(dy, tf.mul(s!, 2))] }
      }) as unknown as Parameters<typeof tf.customGrad>[0])
      const f = () => {
        const y = tf.reshape(square(tf.reshape(tf.matMul(x, w), [4])) as Tensor, [2, 2])
        return tf.sum(tf.add(y, tf.reshape(x, [3, 2]).slice([0, 0], [2, 2]))) as Scalar
      }
      const before = tf.memory().numTensors
      const info = await tf.profile(() => tf.tidy(() => void tf.variableGrads(f, [x]).grads[x.name]!.dataSync()))
      const names = info.kernels.map((k) => k.name)
      assert.isFalse(names.includes("Identity"), `${name}: ${names.join(",")}`)
      assert.isFalse(names.includes("Reshape"), `${name}: ${names.join(",")}`)
      assert.strictEqual(tf.memory().numTensors, before, name)
      const g = tf.tidy(() => tf.variableGrads(f, [x]).grads[x.name]!.dataSync())
      // d/dx Σ (x·w)² + Σ of x's first four entries: 2·(x·w)·wᵀ, plus 1 on those
      const xw = [[1 - 6 + 15, 2 - 8 + 18], [4 + 15 - 30, 8 + 20 - 36]]
      const expected = [0, 1].flatMap((i) => [0, 1, 2].map((j) => 2 * (xw[i]![0]! * [1, 3, 5][j]! + xw[i]![1]! * [2, 4, 6][j]!) + (3 * i + j < 4 ? 1 : 0)))
      close(g, expected, 1e-4)
      x.dispose()
    }
  })

  it("comparisons on the tape get zero gradients instead of breaking backprop", async () => {
    const { tf } = await runtime("cpu")
    const x = tf.tensor1d([1, -2, 3])
    const g = tf.grad((t: Tensor) => tf.sum(tf.where(tf.greater(t, 0), t, tf.mul(t, 3))))(x)
    close(g.dataSync(), [1, 3, 1], 1e-6)
  })

  it("detach stops the gradient; the STE is 1 forward and identity backward", async () => {
    const { tf } = await runtime("cpu")
    const detach = makeDetach(tf)
    const ste = makeSte(tf)
    const x = tf.tensor1d([0.2, 0.7, 1.4])
    close(tf.grad((t: Tensor) => tf.sum(tf.mul(detach(t), t)))(x).dataSync(), [0.2, 0.7, 1.4], 1e-6)
    close(ste(x).dataSync(), [1, 1, 1], 0)
    close(tf.grad((t: Tensor) => tf.sum(tf.mul(ste(t), tf.tensor1d([2, 3, 4]))))(x).dataSync(), [2, 3, 4], 1e-6)
  })

  it("wasm: our one-hot is 0/1 in float32 (the stock float oneHot writes int bit patterns)", async () => {
    const { tf } = await runtime("wasm")
    const ours = makeOneHot(tf)(tf.tensor1d([2, 0], "int32"), 3)
    close(ours.dataSync(), [0, 0, 1, 1, 0, 0], 0)
    const stock = tf.oneHot(tf.tensor1d([2, 0], "int32"), 3, 1, 0, "float32").dataSync()
    assert.notStrictEqual(stock[2], 1)
  })
})

describe("gradient checks against finite differences (cpu, float32)", () => {
  // one expert: routing cannot flip under a perturbation, so the loss is smooth away from boundary flips
  const base = { kind: "moe", vocab: 16, hidden: 8, layers: 4, heads: 2, experts: 1, topK: 1, expertHidden: 8 }
  const cases: ReadonlyArray<readonly [string, RegExp, Record<string, unknown>]> = [
    ["chunk module W_q (through the EMA coefficients and the STE confidence)", /concept\/chunk\/q\.weight/, { merge: "sum" }],
    ["chunk module W_k, last-token merge", /concept\/chunk\/k\.weight/, { merge: "last" }],
    ["joint decoding W_k^c", /decoder\/0\/mixer\/attn\/kc\.weight/, {}],
    ["concept model (through merge and dechunk)", /concept\/model\/0\/mixer\/attn\/q\.weight/, {}]
  ]
  for (const [name, pattern, extra] of cases) {
    it(name, async () => {
      const { tf } = await runtime("cpu")
      const m = await Effect.runPromise(loadJson({ kind: "conceptmoe", baseline: base, ratio: 2, encoderLayers: 1, decoderLayers: 1, lambda: 0.03, ...extra }))
      const low = materialize(tf, m.analysis, 11)
      // joint-decoding weights start at zero; give them values so their gradient is not trivially 0
      for (const [p, v] of low.variables) if (/\/(qc|kc|vc)\.weight$/.test(p)) v.assign(tf.randomNormal(v.shape, 0, 0.3, "float32", 5))
      // H-Net's identity init of W_q, W_k (plus noise) keeps p away from ½, so few boundaries sit on the edge
      for (const [p, v] of low.variables) {
        if (/chunk\/(q|k)\.weight$/.test(p)) v.assign(tf.add(tf.eye(8), tf.randomNormal([8, 8], 0, 0.1, "float32", p.length)))
      }
      const batch = {
        rows: 2,
        length: 12,
        ids: new Int32Array(24).map((_, i) => (i * 5 + 3) % 16),
        targets: new Int32Array(24).map((_, i) => (i * 3 + 1) % 16)
      }
      const [p, v] = [...low.variables.entries()].find(([path]) => pattern.test(path))!
      const f = () => loss(low, batch, { training: false, seed: 2 })
      const boundariesOf = () => tf.tidy(() => Array.from(f().ctx.chunk!.boundaries).join(""))
      const analytic = tf.tidy(() => tf.variableGrads(() => f().total, [v]).grads[v.name]!.dataSync())
      const original = v.dataSync().slice()
      const eps = 3e-3
      let checked = 0
      for (const i of [0, 5, 17, 30, 41]) {
        const at = (delta: number) => {
          const w = original.slice()
          w[i] = w[i]! + delta
          v.assign(tf.tensor(w, v.shape))
          return { value: tf.tidy(() => f().total.dataSync()[0]!), boundaries: boundariesOf() }
        }
        const up = at(eps)
        const down = at(-eps)
        v.assign(tf.tensor(original, v.shape))
        if (up.boundaries !== down.boundaries) continue // a boundary flipped: no derivative there
        const numeric = (up.value - down.value) / (2 * eps)
        assert.closeTo(analytic[i]!, numeric, 2e-3 + 0.05 * Math.abs(numeric), `${p}[${i}]`)
        checked++
      }
      assert.isAbove(checked, 2)
    }, 60_000)
  }
})

describe("cpu UnsortedSegmentSum", () => {
  it("our linear-time kernel replaces the stock one and sums rows into segments (out-of-range ids dropped)", async () => {
    const { tf } = await runtime("cpu")
    const x = tf.tensor2d([[1, 2], [3, 4], [5, 6], [7, 8]])
    const y = tf.unsortedSegmentSum(x, tf.tensor1d([2, 0, 2, 5], "int32"), 3)
    close(y.dataSync(), [3, 4, 0, 0, 6, 8], 0)
    assert.include(String(tf.getKernel("UnsortedSegmentSum", "cpu")!.kernelFunc), "numSegments * inner")
  })
})
