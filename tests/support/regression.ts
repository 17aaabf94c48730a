/**
 * The regression run of issue 21: the compare pair (examples/compare/moe-tiny.json and its matched
 * ConceptMoE, examples/compare/conceptmoe-tiny.json) trained for 20 steps on the cpu backend with
 * one seed, and the static costs of both. Every setting is written out here (configs inline,
 * every training and optimizer setting, the chunk module's ratio loss), so that the numbers
 * depend on the code and not on a default or an example file that may change.
 *
 * Used by tests/regression.test.ts and by tests/fixtures/record-regression.ts, which wrote
 * tests/fixtures/regression.json (once, before the redesign).
 */
import { NodeServices } from "@effect/platform-node"
import { Effect, Layer, Schema } from "effect"
import * as fs from "node:fs"
import * as os from "node:os"
import * as path from "node:path"
import * as Cost from "../../src/cost/Cost.ts"
import type { LoadedModel } from "../../src/models/Load.ts"
import { layer as backendLayer } from "../../src/runtime/Backend.ts"
import { byteTokenizer, sotuSplits } from "../../src/train/Data.ts"
import { train, TrainSettings } from "../../src/train/Train.ts"
import { load } from "./models.ts"

/** examples/compare/moe-tiny.json as of the recording. */
export const baseline = {
  kind: "moe",
  name: "moe-tiny",
  vocab: 256,
  hidden: 64,
  layers: 6,
  heads: 4,
  experts: 16,
  topK: 2,
  expertHidden: 32,
  tiedEmbeddings: true,
  contextLength: 128
}

/** examples/compare/conceptmoe-tiny.json as of the recording, with the chunk module's settings pinned. */
export const candidate = {
  kind: "conceptmoe",
  name: "1L-top7-R2",
  baseline,
  ratio: 2,
  encoderLayers: 2,
  decoderLayers: 2,
  topK: 7,
  merge: "sum",
  tau: 6,
  // the paper's ratio loss with weight λ: the numbers do not depend on the tuning of the "pi"
  // controller (its gains, its integral's update), which is a method choice, not the redesign
  lambda: 0.03,
  ratioControl: "plain",
  jointDecoding: true
}

export const settings = {
  seqLen: 32,
  batchSize: 2,
  steps: 20,
  seed: 7,
  logEvery: 1000,
  evalEvery: 20,
  evalBatches: 1,
  checkpointEvery: 1000,
  balanceWeight: 0.01,
  conceptCapacity: 1.5,
  expertCapacity: null,
  threads: 1,
  optimizer: { lr: 0.003, warmup: 5, minLrRatio: 0.1, weightDecay: 0.1, beta1: 0.9, beta2: 0.95, eps: 1e-8, clip: 1, partLr: { chunk: 1 }, partBeta1: {} }
}

/** What is recorded of one model: its static costs and its training run. */
export interface ModelRecord {
  readonly name: string
  readonly params: number
  readonly matmulFlopsPerToken: number
  readonly paramsByPart: Record<string, number>
  readonly flopsByPart: Record<string, number>
  readonly losses: ReadonlyArray<number>
  readonly ce: ReadonlyArray<number>
  readonly boundaryRate?: ReadonlyArray<number>
  readonly ratioLoss?: ReadonlyArray<number>
  readonly finalValBitsPerByte: number
}

export interface RegressionRecord {
  readonly backend: "cpu"
  readonly settings: typeof settings
  readonly models: readonly [ModelRecord, ModelRecord]
}

const sorted = (parts: Cost.Parts): Record<string, number> =>
  Object.fromEntries(Object.entries(parts).sort(([a], [b]) => (a < b ? -1 : a > b ? 1 : 0)))

/** Static costs of a loaded model (no tensors). */
export const staticCosts = (m: LoadedModel) => ({
  name: m.name,
  params: Cost.total(m.analysis.cost.params),
  matmulFlopsPerToken: Cost.matmulPerToken(m.analysis.cost),
  paramsByPart: sorted(m.analysis.cost.params),
  flopsByPart: sorted(m.analysis.cost.flops)
})

const runOne = (json: unknown) =>
  Effect.gen(function*() {
    const model = yield* load(json)
    const out = fs.mkdtempSync(path.join(os.tmpdir(), "conceptmoe-regression-"))
    const data = sotuSplits(byteTokenizer, settings.seed)
    const result = yield* train(model, Schema.decodeUnknownSync(TrainSettings)(settings), { out, resume: false, quiet: true, data })
    fs.rmSync(out, { recursive: true, force: true })
    const m = result.metrics
    const concept = m.every((x) => x.boundaryRate !== undefined)
    const record: ModelRecord = {
      ...staticCosts(model),
      losses: m.map((x) => x.loss),
      ce: m.map((x) => x.ce),
      ...(concept ? { boundaryRate: m.map((x) => x.boundaryRate!), ratioLoss: m.map((x) => x.ratioLoss!) } : {}),
      finalValBitsPerByte: result.finalValBitsPerByte
    }
    return record
  })

/** Trains both models (cpu backend) and returns what the fixture records. */
export const regressionRun: Effect.Effect<RegressionRecord, unknown> = Effect.gen(function*() {
  const a = yield* runOne(baseline)
  const b = yield* runOne(candidate)
  return { backend: "cpu" as const, settings, models: [a, b] as const }
}).pipe(Effect.provide(Layer.merge(backendLayer("cpu"), NodeServices.layer)))
