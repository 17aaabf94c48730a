/**
 * The SIMD kernels of src/runtime/wasm/Simd.ts on their own heap, in both builds (with relaxed SIMD:
 * fused multiply-adds and the plain truncation; without: a multiply and an add, the saturating
 * truncation), against the same functions in double precision: exact GELU (its erf a fitted rational
 * function), its gradient, SiLU's gradient, the attention softmax's gradient and Σx². The kernels
 * through tfjs, against the cpu backend, are in tests/wasm-kernels.test.ts.
 */
import { assert, describe, it } from "@effect/vitest"
import { makeSimd } from "../src/runtime/wasm/Simd.ts"

/** erf in double precision: its Taylor series below 3, a continued fraction of erfc above. */
const erf = (z: number): number => {
  const a = Math.abs(z)
  if (a < 3) {
    let sum = 0
    let term = a
    for (let k = 0; k < 80; k++) {
      sum += term / (2 * k + 1)
      term *= (-a * a) / (k + 1)
    }
    return Math.sign(z) * sum * (2 / Math.sqrt(Math.PI))
  }
  let f = 0
  for (let k = 80; k >= 1; k--) f = k / 2 / (a + f)
  return Math.sign(z) * (1 - Math.exp(-a * a) / Math.sqrt(Math.PI) / (a + f))
}
const phi = (x: number) => 0.5 * (1 + erf(x / Math.SQRT2))
const gauss = (x: number) => Math.exp(-0.5 * x * x) / Math.sqrt(2 * Math.PI)
const sigmoid = (x: number) => 1 / (1 + Math.exp(-x))

const memory = new WebAssembly.Memory({ initial: 64 })
const fail = () => NaN
const tails = { siluGrad: fail, gelu: fail, geluGrad: fail }
const builds = [true, false].flatMap((relaxed) => {
  const simd = makeSimd(memory, tails, { relaxed })
  return simd === undefined ? [] : [{ relaxed, simd }]
})

/** Consecutive float32 views of the heap. */
const views = (...lengths: Array<number>) => {
  let offset = 0
  return lengths.map((n) => {
    const v = new Float32Array(memory.buffer, offset, n)
    offset += 4 * n + 16 - ((4 * n) % 16)
    return v
  })
}

/** |got − want| ≤ tol·max(1, |want|) element by element (NaN only where wanted). */
const near = (got: ArrayLike<number>, want: ArrayLike<number>, tol: number, what: string) => {
  for (let i = 0; i < want.length; i++) {
    const [g, w] = [got[i]!, want[i]!]
    if (Number.isNaN(w) ? !Number.isNaN(g) : !(Math.abs(g - w) <= tol * Math.max(1, Math.abs(w)))) assert.fail(`${what}: index ${i}: ${g} vs ${w}`)
  }
}

/** softmax(s·scale + m[row mod m's rows]) per row, in double precision. */
const maskedSoftmax = (sv: Float32Array, m: Float32Array, rows: number, width: number, scale: number): Array<number> => {
  const mRows = m.length / width
  return Array.from({ length: rows }, (_, r) => {
    const z = Array.from({ length: width }, (_, c) => sv[r * width + c]! * scale + m[(r % mRows) * width + c]!)
    const top = Math.max(...z)
    const e = z.map((x) => Math.exp(x - top))
    const total = e.reduce((a, b) => a + b, 0)
    return e.map((x) => x / total)
  }).flat()
}

// x from −12 to 12 in steps of 2⁻⁸ (every float32 exactly), then ±80, ±1e-4, ±0 and NaN
const grid = [...Array.from({ length: 6144 }, (_, i) => -12 + i / 256), 80, -80, 1e-4, -1e-4, 0, -0, NaN, 3]

describe("wasm SIMD kernels in double precision's terms", () => {
  it("both builds exist here (the engine has 128-bit and relaxed SIMD)", () => {
    assert.deepStrictEqual(builds.map((b) => b.relaxed), [true, false])
  })

  for (const { relaxed, simd } of builds) {
    const build = relaxed ? "relaxed" : "plain"
    it(`${build}: exact GELU within 8e-7 (its Φ within 2e-7), its gradient within 5e-7, SiLU's within 8e-7 (of max(1, |value|))`, () => {
      const n = grid.length
      const [x, dy, y] = views(n, n, n)
      x!.set(grid)
      simd.gelu(x!, y!)
      near(y!, grid.map((v) => v * phi(v)), 8e-7, `${build} GELU`)
      // the largest error of Φ, from y/x away from 0
      let worst = 0
      grid.forEach((v, i) => {
        if (Math.abs(v) > 0.5 && Number.isFinite(v)) worst = Math.max(worst, Math.abs(y![i]! / v - phi(v)))
      })
      assert.isBelow(worst, 2e-7, `${build} Φ`)
      assert.isAbove(worst, 1e-9, `${build} Φ is float32`)
      dy!.set(grid.map((_, i) => Math.cos(i * 0.37) * 2))
      simd.geluGrad(x!, dy!, y!)
      near(y!, grid.map((v, i) => dy![i]! * (phi(v) + v * gauss(v))), 5e-7, `${build} GELU gradient`)
      simd.siluGrad(x!, dy!, y!)
      near(y!, grid.map((v, i) => (Math.abs(v) > 87 ? y![i]! : dy![i]! * sigmoid(v) * (1 + v * (1 - sigmoid(v))))), 8e-7, `${build} SiLU gradient`)
    })

    it(`${build}: the softmax gradient and Σx² (double precision, any length)`, () => {
      const [rows, width] = [6, 12]
      const [p, dp, out] = views(rows * width, rows * width, rows * width)
      for (let r = 0; r < rows; r++) {
        const e = Array.from({ length: width }, (_, c) => Math.exp(Math.sin(r * 5 + c)))
        const total = e.reduce((a, b) => a + b, 0)
        e.forEach((v, c) => (p![r * width + c] = v / total))
      }
      dp!.set(Array.from({ length: rows * width }, (_, i) => Math.cos(i)))
      simd.softmaxGrad(p!, dp!, out!, width, 0.5)
      const want = Array.from({ length: rows * width }, (_, i) => {
        const base = i - (i % width)
        let dot = 0
        for (let c = 0; c < width; c++) dot += p![base + c]! * dp![base + c]!
        return 0.5 * p![i]! * (dp![i]! - dot)
      })
      near(out!, want, 1e-6, `${build} softmax gradient`)
      for (const n of [1, 4, 7, 1001]) {
        const [v] = views(n)
        v!.set(Array.from({ length: n }, (_, i) => Math.sin(i + 1) * 1e3))
        const exact = Array.from(v!).reduce((a, b) => a + b * b, 0)
        assert.isBelow(Math.abs(simd.sumSquares(v!) - exact), 1e-12 * exact, `${build} Σx² of ${n}`)
      }
    })
  }

  for (const { relaxed, simd } of builds) {
    it(`${relaxed ? "relaxed" : "plain"}: the masked cross-entropy and its gradient within 1e-6 (logits up to ±80, masked rows, labels outside)`, () => {
      const [n, V] = [9, 36]
      const [l, m, out, dy, g, yf] = views(n * V, n, n, 4, n * V, n)
      const y = new Int32Array(yf!.buffer, yf!.byteOffset, n)
      l!.set(Array.from({ length: n * V }, (_, i) => Math.sin(i * 0.9) * (i % 3 === 0 ? 80 : 4)))
      m!.set([1, 0.5, 0, 2, 1, 1, 1, 1, 1])
      y.set([0, 35, 3, -1, 36, 7, 20, 1, 2])
      dy![0] = 1.5
      simd.nll(l!, y, m!, out!, V)
      simd.nllGrad(l!, y, m!, dy!, g!, V)
      const want = Array.from({ length: n }, (_, r) => {
        const row = Array.from(l!.subarray(r * V, (r + 1) * V))
        const top = Math.max(...row)
        const total = row.reduce((a, b) => a + Math.exp(b - top), 0)
        const valid = y[r]! >= 0 && y[r]! < V
        return {
          value: valid ? m![r]! * (Math.log(total) + top - row[y[r]!]!) : 0,
          grad: row.map((v, c) => (valid ? (Math.exp(v - top) / total - (c === y[r] ? 1 : 0)) * m![r]! * dy![0]! : 0))
        }
      })
      near(out!, want.map((w) => w.value), 1e-6, "value")
      near(g!, want.flatMap((w) => w.grad), 1e-6, "gradient")
    })
  }

  for (const { relaxed, simd } of builds) {
    it(`${relaxed ? "relaxed" : "plain"}: the masked softmax within 1e-6 (the mask's rows repeated, masked entries exactly 0, a NaN row NaN)`, () => {
      const [rows, width, mRows] = [10, 12, 5]
      const [sv, m, out] = views(rows * width, mRows * width, rows * width)
      sv!.set(Array.from({ length: rows * width }, (_, i) => Math.sin(i * 1.7) * 9))
      sv![3 * width + 2] = NaN
      m!.set(Array.from({ length: mRows * width }, (_, i) => (i % width <= Math.floor(i / width) ? 0 : -1e9)))
      simd.softmax(sv!, m!, out!, width, 0.4)
      near(out!, maskedSoftmax(sv!, m!, rows, width, 0.4), 1e-6, "softmax")
      assert.strictEqual(out![1], 0)
      assert.isTrue(out!.subarray(3 * width, 4 * width).every(Number.isNaN))
    })
  }

  for (const { relaxed, simd } of builds) {
    it(`${relaxed ? "relaxed" : "plain"}: the masked softmax on widths off multiples of 4 (a prefill piece's n × past + n), within 1e-6, every row whole`, () => {
      for (const [rows, width, mRows] of [[6, 5, 3], [4, 7, 4], [3, 129, 3], [2, 4, 1], [5, 258, 5]] as const) {
        const [sv, m, out] = views(rows * width, mRows * width, rows * width + 8)
        sv!.set(Array.from({ length: rows * width }, (_, i) => Math.sin(i * 1.3) * 8))
        // causal with a past: query r sees keys up to width − mRows + r
        m!.set(Array.from({ length: mRows * width }, (_, i) => (i % width <= width - mRows + Math.floor(i / width) ? 0 : -1e9)))
        out!.fill(7)
        simd.softmax(sv!.subarray(0, rows * width), m!, out!.subarray(0, rows * width), width, 0.35)
        near(out!.subarray(0, rows * width), maskedSoftmax(sv!, m!, rows, width, 0.35), 1e-6, `softmax ${rows}×${width}`)
        // nothing written past the last row
        assert.deepStrictEqual([...out!.subarray(rows * width)], new Array(8).fill(7))
      }
    })
  }

  for (const { relaxed, simd } of builds) {
    it(`${relaxed ? "relaxed" : "plain"}: the softmax and its gradient stopped at each causal row's diagonal give the whole rows' bits, zeros after`, () => {
      // three square maps of 12 rows (rows whose diagonal is inside a vector and at its end), and two
      // of 8 (two vectors a row)
      for (const [maps, n] of [[3, 12], [2, 8]] as const) {
        const rows = maps * n
        const [sv, m, whole, part, dp, gWhole, gPart] = views(rows * n, n * n, rows * n, rows * n, rows * n, rows * n, rows * n)
        sv!.set(Array.from({ length: rows * n }, (_, i) => Math.sin(i * 1.3) * 7))
        m!.set(Array.from({ length: n * n }, (_, i) => (i % n <= Math.floor(i / n) ? 0 : -1e9)))
        dp!.set(Array.from({ length: rows * n }, (_, i) => Math.cos(i * 0.7)))
        part!.fill(NaN)
        gPart!.fill(NaN)
        simd.softmax(sv!, m!, whole!, n, 0.3)
        simd.softmaxGrad(whole!, dp!, gWhole!, n, 0.3)
        // NaN in the vectors past each diagonal's: a kernel that read them would give NaN rows
        for (let i = 0; i < rows * n; i++) {
          if (i % n >= (Math.floor(i / n) % n) + 4 - ((Math.floor(i / n) % n) % 4)) [sv![i], dp![i]] = [NaN, NaN]
        }
        simd.softmax(sv!, m!, part!, n, 0.3, n)
        simd.softmaxGrad(whole!, dp!, gPart!, n, 0.3, n)
        for (let i = 0; i < rows * n; i++) {
          const [row, col] = [Math.floor(i / n) % n, i % n]
          assert.strictEqual(part![i], whole![i], `softmax ${maps}×${n} at ${i}`)
          // above the diagonal p is 0, so the gradient is ±0
          assert.strictEqual(gPart![i], col <= row ? gWhole![i] : 0, `gradient ${maps}×${n} at ${i}`)
          if (col > row) assert.strictEqual(whole![i], 0)
        }
      }
    })
  }

  it("the two builds agree within 1e-6 on GELU", () => {
    const n = grid.length
    const [x, a, b] = views(n, n, n)
    x!.set(grid)
    builds[0]!.simd.gelu(x!, a!)
    builds[1]!.simd.gelu(x!, b!)
    near(a!, b!, 1e-6, "relaxed vs plain")
  })
})
