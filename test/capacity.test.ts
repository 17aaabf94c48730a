/**
 * MoE capacity dispatch (`Dispatch` `{ capacity }`, how MoE layers train on webgpu with `expertCapacity`), on the cpu
 * backend: the routing tables and slot gathers on hand-checked values and against a plain loop;
 * with a slot for every pair a training pass gives the sparse path's loss and gradients and reads
 * no routing back; with fewer, the pairs beyond each expert's slots are dropped and counted.
 */
import { assert, describe, it } from "@effect/vitest"
import { Effect } from "effect"
import type { Dispatch, Tensor } from "../src/graph/Apply.ts"
import { expertSlots } from "../src/blocks/MoE.ts"
import { load as loadBackend } from "../src/runtime/Backend.ts"
import { makeRoute, makeSlots } from "../src/runtime/Fused.ts"
import { type Batch, loss, materialize, recordReads, release } from "../src/runtime/Lower.ts"
import { load } from "./support/models.ts"
import { routeByLoop, routingMask } from "./support/routing.ts"

const { tf } = await Effect.runPromise(loadBackend("cpu"))

const moe = { kind: "moe", vocab: 64, hidden: 32, layers: 4, heads: 4, kvHeads: 2, experts: 6, topK: 2, expertHidden: 16, tiedEmbeddings: true }
const configs: ReadonlyArray<readonly [string, Record<string, unknown>]> = [
  ["MoE with a gated shared expert", { ...moe, sharedHidden: 24, sharedGate: true }],
  ["MoE, sigmoid router, renormalised top-k, expert biases", { ...moe, scoring: "sigmoid", normalizeTopK: true, bias: true }],
  ["ConceptMoE", { kind: "conceptmoe", baseline: moe, ratio: 2, encoderLayers: 1, decoderLayers: 1, topK: 3 }]
]
const batch: Batch = {
  rows: 2,
  length: 16,
  ids: new Int32Array(32).map((_, i) => (i * 7 + (i % 3) * 5) % 64),
  targets: new Int32Array(32).map((_, i) => (i * 11 + 3) % 64)
}
const maxDiff = (a: ArrayLike<number>, b: ArrayLike<number>) => {
  let m = 0
  for (let i = 0; i < a.length; i++) m = Math.max(m, Math.abs(a[i]! - b[i]!))
  return m
}

describe("MoE capacity dispatch", () => {
  it("routes, gathers into slots and back, with gradients, on hand-checked values", () => {
    // 7 tokens, 3 experts, 2 slots each; token 6 is routed nowhere (padding)
    const mask = tf.tensor2d([1, 1, 0, 0, 1, 1, 1, 0, 1, 1, 1, 0, 0, 1, 1, 1, 0, 1, 0, 0, 0], [7, 3])
    const { slots, tokens } = makeRoute(tf)(mask, 2)
    // expert 0 keeps tokens 0 and 2 (3 and 5 dropped), expert 1 tokens 0 and 1, expert 2 tokens 1 and 2
    assert.deepStrictEqual(Array.from(slots.dataSync()), [0, -1, 1, -1, -1, -1, -1, 2, 3, -1, -1, -1, -1, -1, -1, 4, 5, -1, -1, -1, -1])
    assert.deepStrictEqual(Array.from(tokens.dataSync()), [0, 2, 0, 1, 1, 2])
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

  it("the routing tables equal a plain loop's for any capacity, padding included", () => {
    for (const [n, E, k, C, empty] of [[33, 8, 2, 3, 0], [64, 16, 2, 8, 5], [5, 4, 3, 10, 0], [1, 4, 1, 1, 0], [40, 3, 1, 40, 4]] as const) {
      const m = routingMask(n, E, k, empty)
      const { slots, tokens } = makeRoute(tf)(tf.tensor2d(m, [n, E]), C)
      const expected = routeByLoop(m, n, E, C)
      assert.deepStrictEqual(Array.from(slots.dataSync()), expected.slots, `[${n}, ${E}] top-${k}, ${C} slots`)
      assert.deepStrictEqual(Array.from(tokens.dataSync()), expected.tokens, `[${n}, ${E}] top-${k}, ${C} slots`)
    }
  })

  it("slots per expert: ceil(factor·n·k/E), at least 1, at most n", () => {
    assert.strictEqual(expertSlots(2, 1024, 2, 16), 256)
    assert.strictEqual(expertSlots(1.25, 100, 2, 16), 16)
    assert.strictEqual(expertSlots(8, 1024, 2, 16), 1024)
    assert.strictEqual(expertSlots(100, 32, 2, 6), 32)
    assert.strictEqual(expertSlots(0.01, 32, 2, 6), 1)
  })

  for (const [name, cfg] of configs) {
    it(`${name}: with a slot for every pair, the sparse pass's loss and gradients, and no routing read back`, async () => {
      const m = await Effect.runPromise(load(cfg))
      const low = materialize(tf, m.analysis, 3)
      const vars = [...low.variables.values()]
      const options = { training: true, seed: 9, balanceWeight: 0.01 } as const
      const run = (dispatch: Dispatch) =>
        tf.tidy(() => {
          let routing: Array<number> = []
          const { grads, value } = tf.variableGrads(() => {
            const r = loss(low, batch, { ...options, dispatch })
            const er = r.ctx.expertRouting
            if (er !== undefined) routing = [er.routed.dataSync()[0]!, er.kept.dataSync()[0]!]
            return r.total
          }, vars)
          return { loss: value.dataSync()[0]!, grads: vars.map((v) => (grads[v.name] as Tensor | undefined)?.dataSync() ?? new Float32Array(v.size)), routing }
        })
      const sparse = run("sparse")
      // 6 experts, top-2: a factor of 3 gives every expert a slot per token
      const roomy = run({ capacity: 3 })
      assert.closeTo(roomy.loss, sparse.loss, 1e-5)
      sparse.grads.forEach((g, i) => assert.isAtMost(maxDiff(roomy.grads[i]!, g), 1e-5, [...low.variables.keys()][i]))
      const moeLayers = m.analysis.rows.filter((r) => r.kind === "moe").length
      assert.isAbove(moeLayers, 0)
      const [routed, kept] = roomy.routing
      assert.strictEqual(kept, routed)
      // every token routes to 2 experts in each layer on tokens; the concept model's routes its concepts' 3
      if (m.concept === undefined) assert.strictEqual(routed, moeLayers * 32 * 2)
      else assert.isAbove(routed!, 0)
      // like dense dispatch, it reads back at most the concept boundaries
      const reads = await recordReads(low, batch, { ...options, dispatch: { capacity: 3 } })
      assert.strictEqual(reads.length, m.concept === undefined ? 0 : 1)
      // with fewer slots, pairs are dropped and counted: at most E·C kept per layer
      const tight = run({ capacity: 0.5 })
      const C = expertSlots(0.5, 32, 2, 6)
      assert.strictEqual(C, 6)
      if (m.concept === undefined) {
        assert.strictEqual(tight.routing[0], moeLayers * 32 * 2)
        assert.isAtMost(tight.routing[1]!, moeLayers * 6 * C)
      }
      assert.isBelow(tight.routing[1]!, tight.routing[0]!)
      assert.isTrue(Number.isFinite(tight.loss))
      assert.notStrictEqual(tight.loss, sparse.loss)
      release(low)
    }, 60_000)
  }
})
