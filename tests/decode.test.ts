/**
 * Incremental decoding: prefill + token-by-token decoding with KV caches gives the logits of one
 * full forward pass, for dense, MoE, MLA and ConceptMoE (both merges, with and without loops), on
 * batches whose rows close concepts at different steps; caches grow by doubling.
 */
import { assert, layer } from "@effect/vitest"
import { Effect } from "effect"
import type { Tensor2D } from "../src/graph/Apply.ts"
import { leaf } from "../src/graph/Block.ts"
import { Tensors, layer as backendLayer } from "../src/runtime/Backend.ts"
import { rowBuffer } from "../src/runtime/Cache.ts"
import { backendOps } from "../src/runtime/Ops.ts"
import { ContextOverflow, NotDecodable, session } from "../src/runtime/Decode.ts"
import { forward, type Lowered, materialize } from "../src/runtime/Lower.ts"
import { load } from "./support/models.ts"

const moe = { kind: "moe", vocab: 64, hidden: 32, layers: 6, heads: 4, kvHeads: 2, experts: 4, topK: 2, expertHidden: 16, tiedEmbeddings: true }

const configs: ReadonlyArray<readonly [string, Record<string, unknown>]> = [
  ["MoE, GQA, RoPE, shared experts, QK norms, sliding window", { ...moe, sharedHidden: 24, sharedGate: true, qkNorm: "head", window: 7, denseLayers: 1, denseHidden: 48 }],
  ["dense, learned positions, LayerNorm, biases (GPT-2-like)", { kind: "dense", vocab: 64, hidden: 24, layers: 2, heads: 3, ffnHidden: 40, norm: "layer", activation: "gelu_tanh", positions: "learned", attentionBias: true, tiedEmbeddings: true, contextLength: 64 }],
  ["DeepSeek-shaped MLA", { model_type: "deepseek_v3", vocab_size: 64, hidden_size: 32, intermediate_size: 48, moe_intermediate_size: 16, num_hidden_layers: 2, first_k_dense_replace: 1, n_routed_experts: 4, n_shared_experts: 1, num_experts_per_tok: 2, num_attention_heads: 4, q_lora_rank: 12, kv_lora_rank: 8, qk_nope_head_dim: 8, qk_rope_head_dim: 4, v_head_dim: 8 }],
  ["ConceptMoE, sum merge", { kind: "conceptmoe", baseline: moe, ratio: 2, encoderLayers: 2, decoderLayers: 2, topK: 3 }],
  ["ConceptMoE, last-token merge", { kind: "conceptmoe", baseline: moe, ratio: 2, encoderLayers: 2, decoderLayers: 2, merge: "last" }],
  ["ConceptMoE, sum merge, looped", { kind: "conceptmoe", baseline: moe, ratio: 2, encoderLayers: 2, decoderLayers: 2, loopLayers: 1 }],
  ["ConceptMoE, last-token merge, looped, wider", { kind: "conceptmoe", baseline: moe, ratio: 2, encoderLayers: 2, decoderLayers: 2, merge: "last", loopLayers: 1, hidden: 48, heads: 6, kvHeads: 3 }]
]

const rows = 3
const T = 24

/** Different token ids on each row (so rows close concepts at different steps). */
const ids = (vocab: number) => new Int32Array(rows * T).map((_, i) => (i * 7 + Math.floor(i / T) * 13 + (i % 5) * 3 + ((i * i) % 11)) % vocab)

const maxAbsDiff = (a: Float32Array, b: Float32Array) => {
  let m = 0
  for (let i = 0; i < a.length; i++) m = Math.max(m, Math.abs(a[i]! - b[i]!))
  return m
}

/**
 * Token embeddings of unit scale instead of 0.02: the encoder outputs of an untrained model are then
 * dominated by their own token, so adjacent ones are nearly orthogonal and the chunk module (identity
 * init) puts p near ½ ± 0.1: about half the tokens close a chunk, differently on each row.
 */
const spreadRouter = (low: Lowered) => {
  for (const p of low.analysis.params) {
    if (p.part === "embedding" && p.tiedTo === undefined && p.name === "weight") {
      const v = low.variables.get(p.path)!
      v.assign(low.tf.randomNormal(v.shape, 0, 1, "float32", 5))
    }
  }
}

/** Decodes with pieces of the given sizes (summing to T); returns the logits in full-pass order. */
const decodeInPieces = (low: Lowered, all: Int32Array, pieces: ReadonlyArray<number>, vocab: number) => {
  const s = session(low, { rows, initialCapacity: 2 })
  const out = new Float32Array(rows * T * vocab)
  let at = 0
  for (const n of pieces) {
    const piece = new Int32Array(rows * n)
    for (let r = 0; r < rows; r++) piece.set(all.subarray(r * T + at, r * T + at + n), r * n)
    const logits = s.feed(piece, n)
    const data = logits.dataSync() as Float32Array
    logits.dispose()
    for (let r = 0; r < rows; r++) out.set(data.subarray(r * n * vocab, (r + 1) * n * vocab), (r * T + at) * vocab)
    at += n
  }
  const bytes = s.cacheBytes()
  const compression = { ...s.compression }
  s.dispose()
  return { out, bytes, compression }
}

const suite = (backend: "cpu" | "wasm", which: ReadonlyArray<number>) =>
  layer(backendLayer(backend))(`incremental decoding on ${backend}`, (it) => {
    for (const i of which) {
      const [name, cfg] = configs[i]!
      it.effect(`${name}: token-by-token and chunked decoding give the full pass's logits (≤ 1e-4)`, () =>
        Effect.gen(function*() {
          const { tf } = yield* Tensors
          const m = yield* load(cfg)
          const low = materialize(tf, m.analysis, 11)
          spreadRouter(low)
          const vocab = 64
          const all = ids(vocab)
          const full = forward(low, { rows, length: T, ids: all }, { training: false, seed: 0 })
          const reference = full.logits.dataSync() as Float32Array
          const chunk = full.ctx.chunk
          if (chunk !== undefined) {
            // the rows close concepts at different steps, and no p sits on the ½ threshold
            const pattern = (r: number) => Array.from(chunk.boundaries.subarray(r * T, (r + 1) * T)).join("")
            assert.notStrictEqual(pattern(0), pattern(1))
            assert.notStrictEqual(pattern(1), pattern(2))
            const p = chunk.p.dataSync() as Float32Array
            assert.isAbove(Math.min(...Array.from(p, (x) => Math.abs(x - 0.5))), 1e-4)
          }
          const stepwise = decodeInPieces(low, all, Array.from({ length: T }, () => 1), vocab)
          assert.isAtMost(maxAbsDiff(stepwise.out, reference), 1e-4)
          const chunked = decodeInPieces(low, all, [7, 5, 1, 1, 10], vocab)
          assert.isAtMost(maxAbsDiff(chunked.out, reference), 1e-4)
          if (chunk !== undefined) {
            // the session saw exactly the full pass's boundaries
            const concepts = chunk.concepts.reduce((a, b) => a + b, 0)
            assert.deepStrictEqual(stepwise.compression, { tokens: rows * T, concepts })
            assert.deepStrictEqual(chunked.compression, { tokens: rows * T, concepts })
          }
          assert.isAbove(stepwise.bytes.total, 0)
          full.logits.dispose()
          for (const v of low.variables.values()) v.dispose()
        }), 60_000)
    }
  })

suite("cpu", configs.map((_, i) => i))
suite("wasm", [0, 3, 6])

layer(backendLayer("cpu"))("decode sessions", (it) => {
  it.effect("a ConceptMoE's concept-model KV cache holds one entry per concept; the encoder's one per token", () =>
    Effect.gen(function*() {
      const { tf } = yield* Tensors
      const m = yield* load(configs[3]![1])
      const low = materialize(tf, m.analysis, 11)
      const s = session(low, { rows: 2, initialCapacity: 1, forcedBoundary: (_, pos) => pos % 4 === 0 })
      const logits = s.prefill(new Int32Array(2 * 20).map((_, i) => i % 64), 20, 8)
      assert.deepStrictEqual(logits.shape, [2, 64])
      logits.dispose()
      // 20 tokens, a boundary every 4: 5 concepts per row; capacity doubles 1 → 32 (tokens) and 1 → 8 (concepts)
      assert.deepStrictEqual(s.compression, { tokens: 40, concepts: 10 })
      const bytes = s.cacheBytes().byScope
      const scopes = [...bytes.keys()]
      const encoder = scopes.find((k) => k.startsWith("encoder/") && k.includes("attn"))!
      const concept = scopes.find((k) => k.startsWith("concept/") && k.includes("attn"))!
      assert.isDefined(encoder, scopes.join(", "))
      assert.isDefined(concept, scopes.join(", "))
      // k and v, rows × capacity × width × 4 bytes: 32 token slots against 8 concept slots
      assert.strictEqual(bytes.get(encoder)!.allocated / bytes.get(concept)!.allocated, 4)
      // held: 20 tokens against 5 concepts
      assert.strictEqual(bytes.get(encoder)!.used / bytes.get(concept)!.used, 4)
      // rows × tokens × (k and v: 2 KV heads × head dim 8) × 4 bytes
      assert.strictEqual(bytes.get(encoder)!.used, 2 * 20 * (2 * 2 * 8) * 4)
      s.dispose()
      for (const v of low.variables.values()) v.dispose()
    }))

  it.effect("a row buffer doubles its capacity and keeps what it held, in both layouts", () =>
    Effect.gen(function*() {
      const { tf } = yield* Tensors
      const b = rowBuffer(tf, 2, 3, 1)
      b.append(tf.tensor2d([[1, 2, 3], [4, 5, 6], [7, 8, 9]]), [1, 2])
      assert.deepStrictEqual([...b.lengths], [1, 2])
      assert.strictEqual(b.capacity, 2)
      b.append(tf.tensor2d([[10, 11, 12]]), [1, 0])
      assert.deepStrictEqual(Array.from(b.row(0).dataSync()), [1, 2, 3, 10, 11, 12])
      assert.deepStrictEqual(Array.from(b.row(1).dataSync()), [4, 5, 6, 7, 8, 9])
      b.append(tf.tensor2d([[13, 14, 15], [16, 17, 18]]), [1, 1])
      assert.strictEqual(b.capacity, 4)
      assert.deepStrictEqual(Array.from(b.all().dataSync()), [1, 2, 3, 10, 11, 12, 13, 14, 15, 4, 5, 6, 7, 8, 9, 16, 17, 18])
      b.dispose()
      // feature-major: each row stores [width, capacity]
      const c = rowBuffer(tf, 2, 3, 1, "columns")
      c.append(tf.tensor2d([[1, 2, 3], [4, 5, 6], [7, 8, 9]]), [1, 2])
      c.append(tf.tensor2d([[10, 11, 12]]), [1, 0])
      assert.strictEqual(c.capacity, 2)
      assert.deepStrictEqual(Array.from(c.row(0).dataSync()), [1, 10, 2, 11, 3, 12])
      assert.deepStrictEqual(Array.from(c.row(1).dataSync()), [4, 7, 5, 8, 6, 9])
      c.append(tf.tensor2d([[13, 14, 15], [16, 17, 18]]), [1, 1])
      assert.strictEqual(c.capacity, 4)
      assert.deepStrictEqual(Array.from(c.all().dataSync()), [1, 10, 13, 2, 11, 14, 3, 12, 15, 4, 7, 16, 5, 8, 17, 6, 9, 18])
      assert.deepStrictEqual(c.store().shape, [2, 3, 4])
      c.dispose()
      // the cpu backend provides a view of a tensor's storage (runtime/Ops.ts): an append writes in
      // place, so the store is the same tensor before and after (a host copy would upload a new one)
      assert.isDefined(backendOps(tf).storage)
      const d = rowBuffer(tf, 1, 2, 4)
      const before = d.store()
      d.append(tf.tensor2d([[1, 2]]), [1])
      assert.strictEqual(d.store(), before)
      assert.deepStrictEqual(Array.from(d.row(0).dataSync()), [1, 2])
      d.dispose()
    }))

  it.effect("a session refuses a piece past the context, and a graph with an undeclared kind", () =>
    Effect.gen(function*() {
      const { tf } = yield* Tensors
      const m = yield* load(configs[1]![1])
      const low = materialize(tf, m.analysis, 1)
      const s = session(low, { rows: 1, maxLength: 8 })
      s.feed(new Int32Array(6), 6).dispose()
      assert.throws(() => s.feed(new Int32Array(3), 3), ContextOverflow)
      s.dispose()
      const { stream: _, ...undeclared } = { ...low.analysis.root.kind, name: "opaque" }
      const opaque = { ...low, analysis: { ...low.analysis, root: { ...leaf(undeclared, {}), children: [] } } }
      assert.throws(() => session(opaque as Lowered, { rows: 1 }), NotDecodable)
      for (const v of low.variables.values()) v.dispose()
    }))
})

export type { Tensor2D }
