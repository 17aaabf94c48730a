/**
 * The path for backends without synchronous reads (webgpu in Node): MoE dense and grouped dispatch,
 * and capacity dispatch with a row for every pair, equal sparse dispatch in values and gradients
 * (with fewer rows, the pairs beyond are dropped and counted), and a pass whose host reads were
 * recorded asynchronously and replayed gives the loss and gradients of an ordinary pass. Runs on
 * cpu (no GPU in CI).
 */
import { assert, layer } from "@effect/vitest"
import { Effect, Schema } from "effect"
import type { Tensor } from "../src/graph/Apply.ts"
import { Tensors, layer as backendLayer } from "../src/runtime/Backend.ts"
import { type Batch, loss, materialize, recordReads, replay } from "../src/runtime/Lower.ts"
import { evaluate, evaluateAsync, newOptimizer, trainStep, trainStepAsync, TrainSettings } from "../src/train/Train.ts"
import { packStats, readStats } from "../src/train/Step.ts"
import { load } from "./support/models.ts"
import { expertSlots } from "../src/blocks/MoE.ts"

const moe = { kind: "moe", vocab: 64, hidden: 32, layers: 4, heads: 4, kvHeads: 2, experts: 6, topK: 2, expertHidden: 16, tiedEmbeddings: true }

const configs: ReadonlyArray<readonly [string, Record<string, unknown>]> = [
  ["MoE with a gated shared expert", { ...moe, sharedHidden: 24, sharedGate: true }],
  ["MoE, sigmoid router, renormalised top-k, expert biases", { ...moe, scoring: "sigmoid", normalizeTopK: true, bias: true }],
  ["ConceptMoE", { kind: "conceptmoe", baseline: moe, ratio: 2, encoderLayers: 1, decoderLayers: 1, topK: 3 }],
  ["DeepSeek-V3 routing: 6 experts in 3 groups, the best 2, top-2, scaled 2.5", {
    model_type: "deepseek_v3", vocab_size: 64, hidden_size: 32, intermediate_size: 48, moe_intermediate_size: 16, num_hidden_layers: 2, first_k_dense_replace: 1,
    n_routed_experts: 6, n_group: 3, topk_group: 2, num_experts_per_tok: 2, n_shared_experts: 1, num_attention_heads: 4, q_lora_rank: 12, kv_lora_rank: 8,
    qk_nope_head_dim: 8, qk_rope_head_dim: 4, v_head_dim: 8, max_position_embeddings: 64
  }]
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

layer(backendLayer("cpu"))("without synchronous reads", (it) => {
  for (const [name, cfg] of configs) {
    it.effect(`${name}: dense, grouped and roomy capacity dispatch and replayed reads give the sparse pass's loss and gradients`, () =>
      Effect.gen(function*() {
        const { tf } = yield* Tensors
        const m = yield* load(cfg)
        const low = materialize(tf, m.analysis, 3)
        const vars = [...low.variables.values()]
        const options = { training: true, seed: 9, balanceWeight: 0.01 } as const
        const run = (extra: Partial<Parameters<typeof loss>[2]>) =>
          tf.tidy(() => {
            let routing: Array<number> = []
            const { grads, value } = tf.variableGrads(() => {
              const r = loss(low, batch, { ...options, ...extra })
              const er = r.ctx.expertRouting
              if (er !== undefined) routing = [er.routed.dataSync()[0]!, er.kept.dataSync()[0]!]
              return r.total
            }, vars)
            return { loss: value.dataSync()[0]!, grads: vars.map((v) => (grads[v.name] as Tensor | undefined)?.dataSync() ?? new Float32Array(v.size)), routing }
          })
        const sparse = run({ dispatch: "sparse" })
        const dense = run({ dispatch: "dense" })
        // 6 experts, top-2: a factor of 3 gives every expert a row per token
        for (const dispatch of ["dense", "grouped", "fitted", { capacity: 3 }] as const) {
          const other = dispatch === "dense" ? dense : run({ dispatch })
          assert.closeTo(other.loss, sparse.loss, 1e-5, JSON.stringify(dispatch))
          sparse.grads.forEach((g, i) => assert.isAtMost(maxDiff(other.grads[i]!, g), 1e-5, `${JSON.stringify(dispatch)} ${[...low.variables.keys()][i]}`))
          // they read nothing back but the boundaries (one read per concept stage) and, fitted, each
          // MoE layer's counts
          const reads = yield* Effect.promise(() => recordReads(low, batch, { ...options, dispatch }))
          const layers = m.analysis.rows.filter((r) => r.kind === "moe").length
          assert.strictEqual(reads.length, (m.concept === undefined ? 0 : 1) + (dispatch === "fitted" ? layers : 0))
        }
        // a capacity dispatch counts the pairs routed and kept: with a row for each, all kept
        const moeLayers = m.analysis.rows.filter((r) => r.kind === "moe").length
        const roomy = run({ dispatch: { capacity: 3 } })
        assert.strictEqual(roomy.routing[1], roomy.routing[0])
        if (m.concept === undefined) assert.strictEqual(roomy.routing[0], moeLayers * 32 * 2)
        // with fewer rows, pairs are dropped and counted: at most E·C kept per layer
        const tight = run({ dispatch: { capacity: 0.5 } })
        assert.strictEqual(expertSlots(0.5, 32, 2, 6), 6)
        if (m.concept === undefined) {
          assert.strictEqual(tight.routing[0], moeLayers * 32 * 2)
          assert.isAtMost(tight.routing[1]!, moeLayers * 6 * 6)
        }
        assert.isBelow(tight.routing[1]!, tight.routing[0]!)
        assert.isTrue(Number.isFinite(tight.loss))
        assert.notStrictEqual(tight.loss, sparse.loss)
        const reads = yield* Effect.promise(() => recordReads(low, batch, { ...options, dispatch: "dense" }))
        const sparseReads = yield* Effect.promise(() => recordReads(low, batch, { ...options, dispatch: "sparse" }))
        assert.strictEqual(sparseReads.length, m.analysis.rows.filter((r) => r.kind === "moe").length + (m.concept === undefined ? 0 : 1))
        const replayed = run({ dispatch: "dense", read: replay(reads) })
        assert.strictEqual(replayed.loss, dense.loss)
        replayed.grads.forEach((g, i) => assert.deepStrictEqual(Array.from(g), Array.from(dense.grads[i]!)))
        for (const v of vars) v.dispose()
      }), 60_000)
  }

  it.effect("a training step with reads recorded asynchronously (the webgpu path) equals the ordinary step, step after step; so does evaluation", () =>
    Effect.gen(function*() {
      const { tf } = yield* Tensors
      const m = yield* load(configs[2]![1])
      const settings = Schema.decodeUnknownSync(TrainSettings)({ steps: 3, batchSize: 2, seqLen: 16, seed: 4, optimizer: { warmup: 0 } })
      const runs = [materialize(tf, m.analysis, 3), materialize(tf, m.analysis, 3)]
      const opts = runs.map((low) => newOptimizer(low))
      for (let step = 0; step < 3; step++) {
        const a = trainStep(runs[0]!, opts[0]!, batch, settings, step)
        // (after the ordinary step, which cached the attention masks of this step's lengths)
        const live = tf.memory().numTensors
        const b = yield* Effect.promise(() => trainStepAsync(runs[1]!, opts[1]!, batch, settings, step))
        // the step leaves no tensor behind (its scalars are packed and read in one transfer)
        assert.strictEqual(tf.memory().numTensors, live, `step ${step}`)
        assert.deepStrictEqual(b, a)
        assert.isAbove(a.concepts, 0)
      }
      const other: Batch = { ...batch, ids: batch.ids.map((x) => (x * 5 + 1) % 64) }
      assert.deepStrictEqual(yield* Effect.promise(() => evaluateAsync(runs[1]!, [batch, other])), evaluate(runs[0]!, [batch, other]))
      for (const [p, w] of runs[0]!.variables) assert.deepStrictEqual(Array.from(runs[1]!.variables.get(p)!.dataSync()), Array.from(w.dataSync()), p)
      for (const low of runs) for (const v of low.variables.values()) v.dispose()
    }), 60_000)

  it.effect("a step's scalars packed for one read-back come back by name, whatever the step has", () =>
    Effect.gen(function*() {
      const { tf } = yield* Tensors
      const scalar = (x: number) => tf.scalar(x)
      const base = { lr: 0, stats: { tokens: 0, concepts: 0, boundaryProbSum: 0 } }
      for (const concepts of [false, true]) {
        for (const routing of [false, true]) {
          const before = tf.memory().numTensors
          const r = {
            ...base,
            total: scalar(1.5), ce: scalar(1.25), aux: scalar(0.25),
            deviceStats: concepts ? { concepts: scalar(40), boundaryProbSum: scalar(41.5), dropped: scalar(2), threshold: scalar(37) } : undefined,
            routing: routing ? { routed: scalar(96), kept: scalar(90) } : undefined
          } as unknown as Parameters<typeof packStats>[1]
          const packed = packStats(tf, r)
          const values = packed.dataSync()
          packed.dispose()
          assert.strictEqual(tf.memory().numTensors, before)
          assert.deepStrictEqual(readStats(values, { concepts, routing }), {
            loss: 1.5, ce: 1.25, aux: 0.25,
            ...(concepts ? { concepts: 40, boundaryProbSum: 41.5, dropped: 2, thresholdConcepts: 37 } : {}),
            ...(routing ? { expertPairs: 96, expertDropped: 6 } : {})
          })
        }
      }
    }))

  it.effect("a replay that runs out of recorded values fails instead of inventing them", () =>
    Effect.gen(function*() {
      const { tf } = yield* Tensors
      const m = yield* load(configs[2]![1])
      const low = materialize(tf, m.analysis, 3)
      assert.throws(() =>
        tf.tidy(() => {
          loss(low, batch, { training: false, seed: 0, dispatch: "dense", read: replay([]) })
        }), /replayed read 0/)
      for (const v of low.variables.values()) v.dispose()
    }))
})
