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
