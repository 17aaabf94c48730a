/**
 * The training threads' gradient sum on wasm (src/runtime/wasm/WeightedSum.ts, SIMD in double
 * precision) against the JavaScript loop it replaces (`weightedSum` of src/train/Parallel.ts), bit
 * for bit: 1, 2 and 3 shards, lengths with and without a tail past the last four, and values where
 * float32's and double's roundings, −0, NaN, infinities, overflow and subnormals show.
 */
import { assert, describe, it } from "@effect/vitest"
import { Effect } from "effect"
import { prng } from "../src/internal/Random.ts"
import { load } from "../src/runtime/Backend.ts"
import { backendOps } from "../src/runtime/Ops.ts"
import { weightedSum } from "../src/train/Parallel.ts"

const special = [0, -0, NaN, Infinity, -Infinity, 3.4e38, -3.4e38, 1e-45, -1e-45, 1.17e-38, 1 + 2 ** -23, 1 - 2 ** -24, 16777217, 0.1, -0.3]

/** `n` floats: random magnitudes over many binades, and the special values spread among them. */
const values = (n: number, seed: number): Float32Array => {
  const r = prng(seed)
  return Float32Array.from({ length: n }, (_, i) => (i % 7 === 3 ? special[(i * 5 + seed) % special.length]! : (r() - 0.5) * 2 ** Math.floor(r() * 40 - 20)))
}

describe("wasm: the training threads' gradient sum", () => {
  it("equals the JavaScript loop bit for bit", async () => {
    const { tf } = await Effect.runPromise(load("wasm"))
    const sum = backendOps(tf).weightedSum
    assert.isDefined(sum, "the wasm backend provides weightedSum")
    for (const n of [1, 3, 4, 5, 8, 1027]) {
      for (const weights of [[1], [0.498046875, 0.501953125], [0.3, 0.2999999, 0.4000001], [1 / 3, 2 / 3]]) {
        const shards = weights.map((_, s) => values(n, 11 * n + s))
        // a sum whose float32 rounding differs from double's, and an overflow to infinity
        if (n >= 4 && weights.length >= 2) {
          shards[0]![0] = 1
          shards[1]![0] = 2 ** -24 / weights[1]!
          shards[0]![1] = 3.4e38
          shards[1]![1] = 3.4e38
        }
        const want = weightedSum(shards, weights, new Float32Array(n))
        const t = tf.tensor(shards[0]!, [n])
        const got = sum!(t, shards.slice(1), weights)
        const g = got.dataSync()
        for (let j = 0; j < n; j++) {
          if (!Object.is(g[j], want[j])) assert.fail(`n ${n}, ${weights.length} shards, index ${j}: ${g[j]} vs ${want[j]}`)
        }
        // the first shard's tensor is read, not written
        assert.deepStrictEqual([...t.dataSync()].map(String), [...shards[0]!].map(String))
        tf.dispose([t, got])
      }
    }
  })

  it("the JavaScript loop: float32 partial sums from +0, shard by shard", () => {
    const out = weightedSum([Float32Array.of(-0, 1, 3), Float32Array.of(-0, 2 ** -24, 5)], [0.5, 0.5], new Float32Array(3))
    // +0 + 0.5·(−0) is +0; 0.5 + 2⁻²⁵ rounds to 0.5 in float32 (to even), not in double
    assert.isTrue(Object.is(out[0], 0))
    assert.strictEqual(out[1], 0.5)
    assert.strictEqual(out[2], 4)
  })
})
