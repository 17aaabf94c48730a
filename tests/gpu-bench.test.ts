/**
 * The GPU benchmark's plumbing, which runs where no GPU is (a device session has one try at it):
 * bench/gpu/ratio.ts on fixture lines, and bench/gpu/run.sh's phases (usage, and no phase leaving
 * more files in $OUT than the device tool brings back).
 */
import { assert, describe, it } from "@effect/vitest"
import { spawnSync } from "node:child_process"
import * as fs from "node:fs"
import * as os from "node:os"
import * as path from "node:path"

const root = path.join(import.meta.dirname, "..")
const ratio = (...args: Array<string>) => spawnSync(process.execPath, [path.join(root, "bench/gpu/ratio.ts"), ...args], { encoding: "utf8" })

const fixtures = () => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), "gpu-bench-"))
  const write = (name: string, lines: ReadonlyArray<unknown>) => {
    const file = path.join(dir, name)
    // Dawn's warnings and other non-JSON lines are skipped
    fs.writeFileSync(file, ["Warning: not JSON", ...lines.map((l) => JSON.stringify(l))].join("\n"))
    return file
  }
  return {
    ours: write("ours.jsonl", [
      { backend: "webgpu" },
      { model: "dense-4L-d512", mode: "tfjs", params: 100, flopsPerStep: 3.3e11, stepMsMedian: 300, firstLoss: 5.6 },
      { model: "dense-4L-d512", mode: "replay", params: 100, flopsPerStep: 3.3e11, stepMsMedian: 16.5, issueMsMedian: 0.8, gpuStepMs: 15.9, firstLoss: 5.6 },
      { model: "moe-tiny", label: "one-submit", mode: "replay", params: 7, flopsPerStep: 1e9, stepMsMedian: 9, firstLoss: 5.61 },
      { model: "conceptmoe-1L-top7-R2", mode: "tfjs", error: "GPU device error: Invalid ComputePipeline" }
    ]),
    torch: write("torch.jsonl", [
      { model: "dense-4L-d512", params: 100, stepMsMedian: 11, firstLoss: 5.5 },
      { model: "moe-tiny", params: 8, stepMsMedian: 6, firstLoss: 5.6 }
    ]),
    matmulOurs: write("matmul-ours.jsonl", [
      { kernel: "tfjs", n: 4096, kernelGflops: 23000 },
      { kernel: "64x64x16/4x4", n: 4096, kernelGflops: 30000 },
      { kernel: "128x128x8/8x8/v4", n: 4096, kernelGflops: 45000 },
      { kernel: "128x128x8/8x8/v4", n: 1024, kernelGflops: null, wallGflops: 9000 },
      // refused by the device, or computing something else: timed as fast, and not a result
      { kernel: "64x64x16/4x4", n: 1024, kernelGflops: 900000, maxRelDiff: 0, error: "Invalid ShaderModule" },
      { kernel: "32x32x32/4x4", n: 1024, kernelGflops: 800000, maxRelDiff: 0.5 },
      { kernel: "128x128x16/8x8/v4", n: 1024, kernelGflops: 700000, maxRelDiff: null }
    ]),
    matmulTorch: write("matmul-torch.jsonl", [{ n: 4096, torchGflops: 50000 }, { n: 1024, torchGflops: 36000 }])
  }
}

describe("bench/gpu/ratio.ts", () => {
  it("steps: our time over PyTorch's, both sides' TFLOP/s on the model's FLOPs, labels and parameter checks kept", () => {
    const f = fixtures()
    const r = ratio(f.ours, f.torch)
    assert.strictEqual(r.status, 0, r.stderr)
    const rows = JSON.parse(r.stdout) as Array<Record<string, unknown>>
    assert.strictEqual(rows.length, 4)
    assert.deepStrictEqual(rows[1], {
      model: "dense-4L-d512", mode: "replay", oursMs: 16.5, issueMs: 0.8, gpuStepMs: 15.9, torchMs: 11, ratio: 1.5,
      oursTflops: 20, torchTflops: 30, paramsEqual: true, firstLoss: [5.6, 5.5]
    })
    assert.strictEqual(rows[0]!["ratio"], 27.27)
    assert.strictEqual(rows[2]!["label"], "one-submit")
    assert.strictEqual(rows[2]!["paramsEqual"], false)
    // a model whose step failed keeps its error, with no ratio
    assert.strictEqual(rows[3]!["error"], "GPU device error: Invalid ComputePipeline")
    assert.isNull(rows[3]!["ratio"])
    const brief = ratio("--brief", f.ours, f.torch).stdout.trim().split("\n")
    assert.deepStrictEqual(brief[2]!.trim().split(/\s+/), ["dense-4L-d512", "-", "replay", "16.5", "0.8", "15.9", "11", "1.5", "20", "30"])
    assert.strictEqual(brief.at(-1), "conceptmoe-1L-top7-R2 tfjs: GPU device error: Invalid ComputePipeline")
  })

  it("matmul: our GFLOP/s (kernel time, else wall time) as a fraction of PyTorch's; --brief keeps the best of ours per size", () => {
    const f = fixtures()
    const full = JSON.parse(ratio(f.matmulOurs, f.matmulTorch).stdout) as Array<Record<string, unknown>>
    assert.deepStrictEqual(full.map((m) => m["ofTorch"]), [0.46, 0.6, 0.9, 0.25, 25, 22.22, 19.44])
    assert.deepStrictEqual(full.map((m) => m["invalid"]), [undefined, undefined, undefined, undefined, "Invalid ShaderModule", "maxRelDiff 0.5", "maxRelDiff null"])
    const brief = ratio("--brief", f.matmulOurs, f.matmulTorch)
    assert.strictEqual(brief.status, 0, brief.stderr)
    const lines = brief.stdout.trim().split("\n").map((l) => l.trim().split(/\s+/))
    assert.deepStrictEqual(lines[0], ["n", "tfjs", "GFLOP/s", "best", "of", "ours", "kernel", "PyTorch", "best/PyTorch"])
    assert.deepStrictEqual(lines[1], ["4096", "23000", "45000", "128x128x8/8x8/v4", "50000", "0.9"])
    assert.deepStrictEqual(lines[2], ["1024", "-", "9000", "128x128x8/8x8/v4", "36000", "0.25"])
    assert.deepStrictEqual(lines.slice(3).map((l) => l.join(" ")), [
      "64x64x16/4x4 at 1024: Invalid ShaderModule (left out)",
      "32x32x32/4x4 at 1024: maxRelDiff 0.5 (left out)",
      "128x128x16/8x8/v4 at 1024: maxRelDiff null (left out)"
    ])
  })

  it("without two files: usage, exit 2", () => {
    const r = ratio("--brief")
    assert.strictEqual(r.status, 2)
    assert.match(r.stderr, /usage: node bench\/gpu\/ratio\.ts/)
  })
})

describe("bench/gpu/run.sh", () => {
  const script = fs.readFileSync(path.join(root, "bench/gpu/run.sh"), "utf8")
  /** The files a phase's function writes under $out. */
  const outputs = (phase: string) => {
    const body = new RegExp(`^${phase}\\(\\) \\{\\n([\\s\\S]*?)^\\}`, "m").exec(script)?.[1]
    assert.isDefined(body, `run.sh has no function ${phase}`)
    const names = new Set([...body!.matchAll(/"\$out\/([^"]+)"/g)].map((m) => m[1]!))
    // the phase's log, written by the dispatch at the end
    for (const m of script.matchAll(new RegExp(`^  ${phase}\\) .*"\\$out\\/([^"]+)"`, "gm"))) names.add(m[1]!)
    // files that the scripts it runs with OUT=$out write themselves
    for (const m of body!.matchAll(/OUT=\$out [^\n]*?(bench\/gpu\/[\w-]+\.ts)/g)) {
      const source = fs.readFileSync(path.join(root, m[1]!), "utf8")
      for (const w of source.matchAll(/process\.env\["OUT"\][^\n]*?"([\w.-]+\.(?:json|jsonl|txt|svg))"/g)) names.add(w[1]!)
    }
    return names
  }

  it("each phase leaves at most 8 files in $OUT (what the device tool brings back)", () => {
    for (const phase of ["core", "extra"]) {
      const files = outputs(phase)
      if (phase === "core") assert.isTrue(files.has("smoke.json"), "smoke.ts's file is counted")
      assert.isAtLeast(files.size, 5, phase)
      assert.isAtMost(files.size, 8, `${phase}: ${[...files].join(", ")}`)
      assert.isTrue([...files].some((f) => f.startsWith("log-")), `${phase} keeps its log`)
    }
  })

  it("an unknown phase is refused before anything runs", () => {
    // stand-ins for what the script would run first, should the check ever move below them
    const bin = fs.mkdtempSync(path.join(os.tmpdir(), "gpu-bench-bin-"))
    for (const tool of ["dpkg", "ldconfig", "xz", "tar", "nvidia-smi"]) {
      fs.writeFileSync(path.join(bin, tool), `#!/bin/sh\necho "${tool} ran" >&2\nexit 1\n`, { mode: 0o755 })
    }
    const env = { ...process.env, OUT: fs.mkdtempSync(path.join(os.tmpdir(), "gpu-bench-out-")), PATH: `${bin}:${process.env["PATH"] ?? ""}` }
    const r = spawnSync("bash", [path.join(root, "bench/gpu/run.sh"), "everything"], { encoding: "utf8", cwd: root, env })
    assert.notMatch(r.stderr, / ran/)
    assert.strictEqual(r.status, 2)
    assert.match(r.stderr, /usage: bash bench\/gpu\/run\.sh \[core\|extra\|all\]/)
  })
})
