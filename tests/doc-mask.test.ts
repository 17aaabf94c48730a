/**
 * Packed rows: a document's logits do not depend on the document before it in the row (attention
 * is block-diagonal by document, and a concept stage's concepts never span documents), in
 * evaluation and in training, for dense, MoE and ConceptMoE models, on cpu and wasm; the static-shape
 * ConceptMoE step (webgpu's, run here on cpu) too.
 */
import { assert, describe, it } from "@effect/vitest"
import { Effect } from "effect"
import type { Tf } from "../src/graph/Apply.ts"
import { load as loadBackend } from "../src/runtime/Backend.ts"
import { type Batch, conceptFeedValues, forward, type ForwardOptions, materialize, release } from "../src/runtime/Lower.ts"
import { verify } from "../src/runtime/Verify.ts"
import { load } from "./support/models.ts"

const moe = { kind: "moe", vocab: 64, hidden: 32, layers: 4, heads: 4, kvHeads: 2, experts: 4, topK: 2, expertHidden: 16, tiedEmbeddings: true, contextLength: 32 }
const configs: ReadonlyArray<readonly [string, Record<string, unknown>]> = [
  ["dense, learned positions", { kind: "dense", vocab: 64, hidden: 24, layers: 2, heads: 3, ffnHidden: 40, positions: "learned", tiedEmbeddings: true, contextLength: 32 }],
  ["MoE, GQA, RoPE, sliding window", { ...moe, window: 9 }],
  ["DeepSeek-shaped MLA", { model_type: "deepseek_v3", vocab_size: 64, hidden_size: 32, intermediate_size: 48, moe_intermediate_size: 16, num_hidden_layers: 2, first_k_dense_replace: 1, n_routed_experts: 4, n_shared_experts: 1, num_experts_per_tok: 2, num_attention_heads: 4, q_lora_rank: 12, kv_lora_rank: 8, qk_nope_head_dim: 8, qk_rope_head_dim: 4, v_head_dim: 8 }],
  ["ConceptMoE, sum merge", { kind: "conceptmoe", baseline: moe, ratio: 2, encoderLayers: 1, decoderLayers: 1, topK: 3 }],
  ["ConceptMoE, last merge, looped", { kind: "conceptmoe", baseline: moe, ratio: 1.5, encoderLayers: 1, decoderLayers: 1, topK: 2, merge: "last", loopLayers: 1, loopTimes: 2 }]
]

const L = 24
const rows = 2
// row 0: document 1 is tokens 0–9, document 2 tokens 10–23; row 1: 0–6 and 7–23
const starts = [10, L + 7]
const second = (t: number) => (t < L ? t >= starts[0]! : t >= starts[1]!)
const ids = (variant: number) => new Int32Array(rows * L).map((_, t) => second(t) ? (t * 7 + 3) % 64 : (t * (5 + 6 * variant) + 11 * variant + 1) % 64)
const batch = (variant: number, documents = true): Batch => ({
  rows,
  length: L,
  ids: ids(variant),
  targets: new Int32Array(rows * L).map((_, t) => (t * 13 + 1) % 64),
  ...(documents ? { documentStarts: new Set(starts) } : {})
})
// positions restarting at the document starts (what the runtime derives from documentStarts)
const positions = Int32Array.from({ length: rows * L }, (_, t) => (t < L ? (t < starts[0]! ? t : t - starts[0]!) : (t - L < 7 ? t - L : t - starts[1]!)))

const logits = (tf: Tf, low: ReturnType<typeof materialize>, b: Batch, options: ForwardOptions): Float32Array => {
  const out = tf.tidy(() => forward(low, b, options).logits)
  const values = out.dataSync() as Float32Array
  out.dispose()
  return values
}

/** Largest difference over the logits of the second documents. */
const secondDiff = (a: Float32Array, b: Float32Array, vocab: number) => {
  let m = 0
  for (let t = 0; t < rows * L; t++) {
    if (!second(t)) continue
    for (let j = 0; j < vocab; j++) m = Math.max(m, Math.abs(a[t * vocab + j]! - b[t * vocab + j]!))
  }
  return m
}

for (const backend of ["cpu", "wasm"] as const) {
  const { tf } = await Effect.runPromise(loadBackend(backend))
  describe(`document mask on ${backend}`, () => {
    for (const [name, cfg] of configs) {
      const concept = cfg["kind"] === "conceptmoe"
      for (const training of [false, true]) {
        if (backend === "wasm" && training) continue
        it(`${name}, ${training ? "training" : "evaluation"}: the second document's logits do not depend on the first`, async () => {
          await tf.setBackend(backend)
          const m = await Effect.runPromise(load(cfg))
          const low = materialize(tf, m.analysis, 7)
          const options: ForwardOptions = { training, seed: 99 }
          const a = logits(tf, low, batch(0), options)
          const b = logits(tf, low, batch(1), options)
          assert.isAtMost(secondDiff(a, b, 64), 1e-6)
          // without the document starts (same positions) the first document leaks into the second
          const leakA = logits(tf, low, batch(0, false), { ...options, positions })
          const leakB = logits(tf, low, batch(1, false), { ...options, positions })
          assert.isAbove(secondDiff(leakA, leakB, 64), 1e-3)
          if (!training) {
            // and the second document alone (its own row from position 0) gives the same logits
            const alone: Batch = { rows: 1, length: L - starts[0]!, ids: ids(0).slice(starts[0]!, L) }
            const c = logits(tf, low, alone, options)
            let d = 0
            for (let i = 0; i < c.length; i++) d = Math.max(d, Math.abs(c[i]! - a[starts[0]! * 64 + i]!))
            assert.isAtMost(d, 1e-5)
            // the mask skips nothing: the kernels run the row's dense map, which the static cost counts
            const r = verify(low, batch(0))
            assert.isAbove(r.flops.attentionMapExecuted, 0)
            assert.strictEqual(r.flops.attentionMapExecuted, r.flops.attentionMapDense)
          }
          release(low)
        })
      }
      if (concept && backend === "cpu") {
        it(`${name}: the static-shape step (concept slots, fed draws and document starts) keeps documents apart`, async () => {
          await tf.setBackend(backend)
          const m = await Effect.runPromise(load(cfg))
          const low = materialize(tf, m.analysis, 7)
          const run = (variant: number) => {
            const b = batch(variant)
            const v = conceptFeedValues(b, 5)
            const feeds = { random: tf.tensor1d(v.random), documentStart: tf.tensor1d(v.documentStart), capacity: 1.5 }
            const out = logits(tf, low, b, { training: true, seed: 5, dispatch: "dense", concept: feeds })
            tf.dispose([feeds.random, feeds.documentStart])
            return out
          }
          // concept positions count from the row's start on this path: rotary sees the same
          // differences within a document, so equal up to rounding
          assert.isAtMost(secondDiff(run(0), run(1), 64), 1e-5)
          release(low)
        })
      }
    }
  })
}
