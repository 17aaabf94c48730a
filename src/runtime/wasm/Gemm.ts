/**
 * Our fp32 matrix product for tfjs-backend-wasm: a 128-bit SIMD kernel, assembled at load
 * (`Assemble.ts`), that reads and writes tfjs's heap in place.
 *
 * Why: tfjs-backend-wasm runs its products through XNNPACK on one thread, at 12–25 GFLOP/s on the
 * training steps' shapes here (a transposed operand costs it a Transpose kernel first, and its
 * weight-gradient products ran at 12–14). This kernel computes `C = op(A)·op(B)` by blocks of
 * 4 rows × 8 columns held in eight vector registers, with `f32x4.relaxed_madd` (one fused
 * multiply-add per 4 lanes where the CPU has FMA; the plain multiply and add where the engine lacks
 * relaxed SIMD). B is first packed into panels of 8 columns (`[panel][k][8]`, zero past N), so the
 * kernel reads it contiguously; a row-major B is packed a 64-byte line at a time (16 columns, two
 * panels: each line read once), a transposed one element by element. A is read in place through
 * two byte strides (between rows and between consecutive k); a transposed A is packed first into
 * blocks of 4 rows (`[block][k][4]`, a line at a time as B). Rows past the last whole block of 4,
 * and columns past the last whole panel, go through a small scratch area and are copied out. The
 * loop over B's panels runs inside the loop over A's blocks, or outside it where A is the smaller
 * operand and B large ({@link panelsOuter}). Each output element is one sum over k in ascending
 * order: the same bits every run on a given machine (the FMA rounds once per term, so the last
 * bits differ from a plain multiply-and-add, as between any two BLAS libraries).
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
  eq,
  f32Load,
  f32Store,
  f32x4Add,
  f32x4Mul,
  f32x4RelaxedMadd,
  f32Zero,
  type Func,
  geS,
  get,
  gtS,
  i32,
  if_,
  load32Splat,
  loop,
  moduleBytes,
  mul,
  select,
  set,
  shl,
  sub,
  tee,
  v128,
  v128Load,
  v128Store,
  v128Zero
} from "./Assemble.ts"

/** Rows of A per block (one vector register of accumulators per row and 4 columns). */
const blockRows = 4
/** Columns of B per packed panel (two vectors of 4). */
const panelCols = 8

/**
 * `gemm(a, rowS, kS, blockS, bp, c, ldc, mBlocks, panels, K, panelS, live)`: for each block of 4
 * rows of A (block q's row r, k at `a + q·blockS + r·rowS + k·kS`, bytes) and each packed panel of B
 * (`bp + p·panelS`, k at `+ k·32`), the 4 × 8 block of C at `c + (4q + r)·ldc + p·32`, summing K
 * terms; panels from `live` on are written as zeros without a sum. K ≥ 1. A panel stride apart
 * from K lets a caller sum part of the k range (a triangle).
 */
const gemmFunc = (fma: boolean): Func => {
  const [a, rowS, kS, blockS, bp, c, ldc, mBlocks, panels, K, panelBytes, live] = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]
  const [i, p, k, pa, pb, o1, o2, o3, crow, a0, pk] = [12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22]
  const [b0, b1] = [23, 24]
  const acc = Array.from({ length: 2 * blockRows }, (_, j) => 25 + j)
  const av = 25 + 2 * blockRows
  const offsets = [undefined, o1, o2, o3]
  const madd = (x: number, y: number, z: number): Code => (fma ? [...get(x), ...get(y), ...get(z), ...f32x4RelaxedMadd] : [...get(x), ...get(y), ...f32x4Mul, ...get(z), ...f32x4Add])
  const kStep: Array<Code> = [get(pk), v128Load(0), set(b0), get(pk), v128Load(16), set(b1)]
  for (let r = 0; r < blockRows; r++) {
    const o = offsets[r]
    kStep.push(o === undefined ? [...get(pa), ...load32Splat(0)] : [...get(pa), ...get(o), ...add, ...load32Splat(0)], set(av))
    kStep.push(madd(av, b0, acc[2 * r]!), set(acc[2 * r]!), madd(av, b1, acc[2 * r + 1]!), set(acc[2 * r + 1]!))
  }
  kStep.push(get(pa), get(kS), add, set(pa), get(pk), const32(32), add, set(pk))
  kStep.push(get(k), const32(1), sub, tee(k), brIf(0))
  const stores: Array<Code> = []
  for (let r = 0; r < blockRows; r++) {
    const row = r === 0 ? get(crow) : [...get(crow), ...get(ldc), ...const32(r), ...mul, ...add]
    stores.push(row, get(acc[2 * r]!), v128Store(0), row, get(acc[2 * r + 1]!), v128Store(16))
  }
  const panel: Array<Code> = [
    get(p), get(panels), geS, brIf(1),
    ...acc.flatMap((x) => [v128Zero, set(x)]),
    get(a0), set(pa), get(pb), set(pk), get(K), set(k),
    block(get(p), get(live), geS, brIf(0), loop(...kStep)),
    ...stores,
    get(pb), get(panelBytes), add, set(pb),
    get(crow), const32(32), add, set(crow),
    get(p), const32(1), add, set(p), br(0)
  ]
  const rowBlock: Array<Code> = [
    get(i), get(mBlocks), geS, brIf(1),
    const32(0), set(p), get(bp), set(pb),
    get(c), get(i), get(ldc), ...[const32(blockRows), mul, mul, add], set(crow),
    block(loop(...panel)),
    get(a0), get(blockS), add, set(a0),
    get(i), const32(1), add, set(i), br(0)
  ]
  return {
    name: "gemm",
    params: 12,
    locals: [[11, i32], [2 + 2 * blockRows + 1, v128]],
    body: [
      get(rowS), set(o1), get(rowS), const32(2), mul, set(o2), get(rowS), const32(3), mul, set(o3),
      get(a), set(a0), const32(0), set(i),
      block(loop(...rowBlock))
    ]
  }
}

/**
 * `packW(b, kS, nS, dst, K, N, panels)` for a width W of 8 (B's panels) or 4 (a transposed A's
 * blocks of rows): the matrix with element (k, n) at `b + k·kS + n·nS` (bytes) into panels
 * `dst[p][k][0..W)`, zero past N. A whole panel of a row-major source is W/4 vector copies per k.
 */
const packFunc = (width: 4 | 8): Func => {
  const [b, kS, nS, dst, K, N, panels] = [0, 1, 2, 3, 4, 5, 6]
  const [p, k, src, d, j, jmax, srcj] = [7, 8, 9, 10, 11, 12, 13]
  const log2 = width === 8 ? 3 : 2
  const nextK: Array<Code> = [get(src), get(kS), add, set(src), get(d), const32(width * 4), add, set(d), get(k), const32(1), sub, tee(k), brIf(0)]
  const copies: Array<Code> = []
  for (let v = 0; v < width / 4; v++) copies.push(get(d), get(src), v128Load(16 * v), v128Store(16 * v))
  const vectorRows = loop(...copies, ...nextK)
  const address = (x: number): Code => [...get(d), ...get(x), ...const32(2), ...shl, ...add]
  const scalarRows = loop(
    const32(0), set(j), get(src), set(srcj),
    block(loop(get(j), get(jmax), geS, brIf(1), address(j), get(srcj), f32Load(0), f32Store(0), get(srcj), get(nS), add, set(srcj), get(j), const32(1), add, set(j), br(0))),
    block(loop(get(j), const32(width), geS, brIf(1), address(j), f32Zero, f32Store(0), get(j), const32(1), add, set(j), br(0))),
    ...nextK
  )
  return {
    name: `pack${width}`,
    params: 7,
    locals: [[7, i32]],
    body: [
      const32(0), set(p), get(dst), set(d),
      block(loop(
        get(p), get(panels), geS, brIf(1),
        // jmax = min(W, N − W·p); src = b + W·p·nS
        get(N), get(p), const32(log2), shl, sub, set(jmax),
        const32(width), get(jmax), get(jmax), const32(width), gtS, select, set(jmax),
        get(b), get(p), const32(log2), shl, get(nS), mul, add, set(src),
        get(K), set(k),
        if_([...get(jmax), ...const32(width), ...eq, ...get(nS), ...const32(4), ...eq, ...and], [vectorRows], [scalarRows]),
        get(p), const32(1), add, set(p), br(0)
      ))
    ]
  }
}

/**
 * `packLinesW(b, kS, dst, K, groups)` for a width W of 8 or 4: a row-major source's columns
 * (element (k, n) at `b + k·kS + 4n`) into panels `dst[p][k][0..W)` (K rows each), 16 columns
 * (one 64-byte line, 16/W panels) at a time: each line of the source is read once, where `packW`
 * reads a panel's part of it per panel.
 */
const packLinesFunc = (width: 4 | 8): Func => {
  const [b, kS, dst, K, groups] = [0, 1, 2, 3, 4]
  const [g, k, src, panelBytes] = [5, 6, 7, 8]
  const per = 16 / width
  const ds = Array.from({ length: per }, (_, i) => 9 + i)
  const vs = [9 + per, 10 + per, 11 + per, 12 + per]
  const step: Array<Code> = []
  for (let v = 0; v < 4; v++) step.push(get(src), v128Load(16 * v), set(vs[v]!))
  for (let v = 0; v < 4; v++) {
    const panel = Math.floor(v / (width / 4))
    step.push(get(ds[panel]!), get(vs[v]!), v128Store(16 * (v % (width / 4))))
  }
  step.push(get(src), get(kS), add, set(src))
  for (const d of ds) step.push(get(d), const32(width * 4), add, set(d))
  step.push(get(k), const32(1), sub, tee(k), brIf(0))
  return {
    name: `packLines${width}`,
    params: 5,
    locals: [[4 + per, i32], [4, v128]],
    body: [
      get(K), const32(width * 4), mul, set(panelBytes),
      const32(0), set(g),
      block(loop(
        get(g), get(groups), geS, brIf(1),
        // src = b + 64·g; the group's first panel at dst + g·(16/W)·panelBytes
        get(b), get(g), const32(6), shl, add, set(src),
        ...ds.map((d, i): Code => [...get(dst), ...get(g), ...const32(per), ...mul, ...const32(i), ...add, ...get(panelBytes), ...mul, ...add, ...set(d)]),
        get(K), set(k),
        loop(...step),
        get(g), const32(1), add, set(g), br(0)
      ))
    ]
  }
}

/** The heap and allocator of tfjs-backend-wasm's module. */
export interface Heap {
  readonly memory: WebAssembly.Memory
  readonly malloc: (bytes: number) => number
  readonly free: (pointer: number) => void
}

/** One product (or a batch of them) on the heap: byte offsets of A, B and C, with tfjs's layout. */
export interface Product {
  readonly a: number
  readonly b: number
  readonly c: number
  /** Matrices in the batch; A or B without a batch (`aBatched` false) is used for every one. */
  readonly batch: number
  readonly aBatched: boolean
  readonly bBatched: boolean
  /** C is `[m, n]`, the inner size `k`; A is stored `[k, m]` when transposed, B `[n, k]`. */
  readonly m: number
  readonly k: number
  readonly n: number
  readonly transposeA: boolean
  readonly transposeB: boolean
  /**
   * The loop over B's panels outside the loop over A's blocks of rows (each panel stays in cache
   * while every block passes) instead of inside; the same sums either way. Default: as
   * {@link panelsOuter} chooses by shape.
   */
  readonly panelsOuter?: boolean
  /** Where the product is a triangle (causal attention's maps), the blocks the kernel may skip. */
  readonly triangle?: Triangle
}

/**
 * A causal attention map is a triangle: the scores are needed at key j ≤ query i only, and the
 * probabilities (and the gradients the softmax gives them) are exactly 0 above the diagonal, where
 * the mask's −1e9 makes e^x 0. A product told which triangle skips the 4 × 8 blocks outside it
 * (about half of a square map's):
 * - `lowerC`: C[i, j] at j ≤ i is the product; above the diagonal each entry is 0 or the product
 *   (0 in the blocks of 4 × 8 wholly above it, the product in those across it).
 * - `lowerA`: op(A)[i, k] is 0 for k > i (each block of rows sums k up to its last row).
 * - `upperA`: op(A)[i, k] is 0 for k < i (each block of rows sums k from its first row).
 * - `lowerB`: op(B)[k, j] is 0 for k < j (each panel of columns sums k from its first column).
 * The operand triangles are a promise: entries outside them are taken as 0 but may be read where a
 * block straddles the diagonal. With the promise kept the result is the full product's bit for
 * bit (lowerC's: below the diagonal): the terms skipped are exact zeros, and a fused 0·b + s is s.
 * Where C is not whole blocks and panels, the full product is computed (as these definitions
 * allow).
 */
export type Triangle = "lowerC" | "lowerA" | "upperA" | "lowerB"

/**
 * Whether a product loops over B's panels outside A's blocks: where A has fewer rows than B columns
 * and B's panels (k·n floats) pass 1 MiB, so that each panel stays in cache while every block of A
 * (the smaller operand) passes, instead of all of B going through the cache once per block. Timed
 * alternating in one process (both orders over the same heap): the weight gradient of a d128 FFN's
 * up projection (128×1024×512, A transposed) 8% faster, of its QKV (128×1024×384) 3%; with m > n
 * (512×1024×128) the panels outside were 7% slower, and small products equal either way.
 */
export const panelsOuter = (m: number, k: number, n: number): boolean => m < n && k * n * 4 > 1 << 20

export interface Gemm {
  /** Whether the kernel fuses its multiply-adds (relaxed SIMD). */
  readonly fma: boolean
  readonly product: (x: Product) => void
}

/** The kernel over `heap`, or undefined where the engine has no 128-bit SIMD. */
export const makeGemm = (heap: Heap): Gemm | undefined => {
  const build = (fma: boolean) => moduleBytes([gemmFunc(fma), packFunc(8), packFunc(4), packLinesFunc(8), packLinesFunc(4)])
  const fma = WebAssembly.validate(build(true))
  const bytes = fma ? build(true) : build(false)
  if (!WebAssembly.validate(bytes)) return undefined
  const exports = new WebAssembly.Instance(new WebAssembly.Module(bytes), { env: { memory: heap.memory } }).exports
  const gemm = exports["gemm"] as (...xs: Array<number>) => void
  const pack8 = exports["pack8"] as (...xs: Array<number>) => void
  const pack4 = exports["pack4"] as (...xs: Array<number>) => void
  const packLines8 = exports["packLines8"] as (...xs: Array<number>) => void
  const packLines4 = exports["packLines4"] as (...xs: Array<number>) => void
  // packs as packW(src, kS, nS, dst, K, N, panels) does; a row-major source's whole lines first
  const pack = (width: 4 | 8, src: number, kS: number, nS: number, dst: number, K: number, N: number, panels: number) => {
    const groups = nS === 4 ? Math.floor(N / 16) : 0
    if (groups > 0) (width === 8 ? packLines8 : packLines4)(src, kS, dst, K, groups)
    const done = (groups * 16) / width
    if (panels > done) (width === 8 ? pack8 : pack4)(src + groups * 64, kS, nS, dst + done * K * width * 4, K, N - groups * 16, panels - done)
  }
  // one scratch area, grown as needed: packed B, packed A, a padded C, and C's last rows
  let scratch = 0
  let scratchBytes = 0
  const reserve = (bytes: number): number => {
    if (bytes > scratchBytes) {
      if (scratch !== 0) heap.free(scratch)
      scratchBytes = Math.max(bytes, 2 * scratchBytes)
      scratch = heap.malloc(scratchBytes)
    }
    return scratch
  }
  const product = (x: Product): void => {
    const { m, k, n } = x
    if (m === 0 || n === 0) return
    if (k === 0) {
      new Float32Array(heap.memory.buffer, x.c, x.batch * m * n).fill(0)
      return
    }
    const panels = Math.ceil(n / panelCols)
    const np = panels * panelCols
    const blocks = Math.ceil(m / blockRows)
    const full = Math.floor(m / blockRows)
    const fullRows = full * blockRows
    const rest = m - fullRows
    const direct = np === n
    const outer = (x.panelsOuter ?? panelsOuter(m, k, n)) && panels > 1
    const panelBytes = k * panelCols * 4
    const packedB = panels * panelBytes
    // the triangle's blocks where C is whole blocks and panels; elsewhere the full product (the
    // same values, by the promise) and lowerC's zeros after
    const triangular = x.triangle !== undefined && direct && rest === 0
    // a transposed A is packed into blocks of 4 rows ([block][k][4], zeros past m): read in place,
    // its 4 rows of one k share a cache line but consecutive k are a row of A apart
    const packedA = x.transposeA ? blocks * k * blockRows * 4 : 0
    const paddedC = direct ? 0 : fullRows * np * 4
    const base = reserve(packedB + packedA + paddedC + blockRows * (k + np) * 4)
    const bPacked = base
    const aPacked = bPacked + packedB
    const cPad = aPacked + packedA
    const aRest = cPad + paddedC
    const cRest = aRest + blockRows * k * 4
    // A's strides in bytes (rows, k, blocks of 4 rows), and B's (k, n)
    const [rowS, kS, blockS] = x.transposeA ? [4, blockRows * 4, k * blockRows * 4] : [k * 4, 4, blockRows * k * 4]
    const [bk, bn] = x.transposeB ? [4, k * 4] : [n * 4, 4]
    for (let i = 0; i < x.batch; i++) {
      const given = x.a + (x.aBatched ? i * m * k * 4 : 0)
      const c = x.c + i * m * n * 4
      if (i === 0 || x.bBatched) pack(8, x.b + (x.bBatched ? i * k * n * 4 : 0), bk, bn, bPacked, k, n, panels)
      if (x.transposeA && (i === 0 || x.aBatched)) pack(4, given, m * 4, 4, aPacked, k, m, blocks)
      const a = x.transposeA ? aPacked : given
      if (triangular) triangle(x.triangle!, a, rowS, kS, blockS, bPacked, c, m, k, n)
      else if (full > 0) {
        const [cc, ldcBytes] = [direct ? c : cPad, (direct ? n : np) * 4]
        if (outer) for (let p = 0; p < panels; p++) gemm(a, rowS, kS, blockS, bPacked + p * panelBytes, cc + p * panelCols * 4, ldcBytes, full, 1, k, panelBytes, 1)
        else gemm(a, rowS, kS, blockS, bPacked, cc, ldcBytes, full, panels, k, panelBytes, panels)
      }
      if (rest > 0) {
        let last = a + full * blockS
        if (!x.transposeA) {
          // the last rows, copied into a block of 4 (zeros below)
          const f = new Float32Array(heap.memory.buffer)
          const ar = aRest >> 2
          f.fill(0, ar, ar + blockRows * k)
          f.set(f.subarray(last >> 2, (last >> 2) + rest * k), ar)
          last = aRest
        }
        gemm(last, rowS, kS, blockS, bPacked, cRest, np * 4, 1, panels, k, panelBytes, panels)
      }
      if (!direct || rest > 0) {
        const f = new Float32Array(heap.memory.buffer)
        const out = c >> 2
        if (!direct) for (let r = 0; r < fullRows; r++) f.copyWithin(out + r * n, (cPad >> 2) + r * np, (cPad >> 2) + r * np + n)
        for (let r = 0; r < rest; r++) f.copyWithin(out + (fullRows + r) * n, (cRest >> 2) + r * np, (cRest >> 2) + r * np + n)
      }
    }
  }
  // the product of whole blocks and panels (C written in place) by the triangle's blocks: a call
  // per block of rows (lowerC: the panels up to the block's last row; lowerA / upperA: k up to its
  // last row / from its first) or per panel (lowerB: k from the panel's first column)
  const triangle = (t: Triangle, a: number, rowS: number, kS: number, blockS: number, bp: number, c: number, m: number, k: number, n: number) => {
    const [blocks, panels, panelBytes, ldc] = [m / blockRows, n / panelCols, k * panelCols * 4, n * 4]
    const zero = (at: number, rows: number, cols: number) => {
      const f = new Float32Array(heap.memory.buffer)
      for (let r = 0; r < rows; r++) f.fill(0, (at >> 2) + r * n, (at >> 2) + r * n + cols)
    }
    if (t === "lowerB") {
      for (let p = 0; p < panels; p++) {
        const from = p * panelCols
        if (from < k) gemm(a + from * kS, rowS, kS, blockS, bp + p * panelBytes + from * 32, c + p * 32, ldc, blocks, 1, k - from, panelBytes, 1)
        else zero(c + p * 32, m, panelCols)
      }
      return
    }
    // lowerC: two blocks of rows (one panel's height) at a time, the panels past their last row zeros
    const step = t === "lowerC" && blocks % 2 === 0 ? 2 : 1
    for (let q = 0; q < blocks; q += step) {
      const [first, last] = [q * blockRows, (q + step) * blockRows - 1]
      const [aq, cq] = [a + q * blockS, c + first * ldc]
      if (t === "lowerC") gemm(aq, rowS, kS, blockS, bp, cq, ldc, step, panels, k, panelBytes, Math.min(panels, Math.floor(last / panelCols) + 1))
      else if (t === "lowerA") gemm(aq, rowS, kS, blockS, bp, cq, ldc, 1, panels, Math.min(k, last + 1), panelBytes, panels)
      else if (first < k) gemm(aq + first * kS, rowS, kS, blockS, bp + first * 32, cq, ldc, 1, panels, k - first, panelBytes, panels)
      else zero(cq, blockRows, n)
    }
  }
  return { fma, product }
}
