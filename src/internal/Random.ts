/**
 * The seeded pseudo-random numbers every part shares: the chunk module's boundary draws, data order
 * and batches, sampling in generation, the reference forward of an export. One generator, so that a
 * run is reproduced from its seed wherever the draws happen.
 *
 * @internal
 */

/**
 * A small seeded PRNG (mulberry32): a function giving uniform numbers in [0, 1). Each draw adds
 * 0x6d2b79f5 to the 32-bit state, so k draws are skipped by starting from `seed + k·0x6d2b79f5`.
 */
export const prng = (seed: number) => {
  let a = seed >>> 0
  return () => {
    a = (a + 0x6d2b79f5) >>> 0
    let t = a
    t = Math.imul(t ^ (t >>> 15), t | 1)
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61)
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296
  }
}
