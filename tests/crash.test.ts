/**
 * The crash test (docs/reliability.md, "Training runs"): a training process killed with SIGKILL
 * at random points, at least 20 times, in two run directories at once. After every kill the
 * checkpoint on disk loads, its metadata decodes, and the metrics hold every step before the
 * checkpoint's (and at most the one step after it, whose checkpoint rename the kill cut off); the
 * run resumes from whatever the kill left, and the finished run equals an uninterrupted one: the
 * same losses, and the same parameters and Adam moments bit for bit.
 */
import { NodeServices } from "@effect/platform-node"
import { assert, describe, it } from "@effect/vitest"
import { Effect, Layer } from "effect"
import { spawn } from "node:child_process"
import * as fs from "node:fs"
import * as os from "node:os"
import * as path from "node:path"
import { layer as backendLayer } from "../src/runtime/Backend.ts"
import { decode, decodeMetadata, readChecked } from "../src/train/Checkpoint.ts"
import { train } from "../src/train/Train.ts"
import { load, root } from "./support/models.ts"
import { childData, childSettings, tinyModel } from "./support/train-child.ts"
import { prng } from "../src/internal/Random.ts"

const child = path.join(root, "tests", "support", "train-child.ts")
const steps = 60
const killsPerLane = 10

/** The project's seeded generator, so the kill points are drawn the same way each run. */
const random = prng

const readRun = (dir: string) => {
  const file = path.join(dir, "checkpoint.safetensors")
  const metricsFile = path.join(dir, "metrics.jsonl")
  const metrics = fs.existsSync(metricsFile)
    ? fs.readFileSync(metricsFile, "utf8").trim().split("\n").filter((l) => l !== "").map((l) => JSON.parse(l) as { step: number; loss: number })
    : []
  if (!fs.existsSync(file)) return { step: 0, metrics, tensors: undefined }
  const ck = Effect.runSync(decode(fs.readFileSync(file), file))
  const meta = Effect.runSync(decodeMetadata(ck.metadata, file))
  // the optimizer state beside the model (Checkpoint.ts): its moments are compared too
  const opt = path.join(dir, "optimizer.safetensors")
  if (fs.existsSync(opt)) for (const [n, t] of Effect.runSync(decode(fs.readFileSync(opt), opt)).tensors) ck.tensors.set(n, t)
  return { step: meta.step, metrics, tensors: ck.tensors }
}

/** Checks what a kill left: a loadable checkpoint no older than before, and metrics consistent with it. */
const checkAfterKill = (dir: string, before: number): number => {
  const run = readRun(dir)
  assert.isAtLeast(run.step, before, "the checkpoint never goes back")
  const metricSteps = run.metrics.map((m) => m.step)
  // every step before the checkpoint's, in order; at most one more (metrics renamed, checkpoint not yet)
  assert.deepStrictEqual(metricSteps.slice(0, run.step), Array.from({ length: run.step }, (_, i) => i), `metrics of ${dir} at checkpoint step ${run.step}`)
  assert.isAtMost(metricSteps.length, run.step + 1)
  if (metricSteps.length === run.step + 1) assert.strictEqual(metricSteps[run.step], run.step)
  return run.step
}

/** Runs the child in `dir` until it finishes, killing it with SIGKILL `kills` times at random points. */
const lane = async (dir: string, kills: number, rand: () => number) => {
  let killed = 0
  let leftTemps = 0
  let metricsAhead = 0
  let step = 0
  const points: Array<string> = []
  for (;;) {
    const proc = spawn(process.execPath, [child, dir, String(steps), "1"], { cwd: root, stdio: ["ignore", "pipe", "pipe"] })
    let stderr = ""
    proc.stderr.on("data", (d: Buffer) => (stderr += d.toString()))
    // kill after the k-th step line of this process (k = 1 or 2), a random part of a step later:
    // the step's commit (metrics, then checkpoint) runs right after its line is printed
    const target = 1 + Math.floor(rand() * 2)
    const fraction = rand()
    let seen = 0
    let last = performance.now()
    let interval = 20
    let scheduled = false
    proc.stdout.on("data", (d: Buffer) => {
      const lines = (d.toString().match(/^step /gm) ?? []).length
      if (lines === 0) return
      const now = performance.now()
      if (seen > 0) interval = (now - last) / lines
      last = now
      seen += lines
      if (!scheduled && killed < kills && seen >= target) {
        scheduled = true
        const delay = fraction * Math.min(interval, 200)
        points.push(`after ${seen} step line(s) + ${delay.toFixed(1)} ms`)
        setTimeout(() => proc.kill("SIGKILL"), delay)
      }
    })
    const exit = await new Promise<{ code: number | null; signal: NodeJS.Signals | null }>((resolve) => proc.on("close", (code, signal) => resolve({ code, signal })))
    if (exit.signal === "SIGKILL") {
      killed++
      if (fs.readdirSync(dir).some((f) => f.includes(".tmp-"))) leftTemps++
      const metrics = readRun(dir)
      if (metrics.metrics.length > metrics.step) metricsAhead++
      step = checkAfterKill(dir, step)
      // the model file and its optimizer state load as a pair, as a resume reads them
      if (fs.existsSync(path.join(dir, "checkpoint.safetensors"))) {
        await Effect.runPromise(readChecked(path.join(dir, "checkpoint.safetensors")).pipe(Effect.provide(NodeServices.layer)))
      }
      continue
    }
    assert.strictEqual(exit.code, 0, stderr)
    return { killed, points, leftTemps, metricsAhead }
  }
}

describe("crash test", () => {
  it.effect(`SIGKILL at random points (${2 * killsPerLane} kills): every checkpoint loads, metrics agree with it, and resume equals the uninterrupted run`, () =>
    Effect.gen(function*() {
      const dirs = [0, 1].map(() => fs.mkdtempSync(path.join(os.tmpdir(), "conceptmoe-crash-")))
      const lanes = yield* Effect.promise(() => Promise.all(dirs.map((d, i) => lane(d, killsPerLane, random(20 + i)))))
      assert.isAtLeast(lanes.reduce((n, l) => n + l.killed, 0), 2 * killsPerLane)
      if (process.env["CONCEPTMOE_CRASH_STATS"] !== undefined) {
        const sum = (k: "leftTemps" | "metricsAhead") => lanes.reduce((n, l) => n + l[k], 0)
        console.log(`kills: ${2 * killsPerLane}; left a temp file: ${sum("leftTemps")}; left metrics one step past the checkpoint: ${sum("metricsAhead")}`)
      }
      // the uninterrupted run, in this process
      const ref = fs.mkdtempSync(path.join(os.tmpdir(), "conceptmoe-crash-ref-"))
      const whole = yield* train(yield* load(tinyModel), childSettings(steps, 1), { out: ref, resume: false, quiet: true, data: childData() })
      const expected = readRun(ref)
      for (const dir of dirs) {
        const run = readRun(dir)
        assert.strictEqual(run.step, steps)
        assert.deepStrictEqual(run.metrics.map((m) => m.step), whole.metrics.map((m) => m.step))
        assert.deepStrictEqual(run.metrics.map((m) => m.loss), whole.metrics.map((m) => m.loss))
        for (const [name, t] of expected.tensors!) {
          const got = run.tensors!.get(name)!
          assert.isTrue(Buffer.from(got.data.buffer).equals(Buffer.from(t.data.buffer)), `${name} differs from the uninterrupted run`)
        }
        // nothing left behind: no temporary file, no lock
        assert.deepStrictEqual(fs.readdirSync(dir).filter((f) => f.includes(".tmp-") || f.startsWith("run.lock")), [])
      }
    }).pipe(Effect.provide(Layer.merge(backendLayer("cpu"), NodeServices.layer))), 600_000)
})
