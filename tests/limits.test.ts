/**
 * Issue 20, config and command-line side: each test fails on the code before the fix.
 * - item 4: layer counts are bounded before anything is built; no spread of a config-sized list;
 * - item 5: config strings never reach Object.prototype;
 * - item 6: a deeply nested graph is refused, not a stack overflow;
 * - item 11 (config side): context lengths are bounded; `--seq-len` above the context is refused;
 * - item 13: numeric flags are range-checked (exit 2, naming the flag);
 * - exact totals past 2^53;
 * - defects the fuzz suite (tests/fuzz.test.ts) found; the solver's limit on work; models too
 *   large to hold, refused before allocation.
 */
import { NodeServices } from "@effect/platform-node"
import { assert, describe, it } from "@effect/vitest"
import { Effect, Result } from "effect"
import * as fs from "node:fs"
import * as os from "node:os"
import * as path from "node:path"
import * as Cost from "../src/cost/Cost.ts"
import { budgetReport, stringifyExact } from "../src/cost/Report.ts"
import { analyzeResult } from "../src/graph/Analyze.ts"
import { make } from "../src/graph/Block.ts"
import { Sequence } from "../src/graph/Combinators.ts"
import { limits } from "../src/graph/Limits.ts"
import { linear } from "../src/blocks/Linear.ts"
import { conceptLayout, ConceptSpec } from "../src/models/ConceptMoE.ts"
import type { DecoderConfig } from "../src/models/Decoder.ts"
import { readJson } from "../src/models/Load.ts"
import { reallocate } from "../src/models/Reallocate.ts"
import { fitsInMemory } from "../src/runtime/Memory.ts"
import { decode, read as readCheckpoint } from "../src/train/Checkpoint.ts"
import { Schema } from "effect"
import { runInProcess } from "./support/cli-in-process.ts"
import { load, loadFile, root } from "./support/models.ts"

const refused = (json: unknown) => Effect.flip(load(json))

/** Every problem's field and message, one per line. */
const lines = (e: { readonly problems: ReadonlyArray<{ readonly field: string; readonly message: string }> }) =>
  e.problems.map((p) => `${p.field}: ${p.message}`).join("\n")

describe("item 4: layer counts", () => {
  for (const [json, field] of [
    [{ model_type: "llama", num_hidden_layers: 1e12 }, "num_hidden_layers"],
    [{ model_type: "llama", num_hidden_layers: 1e7 }, "num_hidden_layers"],
    [{ model_type: "gpt2", n_layer: 100_000 }, "n_layer"],
    [{ kind: "moe", vocab: 8, hidden: 8, layers: 16_385, heads: 2, experts: 2, topK: 1, expertHidden: 8 }, "layers"]
  ] as const) {
    it.effect(`${field} = ${Object.values(json).find((v) => typeof v === "number" && v > 1000)} is refused, naming the field and the limit`, () =>
      Effect.gen(function*() {
        const e = yield* refused(json)
        assert.strictEqual(e.reason, "invalid")
        assert.include(lines(e), `${field}: Expected at most 16,384 (the limit on layers)`)
      }))
  }

  it.effect("the limit itself is accepted, and every layer is counted", () =>
    Effect.gen(function*() {
      const m = yield* load({ model_type: "llama", num_hidden_layers: limits.layers, hidden_size: 8, intermediate_size: 8, num_attention_heads: 2, vocab_size: 8 })
      const perLayer = 4 * 8 * 8 + 3 * 8 * 8 + 2 * 8
      assert.strictEqual(budgetReport(m, { seqLen: 1 }).params.total, limits.layers * perLayer + 8 * 8 + 8 + 8 * 8)
    }), 60_000)

  it("a ConceptMoE layout over a 500,000-layer baseline (built in code) does not spread the layers into arguments", () => {
    const layer = { mixer: { kind: "attention", spec: { heads: 2, kvHeads: 2, headDim: 4 } }, ffn: { kind: "moe", spec: { experts: 4, topK: 1, expertHidden: 8 } } } as const
    const base: DecoderConfig = {
      name: "long",
      vocab: 8,
      d: 8,
      positions: null,
      norm: { kind: "rms", eps: 1e-6 },
      layers: Array.from({ length: 500_000 }, () => layer),
      tiedEmbeddings: false,
      contextLength: 64
    }
    const spec = Schema.decodeUnknownSync(ConceptSpec)({ ratio: 2, topK: 4 })
    const layout = conceptLayout(base, spec)
    assert.isTrue(Result.isSuccess(layout))
    const bad = conceptLayout(base, Schema.decodeUnknownSync(ConceptSpec)({ ratio: 2, topK: 5 }))
    assert.isTrue(Result.isFailure(bad) && bad.failure.message.includes("exceeds the concept model's 4 experts"))
  })

  it("Cost.sum of 200,000 layer costs keeps every attention term and adds every part", () => {
    const one = Cost.make({ params: { attention: 3 }, flops: { attention: 5 }, attention: [{ path: "a", heads: 1, dQK: 1, dV: 1, window: null, ropeDim: 0, passes: 1, rate: 1 }] })
    const s = Cost.sum(Array.from({ length: 200_000 }, () => one))
    assert.strictEqual(s.attention.length, 200_000)
    assert.strictEqual(s.params["attention"], 600_000)
    assert.strictEqual(s.flops["attention"], 1_000_000)
  })
})

describe("item 5: config strings are never looked up on Object.prototype", () => {
  for (const t of ["__proto__", "constructor", "toString", "hasOwnProperty"]) {
    it.effect(`model_type ${JSON.stringify(t)} is an unsupported model_type`, () =>
      Effect.gen(function*() {
        const e = yield* Effect.flip(load(JSON.parse(`{"model_type": ${JSON.stringify(t)}}`)))
        assert.strictEqual(e.reason, "unsupported")
        assert.include(e.message, `model_type: unsupported model_type "${t}"; expected one of gpt2, llama`)
      }))
  }

  it.effect("kind \"constructor\" and a graph block \"constructor\" are refused by name", () =>
    Effect.gen(function*() {
      assert.include((yield* refused({ kind: "constructor" })).message, `unsupported kind "constructor"`)
      const e = yield* refused({ kind: "graph", graph: { block: "constructor" } })
      assert.include(e.message, `graph.block: unknown block kind "constructor"`)
    }))

  it.effect("parts named \"__proto__\" and \"constructor\" are counted like any other part", () =>
    Effect.gen(function*() {
      const m = yield* load({
        kind: "graph",
        graph: {
          block: "sequence",
          children: [
            { block: "embedding", spec: { vocab: 10, d: 8 } },
            { block: "linear", spec: { dIn: 8, dOut: 8, part: "__proto__" } },
            { block: "linear", spec: { dIn: 8, dOut: 8, part: "constructor" } }
          ]
        }
      })
      const r = budgetReport(m, { seqLen: 4 })
      assert.deepStrictEqual(Object.entries(r.params.byPart), [["embedding", 80], ["__proto__", 64], ["constructor", 64]])
      assert.strictEqual(r.params.total, 208)
      assert.strictEqual(r.flops.matmulPerToken, 2 * 64 + 2 * 64)
    }))
})

describe("item 6: nesting depth", () => {
  const nested = (depth: number): unknown => {
    let node: unknown = { block: "linear", spec: { dIn: 8, dOut: 8 } }
    for (let i = 0; i < depth; i++) node = { block: "sequence", children: [node] }
    return node
  }

  it.effect("a graph config nested 2,000 deep is refused with the depth limit", () =>
    Effect.gen(function*() {
      const e = yield* refused({ kind: "graph", graph: { block: "sequence", children: [{ block: "embedding", spec: { vocab: 8, d: 8 } }, nested(2000)] } })
      assert.strictEqual(e.reason, "invalid")
      assert.include(e.message, "the graph nests deeper than 256 levels (the limit on graph depth)")
    }))

  it("a graph built in code 20,000 deep fails analysis with InvalidGraph, not a stack overflow", () => {
    let block = linear({ dIn: 8, dOut: 8 })
    for (let i = 0; i < 20_000; i++) block = make(Sequence, {}, { children: [block] })
    const r = analyzeResult(block)
    assert.isTrue(Result.isFailure(r))
    if (Result.isFailure(r)) assert.include(r.failure.message, "nests deeper than 256 levels")
  })
})

describe("item 11, config side: context lengths", () => {
  for (const [json, field] of [
    [{ model_type: "llama", max_position_embeddings: 2 ** 40 }, "max_position_embeddings"],
    [{ model_type: "gpt2", n_positions: 1e9 }, "n_positions"],
    [{ kind: "dense", vocab: 8, hidden: 8, layers: 1, heads: 2, ffnHidden: 8, contextLength: 2 ** 25 }, "contextLength"]
  ] as const) {
    it.effect(`${field} above 2^24 is refused, naming the field`, () =>
      Effect.gen(function*() {
        assert.include(lines(yield* refused(json)), `${field}: Expected at most 16,777,216 (the limit on seqLen)`)
      }))
  }

  it("budget --seq-len above the model's context is a usage error naming both", async () => {
    const r = await runInProcess(["budget", "examples/compare/moe-tiny.json", "--seq-len", "4096"])
    assert.strictEqual(r.code, 2)
    assert.strictEqual(r.err, "error: --seq-len 4096 exceeds the context length of moe-tiny (128 tokens)")
  })
})

describe("item 13: numeric flags", () => {
  const cases: ReadonlyArray<readonly [ReadonlyArray<string>, string]> = [
    [["--kv-bytes", "-2"], `Invalid value for flag --kv-bytes: "-2". Expected: an integer from 1 to 64`],
    [["--kv-bytes", "2.5"], `Invalid value for flag --kv-bytes: "2.5". Expected an integer`],
    [["--tolerance", "-1"], `Invalid value for flag --tolerance: "-1". Expected: a number from 0 to 1`],
    [["--tolerance", "NaN"], `Invalid value for flag --tolerance: "NaN". Expected a string representing a finite number`],
    [["--seq-len", "0"], `Invalid value for flag --seq-len: "0". Expected: an integer from 1 to 16,777,216`],
    [["--depth", "-1"], `Invalid value for flag --depth: "-1". Expected: an integer from 0 to 256`]
  ]
  for (const [flags, expected] of cases) {
    it(`budget ${flags.join(" ")}: exit 2, one line naming the flag`, async () => {
      const r = await runInProcess(["budget", "examples/moe-small.json", ...flags])
      assert.strictEqual(r.code, 2)
      assert.strictEqual(r.err, `error: ${expected} (see conceptmoe budget --help)`)
      assert.strictEqual(r.out, "")
    })
  }

  it("reallocate --ratio 1, --encoder-layers -1 and --limit 0 are usage errors", async () => {
    for (const [flag, value] of [["--ratio", "1"], ["--encoder-layers", "-1"], ["--limit", "0"]] as const) {
      const args = ["reallocate", "examples/moe-base.json", "--strategy", "topk", ...(flag === "--ratio" ? [] : ["--ratio", "2"]), flag, value]
      const r = await runInProcess(args)
      assert.strictEqual(r.code, 2, args.join(" "))
      assert.include(r.err, `Invalid value for flag ${flag}: "${value}"`)
    }
  })

  it("usage errors print one line, never the help; --help prints the help", async () => {
    for (const args of [["budget"], ["budget", "x.json", "--bogus"], ["frob"], []]) {
      const r = await runInProcess(args)
      assert.strictEqual(r.code, 2, args.join(" "))
      assert.strictEqual(r.out, "")
      assert.strictEqual(r.err.split("\n").length, 1)
      assert.match(r.err, /^error: .* \(see conceptmoe( budget)? --help\)$/)
    }
    const help = await runInProcess(["budget", "--help"])
    assert.strictEqual(help.code, 0)
    assert.include(help.out, "--kv-bytes")
  })
})

describe("exact totals past 2^53", () => {
  it.effect("DeepSeek-V3 at its 163,840-token context: training FLOPs exact as a bigint, and digit for digit in JSON", () =>
    Effect.gen(function*() {
      const m = yield* loadFile("examples/hf/deepseek-v3.json")
      const T = 163_840
      const r = budgetReport(m, { seqLen: T })
      // 61 MLA layers, 128 heads, dQK = 192, dV = 128, full T×T map, 2 FLOPs per multiply-add
      const map = 61n * 2n * 128n * (192n + 128n) * BigInt(T) * BigInt(T)
      const training = 3n * (BigInt(T) * BigInt(r.flops.matmulPerToken) + map)
      assert.strictEqual(r.flops.attentionMap, map)
      assert.strictEqual(r.flops.training, training)
      assert.strictEqual(training, 438_424_699_593_031_680n)
      // a double would have printed 438424699593031700
      assert.include(stringifyExact(r, 2), `"training": 438424699593031680,`)
      assert.isTrue(Number.isSafeInteger(r.params.total) && Number.isSafeInteger(r.flops.matmulPerToken))
    }))

  it("budget --format json prints the exact integer", async () => {
    const r = await runInProcess(["budget", "examples/hf/deepseek-v3.json", "--format", "json"])
    assert.strictEqual(r.code, 0, r.err)
    assert.include(r.out, `"training": 438424699593031680,`)
    assert.include(r.out, `"attentionMap": 134140418588672000,`)
  })

  it.effect("a model whose parameter count passes 2^53 − 1 is refused, not rounded", () =>
    Effect.gen(function*() {
      const e = yield* refused({ model_type: "mixtral", num_hidden_layers: 1000, hidden_size: 65536, num_local_experts: 4096, intermediate_size: 65536, num_attention_heads: 16, vocab_size: 100 })
      assert.include(e.message, "total parameters is 5.279e+16, above 2^53 − 1 (9,007,199,254,740,991), beyond which counts are not exact")
    }))

  it("exact arithmetic: products and sums of integers stay exact past 2^53; fractions fall back to doubles", () => {
    assert.strictEqual(Cost.product(2 ** 40, 2 ** 20, 3), 3n * 2n ** 60n)
    assert.strictEqual(Cost.product(2 ** 20, 3), 3 * 2 ** 20)
    assert.strictEqual(Cost.sumExact([Number.MAX_SAFE_INTEGER, 2]), 2n ** 53n + 1n)
    assert.strictEqual(Cost.product(1.5, 2), 3)
    assert.strictEqual(stringifyExact({ a: 2n ** 64n, b: "x" }), `{"a":18446744073709551616,"b":"x"}`)
  })
})

describe("found by the fuzz suite (tests/fuzz.test.ts)", () => {
  it.effect("the solver's expert lever on experts 1,000,000 wide tries 256 sizes, not 125,000 (which ran out of memory)", () =>
    Effect.gen(function*() {
      const m = yield* load({ kind: "moe", vocab: 15, hidden: 32, layers: 5, heads: 4, experts: 4, topK: 3, expertHidden: 1_000_000, contextLength: 256 })
      const e = yield* Effect.flip(reallocate(m.decoder!, m.analysis, { ratio: 2, strategy: "topk", encoderLayers: 1, decoderLayers: 1, limit: 3 }))
      assert.strictEqual(e._tag, "NoReallocation")
      // the nearest miss narrows the experts to a multiple of the step, 8 × ⌈1,000,000 / 8 / 256⌉ = 3,912
      const h = Number(/-h(\d+)-/.exec(e._tag === "NoReallocation" ? e.nearest?.name ?? "" : "")?.[1])
      assert.strictEqual(h % 3912, 0)
      assert.isBelow(h, 1_000_000)
    }), 60_000)

  it.effect("reading a directory, a path through a file or an empty path keeps the OS reason or says the path is empty", () =>
    Effect.gen(function*() {
      const dir = fs.mkdtempSync(path.join(os.tmpdir(), "conceptmoe-limits-"))
      fs.writeFileSync(path.join(dir, "file"), "x")
      assert.strictEqual((yield* Effect.flip(readJson(dir))).message, `${dir}: cannot read: EISDIR: illegal operation on a directory`)
      assert.strictEqual((yield* Effect.flip(readJson(""))).message, `"": the path is empty; expected a JSON config file`)
      const ck = yield* Effect.flip(readCheckpoint(path.join(dir, "file", "checkpoint.safetensors")))
      assert.strictEqual(ck.message, "cannot read: ENOTDIR: not a directory")
    }).pipe(Effect.provide(NodeServices.layer)))

  it.effect("a safetensors header length of 2^62 is refused and printed exactly", () =>
    Effect.gen(function*() {
      const bytes = Buffer.alloc(10)
      bytes.writeBigUInt64LE(2n ** 62n)
      const e = yield* Effect.flip(decode(bytes, "x.safetensors"))
      assert.strictEqual(e.message, "header length 4611686018427387904 exceeds the file (10 bytes)")
    }))

  it("reallocate names the flags behind a layer split the baseline cannot take", async () => {
    const r = await runInProcess(["reallocate", "examples/compare/moe-tiny.json", "--ratio", "2", "--strategy", "topk"])
    assert.strictEqual(r.code, 1)
    assert.strictEqual(r.err, "error: --encoder-layers, --decoder-layers: encoderLayers (4) + decoderLayers (4) must leave at least one concept-model layer of the baseline's 6; at most 5 in total")
  })

  it.effect("an odd head size under rotary positions names the config's fields, not the graph's rope.dim", () =>
    Effect.gen(function*() {
      const llama = { model_type: "llama", vocab_size: 8, hidden_size: 32, num_attention_heads: 32, num_hidden_layers: 1, intermediate_size: 8 }
      assert.strictEqual((yield* refused(llama)).message, "inline.json: num_attention_heads: hidden_size (32) / num_attention_heads (32) gives a head size of 1, which is odd; rotary positions need an even head size")
      assert.include((yield* refused({ ...llama, head_dim: 3 })).message, "head_dim: head_dim (3) is odd")
      const moe = { kind: "moe", vocab: 8, hidden: 12, layers: 1, heads: 4, experts: 2, topK: 1, expertHidden: 8 }
      assert.include((yield* refused(moe)).message, "heads: hidden (12) / heads (4) gives a head size of 3, which is odd")
      // learned positions rotate nothing: the same shape is accepted
      yield* load({ ...moe, positions: "learned" })
    }))

  it("an empty --checkpoint says the path is empty", async () => {
    const r = await runInProcess(["generate", "--checkpoint", "", "--prompt", "a"])
    assert.strictEqual(r.code, 1)
    assert.strictEqual(r.err, `error: "": the path is empty; expected a run directory or its checkpoint.safetensors`)
  })
})

describe("the solver's limit on work", () => {
  const deep = (layers: number) => load({ kind: "moe", vocab: 64, hidden: 32, layers, heads: 4, experts: 8, topK: 2, expertHidden: 32, contextLength: 256 })

  it.effect("a loop search over every depth of a 400-layer baseline (millions of layers to cost) is refused before it starts", () =>
    Effect.gen(function*() {
      const m = yield* deep(400)
      const e = yield* Effect.flip(reallocate(m.decoder!, m.analysis, { ratio: 2, strategy: "loop", encoderLayers: 1, decoderLayers: 1 }))
      assert.strictEqual(e._tag, "InvalidReallocation")
      if (e._tag === "InvalidReallocation") assert.strictEqual(e.field, "loopLayers")
      assert.strictEqual(
        e.message,
        "the loop search over this 400-layer baseline would build and cost more than 200,000 layers of candidate models (the solver's limit on work); fix the number of looped layers (loopLayers) or search a shallower baseline"
      )
    }))

  it.effect("a search that runs past the limit stops with the same error; under it, the same search succeeds", () =>
    Effect.gen(function*() {
      const m = yield* deep(6)
      const options = { ratio: 2, strategy: "loop", encoderLayers: 1, decoderLayers: 1, limit: 1 } as const
      // this search costs 16 models of 6 layers (96 layers in all)
      const e = yield* Effect.flip(reallocate(m.decoder!, m.analysis, { ...options, maxWork: 90 }))
      assert.include(e.message, "would build and cost more than 90 layers of candidate models")
      const ok = yield* reallocate(m.decoder!, m.analysis, { ...options, maxWork: 96 })
      assert.deepStrictEqual(ok.map((c) => c.name), ["2L-top2-R2"])
    }))

  it("reallocate on the command line names --loop-layers", async () => {
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), "conceptmoe-limits-"))
    const file = path.join(dir, "deep.json")
    fs.writeFileSync(file, JSON.stringify({ kind: "moe", vocab: 64, hidden: 32, layers: 400, heads: 4, experts: 8, topK: 2, expertHidden: 32, contextLength: 256 }))
    const r = await runInProcess(["reallocate", file, "--ratio", "2", "--strategy", "loop", "--encoder-layers", "1", "--decoder-layers", "1"])
    assert.strictEqual(r.code, 1)
    assert.match(r.err, /^error: --loop-layers: the loop search over this 400-layer baseline would build and cost more than 200,000 layers/)
  })
})

describe("models too large to hold are refused before their weights are allocated", () => {
  it("verify DeepSeek-V3 (671 billion parameters) on cpu: exit 1 naming the model, the memory needed and the memory there is", async () => {
    const r = await runInProcess(["verify", "examples/hf/deepseek-v3.json", "--backend", "cpu", "--seq-len", "8", "--batch", "1"])
    assert.strictEqual(r.code, 1)
    assert.match(r.err, /^error: examples\/hf\/deepseek-v3\.json: deepseek-v3 has 671,026,419,200 parameters, which need at least 2,499\.8 GiB to run \(float32 weights\); the cpu backend can use at most [0-9.,]+ GiB \(this machine's memory\)$/)
  })

  it("train DeepSeek-V3: refused before the run directory is created", async () => {
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), "conceptmoe-limits-"))
    const config = path.join(dir, "train.json")
    fs.writeFileSync(config, JSON.stringify({ model: path.join(root, "examples/hf/deepseek-v3.json"), seqLen: 16, batchSize: 1, steps: 1 }))
    const r = await runInProcess(["train", "--config", config, "--out", path.join(dir, "run"), "--backend", "cpu"])
    assert.strictEqual(r.code, 1)
    assert.include(r.err, "need at least 9,999.1 GiB to train (float32 weights, gradients and two AdamW moments)")
    assert.isFalse(fs.existsSync(path.join(dir, "run")))
  })

  it.effect("the wasm backend's limit is its 4 GiB heap: Llama-3-8B's weights (29.9 GiB) cannot run there", () =>
    Effect.gen(function*() {
      const m = yield* loadFile("examples/hf/llama-3-8b.json")
      const e = yield* Effect.flip(fitsInMemory(m, "wasm", "run"))
      assert.include(e.message, "need at least 29.9 GiB to run (float32 weights); the wasm backend can use at most 4 GiB")
      // the tiny MoE fits, to train too
      const tiny = yield* loadFile("examples/compare/moe-tiny.json")
      yield* fitsInMemory(tiny, "wasm", "train")
    }))
})
