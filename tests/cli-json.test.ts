/**
 * `--format json` on train, report, generate and export: one JSON document on stdout, with the numbers the
 * table view shows (run in-process, tests/support/cli-in-process.ts).
 */
import { assert, describe, it } from "@effect/vitest"
import * as fs from "node:fs"
import * as os from "node:os"
import * as path from "node:path"
import { runInProcess } from "./support/cli-in-process.ts"
import { root } from "./support/models.ts"

const dir = fs.mkdtempSync(path.join(os.tmpdir(), "cmoe-json-"))
const model = { kind: "conceptmoe", name: "json-tiny", baseline: { kind: "moe", vocab: 256, hidden: 16, layers: 3, heads: 2, experts: 2, topK: 1, expertHidden: 16, tiedEmbeddings: true, contextLength: 32 }, ratio: 2, encoderLayers: 1, decoderLayers: 1, topK: 2 }
const config = path.join(dir, "train.json")
fs.writeFileSync(config, JSON.stringify({ model, seqLen: 16, batchSize: 2, steps: 4, logEvery: 2, evalEvery: 2, evalBatches: 1, checkpointEvery: 4 }))
const out = path.join(dir, "run")

describe("train --format json", () => {
  it("one document: final validation, tokens/s, the last step, every evaluation, compression, files; no progress lines", async () => {
    const r = await runInProcess(["train", "--config", config, "--out", out, "--backend", "cpu", "--format", "json"])
    assert.strictEqual(r.code, 0, r.err)
    const j = JSON.parse(r.out)
    const lines = fs.readFileSync(path.join(out, "metrics.jsonl"), "utf8").trim().split("\n").map((l) => JSON.parse(l))
    assert.strictEqual(lines.length, 4)
    assert.strictEqual(j.model, "json-tiny")
    assert.strictEqual(j.out, out)
    assert.strictEqual(j.steps, 4)
    assert.deepStrictEqual(j.last, lines[3])
    assert.strictEqual(j.finalValBitsPerByte, lines[3].valBitsPerByte)
    assert.deepStrictEqual(j.evaluations.map((e: { step: number }) => e.step), [1, 3])
    assert.strictEqual(j.evaluations[0].valBitsPerByte, lines[1].valBitsPerByte)
    assert.strictEqual(j.evaluations[1].valCompression, lines[3].valCompression)
    assert.isAbove(j.tokensPerSecond, 0)
    assert.isAbove(j.compression.meanSampledR, 1)
    for (const f of j.files) assert.isTrue(fs.existsSync(f), f)
    // the table view of the same run prints progress lines and the final line instead
    const t = await runInProcess(["train", "--config", config, "--out", path.join(dir, "table"), "--backend", "cpu"])
    assert.strictEqual(t.code, 0, t.err)
    assert.match(t.out, /step +2\/4 +loss/)
    assert.match(t.out, new RegExp(`final validation ${j.finalValBitsPerByte.toFixed(4)} bits/byte`))
    assert.throws(() => JSON.parse(t.out))
  }, 120_000)
})

describe("generate --format json", () => {
  it("the prompt, the text and the figures of stderr's line; reproducible by seed", async () => {
    if (!fs.existsSync(path.join(out, "checkpoint.safetensors"))) {
      assert.strictEqual((await runInProcess(["train", "--config", config, "--out", out, "--backend", "cpu", "--format", "json"])).code, 0)
    }
    const g = (seed: string, ...more: Array<string>) =>
      runInProcess(["generate", "--checkpoint", out, "--prompt", "The Union ", "--max-tokens", "8", "--seed", seed, "--backend", "cpu", "--format", "json", ...more])
    const a = await g("3")
    assert.strictEqual(a.code, 0, a.err)
    assert.strictEqual(a.err, "")
    const j = JSON.parse(a.out)
    assert.strictEqual(j.model, "json-tiny")
    assert.strictEqual(j.step, 4)
    assert.strictEqual(j.prompt, "The Union ")
    assert.isAtMost([...j.text].length, 8)
    assert.strictEqual(j.promptTokens, 10)
    assert.strictEqual(j.generatedTokens, 8)
    assert.strictEqual(j.stop, "max-tokens")
    assert.deepStrictEqual(j.settings, { maxTokens: 8, temperature: 0.8, topK: 40, seed: 3 })
    assert.closeTo(j.decodeTokensPerSecond, 8 / j.decodeSeconds, 1e-9)
    assert.isAbove(j.promptCompression, 1)
    assert.isAbove(j.cacheBytes, 0)
    assert.strictEqual(JSON.parse((await g("3")).out).text, j.text)
    // at the context (32 tokens): a 30-byte prompt leaves room for 3
    const long = JSON.parse((await runInProcess(["generate", "--checkpoint", out, "--prompt", "x".repeat(30), "--max-tokens", "10", "--backend", "cpu", "--format", "json"])).out)
    assert.strictEqual(long.generatedTokens, 3)
    assert.strictEqual(long.stop, "context")
  }, 120_000)
})

describe("export --format json", () => {
  it("the model, the step (null for a config), the tensors written and every file of the directory", async () => {
    const dest = path.join(dir, "export")
    const r = await runInProcess(["export", path.join(root, "examples/moe-small.json"), "--to", "pytorch", "--out", dest, "--format", "json"])
    assert.strictEqual(r.code, 0, r.err)
    const j = JSON.parse(r.out)
    assert.strictEqual(j.model, "moe-small")
    assert.isNull(j.step)
    assert.strictEqual(j.out, dest)
    const graph = JSON.parse(fs.readFileSync(path.join(dest, "graph.json"), "utf8"))
    assert.strictEqual(j.tensors, graph.params.filter((p: { file: string | null }) => p.file !== null).length)
    assert.strictEqual(j.names, graph.names)
    assert.deepStrictEqual(j.files, fs.readdirSync(dest).sort().map((f) => path.join(dest, f)))
    assert.includeMembers(j.files, ["graph.json", "model.safetensors", "train.py"].map((f) => path.join(dest, f)))
  }, 60_000)
})

describe("report --format json", () => {
  it("each strategy and ratio: the candidate's name as the table prints it, its params, FLOPs and residuals; a miss with its reason and nearest", async () => {
    const base = path.join(root, "examples/moe-base.json")
    const args = [base, "--ratio", "2,64", "--strategy", "topk", "--seq-len", "1024"]
    const r = await runInProcess(["report", ...args, "--out", path.join(dir, "report-json"), "--format", "json"])
    assert.strictEqual(r.code, 0, r.err)
    const j = JSON.parse(r.out)
    const t = await runInProcess(["report", ...args, "--out", path.join(dir, "report-table")])
    assert.strictEqual(t.code, 0, t.err)
    assert.include(t.out, `topk R=2: ${j.found[0].candidate}`)
    assert.include(t.out, "topk R=64: no match")
    const budget = JSON.parse((await runInProcess(["budget", base, "--format", "json"])).out)
    assert.strictEqual(j.params, budget.params.total)
    assert.strictEqual(j.flopsPerToken, budget.flops.matmulPerToken)
    const [found, miss] = j.found
    assert.strictEqual(found.spec.ratio, 2)
    assert.isAtMost(Math.abs(found.residual.params), 0.01)
    assert.isAtMost(Math.abs(found.residual.flops), 0.01)
    assert.closeTo(found.residualAll.params, (found.params - j.params) / j.params, 1e-12)
    assert.isNull(miss.candidate)
    assert.isString(miss.reason)
    assert.isString(miss.nearest.name)
    for (const f of j.files) assert.isTrue(fs.existsSync(f), f)
  }, 60_000)
})
