/**
 * Elementwise and row kernels in 128-bit SIMD over tfjs-backend-wasm's heap, four floats per step:
 * attention's masked softmax and its gradient, exact GELU and its gradient, SiLU's gradient, RMSNorm,
 * the rotary embedding, the masked cross-entropy, Σx². tfjs's own wasm ops are SIMD too, but one op
 * per pass over memory (the softmax's gradient was five ops); JavaScript loops are one pass but
 * scalar, and `Math.exp` costs about 2.4× tfjs's Exp. Here each is one pass with an exp in SIMD.
 * SiLU's forward pass stays tfjs's (its Sigmoid and Mul were faster than ours). The masked
 * softmax's forward pass, scale·s + mask then XNNPACK's softmax op by op, took 1.11–1.15 ms on
 * [32, 128, 128]; ours 0.99–1.01 ms (alternating in one process).
 *
 * exp(x): Cephes' single-precision method (x = k·ln 2 + r, |r| ≤ ln 2 / 2, e^r by a degree-7
 * polynomial, 2^k put into the exponent bits), relative error about 2e-7; arguments are clamped to
 * [−87, 88] and e^x is 0 below −87 (so that no result is subnormal, which x86 computes about a
 * hundred times slower; a masked attention score, −1e9, gives exactly 0).
 *
 * Exact GELU x·Φ(x), Φ(x) = (1 + erf(x/√2))/2: the value with erf as a rational function we fitted
 * ({@link erfP}: no exp, 18 vector operations), |error| of Φ below 2e-7 (the former exp-based form:
 * 2.0e-7); since 1 + erf cancels for x < 0, the value's error is up to 7e-7 of max(1, |value|), at
 * x ≈ −5 where the value is about −1.4e-6 (that form: 2.1e-7). The gradient Φ(x) + x·φ(x) needs
 * e^(−x²/2) for φ anyway, so its Φ is 1 − erfc/2 with erfc by Abramowitz & Stegun 7.1.26 (|error| <
 * 1.5e-7, as tfjs's cpu Erf and our WGSL) from that same exp. Each kernel takes whole groups of 4
 * (the caller finishes a tail in JavaScript: there GELU's value is the exp-based form).
 *
 * What V8 makes of an instruction matters as much as how many there are: `f32x4.min`/`max` (NaN and
 * ±0 rules) become about seven x86 instructions each and `i32x4.trunc_sat_f32x4_s` about eight, so
 * the clamps use `pmin`/`pmax` (one each; NaN still passes) and, where the engine has relaxed SIMD,
 * the truncation of the already clamped exponent is the relaxed one and polynomials use fused
 * multiply-adds. Timed alternately in one process over the same heap against the kernels before
 * these changes, on [1024, 512]: GELU 1.83 → 0.81 ms, its gradient (one exp where it took two)
 * 1.99 → 1.36 ms (`tests/wasm-simd.test.ts` checks both builds, relaxed and not, in double
 * precision's terms).
 *
 * @since 0.4.0
 */
import {
  add,
  and,
  block,
  br,
  brIf,
  type Code,
  const32,
  eqz,
  f32,
  f32Add,
  f32Div,
  f32Load,
  f32Max,
  f32Mul,
  f32Store,
  f32Sub,
  f32x4Abs,
  f32x4Add,
  f32x4Const,
  f32x4ConvertI32x4S,
  f32x4Div,
  f32x4ExtractLane,
  f32x4Ge,
  f32x4Gt,
  f32x4Lanes,
  f32x4Lt,
  f32x4Max,
  f32x4Mul,
  f32x4Nearest,
  f32x4Neg,
  f32x4Pmax,
  f32x4Pmin,
  f32x4RelaxedMadd,
  f32x4Splat,
  f32x4Sqrt,
  f32x4Sub,
  f32Zero,
  f64,
  f64Add,
  f64x2Add,
  f64x2ExtractLane,
  f64x2Mul,
  f64x2PromoteLowF32x4,
  forUp,
  type Func,
  geS,
  get,
  highHalf,
  i32,
  i32Load,
  i32x4Add,
  i32x4Const,
  i32x4RelaxedTruncF32x4S,
  i32x4Shl,
  i32x4ShrU,
  i32x4Sub,
  i32x4TruncSatF32x4S,
  if_,
  loop,
  ltU,
  moduleBytes,
  mul,
  remU,
  select,
  set,
  sub,
  v128,
  v128And,
  v128AndNot,
  v128Bitselect,
  v128Load,
  v128Or,
  v128Store,
  v128Zero,
  vectorConstants,
  type VectorConstants
} from "./Assemble.ts"

const vmul = (a: Code, b: Code): Code => [...a, ...b, ...f32x4Mul]
const vadd = (a: Code, b: Code): Code => [...a, ...b, ...f32x4Add]
const vsub = (a: Code, b: Code): Code => [...a, ...b, ...f32x4Sub]
const vdiv = (a: Code, b: Code): Code => [...a, ...b, ...f32x4Div]
const k = f32x4Const

/** Locals of a function: parameters first, then i32, f32 and v128 locals in that order. */
const frame = (params: ReadonlyArray<typeof i32 | typeof f32>, i32s: number, f32s: number, v128s: number) => {
  const p = params.length
  return {
    param: (j: number) => j,
    int: (j: number) => p + j,
    float: (j: number) => p + i32s + j,
    vec: (j: number) => p + i32s + f32s + j,
    locals: [[i32s, i32], [f32s, f32], [v128s, v128]] as ReadonlyArray<readonly [number, typeof i32 | typeof f32 | typeof v128]>
  }
}

const low = -87
const high = 88

/**
 * How an elementwise function computes: `k(c)` pushes four copies of a float constant and `ki(c)`
 * of an int32 one (from a local set once before the loop from a module global, Assemble's
 * `vectorConstants`: V8 rebuilds a known v128 constant at every use); where the engine has
 * relaxed SIMD, `madd(a, b, c)` = a·b + c with one rounding (an FMA), and `trunc` the truncation to
 * int32 of lanes known to be in range (V8 emits cvttps2dq for it, and about eight instructions for
 * the saturating one).
 */
interface Ctx {
  readonly k: (c: number) => Code
  readonly ki: (c: number) => Code
  readonly madd: (a: Code, b: Code, c: Code) => Code
  readonly trunc: Code
}

/**
 * The constants of a function, held in v128 locals from `first` on (float `k`, int32 `ki`), set
 * by the prologue from the module's globals (see {@link Ctx}).
 */
const constantPool = (first: number, globals: VectorConstants) => {
  const index = new Map<string, { readonly code: Code; readonly local: number }>()
  const local = (key: string, code: Code): Code => {
    const known = index.get(key)
    if (known !== undefined) return get(known.local)
    index.set(key, { code, local: first + index.size })
    return get(first + index.size - 1)
  }
  return {
    k: (c: number): Code => local(`f${Object.is(c, -0) ? "-0" : c}`, f32x4Const(c)),
    ki: (c: number): Code => local(`i${c | 0}`, i32x4Const(c)),
    count: () => index.size,
    /** Sets the locals (before the loop). */
    prologue: (): Code => [...index.values()].flatMap(({ code, local }) => [...globals.get(code), ...set(local)])
  }
}

const context = (relaxed: boolean, pool: { readonly k: (c: number) => Code; readonly ki: (c: number) => Code }): Ctx =>
  relaxed
    ? { k: pool.k, ki: pool.ki, madd: (a, b, c) => [...a, ...b, ...c, ...f32x4RelaxedMadd], trunc: i32x4RelaxedTruncF32x4S }
    : { k: pool.k, ki: pool.ki, madd: (a, b, c) => vadd(vmul(a, b), c), trunc: i32x4TruncSatF32x4S }

/** c₀·xⁿ + … + cₙ by Horner's rule, x a local. */
const horner = (cx: Ctx, x: number, [c0, ...cs]: ReadonlyArray<number>): Code =>
  cs.reduce<Code>((acc, c) => cx.madd(acc, get(x), cx.k(c)), cx.k(c0!))

/**
 * e^x of the vector `x` (Code that pushes it; evaluated twice), with three scratch v128 locals; leaves
 * the result on the stack.
 */
const exp = (cx: Ctx, x: Code, [xl, fx, p]: readonly [number, number, number]): Code => [
  ...x, ...cx.k(high), ...f32x4Pmin, ...cx.k(low), ...f32x4Pmax, ...set(xl),
  ...vmul(get(xl), cx.k(Math.LOG2E)), ...f32x4Nearest, ...set(fx),
  // r = x − k·ln 2, ln 2 in two parts
  ...cx.madd(get(fx), cx.k(2.12194440e-4), cx.madd(get(fx), cx.k(-0.693359375), get(xl))), ...set(xl),
  ...horner(cx, xl, [1.9875691500e-4, 1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2, 1.6666665459e-1, 5.0000001201e-1]),
  ...set(p),
  // e^r = p·r² + r + 1, times 2^k from the exponent bits
  ...cx.madd(vmul(get(p), get(xl)), get(xl), vadd(get(xl), cx.k(1))),
  ...get(fx), ...cx.trunc, ...cx.ki(127), ...i32x4Add, ...const32(23), ...i32x4Shl,
  ...f32x4Mul,
  // 0 below the clamp (NaN stays NaN)
  ...x, ...cx.k(low), ...f32x4Lt, ...v128AndNot
]

/** The sum of a vector's four lanes (op: f32.add) as an f32, from a v128 local. */
const lanes = (v: number, op: Code): Code => [
  ...get(v), ...f32x4ExtractLane(0), ...get(v), ...f32x4ExtractLane(1), ...op, ...get(v), ...f32x4ExtractLane(2), ...op, ...get(v), ...f32x4ExtractLane(3), ...op
]

/** A loop over byte offsets `c` = 0, 16, … < `bytes` (locals), running `body`. */
const each = (c: number, bytes: number, body: ReadonlyArray<Code>): Code => forUp(c, bytes, 16, body)

const at = (base: number, c: number): Code => [...get(base), ...get(c), ...add]

/**
 * A causal map's row: `live` = the row's bytes up to its diagonal, in whole vectors (row `row` of
 * maps of `mapRows` rows: query i = row mod mapRows sees keys 0…i), or all `bytes` where mapRows is 0
 * (no causal promise) or the map is wider than tall. `t` a scratch local.
 */
const liveBytes = (row: number, mapRows: number, bytes: number, live: number, t: number): Code => [
  ...get(bytes), ...set(live),
  ...block(
    get(mapRows), eqz, brIf(0),
    get(row), get(mapRows), remU, const32(4), add, const32(-4), and, const32(4), mul, set(t),
    block(get(t), get(bytes), geS, brIf(0), get(t), set(live))
  )
]

/** Zeros from byte `c` = from to `bytes` of a row at `base` of `out` (the masked part of a causal row). */
const zeroRest = (out: number, base: number, c: number, from: number, bytes: number): Code => [
  ...get(from), ...set(c),
  ...block(loop(get(c), get(bytes), geS, brIf(1), get(out), get(base), add, get(c), add, v128Zero, v128Store(0), get(c), const32(16), add, set(c), br(0)))
]

// softmaxGrad(p, dp, out, rows, width, scale, mapRows): out = scale·p·(dp − Σ p·dp) per row; with
// mapRows > 0 (causal square maps, p 0 above the diagonal) up to the diagonal's vector, zeros after
const softmaxGradFunc: Func = (() => {
  const f = frame([i32, i32, i32, i32, i32, f32, i32], 6, 0, 3)
  const [p, dp, out, rows, width, scale, mapRows] = [0, 1, 2, 3, 4, 5, 6].map(f.param) as [number, number, number, number, number, number, number]
  const [row, c, base, bytes, live, t] = [0, 1, 2, 3, 4, 5].map(f.int) as [number, number, number, number, number, number]
  const [sc, acc, dot] = [0, 1, 2].map(f.vec) as [number, number, number]
  const ld = (ptr: number): Code => [...get(ptr), ...get(base), ...add, ...get(c), ...add, ...v128Load(0)]
  const perRow: Array<Code> = [
    get(row), get(rows), geS, brIf(1),
    get(row), get(bytes), mul, set(base),
    liveBytes(row, mapRows, bytes, live, t),
    k(0), set(acc),
    each(c, live, [vadd(get(acc), vmul(ld(p), ld(dp))), set(acc)]),
    lanes(acc, f32Add), f32x4Splat, set(dot),
    each(c, live, [get(out), get(base), add, get(c), add, vmul(vmul(get(sc), ld(p)), vsub(ld(dp), get(dot))), v128Store(0)]),
    zeroRest(out, base, c, live, bytes),
    get(row), const32(1), add, set(row), br(0)
  ]
  return {
    name: "softmaxGrad",
    params: [i32, i32, i32, i32, i32, f32, i32],
    locals: f.locals,
    body: [get(scale), f32x4Splat, set(sc), get(width), const32(4), mul, set(bytes), const32(0), set(row), block(loop(...perRow))]
  }
})()

/**
 * An RMSNorm row kernel over rows of `d` floats (a multiple of 4): `name(x, g, dy, out, rows, d, eps,
 * 1/d)` (g or dy unused by some). Per row, `sums` gives the vector partial sums of its loop, and
 * `write` each output vector from the row's r = 1/√(Σx²/d + ε) (a splat local) and those sums.
 */
const normFunc = (
  name: string,
  sums: (x: Code, g: Code, dy: Code) => ReadonlyArray<Code>,
  write: (x: Code, g: Code, dy: Code, r: number, totals: ReadonlyArray<number>) => Code
): Func => {
  const f = frame([i32, i32, i32, i32, i32, i32, f32, f32], 4, 0, 5)
  const [xp, gp, dyp, out, rows, d, eps, dInv] = [0, 1, 2, 3, 4, 5, 6, 7]
  const [row, c, base, bytes] = [0, 1, 2, 3].map(f.int) as [number, number, number, number]
  const [r, acc0, acc1, tot0, tot1] = [0, 1, 2, 3, 4].map(f.vec) as [number, number, number, number, number]
  const ld = (ptr: number, withRow: boolean): Code => [...get(ptr), ...(withRow ? [...get(base), ...add] : []), ...get(c), ...add, ...v128Load(0)]
  const [x, g, dy] = [ld(xp, true), ld(gp, false), ld(dyp, true)]
  const terms = sums(x, g, dy)
  const accs = [acc0, acc1].slice(0, terms.length)
  const perRow: Array<Code> = [
    get(row), get(rows), geS, brIf(1),
    get(row), get(bytes), mul, set(base),
    ...accs.map((a) => [...k(0), ...set(a)]),
    each(c, bytes, accs.map((a, j) => [...vadd(get(a), terms[j]!), ...set(a)])),
    ...accs.map((a, j) => [...lanes(a, f32Add), ...f32x4Splat, ...set([tot0, tot1][j]!)]),
    // r = 1/√(Σx²/d + ε)
    [...vdiv(k(1), [...vadd(vmul(get(tot0), [...get(dInv), ...f32x4Splat]), [...get(eps), ...f32x4Splat]), ...f32x4Sqrt]), ...set(r)],
    each(c, bytes, [get(out), get(base), add, get(c), add, write(x, g, dy, r, [tot0, tot1]), v128Store(0)]),
    get(row), const32(1), add, set(row), br(0)
  ]
  return {
    name,
    params: [i32, i32, i32, i32, i32, i32, f32, f32],
    locals: f.locals,
    body: [get(d), const32(4), mul, set(bytes), const32(0), set(row), block(loop(...perRow))]
  }
}

// y = x·r·g
const normForward = normFunc("norm", (x) => [vmul(x, x)], (x, g, _, r) => vmul(vmul(x, get(r)), g))
// dx = r·g·dy − x·r³·Σ(dy·g·x)/d (1/d: the kernel's last parameter)
const dInvParam = 7
const normGradX = normFunc("normDx", (x, g, dy) => [vmul(x, x), vmul(vmul(dy, g), x)], (x, g, dy, r, [, sb]) =>
  vsub(vmul(vmul(get(r), g), dy), vmul(x, vmul(vmul(vmul(vmul(get(r), get(r)), get(r)), get(sb!)), [...get(dInvParam), ...f32x4Splat]))))
// per row dy·x·r
const normGradRows = normFunc("normDg", (x) => [vmul(x, x)], (x, _, dy, r) => vmul(vmul(dy, x), get(r)))

// normGrad(x, g, dy, dx, dg, rows, d, eps, 1/d): both gradients of RMSNorm in one pass over the rows:
// dx as normDx, and dg += dy·x·r summed over the rows into dg (which the caller zeroes)
const normGradBoth: Func = (() => {
  const f = frame([i32, i32, i32, i32, i32, i32, i32, f32, f32], 4, 0, 7)
  const [xp, gp, dyp, dxp, dgp, rows, d, eps, dInv] = [0, 1, 2, 3, 4, 5, 6, 7, 8]
  const [row, c, base, bytes] = [0, 1, 2, 3].map(f.int) as [number, number, number, number]
  const [r, acc0, acc1, kk, xv, dyv, gv] = [0, 1, 2, 3, 4, 5, 6].map(f.vec) as [number, number, number, number, number, number, number]
  const ld = (ptr: number, withRow: boolean): Code => [...get(ptr), ...(withRow ? [...get(base), ...add] : []), ...get(c), ...add, ...v128Load(0)]
  const perRow: Array<Code> = [
    get(row), get(rows), geS, brIf(1),
    get(row), get(bytes), mul, set(base),
    k(0), set(acc0), k(0), set(acc1),
    each(c, bytes, [
      ld(xp, true), set(xv),
      vadd(get(acc0), vmul(get(xv), get(xv))), set(acc0),
      vadd(get(acc1), vmul(vmul(ld(dyp, true), ld(gp, false)), get(xv))), set(acc1)
    ]),
    // r = 1/√(Σx²/d + ε); kk = r³·Σ(dy·g·x)/d
    vdiv(k(1), [...vadd(vmul([...lanes(acc0, f32Add), ...f32x4Splat], [...get(dInv), ...f32x4Splat]), [...get(eps), ...f32x4Splat]), ...f32x4Sqrt]), set(r),
    vmul(vmul(vmul(vmul(get(r), get(r)), get(r)), [...lanes(acc1, f32Add), ...f32x4Splat]), [...get(dInv), ...f32x4Splat]), set(kk),
    each(c, bytes, [
      ld(xp, true), set(xv), ld(dyp, true), set(dyv), ld(gp, false), set(gv),
      get(dxp), get(base), add, get(c), add,
      vsub(vmul(vmul(get(r), get(gv)), get(dyv)), vmul(get(xv), get(kk))), v128Store(0),
      get(dgp), get(c), add,
      vadd(ld(dgp, false), vmul(vmul(get(dyv), get(xv)), get(r))), v128Store(0)
    ]),
    get(row), const32(1), add, set(row), br(0)
  ]
  return {
    name: "normGrad",
    params: [i32, i32, i32, i32, i32, i32, i32, f32, f32],
    locals: f.locals,
    body: [get(d), const32(4), mul, set(bytes), const32(0), set(row), block(loop(...perRow))]
  }
})()

type Temps = readonly [number, number, number, number, number]

/**
 * An elementwise function `name(x, [dy,] out, n4)`: `value(x, dy, t, cx)` pushes the result from the
 * v128 locals x (and dy), with five scratch locals t.
 */
const elementwise = (relaxed: boolean, globals: VectorConstants, name: string, withDy: boolean, value: (x: number, dy: number, t: Temps, cx: Ctx) => Code): Func => {
  const params = withDy ? [i32, i32, i32, i32] as const : [i32, i32, i32] as const
  const f = frame(params, 2, 0, 7)
  const [xp, dyp, out, n4] = withDy ? [0, 1, 2, 3] : [0, -1, 1, 2]
  const [c, bytes] = [0, 1].map(f.int) as [number, number]
  const [x, dy, ...t] = [0, 1, 2, 3, 4, 5, 6].map(f.vec) as [number, number, number, number, number, number, number]
  const pool = constantPool(f.vec(7), globals)
  const loopBody = each(c, bytes, [
    at(xp!, c), v128Load(0), set(x),
    ...(withDy ? [[...at(dyp!, c), ...v128Load(0), ...set(dy)]] : []),
    at(out!, c), value(x, dy, t as unknown as Temps, context(relaxed, pool)), v128Store(0)
  ])
  return {
    name,
    params: [...params],
    locals: [[2, i32], [7 + pool.count(), v128]],
    body: [get(n4!), const32(4), mul, set(bytes), pool.prologue(), loopBody]
  }
}

/**
 * erf(x/√2) ≈ x·P(x²)/Q(x²) for |x| ≤ 5.5437 (3.92·√2, past which erf is 1 in float32), P's and
 * Q's coefficients from the constant term up; the kernel clamps x to ±5.8, where the ratio exceeds 1
 * by 6e-7, and the result to [−1, 1] (between 5.5 and 5.8 the ratio is within 1e-7 of 1, and for
 * larger |x| erf is ±1 exactly). We fitted the coefficients (minimax by Lawson's iteration on the
 * linearised error x·P − erf·Q, weighted by 1/Q of the previous pass, in double precision): the fit's
 * error is 1.6e-8, and evaluated in float32 (coefficients rounded, Horner's rule) the error is at
 * most 3.1e-7 on erf, 1.6e-7 on Φ(x) = (1 + erf(x/√2))/2, largest near |x| = 3.8. All coefficients
 * are positive: Q ≥ 1, no pole, no cancellation.
 */
const erfP = [0.797884464263916, 0.06815292686223984, 0.009379889816045761, 0.00034192061866633594, 1.2704951586783864e-05, 4.496126848607673e-08]
const erfQ = [1.0, 0.25208285450935364, 0.028771309182047844, 0.0018965525086969137, 7.425808871630579e-05, 1.18970240237104e-06]
const erfClamp = 5.8

/** SiLU's gradient and exact GELU's value and gradient (relaxed: see {@link Ctx}). */
const activations = (relaxed: boolean, globals: VectorConstants): ReadonlyArray<Func> => {
  // σ(x) = 1 / (1 + e^(−x))
  const sigmoid = (cx: Ctx, x: number, t: Temps): Code => vdiv(cx.k(1), vadd(cx.k(1), exp(cx, [...get(x), ...f32x4Neg], [t[0], t[1], t[2]])))
  // σ(x)·(1 + x·(1 − σ(x)))·dy
  const siluGrad = elementwise(relaxed, globals, "siluGrad", true, (x, dy, t, cx) => [
    ...sigmoid(cx, x, t), ...set(t[3]),
    ...vmul(get(dy), vmul(get(t[3]), vadd(cx.k(1), vmul(get(x), vsub(cx.k(1), get(t[3]))))))
  ])
  // e^(−x²/2) into t[4]
  const gauss = (cx: Ctx, x: number, t: Temps): Code => [...exp(cx, vmul(vmul(get(x), get(x)), cx.k(-0.5)), [t[0], t[1], t[2]]), ...set(t[4])]
  // tail = 1 − erf(|x|/√2) = q·poly(q)·e^(−x²/2), q = 1/(1 + 0.2316…·|x|), given e^(−x²/2) in t[4]
  const tail = (cx: Ctx, x: number, t: Temps): Code => [
    ...vdiv(cx.k(1), cx.madd(cx.k(0.23164188826636045), [...get(x), ...f32x4Abs], cx.k(1))), ...set(t[3]),
    ...vmul(vmul(horner(cx, t[3], [1.061405429, -1.453152027, 1.421413741, -0.284496736, 0.254829592]), get(t[3])), get(t[4]))
  ]
  // x·Φ(x) = x/2 + x/2·erf(x/√2), erf(x/√2) = x·P(x²)/Q(x²) (see erfP)
  const gelu = elementwise(relaxed, globals, "gelu", false, (x, _, t, cx) => [
    ...get(x), ...cx.k(erfClamp), ...f32x4Pmin, ...cx.k(-erfClamp), ...f32x4Pmax, ...set(t[0]),
    ...vmul(get(t[0]), get(t[0])), ...set(t[1]),
    ...vmul(get(t[0]), vdiv(horner(cx, t[1], [...erfP].reverse()), horner(cx, t[1], [...erfQ].reverse()))),
    ...cx.k(1), ...f32x4Pmin, ...cx.k(-1), ...f32x4Pmax, ...set(t[2]),
    ...vmul(get(x), cx.k(0.5)), ...set(t[3]),
    ...cx.madd(get(t[3]), get(t[2]), get(t[3]))
  ])
  // Φ(x) + x·φ(x): Φ = 1 − tail/2 for x ≥ 0, tail/2 below; one exp for both
  const geluGrad = elementwise(relaxed, globals, "geluGrad", true, (x, dy, t, cx) => [
    ...gauss(cx, x, t),
    ...vmul(tail(cx, x, t), cx.k(0.5)), ...set(t[3]),
    ...vsub(cx.k(1), get(t[3])), ...get(t[3]), ...get(x), ...cx.k(0), ...f32x4Ge, ...v128Bitselect, ...set(t[3]),
    ...cx.madd(vmul(get(x), get(t[4])), cx.k(0.3989422804014327), get(t[3])),
    ...get(dy), ...f32x4Mul
  ])
  return [siluGrad, gelu, geluGrad]
}

/**
 * ln x of the vector `x` (positive normal lanes), with three scratch v128 locals: x = m·2^e with
 * m in [√½, √2), ln m = 2·atanh(s) = 2(s + s³/3 + s⁵/5 + s⁷/7 + s⁹/9), s = (m − 1)/(m + 1) and
 * |s| ≤ 0.172 (the series' remainder below 1e-9).
 */
const log = (cx: Ctx, x: Code, [v, e, m]: readonly [number, number, number]): Code => [
  ...x, ...set(v),
  ...get(v), ...const32(23), ...i32x4ShrU, ...cx.ki(127), ...i32x4Sub, ...set(e),
  ...get(v), ...cx.ki(0x007fffff), ...v128And, ...cx.ki(0x3f800000), ...v128Or, ...set(m),
  // m ≥ √2: halved, e one more (the mask is −1 there)
  ...get(m), ...cx.k(Math.SQRT2), ...f32x4Gt, ...set(v),
  ...vmul(get(m), cx.k(0.5)), ...get(m), ...get(v), ...v128Bitselect, ...set(m),
  ...get(e), ...get(v), ...i32x4Sub, ...f32x4ConvertI32x4S, ...set(e),
  ...vdiv(vsub(get(m), cx.k(1)), vadd(get(m), cx.k(1))), ...set(m),
  ...vmul(get(m), get(m)), ...set(v),
  ...cx.madd(get(e), cx.k(Math.LN2), vmul(vmul(get(m), cx.k(2)), horner(cx, v, [1 / 9, 1 / 7, 1 / 5, 1 / 3, 1])))
]

/**
 * The masked cross-entropy over rows of V logits (V a multiple of 4), per row: the label (int32)
 * valid when in [0, V), its maximum (NaN-propagating), Σ e^(l − max).
 * nll(l, y, m, out, rows, V): out[row] = valid ? m[row]·(ln Σ + max − l[label]) : 0.
 * nllGrad(l, y, m, dy, g, rows, V): g = (softmax − one-hot)·m[row]·dy[0] where valid, else 0.
 */
const crossEntropy = (relaxed: boolean, globals: VectorConstants): ReadonlyArray<Func> => {
  const make = (grad: boolean): Func => {
    const params: Array<typeof i32> = new Array<typeof i32>(grad ? 7 : 6).fill(i32)
    const f = frame(params, 5, 3, 5)
    const pool = constantPool(f.vec(5), globals)
    const cx = context(relaxed, pool)
    const [lp, yp, mp] = [0, 1, 2]
    const dyp = grad ? 3 : -1
    const out = grad ? 4 : 3
    const [rows, V] = grad ? [5, 6] : [4, 5]
    const [row, c, base, bytes, label] = [0, 1, 2, 3, 4].map(f.int) as [number, number, number, number, number]
    const [top, total, scale] = [0, 1, 2].map(f.float) as [number, number, number]
    const [acc, t0, t1, t2, mx] = [0, 1, 2, 3, 4].map(f.vec) as [number, number, number, number, number]
    const logit = (offsetOf: Code): Code => [...get(lp), ...get(base), ...add, ...offsetOf, ...add, ...f32Load(0)]
    const validLabel: Code = [...get(label), ...get(V), ...ltU]
    const e = exp(cx, vsub([...get(lp), ...get(base), ...add, ...get(c), ...add, ...v128Load(0)], get(mx)), [t0, t1, t2])
    const perRow: Array<Code> = [
      get(row), get(rows), geS, brIf(1),
      get(row), get(bytes), mul, set(base),
      get(yp), get(row), const32(4), mul, add, i32Load(0), set(label),
      // the maximum
      get(lp), get(base), add, v128Load(0), set(acc),
      each(c, bytes, [get(acc), get(lp), get(base), add, get(c), add, v128Load(0), f32x4Max, set(acc)]),
      lanes(acc, f32Max), set(top), get(top), f32x4Splat, set(mx),
      // Σ e^(l − max) (stored as the gradient's first pass)
      k(0), set(acc),
      each(c, bytes, grad
        ? [get(out), get(base), add, get(c), add, e, set(t0), get(t0), v128Store(0), vadd(get(acc), get(t0)), set(acc)]
        : [vadd(get(acc), e), set(acc)]),
      lanes(acc, f32Add), set(total),
      ...(grad
        ? [
          // scale = valid ? m·dy : 0; g = e·scale/Σ, then g[label] −= scale
          get(mp), get(row), const32(4), mul, add, f32Load(0), get(dyp), f32Load(0), f32Mul, f32Zero, validLabel, select, set(scale),
          get(scale), get(total), f32Div, f32x4Splat, set(acc),
          each(c, bytes, [get(out), get(base), add, get(c), add, get(out), get(base), add, get(c), add, v128Load(0), get(acc), f32x4Mul, v128Store(0)]),
          block(validLabel, eqz, brIf(0),
            get(out), get(base), add, get(label), const32(4), mul, add,
            get(out), get(base), add, get(label), const32(4), mul, add, f32Load(0), get(scale), f32Sub, f32Store(0))
        ]
        : [
          get(out), get(row), const32(4), mul, add,
          // m·(ln Σ + max − l[label]), or 0
          get(mp), get(row), const32(4), mul, add, f32Load(0),
          log(cx, [...get(total), ...f32x4Splat], [t0, t1, t2]), f32x4ExtractLane(0),
          get(top), f32Add, logit([...get(label), ...const32(4), ...mul]), f32Sub, f32Mul,
          f32Zero, validLabel, select, f32Store(0)
        ]),
      get(row), const32(1), add, set(row), br(0)
    ]
    return {
      name: grad ? "nllGrad" : "nll",
      params: [...params],
      locals: [...f.locals, [pool.count(), v128]],
      body: [pool.prologue(), get(V), const32(4), mul, set(bytes), const32(0), set(row), block(loop(...perRow))]
    }
  }
  return [make(false), make(true)]
}

// rotate(x, c, s, y, n, heads, hd, half, sign): the rotary embedding of x [n, heads, hd] by the
// tables c, s [n, half] (s times sign: −1 rotates back): y[f] = x[f]·c − x[f+half]·s, y[f+half] =
// x[f+half]·c + x[f]·s for f < half, the features from 2·half on copied; half and hd multiples of 4
const rotateFunc: Func = (() => {
  const f = frame([i32, i32, i32, i32, i32, i32, i32, i32, f32], 7, 0, 5)
  const [xp, cp, sp, yp, n, heads, hd, half, sign] = [0, 1, 2, 3, 4, 5, 6, 7, 8]
  const [t, h, c, base, tb, halfBytes, rowBytes] = [0, 1, 2, 3, 4, 5, 6].map(f.int) as [number, number, number, number, number, number, number]
  const [sg, x1, x2, cs, sn] = [0, 1, 2, 3, 4].map(f.vec) as [number, number, number, number, number]
  const at2 = (p: number, extra: Code): Code => [...get(p), ...get(base), ...add, ...get(c), ...add, ...extra]
  const upper: Code = [...get(halfBytes), ...add]
  const count = (i: number, limit: number, body: ReadonlyArray<Code>): Code =>
    [...const32(0), ...set(i), ...block(loop(get(i), get(limit), geS, brIf(1), ...body, get(i), const32(1), add, set(i), br(0)))]
  const pairs: Array<Code> = [
    at2(xp, []), v128Load(0), set(x1), at2(xp, upper), v128Load(0), set(x2),
    get(cp), get(tb), add, get(c), add, v128Load(0), set(cs),
    vmul([...get(sp), ...get(tb), ...add, ...get(c), ...add, ...v128Load(0)], get(sg)), set(sn),
    at2(yp, []), vsub(vmul(get(x1), get(cs)), vmul(get(x2), get(sn))), v128Store(0),
    at2(yp, upper), vadd(vmul(get(x2), get(cs)), vmul(get(x1), get(sn))), v128Store(0),
    get(c), const32(16), add, set(c)
  ]
  const perHead: Array<Code> = [
    const32(0), set(c),
    block(loop(get(c), get(halfBytes), geS, brIf(1), ...pairs, br(0))),
    // the features past 2·half, copied
    get(halfBytes), const32(2), mul, set(c),
    block(loop(get(c), get(rowBytes), geS, brIf(1), at2(yp, []), at2(xp, []), v128Load(0), v128Store(0), get(c), const32(16), add, set(c), br(0))),
    get(base), get(rowBytes), add, set(base)
  ]
  return {
    name: "rotate",
    params: [i32, i32, i32, i32, i32, i32, i32, i32, f32],
    locals: f.locals,
    body: [
      get(sign), f32x4Splat, set(sg),
      get(half), const32(4), mul, set(halfBytes),
      get(hd), const32(4), mul, set(rowBytes),
      const32(0), set(base), const32(0), set(tb),
      count(t, n, [count(h, heads, perHead), get(tb), get(halfBytes), add, set(tb)])
    ]
  }
})()

// softmax(s, m, out, rows, width, mRows, scale, mapRows, tailFrom): per row, softmax(s·scale +
// m[row mod mRows]) (the attention's masked softmax): the logits into out with their maximum
// (NaN-propagating), then e^(logit − max) with their sum, then times 1/sum; with mapRows > 0 (a
// causal square map: the mask −1e9 above the diagonal; width a multiple of 4) up to the diagonal's
// vector, zeros after. A width off multiples of 4 (at least 4) ends each pass with the row's last
// vector, which overlaps the one before: its lanes from `tailFrom` (4 − width mod 4) on are the
// new ones (the maximum may see the others twice; the sum and the stores take only the new ones).
const softmaxFunc = (relaxed: boolean, globals: VectorConstants): Func => {
  const f = frame([i32, i32, i32, i32, i32, i32, f32, i32, f32], 8, 0, 8)
  const pool = constantPool(f.vec(8), globals)
  const cx = context(relaxed, pool)
  const [sp, mp, out, rows, width, mRows, scale, mapRows, tailFrom] = [0, 1, 2, 3, 4, 5, 6, 7, 8]
  const [row, c, base, bytes, mbase, live, t, whole] = [0, 1, 2, 3, 4, 5, 6, 7].map(f.int) as [number, number, number, number, number, number, number, number]
  const [acc, sc, mx, t0, t1, t2, tmask, v] = [0, 1, 2, 3, 4, 5, 6, 7].map(f.vec) as [number, number, number, number, number, number, number, number]
  const outAt: Code = [...get(out), ...get(base), ...add, ...get(c), ...add]
  // the pass's body at byte c, and the same at the row's last (overlapping) vector where the live
  // part is not whole vectors
  const withTail = (body: ReadonlyArray<Code>, tail: ReadonlyArray<Code>): Code => [
    ...each(c, whole, body),
    ...if_([...get(live), ...get(whole), ...sub], [get(live), const32(16), sub, set(c), ...tail])
  ]
  const logits: ReadonlyArray<Code> = [
    outAt, cx.madd([...get(sp), ...get(base), ...add, ...get(c), ...add, ...v128Load(0)], get(sc), [...get(mp), ...get(mbase), ...add, ...get(c), ...add, ...v128Load(0)]), set(t0), get(t0), v128Store(0),
    get(acc), get(t0), f32x4Pmax, set(acc)
  ]
  const perRow: Array<Code> = [
    get(row), get(rows), geS, brIf(1),
    get(row), get(bytes), mul, set(base),
    // (row mod mRows)·bytes
    get(row), get(mRows), remU, get(bytes), mul, set(mbase),
    liveBytes(row, mapRows, bytes, live, t),
    get(live), const32(-16), and, set(whole),
    k(-Infinity), set(acc),
    // the logits again at the last vector: the same values, and the maximum is idempotent
    withTail(logits, logits),
    lanes(acc, f32Max), f32x4Splat, set(mx),
    k(0), set(acc),
    withTail(
      [outAt, exp(cx, vsub([...outAt, ...v128Load(0)], get(mx)), [t0, t1, t2]), set(t0), get(t0), v128Store(0), vadd(get(acc), get(t0)), set(acc)],
      // the last vector's old lanes already hold their e^x
      [outAt, v128Load(0), set(v), exp(cx, vsub(get(v), get(mx)), [t0, t1, t2]), set(t0),
        outAt, get(t0), get(v), get(tmask), v128Bitselect, v128Store(0),
        vadd(get(acc), [...get(t0), ...get(tmask), ...v128And]), set(acc)]
    ),
    vdiv(k(1), [...lanes(acc, f32Add), ...f32x4Splat]), set(acc),
    withTail(
      [outAt, vmul([...outAt, ...v128Load(0)], get(acc)), v128Store(0)],
      [outAt, v128Load(0), set(v), outAt, vmul(get(v), get(acc)), get(v), get(tmask), v128Bitselect, v128Store(0)]
    ),
    zeroRest(out, base, c, live, bytes),
    get(row), const32(1), add, set(row), br(0)
  ]
  return {
    name: "softmax",
    params: [i32, i32, i32, i32, i32, i32, f32, i32, f32],
    locals: [...f.locals, [pool.count(), v128]],
    body: [
      pool.prologue(),
      get(scale), f32x4Splat, set(sc), get(width), const32(4), mul, set(bytes), const32(0), set(row),
      // the new lanes of a row's last vector: lane ≥ tailFrom
      f32x4Lanes([0, 1, 2, 3]), get(tailFrom), f32x4Splat, f32x4Ge, set(tmask),
      block(loop(...perRow))
    ]
  }
}

// sumSquares(x, n4): Σ x² of n4 floats (a multiple of 4) in double precision, two lanes of f64 for
// the low and two for the high half of each vector (the product of two float32s is exact in f64)
const sumSquaresFunc: Func = (() => {
  const f = frame([i32, i32], 2, 0, 4)
  const [xp, n4] = [0, 1]
  const [c, bytes] = [0, 1].map(f.int) as [number, number]
  const [lo, hi, x, d] = [0, 1, 2, 3].map(f.vec) as [number, number, number, number]
  const square = (v: Code): Code => [...v, ...f64x2PromoteLowF32x4, ...set(d), ...get(d), ...get(d), ...f64x2Mul]
  const high = [...get(x), ...get(x), ...highHalf]
  return {
    name: "sumSquares",
    params: [i32, i32],
    result: f64,
    locals: f.locals,
    body: [
      get(n4), const32(4), mul, set(bytes),
      k(0), set(lo), k(0), set(hi),
      each(c, bytes, [
        at(xp, c), v128Load(0), set(x),
        get(hi), square(high), f64x2Add, set(hi),
        get(lo), square(get(x)), f64x2Add, set(lo)
      ]),
      get(lo), get(hi), f64x2Add, set(x),
      get(x), f64x2ExtractLane(0), get(x), f64x2ExtractLane(1), f64Add
    ]
  }
})()

/** The kernels, on views of the heap (whole groups of 4; see {@link makeSimd} for tails). */
export interface Simd {
  /** scale·p·(dp − Σ p·dp) per row of `width`; `mapRows` > 0: causal square maps of that many rows (see softmax). */
  readonly softmaxGrad: (p: Float32Array, dp: Float32Array, out: Float32Array, width: number, scale: number, mapRows?: number) => void
  readonly siluGrad: (x: Float32Array, dy: Float32Array, out: Float32Array) => void
  readonly gelu: (x: Float32Array, out: Float32Array) => void
  readonly geluGrad: (x: Float32Array, dy: Float32Array, out: Float32Array) => void
  /** RMSNorm over rows of `d` (a multiple of 4): y = x·r·g; its gradient by x; per row dy·x·r (r = 1/√(mean x² + ε)). */
  readonly norm: (x: Float32Array, g: Float32Array, y: Float32Array, d: number, eps: number) => void
  readonly normDx: (x: Float32Array, g: Float32Array, dy: Float32Array, dx: Float32Array, d: number, eps: number) => void
  readonly normDg: (x: Float32Array, dy: Float32Array, out: Float32Array, d: number, eps: number) => void
  /** Both: dx as normDx, and dg = Σ over the rows of dy·x·r (d floats). */
  readonly normGrad: (x: Float32Array, g: Float32Array, dy: Float32Array, dx: Float32Array, dg: Float32Array, d: number, eps: number) => void
  /** The masked cross-entropy per row and its gradient (rows of a multiple of 4; see crossEntropy). */
  readonly nll: (l: Float32Array, y: Int32Array, m: Float32Array, out: Float32Array, V: number) => void
  readonly nllGrad: (l: Float32Array, y: Int32Array, m: Float32Array, dy: Float32Array, g: Float32Array, V: number) => void
  /** The rotary embedding of x [n, heads, hd] by tables [n, half] (sign −1: back); half and hd multiples of 4. */
  readonly rotate: (x: Float32Array, c: Float32Array, s: Float32Array, y: Float32Array, heads: number, hd: number, half: number, sign: number) => void
  /**
   * softmax(s·scale + m[row mod mRows]) per row of `width` (at least 4); m has mRows rows.
   * `mapRows` > 0: the rows are causal square maps of that many rows (m −1e9 above each diagonal),
   * computed up to the diagonal's vector, 0 after (the same values: e^x is 0 there); taken where
   * the width is a multiple of 4.
   */
  readonly softmax: (s: Float32Array, m: Float32Array, out: Float32Array, width: number, scale: number, mapRows?: number) => void
  /** Σ x² in double precision (any length). */
  readonly sumSquares: (x: Float32Array) => number
}

/**
 * The kernels over `memory` (tfjs-backend-wasm's), or undefined where the engine has no SIMD. The
 * row kernels take rows whose width is a multiple of 4; the elementwise ones finish the last n mod 4
 * elements with `tail` (the caller's scalar formula).
 */
export const makeSimd = (memory: WebAssembly.Memory, tails: {
  readonly siluGrad: (x: number, dy: number) => number
  readonly gelu: (x: number) => number
  readonly geluGrad: (x: number, dy: number) => number
}, options: {
  /** Relaxed SIMD (FMA, the plain truncation) or not; by default where the engine has it (tests pick each). */
  readonly relaxed?: boolean
} = {}): Simd | undefined => {
  const build = (relaxed: boolean) => {
    const globals = vectorConstants()
    const funcs = [softmaxGradFunc, ...activations(relaxed, globals), normForward, normGradX, normGradRows, normGradBoth, sumSquaresFunc, rotateFunc, softmaxFunc(relaxed, globals), ...crossEntropy(relaxed, globals)]
    return moduleBytes(funcs, globals.inits())
  }
  const relaxed = options.relaxed ?? WebAssembly.validate(build(true))
  const bytes = build(relaxed)
  if (!WebAssembly.validate(bytes)) return undefined
  const x = new WebAssembly.Instance(new WebAssembly.Module(bytes), { env: { memory } }).exports as Record<string, (...a: Array<number>) => void>
  const unary = (name: string, scalar: (v: number) => number) => (v: Float32Array, out: Float32Array) => {
    const n4 = v.length - (v.length % 4)
    if (n4 > 0) x[name]!(v.byteOffset, out.byteOffset, n4)
    for (let i = n4; i < v.length; i++) out[i] = scalar(v[i]!)
  }
  const binary = (name: string, scalar: (v: number, d: number) => number) => (v: Float32Array, dy: Float32Array, out: Float32Array) => {
    const n4 = v.length - (v.length % 4)
    if (n4 > 0) x[name]!(v.byteOffset, dy.byteOffset, out.byteOffset, n4)
    for (let i = n4; i < v.length; i++) out[i] = scalar(v[i]!, dy[i]!)
  }
  return {
    softmaxGrad: (p, dp, out, width, scale, mapRows = 0) => x["softmaxGrad"]!(p.byteOffset, dp.byteOffset, out.byteOffset, p.length / width, width, scale, mapRows),
    siluGrad: binary("siluGrad", tails.siluGrad),
    gelu: unary("gelu", tails.gelu),
    norm: (v, g, y, d, eps) => x["norm"]!(v.byteOffset, g.byteOffset, 0, y.byteOffset, v.length / d, d, eps, 1 / d),
    normDx: (v, g, dy, dx, d, eps) => x["normDx"]!(v.byteOffset, g.byteOffset, dy.byteOffset, dx.byteOffset, v.length / d, d, eps, 1 / d),
    rotate: (v, c, sn, y, heads, hd, half, sign) => x["rotate"]!(v.byteOffset, c.byteOffset, sn.byteOffset, y.byteOffset, v.length / (heads * hd), heads, hd, half, sign),
    softmax: (sv, m, out, width, scale, mapRows = 0) =>
      x["softmax"]!(sv.byteOffset, m.byteOffset, out.byteOffset, sv.length / width, width, m.length / width, scale, width % 4 === 0 ? mapRows : 0, 4 - (width % 4)),
    nll: (l, y, m, out, V) => x["nll"]!(l.byteOffset, y.byteOffset, m.byteOffset, out.byteOffset, l.length / V, V),
    nllGrad: (l, y, m, dy, g, V) => x["nllGrad"]!(l.byteOffset, y.byteOffset, m.byteOffset, dy.byteOffset, g.byteOffset, l.length / V, V),
    normGrad: (v, g, dy, dx, dg, d, eps) => {
      dg.fill(0)
      x["normGrad"]!(v.byteOffset, g.byteOffset, dy.byteOffset, dx.byteOffset, dg.byteOffset, v.length / d, d, eps, 1 / d)
    },
    normDg: (v, dy, out, d, eps) => x["normDg"]!(v.byteOffset, 0, dy.byteOffset, out.byteOffset, v.length / d, d, eps, 1 / d),
    geluGrad: binary("geluGrad", tails.geluGrad),
    sumSquares: (v) => {
      const n4 = v.length - (v.length % 4)
      let total = n4 > 0 ? (x["sumSquares"]! as unknown as (p: number, n: number) => number)(v.byteOffset, n4) : 0
      for (let i = n4; i < v.length; i++) total += v[i]! * v[i]!
      return total
    }
  }
}
