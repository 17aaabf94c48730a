/**
 * MoE dispatch on the device by rows (`Dispatch` `grouped`, how MoE layers train on webgpu, and
 * `{ capacity }`, with `expertCapacity`): the routing tables and row gathers on hand-checked values
 * and against a plain loop, on the cpu backend (op by op) and on wasm (our heap kernels,
 * src/runtime/wasm/Moe.ts, under the names of the webgpu ones). Whole models against the sparse
 * path: tests/readback.test.ts.
 */
import { assert, beforeAll, describe, it } from "@effect/vitest"
import { Effect } from "effect"
import type { Tensor } from "../src/graph/Apply.ts"
import { expertSlots, groupRows } from "../src/blocks/MoE.ts"
import { load as loadBackend } from "../src/runtime/Backend.ts"
import { makeOneHot } from "../src/runtime/Fixes.ts"
import { makeRoute, makeSlots, makeTopMask } from "../src/runtime/Fused.ts"
import { routeByLoop, routingMask } from "./support/routing.ts"

const { tf } = await Effect.runPromise(loadBackend("cpu"))

for (const backend of ["cpu", "wasm"] as const) {
describe(`MoE grouped and capacity dispatch (${backend})`, () => {
  beforeAll(() => Effect.runPromise(loadBackend(backend)))

  it("the top-k mask: 1 where a score is among the k largest of its row, ties to the lower index", () => {
    const scores = [0.5, 0.1, 0.5, 0.9, 0.2, 0.2, 0.2, 0.2, -1, 3, 3, 3]
    const mask = Array.from(makeTopMask(tf, makeOneHot(tf))(tf.tensor2d(scores, [3, 4]), 2).dataSync())
    assert.deepStrictEqual(mask, [1, 0, 0, 1, 1, 1, 0, 0, 0, 1, 1, 0])
  })

  it("an expert's parameter gradient through gatherGroups sums its groups", () => {
    const w = tf.tensor3d(Array.from({ length: 3 * 2 * 2 }, (_, i) => i), [3, 2, 2])
    // groups of experts 0, 0, 2, 2, 2 (expert 1 has none)
    const groups = tf.tensor1d([0, 0, 2, 2, 2])
    const { gatherGroups } = makeSlots(tf)
    const dy = tf.tensor3d(Array.from({ length: 5 * 4 }, (_, i) => i + 1), [5, 2, 2])
    const g = tf.grad((x: Tensor) => tf.sum(tf.mul(gatherGroups(x, groups), dy)))(w)
    assert.deepStrictEqual(Array.from(g.dataSync()), [1 + 5, 2 + 6, 3 + 7, 4 + 8, 0, 0, 0, 0, 9 + 13 + 17, 10 + 14 + 18, 11 + 15 + 19, 12 + 16 + 20])
  })

  it("slots, combine and group sums equal plain loops (wasm bit for bit: float64 sums in order), rows of 64 and of 6", () => {
    const f32 = Math.fround
    for (const d of [64, 6]) {
      const n = 37
      const E = 5
      const x = Float32Array.from({ length: n * d }, (_, i) => Math.sin(i * 1.7) * 3.3)
      const w = Float32Array.from({ length: n * E }, (_, i) => Math.cos(i * 0.9))
      // rows of pairs e·n + i by groups of 4 per expert, the padding empty (−1)
      const route = makeRoute(tf)(tf.tensor2d(routingMask(n, E, 2, 3), [n, E]), { tile: 4 }, 2)
      const tokens = route.tokens.dataSync() as Int32Array
      const slots = route.slots
      assert.isTrue(tokens.includes(-1))
      const { toSlots, fromSlots, gatherGroups } = makeSlots(tf)
      // toSlots and, through fromSlots' gradient in w, the weighted gather
      const xs = toSlots(tf.tensor2d(x, [n, d]), route.tokens, slots)
      const want = new Float32Array(tokens.length * d)
      tokens.forEach((v, s) => {
        if (v >= 0) for (let j = 0; j < d; j++) want[s * d + j] = x[(v % n) * d + j]!
      })
      assert.deepStrictEqual(Array.from(xs.dataSync()), Array.from(want), `toSlots, d ${d}`)
      // fromSlots: each token's kept pairs' rows times their gates, summed over the experts in order
      const combined = fromSlots(xs, slots, route.tokens, tf.tensor2d(w, [n, E])).dataSync()
      const xsv = xs.dataSync()
      const slotv = slots.dataSync()
      const wantC = new Float32Array(n * d)
      for (let i = 0; i < n; i++) {
        for (let j = 0; j < d; j++) {
          let acc = 0
          for (let e = 0; e < E; e++) if (slotv[e * n + i]! >= 0) acc += w[i * E + e]! * xsv[slotv[e * n + i]! * d + j]!
          wantC[i * d + j] = f32(acc)
        }
      }
      if (backend === "wasm") assert.deepStrictEqual(Array.from(combined), Array.from(wantC), `fromSlots, d ${d}`)
      else Array.from(combined).forEach((v, i) => assert.closeTo(v, wantC[i]!, 1e-5 * (1 + Math.abs(wantC[i]!)), `fromSlots, d ${d}, ${i}`))
      // fromSlots' gradient in its rows: each row's token's dy times that pair's gate (one float32 product)
      const dyT = Float32Array.from({ length: n * d }, (_, i) => Math.cos(i * 0.37) * 2.1)
      const gys = tf.grad((ys: Tensor) => tf.sum(tf.mul(fromSlots(ys, slots, route.tokens, tf.tensor2d(w, [n, E])), tf.tensor2d(dyT, [n, d]))))(xs)
      const wantW = new Float32Array(tokens.length * d)
      tokens.forEach((v, s) => {
        if (v >= 0) for (let j = 0; j < d; j++) wantW[s * d + j] = f32(dyT[(v % n) * d + j]! * w[(v % n) * E + Math.floor(v / n)]!)
      })
      assert.deepStrictEqual(Array.from(gys.dataSync()), Array.from(wantW), `fromSlots' gradient in its rows, d ${d}`)
      // the gradient of gatherGroups sums each expert's groups (groups in expert order, expert 2 without any)
      const groups = tf.tensor1d([0, 0, 0, 1, 3, 3, 4, 4, 4, 4], "int32")
      const size = 2 * d
      const wt = tf.zeros([E, 2, d])
      const dy = Float32Array.from({ length: 10 * size }, (_, i) => Math.sin(i * 0.31) * 1e3 + Math.cos(i * 7.7) * 1e-3)
      const g = tf.grad((t: Tensor) => tf.sum(tf.mul(gatherGroups(t, groups), tf.tensor3d(dy, [10, 2, d]))))(wt)
      const sums = new Float32Array(E * size)
      const q = [0, 0, 0, 1, 3, 3, 4, 4, 4, 4]
      for (let e = 0; e < E; e++) {
        for (let j = 0; j < size; j++) {
          let acc = 0
          q.forEach((qe, r) => { if (qe === e) acc += dy[r * size + j]! })
          sums[e * size + j] = f32(acc)
        }
      }
      // wasm's kernel sums in float64 as the loop does; cpu's ops sum in float32
      if (backend === "wasm") assert.deepStrictEqual(Array.from(g.dataSync()), Array.from(sums), `group sums, d ${d}`)
      else Array.from(g.dataSync()).forEach((v, i) => assert.closeTo(v, sums[i]!, 1e-3 * (1 + Math.abs(sums[i]!)), `group sums, d ${d}, ${i}`))
    }
  })

  it("routes, gathers into slots and back, with gradients, on hand-checked values", () => {
    // 7 tokens, 3 experts, 2 slots each; token 6 is routed nowhere (padding)
    const mask = tf.tensor2d([1, 1, 0, 0, 1, 1, 1, 0, 1, 1, 1, 0, 0, 1, 1, 1, 0, 1, 0, 0, 0], [7, 3])
    const { slots, tokens } = makeRoute(tf)(mask, { capacity: 2 }, 2)
    // expert 0 keeps tokens 0 and 2 (3 and 5 dropped), expert 1 tokens 0 and 1, expert 2 tokens 1 and 2
    assert.deepStrictEqual(Array.from(slots.dataSync()), [0, -1, 1, -1, -1, -1, -1, 2, 3, -1, -1, -1, -1, -1, -1, 4, 5, -1, -1, -1, -1])
    // each row's pair as e·n + i
    assert.deepStrictEqual(Array.from(tokens.dataSync()), [0, 2, 7, 8, 15, 16])
    const { toSlots, fromSlots } = makeSlots(tf)
    const x = tf.tensor2d([1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14], [7, 2])
    const w = tf.tensor2d(Array.from({ length: 21 }, (_, i) => (i % 5) / 4), [7, 3])
    const xs = toSlots(x, tokens, slots)
    assert.deepStrictEqual(Array.from(xs.dataSync()), [1, 2, 5, 6, 1, 2, 3, 4, 3, 4, 5, 6])
    // token 0: 0·x0 + 0.25·x0; token 1: 1·x1 + 0·x1; token 2: 0.25·x2 + 0.75·x2; the rest dropped or unrouted
    assert.deepStrictEqual(Array.from(fromSlots(xs, slots, tokens, w).dataSync()), [0.25, 0.5, 3, 4, 5, 6, 0, 0, 0, 0, 0, 0, 0, 0])
    const dy = tf.reshape(tf.range(0, 14, 1, "float32"), [7, 2])
    const [gx, gw] = tf.grads((a: Tensor, b: Tensor) => tf.sum(tf.mul(fromSlots(toSlots(a, tokens, slots), slots, tokens, b), dy)))([x, w])
    assert.deepStrictEqual(Array.from(gx!.dataSync()), [0, 0.25, 2, 3, 4, 5, 0, 0, 0, 0, 0, 0, 0, 0])
    // dw[i, e] = dy[i]·x[i] where e kept token i
    assert.deepStrictEqual(Array.from(gw!.dataSync()), [2, 2, 0, 0, 18, 18, 50, 0, 50, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0])
  })

  it("groups by tile: every pair kept, experts' rows in order, each padded to whole groups", () => {
    const mask = tf.tensor2d([1, 1, 0, 0, 1, 1, 1, 0, 1, 1, 1, 0, 0, 1, 1, 1, 0, 1, 0, 0, 0], [7, 3])
    const { slots, tokens, groups } = makeRoute(tf)(mask, { tile: 3 }, 2)
    // 4 pairs per expert, padded to 6 rows: rows 0–5 expert 0, 6–11 expert 1, 12–17 expert 2, then
    // up to ceil((7·2 + 3·2)/3)·3 = 21 rows, the last group empty
    assert.deepStrictEqual(Array.from(slots.dataSync()), [0, -1, 1, 2, -1, 3, -1, 6, 7, -1, 8, 9, -1, -1, -1, 12, 13, -1, 14, 15, -1])
    assert.deepStrictEqual(Array.from(tokens.dataSync()), [0, 2, 3, 5, -1, -1, 7, 8, 10, 11, -1, -1, 15, 16, 18, 19, -1, -1, -1, -1, -1])
    assert.deepStrictEqual(Array.from(groups!.dataSync()), [0, 0, 1, 1, 2, 2, 2])
  })

  it("the routing tables equal a plain loop's for any capacity or tile, padding included", () => {
    for (const [n, E, k, size, empty] of [[33, 8, 2, 3, 0], [64, 16, 2, 8, 5], [5, 4, 3, 10, 0], [1, 4, 1, 1, 0], [40, 3, 1, 40, 4]] as const) {
      const m = routingMask(n, E, k, empty)
      for (const layout of [{ capacity: size }, { tile: size }]) {
        const { slots, tokens, groups } = makeRoute(tf)(tf.tensor2d(m, [n, E]), layout, k)
        const expected = routeByLoop(m, n, E, layout, k)
        const what = `[${n}, ${E}] top-${k}, ${JSON.stringify(layout)}`
        assert.deepStrictEqual(Array.from(slots.dataSync()), expected.slots, what)
        assert.deepStrictEqual(Array.from(tokens.dataSync()), expected.tokens, what)
        assert.deepStrictEqual(groups === undefined ? undefined : Array.from(groups.dataSync()), expected.groups, what)
        // by tile nothing is dropped: every routed pair has a row
        if ("tile" in layout) assert.strictEqual(expected.slots.filter((x) => x >= 0).length, m.reduce((a, b) => a + b, 0))
      }
    }
  })

  it("rows per group: the mean pairs per expert up to a power of 2, at most 64", () => {
    assert.strictEqual(groupRows(1024, 2, 16), 64)
    assert.strictEqual(groupRows(32, 2, 6), 16)
    assert.strictEqual(groupRows(1, 1, 8), 1)
  })

  it("slots per expert: ceil(factor·n·k/E), at least 1, at most n", () => {
    assert.strictEqual(expertSlots(2, 1024, 2, 16), 256)
    assert.strictEqual(expertSlots(1.25, 100, 2, 16), 16)
    assert.strictEqual(expertSlots(8, 1024, 2, 16), 1024)
    assert.strictEqual(expertSlots(100, 32, 2, 6), 32)
    assert.strictEqual(expertSlots(0.01, 32, 2, 6), 1)
  })
})
}
