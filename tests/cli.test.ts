/**
 * The `conceptmoe` command as a user runs it (the `bin` entry of package.json).
 */
import { assert, describe, it } from "@effect/vitest"
import { spawnSync } from "node:child_process"
import * as fs from "node:fs"
import * as os from "node:os"
import * as path from "node:path"
import { root } from "./support/models.ts"

const bin = path.join(root, JSON.parse(fs.readFileSync(path.join(root, "package.json"), "utf8")).bin.conceptmoe)

const run = (...args: Array<string>) => {
  const r = spawnSync(process.execPath, [bin, ...args], { cwd: root, encoding: "utf8" })
  return { code: r.status, out: r.stdout, err: r.stderr }
}

describe("conceptmoe budget", () => {
  it("--format json prints one object with the documented fields", () => {
    const r = run("budget", "examples/hf/gpt2.json", "--seq-len", "1024", "--format", "json")
    assert.strictEqual(r.code, 0, r.err)
    const j = JSON.parse(r.out)
    assert.strictEqual(j.params.total, 124_439_808)
    assert.strictEqual(j.params.activated, 124_439_808)
    assert.strictEqual(j.params.embedding, 50257 * 768 + 1024 * 768)
    assert.strictEqual(j.params.lmHead, 50257 * 768)
    assert.strictEqual(j.flops.matmulPerToken, (291_648_307_200 - 38_654_705_664) / 1024)
    assert.strictEqual(j.flops.attentionMap, 38_654_705_664)
    assert.strictEqual(j.flops.forward, 291_648_307_200)
    assert.strictEqual(j.kvCache.bytesPerToken, 12 * 2 * 768 * 2)
    assert.strictEqual(j.conventions.flopsPerMultiplyAdd, 2)
  })

  it("the table view has aligned columns and thousands separators", () => {
    const r = run("budget", "examples/hf/mixtral-8x7b.json", "--seq-len", "4096")
    assert.strictEqual(r.code, 0, r.err)
    assert.match(r.out, /total\s+46,702,792,704/)
    assert.match(r.out, /activated \(both embeddings\)\s+12,879,925,248/)
    assert.match(r.out, /experts\s+45,097,156,608\s+11,274,289,152/)
  })

  it("DeepSeek-V3 (671B) is costed from its config", () => {
    const r = run("budget", "examples/hf/deepseek-v3.json", "--format", "json")
    assert.strictEqual(r.code, 0, r.err)
    assert.strictEqual(JSON.parse(r.out).params.total, 671_026_404_352)
  })

  it("--against prints both budgets and fails when they do not match", () => {
    const ok = run("budget", "examples/moe-small.json", "--against", "examples/moe-small.json")
    assert.strictEqual(ok.code, 0, ok.err)
    assert.include(ok.out, "matched within ±1%")
    const tmp = fs.mkdtempSync(path.join(os.tmpdir(), "conceptmoe-cli-"))
    const other = path.join(tmp, "top4.json")
    fs.writeFileSync(other, JSON.stringify({ ...JSON.parse(fs.readFileSync(path.join(root, "examples/moe-small.json"), "utf8")), topK: 4, name: "top4" }))
    const bad = run("budget", "examples/moe-small.json", "--against", other)
    assert.strictEqual(bad.code, 1)
    assert.match(bad.out, /FLOPs\/token\s+experts/)
    assert.include(bad.err, "error: budgets do not match")
  })

  const errors: ReadonlyArray<readonly [string, string, RegExp]> = [
    ["missing file", "no/such.json", /^error: no\/such\.json: no such file\n$/],
    ["unknown model_type", JSON.stringify({ model_type: "bert" }), /model_type: unsupported model_type "bert"/],
    ["bad field", JSON.stringify({ model_type: "gpt2", n_layer: -2 }), /n_layer: Expected a value greater than 0/],
    ["bad divisibility", JSON.stringify({ model_type: "gpt2", n_embd: 100, n_head: 12 }), /n_head: n_embd \(100\) is not divisible by n_head \(12\)/],
    ["bad JSON", "{", /not valid JSON/]
  ]
  for (const [name, content, expected] of errors) {
    it(`bad input, ${name}: exit 1 with one clear message and no stack trace`, () => {
      let file = content
      if (content.startsWith("{")) {
        file = path.join(fs.mkdtempSync(path.join(os.tmpdir(), "conceptmoe-cli-")), "config.json")
        fs.writeFileSync(file, content)
      }
      const r = run("budget", file)
      assert.strictEqual(r.code, 1)
      assert.match(r.err, expected)
      assert.notMatch(r.err, /\n\s+at /)
      assert.strictEqual(r.err.trim().split("\n").length, 1)
    })
  }
})

describe("conceptmoe budget on a ConceptMoE config", () => {
  it("its JSON gains a per-stage breakdown", () => {
    const r = run("budget", "examples/conceptmoe-base-top.json", "--seq-len", "4096", "--format", "json")
    assert.strictEqual(r.code, 0, r.err)
    const j = JSON.parse(r.out)
    assert.deepStrictEqual(Object.keys(j.stages), ["embedding", "encoder", "chunk", "conceptModel", "dechunk", "decoder", "head"])
    // the concept model sees 2048 positions: a quarter of the encoder's map per layer, 8 layers vs 4
    assert.strictEqual(j.stages.conceptModel.attentionMap * 2, j.stages.encoder.attentionMap)
    assert.strictEqual(j.stages.chunk.params, 2 * 256 * 256)
  })

  it("--against with the paper's excluded parts matches the baseline", () => {
    const r = run("budget", "examples/moe-base.json", "--against", "examples/conceptmoe-base-top.json", "--exclude-parts", "chunk,jointDecoding")
    assert.strictEqual(r.code, 0, r.err)
    assert.include(r.out, "matched within ±1%")
  })
})

describe("conceptmoe reallocate", () => {
  it("--format json lists candidates with config, params, FLOPs, relative errors and per-stage figures", () => {
    const r = run("reallocate", "examples/latency/baseline-attn8.json", "--ratio", "2", "--strategy", "topk", "--seq-len", "32768", "--format", "json")
    assert.strictEqual(r.code, 0, r.err)
    const [c] = JSON.parse(r.out)
    assert.strictEqual(c.name, "1L-top24-R2")
    assert.strictEqual(c.config.kind, "conceptmoe")
    assert.strictEqual(c.config.topK, 24)
    assert.strictEqual(c.params.total > 0 && c.flops.matmulPerToken > 0, true)
    assert.isBelow(Math.abs(c.relative.flops), 0.01)
    assert.strictEqual(c.conceptModelReduction.attentionMap, 4)
    assert.strictEqual(c.conceptModelReduction.kvCache, 2)
    assert.includeMembers(Object.keys(c.stages.baseline), ["encoder", "conceptModel", "decoder"])
  })

  it("a candidate's config reads back with conceptmoe budget", () => {
    const r = run("reallocate", "examples/moe-base.json", "--ratio", "2", "--strategy", "loop", "--limit", "1", "--format", "json")
    assert.strictEqual(r.code, 0, r.err)
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), "conceptmoe-cli-"))
    const file = path.join(dir, "c.json")
    fs.writeFileSync(file, JSON.stringify(JSON.parse(r.out)[0].config))
    const b = run("budget", file, "--format", "json")
    assert.strictEqual(b.code, 0, b.err)
    assert.strictEqual(JSON.parse(b.out).params.total, JSON.parse(r.out)[0].params.total)
  })

  it("bad input: R ≤ 1 (a usage error, exit 2) and a depth that leaves no concept model (exit 1) fail with one line", () => {
    const low = run("reallocate", "examples/moe-base.json", "--ratio", "1", "--strategy", "topk")
    assert.strictEqual(low.code, 2)
    assert.match(low.err, /^error: Invalid value for flag --ratio: "1"\. Expected: a number above 1 and at most 16,777,216 \(see conceptmoe reallocate --help\)\n$/)
    const deep = run("reallocate", "examples/moe-base.json", "--ratio", "2", "--strategy", "topk", "--encoder-layers", "9", "--decoder-layers", "9")
    assert.strictEqual(deep.code, 1)
    assert.include(deep.err, "at most 15 in total")
  })
})

describe("conceptmoe report", () => {
  it("writes SVG plots, a Markdown summary and the candidates", () => {
    const out = path.join(fs.mkdtempSync(path.join(os.tmpdir(), "conceptmoe-report-")), "r")
    const r = run("report", "examples/moe-base.json", "--ratio", "2", "--strategy", "topk,loop", "--out", out)
    assert.strictEqual(r.code, 0, r.err)
    assert.sameMembers(fs.readdirSync(out), ["attention-map.svg", "kv-cache.svg", "flops-breakdown.svg", "summary.md", "candidates.json"])
    for (const svg of ["attention-map.svg", "kv-cache.svg", "flops-breakdown.svg"]) {
      const text = fs.readFileSync(path.join(out, svg), "utf8")
      assert.match(text, /^<svg /)
      assert.include(text, "baseline (moe-base)")
    }
    const md = fs.readFileSync(path.join(out, "summary.md"), "utf8")
    assert.include(md, "| topk | 2 | 1L-top22-R2 |")
    assert.include(md, "| loop | 2 | 2L-top8-R2 |")
    assert.strictEqual(JSON.parse(fs.readFileSync(path.join(out, "candidates.json"), "utf8")).length, 2)
  })

  it("a field the solver refuses is led by the flag that sets it (report, compare), or by the baseline's file", () => {
    const out = path.join(fs.mkdtempSync(path.join(os.tmpdir(), "conceptmoe-report-")), "r")
    const ratio = run("report", "examples/moe-base.json", "--ratio", "2,5000", "--strategy", "topk", "--seq-len", "1024", "--out", out)
    assert.strictEqual(ratio.code, 1)
    assert.strictEqual(ratio.err, "error: --ratio: R=5000 leaves less than one concept in a sequence of 1024 tokens; at most 1024\n")
    // moe-tiny has 6 layers: the default split (4 + 4) leaves no concept model
    const split = /^error: --encoder-layers, --decoder-layers: encoderLayers \(4\) \+ decoderLayers \(4\) must leave at least one concept-model layer of the baseline's 6; at most 5 in total\n$/
    for (const command of ["report", "compare"]) {
      const r = run(command, "examples/compare/moe-tiny.json", "--ratio", "2", "--strategy", "topk", "--out", out)
      assert.strictEqual(r.code, 1, command)
      assert.match(r.err, split, command)
    }
    assert.strictEqual(run("report", "examples/compare/moe-tiny.json", "--ratio", "2", "--strategy", "topk", "--encoder-layers", "1", "--decoder-layers", "1", "--out", out).code, 0)
    // no flag sets joint decoding: the baseline's file leads
    const mla = run("reallocate", "examples/hf/deepseek-v3.json", "--ratio", "2", "--strategy", "topk")
    assert.strictEqual(mla.code, 1)
    assert.match(mla.err, /^error: examples\/hf\/deepseek-v3\.json: joint decoding is defined for multi-head/)
  }, 60_000)
})

describe("conceptmoe train and verify: bad input", () => {
  it("a training config with bad settings names each field; an unknown backend is refused", () => {
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), "conceptmoe-cli-"))
    const file = path.join(dir, "train.json")
    fs.writeFileSync(file, JSON.stringify({ model: path.join(root, "examples/compare/moe-tiny.json"), steps: -1, expertCapacity: 0, optimizer: { lr: "x" } }))
    const r = run("train", "--config", file)
    assert.strictEqual(r.code, 1)
    assert.include(r.err, "steps: Expected a value greater than 0")
    assert.include(r.err, "expertCapacity: Expected a value greater than 0")
    assert.include(r.err, "optimizer.lr: Expected number")
    const b = run("verify", "examples/moe-small.json", "--backend", "tpu")
    assert.strictEqual(b.code, 1)
    assert.strictEqual(b.err, `error: --backend: unknown backend "tpu"; expected one of wasm, cpu, webgpu, tensorflow\n`)
  })
})

describe("--blocks on the commands that run a model", () => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), "conceptmoe-blocks-"))
  const config = path.join(dir, "train.json")
  fs.writeFileSync(config, JSON.stringify({ model: path.join(root, "examples/extending/factorized-graph.json"), seqLen: 16, batchSize: 2, steps: 2, evalEvery: 2, evalBatches: 1, checkpointEvery: 2 }))

  it("train and verify run the extension example's kind; a kind without apply is one line naming it, exit 1", () => {
    const t = run("train", "--config", config, "--out", path.join(dir, "run"), "--backend", "cpu", "--blocks", "examples/extending/FactorizedMLP.ts", "--format", "json")
    assert.strictEqual(t.code, 0, t.err)
    assert.strictEqual(JSON.parse(t.out).steps, 2)
    const v = run("verify", "examples/extending/factorized-graph.json", "--backend", "cpu", "--seq-len", "16", "--batch", "1", "--blocks", "examples/extending/FactorizedMLP.ts", "--format", "json")
    assert.strictEqual(v.code, 0, v.err)
    const report = JSON.parse(v.out)
    assert.strictEqual(report.params.runtime, report.params.static)
    assert.strictEqual(report.flops.executed, report.flops.staticAtMeasured)
    // without --blocks the kind is unknown (exit 1); without apply it is costed but not run
    assert.match(run("verify", "examples/extending/factorized-graph.json", "--backend", "cpu").err, /^error: .*unknown block kind "factorized-mlp"/)
    const costOnly = ["--blocks", "tests/fixtures/cost-only-block.ts"]
    assert.strictEqual(run("budget", "examples/extending/factorized-graph.json", ...costOnly).code, 0)
    for (const r of [
      run("train", "--config", config, "--out", path.join(dir, "refused"), "--backend", "cpu", ...costOnly),
      run("verify", "examples/extending/factorized-graph.json", "--backend", "cpu", ...costOnly)
    ]) {
      assert.strictEqual(r.code, 1)
      assert.strictEqual(r.err, `error: block kind "factorized-mlp" at ffn/mlp has no tensor implementation (apply)\n`)
    }
    // the refused train left no run directory behind
    assert.isFalse(fs.existsSync(path.join(dir, "refused")))
  }, 120_000)
})

describe("conceptmoe generate", () => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), "cmoe-gen-"))
  const model = { kind: "conceptmoe", baseline: { kind: "moe", vocab: 256, hidden: 32, layers: 4, heads: 2, experts: 4, topK: 1, expertHidden: 16, tiedEmbeddings: true, contextLength: 48 }, ratio: 2, encoderLayers: 1, decoderLayers: 1, topK: 2 }
  const config = path.join(dir, "train.json")
  fs.writeFileSync(config, JSON.stringify({ model, seqLen: 32, batchSize: 2, steps: 3, evalEvery: 3, evalBatches: 1, checkpointEvery: 3 }))
  const out = path.join(dir, "run")
  let trained: { code: number | null; err: string } | undefined
  const train = () => (trained ??= run("train", "--config", config, "--out", out, "--backend", "cpu"))

  it("streams text from a trained checkpoint, reports tokens/s and the prompt's compression, and is reproducible by seed", () => {
    const t = train()
    assert.strictEqual(t.code, 0, t.err)
    const g = (seed: string) => run("generate", "--checkpoint", out, "--prompt", "The Union ", "--max-tokens", "12", "--seed", seed, "--backend", "cpu")
    const a = g("3")
    assert.strictEqual(a.code, 0, a.err)
    // the prompt, then 12 generated bytes (as text: at most 12 characters)
    assert.isTrue(a.out.startsWith("The Union "))
    assert.isAtMost([...a.out.slice("The Union ".length, -1)].length, 12)
    assert.match(a.err, /prefill 10 tokens in \d+ ms \([\d,]+ tokens\/s\); decode 12 tokens/)
    assert.match(a.err, /compression on the prompt R = \d+\.\d\d/)
    assert.strictEqual(g("3").out, a.out)
    // generation stops at the model's context (48): a 40-byte prompt leaves room for 9 tokens
    const long = run("generate", "--checkpoint", out, "--prompt", "x".repeat(40), "--max-tokens", "30", "--backend", "cpu")
    assert.strictEqual(long.code, 0, long.err)
    assert.match(long.err, /decode 9 tokens.*stopped at the model's context length/)
  }, 120_000)

  it("bad input: empty prompt, a prompt past the context, a checkpoint of another model, no checkpoint", () => {
    assert.strictEqual(train().code, 0)
    const cases: ReadonlyArray<readonly [ReadonlyArray<string>, RegExp]> = [
      [["--checkpoint", out, "--prompt", ""], /--prompt is empty/],
      [["--checkpoint", out, "--prompt", "y".repeat(60)], /--prompt has 60 tokens; .* context is 48/],
      [["--checkpoint", out, "--prompt", "hi", "--config", "examples/compare/moe-tiny.json"], /checkpoint\.safetensors: param\/embed\/weight has shape \[256,32\], the model.s is \[256,64\]/],
      [["--checkpoint", path.join(dir, "none"), "--prompt", "hi"], /none: no such checkpoint file or run directory/],
      [["--checkpoint", out, "--prompt", "hi", "--temperature", "-1"], /^error: Invalid value for flag --temperature: "-1"\. Expected: a number from 0 to 1,000/]
    ]
    for (const [args, expected] of cases) {
      const r = run("generate", ...args, "--backend", "cpu")
      assert.strictEqual(r.code, args.includes("--temperature") ? 2 : 1, args.join(" "))
      assert.match(r.err, expected)
      assert.notMatch(r.err, /\n\s+at /)
    }
  }, 60_000)
})
