/**
 * AdamW over tfjs-backend-wasm's heap in 128-bit SIMD, four parameters per step of the loop, for
 * the wasm AdamW kernel (`Fused.ts`): the JavaScript loop it replaces took about 14 ms of a dense
 * 2-layer d128 training step (0.5 M parameters) in tf.profile, most of it in the per-element
 * square root and divisions.
 *
 * The same arithmetic as the other AdamW paths, in float32 (as the webgpu kernel and the cpu
 * backend's op-by-op step): g' = s·g; m' = β₁m + (1 − β₁)g'; v' = β₂v + (1 − β₂)g'²;
 * w' = w − rate·((m'/c₁) / (√(v'/c₂) + ε) + λw). The last n mod 4 elements run in JavaScript.
 *
 * @since 0.4.0
 */
import {
  add,
  block,
  br,
  brIf,
  type Code,
  const32,
  f32,
  f32x4Add,
  f32x4Div,
  f32x4Mul,
  f32x4Splat,
  f32x4Sqrt,
  f32x4Sub,
  type Func,
  geS,
  get,
  i32,
  loop,
  moduleBytes,
  set,
  shl,
  v128,
  v128Load,
  v128Store
} from "./Assemble.ts"

/** The step's scalars: the clipping factor, β₁, β₂, ε, the decay λ, the rate (lr · scale), c₁, c₂. */
export interface AdamScalars {
  readonly scale: number
  readonly beta1: number
  readonly beta2: number
  readonly eps: number
  readonly decay: number
  readonly rate: number
  readonly c1: number
  readonly c2: number
}

// adamw(w, g, m, v, w2, m2, v2, n4, scale, b1, b1c, b2, b2c, eps, decay, rate, c1, c2): n4 elements (a multiple of 4)
const adamwFunc: Func = (() => {
  const [w, g, m, v, w2, m2, v2, n4] = [0, 1, 2, 3, 4, 5, 6, 7]
  const scalars = [8, 9, 10, 11, 12, 13, 14, 15, 16, 17] // scale, b1, b1c, b2, b2c, eps, decay, rate, c1, c2
  const at = 18 // byte offset into every array
  const [S, B1, B1C, B2, B2C, EPS, DECAY, RATE, C1, C2] = [19, 20, 21, 22, 23, 24, 25, 26, 27, 28]
  const [gs, mi, vi, wi] = [29, 30, 31, 32]
  const load = (base: number): Code => [...get(base), ...get(at), ...add, ...v128Load(0)]
  const store = (base: number, value: number): Code => [...get(base), ...get(at), ...add, ...get(value), ...v128Store(0)]
  const step: Array<Code> = [
    get(at), get(n4), const32(2), shl, geS, brIf(1),
    load(g), get(S), f32x4Mul, set(gs),
    get(B1), load(m), f32x4Mul, get(B1C), get(gs), f32x4Mul, f32x4Add, set(mi),
    get(B2), load(v), f32x4Mul, get(B2C), get(gs), f32x4Mul, get(gs), f32x4Mul, f32x4Add, set(vi),
    store(m2, mi), store(v2, vi),
    load(w), set(wi),
    // w − rate·((m/c₁) / (√(v/c₂) + ε) + λw)
    get(wi),
    get(RATE),
    get(mi), get(C1), f32x4Div,
    get(vi), get(C2), f32x4Div, f32x4Sqrt, get(EPS), f32x4Add,
    f32x4Div,
    get(DECAY), get(wi), f32x4Mul, f32x4Add,
    f32x4Mul, f32x4Sub, set(wi),
    store(w2, wi),
    get(at), const32(16), add, set(at), br(0)
  ]
  return {
    name: "adamw",
    params: [i32, i32, i32, i32, i32, i32, i32, i32, ...scalars.map(() => f32 as typeof f32)],
    locals: [[1, i32], [14, v128]],
    body: [
      ...scalars.map((x, j) => [...get(x), ...f32x4Splat, ...set(S + j)]),
      const32(0), set(at),
      block(loop(...step))
    ]
  }
})()

/** AdamW of one parameter on views of the heap (the outputs may not alias the inputs). */
export type AdamW = (
  w: Float32Array,
  g: Float32Array,
  m: Float32Array,
  v: Float32Array,
  outs: readonly [w: Float32Array, m: Float32Array, v: Float32Array],
  s: AdamScalars
) => void

/** The SIMD AdamW over `memory` (tfjs-backend-wasm's), or undefined where the engine has no SIMD. */
export const makeAdamW = (memory: WebAssembly.Memory): AdamW | undefined => {
  const bytes = moduleBytes([adamwFunc])
  if (!WebAssembly.validate(bytes)) return undefined
  const run = new WebAssembly.Instance(new WebAssembly.Module(bytes), { env: { memory } }).exports["adamw"] as (...xs: Array<number>) => void
  return (w, g, m, v, [w2, m2, v2], s) => {
    const n = w.length
    const n4 = n - (n % 4)
    if (n4 > 0) {
      run(w.byteOffset, g.byteOffset, m.byteOffset, v.byteOffset, w2.byteOffset, m2.byteOffset, v2.byteOffset, n4,
        s.scale, s.beta1, 1 - s.beta1, s.beta2, 1 - s.beta2, s.eps, s.decay, s.rate, s.c1, s.c2)
    }
    for (let i = n4; i < n; i++) {
      const gs = g[i]! * s.scale
      const mi = s.beta1 * m[i]! + (1 - s.beta1) * gs
      const vi = s.beta2 * v[i]! + (1 - s.beta2) * gs * gs
      m2[i] = mi
      v2[i] = vi
      w2[i] = w[i]! - s.rate * (mi / s.c1 / (Math.sqrt(vi / s.c2) + s.eps) + s.decay * w[i]!)
    }
  }
}
