/** References for MoE capacity dispatch tests (test/capacity.test.ts, test/webgpu.test.ts). */

/** The tables by a plain loop: each expert numbers its tokens in order and keeps the first C. */
export const routeByLoop = (mask: ArrayLike<number>, n: number, E: number, C: number) => {
  const slots = new Array<number>(E * n).fill(-1)
  const tokens = new Array<number>(E * C).fill(-1)
  for (let e = 0; e < E; e++) {
    let r = 0
    for (let i = 0; i < n; i++) {
      if (mask[i * E + e] !== 1) continue
      if (r < C) {
        slots[e * n + i] = e * C + r
        tokens[e * C + r] = i
      }
      r++
    }
  }
  return { slots, tokens }
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
