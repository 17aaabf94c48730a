/**
 * Reading configs: formats, defaults and every kind of bad input, each a typed ConfigError that
 * names the file and the field.
 */
import { NodeServices } from "@effect/platform-node"
import { assert, describe, it } from "@effect/vitest"
import { Effect } from "effect"
import * as fs from "node:fs"
import * as os from "node:os"
import * as path from "node:path"
import { loadModel } from "../src/models/Load.ts"
import { budgetReport } from "../src/cost/Report.ts"
import { load } from "./support/models.ts"

const tmp = fs.mkdtempSync(path.join(os.tmpdir(), "conceptmoe-config-"))
const write = (name: string, text: string) => {
  const p = path.join(tmp, name)
  fs.writeFileSync(p, text)
  return p
}

const loadErr = (file: string) => Effect.flip(loadModel(file)).pipe(Effect.provide(NodeServices.layer))

describe("files", () => {
  it.effect("a missing file", () =>
    Effect.gen(function*() {
      const e = yield* loadErr(path.join(tmp, "nope.json"))
      assert.strictEqual(e.reason, "missing")
      assert.strictEqual(e.message, `${path.join(tmp, "nope.json")}: no such file`)
    }))

  it.effect("unreadable JSON", () =>
    Effect.gen(function*() {
      const f = write("broken.json", `{"model_type": "llama",`)
      const e = yield* loadErr(f)
      assert.strictEqual(e.reason, "json")
      assert.include(e.message, `${f}: not valid JSON`)
    }))

  it.effect("a directory is unreadable, not missing", () =>
    Effect.gen(function*() {
      const e = yield* loadErr(tmp)
      assert.strictEqual(e.reason, "unreadable")
    }))

  it.effect("a real file loads", () =>
    Effect.gen(function*() {
      const f = write("ok.json", JSON.stringify({ kind: "dense", vocab: 50, hidden: 16, layers: 2, heads: 2, ffnHidden: 32 }))
      const m = yield* loadModel(f).pipe(Effect.provide(NodeServices.layer))
      assert.strictEqual(m.format, "conceptmoe/dense")
      assert.strictEqual(m.name, "ok")
    }))
})

describe("Hugging Face configs", () => {
  const bad = (json: unknown) => Effect.flip(load(json, "config.json"))

  it.effect("an unknown model_type lists the supported ones", () =>
    Effect.gen(function*() {
      const e = yield* bad({ model_type: "bert" })
      assert.strictEqual(e.reason, "unsupported")
      assert.include(e.message, `config.json: model_type: unsupported model_type "bert"; expected one of gpt2, llama`)
    }))

  it.effect("ill-typed and non-positive fields, all reported with their paths", () =>
    Effect.gen(function*() {
      const e = yield* bad({ model_type: "llama", hidden_size: "4096", num_hidden_layers: 0, mlp_only_layers: [1] })
      assert.strictEqual(e.reason, "invalid")
      assert.deepStrictEqual(e.problems.map((p) => p.field), ["hidden_size", "num_hidden_layers"])
    }))

  it.effect("heads that do not divide the hidden size", () =>
    Effect.gen(function*() {
      const e = yield* bad({ model_type: "mistral", hidden_size: 100, num_attention_heads: 3 })
      assert.strictEqual(e.message, "config.json: num_attention_heads: hidden_size (100) is not divisible by num_attention_heads (3) and no head_dim is given")
    }))

  it.effect("GQA heads that do not group", () =>
    Effect.gen(function*() {
      const e = yield* bad({ model_type: "llama", num_attention_heads: 32, num_key_value_heads: 5 })
      assert.include(e.message, "num_key_value_heads: num_attention_heads (32) is not a multiple of num_key_value_heads (5)")
    }))

  it.effect("top-k above the expert count", () =>
    Effect.gen(function*() {
      const e = yield* bad({ model_type: "mixtral", num_local_experts: 4, num_experts_per_tok: 6 })
      assert.include(e.message, "num_experts_per_tok: num_experts_per_tok (6) exceeds num_local_experts (4)")
      const d = yield* bad({ model_type: "deepseek_v3", n_routed_experts: 8, num_experts_per_tok: 9 })
      assert.include(d.message, "num_experts_per_tok (9) exceeds n_routed_experts (8)")
    }))

  it.effect("transformers' defaults fill absent keys (a bare llama config is Llama-7B)", () =>
    Effect.gen(function*() {
      const m = yield* load({ model_type: "llama" })
      assert.strictEqual(budgetReport(m, { seqLen: 1 }).params.total, 6_738_415_616)
    }))

  it.effect("Qwen2-MoE: mlp_only_layers and decoder_sparse_step choose dense layers", () =>
    Effect.gen(function*() {
      const cfg = {
        model_type: "qwen2_moe",
        hidden_size: 64,
        intermediate_size: 128,
        moe_intermediate_size: 32,
        shared_expert_intermediate_size: 48,
        num_hidden_layers: 4,
        num_attention_heads: 4,
        num_experts: 8,
        num_experts_per_tok: 2,
        vocab_size: 100
      }
      const all = yield* load(cfg)
      const kinds = (m: typeof all) => m.analysis.rows.filter((r) => /^layers\/\d+\/ffn\/(mlp|moe)$/.test(r.path)).map((r) => r.kind)
      assert.deepStrictEqual(kinds(all), ["moe", "moe", "moe", "moe"])
      assert.deepStrictEqual(kinds(yield* load({ ...cfg, decoder_sparse_step: 2 })), ["mlp", "moe", "mlp", "moe"])
      assert.deepStrictEqual(kinds(yield* load({ ...cfg, mlp_only_layers: [0, 3] })), ["mlp", "moe", "moe", "mlp"])
    }))
})

describe("conceptmoe configs", () => {
  it.effect("defaults, and a kind that does not exist", () =>
    Effect.gen(function*() {
      const m = yield* load({ kind: "moe", vocab: 10, hidden: 8, layers: 1, heads: 2, experts: 2, topK: 1, expertHidden: 4 })
      assert.strictEqual(m.contextLength, 2048)
      const e = yield* Effect.flip(load({ kind: "mamba" }, "m.json"))
      assert.include(e.message, `m.json: kind: unsupported kind "mamba"; expected one of dense, moe`)
    }))

  it.effect("cross-field checks name the field", () =>
    Effect.gen(function*() {
      const base = { kind: "moe", vocab: 10, hidden: 8, layers: 2, heads: 2, experts: 2, topK: 1, expertHidden: 4 }
      assert.include((yield* Effect.flip(load({ ...base, denseLayers: 1 }))).message, "denseHidden: is required when denseLayers (1) > 0")
      assert.include((yield* Effect.flip(load({ ...base, denseLayers: 3, denseHidden: 8 }))).message, "denseLayers: denseLayers (3) exceeds layers (2)")
      assert.include((yield* Effect.flip(load({ ...base, kvHeads: 3 }))).message, "kvHeads: heads (2) is not a multiple of kvHeads (3)")
    }))

  it.effect("a file with neither key says what it expected", () =>
    Effect.gen(function*() {
      const e = yield* Effect.flip(load({ hidden: 8 }, "what.json"))
      assert.include(e.message, `what.json: cannot tell the config format: expected a key "model_type" (Hugging Face config.json) or "kind" (conceptmoe config)`)
      const arr = yield* Effect.flip(load([1, 2], "arr.json"))
      assert.strictEqual(arr.message, "arr.json: expected a JSON object")
    }))
})
