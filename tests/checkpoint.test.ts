/**
 * Training runs on disk (docs/reliability.md, "Training runs"): the checks before a checkpoint is
 * written, the commit of a step, the run directory's lock and temporary files, the checkpoint's
 * metadata, resuming into the same model only, file-system errors, and seqLen against the context.
 * Each test names the issue-20 item it covers; each fails on the code before that fix.
 */
import { NodeServices } from "@effect/platform-node"
import { assert, describe, it } from "@effect/vitest"
import { Effect, Layer, Schema } from "effect"
import { spawn, spawnSync } from "node:child_process"
import * as fs from "node:fs"
import * as os from "node:os"
import * as path from "node:path"
import { loadTrained } from "../src/infer/Generate.ts"
import { Tensors, layer as backendLayer } from "../src/runtime/Backend.ts"
import { materialize, release } from "../src/runtime/Lower.ts"
import { decode, encode, read } from "../src/train/Checkpoint.ts"
import { byteTokenizer, sotuSplits, validationBatches } from "../src/train/Data.ts"
import { commit, osError } from "../src/train/RunDir.ts"
import { evaluate, loadParams, train, TrainSettings } from "../src/train/Train.ts"
import { load } from "./support/models.ts"

const tiny = { kind: "moe", name: "tiny", vocab: 256, hidden: 16, layers: 2, heads: 2, experts: 2, topK: 1, expertHidden: 16, tiedEmbeddings: true, contextLength: 32 }
const data = sotuSplits(byteTokenizer, 0)
const settings = (extra: Record<string, unknown> = {}) =>
  Schema.decodeUnknownSync(TrainSettings)({ seqLen: 16, batchSize: 2, steps: 4, logEvery: 100, evalEvery: 100, evalBatches: 1, checkpointEvery: 2, ...extra })
const tmp = () => fs.mkdtempSync(path.join(os.tmpdir(), "conceptmoe-ck-"))
const cpu = Effect.provide(Layer.merge(backendLayer("cpu"), NodeServices.layer))
const ckFile = (out: string) => path.join(out, "checkpoint.safetensors")
const metricSteps = (out: string) =>
  fs.readFileSync(path.join(out, "metrics.jsonl"), "utf8").trim().split("\n").map((l) => (JSON.parse(l) as { step: number }).step)
const temps = (dir: string) => fs.readdirSync(dir).filter((f) => /\.tmp-\d+$/.test(f))

/** Rewrites a checkpoint's metadata (keeping its tensors). */
const withMetadata = (file: string, change: (m: Record<string, string>) => Record<string, string>) =>
  Effect.gen(function*() {
    const ck = yield* decode(fs.readFileSync(file), file)
    fs.writeFileSync(file, encode(ck.tensors, change(ck.metadata)))
  })

/** A pid that no process has: a child that has exited. */
const deadPid = () => {
  const r = spawnSync(process.execPath, ["-e", "process.stdout.write(String(process.pid))"], { encoding: "utf8" })
  return Number(r.stdout)
}

describe("checkpoints are written only when good (item 1)", () => {
  it.effect("a diverging run keeps the last good checkpoint: its weights give a finite loss, and the error names it with its step", () =>
    Effect.gen(function*() {
      const m = yield* load(tiny)
      const out = tmp()
      const e = yield* Effect.flip(train(m, settings({ steps: 40, checkpointEvery: 1, optimizer: { lr: 1e9, warmup: 0, clip: 1e30 } }), { out, resume: false, quiet: true, data }))
      assert.strictEqual(e._tag, "DivergedError")
      const ck = yield* read(ckFile(out))
      assert.include(e.message, `the last good checkpoint is ${ckFile(out)} (step ${ck.metadata["step"]})`)
      // every stored value is finite, and the stored weights give a finite loss
      for (const [name, t] of ck.tensors) assert.isTrue(t.data.every(Number.isFinite), name)
      const { tf } = yield* Tensors
      const low = materialize(tf, m.analysis, 0)
      yield* loadParams(low, ckFile(out), ck.tensors)
      const val = evaluate(low, validationBatches(data.validation, 2, 16, 1))
      release(low)
      assert.isTrue(Number.isFinite(val.bitsPerByte), `loss of the kept checkpoint: ${val.bitsPerByte}`)
      assert.deepStrictEqual(temps(out), [])
    }).pipe(cpu), 120_000)
})

describe("a step is committed whole (item 2)", () => {
  it.effect("metrics are renamed before the checkpoint: a failed checkpoint rename leaves the old checkpoint, metrics that reach past it, the OS reason, and no temp file", () =>
    Effect.gen(function*() {
      const m = yield* load(tiny)
      const out = tmp()
      yield* train(m, settings({ steps: 4, checkpointEvery: 2 }), { out, resume: false, quiet: true, data, until: 2 })
      assert.deepStrictEqual(metricSteps(out), [0, 1])
      // the checkpoint's final name is taken by a directory: its rename fails (EISDIR)
      fs.renameSync(ckFile(out), path.join(out, "kept.safetensors"))
      fs.mkdirSync(path.join(ckFile(out), "x"), { recursive: true })
      const e = yield* Effect.flip(commit([
        { file: path.join(out, "metrics.jsonl"), bytes: "{\"step\":0}\n{\"step\":1}\n{\"step\":2}\n" },
        { file: ckFile(out), bytes: new Uint8Array(16) }
      ]))
      assert.strictEqual(e._tag, "RunFileError")
      assert.match(e.code, /^(EISDIR|ENOTEMPTY|EEXIST)$/)
      assert.include(e.message, ckFile(out))
      assert.deepStrictEqual(metricSteps(out), [0, 1, 2])
      assert.deepStrictEqual(temps(out), [])
    }).pipe(cpu), 120_000)

  it.effect("resume drops metrics past the checkpoint's step and reports missing ones", () =>
    Effect.gen(function*() {
      const m = yield* load(tiny)
      const out = tmp()
      yield* train(m, settings(), { out, resume: false, quiet: true, data, until: 2 })
      // as a kill between the two renames leaves it: metrics of step 2 and 3 written, the checkpoint still at 2
      fs.appendFileSync(path.join(out, "metrics.jsonl"), "{\"step\":2,\"loss\":9}\n{\"step\":3,\"loss\":9}\n")
      const r = yield* train(m, settings(), { out, resume: true, quiet: true, data })
      assert.deepStrictEqual(r.resumed?.missingMetrics, [])
      assert.deepStrictEqual(metricSteps(out), [0, 1, 2, 3])
      assert.notStrictEqual(r.metrics[2]!.loss, 9)
      // a metrics file that lost a line before the checkpoint's step: reported
      const lines = fs.readFileSync(path.join(out, "metrics.jsonl"), "utf8").trim().split("\n")
      fs.writeFileSync(path.join(out, "metrics.jsonl"), [lines[0], lines[2], lines[3]].join("\n") + "\n")
      const again = yield* train(m, settings({ steps: 6 }), { out, resume: true, quiet: true, data })
      assert.deepStrictEqual(again.resumed?.missingMetrics, [1])
    }).pipe(cpu), 120_000)
})

describe("the run directory's lock (item 3)", () => {
  it.effect("a second process is refused with the holder's pid; a dead holder's lock is taken over and released at the end", () =>
    Effect.gen(function*() {
      const m = yield* load(tiny)
      const out = tmp()
      const holder = spawn(process.execPath, ["-e", "setTimeout(() => {}, 60000)"], { stdio: "ignore" })
      try {
        fs.writeFileSync(path.join(out, "run.lock"), `${holder.pid}\n`)
        const e = yield* Effect.flip(train(m, settings(), { out, resume: false, quiet: true, data }))
        assert.strictEqual(e._tag, "RunLocked")
        assert.include(e.message, `in use by process ${holder.pid}`)
        assert.isFalse(fs.existsSync(ckFile(out)))
      } finally {
        holder.kill("SIGKILL")
      }
      fs.writeFileSync(path.join(out, "run.lock"), `${deadPid()}\n`)
      yield* train(m, settings({ steps: 2 }), { out, resume: false, quiet: true, data })
      assert.isTrue(fs.existsSync(ckFile(out)))
      assert.isFalse(fs.existsSync(path.join(out, "run.lock")))
    }).pipe(cpu), 120_000)

  it.effect("two runs at once on one directory: the second is refused while the first trains", () =>
    Effect.gen(function*() {
      const m = yield* load(tiny)
      const out = tmp()
      const both = yield* Effect.all([
        Effect.result(train(m, settings({ steps: 3 }), { out, resume: false, quiet: true, data })),
        Effect.result(train(m, settings({ steps: 3 }), { out, resume: false, quiet: true, data }))
      ], { concurrency: 2 })
      const tags = both.map((r) => (r._tag === "Success" ? "ok" : r.failure._tag)).sort()
      assert.deepStrictEqual(tags, ["RunLocked", "ok"])
    }).pipe(cpu), 120_000)
})

describe("checkpoint metadata is decoded (item 7)", () => {
  it.effect("a step of NaN, 3.5, -5 or \"\" is refused on resume and by generate, naming the file and field", () =>
    Effect.gen(function*() {
      const m = yield* load(tiny)
      const out = tmp()
      yield* train(m, settings({ steps: 2 }), { out, resume: false, quiet: true, data })
      const good = fs.readFileSync(ckFile(out))
      for (const step of ["NaN", "3.5", "-5", ""]) {
        fs.writeFileSync(ckFile(out), good)
        yield* withMetadata(ckFile(out), (md) => ({ ...md, step }))
        const e = yield* Effect.flip(train(m, settings(), { out, resume: true, quiet: true, data }))
        assert.strictEqual(e._tag, "CheckpointError")
        assert.strictEqual((e as { field?: string }).field, "step")
        assert.include(e.message, `metadata "step": expected a whole number ≥ 0`)
        assert.include(e.message, JSON.stringify(step))
        assert.strictEqual((e as { file?: string }).file, ckFile(out))
        const g = yield* Effect.flip(loadTrained(out))
        assert.strictEqual(g._tag, "CheckpointError")
        assert.include(g.message, `metadata "step"`)
      }
      fs.writeFileSync(ckFile(out), good)
      yield* withMetadata(ckFile(out), (md) => ({ ...md, config: "{not json" }))
      const c = yield* Effect.flip(train(m, settings(), { out, resume: true, quiet: true, data }))
      assert.include(c.message, `metadata "config": expected JSON text`)
    }).pipe(cpu), 120_000)
})

describe("resume checks the model and records changed settings (item 8)", () => {
  it.effect("a top-k 1 checkpoint is refused under a top-k 2 config, naming the field; a changed learning rate is recorded", () =>
    Effect.gen(function*() {
      const out = tmp()
      yield* train(yield* load(tiny), settings(), { out, resume: false, quiet: true, data, until: 2 })
      const e = yield* Effect.flip(train(yield* load({ ...tiny, topK: 2 }), settings(), { out, resume: true, quiet: true, data }))
      assert.strictEqual(e._tag, "CheckpointMismatch")
      assert.include(e.message, `"topK" is 1 in the checkpoint and 2 in this config`)
      const v = yield* Effect.flip(train(yield* load({ ...tiny, vocab: 256, name: "renamed", experts: 2, topK: 1, heads: 4 }), settings(), { out, resume: true, quiet: true, data }))
      assert.include(v.message, `"heads" is 2 in the checkpoint and 4 in this config`)
      // the learning-rate schedule may change across a resume: recorded in the result and the checkpoint
      const r = yield* train(yield* load(tiny), settings({ optimizer: { lr: 1e-3 } }), { out, resume: true, quiet: true, data })
      assert.deepStrictEqual(r.resumed?.changes, [{ step: 2, field: "optimizer.lr", from: 0.003, to: 0.001 }])
      const ck = yield* read(ckFile(out))
      assert.deepStrictEqual(JSON.parse(ck.metadata["changes"]!), [{ step: 2, field: "optimizer.lr", from: 0.003, to: 0.001 }])
      assert.strictEqual(JSON.parse(ck.metadata["settings"]!).optimizer.lr, 0.001)
    }).pipe(cpu), 120_000)

  it.effect("a field the checkpoint lists in mayChange (a converted model's ramp of R) may change, and is recorded", () =>
    Effect.gen(function*() {
      const out = tmp()
      yield* train(yield* load(tiny), settings(), { out, resume: false, quiet: true, data, until: 2 })
      yield* withMetadata(ckFile(out), (md) => ({ ...md, mayChange: JSON.stringify(["topK"]) }))
      const r = yield* train(yield* load({ ...tiny, topK: 2 }), settings(), { out, resume: true, quiet: true, data })
      assert.deepStrictEqual(r.resumed?.changes, [{ step: 2, field: "model.topK", from: 1, to: 2 }])
    }).pipe(cpu), 120_000)
})

describe("temporary files (item 9) and file-system errors (item 10)", () => {
  it.effect("temp files a killed run left are removed at the next start", () =>
    Effect.gen(function*() {
      const m = yield* load(tiny)
      const out = tmp()
      yield* train(m, settings({ steps: 2 }), { out, resume: false, quiet: true, data })
      fs.writeFileSync(path.join(out, "checkpoint.safetensors.tmp-999999"), new Uint8Array(1000))
      fs.writeFileSync(path.join(out, "metrics.jsonl.tmp-999998"), "{")
      yield* train(m, settings(), { out, resume: true, quiet: true, data })
      assert.deepStrictEqual(temps(out), [])
    }).pipe(cpu), 120_000)

  it.effect("an unusable run directory names the path and keeps the OS reason; an empty --out is refused", () =>
    Effect.gen(function*() {
      const m = yield* load(tiny)
      const file = path.join(tmp(), "a-file")
      fs.writeFileSync(file, "")
      const e = yield* Effect.flip(train(m, settings(), { out: path.join(file, "run"), resume: false, quiet: true, data }))
      assert.strictEqual(e._tag, "RunFileError")
      assert.strictEqual((e as { code?: string }).code, "ENOTDIR")
      assert.include(e.message, path.join(file, "run"))
      assert.include(e.message, "ENOTDIR: not a directory")
      const empty = yield* Effect.flip(train(m, settings(), { out: "", resume: false, quiet: true, data }))
      assert.strictEqual(empty._tag, "RunFileError")
      assert.include(empty.message, "the path is empty")
      // a full disk or a read-only file system: the code and the system's words, with the path
      const full = Object.assign(new Error("ENOSPC: no space left on device, write"), { code: "ENOSPC" })
      const mapped = osError("write", "/runs/x/checkpoint.safetensors.tmp-1")(full)
      assert.strictEqual(mapped.code, "ENOSPC")
      assert.strictEqual(mapped.message, `cannot write "/runs/x/checkpoint.safetensors.tmp-1": ENOSPC: no space left on device, write`)
    }).pipe(cpu), 120_000)
})

describe("seqLen and the context (item 11)", () => {
  it.effect("a seqLen above the model's context length is refused before anything runs or is written", () =>
    Effect.gen(function*() {
      const m = yield* load(tiny)
      const out = path.join(tmp(), "run")
      const e = yield* Effect.flip(train(m, settings({ seqLen: 4096 }), { out, resume: false, quiet: true, data }))
      assert.strictEqual(e._tag, "SettingsError")
      assert.include(e.message, "seqLen 4096 exceeds the context length of tiny (32 tokens)")
      assert.isFalse(fs.existsSync(out))
    }).pipe(cpu), 120_000)
})
