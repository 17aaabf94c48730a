/**
 * Our SIMD matrix product on the wasm backend (src/runtime/wasm/Gemm.ts, fix 8 in Fixes.ts): the
 * assembler's encodings, and every product through tfjs's `BatchMatMul` equal to the cpu backend's
 * (values and gradients), over transposes, edges (rows not a multiple of 4, columns not of 8), a
 * K of 1, broadcast batches and the small products that stay on the stock kernel; both loop orders
 * (B's panels outside or inside A's blocks) the same bits.
 */
import { assert, describe, it } from "@effect/vitest"
import { Effect } from "effect"
import type { Tensor, Tf } from "../src/graph/Apply.ts"
import * as Settings from "../src/internal/Settings.ts"
import { load } from "../src/runtime/Backend.ts"
import { settingsOf, useSettings } from "../src/runtime/Env.ts"
import { makeMatMul } from "../src/runtime/Fixes.ts"
import { makeMaskedSoftmax } from "../src/runtime/Fused.ts"
import { moduleBytes, sleb, uleb } from "../src/runtime/wasm/Assemble.ts"
import { makeGemm, panelsOuter } from "../src/runtime/wasm/Gemm.ts"

const runtime = (name: "cpu" | "wasm") => Effect.runPromise(load(name)).then((r) => r.tf)

/** The largest |a − b| over the largest |b| (b the reference). */
const relativeError = (a: ArrayLike<number>, b: ArrayLike<number>): number => {
  assert.strictEqual(a.length, b.length)
  let err = 0
  let scale = 0
  for (let i = 0; i < a.length; i++) {
    err = Math.max(err, Math.abs(a[i]! - b[i]!))
    scale = Math.max(scale, Math.abs(b[i]!))
  }
  return err / Math.max(scale, 1e-30)
}

/** Deterministic operands (the same on both backends). */
const operand = (tf: Tf, shape: ReadonlyArray<number>, seed: number): Tensor => {
  const n = shape.reduce((a, b) => a * b, 1)
  return tf.tensor(Array.from({ length: n }, (_, i) => Math.sin(i * 12.9898 + seed * 78.233) * 2), [...shape], "float32")
}

/** `[batchA, batchB, m, k, n]`: A is `[batchA, m, k]` (`[batchA, k, m]` transposed), B likewise; a batch of 1 broadcasts. */
const shapes: ReadonlyArray<readonly [number, number, number, number, number]> = [
  [1, 1, 16, 8, 8], // whole blocks and panels
  [1, 1, 17, 5, 13], // a row past the blocks, columns past the panels
  [1, 1, 35, 1, 3], // K of 1, fewer columns than a panel
  [1, 1, 64, 33, 24],
  [2, 2, 18, 7, 9], // a batch
  [1, 3, 19, 6, 10], // A broadcast over B's batch
  [3, 1, 21, 7, 19], // B broadcast over A's batch
  [2, 2, 4, 6, 5], // fewer rows than the kernel takes: the stock kernel
  [1, 1, 1, 9, 40]
]

const products = (tf: Tf): Array<Float32Array> => {
  const out: Array<Float32Array> = []
  for (const [ba, bb, m, k, n] of shapes) {
    for (const [ta, tb] of [[false, false], [true, false], [false, true], [true, true]] as const) {
      const a = operand(tf, [ba, ...(ta ? [k, m] : [m, k])], m + k)
      const b = operand(tf, [bb, ...(tb ? [n, k] : [k, n])], n + 2 * k)
      out.push(tf.matMul(a, b, ta, tb).dataSync() as Float32Array)
      tf.dispose([a, b])
    }
  }
  return out
}

/** Our kernel over the wasm backend's heap, and a tensor's byte offset there. */
const onHeap = (tf: Tf) => {
  const b = tf.backend() as unknown as { wasm: { asm: { memory: WebAssembly.Memory }; _malloc: (n: number) => number; _free: (p: number) => void }; dataIdMap: { get: (d: object) => { memoryOffset: number } } }
  return {
    gemm: makeGemm({ memory: b.wasm.asm.memory, malloc: b.wasm._malloc, free: b.wasm._free })!,
    at: (t: Tensor) => b.dataIdMap.get((t as unknown as { dataId: object }).dataId).memoryOffset
  }
}

describe("wasm matrix product (our SIMD kernel)", () => {
  it("encodes LEB128 numbers as the WebAssembly format does, and assembles a module the engine accepts", () => {
    assert.deepStrictEqual(uleb(0), [0])
    assert.deepStrictEqual(uleb(127), [0x7f])
    assert.deepStrictEqual(uleb(128), [0x80, 0x01])
    assert.deepStrictEqual(uleb(624485), [0xe5, 0x8e, 0x26])
    assert.deepStrictEqual(sleb(-1), [0x7f])
    assert.deepStrictEqual(sleb(63), [0x3f])
    assert.deepStrictEqual(sleb(64), [0xc0, 0x00])
    assert.deepStrictEqual(sleb(-123456), [0xc0, 0xbb, 0x78])
    assert.isTrue(WebAssembly.validate(moduleBytes([{ name: "f", params: 2, locals: [], body: [] }])))
  })

  it("equals the cpu backend on every layout: transposes, edges, K of 1, broadcast batches", async () => {
    const cpu = products(await runtime("cpu"))
    const wasm = products(await runtime("wasm"))
    assert.strictEqual(wasm.length, shapes.length * 4)
    for (let i = 0; i < cpu.length; i++) {
      const [ba, bb, m, k, n] = shapes[Math.floor(i / 4)]!
      assert.isBelow(relativeError(wasm[i]!, cpu[i]!), 1e-5, `case ${i}: batches ${ba}/${bb}, ${m}×${k}×${n}, flags ${i % 4}`)
    }
  })

  it("runs the products (not XNNPACK's): its sums differ in the last bits from `CONCEPTMOE_MATMUL=tfjs`'s, both equal to cpu's", async () => {
    const tf = await runtime("wasm")
    const before = settingsOf(tf)
    const run = () => {
      const a = operand(tf, [512, 300], 1)
      const b = operand(tf, [300, 40], 2)
      const out = tf.matMul(a, b).dataSync() as Float32Array
      tf.dispose([a, b])
      return out
    }
    const ours = run()
    useSettings(tf, { ...before, matmul: "tfjs" })
    let xnnpack: Float32Array
    try {
      xnnpack = run()
    } finally {
      useSettings(tf, before)
    }
    const ctf = await runtime("cpu")
    const a = operand(ctf, [512, 300], 1)
    const b = operand(ctf, [300, 40], 2)
    const reference = ctf.matMul(a, b).dataSync()
    assert.isBelow(relativeError(ours, reference), 1e-5)
    assert.isBelow(relativeError(xnnpack, reference), 1e-5)
    assert.isAbove(ours.filter((v, i) => v !== xnnpack[i]).length, 0)
    assert.strictEqual(Settings.defaults.matmul, "auto")
  })

  it("loops over B's panels outside or inside A's blocks with the same bits; the order chosen by shape", async () => {
    const tf = await runtime("wasm")
    const { gemm, at } = onHeap(tf)
    // [batch, m, k, n, transposeA, transposeB]: rows past the blocks, columns past the panels, a batch
    for (const [batch, m, k, n, ta, tb] of [[1, 17, 33, 29, true, false], [1, 16, 40, 64, false, true], [2, 9, 5, 21, false, false], [1, 23, 64, 48, true, true]] as const) {
      const a = operand(tf, [batch, ...(ta ? [k, m] : [m, k])], m)
      const bm = operand(tf, [batch, ...(tb ? [n, k] : [k, n])], n)
      const c = [tf.zeros([batch, m, n]), tf.zeros([batch, m, n])]
      for (const [i, outer] of [[0, false], [1, true]] as const) {
        gemm.product({ a: at(a), b: at(bm), c: at(c[i]!), batch, aBatched: true, bBatched: true, m, k, n, transposeA: ta, transposeB: tb, panelsOuter: outer })
      }
      const [x, y] = c.map((t) => t.dataSync())
      assert.deepStrictEqual([...x!].map(String), [...y!].map(String), `${batch}×${m}×${k}×${n}`)
      assert.isBelow(relativeError(x!, tf.matMul(a, bm, ta, tb).dataSync()), 1e-6)
      tf.dispose([a, bm, ...c])
    }
    assert.isTrue(panelsOuter(128, 1024, 512))
    assert.isFalse(panelsOuter(512, 1024, 128))
    assert.isFalse(panelsOuter(256, 32, 512))
  })

  it("skips a causal map's empty triangle with the full product's bits (lowerC below the diagonal), on whole blocks and on edges", async () => {
    const tf = await runtime("wasm")
    const { gemm, at } = onHeap(tf)
    // a [rows, cols] matrix's lower (j ≤ i) or upper (j ≥ i) triangle, the rest 0
    const keep = (rows: number, cols: number, lower: boolean) =>
      tf.tensor2d(Array.from({ length: rows * cols }, (_, x) => ((lower ? x % cols <= Math.floor(x / cols) : x % cols >= Math.floor(x / cols)) ? 1 : 0)), [rows, cols])
    const triangles = ["lowerC", "lowerA", "upperA", "lowerB"] as const
    let skipped = 0
    // [batch, m, k, n]: square maps of whole blocks (the fast path), one of attention's, and edges (the full product)
    for (const [batch, m, k, n] of [[3, 64, 64, 64], [2, 32, 32, 16], [2, 16, 24, 32], [1, 128, 128, 128], [2, 21, 21, 13], [1, 17, 9, 17]] as const) {
      for (const triangle of triangles) {
        for (const [ta, tb] of [[false, false], [true, false], [false, true]] as const) {
          // op(A) [m, k] lower (lowerA) or upper (upperA) triangular; op(B) [k, n] lower (lowerB)
          let a = operand(tf, [batch, m, k], m + k)
          let bm = operand(tf, [batch, k, n], n + 2 * k)
          if (triangle === "lowerA" || triangle === "upperA") a = tf.mul(a, keep(m, k, triangle === "lowerA"))
          if (triangle === "lowerB") bm = tf.mul(bm, keep(k, n, true))
          const stored = [ta ? tf.transpose(a, [0, 2, 1]) : a, tb ? tf.transpose(bm, [0, 2, 1]) : bm]
          const [full, part] = [tf.zeros([batch, m, n]), tf.fill([batch, m, n], Number.NaN)]
          const x = { a: at(stored[0]!), b: at(stored[1]!), batch, aBatched: true, bBatched: true, m, k, n, transposeA: ta, transposeB: tb }
          gemm.product({ ...x, c: at(full) })
          gemm.product({ ...x, c: at(part), triangle })
          const [f, p] = [full.dataSync(), part.dataSync()]
          const label = `${triangle} ${batch}×${m}×${k}×${n} flags ${ta}/${tb}`
          for (let i = 0; i < f.length; i++) {
            const [row, col] = [Math.floor(i / n) % m, i % n]
            if (triangle !== "lowerC" || col <= row) assert.strictEqual(String(p[i]), String(f[i]), `${label} at ${i}`)
            else {
              // above the diagonal: 0 (a skipped block) or the product (a block across the diagonal)
              assert.isTrue(p[i] === 0 || p[i] === f[i], `${label} above the diagonal at ${i}: ${p[i]}`)
              if (p[i] === 0 && f[i] !== 0) skipped++
            }
          }
          assert.isBelow(relativeError(f, tf.matMul(a, bm).dataSync()), 1e-6, label)
          tf.dispose([a, bm, ...stored, full, part])
        }
      }
    }
    // lowerC skipped the blocks above the diagonal of the whole-block maps
    assert.isAbove(skipped, 3 * 64 * 64 / 4)
  })

  it("gives causal attention's output and gradients on wasm (triangle products) as the plain products and the cpu backend do", async () => {
    const run = async (name: "cpu" | "wasm", fused: boolean) => {
      const tf = await runtime(name)
      const before = settingsOf(tf)
      useSettings(tf, { ...before, fused })
      try {
        const [B, n, d] = [6, 48, 16]
        const q = operand(tf, [B, n, d], 1)
        const kt = operand(tf, [B, d, n], 2)
        const v = operand(tf, [B, n, d], 3)
        const mask = tf.tensor2d(Array.from({ length: n * n }, (_, x) => (x % n <= Math.floor(x / n) ? 0 : -1e9)), [n, n])
        const flops = { weights: 0, attentionMap: 0, other: 0 }
        const matMul = makeMatMul(tf, flops)
        const softmax = makeMaskedSoftmax(tf)
        const f = (x: Tensor, y: Tensor, z: Tensor) => {
          const p = softmax(matMul(x, y, "attentionMap", "lowerC"), 0.25, mask)
          return tf.sum(tf.mul(tf.sin(matMul(p, z, "attentionMap", "lowerA")), operand(tf, [B, n, d], 4)))
        }
        let out: Array<Float32Array> = []
        const info = await tf.profile(() => {
          const { value, grads } = tf.valueAndGrads(f)([q, kt, v])
          out = [value.dataSync() as Float32Array, ...grads.map((g) => g.dataSync() as Float32Array)]
        })
        return { out, triangles: info.kernels.filter((k) => k.name === "ConceptmoeTriangularMatMul").length }
      } finally {
        useSettings(tf, before)
      }
    }
    const cpu = await run("cpu", true)
    const plain = await run("wasm", false)
    const ours = await run("wasm", true)
    // the two products and their four gradients through the triangle kernel; none without our kernels
    assert.strictEqual(ours.triangles, 6)
    assert.strictEqual(plain.triangles, 0)
    assert.strictEqual(cpu.out.length, 4)
    for (let i = 0; i < cpu.out.length; i++) {
      assert.isBelow(relativeError(ours.out[i]!, cpu.out[i]!), 1e-5, `output ${i}`)
      assert.isBelow(relativeError(plain.out[i]!, cpu.out[i]!), 1e-5, `output ${i} (plain)`)
    }
  })

  it("refuses inner sizes that differ with a typed error naming both shapes (reachable from a custom kernel call)", async () => {
    const tf = await runtime("wasm")
    const a = operand(tf, [20, 6], 1)
    const b = operand(tf, [7, 5], 2)
    const run = () => tf.engine().runKernel("BatchMatMul", { a: tf.reshape(a, [1, 20, 6]), b: tf.reshape(b, [1, 7, 5]) } as never, { transposeA: false, transposeB: false } as never)
    assert.throws(run, /matMul: expected inner sizes that match, got 6 and 7 \(shapes \[1, 20, 6\] and \[1, 7, 5\]\)/)
    try {
      run()
    } catch (e) {
      assert.strictEqual((e as { _tag?: string })._tag, "InvalidInput")
    }
  })

  it("gives the cpu backend's gradients for each pair of transpose flags", async () => {
    const grads: Record<string, Array<Float32Array>> = {}
    for (const name of ["cpu", "wasm"] as const) {
      const tf = await runtime(name)
      for (const [ta, tb] of [[false, false], [true, false], [false, true], [true, true]] as const) {
        const a = operand(tf, ta ? [24, 37] : [37, 24], 3)
        const b = operand(tf, tb ? [19, 24] : [24, 19], 4)
        const g = tf.grads((x: Tensor, y: Tensor) => tf.sum(tf.square(tf.matMul(x, y, ta, tb))))([a, b])
        ;(grads[`${ta}${tb}`] ??= []).push(...g.map((t) => t.dataSync() as Float32Array))
      }
    }
    for (const [key, [ca, cb, wa, wb]] of Object.entries(grads)) {
      assert.isBelow(relativeError(wa!, ca!), 1e-5, `dA ${key}`)
      assert.isBelow(relativeError(wb!, cb!), 1e-5, `dB ${key}`)
    }
  })
})
