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
 * @since 0.4.0
 */
import type { Tf } from "../../graph/Apply.ts"
import { registerHeapKernel } from "./Heap.ts"

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
    const acc = new Float64Array(size)
    for (let g = 0; g < G; ) {
      const e = q![g]!
      acc.fill(0)
      for (; g < G && q![g] === e; g++) for (let j = 0; j < size; j++) acc[j]! += x![g * size + j]!
      out!.set(acc, e * size)
    }
  })
  // X [n, d], T [rows] (and W [n, E]) → [rows, d]: each row's token's row of X (times its gate), zeros where empty
  const toSlots = (weighted: boolean) => (xs: Array<Float32Array | Int32Array>, [out]: Array<Float32Array>, shapes: Array<Array<number>>) => {
    const [x, t, w] = xs
    const [n, d] = shapes[0] as [number, number]
    const E = weighted ? shapes[2]![1]! : 0
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
