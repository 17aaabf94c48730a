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
 * Subnormal floats (below 2⁻¹²⁶ ≈ 1.2e-38) cost x86 about a hundred cycles per operation, and
 * training makes them: a row of the embedding whose byte never occurs gets a zero gradient, and its
 * moments decay by β each step (m below 1e-38 after about 800 steps at β₁ = 0.9); a tiny gradient's
 * square underflows. A [128, 256] parameter took 1.9 ms with subnormal g, m and v against 0.15 ms
 * with normal ones (timed in one process; 0.47 ms where only g'² underflows, g' = 1e-21).
 * So, with θ = 1e-9 (see {@link flushFactor}), the kernel reads as 0: a scaled gradient with
 * |g'| < θε, a first moment with |m| < θεc₁, a second with v < (θε)²c₂. Each changes the update
 * u = (m'/c₁)/(√(v'/c₂) + ε) by less than θ (in u's units, where a typical element's |u| is about
 * 1): |g'| < θε adds at most (1 − β₁)|g'|/c₁/ε ≤ θ to u (c₁ ≥ 1 − β₁) and at most |g'| < θε to
 * √(v'/c₂); |m| < θεc₁ is less than θ of u; v < (θε)²c₂ moves √(v/c₂) + ε by less than θ of ε, below
 * float32's resolution. With ε = 1e-8 the thresholds are 1e-17, ≥ 1e-18 and ≥ 5e-36 (β₂ = 0.95), all
 * normal, so the products β·m, β·v and (1 − β₂)g'² of what remains are normal too. NaN passes (it
 * compares false).
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
  f32x4Abs,
  f32x4Add,
  f32x4Div,
  f32x4Lt,
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
  v128AndNot,
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

// adamw(w, g, m, v, w2, m2, v2, n4, scale, b1, b1c, b2, b2c, eps, decay, rate, c1, c2, tg, tm, tv): n4 elements (a
// multiple of 4); tg, tm, tv: the thresholds below which g', m and v count as 0
const adamwFunc: Func = (() => {
  const [w, g, m, v, w2, m2, v2, n4] = [0, 1, 2, 3, 4, 5, 6, 7]
  const scalars = [8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20] // scale, b1, b1c, b2, b2c, eps, decay, rate, c1, c2, tg, tm, tv
  const at = 21 // byte offset into every array
  const [S, B1, B1C, B2, B2C, EPS, DECAY, RATE, C1, C2, TG, TM, TV] = [22, 23, 24, 25, 26, 27, 28, 29, 30, 31, 32, 33, 34]
  const [gs, mi, vi, wi] = [35, 36, 37, 38]
  const load = (base: number): Code => [...get(base), ...get(at), ...add, ...v128Load(0)]
  const store = (base: number, value: number): Code => [...get(base), ...get(at), ...add, ...get(value), ...v128Store(0)]
  // the vector in local x, its lanes with |x| < the threshold made 0 (x & ~(|x| < t))
  const flush = (x: number, threshold: number): Code => [...get(x), ...get(x), ...f32x4Abs, ...get(threshold), ...f32x4Lt, ...v128AndNot]
  const step: Array<Code> = [
    get(at), get(n4), const32(2), shl, geS, brIf(1),
    load(g), get(S), f32x4Mul, set(gs), flush(gs, TG), set(gs),
    load(m), set(mi), get(B1), flush(mi, TM), f32x4Mul, get(B1C), get(gs), f32x4Mul, f32x4Add, set(mi),
    load(v), set(vi), get(B2), flush(vi, TV), f32x4Mul, get(B2C), get(gs), f32x4Mul, get(gs), f32x4Mul, f32x4Add, set(vi),
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
    locals: [[1, i32], [17, v128]],
    body: [
      ...scalars.map((x, j) => [...get(x), ...f32x4Splat, ...set(S + j)]),
      const32(0), set(at),
      block(loop(...step))
    ]
  }
})()

/**
 * θ of the flush to zero (see the module doc): g' below θε, m below θεc₁ and v below (θε)²c₂ count
 * as 0, each moving the update by less than θ.
 *
 * @internal
 */
export const flushFactor = 1e-9

/** The thresholds [g', m, v] below which the kernel reads 0 (float32 may round (θε)²c₂ to 0: then v is never flushed). */
export const flushThresholds = (s: AdamScalars): readonly [number, number, number] => {
  const t = flushFactor * s.eps
  return [t, t * s.c1, t * t * s.c2]
}

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
    const [tg, tm, tv] = flushThresholds(s)
    if (n4 > 0) {
      run(w.byteOffset, g.byteOffset, m.byteOffset, v.byteOffset, w2.byteOffset, m2.byteOffset, v2.byteOffset, n4,
        s.scale, s.beta1, 1 - s.beta1, s.beta2, 1 - s.beta2, s.eps, s.decay, s.rate, s.c1, s.c2, tg, tm, tv)
    }
    // the same flushes as the kernel's (in double precision; float32's thresholds)
    const [fg, fm, fv] = Float32Array.from([tg, tm, tv])
    for (let i = n4; i < n; i++) {
      const g0 = Math.fround(g[i]! * s.scale)
      const gs = Math.abs(g0) < fg! ? 0 : g0
      const mi = s.beta1 * (Math.abs(m[i]!) < fm! ? 0 : m[i]!) + (1 - s.beta1) * gs
      const vi = s.beta2 * (Math.abs(v[i]!) < fv! ? 0 : v[i]!) + (1 - s.beta2) * gs * gs
      m2[i] = mi
      v2[i] = vi
      w2[i] = w[i]! - s.rate * (mi / s.c1 / (Math.sqrt(vi / s.c2) + s.eps) + s.decay * w[i]!)
    }
  }
}
