/**
 * Training throughput. Run: node bench/train.ts [backend ...]   (default: wasm cpu)
 *
 * 1. The reference step of the runtime notes: a dense 2-layer d128 byte LM (4 heads, FFN 512,
 *    vocab 256), T=128, batch 8, ms per AdamW step.
 * 2. The `compare` pair (examples/compare/moe-tiny.json and its matched ConceptMoE, R=2, topk):
 *    training tokens/s of each, and their ratio, measured in one process, alternating models.
 * Each figure: 2 warm-up steps, then the median of N steps.
 */
import { NodeServices } from "@effect/platform-node"
import { Effect, Schema } from "effect"
import * as fs from "node:fs"
import * as path from "node:path"
import { modelFromJson } from "../src/models/Load.ts"
import { reallocate } from "../src/models/Reallocate.ts"
import { load as loadBackend } from "../src/runtime/Backend.ts"
import { materialize } from "../src/runtime/Lower.ts"
import { byteTokenizer, sotuSplits, trainBatch } from "../src/train/Data.ts"
import { trainStep, TrainSettings } from "../src/train/Train.ts"

const here = import.meta.dirname
const backends = process.argv.slice(2).length > 0 ? process.argv.slice(2) : ["wasm", "cpu"]
const data = sotuSplits(byteTokenizer, 0)
const settings = Schema.decodeUnknownSync(TrainSettings)({ seqLen: 128, batchSize: 8, steps: 1000 })

const stepTimes = (tf: any, model: any, n: number) => {
  const low = materialize(tf, model.analysis, 0)
  const opt = { m: new Map(), v: new Map(), step: 0 }
  for (const [p, w] of low.variables) {
    opt.m.set(p, tf.variable(tf.zerosLike(w), false))
    opt.v.set(p, tf.variable(tf.zerosLike(w), false))
  }
  const times: Array<number> = []
  for (let s = 0; s < n + 2; s++) {
    const batch = trainBatch(data.train, settings.batchSize, settings.seqLen, 0, s)
    const t0 = performance.now()
    trainStep(low, opt as never, batch, settings, s)
    if (s >= 2) times.push(performance.now() - t0)
  }
  for (const v of [...low.variables.values(), ...opt.m.values(), ...opt.v.values()]) v.dispose()
  return times.sort((a, b) => a - b)[Math.floor(times.length / 2)]!
}

const dense = { kind: "dense", name: "dense-2l-d128", vocab: 256, hidden: 128, layers: 2, heads: 4, ffnHidden: 512, activation: "gelu", contextLength: 128 }
const baselineJson = JSON.parse(fs.readFileSync(path.join(here, "..", "examples", "compare", "moe-tiny.json"), "utf8"))

const program = Effect.gen(function*() {
  const d = yield* modelFromJson(dense, "dense")
  const base = yield* modelFromJson(baselineJson, "moe-tiny.json")
  const [c] = yield* reallocate(base.decoder!, base.analysis, { ratio: 2, strategy: "topk", encoderLayers: 2, decoderLayers: 2, limit: 1 })
  const { ratio, ...rest } = c!.spec
  const concept = yield* modelFromJson({ kind: "conceptmoe", name: c!.name, baseline: baselineJson, ratio, ...rest }, "concept")
  for (const name of backends) {
    const rt = yield* loadBackend(name as never)
    const n = name === "cpu" ? 3 : 10
    const ms = stepTimes(rt.tf, d, n)
    const tMoE: Array<number> = []
    const tConcept: Array<number> = []
    for (let round = 0; round < 2; round++) {
      tMoE.push(stepTimes(rt.tf, base, n))
      tConcept.push(stepTimes(rt.tf, concept, n))
    }
    const tokens = settings.batchSize * settings.seqLen
    const moeTps = tokens / (Math.min(...tMoE) / 1000)
    const conceptTps = tokens / (Math.min(...tConcept) / 1000)
    console.log(`${rt.description}`)
    console.log(`  dense 2-layer d128 T128 batch 8: ${ms.toFixed(0)} ms/step (median of ${n})`)
    console.log(`  ${base.name}: ${moeTps.toFixed(0)} tokens/s; ${concept.name}: ${conceptTps.toFixed(0)} tokens/s; ConceptMoE / MoE = ${(conceptTps / moeTps).toFixed(2)}`)
  }
})

await Effect.runPromise(program.pipe(Effect.provide(NodeServices.layer)))
