/**
 * tfjs's `Add`, `Sub`, `Multiply` and `RealDiv` of float32 tensors, and `Transpose` of 4-byte tensors, as
 * loops in WebAssembly over tfjs-backend-wasm's heap (fixes 11 and 12 of `../Fixes.ts`, installed
 * by `Fixes.ts` here). tfjs-backend-wasm 4.22 took about 0.3 ms for an `Add` of two [1024, 128]
 * tensors (2.4 ns an element, where a SIMD pass over that memory takes about 0.05 ms) and 0.3–0.4 ms
 * for the attention's head split and merge ([8, 128, 4, 32] → [8, 4, 128, 32]); a dense d128 training
 * step runs a dozen of each.
 *
 * - `binary(op)(a, b, out, bytes, period)`: out = a op b over `bytes` of a, b's `period` bytes
 *   repeated (b the same shape as a, or a's trailing dimensions: the mask added to every head's
 *   scores); both multiples of 16. `binaryScalar(op)(a, b, out, bytes)`: b one float.
 *   `binaryRows(op)(a, b, out, bytes, rowBytes)`: b one float per row of a (an `[n, 1]` side: the
 *   chunk module's norms, gates).
 * - `permuteRuns(src, dst, n0, n1, n2, n3, s0, s1, s2)`: dst, in order, is src's [n0, n1, n2] runs
 *   of n3 contiguous bytes (a multiple of 16) at byte strides s0, s1, s2 (the last axis kept by the
 *   permutation). `permuteScalar(src, dst, n0, n1, n2, n3, s0, s1, s2, s3)`: the same with n3
 *   elements at stride s3 (4-byte elements one by one).
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
  eqz,
  f32Load,
  f32Store,
  f32x4Add,
  f32x4Div,
  f32x4Mul,
  f32x4Sub,
  forUp,
  type Func,
  geS,
  get,
  i32,
  load32Splat,
  loop,
  moduleBytes,
  set,
  v128,
  v128Load,
  v128Store
} from "./Assemble.ts"

/** `for (i = 0; i < limit; i++) body` over the i32 locals i and limit. */
const repeat = (i: number, limit: number, body: ReadonlyArray<Code>): Code => forUp(i, limit, 1, body)

const ops = { add: f32x4Add, sub: f32x4Sub, mul: f32x4Mul, div: f32x4Div } as const
export type BinaryOp = keyof typeof ops

// binary(a, b, out, bytes, period): locals c (byte offset), j (offset into b)
const binaryFunc = (op: BinaryOp): Func => {
  const [a, b, out, bytes, period, c, j] = [0, 1, 2, 3, 4, 5, 6]
  return {
    name: op,
    params: 5,
    locals: [[2, i32]],
    body: [
      const32(0), set(j),
      forUp(c, bytes, 16, [
        get(out), get(c), add,
        get(a), get(c), add, v128Load(0),
        get(b), get(j), add, v128Load(0),
        ops[op], v128Store(0),
        // j = (j + 16) mod period
        get(j), const32(16), add, set(j),
        block(get(j), get(period), geS, eqz, brIf(0), const32(0), set(j))
      ])
    ]
  }
}

// binaryScalar(a, b, out, bytes): b one float
const binaryScalarFunc = (op: BinaryOp): Func => {
  const [a, b, out, bytes, c, s] = [0, 1, 2, 3, 4, 5]
  return {
    name: `${op}Scalar`,
    params: 4,
    locals: [[1, i32], [1, v128]],
    body: [
      get(b), load32Splat(0), set(s),
      forUp(c, bytes, 16, [get(out), get(c), add, get(a), get(c), add, v128Load(0), get(s), ops[op], v128Store(0)])
    ]
  }
}

// binaryRows(a, b, out, bytes, rowBytes): b one float per row of a (rows of rowBytes)
const binaryRowsFunc = (op: BinaryOp): Func => {
  const [a, b, out, bytes, rowBytes, row, c, end, s] = [0, 1, 2, 3, 4, 5, 6, 7, 8]
  return {
    name: `${op}Rows`,
    params: 5,
    locals: [[3, i32], [1, v128]],
    body: [
      const32(0), set(row), const32(0), set(c),
      block(loop(
        get(c), get(bytes), geS, brIf(1),
        get(b), get(row), add, load32Splat(0), set(s),
        get(c), get(rowBytes), add, set(end),
        block(loop(
          get(c), get(end), geS, brIf(1),
          get(out), get(c), add, get(a), get(c), add, v128Load(0), get(s), ops[op], v128Store(0),
          get(c), const32(16), add, set(c), br(0)
        )),
        get(row), const32(4), add, set(row), br(0)
      ))
    ]
  }
}

/** The permutation's three outer loops around `inner`, with running pointers p (into src) and o (into dst). */
const outerLoops = (
  [src, n0, n1, n2, s0, s1, s2]: readonly [number, number, number, number, number, number, number],
  [i0, i1, i2, p0, p1, p2]: readonly [number, number, number, number, number, number],
  inner: Code
): Code => [
  ...get(src), ...set(p0),
  ...repeat(i0, n0, [
    get(p0), set(p1),
    repeat(i1, n1, [
      get(p1), set(p2),
      repeat(i2, n2, [inner, get(p2), get(s2), add, set(p2)]),
      get(p1), get(s1), add, set(p1)
    ]),
    get(p0), get(s0), add, set(p0)
  ])
]

// permuteRuns(src, dst, n0, n1, n2, n3, s0, s1, s2): n3 in bytes, a multiple of 16
const permuteRunsFunc: Func = (() => {
  const [src, dst, n0, n1, n2, n3, s0, s1, s2] = [0, 1, 2, 3, 4, 5, 6, 7, 8]
  const [i0, i1, i2, p0, p1, p2, c, o] = [9, 10, 11, 12, 13, 14, 15, 16]
  const inner = forUp(c, n3, 16, [get(o), get(p2), get(c), add, v128Load(0), v128Store(0), get(o), const32(16), add, set(o)])
  return {
    name: "permuteRuns",
    params: 9,
    locals: [[8, i32]],
    body: [get(dst), set(o), outerLoops([src, n0, n1, n2, s0, s1, s2], [i0, i1, i2, p0, p1, p2], inner)]
  }
})()

// permuteScalar(src, dst, n0, n1, n2, n3, s0, s1, s2, s3): n3 elements at stride s3 bytes
const permuteScalarFunc: Func = (() => {
  const [src, dst, n0, n1, n2, n3, s0, s1, s2, s3] = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]
  const [i0, i1, i2, p0, p1, p2, i3, q, o] = [10, 11, 12, 13, 14, 15, 16, 17, 18]
  const inner = [
    ...get(p2), ...set(q),
    ...repeat(i3, n3, [get(o), get(q), f32Load(0), f32Store(0), get(o), const32(4), add, set(o), get(q), get(s3), add, set(q)])
  ]
  return {
    name: "permuteScalar",
    params: 10,
    locals: [[9, i32]],
    body: [get(dst), set(o), outerLoops([src, n0, n1, n2, s0, s1, s2], [i0, i1, i2, p0, p1, p2], inner)]
  }
})()

/** The loops over a heap, on byte offsets. */
export interface ElementwiseKernels {
  /** out = a op b, b repeated every `period` bytes (`bytes` and `period` multiples of 16). */
  readonly binary: (op: BinaryOp, a: number, b: number, out: number, bytes: number, period: number) => void
  /** out = a op b for one float b. */
  readonly binaryScalar: (op: BinaryOp, a: number, b: number, out: number, bytes: number) => void
  /** out = a op b[row] over rows of `rowBytes` (a multiple of 16): b one float per row (a `[n, 1]` side). */
  readonly binaryRows: (op: BinaryOp, a: number, b: number, out: number, bytes: number, rowBytes: number) => void
  /**
   * Copies src, of `shape` (4-byte elements, rank ≤ 4 after merging), permuted by `perm` into dst;
   * false (nothing copied) where the permutation needs more than four loops.
   */
  readonly transpose: (src: number, dst: number, shape: ReadonlyArray<number>, perm: ReadonlyArray<number>) => boolean
}

/**
 * The output's axes of a permutation, merged where neighbours stay neighbours in the input, as
 * [size, input stride in elements] from the outermost; at least one axis.
 */
export const permutedAxes = (shape: ReadonlyArray<number>, perm: ReadonlyArray<number>): Array<[number, number]> => {
  const strides = shape.map((_, i) => shape.slice(i + 1).reduce((a, c) => a * c, 1))
  const axes: Array<[number, number]> = []
  for (const p of perm) {
    if (shape[p] === 1) continue
    const last = axes[axes.length - 1]
    // the previous axis steps over exactly this one: one axis of their product
    if (last !== undefined && last[1] === strides[p]! * shape[p]!) last.splice(0, 2, last[0] * shape[p]!, strides[p]!)
    else axes.push([shape[p]!, strides[p]!])
  }
  return axes.length === 0 ? [[1, 1]] : axes
}

/** The kernels over `memory` (tfjs-backend-wasm's), or undefined where the engine has no SIMD. */
export const makeElementwise = (memory: WebAssembly.Memory): ElementwiseKernels | undefined => {
  const names = Object.keys(ops) as Array<BinaryOp>
  const bytes = moduleBytes([...names.map(binaryFunc), ...names.map(binaryScalarFunc), ...names.map(binaryRowsFunc), permuteRunsFunc, permuteScalarFunc])
  if (!WebAssembly.validate(bytes)) return undefined
  const x = new WebAssembly.Instance(new WebAssembly.Module(bytes), { env: { memory } }).exports as Record<string, (...a: Array<number>) => void>
  return {
    binary: (op, a, b, out, n, period) => x[op]!(a, b, out, n, period),
    binaryScalar: (op, a, b, out, n) => x[`${op}Scalar`]!(a, b, out, n),
    binaryRows: (op, a, b, out, n, rowBytes) => x[`${op}Rows`]!(a, b, out, n, rowBytes),
    transpose: (src, dst, shape, perm) => {
      const axes = permutedAxes(shape, perm)
      if (axes.length > 4) return false
      while (axes.length < 4) axes.unshift([1, 0])
      const [[n0, s0], [n1, s1], [n2, s2], [n3, s3]] = axes as [[number, number], [number, number], [number, number], [number, number]]
      if (s3 === 1 && n3 % 4 === 0) x["permuteRuns"]!(src, dst, n0, n1, n2, 4 * n3, 4 * s0, 4 * s1, 4 * s2)
      else x["permuteScalar"]!(src, dst, n0, n1, n2, n3, 4 * s0, 4 * s1, 4 * s2, 4 * s3)
      return true
    }
  }
}
