/**
 * Stopping on a signal (docs/reliability.md, "Training runs"): SIGTERM or SIGINT during `train`
 * or `compare` stops at the end of the current step, commits a final checkpoint and metrics, says
 * where the run stopped and how to continue, and exits with 143 or 130; the stopped run resumes
 * into exactly the uninterrupted one.
 */
import { NodeServices } from "@effect/platform-node"
import { assert, describe, it } from "@effect/vitest"
import { Effect, Layer } from "effect"
import { type ChildProcess, spawn } from "node:child_process"
import * as fs from "node:fs"
import * as os from "node:os"
import * as path from "node:path"
import { layer as backendLayer } from "../src/runtime/Backend.ts"
import { decode, decodeMetadata } from "../src/train/Checkpoint.ts"
import { train } from "../src/train/Train.ts"
import { load, root } from "./support/models.ts"
import { childData, childSettings, tinyModel } from "./support/train-child.ts"

const child = path.join(root, "tests", "support", "train-child.ts")
const cli = path.join(root, "bin", "conceptmoe.js")
const tmp = () => fs.mkdtempSync(path.join(os.tmpdir(), "conceptmoe-signal-"))

/** Starts a process; `signalAt(n, s)` sends signal `s` when its n-th `step` line is printed. */
const start = (args: ReadonlyArray<string>) => {
  const proc: ChildProcess = spawn(process.execPath, args, { cwd: root, stdio: ["ignore", "pipe", "pipe"] })
  let stdout = ""
  let stderr = ""
  let seen = 0
  const waits: Array<{ n: number; signal: NodeJS.Signals; sent: boolean }> = []
  proc.stdout!.on("data", (d: Buffer) => {
    stdout += d.toString()
    seen += (d.toString().match(/^step /gm) ?? []).length
    for (const w of waits) {
      if (!w.sent && seen >= w.n) {
        w.sent = true
        proc.kill(w.signal)
      }
    }
  })
  proc.stderr!.on("data", (d: Buffer) => (stderr += d.toString()))
  const done = new Promise<{ code: number | null; stdout: string; stderr: string; steps: number }>((resolve) =>
    proc.on("close", (code) => resolve({ code, stdout, stderr, steps: seen }))
  )
  return {
    signalAt: (n: number, signal: NodeJS.Signals) => {
      waits.push({ n, signal, sent: false })
      return done
    }
  }
}

const readRun = (dir: string) => {
  const file = path.join(dir, "checkpoint.safetensors")
  const ck = Effect.runSync(decode(fs.readFileSync(file), file))
  const step = Effect.runSync(decodeMetadata(ck.metadata, file)).step
  // the optimizer state beside the model (Checkpoint.ts): its moments are compared too
  const opt = path.join(dir, "optimizer.safetensors")
  for (const [n, t] of Effect.runSync(decode(fs.readFileSync(opt), opt)).tensors) ck.tensors.set(n, t)
  const metrics = fs.readFileSync(path.join(dir, "metrics.jsonl"), "utf8").trim().split("\n").map((l) => JSON.parse(l) as { step: number; loss: number })
  return { step, metrics, tensors: ck.tensors }
}

const leftovers = (dir: string) => fs.readdirSync(dir).filter((f) => f.includes(".tmp-") || f.startsWith("run.lock"))

const cpu = Effect.provide(Layer.merge(backendLayer("cpu"), NodeServices.layer))

describe("stopping on a signal", () => {
  it.effect("SIGTERM during train: exit 143, a final checkpoint and metrics at the step reached, and resume continues exactly", () =>
    Effect.gen(function*() {
      const out = tmp()
      const steps = 20
      // no periodic checkpoint before step 20: the only one is the signal's
      const r = yield* Effect.promise(() => start([child, out, String(steps), "100"]).signalAt(3, "SIGTERM"))
      assert.strictEqual(r.code, 143, r.stderr)
      const run = readRun(out)
      assert.isAtLeast(run.step, 3)
      assert.isBelow(run.step, steps)
      assert.include(r.stderr, `stopped by SIGTERM after step ${run.step} of ${steps}; checkpoint and metrics committed in ${out}`)
      assert.include(r.stderr, "continue with:")
      assert.deepStrictEqual(run.metrics.map((m) => m.step), Array.from({ length: run.step }, (_, i) => i))
      assert.deepStrictEqual(leftovers(out), [])
      // resume: the rest of the run, equal to an uninterrupted one
      const rest = yield* Effect.promise(() => start([child, out, String(steps), "100"]).signalAt(1_000, "SIGTERM"))
      assert.strictEqual(rest.code, 0, rest.stderr)
      const whole = yield* train(yield* load(tinyModel), childSettings(steps, 100), { out: tmp(), resume: false, quiet: true, data: childData() })
      const done = readRun(out)
      assert.strictEqual(done.step, steps)
      assert.deepStrictEqual(done.metrics.map((m) => m.loss), whole.metrics.map((m) => m.loss))
      const ref = readRun(path.dirname(whole.checkpoint))
      for (const [name, t] of ref.tensors) assert.isTrue(Buffer.from(done.tensors.get(name)!.data.buffer).equals(Buffer.from(t.data.buffer)), name)
    }).pipe(cpu), 300_000)

  it.effect("SIGINT as a step's checkpoint is being written: exit 130, the checkpoint whole, no temporary file", () =>
    Effect.gen(function*() {
      const out = tmp()
      // a checkpoint every step, written right after the step's line: the signal lands during the write
      const r = yield* Effect.promise(() => start([child, out, "40", "1"]).signalAt(2, "SIGINT"))
      assert.strictEqual(r.code, 130, r.stderr)
      const run = readRun(out)
      assert.include(r.stderr, `stopped by SIGINT after step ${run.step} of 40`)
      assert.deepStrictEqual(run.metrics.map((m) => m.step), Array.from({ length: run.step }, (_, i) => i))
      assert.deepStrictEqual(leftovers(out), [])
    }).pipe(cpu), 300_000)

  it("SIGTERM during the train command: exit 143 and the command that continues the run", async () => {
    const dir = tmp()
    const config = path.join(dir, "train.json")
    fs.writeFileSync(config, JSON.stringify({ model: tinyModel, seqLen: 16, batchSize: 2, steps: 500, logEvery: 1, evalEvery: 1000, evalBatches: 1, checkpointEvery: 1000 }))
    const out = path.join(dir, "run")
    const r = await start([cli, "train", "--config", config, "--out", out, "--backend", "cpu"]).signalAt(2, "SIGTERM")
    assert.strictEqual(r.code, 143, r.stderr)
    const run = readRun(out)
    assert.include(r.stderr, `stopped by SIGTERM after step ${run.step} of 500`)
    assert.include(r.stderr, `continue with: conceptmoe train --config ${config} --out ${out} --backend cpu --resume`)
    assert.notInclude(r.stdout, "final validation")
  }, 300_000)

  it("SIGTERM during compare: exit 143, and which models finished and where their results are", async () => {
    const out = tmp()
    const r = await start([
      cli, "compare", "examples/compare/moe-tiny.json", "--encoder-layers", "2", "--decoder-layers", "2", "--steps", "400",
      "--batch", "2", "--seq-len", "16", "--eval-every", "1000", "--backend", "cpu", "--out", out
    ]).signalAt(1, "SIGTERM")
    assert.strictEqual(r.code, 143, r.stderr)
    assert.match(r.stderr, /stopped by SIGTERM after step \d+ of 400/)
    assert.match(r.stderr, new RegExp(`stopped: ${out}/moe-tiny at step \\d+ of 400 \\(its checkpoint and metrics so far\\)`))
    assert.include(r.stderr, "not started: 1 more run(s)")
    assert.include(r.stderr, "no comparison was written")
    assert.isTrue(fs.existsSync(path.join(out, "moe-tiny", "checkpoint.safetensors")))
    assert.isFalse(fs.existsSync(path.join(out, "summary.json")))
  }, 300_000)
})
