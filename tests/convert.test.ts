/**
 * Continual-training conversion (`train/Convert.ts`): a trained MoE's weights become a ConceptMoE
 * whose logits at the ramp's start equal the source's (exact mode), a matched conversion by the
 * solver, the ramp's formulation (exact at s = 0, the paper's at s = 1), and a converted run
 * directory that `train --resume` continues.
 */
import { NodeServices } from "@effect/platform-node"
import { assert, describe, it } from "@effect/vitest"
import { Effect } from "effect"
import * as fs from "node:fs"
import * as os from "node:os"
import * as path from "node:path"
import type { Tf } from "../src/graph/Apply.ts"
import { rampSpec } from "../src/blocks/Chunker.ts"
import { layer as backendLayer, load as loadBackend } from "../src/runtime/Backend.ts"
import { type Batch, forward, type ForwardOptions, type Lowered, materialize, release } from "../src/runtime/Lower.ts"
import { convertModel, convertRun, convertTensors, sourcePath } from "../src/train/Convert.ts"
import type { TensorData } from "../src/train/Checkpoint.ts"
import { encode } from "../src/train/Checkpoint.ts"
import { loadParams, train } from "../src/train/Train.ts"
import type { LoadedModel } from "../src/models/Load.ts"
import { TrainSettings } from "../src/train/Step.ts"
import { Schema } from "effect"
import { load } from "./support/models.ts"

const { tf } = await Effect.runPromise(loadBackend("cpu"))
const moe = { kind: "moe", name: "src", vocab: 64, hidden: 32, layers: 5, heads: 4, kvHeads: 2, experts: 8, topK: 2, expertHidden: 16, tiedEmbeddings: true, contextLength: 32 }
const L = 24
const batch: Batch = {
  rows: 2,
  length: L,
  ids: new Int32Array(2 * L).map((_, i) => (i * 7 + (i % 5) * 3) % 64),
  targets: new Int32Array(2 * L).map((_, i) => (i * 13 + 1) % 64),
  documentStarts: new Set([11, L + 17])
}

/** The source's parameters as a checkpoint's `param/…` tensors (random init, seed 3, as a trained model stands in). */
const checkpointOf = async (low: Lowered): Promise<Map<string, TensorData>> => {
  const out = new Map<string, TensorData>()
  for (const [p, w] of low.variables) out.set(`param/${p}`, { shape: w.shape, data: (await w.data()) as Float32Array })
  return out
}

const logits = (t: Tf, low: Lowered, options: ForwardOptions): Float32Array => {
  const out = t.tidy(() => forward(low, batch, options).logits)
  const v = out.dataSync() as Float32Array
  out.dispose()
  return v
}
const maxDiff = (a: Float32Array, b: Float32Array) => a.reduce((m, x, i) => Math.max(m, Math.abs(x - b[i]!)), 0)

/** The converted model lowered with the source's weights. */
const lowered = async (source: LoadedModel, target: LoadedModel, tensors: Map<string, TensorData>) => {
  const converted = await Effect.runPromise(convertTensors(source, target, tensors, "source.safetensors"))
  const low = materialize(tf, target.analysis, 11)
  await Effect.runPromise(loadParams(low, "converted", converted))
  return { low, converted }
}

describe("continual-training conversion", () => {
  it("maps the source's layers to encoder, concept model (looped or not) and decoder; the new parameters have no source", () => {
    assert.strictEqual(sourcePath("embed/weight", 6, 2, 2), "embed/weight")
    assert.strictEqual(sourcePath("encoder/1/mixer/attn/q.weight", 6, 2, 2), "layers/1/mixer/attn/q.weight")
    assert.strictEqual(sourcePath("concept/model/0/ffn/moe/router.weight", 6, 2, 2), "layers/2/ffn/moe/router.weight")
    assert.strictEqual(sourcePath("concept/model/loop/1/ffn/norm/weight", 6, 2, 2), "layers/3/ffn/norm/weight")
    assert.strictEqual(sourcePath("decoder/1/mixer/attn/o.weight", 6, 2, 2), "layers/5/mixer/attn/o.weight")
    assert.isUndefined(sourcePath("decoder/0/mixer/attn/kc.weight", 6, 2, 2))
    assert.isUndefined(sourcePath("concept/chunk/q.weight", 6, 2, 2))
  })

  it("exact mode: at ramp 0 (every token a boundary) the logits equal the source's, in evaluation and training; the paper's z = ĥ + ĉ does not", async () => {
    const source = await Effect.runPromise(load(moe))
    const srcLow = materialize(tf, source.analysis, 3)
    const tensors = await checkpointOf(srcLow)
    for (const merge of ["last", "sum"] as const) {
      const conv = await Effect.runPromise(convertModel(source, { ratio: 2, strategy: "topk", exact: true, encoderLayers: 1, decoderLayers: 2, merge }))
      assert.isUndefined(conv.matched)
      const { low, converted } = await lowered(source, conv.model, tensors)
      // new parameters: the chunk module identity, joint decoding zero, moments zero
      const qc = converted.get("param/decoder/0/mixer/attn/qc.weight")!
      assert.isTrue(qc.data.every((x) => x === 0))
      assert.strictEqual(converted.get("param/concept/chunk/q.weight")!.data[0], 1)
      assert.isTrue([...converted].filter(([k]) => k.startsWith("adam.")).every(([, t]) => t.data.every((x) => x === 0)))
      for (const training of [false, true]) {
        const expected = logits(tf, srcLow, { training, seed: 5 })
        const got = logits(tf, low, { training, seed: 5, ramp: 0 })
        assert.isAtMost(maxDiff(expected, got), 1e-5, `${merge}, training ${training}`)
        // every token is a concept at ramp 0
        const ctx = tf.tidy(() => {
          const r = forward(low, batch, { training, seed: 5, ramp: 0 })
          return { ...r.ctx.compression }
        })
        assert.strictEqual(ctx.concepts, ctx.tokens)
        // the paper's decoder input from the same weights: ĥ counted twice
        assert.isAbove(maxDiff(expected, logits(tf, low, { training, seed: 5, ramp: 1 })), 1e-2)
      }
      release(low)
    }
    release(srcLow)
  })

  it("the ramp: R_s from 1 to R; at s = 1 the model is the paper's (the same logits as without a ramp); between, the boundaries are floored", async () => {
    const chunk = { d: 8, ratio: 3, tau: 6, lambda: 0.03, ratioControl: "pi" as const, kp: 0.3, ki: 0.01, thresholdWeight: 0.5 }
    assert.strictEqual(rampSpec(chunk, undefined).ratio, 3)
    assert.strictEqual(rampSpec(chunk, 1).ratio, 3)
    assert.closeTo(rampSpec(chunk, 0.25).ratio, 1.5, 1e-12)
    assert.isAbove(rampSpec(chunk, 0).ratio, 1)
    const source = await Effect.runPromise(load(moe))
    const srcLow = materialize(tf, source.analysis, 3)
    const conv = await Effect.runPromise(convertModel(source, { ratio: 2, strategy: "topk", exact: true, encoderLayers: 1, decoderLayers: 2 }))
    const { low } = await lowered(source, conv.model, await checkpointOf(srcLow))
    assert.strictEqual(maxDiff(logits(tf, low, { training: false, seed: 1 }), logits(tf, low, { training: false, seed: 1, ramp: 1 })), 0)
    // at s = ½ every p ≥ ½: every token is a boundary at evaluation
    const at = (ramp: number) => tf.tidy(() => ({ ...forward(low, batch, { training: false, seed: 1, ramp }).ctx.compression }))
    assert.strictEqual(at(0.5).concepts, at(0.5).tokens)
    assert.isBelow(at(1).concepts, at(1).tokens)
    release(low)
    release(srcLow)
  })

  it("topk and loop conversions are matched with the source under the paper's convention, with more experts per token", async () => {
    const source = await Effect.runPromise(load({ ...moe, layers: 6 }))
    for (const strategy of ["topk", "loop"] as const) {
      const conv = await Effect.runPromise(convertModel(source, { ratio: 2, strategy, encoderLayers: 1, decoderLayers: 1, tolerance: 0.05 }))
      assert.isDefined(conv.matched)
      assert.isAtMost(Math.abs(conv.budget.paper.params), 0.05)
      assert.isAtMost(Math.abs(conv.budget.paper.flops), 0.05)
      // the chunk module and joint decoding are extra parameters when every part counts
      assert.isAbove(conv.budget.all.params, conv.budget.paper.params)
      // the freed compute goes to more experts per token, or (loop) to layers run twice as well
      if (strategy === "topk") assert.isAbove(conv.model.concept!.spec.topK!, 2)
      else assert.isNotNull(conv.model.concept!.layout.loop)
      // every trained weight is carried over
      const srcLow = materialize(tf, source.analysis, 3)
      const tensors = await checkpointOf(srcLow)
      const converted = await Effect.runPromise(convertTensors(source, conv.model, tensors, "x"))
      assert.deepStrictEqual(converted.get("param/decoder/0/ffn/moe/experts.up.weight")!.data, tensors.get("param/layers/5/ffn/moe/experts.up.weight")!.data)
      release(srcLow)
    }
  })

  it("a source that is not an MoE checkpoint is refused with a typed error", async () => {
    const dense = await Effect.runPromise(load({ kind: "dense", vocab: 64, hidden: 24, layers: 4, heads: 3, ffnHidden: 40, contextLength: 32 }))
    const r = await Effect.runPromise(Effect.flip(convertModel(dense, { ratio: 2, strategy: "topk" })))
    assert.strictEqual(r._tag, "ConvertError")
    assert.match(r.message, /no MoE layer/)
  })

  it("convert writes a run directory that train --resume continues through the ramp", async () => {
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), "convert-"))
    try {
      // byte-level: the training data are bytes
      const bytes = { ...moe, vocab: 256 }
      const source = await Effect.runPromise(load(bytes))
      const srcLow = materialize(tf, source.analysis, 3)
      const tensors = await checkpointOf(srcLow)
      release(srcLow)
      const settings = Schema.decodeUnknownSync(TrainSettings)({ seqLen: 16, batchSize: 2, steps: 3, evalEvery: 3, evalBatches: 1, checkpointEvery: 3, logEvery: 1 })
      const meta = { format: "conceptmoe/v1", step: "7", model: "src", config: JSON.stringify(bytes), settings: JSON.stringify(settings) }
      fs.mkdirSync(path.join(dir, "src"))
      fs.writeFileSync(path.join(dir, "src", "checkpoint.safetensors"), encode(tensors, meta))
      const out = path.join(dir, "ct")
      const r = await Effect.runPromise(
        convertRun(path.join(dir, "src"), out, { ratio: 2, strategy: "topk", encoderLayers: 1, decoderLayers: 1, tolerance: 0.05, rampSteps: 2 }).pipe(Effect.provide(NodeServices.layer))
      )
      assert.strictEqual(r.source.step, 7)
      assert.isTrue(fs.existsSync(r.files.checkpoint) && fs.existsSync(r.files.model) && fs.existsSync(r.files.train))
      const model = JSON.parse(fs.readFileSync(r.files.model, "utf8")) as Record<string, unknown>
      assert.strictEqual(model["rampSteps"], 2)
      const loaded = await Effect.runPromise(load(model, r.files.model))
      const result = await Effect.runPromise(
        train(loaded, settings, { out, resume: true, quiet: true }).pipe(Effect.provide([NodeServices.layer, backendLayer("cpu")]))
      )
      assert.deepStrictEqual(result.resumed?.step, 0)
      assert.strictEqual(result.metrics.length, 3)
      // step 0 at ramp 0: every token a concept; the ramp ends at step 2
      assert.strictEqual(result.metrics[0]!.compression, 1)
      assert.isAbove(result.metrics[2]!.compression!, 1)
      assert.isTrue(result.metrics.every((m) => Number.isFinite(m.loss)))
    } finally {
      fs.rmSync(dir, { recursive: true, force: true })
    }
  })
})
