/**
 * The checkpoint's two files (train/Checkpoint.ts): the model in the standard layout (the export's
 * names and PyTorch layout) and the optimizer state beside it, paired by step and weights hash;
 * checkpoints in the older single-file layout still load (generate, verify, resume); a kill between
 * the two renames leaves a pair that loads, and a mismatched pair is a typed error.
 */
import { NodeServices } from "@effect/platform-node"
import { assert, describe, it } from "@effect/vitest"
import { Effect, Layer, Schema } from "effect"
import * as fs from "node:fs"
import * as os from "node:os"
import * as path from "node:path"
import { graphOf, torchTensors } from "../src/export/Export.ts"
import type { ExportedGraph } from "../src/layout/Graph.ts"
import { loadTrained } from "../src/infer/Generate.ts"
import { layer as backendLayer } from "../src/runtime/Backend.ts"
import { release } from "../src/runtime/Lower.ts"
import { checkpointFiles, decode, encode, read, readChecked, type TensorData } from "../src/train/Checkpoint.ts"
import { byteTokenizer, sotuSplits } from "../src/train/Data.ts"
import { commit } from "../src/train/RunDir.ts"
import { train, TrainSettings } from "../src/train/Train.ts"
import { runInProcess } from "./support/cli-in-process.ts"
import { load } from "./support/models.ts"

// expertHidden ≠ hidden, so that a transposed matrix has another shape
const moe = { kind: "moe", name: "tiny", vocab: 256, hidden: 16, layers: 2, heads: 2, experts: 2, topK: 1, expertHidden: 24, tiedEmbeddings: true, contextLength: 32 }
const concept = { kind: "conceptmoe", name: "ctiny", baseline: { ...moe, layers: 3 }, ratio: 2, encoderLayers: 1, decoderLayers: 1, topK: 2 }
const data = sotuSplits(byteTokenizer, 0)
const settings = (extra: Record<string, unknown> = {}) =>
  Schema.decodeUnknownSync(TrainSettings)({ seqLen: 16, batchSize: 2, steps: 4, logEvery: 100, evalEvery: 100, evalBatches: 1, checkpointEvery: 2, ...extra })
const tmp = () => fs.mkdtempSync(path.join(os.tmpdir(), "conceptmoe-layout-"))

/** A run of `settings()` in `whole` (its result `ref`), and the same run stopped after step 2 in `out`. */
const uninterruptedAndStopped = (m: Parameters<typeof train>[0]) =>
  Effect.gen(function*() {
    const whole = tmp()
    const ref = yield* train(m, settings(), { out: whole, resume: false, quiet: true, data })
    const out = tmp()
    yield* train(m, settings(), { out, resume: false, quiet: true, data, until: 2 })
    return { whole, ref, out }
  })
const cpu = Effect.provide(Layer.merge(backendLayer("cpu"), NodeServices.layer))
const ckFile = (out: string) => path.join(out, "checkpoint.safetensors")
const optFile = (out: string) => path.join(out, "optimizer.safetensors")
const prevFile = (out: string) => path.join(out, "optimizer.prev.safetensors")
const raw = (file: string) => Effect.runSync(decode(fs.readFileSync(file), file))
const bytes = (t: TensorData) => Buffer.from(t.data.buffer, t.data.byteOffset, t.data.byteLength)

/** Every tensor of `a` equal bit for bit in `b`, and the same names. */
const sameTensors = (a: ReadonlyMap<string, TensorData>, b: ReadonlyMap<string, TensorData>, what: string) => {
  assert.deepStrictEqual([...a.keys()].sort(), [...b.keys()].sort(), what)
  for (const [name, t] of a) {
    assert.deepStrictEqual(b.get(name)!.shape, t.shape, `${what}: ${name}`)
    assert.isTrue(bytes(b.get(name)!).equals(bytes(t)), `${what}: ${name} differs`)
  }
}

/** The runtime's parameters by path, from a read checkpoint. */
const paramsOf = (tensors: ReadonlyMap<string, TensorData>) =>
  new Map([...tensors].filter(([k]) => k.startsWith("param/")).map(([k, t]) => [k.slice("param/".length), t.data]))

/**
 * Writes a checkpoint in the older single-file layout, as `conceptmoe train` wrote it before the
 * standard layout: `param/`, `adam.m/`, `adam.v/` by graph path, matrices `[in, out]`, every
 * metadata field in the one file, `format: "conceptmoe/v1"`; the optimizer file removed.
 */
const writeOldLayout = (out: string) =>
  Effect.gen(function*() {
    const ck = yield* read(ckFile(out))
    const keep = ["step", "model", "config", "settings", "data", "changes", "ratioControl", "matmul"]
    const metadata = Object.fromEntries(Object.entries(ck.metadata).filter(([k]) => keep.includes(k)))
    const tensors = new Map<string, TensorData>()
    for (const k of ck.tensors.keys()) {
      const p = k.replace(/^param\//, "")
      if (p === k) continue
      for (const prefix of ["param", "adam.m", "adam.v"]) tensors.set(`${prefix}/${p}`, ck.tensors.get(`${prefix}/${p}`)!)
    }
    fs.writeFileSync(ckFile(out), encode(tensors, { ...metadata, format: "conceptmoe/v1" }))
    fs.rmSync(optFile(out))
    return tensors
  })

describe("the model file is in the standard layout, the optimizer state beside it", () => {
  it.effect("an MoE: Hugging Face names (as Qwen3-MoE), matrices [out, in], experts one tensor each, the export's tensors bit for bit; moments in optimizer.safetensors under the same names", () =>
    Effect.gen(function*() {
      const m = yield* load(moe)
      const out = tmp()
      yield* train(m, settings({ steps: 2 }), { out, resume: false, quiet: true, data })
      const model = raw(ckFile(out))
      const opt = raw(optFile(out))
      assert.strictEqual(model.metadata["format"], "pt")
      assert.strictEqual(model.metadata["conceptmoe"], "checkpoint/2")
      assert.strictEqual(model.metadata["names"], "conceptmoe/moe")
      assert.strictEqual(model.metadata["step"], "2")
      assert.strictEqual(model.metadata["optimizer"], "optimizer.safetensors")
      assert.isUndefined(model.metadata["settings"], "the training settings are in the optimizer file")
      assert.strictEqual(JSON.parse(opt.metadata["settings"]!).steps, 2)
      assert.strictEqual(opt.metadata["conceptmoe"], "optimizer/2")
      assert.strictEqual(opt.metadata["step"], "2")
      assert.match(model.metadata["pair"]!, /^[0-9a-f]{64}$/)
      assert.strictEqual(opt.metadata["pair"], model.metadata["pair"])
      // names and layout
      assert.isFalse([...model.tensors.keys()].some((n) => n.startsWith("param/") || n.startsWith("adam")))
      assert.deepStrictEqual(model.tensors.get("model.layers.0.self_attn.q_proj.weight")!.shape, [16, 16])
      assert.deepStrictEqual(model.tensors.get("model.layers.1.mlp.experts.1.up_proj.weight")!.shape, [24, 16])
      assert.deepStrictEqual(model.tensors.get("model.layers.1.mlp.experts.1.down_proj.weight")!.shape, [16, 24])
      assert.deepStrictEqual(model.tensors.get("model.layers.0.mlp.gate.weight")!.shape, [2, 16])
      assert.isTrue(model.tensors.has("model.embed_tokens.weight"))
      assert.isFalse(model.tensors.has("lm_head.weight"), "tied to the embedding: not stored")
      // what the export writes as model.safetensors, from the parameters read back
      const view = yield* read(ckFile(out))
      const graph = graphOf(m) as ExportedGraph
      sameTensors(torchTensors(graph, paramsOf(view.tensors)), model.tensors, "model file vs export")
      // up_proj of expert 1 is our experts.up.weight [E, in, out] at e = 1, transposed
      const ours = view.tensors.get("param/layers/1/ffn/moe/experts.up.weight")!
      assert.deepStrictEqual(ours.shape, [2, 16, 24])
      const file = model.tensors.get("model.layers.1.mlp.experts.1.up_proj.weight")!.data
      for (const [i, j] of [[0, 0], [3, 7], [15, 23]] as const) assert.strictEqual(file[j * 16 + i], ours.data[16 * 24 + i * 24 + j])
      // the moments: the model file's names and layout, under exp_avg/ and exp_avg_sq/
      const m1 = opt.tensors.get("exp_avg/model.layers.1.mlp.experts.1.up_proj.weight")!
      assert.deepStrictEqual(m1.shape, [24, 16])
      assert.deepStrictEqual([...opt.tensors.keys()].sort(), [...model.tensors.keys()].flatMap((n) => [`exp_avg/${n}`, `exp_avg_sq/${n}`]).sort())
      const moments = torchTensors(graph, new Map([...view.tensors].filter(([k]) => k.startsWith("adam.m/")).map(([k, t]) => [k.slice(7), t.data])))
      for (const [n, t] of moments) assert.isTrue(bytes(opt.tensors.get(`exp_avg/${n}`)!).equals(bytes(t)), n)
      assert.isTrue([...moments.values()].some((t) => t.data.some((x) => x !== 0)), "moments after two steps are not all zero")
      assert.deepStrictEqual(fs.readdirSync(out).filter((f) => f.startsWith("optimizer")), ["optimizer.safetensors"])
    }).pipe(cpu), 120_000)

  it.effect("a ConceptMoE: native names for the chunk module and joint decoding (encoder.0.…, concept.chunk.q.weight, decoder.0.mixer.attn.qc.weight), and it resumes", () =>
    Effect.gen(function*() {
      const m = yield* load(concept)
      const out = tmp()
      yield* train(m, settings({ steps: 2 }), { out, resume: false, quiet: true, data })
      const model = raw(ckFile(out))
      assert.strictEqual(model.metadata["names"], "native")
      assert.deepStrictEqual(model.tensors.get("concept.chunk.q.weight")!.shape, [16, 16])
      assert.deepStrictEqual(model.tensors.get("decoder.0.mixer.attn.qc.weight")!.shape, [16, 16])
      assert.deepStrictEqual(model.tensors.get("encoder.0.ffn.moe.experts.up.weight")!.shape, [2, 24, 16])
      assert.deepStrictEqual(model.tensors.get("concept.model.0.ffn.moe.router.weight")!.shape, [2, 16])
      assert.isDefined(raw(optFile(out)).metadata["ratioControl"])
      const r = yield* train(m, settings({ steps: 3 }), { out, resume: true, quiet: true, data })
      assert.strictEqual(r.resumed?.step, 2)
      assert.strictEqual(raw(ckFile(out)).metadata["step"], "3")
    }).pipe(cpu), 120_000)
})

describe("checkpoints in the older single-file layout still load", () => {
  it.effect("param/… [in, out] with the moments in the same file: generate and verify read it, and resume equals the uninterrupted run bit for bit", () =>
    Effect.gen(function*() {
      const m = yield* load(moe)
      const { whole, ref, out } = yield* uninterruptedAndStopped(m)
      const old = yield* writeOldLayout(out)
      assert.isTrue(raw(ckFile(out)).tensors.has("param/layers/1/ffn/moe/experts.up.weight"))
      assert.isFalse(fs.existsSync(optFile(out)))
      // generate's loader: the weights as stored
      const t = yield* loadTrained(out)
      assert.strictEqual(t.step, 2)
      for (const [p, w] of t.low.variables) assert.isTrue(Buffer.from((w.dataSync() as Float32Array).buffer).equals(bytes(old.get(`param/${p}`)!)), p)
      release(t.low)
      // verify --checkpoint
      const v = yield* Effect.promise(() => runInProcess(["verify", "--checkpoint", out, "--backend", "cpu", "--seq-len", "16", "--batch", "1", "--format", "json"]))
      assert.strictEqual(v.code, 0, v.err)
      assert.strictEqual((JSON.parse(v.out) as { step: number }).step, 2)
      // resume: the same losses and the same weights and moments as the run never interrupted
      const r = yield* train(m, settings(), { out, resume: true, quiet: true, data })
      assert.strictEqual(r.resumed?.step, 2)
      assert.deepStrictEqual(r.metrics.map((x) => x.loss), ref.metrics.map((x) => x.loss))
      const a = yield* read(ckFile(whole))
      const b = yield* read(ckFile(out))
      sameTensors(a.tensors, b.tensors, "resumed from the older layout vs uninterrupted")
      // and it is now written in the standard layout
      assert.strictEqual(raw(ckFile(out)).metadata["conceptmoe"], "checkpoint/2")
    }).pipe(cpu), 180_000)
})

describe("the pair of files (a kill between the two renames)", () => {
  it.effect("optimizer renamed, model not: the previous optimizer file is kept and read, twice over; resume equals the uninterrupted run; a stray pair is a typed error", () =>
    Effect.gen(function*() {
      const m = yield* load(moe)
      const { whole, ref, out } = yield* uninterruptedAndStopped(m)
      const at2 = yield* read(ckFile(out))
      // the step-4 commit of the same run, cut off after the optimizer file's rename
      const four = yield* read(ckFile(whole))
      const files = checkpointFiles(m, ckFile(out), four.tensors, four.metadata)
      assert.deepStrictEqual(files.map((f) => path.basename(f.file)), ["optimizer.safetensors", "checkpoint.safetensors"])
      for (let cut = 0; cut < 2; cut++) {
        yield* commit(files.slice(0, 1))
        assert.strictEqual(raw(optFile(out)).metadata["step"], "4")
        assert.strictEqual(raw(prevFile(out)).metadata["step"], "2")
        const back = yield* readChecked(ckFile(out))
        assert.strictEqual(back.metadata.step, 2)
        sameTensors(at2.tensors, back.tensors, `step 2 read back after cut ${cut}`)
      }
      const r = yield* train(m, settings(), { out, resume: true, quiet: true, data })
      assert.deepStrictEqual(r.metrics.map((x) => x.loss), ref.metrics.map((x) => x.loss))
      sameTensors(four.tensors, (yield* read(ckFile(out))).tensors, "resumed after a cut commit vs uninterrupted")
      assert.isFalse(fs.existsSync(prevFile(out)), "the kept file is removed once the model file is renamed")

      // a model file with an optimizer file of another step and nothing else: refused, naming both
      const stray = tmp()
      fs.copyFileSync(path.join(out, "metrics.jsonl"), path.join(stray, "metrics.jsonl"))
      yield* commit(checkpointFiles(m, ckFile(stray), at2.tensors, at2.metadata))
      fs.copyFileSync(optFile(whole), optFile(stray))
      const e = yield* Effect.flip(train(m, settings(), { out: stray, resume: true, quiet: true, data }))
      assert.strictEqual(e._tag, "CheckpointError")
      assert.strictEqual((e as { field?: string }).field, "optimizer")
      assert.include(e.message, `${optFile(stray)} (step 4`)
      assert.include(e.message, `does not belong to ${ckFile(stray)} (step 2`)
      // generate and verify read the model file alone
      const t = yield* loadTrained(stray)
      assert.strictEqual(t.step, 2)
      release(t.low)
      // no optimizer file: resume says what is missing
      fs.rmSync(optFile(stray))
      const missing = yield* Effect.flip(train(m, settings(), { out: stray, resume: true, quiet: true, data }))
      assert.strictEqual(missing._tag, "CheckpointError")
      assert.include(missing.message, `${optFile(stray)}: no such file; resuming needs the optimizer state`)
    }).pipe(cpu), 180_000)
})
