/**
 * Our kernels for tfjs-backend-wasm, registered under the names of `../KernelNames.ts` when the
 * backend loads (`Backend.load`); the makers of `../Fused.ts` run them unless `CONCEPTMOE_FUSED=off`.
 * Each is one tfjs kernel where op by op takes several, kept only where it beats tfjs's ops at a
 * training step's shapes (`node bench/wasm-elementwise.ts` times both in one process). tfjs's wasm
 * elementwise ops run SIMD (a product by a scalar over [1024, 512] takes about 0.3 ms, a scalar
 * JavaScript loop about 0.7 ms), so a kernel wins by replacing several ops, or slow ones:
 *
 * - RMSNorm (both gradients in one pass), the rotary embedding (0.34 → 0.036 ms at [1024, 4, 32]
 *   against its JavaScript loop, alternating in one process), the clipping's Σx² (SIMD, `Simd.ts`;
 *   JavaScript loops where the shapes do not fit) and AdamW (SIMD, `AdamW.ts`).
 * - The masked cross-entropy (`makeMaskedNll`), forward and backward: one pass per row instead of
 *   tfjs's log-softmax and the one-hot (whose broadcast Equal alone costs about 17 ms at [1024, 256]);
 *   about 11× faster forward, 6× forward + backward at logits [1024, 256]. In SIMD (`Simd.ts`, with a
 *   SIMD ln) for rows of a multiple of 4: at [1024, 256] 1.36 → 0.63 ms forward and 1.89 → 0.72 ms
 *   backward against these JavaScript loops (alternating in one process).
 * - Exact GELU forward and backward, SiLU's gradient, attention's masked softmax and its gradient:
 *   SIMD with an exp in SIMD (`Simd.ts`), each one pass instead of several tfjs ops (GELU: Erf, which
 *   tfjs runs scalar, Exp and about 8 SIMD ops). Where the engine lacks SIMD, GELU runs as
 *   JavaScript loops, and the others op by op.
 * - The MoE layer's routing and slots (`makeTopMask`, `makeRoute`, `makeSlots`): `Moe.ts`.
 *
 * Not here, measured slower: the forward pass of SiLU (tfjs's Sigmoid and Mul are SIMD), whose
 * maker runs it op by op with our gradient kernel. The
 * scalar exps use {@link expNonPositive}, about twice as fast as `Math.exp`. Each kernel is tested
 * against the cpu backend's ops (tests/wasm-kernels.test.ts, tests/capacity.test.ts).
 *
 * @since 0.4.0
 */
import type { Tf } from "../../graph/Apply.ts"
import { kernels, wasmKernels } from "../KernelNames.ts"
import { type AdamW, makeAdamW } from "./AdamW.ts"
import { hasHeap, registerHeapKernel } from "./Heap.ts"
import { registerWasmMoe } from "./Moe.ts"
import { makeSimd, type Simd } from "./Simd.ts"

/** Registers one heap kernel: the outputs' shapes from the inputs', and the loop that fills them. */
type Register = (
  kernelName: string,
  outputs: (shapes: Array<Array<number>>) => Array<Array<number>>,
  run: (xs: Array<Float32Array | Int32Array>, outs: Array<Float32Array>, shapes: Array<Array<number>>, attrs: Record<string, number>) => void
) => void

/** Registers the wasm kernels (once); false, registering none, if the backend lacks the heap interface. */
export const registerWasmKernels = (tf: Tf): boolean => {
  if (!hasHeap(tf)) return false
  if (tf.getKernel(kernels.norm, "wasm") !== undefined) return true
  const register: Register = (kernelName, outputs, run) => registerHeapKernel(tf, kernelName, outputs, run)
  const memory = (tf.backend() as unknown as { wasm?: { asm?: { memory?: WebAssembly.Memory } } }).wasm?.asm?.memory
  // in SIMD where the engine has it (Simd.ts: four elements a step, the last n mod 4 by the scalar
  // formulas below), else JavaScript loops
  const simd = memory === undefined ? undefined : makeSimd(memory, { siluGrad, gelu, geluGrad })
  // inputs arrive in the order the call site names them
  registerNorms(register, simd)
  registerRotary(register, simd)
  registerOptimizer(register, memory === undefined ? undefined : makeAdamW(memory), simd)
  registerLoss(register, simd)
  registerActivations(register, simd)
  // the MoE layer's routing and slots (Moe.ts)
  registerWasmMoe(tf, kernels)
  return true
}

// exact GELU x·Φ(x) = (x + |x|)/2 − |x|·(1 − erf(|x|/√2))/2, and Φ(x) + x·φ(x), with Φ(x) = 1 − t/2
// for x ≥ 0 and t/2 below, t = 1 − erf(|x|/√2) (one exp each: e^(−x²/2) serves t and φ); the
// forward pass without a branch on the sign (a fifth faster on random signs)
const gelu = (v: number) => {
  const z = Math.abs(v)
  return 0.5 * (v + z) - 0.5 * z * erfTail(z, expNonPositive(-0.5 * v * v))
}
const geluGrad = (v: number, d: number) => {
  const e = expNonPositive(-0.5 * v * v)
  const half = 0.5 * erfTail(Math.abs(v), e)
  return d * ((v < 0 ? half : 1 - half) + v * e * 0.3989422804014327)
}
// SiLU's gradient σ(x)·(1 + x·(1 − σ(x)))
const siluGrad = (v: number, d: number) => {
  const sg = 1 / (1 + Math.exp(-v))
  return d * sg * (1 + v * (1 - sg))
}

/** RMSNorm forward and backward: in SIMD for rows of a multiple of 4 (Simd.ts), else loops. */
type Values = Float32Array | Int32Array | Uint8Array

/** 1/√(mean(x²) + eps) of the row of `d` values at `base` (RMSNorm's scale, the JavaScript route). */
const rmsScale = (x: Values, base: number, d: number, eps: number): number => {
  let sa = 0
  for (let c = 0; c < d; c++) sa += x[base + c]! * x[base + c]!
  return 1 / Math.sqrt(sa / d + eps)
}

/**
 * RMSNorm's gradients over rows of `d` (the JavaScript route, where the SIMD one does not apply):
 * dx = r·g·dy − x·r³·Σ(dy·g·x)/d per row, and, with `dg`, dg = Σ_rows dy·x·r.
 */
const normGradRows = (x: Values, g: Values, dy: Values, dx: Values, dg: Values | undefined, d: number, eps: number): void => {
  dg?.fill(0)
  for (let base = 0; base < x.length; base += d) {
    const r = rmsScale(x, base, d, eps)
    let sb = 0
    for (let c = 0; c < d; c++) sb += dy[base + c]! * g[c]! * x[base + c]!
    const k = (r * r * r * sb) / d
    for (let c = 0; c < d; c++) {
      dx[base + c] = r * g[c]! * dy[base + c]! - x[base + c]! * k
      if (dg !== undefined) dg[c] = dg[c]! + dy[base + c]! * x[base + c]! * r
    }
  }
}

const registerNorms = (register: Register, simd: Simd | undefined): void => {
  register(kernels.norm, (sh) => [sh[0]!], ([x, g], [y], [shape], a) => {
    const d = shape![1]!
    if (simd !== undefined && d % 4 === 0) return simd.norm(x as Float32Array, g as Float32Array, y!, d, a["eps"]!)
    for (let base = 0; base < x!.length; base += d) {
      const r = rmsScale(x!, base, d, a["eps"]!)
      for (let c = 0; c < d; c++) y![base + c] = x![base + c]! * r * g![c]!
    }
  })
  // dx = r·g·dy − x·r³·Σ(dy·g·x)/d
  register(kernels.normDx, (sh) => [sh[0]!], ([x, g, dy], [dx], [shape], a) => {
    const d = shape![1]!
    if (simd !== undefined && d % 4 === 0) return simd.normDx(x as Float32Array, g as Float32Array, dy as Float32Array, dx!, d, a["eps"]!)
    normGradRows(x!, g!, dy!, dx!, undefined, d, a["eps"]!)
  })
  // both gradients in one pass: dx as above, and dg = Σ_rows dy·x·r
  register(wasmKernels.normGrad, (sh) => [sh[0]!, [sh[0]![1]!]], ([x, g, dy], [dx, dg], [shape], a) => {
    const d = shape![1]!
    if (simd !== undefined && d % 4 === 0) return simd.normGrad(x as Float32Array, g as Float32Array, dy as Float32Array, dx!, dg!, d, a["eps"]!)
    normGradRows(x!, g!, dy!, dx!, dg!, d, a["eps"]!)
  })
  // per row dy·x·r (the caller sums the rows)
  register(kernels.normDg, (sh) => [sh[0]!], ([x, dy], [out], [shape], a) => {
    const d = shape![1]!
    if (simd !== undefined && d % 4 === 0) return simd.normDg(x as Float32Array, dy as Float32Array, out!, d, a["eps"]!)
    for (let base = 0; base < x!.length; base += d) {
      const r = rmsScale(x!, base, d, a["eps"]!)
      for (let c = 0; c < d; c++) out![base + c] = dy![base + c]! * x![base + c]! * r
    }
  })
}

/** The rotary embedding and its inverse (the gradient). */
const registerRotary = (register: Register, simd: Simd | undefined): void => {
  // rotate-half of x [n, heads, hd] with tables [n, 1, dim/2]; back: the inverse rotation (in SIMD
  // where dim/2 and hd are multiples of 4)
  const rotation = (back: boolean) => (xs: Array<Float32Array | Int32Array>, outs: Array<Float32Array>, shapes: Array<Array<number>>, a: Record<string, number>) => {
    const [x, c, sn] = xs as [Float32Array, Float32Array, Float32Array]
    const y = outs[0]!
    const [n, heads, hd] = shapes[0] as [number, number, number]
    const dim = a["dim"]!
    const half = dim / 2
    const sign = back ? -1 : 1
    if (simd !== undefined && half % 4 === 0 && hd % 4 === 0) return simd.rotate(x, c, sn, y, heads, hd, half, sign)
    y.set(x)
    for (let t = 0; t < n; t++) {
      for (let h = 0; h < heads; h++) {
        const base = (t * heads + h) * hd
        for (let f = 0; f < half; f++) {
          const cs = c[t * half + f]!
          const sg = sign * sn[t * half + f]!
          const x1 = x[base + f]!
          const x2 = x[base + f + half]!
          y[base + f] = x1 * cs - x2 * sg
          y[base + f + half] = x2 * cs + x1 * sg
        }
      }
    }
  }
  register(kernels.rotate, (sh) => [sh[0]!], rotation(false))
  register(kernels.unrotate, (sh) => [sh[0]!], rotation(true))
}

/**
 * AdamW of one parameter (the three outputs w', m', v', see `Fused.adamw`; h = [lr, c1, c2], s = the
 * clipping factor), in SIMD over the heap (AdamW.ts) where the engine has it; and the clipping's Σx².
 */
const registerOptimizer = (register: Register, simdAdamW: AdamW | undefined, simd: Simd | undefined): void => {
  register(wasmKernels.adamw, (sh) => [sh[0]!, sh[0]!, sh[0]!], ([w, g, m, v, s, h], [w2, m2, v2], _, a) => {
    const [lr, c1, c2] = [h![0]!, h![1]!, h![2]!]
    const scalars = { scale: s![0]!, beta1: a["beta1"]!, beta2: a["beta2"]!, eps: a["eps"]!, decay: a["decay"]!, rate: lr * a["lrScale"]!, c1, c2 }
    if (simdAdamW !== undefined) return simdAdamW(w as Float32Array, g as Float32Array, m as Float32Array, v as Float32Array, [w2!, m2!, v2!], scalars)
    const { beta1: b1, beta2: b2, eps, decay, rate, scale } = scalars
    for (let i = 0; i < w!.length; i++) {
      const gs = g![i]! * scale
      const mi = b1 * m![i]! + (1 - b1) * gs
      const vi = b2 * v![i]! + (1 - b2) * gs * gs
      m2![i] = mi
      v2![i] = vi
      const wi = w![i]!
      w2![i] = wi - rate * (mi / c1 / (Math.sqrt(vi / c2) + eps) + decay * wi)
    }
  })
  // Σ x² over all the inputs, one scalar (summed in double precision; in SIMD where the engine has it)
  register(wasmKernels.sumSquares, () => [[]], (xs, [out]) => {
    let total = 0
    for (const x of xs) {
      if (simd !== undefined) total += simd.sumSquares(x as Float32Array)
      else for (let i = 0; i < x.length; i++) total += x[i]! * x[i]!
    }
    out![0] = total
  })
}

/** The masked cross-entropy and its gradient: in SIMD for rows of a multiple of 4 (Simd.ts), else loops. */
const registerLoss = (register: Register, simd: Simd | undefined): void => {
  // the loss per row (makeMaskedNll): mask·(log Σ exp − the label's logit); a label outside [0, V)
  // contributes nothing, as with the one-hot of the op-by-op path. The labels are int32.
  register(kernels.nll, (sh) => [[sh[0]![0]!, 1]], ([l, y, m], [out], [shape]) => {
    const V = shape![1]!
    if (simd !== undefined && V % 4 === 0) return simd.nll(l as Float32Array, y as Int32Array, m as Float32Array, out!, V)
    for (let row = 0, base = 0; base < l!.length; row++, base += V) {
      const label = y![row]!
      out![row] = label >= 0 && label < V ? m![row]! * (logSumExp(l!, base, V) - l![base + label]!) : 0
    }
  })
  // its gradient: (softmax − one-hot)·mask·dy per row
  register(kernels.nllGrad, (sh) => [sh[0]!], ([l, y, m, dy], [g], [shape]) => {
    const V = shape![1]!
    if (simd !== undefined && V % 4 === 0) return simd.nllGrad(l as Float32Array, y as Int32Array, m as Float32Array, dy as Float32Array, g!, V)
    for (let row = 0, base = 0; base < l!.length; row++, base += V) {
      const label = y![row]!
      const valid = label >= 0 && label < V
      const scale = valid ? m![row]! * dy![0]! : 0
      // e^(l − max) into the gradient first, then scaled by mask·dy / Σ (one exp per element)
      let top = -Infinity
      for (let c = 0; c < V; c++) top = Math.max(top, l![base + c]!)
      let total = 0
      for (let c = 0; c < V; c++) total += g![base + c] = expNonPositive(l![base + c]! - top)
      const k = scale / total
      for (let c = 0; c < V; c++) g![base + c] = g![base + c]! * k
      if (valid) g![base + label] = (expNonPositive(l![base + label]! - top) / total - 1) * scale
    }
  })
}

/** Exact GELU and its gradient; SiLU's and the attention softmax's gradients (SIMD only). */
const registerActivations = (register: Register, simd: Simd | undefined): void => {
  const each = (f: (v: number) => number) => ([x]: Array<Float32Array | Int32Array>, [y]: Array<Float32Array>) => {
    for (let i = 0; i < x!.length; i++) y![i] = f(x![i]!)
  }
  const each2 = (f: (v: number, d: number) => number) => ([x, dy]: Array<Float32Array | Int32Array>, [y]: Array<Float32Array>) => {
    for (let i = 0; i < x!.length; i++) y![i] = f(x![i]!, dy![i]!)
  }
  register(kernels.gelu, (sh) => [sh[0]!], simd === undefined ? each(gelu) : ([x], [y]) => simd.gelu(x as Float32Array, y!))
  register(kernels.geluGrad, (sh) => [sh[0]!], simd === undefined ? each2(geluGrad) : ([x, dy], [y]) => simd.geluGrad(x as Float32Array, dy as Float32Array, y!))
  if (simd !== undefined) {
    // only in SIMD: in JavaScript (Math.exp) slower than tfjs's ops; their forward passes stay op by op
    register(kernels.siluGrad, (sh) => [sh[0]!], ([x, dy], [y]) => simd.siluGrad(x as Float32Array, dy as Float32Array, y!))
    // attention's masked softmax softmax(s·scale + m[row mod m's rows]) (rows narrower than 4 in
    // JavaScript)
    register(kernels.softmax, (sh) => [sh[0]!], ([sv, m], [out], shapes, a) => {
      const width = shapes[0]![shapes[0]!.length - 1]!
      const scale = a["scale"]!
      if (width >= 4) return simd.softmax(sv as Float32Array, m as Float32Array, out!, width, scale, a["mapRows"] ?? 0)
      const mRows = m!.length / width
      for (let row = 0, base = 0; base < sv!.length; row++, base += width) {
        const mb = (row % mRows) * width
        let top = -Infinity
        for (let c = 0; c < width; c++) top = Math.max(top, out![base + c] = sv![base + c]! * scale + m![mb + c]!)
        let total = 0
        for (let c = 0; c < width; c++) total += out![base + c] = Math.exp(out![base + c]! - top)
        for (let c = 0; c < width; c++) out![base + c] = out![base + c]! / total
      }
    })
    // attention's softmax gradient scale·p·(dp − Σ p·dp) per row (rows of a width off multiples of 4 in JavaScript)
    register(kernels.softmaxGrad, (sh) => [sh[0]!], ([p, dp], [out], [shape], a) => {
      const width = shape![shape!.length - 1]!
      if (width % 4 === 0) return simd.softmaxGrad(p as Float32Array, dp as Float32Array, out!, width, a["scale"]!, a["mapRows"] ?? 0)
      for (let base = 0; base < p!.length; base += width) {
        let dot = 0
        for (let c = 0; c < width; c++) dot += p![base + c]! * dp![base + c]!
        for (let c = 0; c < width; c++) out![base + c] = a["scale"]! * p![base + c]! * (dp![base + c]! - dot)
      }
    })
  }
}

const expTable = Float64Array.from({ length: 10200 }, (_, k) => 2 ** (-k / 64))

/**
 * e^x for x ≤ 0 (all our wasm kernels need; x > 0.005 is out of its table), for the wasm kernels
 * and bench/wasm-elementwise.ts: V8's `Math.exp` costs about twice tfjs's wasm Exp per element, this
 * about as much. x = −k·ln2/64 + r with |r| ≤ ln2/128: e^x = 2^(−k/64)·e^r, the first from a table,
 * the second by its Taylor series to r⁴ (relative error about 5e-14). Arguments below −110 count as
 * −110, whose float32 value is 0 (the kernels' sums are in double precision). NaN stays NaN.
 *
 * @internal
 */
export const expNonPositive = (x: number): number => {
  const c = x < -110 ? -110 : x
  // round to nearest by truncating a non-negative number (Math.round costs as much as Math.exp)
  const k = (c * -92.33248261689366 + 0.5) | 0
  const r = c + k * 0.010830424696249145
  return (1 + r * (1 + r * (0.5 + r * (0.16666666666666666 + r * 0.041666666666666664)))) * expTable[k]!
}

/**
 * 1 − erf(z/√2) for z ≥ 0 given e = e^(−z²/2), by Abramowitz & Stegun 7.1.26 (|error| < 1.5e-7),
 * as tfjs's cpu Erf and our WGSL (0.3275911/√2 = 0.23164188826636045).
 */
const erfTail = (z: number, e: number): number => {
  const q = 1 / (1 + 0.23164188826636045 * z)
  return q * (0.254829592 + q * (-0.284496736 + q * (1.421413741 + q * (-1.453152027 + q * 1.061405429)))) * e
}

/** log Σ exp of `x[base … base+n)` (max first, the sum in double precision). */
const logSumExp = (x: ArrayLike<number>, base: number, n: number): number => {
  let top = -Infinity
  for (let c = 0; c < n; c++) top = Math.max(top, x[base + c]!)
  let total = 0
  for (let c = 0; c < n; c++) total += expNonPositive(x[base + c]! - top)
  return top + Math.log(total)
}

