/**
 * A training process for the crash and signal tests: trains a tiny MoE on cpu, on a small built-in
 * text, into the run directory given, resuming when it holds a checkpoint, and prints a line per
 * step (`step N/M`). Light imports, so that it starts fast.
 * Usage: node tests/support/train-child.ts <out> <steps> [checkpointEvery]
 */
import { runMain } from "@effect/platform-node/NodeRuntime"
import { layer as nodeServices } from "@effect/platform-node/NodeServices"
import { Effect, Layer, Schema } from "effect"
import * as fs from "node:fs"
import * as path from "node:path"
import { modelFromJson } from "../../src/models/Load.ts"
import { layer as backendLayer } from "../../src/runtime/Backend.ts"
import { byteTokenizer, type Document, streamOf } from "../../src/train/Data.ts"
import * as Progress from "../../src/internal/Progress.ts"
import * as Stop from "../../src/train/Stop.ts"
import { train, TrainSettings } from "../../src/train/Train.ts"

export const tinyModel = { kind: "moe", name: "tiny", vocab: 256, hidden: 16, layers: 2, heads: 2, experts: 2, topK: 1, expertHidden: 16, tiedEmbeddings: true, contextLength: 32 }

export const childSettings = (steps: number, checkpointEvery: number) =>
  Schema.decodeUnknownSync(TrainSettings)({ seqLen: 16, batchSize: 2, steps, logEvery: 1, evalEvery: 1000, evalBatches: 1, checkpointEvery })

const docs = (from: number, n: number): Array<Document> =>
  Array.from({ length: n }, (_, i) => ({
    year: from + i,
    name: `doc ${from + i}`,
    text: `Document ${from + i}: the quick brown fox jumps over the lazy dog ${i} times, and the run goes on. `.repeat(4)
  }))

/** The child's data: 40 short training documents and 10 validation ones. */
export const childData = () => ({ train: streamOf(docs(0, 40), byteTokenizer, 0), validation: streamOf(docs(100, 10), byteTokenizer, 0) })

const main = Effect.gen(function*() {
  const [out, steps, every] = process.argv.slice(2)
  const model = yield* modelFromJson(tinyModel, "tiny.json")
  const resume = fs.existsSync(path.join(out!, "checkpoint.safetensors"))
  yield* train(model, childSettings(Number(steps), Number(every ?? "1")), { out: out!, resume, data: childData() })
}).pipe(
  Effect.catchTag("Stopped", (e) => Stop.report(e, "continue with: --resume")),
  Effect.catch((e) =>
    Effect.sync(() => {
      process.stderr.write(`error: ${e.message}\n`)
      process.exitCode = 1
    })
  ),
  // progress as the command line prints it: plain lines (src/internal/Progress.ts)
  Effect.provide(Layer.mergeAll(backendLayer("cpu"), nodeServices, Progress.layer))
)

if (import.meta.main) runMain(main, { disableErrorReporting: true })
