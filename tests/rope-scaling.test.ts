/**
 * Rotary scaling from Hugging Face `rope_scaling` (blocks/Rotary.ts, models/HuggingFace.ts): the
 * frequencies of `linear` and `yarn` against values worked out by hand, the resolution of a config's
 * fields (factor, original context, attention factor from mscale, DeepSeek's score scale), and the
 * notes `import` gives for types not applied. Forward parity with the exported PyTorch modules is in
 * python/tests (cases hf_llama-linear, hf_llama-yarn, hf_deepseek-v3-yarn).
 */
import { assert, describe, it } from "@effect/vitest"
import { Effect } from "effect"
import { ropeFrequencies } from "../src/blocks/Rotary.ts"
import { ropeScalingOf } from "../src/models/HuggingFace.ts"
import { load } from "./support/models.ts"

const plain = (dim: number, base: number, j: number) => base ** (-(2 * j) / dim)

describe("rotary frequencies under rope_scaling", () => {
  it("none and linear: base^(−2j/dim), divided by the factor; cos and sin unscaled", () => {
    const none = ropeFrequencies(8, 10000, null)
    assert.deepStrictEqual([...none.inverse], [0, 1, 2, 3].map((j) => plain(8, 10000, j)))
    const linear = ropeFrequencies(8, 10000, { type: "linear", factor: 2 })
    assert.deepStrictEqual([...linear.inverse], [0, 1, 2, 3].map((j) => plain(8, 10000, j) / 2))
    assert.strictEqual(linear.attention, 1)
  })

  it("yarn, dim 8, base 10, original context 16, beta 8 and 1: low = 0, high = 2; pair 1 halfway", () => {
    // low = floor(8·ln(16/(8·2π)) / (2·ln 10)) = floor(−1.99) → 0; high = ceil(8·ln(16/2π) / (2·ln 10)) = ceil(1.62) = 2
    const f = ropeFrequencies(8, 10, { type: "yarn", factor: 4, originalContext: 16, betaFast: 8, betaSlow: 1, attention: 1.2, truncate: true })
    assert.strictEqual(f.inverse[0], 1)
    assert.closeTo(f.inverse[1]!, 0.3514633282439682, 1e-15) // 10^−¼ · (½·¼ + ½)
    assert.closeTo(f.inverse[2]!, plain(8, 10, 2) / 4, 1e-15)
    assert.closeTo(f.inverse[3]!, plain(8, 10, 3) / 4, 1e-15)
    assert.strictEqual(f.attention, 1.2)
  })

  it("yarn, dim 64, base 10000, original context 4096 (beta 32 and 1): plain up to pair 10, divided by the factor from pair 23", () => {
    // low = floor(64·ln(4096/(32·2π)) / (2·ln 10⁴)) = floor(10.47) = 10; high = ceil(64·ln(4096/2π) / (2·ln 10⁴)) = ceil(22.51) = 23
    const f = ropeFrequencies(64, 10000, { type: "yarn", factor: 40, originalContext: 4096, betaFast: 32, betaSlow: 1, attention: 1, truncate: true })
    for (const j of [0, 5, 10]) assert.strictEqual(f.inverse[j], plain(64, 10000, j))
    for (const j of [23, 31]) assert.closeTo(f.inverse[j]!, plain(64, 10000, j) / 40, 1e-18)
    assert.closeTo(f.inverse[16]!, plain(64, 10000, 16) * ((6 / 13) / 40 + 7 / 13), 1e-15)
    // untruncated: the ramp runs from 10.47 to 22.51
    const u = ropeFrequencies(64, 10000, { type: "yarn", factor: 40, originalContext: 4096, betaFast: 32, betaSlow: 1, attention: 1, truncate: false })
    assert.isBelow(u.inverse[11]!, plain(64, 10000, 11))
    assert.strictEqual(u.inverse[10], plain(64, 10000, 10))
  })
})

describe("rope_scaling in Hugging Face configs", () => {
  const llama = {
    model_type: "llama", hidden_size: 64, intermediate_size: 96, num_hidden_layers: 1, num_attention_heads: 4, num_key_value_heads: 2,
    vocab_size: 64, max_position_embeddings: 131072, rope_theta: 500000.0
  }

  it.effect("llama: linear and yarn reach the attention's rotary spec, resolved (factor from the two contexts, attention 0.1·ln f + 1)", () =>
    Effect.gen(function*() {
      const lin = yield* load({ ...llama, rope_scaling: { rope_type: "linear", factor: 8.0 } })
      assert.deepStrictEqual((lin.analysis.specs.get("layers/0/mixer/attn") as { rope: unknown }).rope, { dim: 16, base: 500000, scaling: { type: "linear", factor: 8 } })
      const yarn = yield* load({ ...llama, rope_scaling: { type: "yarn", factor: 4.0, original_max_position_embeddings: 32768 } })
      const rope = (yarn.analysis.specs.get("layers/0/mixer/attn") as { rope: { scaling: Record<string, unknown> } }).rope
      assert.deepStrictEqual(rope.scaling, { type: "yarn", factor: 4, originalContext: 32768, betaFast: 32, betaSlow: 1, attention: 1.138629436111989, truncate: true })
      // no original context: the config's, and the given factor
      assert.deepStrictEqual(ropeScalingOf({ max_position_embeddings: 4096, rope_scaling: { rope_type: "yarn", factor: 2.0, attention_factor: 1.5, beta_fast: 16.0 } }),
        { type: "yarn", factor: 2, originalContext: 4096, betaFast: 16, betaSlow: 1, attention: 1.5, truncate: true })
      // types not applied, and default
      for (const t of ["dynamic", "llama3", "default"]) assert.isNull(ropeScalingOf({ max_position_embeddings: 4096, rope_scaling: { rope_type: t, factor: 2.0 } }))
    }))

  it.effect("DeepSeek-V3 as published (yarn, factor 40, mscale = mscale_all_dim = 1): attention factor 1, scores × (0.1·ln 40 + 1)²", () =>
    Effect.gen(function*() {
      const v3 = yield* load({
        model_type: "deepseek_v3", hidden_size: 64, intermediate_size: 96, moe_intermediate_size: 16, num_hidden_layers: 1, num_attention_heads: 4,
        n_routed_experts: 4, num_experts_per_tok: 2, n_group: 1, topk_group: 1, kv_lora_rank: 16, q_lora_rank: 24, qk_nope_head_dim: 8,
        qk_rope_head_dim: 4, v_head_dim: 8, vocab_size: 64, max_position_embeddings: 163840,
        rope_scaling: { beta_fast: 32, beta_slow: 1, factor: 40, mscale: 1.0, mscale_all_dim: 1.0, original_max_position_embeddings: 4096, type: "yarn" }
      })
      const s = v3.analysis.specs.get("layers/0/mixer/attn") as { ropeScaling: Record<string, unknown>; scoreScale: number }
      assert.deepStrictEqual(s.ropeScaling, { type: "yarn", factor: 40, originalContext: 4096, betaFast: 32, betaSlow: 1, attention: 1, truncate: true })
      assert.closeTo(s.scoreScale, 1.8738542070926265, 1e-15)
    }))

  it.effect("a malformed rope_scaling is refused naming the field", () =>
    Effect.gen(function*() {
      const e = yield* Effect.flip(load({ ...llama, rope_scaling: { rope_type: "linear", factor: 0.5 } }))
      assert.include(e.message, "rope_scaling")
    }))
})

describe("rotary tables", () => {
  it("rows of tables kept per backend equal the angles computed on the device bit for bit (cpu, wasm), past a table's end too", async () => {
    const { ropeTablesFor } = await import("../src/blocks/ops.ts")
    const { load: loadBackend } = await import("../src/runtime/Backend.ts")
    for (const backend of ["cpu", "wasm"] as const) {
      const { tf } = await Effect.runPromise(loadBackend(backend))
      const f = ropeFrequencies(16, 10000, { type: "yarn", factor: 4, originalContext: 64, betaFast: 32, betaSlow: 1, attention: 1.2, truncate: true })
      for (const [inverse, attention] of [[f.inverse, 1], [f.inverse, f.attention]] as const) {
        // a pass at positions up to 200, then one past the table's 256 rows (a decode step)
        for (const positions of [Int32Array.from({ length: 201 }, (_, i) => 200 - i), Int32Array.from([3, 700, 0, 511])]) {
          const ids = tf.tensor1d(positions, "int32")
          const ctx = { tf, stream: { positions }, positionIds: () => ids, memo: <T>(_: string, make: () => T) => make() }
          const got = ropeTablesFor(ctx as never, inverse, attention)
          const angles = tf.mul(tf.reshape(tf.cast(ids, "float32"), [-1, 1, 1]), tf.tensor3d(Float32Array.from(inverse), [1, 1, 8]))
          const want = { cos: tf.mul(tf.cos(angles), attention), sin: tf.mul(tf.sin(angles), attention) }
          assert.deepStrictEqual(got.cos.shape, [positions.length, 1, 8])
          assert.deepStrictEqual([...got.cos.dataSync()], [...want.cos.dataSync()], `${backend} cos, attention ${attention}`)
          assert.deepStrictEqual([...got.sin.dataSync()], [...want.sin.dataSync()], `${backend} sin, attention ${attention}`)
        }
      }
    }
  })
})
