/**
 * The MoE layer's routing and slot kernels on wasm, as loops over the heap (`Heap.ts`), under the
 * same names, inputs and results as the webgpu ones (`Fused.ts`: `makeTopMask`, `makeRoute`,
 * `makeSlots`), so that the makers take one route on both backends.
 *
 * Why: op by op, a layer's routing went through a one-hot of every token's top-k (a broadcast
 * comparison of `[n·k, 1]` with `[E]`), a cumulative sum per expert and a scatter; and its combine
 * gathered every token's E slots (`[n·E, d]`, mostly the zero row), weighted and summed them, and
 * differentiated that through a segment sum. In a moe-tiny training step (16 experts, top-2, 1,024
 * tokens, 6 layers) these took about a fifth of the step (tf.profile, docs/performance.md). Here
 * each is one pass over what it needs: the k experts a token has, the rows an expert fills.
 *
 * Sums run in float64 and round once (the webgpu kernels sum in float32), in the same order as
 * theirs: over a token's experts in expert order, over a group's rows in group order.
 *
 * Where the engine has 128-bit SIMD, the three kernels that move most (an expert's groups summed, in
 * a weight gradient; tokens copied into slots; the experts' rows combined back per token) run four
 * floats a step in WebAssembly
 * ({@link moeSimd}), with the loops' arithmetic: the same float64 sums in the same order, the same
 * float32 products, so the same bits (`tests/capacity.test.ts`). In a training step of the main
 * job's MoE (d 64, 8 rows) the JavaScript loops took 12.8 ms (the group sums), 6.3 ms (the copies)
 * and 6.4 ms (the combine, {@link fromSlotsFunc}) of 243 (a sampling profile, 40 steps).
 *
 * @since 0.4.0
 */
import type { Tf } from "../../graph/Apply.ts"
import {
  add,
  const32,
  divU,
  f32Const,
  f32Load,
  f32x4DemoteF64x2Zero,
  f32x4Mul,
  f32x4Splat,
  f64PromoteF32,
  f64x2Add,
  f64x2Mul,
  f64x2PromoteLowF32x4,
  f64x2Splat,
  forUp,
  type Func,
  geS,
  get,
  highHalf,
  i32,
  i32TruncF32S,
  if_,
  joinLowHalves,
  ltS,
  moduleBytes,
  mul,
  remU,
  set,
  v128,
  v128Load,
  v128Store,
  v128Zero
} from "./Assemble.ts"
import { registerHeapKernel } from "./Heap.ts"

/**
 * `sumRows(x, out, bytes, rows, stride)`: out[c] = f32(Σ_r x[r·stride + c]) over `rows` rows, each
 * sum in float64 from +0 in row order, for the first `bytes` (a multiple of 16) of a row.
 */
const sumRowsFunc: Func = (() => {
  const [x, out, bytes, rows, stride] = [0, 1, 2, 3, 4]
  const [c, r, p] = [5, 6, 7]
  const [lo, hi, v] = [8, 9, 10]
  return {
    name: "sumRows",
    params: 5,
    locals: [[3, i32], [3, v128]],
    body: [forUp(c, bytes, 16, [
      v128Zero, set(lo), v128Zero, set(hi), get(x), get(c), add, set(p),
      forUp(r, rows, 1, [
        get(p), v128Load(0), set(v),
        get(lo), get(v), f64x2PromoteLowF32x4, f64x2Add, set(lo),
        get(hi), get(v), get(v), highHalf, f64x2PromoteLowF32x4, f64x2Add, set(hi),
        get(p), get(stride), add, set(p)
      ]),
      get(out), get(c), add, get(lo), f32x4DemoteF64x2Zero, get(hi), f32x4DemoteF64x2Zero, joinLowHalves, v128Store(0)
    ])]
  }
})()

/**
 * `toSlots(x, t, w, out, slots, n, rowBytes, E, weighted)`: row s of out is row i of x times
 * w[i·E + e] (weighted) or 1 for t[s] = e·n + i (t float32, as the route kernel writes it), zeros
 * where t[s] < 0; rowBytes a multiple of 16.
 */
const toSlotsFunc: Func = (() => {
  const [x, t, w, out, slots, n, rowBytes, E, weighted] = [0, 1, 2, 3, 4, 5, 6, 7, 8]
  const [s, tv, i, c, src, dst] = [9, 10, 11, 12, 13, 14]
  const g = 15
  return {
    name: "toSlots",
    params: 9,
    locals: [[6, i32], [1, v128]],
    body: [forUp(s, slots, 1, [
      // the row's pair, a float32 (as every heap kernel's output) holding an integer
      get(t), get(s), const32(4), mul, add, f32Load(0), i32TruncF32S, set(tv),
      get(out), get(s), get(rowBytes), mul, add, set(dst),
      if_([...get(tv), ...const32(0), ...ltS], [forUp(c, rowBytes, 16, [get(dst), get(c), add, v128Zero, v128Store(0)])], [
        get(tv), get(n), remU, set(i),
        get(x), get(i), get(rowBytes), mul, add, set(src),
        // the gate w[i·E + e] (e = t / n), or 1
        if_([...get(weighted)], [
          get(w), get(i), get(E), mul, get(tv), get(n), divU, add, const32(4), mul, add, f32Load(0), f32x4Splat, set(g)
        ], [f32Const(1), f32x4Splat, set(g)]),
        forUp(c, rowBytes, 16, [get(dst), get(c), add, get(src), get(c), add, v128Load(0), get(g), f32x4Mul, v128Store(0)])
      ])
    ])]
  }
})()

/**
 * `fromSlots(y, p, w, out, n, E, rowBytes)`: row i of out is f32(Σ_e w[i·E + e]·y[p[e·n + i]]) over
 * the experts e in order whose slot p (float32) is not negative, each product and sum in float64
 * from +0, for rows of rowBytes (a multiple of 16).
 */
const fromSlotsFunc: Func = (() => {
  const [y, p, w, out, n, E, rowBytes] = [0, 1, 2, 3, 4, 5, 6]
  const [i, c, e, slot, row] = [7, 8, 9, 10, 11]
  const [lo, hi, v, g] = [12, 13, 14, 15]
  return {
    name: "fromSlots",
    params: 7,
    locals: [[5, i32], [4, v128]],
    body: [forUp(i, n, 1, [
      forUp(c, rowBytes, 16, [
        v128Zero, set(lo), v128Zero, set(hi),
        forUp(e, E, 1, [
          get(p), get(e), get(n), mul, get(i), add, const32(4), mul, add, f32Load(0), i32TruncF32S, set(slot),
          if_([...get(slot), ...const32(0), ...geS], [
            get(w), get(i), get(E), mul, get(e), add, const32(4), mul, add, f32Load(0), f64PromoteF32, f64x2Splat, set(g),
            get(y), get(slot), get(rowBytes), mul, add, get(c), add, v128Load(0), set(v),
            get(lo), get(g), get(v), f64x2PromoteLowF32x4, f64x2Mul, f64x2Add, set(lo),
            get(hi), get(g), get(v), get(v), highHalf, f64x2PromoteLowF32x4, f64x2Mul, f64x2Add, set(hi)
          ])
        ]),
        get(out), get(i), get(rowBytes), mul, add, get(c), add, set(row),
        get(row), get(lo), f32x4DemoteF64x2Zero, get(hi), f32x4DemoteF64x2Zero, joinLowHalves, v128Store(0)
      ])
    ])]
  }
})()

/** The group sums, slot copies and combine in SIMD over tfjs-backend-wasm's heap, or undefined where the engine has no SIMD. */
export const moeSimd = (memory: WebAssembly.Memory) => {
  const bytes = moduleBytes([sumRowsFunc, toSlotsFunc, fromSlotsFunc])
  if (!WebAssembly.validate(bytes)) return undefined
  const x = new WebAssembly.Instance(new WebAssembly.Module(bytes), { env: { memory } }).exports as Record<string, (...a: Array<number>) => void>
  return { sumRows: x["sumRows"]!, toSlots: x["toSlots"]!, fromSlots: x["fromSlots"]! }
}

/** The kernel names, as the webgpu side registers them. */
export interface MoeKernelNames {
  readonly topMask: string
  readonly routeSlots: string
  readonly routeTokens: string
  readonly routeGroups: string
  readonly sumGroups: string
  readonly toSlots: string
  readonly toSlotsWeighted: string
  readonly fromSlots: string
  readonly fromSlotsGradW: string
}

/** Rows an expert's `count` pairs take in a layout of `tile` rows per group. */
const paddedRows = (count: number, tile: number): number => Math.ceil(count / tile) * tile

/**
 * Each expert's first row and number of rows, and the pairs it may hold, for the attributes of a
 * route: `capacity` rows each, or (tile > 0) its pairs padded to whole groups, one after another.
 */
const expertRows = (counts: ArrayLike<number>, a: Record<string, number>): { first: Array<number>; span: Array<number>; room: Array<number> } => {
  const E = counts.length
  const first: Array<number> = []
  const span: Array<number> = []
  const room: Array<number> = []
  let at = 0
  for (let e = 0; e < E; e++) {
    if (a["tile"]! > 0) {
      first.push(at)
      span.push(paddedRows(Math.round(counts[e]!), a["tile"]!))
      room.push(Number.MAX_SAFE_INTEGER)
      at += span[e]!
    } else {
      first.push(e * a["capacity"]!)
      span.push(a["capacity"]!)
      room.push(a["capacity"]!)
    }
  }
  return { first, span, room }
}

/** Registers the kernels for wasm under `names`. */
export const registerWasmMoe = (tf: Tf, names: MoeKernelNames): void => {
  const memory = (tf.backend() as unknown as { wasm?: { asm?: { memory?: WebAssembly.Memory } } }).wasm?.asm?.memory
  const simd = memory === undefined ? undefined : moeSimd(memory)
  // P [n, E] → 1 where a score is among the k largest of its row (ties to the lower index): k
  // passes of a row's largest not yet taken, the first of equals, which takes them in the order of
  // rank (the webgpu kernel counts each one's rank: the same set)
  registerHeapKernel(tf, names.topMask, (sh) => [sh[0]!], ([p], [out], [shape], a) => {
    const E = shape![1]!
    const k = Math.min(a["k"]!, E)
    out!.fill(0)
    for (let base = 0; base < p!.length; base += E) {
      for (let pass = 0; pass < k; pass++) {
        let best = -1
        for (let e = 0; e < E; e++) if (out![base + e] === 0 && (best < 0 || p![base + e]! > p![base + best]!)) best = e
        out![base + best] = 1
      }
    }
  })
  // M [n, E] (0/1), C [E] (pairs per expert) → slots [E, n]: the row of each routed pair that fits, else −1
  registerHeapKernel(tf, names.routeSlots, (sh) => [[sh[0]![1]!, sh[0]![0]!]], ([m, c], [slots], [shape], a) => {
    const [n, E] = shape as [number, number]
    const { first, room } = expertRows(c!, a)
    slots!.fill(-1)
    for (let e = 0; e < E; e++) {
      let r = 0
      for (let i = 0; i < n; i++) {
        if (m![i * E + e]! > 0.5) {
          if (r < room[e]!) slots![e * n + i] = first[e]! + r
          r++
        }
      }
    }
  })
  // the inverse table: tokens [rows], each row's pair as e·n + i, or −1
  registerHeapKernel(tf, names.routeTokens, (_, a) => [[a["rows"]!]], ([m, c], [tokens], [shape], a) => {
    const [n, E] = shape as [number, number]
    const { first, span, room } = expertRows(c!, a)
    tokens!.fill(-1)
    for (let e = 0; e < E; e++) {
      let r = 0
      const fits = Math.min(room[e]!, span[e]!)
      for (let i = 0; i < n && r < fits; i++) {
        if (m![i * E + e]! > 0.5) tokens![first[e]! + r++] = e * n + i
      }
    }
  })
  // C [E] → each group of `tile` rows: its expert (the first whose padded rows end after the group's first row, else the last)
  registerHeapKernel(tf, names.routeGroups, (_, a) => [[a["rows"]! / a["tile"]!]], ([c], [groups], _, a) => {
    const T = a["tile"]!
    const E = c!.length
    let e = 0
    let end = paddedRows(Math.round(c![0]!), T)
    for (let g = 0; g < groups!.length; g++) {
      while (e < E - 1 && g * T >= end) end += paddedRows(Math.round(c![++e]!), T)
      groups![g] = g * T < end ? e : E - 1
    }
  })
  // X [G, size], Q [G] (experts ascending) → [E, size]: each expert's groups summed in order
  registerHeapKernel(tf, names.sumGroups, (sh, a) => [[a["experts"]!, sh[0]![1]!]], ([x, q], [out], [shape]) => {
    const [G, size] = shape as [number, number]
    out!.fill(0)
    // in SIMD the first size − size mod 4 columns, in JavaScript the rest (or all)
    const from = simd === undefined ? 0 : size - (size % 4)
    for (let g = 0; g < G; ) {
      const e = q![g]!
      let end = g
      while (end < G && q![end] === e) end++
      if (from > 0) simd!.sumRows(x!.byteOffset + 4 * g * size, out!.byteOffset + 4 * e * size, 4 * from, end - g, 4 * size)
      for (let j = from; j < size; j++) {
        let acc = 0
        for (let r = g; r < end; r++) acc += x![r * size + j]!
        out![e * size + j] = acc
      }
      g = end
    }
  })
  // X [n, d], T [rows] (and W [n, E]) → [rows, d]: each row's token's row of X (times its gate), zeros where empty
  const toSlots = (weighted: boolean) => (xs: Array<Float32Array | Int32Array>, [out]: Array<Float32Array>, shapes: Array<Array<number>>) => {
    const [x, t, w] = xs
    const [n, d] = shapes[0] as [number, number]
    const E = weighted ? shapes[2]![1]! : 0
    if (simd !== undefined && d % 4 === 0) {
      simd.toSlots(x!.byteOffset, t!.byteOffset, w?.byteOffset ?? 0, out!.byteOffset, t!.length, n, 4 * d, E, weighted ? 1 : 0)
      return
    }
    out!.fill(0)
    for (let s = 0; s < t!.length; s++) {
      const v = t![s]!
      if (v < 0) continue
      const i = v % n
      const g = weighted ? w![i * E + Math.floor(v / n)]! : 1
      for (let j = 0; j < d; j++) out![s * d + j] = x![i * d + j]! * g
    }
  }
  registerHeapKernel(tf, names.toSlots, (sh) => [[sh[1]![0]!, sh[0]![1]!]], toSlots(false))
  registerHeapKernel(tf, names.toSlotsWeighted, (sh) => [[sh[1]![0]!, sh[0]![1]!]], toSlots(true))
  // Y [rows, d], P [E, n], W [n, E] → [n, d]: Σ_e W[i, e]·Y[P[e, i]] over the slots a token holds
  registerHeapKernel(tf, names.fromSlots, (sh) => [[sh[1]![1]!, sh[0]![1]!]], ([y, p, w], [out], shapes) => {
    const d = shapes[0]![1]!
    const [E, n] = shapes[1] as [number, number]
    if (simd !== undefined && d % 4 === 0) {
      simd.fromSlots(y!.byteOffset, p!.byteOffset, w!.byteOffset, out!.byteOffset, n, E, 4 * d)
      return
    }
    const acc = new Float64Array(d)
    for (let i = 0; i < n; i++) {
      acc.fill(0)
      for (let e = 0; e < E; e++) {
        const slot = p![e * n + i]!
        if (slot < 0) continue
        const g = w![i * E + e]!
        for (let j = 0; j < d; j++) acc[j]! += g * y![slot * d + j]!
      }
      out!.set(acc, i * d)
    }
  })
  // Y [rows, d], P [E, n], DY [n, d] → [n, E]: DY[i]·Y[P[e, i]], zero where the pair has no slot
  registerHeapKernel(tf, names.fromSlotsGradW, (sh) => [[sh[1]![1]!, sh[1]![0]!]], ([y, p, dy], [out], shapes) => {
    const d = shapes[0]![1]!
    const [E, n] = shapes[1] as [number, number]
    for (let i = 0; i < n; i++) {
      for (let e = 0; e < E; e++) {
        const slot = p![e * n + i]!
        let s = 0
        if (slot >= 0) for (let j = 0; j < d; j++) s += dy![i * d + j]! * y![slot * d + j]!
        out![i * E + e] = s
      }
    }
  })
}
