/**
 * Exact test vectors (totals, FLOP conventions, attention-map and KV-cache figures): measured with
 * torch 2.11 FlopCounterMode and transformers 5.17, and published totals.
 */
import { assert, describe, it } from "@effect/vitest"
import { Effect } from "effect"
import * as Cost from "../src/cost/Cost.ts"
import { budgetReport } from "../src/cost/Report.ts"
import { load, loadFile } from "./support/models.ts"

const forwardWithRotary = (c: Cost.Cost, T: number) =>
  T * Cost.matmulPerToken(c) + Cost.attentionMapFlops(c, T) + Cost.rotaryTableFlops(c, T)

describe("GPT-2 small (HF gpt2 config)", () => {
  it.effect("params 124,439,808 and forward FLOPs 291,648,307,200 at T=1024, split as FlopCounterMode", () =>
    Effect.gen(function*() {
      const m = yield* loadFile("examples/hf/gpt2.json")
      const r = budgetReport(m, { seqLen: 1024 })
      assert.strictEqual(r.params.total, 124_439_808)
      assert.strictEqual(r.flops.forward, 291_648_307_200)
      // addmm (q/k/v/o/fc/proj), SDPA, LM-head mm
      assert.strictEqual(1024 * (r.flops.byPart["attention"]! + r.flops.byPart["mlp"]!), 173_946_175_488)
      assert.strictEqual(r.flops.attentionMap, 38_654_705_664)
      assert.strictEqual(1024 * r.flops.byPart["lmHead"]!, 79_047_426_048)
      assert.isTrue(r.params.lmHeadTied)
      // no rotary in GPT-2
      assert.strictEqual(r.flops.excluded.rotaryTable, 0)
    }))
})

describe("reduced MoE configs (T=1024, forward incl. the rotary table)", () => {
  it.effect("Mixtral-shaped: 176,664,215,552", () =>
    Effect.gen(function*() {
      const m = yield* load({
        model_type: "mixtral",
        hidden_size: 1024,
        intermediate_size: 3584,
        num_hidden_layers: 2,
        num_local_experts: 8,
        num_experts_per_tok: 2,
        num_attention_heads: 8,
        num_key_value_heads: 2,
        vocab_size: 32000
      })
      assert.strictEqual(forwardWithRotary(m.analysis.cost, 1024), 176_664_215_552)
    }))

  it.effect("Qwen3-MoE-shaped: 357,421,875,200", () =>
    Effect.gen(function*() {
      const m = yield* load({
        model_type: "qwen3_moe",
        hidden_size: 1024,
        moe_intermediate_size: 384,
        num_hidden_layers: 2,
        num_experts: 32,
        num_experts_per_tok: 4,
        num_attention_heads: 16,
        num_key_value_heads: 4,
        head_dim: 64,
        vocab_size: 151936
      })
      assert.strictEqual(forwardWithRotary(m.analysis.cost, 1024), 357_421_875_200)
    }))

  it.effect("DeepSeek-V3-shaped: 120,561,106,944", () =>
    Effect.gen(function*() {
      const m = yield* load({
        model_type: "deepseek_v3",
        hidden_size: 1024,
        intermediate_size: 4096,
        moe_intermediate_size: 512,
        num_hidden_layers: 2,
        first_k_dense_replace: 1,
        n_routed_experts: 16,
        n_shared_experts: 1,
        num_experts_per_tok: 4,
        num_attention_heads: 8,
        q_lora_rank: 384,
        kv_lora_rank: 128,
        qk_nope_head_dim: 64,
        qk_rope_head_dim: 32,
        v_head_dim: 64,
        vocab_size: 32000
      })
      assert.strictEqual(forwardWithRotary(m.analysis.cost, 1024), 120_561_106_944)
    }))
})

// sum(p.numel()) of transformers models built from the published configs (tied weights once).
const totals: ReadonlyArray<readonly [string, number]> = [
  ["gpt2.json", 124_439_808],
  ["llama-3-8b.json", 8_030_261_248],
  ["mistral-7b.json", 7_241_732_096],
  ["mixtral-8x7b.json", 46_702_792_704],
  ["qwen1.5-moe-a2.7b.json", 14_315_784_192],
  ["qwen3-30b-a3b.json", 30_532_122_624],
  ["deepseek-v2-lite.json", 15_706_484_224],
  ["deepseek-v3.json", 671_026_404_352],
  ["olmoe-1b-7b.json", 6_919_161_856]
]

describe("Hugging Face configs: total params to the unit", () => {
  for (const [file, total] of totals) {
    it.effect(`${file}: ${total.toLocaleString("en-US")}`, () =>
      Effect.gen(function*() {
        const m = yield* loadFile(`examples/hf/${file}`)
        assert.strictEqual(budgetReport(m, { seqLen: 1 }).params.total, total)
      }))
  }
})

const billions = (n: number) => Math.round(n / 1e7) / 100

describe("activated params in each vendor convention (§6)", () => {
  it.effect("Mixtral-8x7B counts both embeddings: 12,879,925,248", () =>
    Effect.gen(function*() {
      const m = yield* loadFile("examples/hf/mixtral-8x7b.json")
      assert.strictEqual(budgetReport(m, { seqLen: 1 }).params.activated, 12_879_925_248)
    }))

  const cases: ReadonlyArray<readonly [string, number, number?, number?]> = [
    ["qwen1.5-moe-a2.7b.json", 2.69],
    ["qwen3-30b-a3b.json", 3.35],
    ["olmoe-1b-7b.json", 1.28],
    ["deepseek-v2-lite.json", 2.66, 2.45, 2.24],
    ["deepseek-v3.json", 37.55, 36.63, 35.7]
  ]
  for (const [file, both, noInput, neither] of cases) {
    it.effect(`${file}: ${both}B / ${noInput ?? "-"}B / ${neither ?? "-"}B`, () =>
      Effect.gen(function*() {
        const p = budgetReport(yield* loadFile(`examples/hf/${file}`), { seqLen: 1 }).params
        assert.strictEqual(billions(p.activated), both)
        if (noInput !== undefined) assert.strictEqual(billions(p.activatedExclInputEmbedding), noInput)
        if (neither !== undefined) assert.strictEqual(billions(p.activatedNonEmbedding), neither)
      }))
  }
})

// §7: GFLOP per token, training (fwd+bwd), one model counted five ways.
const table7: ReadonlyArray<readonly [string, number, ReadonlyArray<number>]> = [
  //                               6·N_total 6·N_active Kaplan  PaLM    Megatron
  ["gpt2.json", 1024, [0.747, 0.747, 0.567, 0.854, 0.798]],
  ["llama-3-8b.json", 8192, [48.18, 48.18, 48.32, 57.91, 51.47]],
  ["mixtral-8x7b.json", 4096, [280.22, 77.28, 78.93, 82.93, 79.71]],
  ["qwen3-30b-a3b.json", 4096, [183.19, 20.12, 21.22, 27.91, 23.01]],
  ["deepseek-v3.json", 4096, [4026.16, 225.31, 251.04, 281.15, 249.81]]
]

describe("§7: the same config under other tools' conventions (flops.otherConventions)", () => {
  for (const [file, T, expected] of table7) {
    it.effect(`${file} at T=${T}: ${expected.join(" / ")} GFLOP/token`, () =>
      Effect.gen(function*() {
        const r = budgetReport(yield* loadFile(`examples/hf/${file}`), { seqLen: T })
        const o = r.flops.otherConventions
        const digits = expected[0]! < 1 ? 1000 : 100
        const round = (x: number) => Math.round((x / 1e9) * digits) / digits
        assert.deepStrictEqual(
          [o.sixNTotalPerToken, o.sixNActivePerToken, o.kaplanTrainingPerToken, o.palmTrainingPerToken, o.megatronTrainingPerToken].map(round),
          expected
        )
        // PaLM's count is ours: 3 × (forward / T)
        assert.strictEqual(o.palmTrainingPerToken, r.flops.trainingPerToken)
      }))
  }

  it.effect("FlopCounterMode's forward is ours plus the rotary table (GPT-2 has none)", () =>
    Effect.gen(function*() {
      const r = budgetReport(yield* loadFile("examples/hf/gpt2.json"), { seqLen: 1024 })
      assert.strictEqual(r.flops.otherConventions.flopCounterModeForward, 291_648_307_200)
    }))

  it.effect("6·N_active for DeepSeek-V3 is 225.31 GFLOP (§7)", () =>
    Effect.gen(function*() {
      const r = budgetReport(yield* loadFile("examples/hf/deepseek-v3.json"), { seqLen: 4096 })
      assert.strictEqual(Math.round((6 * r.params.activated) / 1e7) / 100, 225.31)
    }))
})
