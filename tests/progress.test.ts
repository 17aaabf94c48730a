/**
 * Progress through Effect's logger (src/internal/Progress.ts): the time left and the bar, the
 * logger on a terminal and elsewhere, `--log-level warn` silencing the progress of `train`, the bar
 * of `bench inference`, and `compare` leaving no bar behind when it is stopped.
 */
import { NodeServices } from "@effect/platform-node"
import { assert, describe, it } from "@effect/vitest"
import { Console, Effect, Fiber, References } from "effect"
import { TestClock } from "effect/testing"
import * as fs from "node:fs"
import * as os from "node:os"
import * as path from "node:path"
import { runCli } from "../src/cli/Run.ts"
import * as Progress from "../src/internal/Progress.ts"
import { cli, runInProcess } from "./support/cli-in-process.ts"

describe("time left", () => {
  it("formatDuration: seconds, minutes and seconds, hours and minutes; ? when unknown", () => {
    const cases: ReadonlyArray<readonly [number | undefined, string]> = [
      [undefined, "?"], [Number.NaN, "?"], [Number.POSITIVE_INFINITY, "?"], [-1, "?"],
      [0, "0s"], [42.4, "42s"], [59.4, "59s"], [59.6, "1m 00s"], [185, "3m 05s"], [3599.4, "59m 59s"],
      [3600, "1h 00m"], [7620, "2h 07m"], [36 * 3600 + 59, "36h 00m"]
    ]
    for (const [s, text] of cases) assert.strictEqual(Progress.formatDuration(s), text, String(s))
  })

  it("eta: the rate since the first tick seen, times the steps left", () => {
    assert.strictEqual(Progress.eta({ at: 0, step: 1 }, { at: 2000, step: 3 }, 10), 7)
    assert.strictEqual(Progress.eta({ at: 500, step: 4 }, { at: 2500, step: 8 }, 8), 0)
    assert.isUndefined(Progress.eta({ at: 0, step: 5 }, { at: 1000, step: 5 }, 10))
  })

  it("render: label, bar, step, percentage, time left; cut to the terminal's width", () => {
    assert.strictEqual(Progress.render({ label: "moe", step: 5, steps: 10 }, 65, 80), `moe [${"=".repeat(15)}>${" ".repeat(14)}] 5/10 50% ETA 1m 05s`)
    assert.strictEqual(Progress.render({ label: "moe", step: 10, steps: 10 }, 0, 80), `moe [${"=".repeat(30)}] 10/10 100% ETA 0s`)
    const narrow = Progress.render({ label: "a-long-model-name", step: 1, steps: 3 }, undefined, 40)
    assert.strictEqual(narrow.length, 39)
    assert.isTrue(narrow.startsWith("a-long-model-name [===>"))
  })
})

/** Runs `self` with the progress logger, a terminal that records what is written, and a console that records lines. */
const recorded = <A>(tty: boolean, self: Effect.Effect<A>) =>
  Effect.gen(function*() {
    const writes: Array<string> = []
    const out: Array<string> = []
    const err: Array<string> = []
    const console = { ...globalThis.console, log: (...a: Array<unknown>) => void out.push(a.join(" ")), error: (...a: Array<unknown>) => void err.push(a.join(" ")) }
    yield* self.pipe(
      Effect.provide(Progress.layer),
      Effect.provideService(Progress.Terminal, { tty, columns: 80, write: (t) => void writes.push(t) }),
      Effect.provideService(Console.Console, console as unknown as Console.Console)
    )
    return { writes, out, err }
  })

describe("the progress logger", () => {
  const run = Effect.gen(function*() {
    yield* Progress.line("training m")
    yield* Progress.tick("m", 1, 3)
    yield* TestClock.adjust(2000)
    yield* Progress.tick("m", 2, 3)
    yield* Progress.line("step 2/3")
    yield* Effect.logWarning("careful")
    yield* TestClock.adjust(2000)
    yield* Progress.tick("m", 3, 3)
  })

  it.effect("on a terminal: a bar with the time left, erased around each line and at the last step; lines on stdout, warnings on stderr", () =>
    Effect.gen(function*() {
      const r = yield* recorded(true, run)
      assert.deepStrictEqual(r.out, ["training m", "step 2/3"])
      assert.deepStrictEqual(r.err, ["careful"])
      const bar1 = Progress.render({ label: "m", step: 1, steps: 3 }, undefined, 80)
      const bar2 = Progress.render({ label: "m", step: 2, steps: 3 }, 2, 80)
      assert.include(bar2, "2/3 66% ETA 2s")
      const erase = "\r\x1b[K"
      // tick 1, tick 2 (erase, draw), the line (erase, redraw), the warning (erase, redraw), tick 3 (erase, nothing)
      assert.deepStrictEqual(r.writes, [bar1, erase, bar2, erase, bar2, erase, bar2, erase])
    }))

  it.effect("elsewhere: the plain lines, no bar", () =>
    Effect.gen(function*() {
      const r = yield* recorded(false, run)
      assert.deepStrictEqual(r.out, ["training m", "step 2/3"])
      assert.deepStrictEqual(r.err, ["careful"])
      assert.deepStrictEqual(r.writes, [])
    }))

  it.effect("at --log-level warn (MinimumLogLevel Warn): no progress line and no bar, warnings still", () =>
    Effect.gen(function*() {
      const r = yield* recorded(true, run.pipe(Effect.provideService(References.MinimumLogLevel, "Warn")))
      assert.deepStrictEqual(r.out, [])
      assert.deepStrictEqual(r.err, ["careful"])
      assert.deepStrictEqual(r.writes, [])
    }))
})

describe("train and --log-level", () => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), "cmoe-progress-"))
  const config = path.join(dir, "train.json")
  const model = { kind: "moe", name: "p", vocab: 256, hidden: 16, layers: 2, heads: 2, experts: 2, topK: 1, expertHidden: 16, tiedEmbeddings: true, contextLength: 32 }
  fs.writeFileSync(config, JSON.stringify({ model, seqLen: 16, batchSize: 2, steps: 4, logEvery: 2, evalEvery: 4, evalBatches: 1, checkpointEvery: 4 }))

  it("by default train prints its step lines; with --log-level warn none, and the result line still", async () => {
    const plain = await runInProcess(["train", "--config", config, "--out", path.join(dir, "a"), "--backend", "cpu"])
    assert.strictEqual(plain.code, 0, plain.err)
    assert.match(plain.out, /^training p on cpu/m)
    assert.deepStrictEqual(plain.out.split("\n").filter((l) => l.startsWith("step ")).map((l) => l.split(/\s+/)[1]), ["1/4", "2/4", "4/4"])
    const warn = await runInProcess(["train", "--config", config, "--out", path.join(dir, "b"), "--backend", "cpu", "--log-level", "warn"])
    assert.strictEqual(warn.code, 0, warn.err)
    assert.notMatch(warn.out, /step|training p/)
    assert.match(warn.out, /^final validation \d+\.\d{4} bits\/byte; \d+ tokens\/s; wrote .*b\/\{checkpoint\.safetensors,optimizer\.safetensors,metrics\.jsonl,loss\.svg\}$/)
    assert.strictEqual(warn.err, "")
    // the same run: the same metrics
    const metrics = (d: string) => fs.readFileSync(path.join(dir, d, "metrics.jsonl"), "utf8").split("\n").map((l) => (l === "" ? l : JSON.parse(l).loss))
    assert.deepStrictEqual(metrics("b"), metrics("a"))
  }, 120_000)
})

/** The command line run in-process on a recording terminal (`tty`: whether it is one). */
const onTerminal = (args: ReadonlyArray<string>, tty: boolean) => {
  const writes: Array<string> = []
  const out: Array<string> = []
  const console = { ...globalThis.console, log: (...a: Array<unknown>) => void out.push(a.join(" ")), error: (...a: Array<unknown>) => void out.push(a.join(" ")) }
  const fiber = Effect.runFork(runCli(cli, args, "test").pipe(
    Effect.provideService(Progress.Terminal, { tty, columns: 100, write: (t) => void writes.push(t) }),
    Effect.provideService(Console.Console, console as unknown as Console.Console),
    Effect.provide(NodeServices.layer)
  ))
  return { fiber, writes, out }
}

const erase = "\r\x1b[K"

describe("bench inference: progress", () => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), "cmoe-bench-progress-"))
  // the baseline and its 6 variants (R 1.5, 2, 4; topk and loop), one length: 7 measurements
  const args = (out: string) => ["bench", "inference", "--quick", "--baseline", "examples/compare/moe-tiny.json", "--lengths", "16", "--rows", "1", "--backend", "cpu", "--out", path.join(dir, out)]

  it("on a terminal a bar per measurement with the time left, erased at the end; elsewhere the plain lines; --format json neither", async () => {
    const t = onTerminal(args("tty"), true)
    const exit = await Effect.runPromise(Fiber.join(t.fiber))
    assert.strictEqual(exit.code, 0, t.out.join("\n"))
    const bars = t.writes.filter((w) => w !== erase)
    assert.deepStrictEqual(bars.map((b) => b.match(/ (\d+)\/7 /)?.[1]), ["1", "2", "3", "4", "5", "6"])
    assert.match(bars[0]!, /^bench moe-tiny \[=*>? *\] 1\/7 14% ETA \?$/)
    assert.match(bars[5]!, /^bench moe-tiny \[=+> *\] 6\/7 85% ETA \d+s$/)
    assert.strictEqual(t.writes.at(-1), erase)
    assert.strictEqual(t.out.filter((l) => /^(prefill|decode) +L= +16 /.test(l)).length, 12)

    const plain = onTerminal(args("plain"), false)
    assert.strictEqual((await Effect.runPromise(Fiber.join(plain.fiber))).code, 0)
    assert.deepStrictEqual(plain.writes, [])
    assert.strictEqual(plain.out.filter((l) => /^(prefill|decode) +L= +16 /.test(l)).length, 12)

    const json = onTerminal([...args("json"), "--format", "json"], true)
    assert.strictEqual((await Effect.runPromise(Fiber.join(json.fiber))).code, 0)
    assert.deepStrictEqual(json.writes, [])
    assert.strictEqual(JSON.parse(json.out.join("\n")).length, 12)
  }, 180_000)
})

describe("compare: progress", () => {
  it("stopped mid-run (the fiber interrupted), it leaves no bar on the terminal", async () => {
    const out = fs.mkdtempSync(path.join(os.tmpdir(), "cmoe-compare-progress-"))
    const t = onTerminal(["compare", "examples/compare/moe-tiny.json", "--encoder-layers", "2", "--decoder-layers", "2", "--steps", "1000", "--batch", "1", "--seq-len", "16", "--eval-every", "1000", "--eval-batches", "1", "--backend", "cpu", "--out", out], true)
    for (let i = 0; i < 600 && !t.writes.some((w) => w.includes(" 3/1000 ")); i++) await new Promise((r) => setTimeout(r, 100))
    assert.isTrue(t.writes.some((w) => w.startsWith("moe-tiny [") && w.includes(" 3/1000 ")), t.out.join("\n"))
    await Effect.runPromise(Fiber.interrupt(t.fiber))
    assert.strictEqual(t.writes.at(-1), erase)
  }, 120_000)
})
