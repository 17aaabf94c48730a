/**
 * The webgpu backend against the cpu reference: training steps (dense, MoE with grouped or capacity dispatch,
 * ConceptMoE through recorded reads) and evaluation give the cpu values. Runs wherever a WebGPU
 * adapter exists (an NVIDIA GPU through Vulkan, or lavapipe: `bash bench/gpu/lavapipe.sh &&
 * . .lavapipe/env.sh`) and skips, saying why, where none does (CI).
 */
import { assert, beforeAll, describe, it } from "@effect/vitest"
import { ConfigProvider, Effect, Schema } from "effect"
import type { Tensor, Tf } from "../src/graph/Apply.ts"
import { load as loadBackend } from "../src/runtime/Backend.ts"
import { gpuErrors } from "../src/runtime/webgpu/Fixes.ts"
import { adamStepValues, adamw, makeActivate, makeCombine, makeMaskedNll, makeRepeat, makeRmsNorm, makeMaskedSoftmax, makeRotate, makeRoute, makeSlots, makeSumSquares, makeTopMask, sumChunks } from "../src/runtime/Fused.ts"
import { routeByLoop, routingMask } from "./support/routing.ts"
import { makeOneHot } from "../src/runtime/Fixes.ts"
import { describeTuning, groupedProducts, makeGroupedMatMul, kernelNames, matMulChoices, tilesName, tunedChoices, matMulTuning, type MatMulKernel, parseMode, parseTiles, stockKernel, tiledKernel, tuneMatMuls, useMatMul } from "../src/runtime/webgpu/MatMul.ts"
import { verify, verifyAsync } from "../src/runtime/Verify.ts"
import { capture, NotCapturable, type StepProfile, writeFeeds } from "../src/runtime/webgpu/Capture.ts"
import { capturedTrainer } from "../src/train/Captured.ts"
import { NeedsFeedAsync, session } from "../src/runtime/Decode.ts"
import { forward, recordReads, replay } from "../src/runtime/Lower.ts"
import { type Batch, type Lowered, materialize, release } from "../src/runtime/Lower.ts"
import { evaluate, evaluateAsync, newOptimizer, trainStep, type StepResult, trainStepAsync, TrainSettings } from "../src/train/Step.ts"
import { load } from "./support/models.ts"
import { NodeServices } from "@effect/platform-node"
import { Layer } from "effect"
import * as fs from "node:fs"
import * as os from "node:os"
import * as path from "node:path"
import { layer as backendLayer } from "../src/runtime/Backend.ts"
import { byteTokenizer, sotuSplits } from "../src/train/Data.ts"
import { train } from "../src/train/Train.ts"
import { read as readCheckpoint } from "../src/train/Checkpoint.ts"

const gpu = await Effect.runPromise(Effect.result(loadBackend("webgpu")))
const available = gpu._tag === "Success"
const why = gpu._tag === "Failure" ? gpu.failure.message : ""
if (!available) console.log(`webgpu tests skipped: ${why}`)

const moe = { kind: "moe", vocab: 64, hidden: 32, layers: 3, heads: 4, kvHeads: 2, experts: 4, topK: 2, expertHidden: 16, sharedHidden: 16, tiedEmbeddings: true, contextLength: 16 }
export const webgpuModels: ReadonlyArray<readonly [string, Record<string, unknown>]> = [
  ["dense LM", { kind: "dense", vocab: 64, hidden: 32, layers: 2, heads: 4, ffnHidden: 64, activation: "gelu", contextLength: 16 }],
  ["MoE (grouped dispatch)", moe],
  ["ConceptMoE (recorded reads)", { kind: "conceptmoe", baseline: moe, ratio: 2, encoderLayers: 1, decoderLayers: 1, topK: 3 }]
]

const batch: Batch = {
  rows: 2,
  length: 16,
  ids: new Int32Array(32).map((_, i) => (i * 7 + (i % 3) * 5) % 64),
  targets: new Int32Array(32).map((_, i) => (i * 11 + 3) % 64)
}
const settings = Schema.decodeUnknownSync(TrainSettings)({ seqLen: 16, batchSize: 2, steps: 10, optimizer: { warmup: 1 } })

const values = async (low: Lowered) => Promise.all([...low.variables.values()].map((v) => v.data()))
const maxDiff = (a: ArrayLike<number>, b: ArrayLike<number>) => {
  let m = 0
  for (let i = 0; i < a.length; i++) m = Math.max(m, Math.abs(a[i]! - b[i]!))
  return m
}

describe.skipIf(!available)("webgpu against cpu", () => {
  const tf: Tf = gpu._tag === "Success" ? gpu.success.tf : (undefined as never)
  // tfjs's matmul unless a test says otherwise (auto would tune every shape the tests run)
  beforeAll(() => useMatMul(tf, "tfjs"))
  /** Loads the backend again, with the environment as it is now: the runtime reads CONCEPTMOE_* when a backend loads. */
  const reload = () => Effect.runPromise(loadBackend("webgpu").pipe(Effect.provideService(ConfigProvider.ConfigProvider, ConfigProvider.fromEnv())))

  const onBoth = async (f: () => Tensor) => {
    const out: Array<Float32Array> = []
    for (const b of ["cpu", "webgpu"]) {
      await tf.setBackend(b)
      const t = f()
      out.push((await t.data()) as Float32Array)
      t.dispose()
    }
    return out as [Float32Array, Float32Array]
  }

  for (const [name, cfg] of webgpuModels) {
    it(`${name}: verify on webgpu (reads recorded, sparse dispatch) reports the cpu's executed costs`, async () => {
      const m = await Effect.runPromise(load(cfg))
      const reports = []
      for (const b of ["cpu", "webgpu"] as const) {
        await tf.setBackend(b)
        const low = materialize(tf, m.analysis, 2)
        reports.push(b === "cpu" ? verify(low, batch) : await verifyAsync(low, batch))
        release(low)
      }
      const [cpu, web] = reports
      assert.deepStrictEqual(web!.flops, cpu!.flops)
      assert.deepStrictEqual(web!.compression, cpu!.compression)
      assert.strictEqual(web!.flops.executed, web!.flops.staticAtMeasured)
    })
  }

  const batchAt = (s: number): Batch => ({
    rows: 2,
    length: 16,
    ids: new Int32Array(32).map((_, i) => (i * 7 + s * 3) % 64),
    targets: new Int32Array(32).map((_, i) => (i === 5 + s ? -1 : (i * 11 + s) % 64)),
    documentStarts: new Set([3 + s])
  })
  /** Steps through `trainStepAsync` (eager), a captured trainer (recorded) and, with `withTfjs`, one that never records. */
  const trainBoth = async (cfg: Record<string, unknown>, steps: number, withTfjs = false) => {
    const m = await Effect.runPromise(load(cfg))
    await reload()
    const run = async (recorded: boolean | "tfjs") => {
      const low = materialize(tf, m.analysis, 5)
      const opt = newOptimizer(low)
      const trainer = recorded === false ? undefined : capturedTrainer(low, opt, settings, 2, 16, { record: recorded === true })
      const losses: Array<number> = []
      const profiles: Array<StepProfile> = []
      for (let s = 0; s < steps; s++) {
        // the last two replays are timed on the GPU: they must compute what the others do
        const profile = s === steps - 2 ? "dispatches" : s === steps - 1 ? "step" : undefined
        const r = trainer === undefined ? await trainStepAsync(low, opt, batchAt(s), settings, s) : await trainer.step(batchAt(s), s, profile === undefined ? {} : { profile })
        losses.push(r.loss)
        if ("profile" in r && r.profile !== undefined) profiles.push(r.profile)
      }
      const params = await values(low)
      const mode = trainer?.mode()
      trainer?.dispose()
      release(low)
      tf.dispose([...opt.m.values(), ...opt.v.values()])
      return { losses, params, mode, profiles }
    }
    return { eager: await run(false), recorded: await run(true), ...(withTfjs ? { tfjs: await run("tfjs") } : {}) }
  }

  // (the MoE once more with our matmul kernels, so that its grouped products read the expert
  // matrices in place, in the eager steps and in the replayed ones)
  const replayed = [...webgpuModels.slice(0, 2).map(([name, cfg]) => [name, cfg, "tfjs"] as const), ["MoE (grouped dispatch, our kernels)", moe, "32x32x16/4x4/v4"] as const]
  for (const [name, cfg, matmul] of replayed) {
    it(`${name}: recorded and replayed training steps equal tfjs's steps exactly`, async () => {
      useMatMul(tf, parseMode(matmul)!)
      let trained: Awaited<ReturnType<typeof trainBoth>>
      try {
        trained = await trainBoth(cfg, 7)
      } finally {
        useMatMul(tf, "tfjs")
      }
      const { eager, recorded } = trained
      assert.strictEqual(recorded.mode?.mode, "replay")
      // steps 3–6 were replays (5 and 6 timed on the GPU); batches, document starts and missing
      // targets change every step
      assert.deepStrictEqual(recorded.losses, eager.losses)
      recorded.params.forEach((p, i) => assert.deepStrictEqual(Array.from(p), Array.from(eager.params[i]!), `parameter ${i}`))
      // the profiles: every dispatch timed and named after its program, and the whole step's span
      const [each, whole] = recorded.profiles as [StepProfile, StepProfile]
      const mode = recorded.mode as { dispatches: number }
      assert.strictEqual(each.dispatches!.length, mode.dispatches)
      const programs = new Set(each.dispatches!.map((d) => d.program))
      assert.isTrue([...programs].some((p) => /MatMul/i.test(p)), [...programs].join(", "))
      assert.isTrue(programs.has("ConceptmoeAdamWeights"))
      if (matmul !== "tfjs") for (const kind of ["gather", "segment"]) assert.isTrue([...programs].some((p) => p.endsWith(`_${kind}`)), [...programs].join(", "))
      assert.isTrue(each.dispatches!.every((d) => d.us >= 0 && d.shape !== ""), JSON.stringify(each.dispatches!.filter((d) => !(d.us >= 0 && d.shape !== "")).slice(0, 3)))
      const kernelMs = each.dispatches!.reduce((a, d) => a + d.us, 0) / 1000
      assert.isAbove(kernelMs, 0)
      assert.isAtLeast(each.gpuMs, kernelMs)
      assert.isUndefined(whole.dispatches)
      assert.isAbove(whole.gpuMs, 0)
    })
  }

  it("a ConceptMoE trains with static shapes and is replayed: its steps equal the same steps through tfjs bit for bit, and the host path's", async () => {
    const concept = await trainBoth(webgpuModels[2]![1], 7, true)
    assert.strictEqual(concept.recorded.mode?.mode, "replay")
    assert.deepStrictEqual(concept.recorded.losses, concept.tfjs!.losses)
    concept.recorded.params.forEach((p, i) => assert.deepStrictEqual(Array.from(p), Array.from(concept.tfjs!.params[i]!), `parameter ${i}`))
    // enough concept slots (1.5·T/R) for every row here: the host path's boundaries, so its losses
    concept.recorded.losses.forEach((l, i) => assert.closeTo(l, concept.eager.losses[i]!, 1e-4, `step ${i}`))
  })

  it("replays submitted in parts of any size (down to one dispatch per command buffer) equal tfjs's steps", async () => {
    for (const every of ["1", "0"]) {
      process.env["CONCEPTMOE_SUBMIT_EVERY"] = every
      try {
        // steps 3 and 4 replay plainly (5 and 6 are profiled, in one command buffer)
        const { eager, recorded } = await trainBoth(webgpuModels[0]![1], 7)
        assert.strictEqual(recorded.mode?.mode, "replay")
        assert.deepStrictEqual(recorded.losses, eager.losses)
        recorded.params.forEach((p, i) => assert.deepStrictEqual(Array.from(p), Array.from(eager.params[i]!), `parameter ${i}`))
      } finally {
        delete process.env["CONCEPTMOE_SUBMIT_EVERY"]
        await reload()
      }
    }
  })

  it("steps with an undeclared changing upload are not replayed, and train as before", async () => {
    process.env["CONCEPTMOE_CAPTURE"] = "off"
    try {
      const off = await trainBoth(webgpuModels[1]![1], 2)
      assert.deepStrictEqual(off.recorded.mode, { mode: "eager", reason: "CONCEPTMOE_CAPTURE=off" })
      assert.deepStrictEqual(off.recorded.losses, off.eager.losses)
    } finally {
      delete process.env["CONCEPTMOE_CAPTURE"]
      await reload()
    }
    // op-by-op AdamW uploads the learning rate as a scalar each step: the two recordings differ
    process.env["CONCEPTMOE_FUSED"] = "off"
    try {
      const dense = await trainBoth(webgpuModels[0]![1], 4)
      assert.match((dense.recorded.mode as { reason: string }).reason, /changes between steps/)
      assert.deepStrictEqual(dense.recorded.losses, dense.eager.losses)
    } finally {
      delete process.env["CONCEPTMOE_FUSED"]
      await reload()
    }
  })

  it("capture replays a step with feeds and state, refuses read-backs, and notices outside assignments", async () => {
    await tf.setBackend("webgpu")
    const x = tf.keep(tf.zeros([300]))
    const v = tf.variable(tf.ones([300]))
    const step = () => [tf.tidy(() => {
      v.assign(tf.add(v, tf.mul(x, 2)))
      return tf.sum(v)
    })]
    writeFeeds(tf, [[x, new Float32Array(300).fill(1)]])
    tf.dispose(step())
    const c = capture(tf, [x], step)
    assert.strictEqual((await c.outputs[0]!.data())[0], 300 * 5)
    c.run([[x, new Float32Array(300).fill(0.5)]])
    assert.strictEqual((await c.outputs[0]!.data())[0], 300 * 6)
    assert.strictEqual((await v.data())[0], 6)
    v.assign(tf.zeros([300]))
    assert.throws(() => c.run([[x, new Float32Array(300)]]), /assigned outside/)
    c.dispose()
    assert.throws(() => capture(tf, [x], () => [tf.tensor1d(tf.add(x, 1).dataSync())]), NotCapturable)
    // after a stopped capture tfjs works as before (its pending encoder is an ordinary one again)
    assert.strictEqual((await tf.sum(tf.add(x, 1)).data())[0], 300 * 1.5)
    // buffer sizes never seen before the capture (tfjs's pool has no free list for them yet)
    const odd = 1237
    const y = tf.keep(tf.zeros([odd]))
    const fresh = capture(tf, [y], () => [tf.concat(Array.from({ length: 7 }, (_, i) => tf.mul(y, i)))])
    fresh.run([[y, new Float32Array(odd).fill(1)]])
    assert.deepStrictEqual(Array.from(await fresh.outputs[0]!.data()).filter((_, i) => i % odd === 0), [0, 1, 2, 3, 4, 5, 6])
    fresh.dispose()
    // two variables made from one tensor share storage: refused, with the finished step's outputs
    const shared = tf.ones([4])
    const a = tf.variable(shared)
    const b = tf.variable(shared)
    try {
      capture(tf, [], () => {
        a.assign(tf.add(a, 1))
        b.assign(tf.add(b, 2))
        return [tf.sum(a)]
      })
      assert.fail("expected NotCapturable")
    } catch (e) {
      assert.instanceOf(e, NotCapturable)
      assert.match((e as Error).message, /share their storage/)
      assert.strictEqual((await (e as NotCapturable).outputs![0]!.data())[0], 8)
      tf.dispose([...(e as NotCapturable).outputs!])
    }
    tf.dispose([x, v, y, a, b, shared])
    assert.deepStrictEqual(gpuErrors(tf), [])
  })

  it("feed (synchronous) refuses a piece that needs a host value on webgpu: NeedsFeedAsync, naming feedAsync", async () => {
    const m = await Effect.runPromise(load(webgpuModels[2]![1]))
    await tf.setBackend("webgpu")
    const low = materialize(tf, m.analysis, 3)
    const s = session(low, { rows: 1 })
    assert.throws(() => s.feed(Int32Array.of(1, 2, 3, 4), 4), NeedsFeedAsync, "this model reads host values while decoding (concept boundaries), which the webgpu backend does only asynchronously: use feedAsync / prefillAsync")
    s.dispose()
    release(low)
  })

  for (const [name, cfg] of webgpuModels) {
    it(`${name}: decoding in pieces with KV caches on the device gives the full pass's logits`, async () => {
      const m = await Effect.runPromise(load(cfg))
      await tf.setBackend("webgpu")
      const low = materialize(tf, m.analysis, 3)
      // unit-scale embeddings: the untrained chunk module then closes about half the tokens, per row differently
      for (const p of low.analysis.params) {
        if (p.part === "embedding" && p.tiedTo === undefined && p.name === "weight") low.variables.get(p.path)!.assign(tf.randomNormal(low.variables.get(p.path)!.shape, 0, 1, "float32", 5))
      }
      const rows = 3
      const T = 16
      const ids = new Int32Array(rows * T).map((_, i) => (i * 7 + Math.floor(i / T) * 13 + (i % 5) * 3 + ((i * i) % 11)) % 64)
      const full = { rows, length: T, ids }
      const reads = await recordReads(low, full, { training: false, seed: 0 })
      const expected = await tf.tidy(() => forward(low, full, { training: false, seed: 0, read: replay(reads) }).logits).data()
      const s = session(low, { rows, initialCapacity: 2 })
      let at = 0
      let worst = 0
      for (const n of [5, 4, 1, 1, 5]) {
        const piece = new Int32Array(rows * n)
        for (let r = 0; r < rows; r++) piece.set(ids.subarray(r * T + at, r * T + at + n), r * n)
        const logits = await s.feedAsync(piece, n)
        const got = await logits.data()
        logits.dispose()
        for (let r = 0; r < rows; r++) {
          for (let i = 0; i < n * 64; i++) worst = Math.max(worst, Math.abs(got[r * n * 64 + i]! - expected[(r * T + at) * 64 + i]!))
        }
        at += n
      }
      assert.isAtMost(worst, 1e-4)
      assert.strictEqual(s.length, T)
      if (m.concept !== undefined) {
        assert.strictEqual(s.compression.tokens, rows * T)
        assert.isAbove(s.compression.concepts, rows)
        assert.isBelow(s.compression.concepts, rows * T)
      }
      s.dispose()
      release(low)
      assert.deepStrictEqual(gpuErrors(tf), [])
    })
  }

  const products: ReadonlyArray<readonly [Array<number>, Array<number>, boolean, boolean]> = [
    [[37, 53], [53, 29], false, false], [[53, 37], [53, 29], true, false], [[37, 53], [29, 53], false, true],
    [[53, 37], [29, 53], true, true], [[3, 17, 65], [3, 65, 130], false, false], [[3, 65, 17], [1, 130, 65], true, true],
    [[1, 8, 40], [4, 40, 9], false, false], [[2, 2, 5, 7], [2, 2, 7, 3], false, false], [[1, 1], [1, 1], false, false],
    [[129, 200], [200, 1], false, false], [[3, 5], [1, 5, 2], false, false], [[1, 1, 3, 5], [4, 5, 2], false, false],
    // M, N, K divisible by 4 (the vec4 programs), K long enough to split, K not a multiple of the tiles
    [[36, 132], [132, 20], false, false], [[132, 36], [132, 20], true, false], [[36, 132], [20, 132], false, true],
    [[132, 36], [20, 132], true, true], [[3, 68, 260], [3, 260, 72], false, false], [[3, 260, 68], [1, 72, 260], true, true],
    [[2, 2, 8, 12], [2, 2, 12, 4], false, false], [[4, 4], [4, 4], false, false], [[200, 300], [300, 164], false, false]
  ]
  const operands = (c: typeof products[number], i: number) =>
    [tf.randomNormal(c[0], 0, 1, "float32", i + 1), tf.randomNormal(c[1], 0, 1, "float32", i + 50)] as const
  /** The product `c` on cpu and on webgpu (as the matmul mode now has it): largest difference. */
  const productDiff = async (c: typeof products[number], i: number) => {
    await tf.setBackend("cpu")
    const expected = tf.tidy(() => tf.matMul(...operands(c, i), c[2], c[3]))
    await tf.setBackend("webgpu")
    const got = tf.tidy(() => tf.matMul(...operands(c, i), c[2], c[3]))
    assert.deepStrictEqual(got.shape, expected.shape)
    const d = maxDiff(await got.data(), await expected.data())
    tf.dispose([got, expected])
    return d
  }

  it("our tiled matmuls equal the cpu's for every kernel, transposes, batches, edges and split K", async () => {
    try {
      for (const name of kernelNames) {
        useMatMul(tf, parseTiles(name)!)
        for (const [i, c] of products.entries()) assert.isAtMost(await productDiff(c, i), 1e-4, `${name}, case ${i}`)
        // the kernel ran (vec4 and split kernels on the products they cover), not tfjs's in its place
        assert.isAbove(matMulChoices(tf)[name] ?? 0, 0, name)
      }
      // a training step with one gives the cpu's loss
      useMatMul(tf, parseTiles("64x64x16/4x4/v4/k4")!)
      const m = await Effect.runPromise(load(webgpuModels[1]![1]))
      const losses: Array<number> = []
      for (const b of ["cpu", "webgpu"] as const) {
        await tf.setBackend(b)
        const low = materialize(tf, m.analysis, 5)
        const opt = newOptimizer(low)
        losses.push((b === "cpu" ? trainStep(low, opt, batch, settings, 0) : await trainStepAsync(low, opt, batch, settings, 0)).loss)
        losses.push((b === "cpu" ? trainStep(low, opt, batch, settings, 1) : await trainStepAsync(low, opt, batch, settings, 1)).loss)
        release(low)
        tf.dispose([...opt.m.values(), ...opt.v.values()])
      }
      assert.closeTo(losses[2]!, losses[0]!, 1e-4)
      assert.closeTo(losses[3]!, losses[1]!, 1e-4)
    } finally {
      useMatMul(tf, "tfjs")
    }
    for (const bad of ["64x64x16/3x4", "64x64x0/4x4", "256x256x16/4x4", "64x64x16/4x2/v4", "64x64x16/4x4/k0", "64x64x16/4x4/v2", "64x64x16/4x4/db", "64x64x8/4x4/v4/db", "64x64x16/4x4/db2", "128x128x16/8x8/v4/db2", "64x64x16/4x4/v4/db3"]) {
      assert.isUndefined(parseTiles(bad), bad)
    }
    assert.deepStrictEqual(parseTiles("128x64x16/8x4/v4/db/k2"), { tm: 128, tn: 64, tk: 16, rm: 8, rn: 4, vec4: true, prefetch: true, double: false, split: 2 })
    assert.deepStrictEqual(parseTiles("128x128x8/8x8/v4/db2"), { tm: 128, tn: 128, tk: 8, rm: 8, rn: 8, vec4: true, prefetch: true, double: true, split: 1 })
    for (const name of kernelNames) assert.strictEqual(tilesName(parseTiles(name)!), name)
    assert.deepStrictEqual([parseMode(undefined), parseMode("auto"), parseMode("tfjs"), parseMode("32x32")], ["auto", "auto", "tfjs", undefined])
    assert.deepStrictEqual(gpuErrors(tf), [])
    // every kernel on 21 products: about 80 s on lavapipe on 2 cores
  }, 240_000)

  it("the matmul tuner times the candidates per product, refuses one that computes something else, and keeps the fastest", async () => {
    const stock = stockKernel(tf)!
    // B·A for square operands: a kernel that runs and is wrong
    const wrong: MatMulKernel = {
      name: "wrong",
      covers: (p) => p.k === p.n && !p.transposeB,
      kernelFunc: (args) => stock.kernelFunc({ ...args, attrs: { ...args.attrs, transposeB: true } })
    }
    type WebGpu = { runWebGPUProgram: (p: unknown, inputs: Array<unknown>, dtype: string) => { dataId: unknown; shape: Array<number> }; disposeData: (id: unknown) => void }
    /** Runs a one-workgroup program of `code` over `inputs` (named `names`) into a tensor of `shape`. */
    const runTest = (be: WebGpu, key: string, names: Array<string>, inputs: Array<unknown>, shape: Array<number>, code: string) =>
      be.runWebGPUProgram({
        variableNames: names,
        outputShape: shape,
        shaderKey: key,
        dispatchLayout: { x: [0] },
        dispatch: [1, 1, 1],
        workgroupSize: [64, 1, 1],
        size: true,
        getUserCode: () => code
      }, inputs, "float32")
    // a kernel whose shader the device refuses: tfjs's product, then a program that does not compile
    const broken: MatMulKernel = {
      name: "broken",
      covers: () => true,
      kernelFunc: (args) => {
        const be = args.backend as WebGpu
        const good = stock.kernelFunc(args) as { dataId: unknown; shape: Array<number> }
        const out = runTest(be, "conceptmoeTestBroken", ["X"], [good], good.shape, "fn main(index : i32) { result[index] = notDeclaredAnywhere; }")
        be.disposeData(good.dataId)
        return out as never
      }
    }
    // a kernel that compiles and runs and writes nothing: its output keeps what its pooled buffer
    // held, which must never pass for the product (listed last: the others' timed products are
    // in the pool by then)
    const silent: MatMulKernel = {
      name: "silent",
      covers: (p) => p.batchA === p.batchB,
      kernelFunc: (args) => {
        const a = args.inputs["a"] as unknown as { shape: Array<number> }
        const b = args.inputs["b"] as unknown as { shape: Array<number> }
        const { transposeA, transposeB } = args.attrs as { transposeA: boolean; transposeB: boolean }
        const shape = [...a.shape.slice(0, -2), a.shape.at(transposeA ? -1 : -2)!, b.shape.at(transposeB ? -2 : -1)!]
        // the inputs and uniforms are referenced (an unused binding would make the bind group invalid); nothing is written
        return runTest(args.backend as WebGpu, "conceptmoeTestSilent", ["A", "B"], [a, b], shape,
          "fn main(index : i32) { if (index < -1 - uniforms.size) { result[0] = A[0] + B[0]; } }") as never
      }
    }
    const candidates = [stock, wrong, broken, tiledKernel(tf, parseTiles("64x64x16/4x4/v4")!), tiledKernel(tf, parseTiles("32x32x32/4x4")!), silent]
    // products where B is square (and B·Aᵀ ≠ A·B: not 1×1)
    const square = products.filter((c) => (c[1].at(-1) === c[1].at(-2) || c[3]) && c[1].at(-1)! > 1)
    try {
      useMatMul(tf, "auto", { candidates })
      const before = matMulTuning(tf).length
      for (const [i, c] of square.entries()) await productDiff(c, i)
      const rows = await tuneMatMuls(tf, { reps: 2 })
      assert.isAtLeast(rows.length, 4)
      assert.strictEqual(matMulTuning(tf).length, before + rows.length)
      for (const r of rows) {
        assert.include(["tfjs", "64x64x16/4x4/v4", "32x32x32/4x4"], r.chosen, r.product)
        assert.notProperty(r.us, "wrong")
        assert.notProperty(r.us, "silent")
        // every candidate that ran was timed, and the chosen one is the fastest of them
        assert.isAtLeast(Object.keys(r.us).length, 2)
        assert.strictEqual(Math.min(...Object.values(r.us)), r.us[r.chosen])
      }
      // the wrong kernel covered some products and was refused on each of them
      assert.isAbove(rows.filter((r) => "wrong" in r.rejected).length, 0)
      for (const r of rows.filter((r) => "wrong" in r.rejected)) assert.isAbove(r.rejected["wrong"]!, 1e-2)
      // the broken one was left out of every product with the device's message, and its errors
      // did not reach the device-error log (checked at the end) or drop other work's commands
      for (const r of rows) {
        assert.notProperty(r.us, "broken")
        assert.match(r.failed["broken"] ?? "", /\S/, r.product)
      }
      // the silent one ran without a device error on the products it covers and was refused on each
      const covered = rows.filter((r) => "silent" in r.rejected || "silent" in r.us || "silent" in r.failed)
      assert.isAtLeast(covered.length, 3)
      for (const r of covered) assert.property(r.rejected, "silent", `${r.product}: ${JSON.stringify(r.failed)}`)
      // the log line names what was left out and why
      const line = describeTuning(rows)
      assert.match(line, new RegExp(`refused by the device: broken ×${rows.length}(;|$)`))
      assert.match(line, /results unlike tfjs's: .*silent ×\d+/)
      assert.match(line, /results unlike tfjs's: .*wrong ×\d+/)
      // the tuned choices compute the cpu's products; tuning again has nothing left to do
      for (const [i, c] of square.entries()) assert.isAtMost(await productDiff(c, i), 1e-4, `case ${i}`)
      assert.deepStrictEqual(await tuneMatMuls(tf), [])
      // what tuning chose is what runs
      const wins = new Map<string, number>()
      for (const r of rows) wins.set(r.chosen, (wins.get(r.chosen) ?? 0) + 1)
      for (const [k, n] of wins) assert.isAtLeast(matMulChoices(tf)[k] ?? 0, n, k)
      // a new mode set while a tuning awaits the GPU: the tuning stops and keeps nothing
      useMatMul(tf, "auto", { candidates })
      for (const [i, c] of square.entries()) await productDiff(c, i)
      const pending = tuneMatMuls(tf, { reps: 1 })
      useMatMul(tf, "auto", { candidates })
      assert.deepStrictEqual(await pending, [])
      assert.deepStrictEqual(tunedChoices(tf), {})
    } finally {
      useMatMul(tf, "tfjs")
    }
    assert.deepStrictEqual(gpuErrors(tf), [])
  })

  for (const [name, cfg] of webgpuModels.slice(0, 2)) {
    it(`${name}: a captured trainer in auto mode tunes step 0's products, then replays with the chosen kernels and the cpu's losses`, async () => {
      const m = await Effect.runPromise(load(cfg))
      const cpuLosses: Array<number> = []
      await tf.setBackend("cpu")
      {
        const low = materialize(tf, m.analysis, 5)
        const opt = newOptimizer(low)
        for (let s = 0; s < 5; s++) cpuLosses.push(trainStep(low, opt, batchAt(s), settings, s).loss)
        release(low)
        tf.dispose([...opt.m.values(), ...opt.v.values()])
      }
      await tf.setBackend("webgpu")
      try {
        useMatMul(tf, "auto", { candidates: [stockKernel(tf)!, tiledKernel(tf, parseTiles("32x32x16/4x4/v4")!), tiledKernel(tf, parseTiles("32x32x32/4x4")!)] })
        const low = materialize(tf, m.analysis, 5)
        const opt = newOptimizer(low)
        const trainer = capturedTrainer(low, opt, settings, 2, 16)
        const losses: Array<number> = []
        const programs = new Set<string>()
        for (let s = 0; s < 5; s++) {
          const r = await trainer.step(batchAt(s), s, s === 4 ? { profile: "dispatches" } : {})
          losses.push(r.loss)
          for (const d of r.profile?.dispatches ?? []) programs.add(d.program)
        }
        // forward and backward products of the step, each timed
        assert.isAtLeast(trainer.tuned().length, 6)
        for (const r of trainer.tuned()) assert.isAtLeast(Object.keys(r.us).length, r.product.startsWith("grouped ") ? 1 : 2, r.product)
        // steps 1–4 ran no product that step 0 had not (nothing left to tune)
        assert.deepStrictEqual(await tuneMatMuls(tf), [])
        assert.strictEqual(trainer.mode().mode, "replay")
        assert.isTrue([...programs].some((p) => p.startsWith("conceptmoeMatMul_")), [...programs].join(", "))
        if (cfg["kind"] === "moe") {
          // the experts' products and their gradients (grouped dispatch) were tuned among our kernels
          // only, and the replayed step reads the expert matrices in place: no gathered copies
          const grouped = trainer.tuned().filter((r) => r.product.startsWith("grouped "))
          assert.strictEqual(grouped.length, 6, trainer.tuned().map((r) => r.product).join(", "))
          for (const r of grouped) assert.notProperty(r.us, "tfjs", r.product)
          for (const kind of ["gather", "segment"]) assert.isTrue([...programs].some((p) => p.endsWith(`_${kind}`)), [...programs].join(", "))
          assert.isFalse(programs.has("ConceptmoeSumGroups"), [...programs].join(", "))
        }
        losses.forEach((l, s) => assert.closeTo(l, cpuLosses[s]!, 1e-4, `step ${s}`))
        trainer.dispose()
        release(low)
        tf.dispose([...opt.m.values(), ...opt.v.values()])
      } finally {
        useMatMul(tf, "tfjs")
      }
      assert.deepStrictEqual(gpuErrors(tf), [])
    })
  }

  it("GPU timestamps are not quantized (the tuner times kernels of a few µs)", async () => {
    const a = tf.randomNormal([64, 64])
    const times: Array<number> = []
    for (let i = 0; i < 6; i++) {
      const t = (await tf.time(() => tf.dispose(tf.add(a, a)))) as unknown as { kernelMs: number }
      times.push(t.kernelMs)
    }
    a.dispose()
    // Dawn's default rounds every timestamp to 32.768 µs: every time would be a multiple of it
    const quantum = 0.032768
    assert.isTrue(times.some((ms) => Math.abs(ms / quantum - Math.round(ms / quantum)) > 1e-3), times.join(", "))
  })

  it("addN of more tensors than a shader may bind sums them (fix 6)", async () => {
    const [cpu, web] = await onBoth(() => tf.tidy(() => tf.addN(Array.from({ length: 20 }, (_, i) => tf.fill([5], i + 0.5)))))
    assert.deepStrictEqual(Array.from(web), Array.from(cpu))
    assert.strictEqual(web[0], 200)
    assert.deepStrictEqual(gpuErrors(tf), [])
  })

  it("a reverse cumsum is right for every length, not only the first one compiled (fix 7)", async () => {
    for (const n of [2, 5, 3, 9, 16]) {
      const xs = Array.from({ length: 2 * n }, (_, i) => Math.sin(i) + 1)
      for (const exclusive of [false, true]) {
        const [cpu, web] = await onBoth(() => tf.tidy(() => tf.cumsum(tf.tensor2d(xs, [2, n]), 1, exclusive, true)))
        assert.isAtMost(maxDiff(web, cpu), 1e-5, `length ${n}, exclusive ${exclusive}`)
      }
      const [cpu, web] = await onBoth(() => tf.tidy(() => tf.grad((x: Tensor) => tf.sum(tf.mul(tf.cumsum(x), tf.range(1, n + 1))))(tf.tensor1d(xs.slice(0, n)))))
      assert.isAtMost(maxDiff(web, cpu), 1e-5, `gradient, length ${n}`)
    }
  })

  it("the fused AdamW kernels give the op-by-op update of the cpu backend", async () => {
    const n = 1000
    const val = (k: number) => Array.from({ length: n }, (_, i) => Math.sin(i * k) * (k % 2 === 0 ? 0.01 : 1))
    for (const decay of [0, 0.1]) {
      const h = { beta1: 0.9, beta2: 0.95, eps: 1e-8, c1: 1 - 0.9 ** 3, c2: 1 - 0.95 ** 3, lr: 3e-3, lrScale: 0.5, decay }
      const outputs: Array<Array<Float32Array>> = []
      for (const b of ["cpu", "webgpu"]) {
        await tf.setBackend(b)
        const r = tf.tidy(() => {
          const [w, g, m] = [1, 3, 4].map((k) => tf.tensor2d(val(k), [25, 40]))
          const sq = tf.square(tf.tensor2d(val(2), [25, 40]))
          return adamw(tf, w!, g!, m!, sq, tf.tensor1d([0.5]), h, adamStepValues(tf, h))
        })
        outputs.push(await Promise.all([r.w.data(), r.m.data(), r.v.data()]) as Array<Float32Array>)
        tf.dispose([r.w, r.m, r.v])
      }
      outputs[0]!.forEach((cpu, i) => assert.isAtMost(maxDiff(outputs[1]![i]!, cpu), 2e-6, `output ${i}, decay ${decay}`))
    }
    assert.deepStrictEqual(gpuErrors(tf), [])
  })

  it("the fused RMSNorm gives the op-by-op values and gradients of the cpu backend", async () => {
    for (const shape of [[7, 33], [5, 4, 16], [3, 200], [130, 8]]) {
      const d = shape[shape.length - 1]!
      const size = shape.reduce((a, b) => a * b, 1)
      const results: Array<Array<Float32Array>> = []
      for (const b of ["cpu", "webgpu"]) {
        await tf.setBackend(b)
        const norm = makeRmsNorm(tf)
        const x = tf.tensor(Array.from({ length: size }, (_, i) => Math.sin(i * 0.37) * 2), shape)
        const g = tf.tensor1d(Array.from({ length: d }, (_, i) => 1 + 0.1 * Math.cos(i)))
        const w = tf.tensor(Array.from({ length: size }, (_, i) => Math.cos(i * 0.11)), shape)
        const y = norm(x, g, 1e-6)
        const [dx, dg] = tf.grads((a: Tensor, c: Tensor) => tf.sum(tf.mul(norm(a, c, 1e-6), w)))([x, g])
        results.push(await Promise.all([y.data(), dx!.data(), dg!.data()]) as Array<Float32Array>)
        tf.dispose([x, g, w, y, dx!, dg!])
      }
      results[0]!.forEach((cpu, i) => assert.isAtMost(maxDiff(results[1]![i]!, cpu), 5e-5, `${shape.join("×")}, output ${i}`))
    }
    assert.deepStrictEqual(gpuErrors(tf), [])
  })

  it("the fused rotary embedding gives the op-by-op values and gradients of the cpu backend", async () => {
    for (const [n, heads, hd, dim, tableRows] of [[6, 3, 8, 8, 6], [5, 2, 12, 8, 5], [9, 4, 16, 4, 9], [4, 2, 8, 8, 1]] as const) {
      const half = dim / 2
      const results: Array<Array<Float32Array>> = []
      for (const b of ["cpu", "webgpu"]) {
        await tf.setBackend(b)
        const rotate = makeRotate(tf)
        const x = tf.tensor3d(Array.from({ length: n * heads * hd }, (_, i) => Math.sin(i * 0.29)), [n, heads, hd])
        // tables of one row broadcast over the positions (op by op on every backend)
        const angles = Array.from({ length: tableRows * half }, (_, i) => (Math.floor(i / half) + 1) * 10000 ** (-(2 * (i % half)) / dim))
        const cos = tf.tensor3d(angles.map(Math.cos), [tableRows, 1, half])
        const sin = tf.tensor3d(angles.map(Math.sin), [tableRows, 1, half])
        const w = tf.tensor3d(Array.from({ length: n * heads * hd }, (_, i) => Math.cos(i * 0.13)), [n, heads, hd])
        const y = rotate(x, dim, cos, sin)
        const dx = tf.grad((a: Tensor) => tf.sum(tf.mul(rotate(a, dim, cos, sin), w)))(x)
        results.push(await Promise.all([y.data(), dx.data()]) as Array<Float32Array>)
        tf.dispose([x, cos, sin, w, y, dx])
      }
      results[0]!.forEach((cpu, i) => assert.isAtMost(maxDiff(results[1]![i]!, cpu), 1e-5, `${n}×${heads}×${hd}, dim ${dim}, output ${i}`))
    }
    assert.deepStrictEqual(gpuErrors(tf), [])
  })

  it("the fused GELU and SiLU give the op-by-op values and gradients of the cpu backend", async () => {
    for (const a of ["gelu", "silu", "swiglu", "geglu"] as const) {
      const results: Array<Array<Float32Array>> = []
      for (const b of ["cpu", "webgpu"]) {
        await tf.setBackend(b)
        const activate = makeActivate(tf)
        const x = tf.tensor2d(Array.from({ length: 300 }, (_, i) => (i - 150) / 25), [20, 15])
        const w = tf.tensor2d(Array.from({ length: 300 }, (_, i) => Math.cos(i * 0.3)), [20, 15])
        const y = activate(x, a)
        const dx = tf.grad((t: Tensor) => tf.sum(tf.mul(activate(t, a), w)))(x)
        results.push(await Promise.all([y.data(), dx.data()]) as Array<Float32Array>)
        tf.dispose([x, w, y, dx])
      }
      results[0]!.forEach((cpu, i) => assert.isAtMost(maxDiff(results[1]![i]!, cpu), 2e-6, `${a}, output ${i}`))
    }
    assert.deepStrictEqual(gpuErrors(tf), [])
  })

  it("the fused masked softmax gives the op-by-op values and gradients of the cpu backend", async () => {
    // [leading, n, len] with a causal-like mask over [n, len] (−1e9 where a query may not look)
    for (const [lead, n, len, past] of [[6, 5, 5, 0], [4, 1, 9, 8], [3, 70, 70, 0], [2, 3, 300, 297]] as const) {
      const results: Array<Array<Float32Array>> = []
      for (const b of ["cpu", "webgpu"]) {
        await tf.setBackend(b)
        const softmax = makeMaskedSoftmax(tf)
        const s = tf.tensor3d(Array.from({ length: lead * n * len }, (_, i) => Math.sin(i * 0.37) * 4), [lead, n, len])
        const mask = tf.tensor2d(Array.from({ length: n * len }, (_, i) => (i % len <= past + Math.floor(i / len) ? 0 : -1e9)), [n, len])
        const w = tf.tensor3d(Array.from({ length: lead * n * len }, (_, i) => Math.cos(i * 0.11)), [lead, n, len])
        const y = softmax(s, 0.125, mask)
        const ds = tf.grad((t: Tensor) => tf.sum(tf.mul(softmax(t, 0.125, mask), w)))(s)
        results.push(await Promise.all([y.data(), ds.data()]) as Array<Float32Array>)
        tf.dispose([s, mask, w, y, ds])
      }
      results[0]!.forEach((cpu, i) => assert.isAtMost(maxDiff(results[1]![i]!, cpu), 1e-6, `[${lead}, ${n}, ${len}], output ${i}`))
    }
    assert.deepStrictEqual(gpuErrors(tf), [])
  })

  it("the fused sum of squares gives the cpu's, of one tensor and of several, summed in chunks or whole", async () => {
    // chunks of at least 4,096 elements, at most 1,024 of them: [600, 700] in 100, [300, 300] in 20,
    // [70000, 1, 256] in 1,024, a prime size whole
    assert.deepStrictEqual([1, 7, 8191, 8192, 90000, 420000, 70000 * 256, 8209].map(sumChunks), [1, 1, 1, 2, 20, 100, 1024, 1])
    const shapes = [[1], [7], [1000, 3], [300, 300], [2, 3, 4, 5], [600, 700], [4, 64, 32], [70000, 1, 256], [8209]]
    const tensor = (shape: Array<number>, k: number) =>
      tf.tensor(Array.from({ length: shape.reduce((a, b) => a * b, 1) }, (_, i) => Math.sin(i * 0.7 + k) * 3), shape)
    for (const [k, shape] of shapes.entries()) {
      const [cpu, web] = await onBoth(() => tf.tidy(() => makeSumSquares(tf)([tensor(shape, k)])))
      assert.closeTo(web[0]!, cpu[0]!, 1e-5 * cpu[0]!, shape.join("×"))
    }
    const [cpu, web] = await onBoth(() => tf.tidy(() => makeSumSquares(tf)(shapes.map(tensor))))
    assert.closeTo(web[0]!, cpu[0]!, 1e-5 * cpu[0]!, "all")
    assert.deepStrictEqual(gpuErrors(tf), [])
  })

  it("the fused top-k mask gives the cpu's top-k, ties to the lower index", async () => {
    const cases: ReadonlyArray<readonly [Array<Array<number>>, number]> = [
      [Array.from({ length: 37 }, (_, i) => Array.from({ length: 16 }, (_, j) => Math.sin(i * 16 + j * 1.7))), 2],
      [Array.from({ length: 5 }, (_, i) => Array.from({ length: 64 }, (_, j) => Math.cos(i * 64 + j * 0.3))), 6],
      [[[1, 1, 1, 0.5], [0.5, 1, 0.5, 1], [2, 2, 2, 2]], 2],
      [[[3, 1, 2]], 3]
    ]
    for (const [rows, k] of cases) {
      const [cpu, web] = await onBoth(() => tf.tidy(() => makeTopMask(tf, makeOneHot(tf))(tf.tensor2d(rows), k)))
      assert.deepStrictEqual(Array.from(web), Array.from(cpu), `k ${k}`)
      // k ones per row
      assert.strictEqual(cpu.reduce((a, b) => a + b, 0), rows.length * k)
    }
    assert.deepStrictEqual(gpuErrors(tf), [])
  })

  it("the fused repeat (MoE experts, GQA heads) and MoE combine give the op-by-op values and gradients of the cpu backend", async () => {
    for (const [E, n, d] of [[4, 7, 5], [16, 33, 64], [3, 1, 130]] as const) {
      const results: Array<Array<Float32Array>> = []
      for (const b of ["cpu", "webgpu"]) {
        await tf.setBackend(b)
        const repeat = makeRepeat(tf)
        const combine = makeCombine(tf)
        const experts = { combine, repeat: (t: Tensor, times: number) => tf.reshape(repeat(tf.reshape(t, [1, ...t.shape]), times), [times, ...t.shape]) }
        const x = tf.tensor2d(Array.from({ length: n * d }, (_, i) => Math.sin(i * 0.37)), [n, d])
        const g = tf.tensor2d(Array.from({ length: n * E }, (_, i) => Math.cos(i * 0.71)), [n, E])
        const w = tf.tensor3d(Array.from({ length: E * n * d }, (_, i) => Math.cos(i * 0.13)), [E, n, d])
        const v = tf.tensor2d(Array.from({ length: n * d }, (_, i) => Math.sin(i * 0.11) + 0.5), [n, d])
        // ys depends on x through a product, so both combine gradients and the repeat's are exercised
        const f = (xt: Tensor, gt: Tensor) => tf.sum(tf.mul(experts.combine(tf.mul(experts.repeat(xt, E), w), gt), v))
        const y = experts.combine(tf.mul(experts.repeat(x, E), w), g)
        const [dx, dg] = tf.grads(f)([x, g])
        // a GQA-like repeat: [o, a, b] → [o, times, a, b]
        const t = tf.tensor3d(Array.from({ length: 3 * n * 5 }, (_, i) => Math.sin(i * 0.5)), [3, n, 5])
        const wt = tf.tensor4d(Array.from({ length: 3 * E * n * 5 }, (_, i) => Math.cos(i * 0.29)), [3, E, n, 5])
        const rt = repeat(t, E)
        const dt = tf.grad((u: Tensor) => tf.sum(tf.mul(repeat(u, E), wt)))(t)
        results.push(await Promise.all([y.data(), dx!.data(), dg!.data(), rt.data(), dt.data()]) as Array<Float32Array>)
        tf.dispose([x, g, w, v, y, dx!, dg!, t, wt, rt, dt])
      }
      results[0]!.forEach((cpu, i) => assert.isAtMost(maxDiff(results[1]![i]!, cpu), 1e-5, `[${E}, ${n}, ${d}], output ${i}`))
    }
    assert.deepStrictEqual(gpuErrors(tf), [])
  })

  it("the fused routing (by capacity and by tile), row gathers and group gathers give the cpu's tables, values and gradients", async () => {
    const cases = [[33, 8, 2, 3, 5, 0], [130, 16, 2, 20, 64, 7], [5, 4, 3, 10, 3, 0], [70, 3, 1, 70, 2, 4], [200, 16, 2, 16, 8, 0]] as const
    for (const [n, E, k, size, d, empty] of cases) {
      for (const layout of [{ capacity: size }, { tile: size }]) {
        const what = `[${n}, ${E}, ${d}] top-${k}, ${JSON.stringify(layout)}`
        const results: Array<Array<Float32Array>> = []
        for (const b of ["cpu", "webgpu"]) {
          await tf.setBackend(b)
          const mask = routingMask(n, E, k, empty)
          const { slots, tokens, groups } = makeRoute(tf)(tf.tensor2d(mask, [n, E]), layout, k)
          const rows = tokens.shape[0]!
          const { toSlots, fromSlots, gatherGroups } = makeSlots(tf)
          const x = tf.tensor2d(Array.from({ length: n * d }, (_, i) => Math.sin(i * 0.37)), [n, d])
          const w = tf.tensor2d(Array.from({ length: n * E }, (_, i) => Math.cos(i * 0.71)), [n, E])
          // a per-expert scale, gathered per group by tile, so that the group gather's gradient is exercised
          const perExpert = tf.tensor3d(Array.from({ length: E * 2 * d }, (_, i) => Math.cos(i * 0.13) + 0.5), [E, 2, d])
          const v = tf.tensor2d(Array.from({ length: n * d }, (_, i) => Math.sin(i * 0.11) + 0.5), [n, d])
          const f = (xt: Tensor, wt: Tensor, st: Tensor) => {
            const batch = groups === undefined ? E : groups.shape[0]!
            const scale = groups === undefined ? st : gatherGroups(st, groups)
            const scaled = tf.mul(tf.reshape(toSlots(xt, tokens, slots), [batch, rows / batch, d]), tf.slice(scale, [0, 0, 0], [batch, 1, d]))
            return fromSlots(tf.reshape(scaled, [rows, d]), slots, tokens, wt)
          }
          const y = f(x, w, perExpert)
          const [dx, dw, ds] = tf.grads((xt: Tensor, wt: Tensor, st: Tensor) => tf.sum(tf.mul(f(xt, wt, st), v)))([x, w, perExpert])
          const tables = [slots, tokens, ...(groups === undefined ? [] : [groups])]
          results.push(await Promise.all([...tables, y, dx!, dw!, ds!].map((t) => t.data())) as Array<Float32Array>)
          if (b === "cpu") {
            const expected = routeByLoop(mask, n, E, layout, k)
            assert.deepStrictEqual(Array.from(results[0]![0]!), expected.slots, what)
            assert.deepStrictEqual(Array.from(results[0]![1]!), expected.tokens, what)
            if (groups !== undefined) assert.deepStrictEqual(Array.from(results[0]![2]!), expected.groups, what)
          }
          tf.dispose([...tables, x, w, perExpert, v, y, dx!, dw!, ds!])
        }
        const [cpu, web] = results as [Array<Float32Array>, Array<Float32Array>]
        const tables = "tile" in layout ? 3 : 2
        cpu.slice(0, tables).forEach((c, i) => assert.deepStrictEqual(Array.from(web[i]!), Array.from(c), `${what}, table ${i}`))
        cpu.slice(tables).forEach((c, i) => assert.isAtMost(maxDiff(web[i + tables]!, c), 1e-5, `${what}, output ${i}`))
      }
    }
    assert.deepStrictEqual(gpuErrors(tf), [])
  })

  it("grouped products read each group's expert matrix in place: the cpu's gathered products, values and both gradients, for every kernel kind", async () => {
    // [groups, T, a, b, E, each group's expert]: an expert without groups, trailing groups counted
    // as the last expert's, a single group; sizes off the tiles and not divisible by 4
    const cases = [
      [6, 4, 8, 12, 4, [0, 0, 1, 3, 3, 3]],
      [9, 16, 32, 64, 5, [0, 1, 1, 1, 2, 2, 4, 4, 4]],
      [1, 8, 16, 16, 3, [2]],
      [5, 3, 5, 7, 6, [1, 1, 2, 5, 5]],
      [40, 32, 132, 136, 8, Array.from({ length: 40 }, (_, g) => Math.min(7, Math.floor(g / 5)))]
    ] as const
    const names = ["32x32x32/4x4", "64x64x16/4x4/v4", "128x64x16/8x4/v4/db", "128x64x8/8x8/v4/db2", "64x64x16/4x4/v4/k4", "64x64x16/8x8/v4/k8", "64x64x16/8x8/v4/db2/k8"]
    // a fixed kernel, auto before tuning (our default), tfjs's matmul (the gathers, the fallback)
    const modes = [...names, "auto", "tfjs"]
    try {
      for (const [G, T, a, b, E, experts] of cases) {
        const what = `[${G}, ${T}, ${a}, ${b}, ${E}]`
        const results: Array<Array<Float32Array>> = []
        const ran = new Map<string, boolean>()
        const choices = new Map<string, Record<string, number>>()
        for (const mode of ["cpu", ...modes]) {
          await tf.setBackend(mode === "cpu" ? "cpu" : "webgpu")
          if (mode !== "cpu") useMatMul(tf, parseMode(mode)!)
          const groups = tf.tensor1d(experts.map(Number), "float32")
          // the runtime's grouped product; on cpu the gather and batched product it replaces
          const grouped = makeGroupedMatMul(tf, (x, w, q) => tf.matMul(x, tf.gather(w, tf.cast(q, "int32"))))
          const x = tf.tensor3d(Array.from({ length: G * T * a }, (_, i) => Math.sin(i * 0.37)), [G, T, a])
          const w = tf.tensor3d(Array.from({ length: E * a * b }, (_, i) => Math.cos(i * 0.13)), [E, a, b])
          const v = tf.tensor3d(Array.from({ length: G * T * b }, (_, i) => Math.sin(i * 0.11) + 0.5), [G, T, b])
          const profile = await tf.profile(() => {
            const y = grouped(x, w, groups)
            const [dx, dw] = tf.grads((xt: Tensor, wt: Tensor) => tf.sum(tf.mul(grouped(xt, wt, groups), v)))([x, w])
            return [y, dx!, dw!] as never
          })
          const outs = profile.result as unknown as Array<Tensor>
          results.push(await Promise.all(outs.map((t) => t.data())) as Array<Float32Array>)
          ran.set(mode, profile.kernelNames.includes("ConceptmoeGroupedMatMul") && profile.kernelNames.includes("ConceptmoeGroupedMatMulSum") && !profile.kernelNames.includes("GatherV2"))
          choices.set(mode, matMulChoices(tf))
          tf.dispose([groups, x, w, v, ...outs])
        }
        const [cpu, ...webgpu] = results
        webgpu.forEach((got, k) => cpu!.forEach((c, i) => assert.isAtMost(maxDiff(got[i]!, c), 1e-4, `${modes[k]}, ${what}, output ${i}`)))
        // the grouped kernels ran but with tfjs's matmul, with a fixed kernel for each of the three
        // products it covers (vec4: sizes divisible by 4; split K: K long enough) and our default
        // for the others; the large case runs every kind on all three
        for (const mode of modes) assert.strictEqual(ran.get(mode), mode !== "tfjs", `${mode}, ${what}`)
        assert.deepStrictEqual(Object.keys(choices.get("tfjs")!), ["tfjs"], what)
        for (const name of names) {
          const covered = Object.values(groupedProducts(G, T, a, b, E)).filter((p) => tiledKernel(tf, parseTiles(name)!).covers(p)).length
          const counts = choices.get(name)!
          assert.strictEqual(counts[name] ?? 0, covered, `${name}, ${what}: ${JSON.stringify(counts)}`)
          assert.strictEqual(Object.values(counts).reduce((x, y) => x + y, 0), 3, `${name}, ${what}`)
          if (G === 40) assert.strictEqual(covered, 3, name)
        }
      }
    } finally {
      useMatMul(tf, "tfjs")
    }
    assert.deepStrictEqual(gpuErrors(tf), [])
  })

  it("an MoE trained with a slot for every pair (capacity dispatch) gives the cpu's losses and parameters", async () => {
    // 4 experts, top-2: a factor of 2 gives every expert a slot per token
    const roomy = Schema.decodeUnknownSync(TrainSettings)({ seqLen: 16, batchSize: 2, steps: 10, expertCapacity: 2, optimizer: { warmup: 1 } })
    const m = await Effect.runPromise(load(moe))
    const run = async (backend: "cpu" | "webgpu") => {
      await tf.setBackend(backend)
      const low = materialize(tf, m.analysis, 5)
      const opt = newOptimizer(low)
      const steps: Array<StepResult> = []
      for (let s = 0; s < 3; s++) steps.push(backend === "cpu" ? trainStep(low, opt, batchAt(s), roomy, s) : await trainStepAsync(low, opt, batchAt(s), roomy, s))
      const params = await values(low)
      release(low)
      tf.dispose([...opt.m.values(), ...opt.v.values()])
      return { steps, params }
    }
    const cpu = await run("cpu")
    const web = await run("webgpu")
    web.steps.forEach((r, i) => {
      assert.closeTo(r["loss"]!, cpu.steps[i]!["loss"]!, 1e-4, `step ${i}`)
      // 3 layers × 32 tokens × 2 experts, none dropped (the cpu routes exactly and reports nothing)
      assert.deepInclude(r, { expertPairs: 3 * 32 * 2, expertDropped: 0 })
      assert.notProperty(cpu.steps[i]!, "expertPairs")
    })
    web.params.forEach((p, i) => assert.isAtMost(maxDiff(p, cpu.params[i]!), 1e-4, `parameter ${i}`))
  })

  it("an MoE whose experts drop pairs (capacity dispatch) is replayed: its steps equal tfjs's bit for bit, and the drops are counted", async () => {
    // 8 experts, top-2, factor 1 on 32 tokens: 8 slots per expert for 8 pairs on average
    const tight = Schema.decodeUnknownSync(TrainSettings)({ seqLen: 16, batchSize: 2, steps: 10, expertCapacity: 1, optimizer: { warmup: 1 } })
    const m = await Effect.runPromise(load({ ...moe, experts: 8 }))
    await tf.setBackend("webgpu")
    const run = async (record: boolean) => {
      const low = materialize(tf, m.analysis, 5)
      const opt = newOptimizer(low)
      const trainer = capturedTrainer(low, opt, tight, 2, 16, { record })
      const steps = []
      for (let s = 0; s < 6; s++) steps.push(await trainer.step(batchAt(s), s))
      const mode = trainer.mode().mode
      const params = await values(low)
      trainer.dispose()
      release(low)
      tf.dispose([...opt.m.values(), ...opt.v.values()])
      return { steps, mode, params }
    }
    const tfjs = await run(false)
    const replayed = await run(true)
    assert.strictEqual(replayed.mode, "replay")
    assert.deepStrictEqual(replayed.steps.map((r) => [r.loss, r.expertPairs, r.expertDropped]), tfjs.steps.map((r) => [r.loss, r.expertPairs, r.expertDropped]))
    replayed.params.forEach((p, i) => assert.deepStrictEqual(Array.from(p), Array.from(tfjs.params[i]!), `parameter ${i}`))
    // 3 layers × 32 tokens × 2 experts routed each step; some dropped, at most 3 × 8 × 8 kept
    for (const r of replayed.steps) {
      assert.strictEqual(r.expertPairs, 3 * 32 * 2)
      assert.isAbove(r.expertDropped!, 0)
      assert.isAtLeast(r.expertDropped!, 3 * 32 * 2 - 3 * 8 * 8)
    }
  })

  // the MoE's grouped products (in place) are tuned too, and their choices stored and taken; and
  // where none of our kernels may run one of their parts (here the candidate leaves out the expert
  // weight gradient's shape, [4 experts, 32, 32] over 64 rows), the gathered fallback's products
  // keep tfjs's kernel in both runs, though the candidate covers them (the resumed run meets them
  // at its first step, before tuning)
  const tinyMoe = { kind: "moe", name: "tiny-moe", vocab: 256, hidden: 32, layers: 2, heads: 4, kvHeads: 2, experts: 4, topK: 2, expertHidden: 32, sharedHidden: 16, contextLength: 32 }
  const resumable = [
    ["dense", { kind: "dense", name: "tiny", vocab: 256, hidden: 32, layers: 2, heads: 4, ffnHidden: 64, activation: "gelu", contextLength: 32 }, false],
    ["MoE", tinyMoe, false],
    ["MoE, grouped products falling back", tinyMoe, true]
  ] as const
  for (const [kind, cfg, fallback] of resumable) it(`train on webgpu (steps replayed, matmuls tuned) resumed from a checkpoint repeats the uninterrupted run exactly: ${kind}`, async () => {
    const m = await Effect.runPromise(load(cfg))
    const data = sotuSplits(byteTokenizer, 0)
    const eight = Schema.decodeUnknownSync(TrainSettings)({ seqLen: 32, batchSize: 2, steps: 8, logEvery: 100, evalEvery: 100, evalBatches: 1, checkpointEvery: 100 })
    const tmp = () => fs.mkdtempSync(path.join(os.tmpdir(), "conceptmoe-webgpu-"))
    const run = <A, E>(e: Effect.Effect<A, E, never>) => Effect.runPromise(e)
    const layers = Layer.merge(backendLayer("webgpu"), NodeServices.layer)
    const go = (out: string, resume: boolean, until?: number) =>
      run(train(m, eight, { out, resume, quiet: true, data, ...(until === undefined ? {} : { until }) }).pipe(Effect.provide(layers)))
    // matmuls tuned per shape, each run starting with nothing tuned as a new process would; one
    // candidate (a split-K kernel, whose sums round unlike tfjs's), so both runs choose alike
    const k2 = tiledKernel(tf, parseTiles("32x32x16/4x4/v4/k2")!)
    const partial: MatMulKernel = { ...k2, covers: (p) => k2.covers(p) && !(p.transposeA && p.batchA === 4 && p.k === 64) }
    const fresh = () => useMatMul(tf, "auto", { candidates: [fallback ? partial : k2] })
    try {
      fresh()
      const wholeOut = tmp()
      const whole = await go(wholeOut, false)
      const out = tmp()
      fresh()
      const half = await go(out, false, 5)
      assert.strictEqual(half.metrics.length, 5)
      // the checkpoint carries the run's choices, and the resumed run takes them instead of tuning
      const checkpoint = (dir: string) => Effect.runPromise(readCheckpoint(path.join(dir, "checkpoint.safetensors")).pipe(Effect.provide(NodeServices.layer)))
      const ck = await checkpoint(out)
      const stored = JSON.parse(ck.metadata["matmul"]!) as Record<string, string>
      assert.isAtLeast(Object.keys(stored).length, 6)
      const grouped = Object.entries(stored).filter(([key]) => key.startsWith("grouped "))
      assert.strictEqual(grouped.length, cfg.kind === "moe" ? 3 : 0, JSON.stringify(stored))
      // falling back: the weight gradient's part (`…]ᵀ·…`) has none of ours, and the fallback's
      // products (the forward's, 8 groups of 32 rows) keep tfjs's kernel
      for (const [key, name] of grouped) assert.strictEqual(name, fallback && key.includes("]ᵀ·") ? "tfjs" : "32x32x16/4x4/v4/k2", key)
      if (fallback) assert.strictEqual(stored["8x[32x32]·[32x32]"], "tfjs", JSON.stringify(stored))
      fresh()
      const tunings = matMulTuning(tf).length
      const resumed = await go(out, true)
      assert.strictEqual(matMulTuning(tf).length, tunings, JSON.stringify(matMulTuning(tf).slice(tunings).map((r) => [r.product, r.chosen])))
      assert.deepStrictEqual(resumed.metrics.map((x) => x.loss), whole.metrics.map((x) => x.loss))
      // bit for bit: the parameters and Adam's moments at the end
      const [a, b] = [await checkpoint(wholeOut), await checkpoint(out)]
      for (const [name, t] of a.tensors) assert.deepStrictEqual(Array.from(b.tensors.get(name)!.data), Array.from(t.data), name)
    } finally {
      useMatMul(tf, "tfjs")
    }
    assert.deepStrictEqual(gpuErrors(tf), [])
  }, 120_000)

  it("the fused masked cross-entropy gives the op-by-op value and gradient of the cpu backend", async () => {
    for (const [n, v] of [[10, 7], [33, 256], [5, 300]] as const) {
      const results: Array<Array<Float32Array>> = []
      for (const b of ["cpu", "webgpu"]) {
        await tf.setBackend(b)
        const nll = makeMaskedNll(tf, makeOneHot(tf))
        const logits = tf.tensor2d(Array.from({ length: n * v }, (_, i) => Math.sin(i * 0.7) * 4), [n, v])
        // one label past the vocabulary: it contributes nothing on either path
        const labels = tf.tensor1d(Array.from({ length: n }, (_, i) => (i === 2 ? v + 3 : (i * 37) % v)), "int32")
        const mask = tf.tensor1d(Array.from({ length: n }, (_, i) => (i % 4 === 1 ? 0 : 1)))
        const y = nll(logits, labels, mask)
        const dl = tf.grad((l: Tensor) => tf.mul(nll(l, labels, mask), 0.37))(logits)
        results.push(await Promise.all([y.data(), dl.data()]) as Array<Float32Array>)
        tf.dispose([logits, labels, mask, y, dl])
      }
      assert.closeTo(results[1]![0]![0]!, results[0]![0]![0]!, 1e-4 * n)
      assert.isAtMost(maxDiff(results[1]![1]!, results[0]![1]!), 1e-6, `${n}×${v} gradient`)
    }
    assert.deepStrictEqual(gpuErrors(tf), [])
  })

  it("device validation errors are reported, not silently dropped", async () => {
    await tf.setBackend("webgpu")
    const device = (tf.backend() as unknown as { device: { createBuffer: (d: { size: number; usage: number }) => unknown } }).device
    device.createBuffer({ size: 4, usage: 0 })
    await tf.scalar(1).data()
    const errors = gpuErrors(tf)
    assert.strictEqual(errors.length, 1)
    assert.match(errors[0]!, /usage/i)
  })
  for (const [name, cfg] of webgpuModels) {
    it(`${name}: three training steps and an evaluation give the cpu values`, async () => {
      const m = await Effect.runPromise(load(cfg))
      const run = async (backend: "cpu" | "webgpu") => {
        await tf.setBackend(backend)
        const low = materialize(tf, m.analysis, 5)
        const opt = newOptimizer(low)
        const losses: Array<number> = []
        for (let s = 0; s < 3; s++) {
          const r = backend === "cpu" ? trainStep(low, opt, batch, settings, s) : await trainStepAsync(low, opt, batch, settings, s)
          losses.push(r.loss)
        }
        const evaluation = backend === "cpu" ? evaluate(low, [batch]) : await evaluateAsync(low, [batch])
        const params = await values(low)
        release(low)
        for (const v of [...opt.m.values(), ...opt.v.values()]) v.dispose()
        return { losses, evaluation, params }
      }
      const cpu = await run("cpu")
      const web = await run("webgpu")
      assert.strictEqual(tf.getBackend(), "webgpu")
      web.losses.forEach((l, i) => assert.closeTo(l, cpu.losses[i]!, 1e-4, `step ${i}`))
      assert.closeTo(web.evaluation.bitsPerByte, cpu.evaluation.bitsPerByte, 1e-4)
      assert.strictEqual(web.evaluation.compression, cpu.evaluation.compression)
      web.params.forEach((p, i) => assert.isAtMost(maxDiff(p, cpu.params[i]!), 1e-4, `parameter ${i}`))
    })
  }
})
