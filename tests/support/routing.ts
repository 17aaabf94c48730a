/** References for MoE grouped and capacity dispatch tests (tests/capacity.test.ts, tests/webgpu.test.ts). */
import { type Layout, layoutRows } from "../../src/runtime/Fused.ts"

/**
 * The tables by a plain loop: each expert numbers its tokens in order; by capacity it keeps the
 * first C in rows e·C…, by tile all of them in rows after the previous experts' (padded to T).
 */
export const routeByLoop = (mask: ArrayLike<number>, n: number, E: number, layout: Layout, k: number) => {
  const rows = layoutRows(layout, n, k, E)
  const slots = new Array<number>(E * n).fill(-1)
  const tokens = new Array<number>(rows).fill(-1)
  const ends: Array<number> = []
  let first = 0
  for (let e = 0; e < E; e++) {
    if ("capacity" in layout) first = e * layout.capacity
    const room = "capacity" in layout ? layout.capacity : n
    let r = 0
    for (let i = 0; i < n; i++) {
      if (mask[i * E + e] !== 1) continue
      if (r < room) {
        slots[e * n + i] = first + r
        tokens[first + r] = e * n + i
      }
      r++
    }
    if ("tile" in layout) {
      first += Math.ceil(r / layout.tile) * layout.tile
      ends.push(first)
    }
  }
  const groups = "tile" in layout
    ? Array.from({ length: rows / layout.tile }, (_, g) => {
      const e = ends.findIndex((end) => g * layout.tile < end)
      return e < 0 ? E - 1 : e
    })
    : undefined
  return { slots, tokens, groups }
}

/** A `[n, E]` top-k-like mask: k distinct experts per token (none for every `empty`-th token: padding). */
export const routingMask = (n: number, E: number, k: number, empty = 0) => {
  const m = new Float32Array(n * E)
  for (let i = 0; i < n; i++) {
    if (empty > 0 && i % empty === empty - 1) continue
    for (let j = 0, e = (i * 7 + (i % 3)) % E; j < k; j++, e = (e + 1 + (i % 2)) % E) {
      while (m[i * E + e] === 1) e = (e + 1) % E
      m[i * E + e] = 1
    }
  }
  return m
}
