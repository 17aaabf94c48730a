/**
 * Gradients summed over training threads (`train/Parallel.ts`) on tfjs-backend-wasm's heap, in
 * 128-bit SIMD: `Σ_s w_s·g_s` for this thread's gradient (a tensor) and the workers' (arrays),
 * with the arithmetic of the JavaScript loop it replaces (`Parallel.weightedSum`), bit for bit:
 * each product w·g in double precision, each partial sum rounded to float32, shard by shard in
 * order from +0. Four floats a step: their two halves promoted to f64x2, multiplied and added,
 * demoted. About a fifth of the loop's time (`tests/wasm-weighted-sum.test.ts` checks the bits).
 *
 * @since 0.4.0
 */
import type * as TF from "@tensorflow/tfjs"
import type { Tensor, Tf } from "../../graph/Apply.ts"
import {
  add,
  block,
  br,
  brIf,
  type Code,
  const32,
  f32x4DemoteF64x2Zero,
  f64,
  f64x2Add,
  f64x2Mul,
  f64x2PromoteLowF32x4,
  f64x2Splat,
  type Func,
  geS,
  get,
  highHalf,
  i32,
  joinLowHalves,
  loop,
  moduleBytes,
  set,
  v128,
  v128Load,
  v128Store,
  v128Zero
} from "./Assemble.ts"
import { hasHeap, heapStorage } from "./Heap.ts"


/**
 * `first(a, b, out, bytes, w0, w1)`: out = f32(f32(+0 + w0·a) + w1·b) over `bytes` (a multiple of 16;
 * b may be out); `more(out, b, bytes, w)`: out = f32(out + w·b).
 */
const funcs = (): Array<Func> => {
  // one step of four floats: `terms` leaves the f64 sums of both halves in lo, hi; out gets them in f32
  const step = (at: number, bytes: number, out: number, lo: number, hi: number, terms: Array<Code>): Array<Code> => [
    get(at), get(bytes), geS, brIf(1),
    ...terms,
    get(out), get(at), add, get(lo), f32x4DemoteF64x2Zero, get(hi), f32x4DemoteF64x2Zero, joinLowHalves, v128Store(0),
    get(at), const32(16), add, set(at), br(0)
  ]
  // lo += w·b's low half, hi += w·b's high half
  const addTerm = (b: number, at: number, w: number, lo: number, hi: number, v: number): Array<Code> => [
    get(b), get(at), add, v128Load(0), set(v),
    get(lo), get(w), get(v), f64x2PromoteLowF32x4, f64x2Mul, f64x2Add, set(lo),
    get(hi), get(w), get(v), get(v), highHalf, f64x2PromoteLowF32x4, f64x2Mul, f64x2Add, set(hi)
  ]
  // f32(x) back in f64 lanes
  const round = (x: number): Array<Code> => [get(x), f32x4DemoteF64x2Zero, f64x2PromoteLowF32x4, set(x)]
  const first: Func = (() => {
    const [a, b, out, bytes, w0, w1] = [0, 1, 2, 3, 4, 5]
    const [at, W0, W1, lo, hi, v] = [6, 7, 8, 9, 10, 11]
    const terms: Array<Code> = [
      v128Zero, set(lo), v128Zero, set(hi),
      ...addTerm(a, at, W0, lo, hi, v),
      ...round(lo), ...round(hi),
      ...addTerm(b, at, W1, lo, hi, v)
    ]
    return {
      name: "first",
      params: [i32, i32, i32, i32, f64, f64],
      locals: [[1, i32], [5, v128]],
      body: [get(w0), f64x2Splat, set(W0), get(w1), f64x2Splat, set(W1), const32(0), set(at), block(loop(...step(at, bytes, out, lo, hi, terms)))]
    }
  })()
  const more: Func = (() => {
    const [out, b, bytes, w] = [0, 1, 2, 3]
    const [at, W, lo, hi, v] = [4, 5, 6, 7, 8]
    const terms: Array<Code> = [
      get(out), get(at), add, v128Load(0), set(v),
      get(v), f64x2PromoteLowF32x4, set(lo), get(v), get(v), highHalf, f64x2PromoteLowF32x4, set(hi),
      ...addTerm(b, at, W, lo, hi, v)
    ]
    return {
      name: "more",
      params: [i32, i32, i32, f64],
      locals: [[1, i32], [4, v128]],
      body: [get(w), f64x2Splat, set(W), const32(0), set(at), block(loop(...step(at, bytes, out, lo, hi, terms)))]
    }
  })()
  return [first, more]
}

/** `Σ_s weights[s]·g_s` of `first` and `rest` (one array per further shard, `first`'s size), as a new tensor. */
export type WeightedSum = (first: Tensor, rest: ReadonlyArray<Float32Array>, weights: ReadonlyArray<number>) => Tensor

/** The SIMD sum for the wasm backend of `tf`, or undefined where the engine has no SIMD or the backend no heap. */
export const wasmWeightedSum = (tf: Tf): WeightedSum | undefined => {
  if (!hasHeap(tf)) return undefined
  const memory = (tf.backend() as unknown as { wasm?: { asm?: { memory?: WebAssembly.Memory } } }).wasm?.asm?.memory
  if (memory === undefined) return undefined
  const bytes = moduleBytes(funcs())
  if (!WebAssembly.validate(bytes)) return undefined
  const exports = new WebAssembly.Instance(new WebAssembly.Module(bytes), { env: { memory } }).exports
  const first = exports["first"] as (a: number, b: number, out: number, bytes: number, w0: number, w1: number) => void
  const more = exports["more"] as (out: number, b: number, bytes: number, w: number) => void
  const view = heapStorage(tf)
  return (g, rest, weights) => {
    const shape = g.shape as Array<number>
    if (rest.length === 0) {
      const a = view(g as TF.Tensor)!
      return tf.tensor(Float32Array.from(a, (x) => 0 + weights[0]! * x), shape)
    }
    // the shards after the second copied onto the heap, the second into the output (added in place)
    const others = rest.slice(1).map((r) => tf.tensor(r, shape))
    const out = tf.tensor(rest[0]!, shape)
    // views after every allocation (one may grow the heap)
    const a = view(g as TF.Tensor)!
    const o = view(out)!
    const n = o.length
    const n4 = n - (n % 4)
    if (n4 > 0) {
      first(a.byteOffset, o.byteOffset, o.byteOffset, 4 * n4, weights[0]!, weights[1]!)
      others.forEach((t, s) => more(o.byteOffset, view(t)!.byteOffset, 4 * n4, weights[s + 2]!))
    }
    for (let j = n4; j < n; j++) {
      const b = o[j]!
      o[j] = 0 + weights[0]! * a[j]!
      o[j] = o[j]! + weights[1]! * b
      for (let s = 2; s < weights.length; s++) o[j] = o[j]! + weights[s]! * rest[s - 1]![j]!
    }
    tf.dispose(others)
    return out
  }
}
