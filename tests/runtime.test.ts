/**
 * The lowered runtime: parameters equal the static count, executed matmul FLOPs equal the static
 * cost (for ConceptMoE at the measured compression), and backends agree.
 */
import { assert, describe, it, layer } from "@effect/vitest"
import { ConfigProvider, Effect, Result } from "effect"
import * as fs from "node:fs"
import * as path from "node:path"
import { dawnFlags, Tensors, layer as backendLayer, load } from "../src/runtime/Backend.ts"
import * as Settings from "../src/internal/Settings.ts"
import { loss, materialize } from "../src/runtime/Lower.ts"
import { verify } from "../src/runtime/Verify.ts"
import { load as loadJson, loadFile, root } from "./support/models.ts"

const moe = { kind: "moe", vocab: 64, hidden: 32, layers: 6, heads: 4, kvHeads: 2, experts: 4, topK: 2, expertHidden: 16, tiedEmbeddings: true }

const configs: ReadonlyArray<readonly [string, Record<string, unknown>]> = [
  ["dense, learned positions, LayerNorm, GELU, biases (GPT-2-like)", { kind: "dense", vocab: 50, hidden: 24, layers: 2, heads: 3, ffnHidden: 40, norm: "layer", activation: "gelu_tanh", positions: "learned", attentionBias: true, tiedEmbeddings: true, contextLength: 32 }],
  ["MoE, GQA, RoPE, shared experts with a gate, QK norms, sliding window", { ...moe, sharedHidden: 24, sharedGate: true, qkNorm: "head", window: 7, denseLayers: 1, denseHidden: 48 }],
  ["MoE, sigmoid router, full QK norm", { ...moe, scoring: "sigmoid", qkNorm: "full" }],
  ["DeepSeek-shaped MLA", { model_type: "deepseek_v3", vocab_size: 64, hidden_size: 32, intermediate_size: 48, moe_intermediate_size: 16, num_hidden_layers: 2, first_k_dense_replace: 1, n_routed_experts: 4, n_shared_experts: 1, num_experts_per_tok: 2, num_attention_heads: 4, q_lora_rank: 12, kv_lora_rank: 8, qk_nope_head_dim: 8, qk_rope_head_dim: 4, v_head_dim: 8 }],
  ["ConceptMoE, sum merge, more experts", { kind: "conceptmoe", baseline: moe, ratio: 2, encoderLayers: 2, decoderLayers: 2, topK: 3 }],
  ["ConceptMoE, last-token merge, looped, wider", { kind: "conceptmoe", baseline: moe, ratio: 2, encoderLayers: 2, decoderLayers: 2, merge: "last", loopLayers: 1, hidden: 48, heads: 6, kvHeads: 3 }]
]

const batch = (rows: number, length: number, vocab: number, starts?: ReadonlySet<number>) => ({
  rows,
  length,
  ids: new Int32Array(rows * length).map((_, i) => (i * 7 + (i % 5) * 3) % vocab),
  targets: new Int32Array(rows * length).map((_, i) => (i * 11 + 1) % vocab),
  ...(starts === undefined ? {} : { documentStarts: starts })
})

layer(backendLayer("cpu"))("runtime on cpu", (it) => {
  for (const [name, cfg] of configs) {
    it.effect(`${name}: runtime params = static params; executed FLOPs = static FLOPs`, () =>
      Effect.gen(function*() {
        const { tf } = yield* Tensors
        const m = yield* loadJson(cfg)
        const low = materialize(tf, m.analysis, 7)
        const vocab = (cfg["vocab"] ?? cfg["vocab_size"]) as number
        const r = verify(low, batch(3, 20, vocab, new Set([27, 45])))
        assert.strictEqual(r.params.runtime, r.params.static)
        assert.strictEqual(r.flops.executed, r.flops.staticAtMeasured)
        // a sliding window is masked, not skipped: the kernels do the dense map
        assert.strictEqual(r.flops.attentionMapExecuted, r.flops.attentionMapDense)
        if (cfg["window"] === undefined) assert.strictEqual(r.flops.attentionMapDense, r.flops.attentionMapStatic)
        else assert.isBelow(r.flops.attentionMapStatic, r.flops.attentionMapDense)
        if (r.compression !== undefined) {
          assert.isAbove(r.compression.concepts, 0)
          assert.strictEqual(r.compression.actual, r.compression.tokens / r.compression.concepts)
        } else {
          assert.strictEqual(r.flops.executed, r.flops.static)
        }
        for (const v of low.variables.values()) v.dispose()
      }))
  }

  it.effect("every example config of a trainable kind allocates exactly its static parameter count", () =>
    Effect.gen(function*() {
      const { tf } = yield* Tensors
      const files = fs.readdirSync(path.join(root, "examples")).filter((f) => f.endsWith(".json"))
      assert.isAbove(files.length, 4)
      for (const f of files) {
        const m = yield* loadFile(`examples/${f}`)
        if (m.format === "conceptmoe/graph") continue
        const low = materialize(tf, m.analysis, 1)
        let n = 0
        for (const v of low.variables.values()) {
          n += v.size
          v.dispose()
        }
        assert.strictEqual(n, m.analysis.rows[0]!.params, f)
      }
    }), 120_000)

  it.effect("a kind without apply is refused at lowering with its path", () =>
    Effect.gen(function*() {
      const { tf } = yield* Tensors
      const { FactorizedMLP } = yield* Effect.promise(() => import("../examples/extending/FactorizedMLP.ts"))
      const { Analyze, Block, Load, Surgery } = yield* Effect.promise(() => import("conceptmoe"))
      // the extension example's kind under another name, without its apply (a cost-only kind)
      const { apply: _apply, ...rest } = FactorizedMLP
      const costOnly: typeof FactorizedMLP = { ...rest, name: "factorized-mlp-cost-only" }
      const file = path.join(root, "examples", "dense-small.json")
      const dense = yield* Load.modelFromJson(JSON.parse(fs.readFileSync(file, "utf8")), file)
      const graph = Surgery.replaceAt(dense.graph, "layers/*/ffn/mlp", () => Block.leaf(costOnly, { d: 128, hidden: 64, rank: 16 }))
      const analysis = yield* Analyze.analyze(graph, { input: "ids" })
      assert.throws(() => materialize(tf, analysis, 1), /block kind "factorized-mlp-cost-only" at layers\/0\/ffn\/mlp has no tensor implementation/)
      // with its apply, the same graph lowers
      const withApply = yield* Analyze.analyze(Surgery.replaceAt(dense.graph, "layers/*/ffn/mlp", () => Block.leaf(FactorizedMLP, { d: 128, hidden: 64, rank: 16 })), { input: "ids" })
      const low = materialize(tf, withApply, 1)
      assert.isTrue(low.variables.has("layers/0/ffn/mlp/gate.a") || [...low.variables.keys()].some((k) => k.includes("ffn/mlp") && k.endsWith("gate.a")), [...low.variables.keys()].join(" "))
    }))
})

describe("Dawn's flags", () => {
  it("turn timestamp quantization off unless DAWN_FLAGS names it, merging with the user's disabled toggles", () => {
    const off = "disable-dawn-features=timestamp_quantization"
    assert.deepStrictEqual(dawnFlags(undefined), [off])
    assert.deepStrictEqual(dawnFlags("  enable-dawn-features=disable_robustness,allow_unsafe_apis "), ["enable-dawn-features=disable_robustness,allow_unsafe_apis", off])
    assert.deepStrictEqual(dawnFlags("disable-dawn-features=lazy_clear_resource_on_first_use backend=vulkan"), [
      "disable-dawn-features=lazy_clear_resource_on_first_use,timestamp_quantization",
      "backend=vulkan"
    ])
    assert.deepStrictEqual(dawnFlags("enable-dawn-features=timestamp_quantization"), ["enable-dawn-features=timestamp_quantization"])
  })
})

describe("on/off settings", () => {
  it("read unset, on and off, and name the variable on anything else", () => {
    const name = "CONCEPTMOE_TEST_SWITCH"
    const read = (env: Record<string, string>) =>
      Effect.runSync(Effect.result(Settings.get(Settings.onOff(name, "")).pipe(Effect.provideService(ConfigProvider.ConfigProvider, ConfigProvider.fromEnv({ env })))))
    assert.deepStrictEqual(read({}), Result.succeed(true))
    assert.deepStrictEqual(read({ [name]: "on" }), Result.succeed(true))
    assert.deepStrictEqual(read({ [name]: "off" }), Result.succeed(false))
    const bad = read({ [name]: "0" })
    assert.isTrue(Result.isFailure(bad) && /CONCEPTMOE_TEST_SWITCH="0": expected on or off/.test(bad.failure.message), JSON.stringify(bad))
  })
})

describe("backends agree", () => {
  it("wasm and cpu give the same loss and gradients on a ConceptMoE", async () => {
    const results: Array<{ loss: number; grads: Record<string, Float32Array> }> = []
    for (const name of ["cpu", "wasm"] as const) {
      const rt = await Effect.runPromise(load(name))
      const m = await Effect.runPromise(loadJson(configs[4]![1]))
      const low = materialize(rt.tf, m.analysis, 3)
      const b = batch(2, 16, 64)
      const vars = [...low.variables.entries()].filter(([p]) => /chunk|attn\/qc|experts\.up|embed/.test(p))
      const { grads, value } = rt.tf.variableGrads(() => loss(low, b, { training: false, seed: 1 }).total, vars.map(([, v]) => v))
      const out: Record<string, Float32Array> = {}
      for (const [p, v] of vars) out[p] = grads[v.name]!.dataSync() as Float32Array
      results.push({ loss: value.dataSync()[0]!, grads: out })
    }
    const [c, w] = results as [typeof results[0], typeof results[0]]
    assert.closeTo(w.loss, c.loss, 1e-4)
    for (const p of Object.keys(c.grads)) {
      const a = c.grads[p]!
      const b = w.grads[p]!
      let max = 0
      let scale = 1e-6
      for (let i = 0; i < a.length; i++) {
        max = Math.max(max, Math.abs(a[i]! - b[i]!))
        scale = Math.max(scale, Math.abs(a[i]!))
      }
      assert.isBelow(max / scale, 1e-3, p)
    }
  }, 120_000)
})
