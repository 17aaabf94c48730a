/**
 * Tensors are released on every exit path: a generation that fails in the middle of decoding and a
 * training run that diverges leave as many live tensors as they found (`tf.memory().numTensors`).
 * Each check first runs the same shapes once to completion, so that what the runtime keeps on
 * purpose across calls (attention masks, per shape) is already there when counting starts.
 */
import { NodeServices } from "@effect/platform-node"
import { assert, describe, it } from "@effect/vitest"
import { Effect, Exit, Layer, Schema } from "effect"
import * as fs from "node:fs"
import * as os from "node:os"
import * as path from "node:path"
import { generate, SamplingSettings } from "../src/infer/Generate.ts"
import { layer as backendLayer, Tensors } from "../src/runtime/Backend.ts"
import { materialize, release } from "../src/runtime/Lower.ts"
import { byteTokenizer, sotuSplits } from "../src/train/Data.ts"
import { train, TrainSettings } from "../src/train/Train.ts"
import { load } from "./support/models.ts"

const tiny = { kind: "moe", name: "tiny", vocab: 256, hidden: 16, layers: 2, heads: 2, experts: 2, topK: 1, expertHidden: 16, tiedEmbeddings: true, contextLength: 32 }
const tinyConcept = { kind: "conceptmoe", name: "tiny-concept", baseline: { ...tiny, layers: 3 }, ratio: 2, encoderLayers: 1, decoderLayers: 1, topK: 2 }
const cpu = Effect.provide(Layer.merge(backendLayer("cpu"), NodeServices.layer))
const tmp = () => fs.mkdtempSync(path.join(os.tmpdir(), "conceptmoe-resources-"))

class EmitFailed extends Error {}

describe("tensors released on every exit path", () => {
  for (const cfg of [tiny, tinyConcept]) {
    it.effect(`${cfg.name}: a generation whose output fails midway releases its decode session`, () =>
      Effect.gen(function*() {
        const { tf } = yield* Tensors
        const m = yield* load(cfg)
        const low = materialize(tf, m.analysis, 3)
        const sampling = Schema.decodeUnknownSync(SamplingSettings)({ maxTokens: 8, temperature: 0, topK: 0, seed: 0 })
        const pieces: Array<string> = []
        const done = yield* generate(m, low, byteTokenizer, "The Union", sampling, (t) => pieces.push(t))
        assert.strictEqual(done.generatedTokens, 8)
        const before = tf.memory().numTensors
        let emitted = 0
        const failed = yield* Effect.exit(generate(m, low, byteTokenizer, "The Union", sampling, () => {
          if (++emitted === 4) throw new EmitFailed("the output closed")
        }))
        assert.isTrue(Exit.isFailure(failed))
        assert.strictEqual(emitted, 4)
        assert.strictEqual(tf.memory().numTensors, before)
        release(low)
      }).pipe(cpu), 120_000)
  }

  it.effect("a training run that diverges releases its variables and optimizer state", () =>
    Effect.gen(function*() {
      const { tf } = yield* Tensors
      const m = yield* load(tiny)
      const data = sotuSplits(byteTokenizer, 0)
      const settings = (extra: Record<string, unknown>) =>
        Schema.decodeUnknownSync(TrainSettings)({ seqLen: 32, batchSize: 2, logEvery: 100, evalEvery: 100, evalBatches: 1, ...extra })
      // the same shapes, run to completion first
      yield* train(m, settings({ steps: 2, checkpointEvery: 2 }), { out: tmp(), resume: false, quiet: true, data })
      const before = tf.memory().numTensors
      const e = yield* Effect.flip(train(m, settings({ steps: 40, checkpointEvery: 1, optimizer: { lr: 1e9, warmup: 0, clip: 1e30 } }), { out: tmp(), resume: false, quiet: true, data }))
      assert.strictEqual(e._tag, "DivergedError")
      assert.strictEqual(tf.memory().numTensors, before)
    }).pipe(cpu), 120_000)
})
