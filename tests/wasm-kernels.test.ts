/**
 * The wasm backend's faster paths against the cpu backend: our BatchMatMul (fix 8 in
 * src/runtime/Fixes.ts: batches and transpose flags through XNNPACK's 2-D path) and our JavaScript
 * kernels over the wasm heap (src/runtime/Fused.ts: RMSNorm, the rotary embedding, AdamW, the
 * clipping's Σx², the masked cross-entropy, exact GELU), values and gradients, and a whole training
 * step; with `CONCEPTMOE_FUSED=off` the same functions run tfjs's ops.
 */
import { assert, describe, it } from "@effect/vitest"
import { Effect, Schema } from "effect"
import type { Tensor } from "../src/graph/Apply.ts"
import { modelFromJson } from "../src/models/Load.ts"
import { load } from "../src/runtime/Backend.ts"
import { settingsOf, useSettings } from "../src/runtime/Env.ts"
import { makeOneHot } from "../src/runtime/Fixes.ts"
import { adamStepValues, adamw, makeActivate, makeMaskedSoftmax, makeMaskedNll, makeRmsNorm, makeRotate, makeSumSquares, wasmFused } from "../src/runtime/Fused.ts"
import { loss, materialize, release } from "../src/runtime/Lower.ts"
import { newOptimizer, stepOptions, trainStep, TrainSettings } from "../src/train/Step.ts"

const runtime = (name: "cpu" | "wasm") => Effect.runPromise(load(name))

/** max |a − b| ≤ tol · max(1, max |b|). */
const close = (a: ArrayLike<number>, b: ArrayLike<number>, tol: number, what: string) => {
  assert.strictEqual(a.length, b.length, `${what}: lengths`)
  let scale = 1
  for (let i = 0; i < b.length; i++) scale = Math.max(scale, Math.abs(b[i]!))
  for (let i = 0; i < a.length; i++) {
    if (!(Math.abs(a[i]! - b[i]!) <= tol * scale)) assert.fail(`${what}: index ${i}: ${a[i]} vs ${b[i]}`)
  }
}

/** Runs `f` on cpu and on wasm (the same seeded inputs) and returns both results' values. */
const onBoth = async (f: (tf: Awaited<ReturnType<typeof runtime>>["tf"]) => Array<Tensor>) => {
  const out: Array<Array<Float32Array>> = []
  for (const name of ["cpu", "wasm"] as const) {
    const { tf } = await runtime(name)
    out.push(tf.tidy(() => f(tf)).map((t) => {
      const v = t.dataSync() as Float32Array
      t.dispose()
      return v
    }))
  }
  return { cpu: out[0]!, wasm: out[1]! }
}

/** Element by element: |a − b| ≤ tol · max(1, |b|). */
const closeEach = (a: ArrayLike<number>, b: ArrayLike<number>, tol: number, what: string) => {
  assert.strictEqual(a.length, b.length, `${what}: lengths`)
  for (let i = 0; i < a.length; i++) {
    if (!(Math.abs(a[i]! - b[i]!) <= tol * Math.max(1, Math.abs(b[i]!)))) assert.fail(`${what}: index ${i}: ${a[i]} vs ${b[i]}`)
  }
}

type Tfjs = Awaited<ReturnType<typeof runtime>>["tf"]

/**
 * Runs `f` on cpu, on wasm and on wasm with `CONCEPTMOE_FUSED=off` (the same inputs): each run's
 * values and the kernels it ran.
 */
const onRoutes = async (f: (tf: Tfjs) => Array<Tensor>) => {
  const run = async (tf: Tfjs) => {
    const profile = await tf.profile(() => tf.tidy(() => f(tf)) as never)
    const outs = profile.result as unknown as Array<Tensor>
    const values = outs.map((t) => t.dataSync() as Float32Array)
    tf.dispose(outs)
    return { values, kernels: profile.kernelNames }
  }
  const cpu = await run((await runtime("cpu")).tf)
  const { tf } = await runtime("wasm")
  const fused = await run(tf)
  const before = settingsOf(tf)
  useSettings(tf, { ...before, fused: false })
  try {
    return { cpu, fused, off: await run(tf) }
  } finally {
    useSettings(tf, before)
  }
}

/** The masked cross-entropy's case of `n` rows of `V` logits on cpu, wasm fused and wasm op by op. */
const crossEntropyCase = async (n: number, V: number) => {
  const { cpu, fused, off } = await onRoutes((tf) => {
    const logits = tf.tensor2d(Float32Array.from({ length: n * V }, (_, i) => {
      const [r, c] = [Math.floor(i / V), i % V]
      return ((((r * 31 + c * 17) % 23) - 11) / 11) * (r % 3 === 0 ? 80 : 4) + Math.sin(i) * 0.01
    }), [n, V])
    const labels = tf.tensor1d(Array.from({ length: n }, (_, r) => (r === 11 ? -1 : r === 30 ? V : (r * 7) % V)), "int32")
    const mask = tf.tensor1d(Array.from({ length: n }, (_, r) => (r === 5 || r === 20 ? 0 : 1 + (r % 4) * 0.25)))
    const nll = makeMaskedNll(tf, makeOneHot(tf))
    const dl = tf.grad((l: Tensor) => tf.mul(nll(l, labels, mask), 2.5))(logits)
    return [nll(logits, labels, mask), dl]
  })
  for (const [route, got] of [["fused", fused], ["off", off]] as const) {
    closeEach(got.values[0]!, cpu.values[0]!, 1e-5, `${route} value, V ${V}`)
    closeEach(got.values[1]!, cpu.values[1]!, 1e-5, `${route} gradient, V ${V}`)
  }
  // the gradient of a masked row and of a row without a target is zero; others are not
  const dl = fused.values[1]!
  for (const r of [5, 11, 20, 30]) assert.isTrue(dl.slice(r * V, (r + 1) * V).every((v) => v === 0), `row ${r}`)
  assert.isTrue(dl.slice(3 * V, 4 * V).some((v) => v !== 0))
  assert.includeMembers(fused.kernels, ["ConceptmoeMaskedNll", "ConceptmoeMaskedNllGrad"])
  assert.isFalse(off.kernels.some((k) => k.startsWith("Conceptmoe")), off.kernels.join(" "))
}

describe("wasm kernels equal cpu", () => {
  it("BatchMatMul: batches, broadcasts and transpose flags", async () => {
    const cases: Array<[Array<number>, Array<number>, boolean, boolean]> = [
      [[32, 128, 32], [32, 32, 128], false, false],
      [[32, 128, 32], [32, 128, 32], false, true],
      [[32, 128, 32], [32, 128, 64], true, false],
      [[4, 40, 24], [4, 16, 40], true, true],
      [[300, 17], [300, 9], true, false],
      [[2, 3, 20, 5], [2, 3, 5, 18], false, false],
      [[3, 20, 5], [5, 18], false, false],
      [[20, 5], [3, 5, 18], false, false],
      [[3, 1, 8], [3, 8, 30], false, false]
    ]
    for (const [sa, sb, ta, tb] of cases) {
      const { cpu, wasm } = await onBoth((tf) => [tf.matMul(tf.randomNormal(sa, 0, 1, "float32", 1), tf.randomNormal(sb, 0, 1, "float32", 2), ta, tb)])
      close(wasm[0]!, cpu[0]!, 1e-5, `${sa}·${sb} ${ta} ${tb}`)
    }
  })

  it("GatherV2: axes, dtypes, index shapes and the gradient", async () => {
    const cases: Array<[Array<number>, Array<number>, Array<number>, number]> = [
      [[7, 5], [6], [3, 0, 6, 6, 1, 2], 0],
      [[4, 7, 3], [2, 2], [6, 0, 1, 1], 1],
      [[3, 4, 5], [3], [4, 0, 2], 2],
      [[9], [4], [8, 0, 0, 3], 0]
    ]
    for (const [shape, ishape, idx, axis] of cases) {
      for (const dtype of ["float32", "int32"] as const) {
        const { cpu, wasm } = await onBoth((tf) => {
          const n = shape.reduce((a, b) => a * b, 1)
          const x = tf.tensor(Array.from({ length: n }, (_, i) => i * 3 - 7), shape, dtype)
          return [tf.cast(tf.gather(x, tf.tensor(idx, ishape, "int32"), axis), "float32")]
        })
        close(wasm[0]!, cpu[0]!, 0, `${shape} ${ishape} axis ${axis} ${dtype}`)
      }
    }
    const { cpu, wasm } = await onBoth((tf) => {
      const x = tf.randomNormal([6, 4], 0, 1, "float32", 13)
      const w = tf.randomNormal([5, 4], 0, 1, "float32", 14)
      return [tf.grad((a: Tensor) => tf.sum(tf.mul(tf.gather(a, tf.tensor1d([5, 0, 5, 2, 1], "int32")), w)))(x)]
    })
    close(wasm[0]!, cpu[0]!, 1e-6, "gradient")
  })

  it("the kernels run on wasm (not the op-by-op fallback)", async () => {
    const { tf } = await runtime("wasm")
    assert.isTrue(wasmFused(tf))
    assert.strictEqual(tf.getKernel("ConceptmoeAdamW", "wasm")?.kernelName, "ConceptmoeAdamW")
    // RMSNorm's gradient: one kernel for dx and dg (no Sum over the rows)
    const x = tf.randomNormal([6, 8])
    const g = tf.ones([8])
    const { kernelNames } = await tf.profile(() => tf.grads((a: Tensor, b: Tensor) => makeRmsNorm(tf)(a, b, 1e-6))([x, g], tf.randomNormal([6, 8])) as never)
    assert.include(kernelNames, "ConceptmoeRmsNormGrad")
    assert.notInclude(kernelNames, "Sum", kernelNames.join(" "))
  })

  it("RMSNorm: value and gradients (rows of a multiple of 4 in SIMD, others in JavaScript)", async () => {
    for (const d of [24, 13]) {
      const { cpu, wasm } = await onBoth((tf) => {
        const x = tf.randomNormal([6, 10, d], 0, 1, "float32", 3)
        const g = tf.randomNormal([d], 1, 0.2, "float32", 4)
        const w = tf.randomNormal([6, 10, d], 0, 1, "float32", 5)
        const norm = makeRmsNorm(tf)
        const f = (a: Tensor, b: Tensor) => tf.sum(tf.mul(norm(a, b, 1e-6), w))
        const [dx, dg] = tf.grads(f as never)([x, g])
        return [norm(x, g, 1e-6), dx!, dg!]
      })
      for (let i = 0; i < 3; i++) close(wasm[i]!, cpu[i]!, 1e-5, `${["value", "dx", "dg"][i]!}, d ${d}`)
    }
  })

  it("rotary embedding: value and gradient, whole heads and part of each head rotated (SIMD where dim/2 and the head are multiples of 4)", async () => {
    for (const [hd, dim] of [[8, 8], [8, 4], [16, 8], [12, 8]] as const) {
      const { cpu, wasm } = await onBoth((tf) => {
        const x = tf.randomNormal([12, 3, hd], 0, 1, "float32", 6)
        const angles = tf.mul(tf.reshape(tf.range(0, 12, 1, "float32"), [12, 1, 1]), tf.tensor3d(Array.from({ length: dim / 2 }, (_, j) => 10000 ** (-(2 * j) / dim)), [1, 1, dim / 2]))
        const cos = tf.cos(angles)
        const sin = tf.sin(angles)
        const rotate = makeRotate(tf)
        const w = tf.randomNormal([12, 3, hd], 0, 1, "float32", 7)
        const dx = tf.grad((a: Tensor) => tf.sum(tf.mul(rotate(a, dim, cos, sin), w)))(x)
        return [rotate(x, dim, cos, sin), dx]
      })
      close(wasm[0]!, cpu[0]!, 1e-5, `rotated ${dim} of ${hd}`)
      close(wasm[1]!, cpu[1]!, 1e-5, `gradient ${dim} of ${hd}`)
    }
  })

  it("AdamW and the clipping's sum of squares", async () => {
    const { cpu, wasm } = await onBoth((tf) => {
      const w = tf.randomNormal([30, 7], 0, 0.1, "float32", 8)
      const g = tf.randomNormal([30, 7], 0, 1, "float32", 9)
      const m = tf.randomNormal([30, 7], 0, 0.1, "float32", 10)
      const v = tf.abs(tf.randomNormal([30, 7], 0, 0.1, "float32", 11))
      const b = tf.randomNormal([5], 0, 1, "float32", 12)
      const ss = makeSumSquares(tf)([g, b])
      const scale = tf.reshape(tf.minimum(tf.div(1, tf.sqrt(ss)), 1), [1])
      const h = { beta1: 0.9, beta2: 0.95, eps: 1e-8, c1: 1 - 0.9 ** 3, c2: 1 - 0.95 ** 3, lr: 3e-3, lrScale: 0.5, decay: 0.1 }
      const next = adamw(tf, w, g, m, v, scale, h, adamStepValues(tf, h))
      return [ss, next.w, next.m, next.v]
    })
    for (let i = 0; i < 4; i++) close(wasm[i]!, cpu[i]!, 1e-5, ["Σx²", "w", "m", "v"][i]!)
  })

  it("AdamW with tiny and subnormal gradients and moments: equal to cpu, no subnormal moment left, NaN kept; Σx² of odd lengths", async () => {
    // 4·40 + 3 elements (the last 3 in JavaScript), in groups of 8: normal values; small but normal
    // ones (g 1e-6, whose Adam step is as large as any other's); tiny ones (g 1e-21, whose square is
    // subnormal); subnormal g, m and v (1e-39, 1e-40); and one NaN gradient
    const n = 163
    const pick = (i: number, normal: number, small: number, tiny: number, sub: number) => [normal, small, tiny, sub][(i >> 1) % 4]! * (i % 2 ? -1 : 1) * (1 + (i % 7) / 7)
    const data = {
      w: Float32Array.from({ length: n }, (_, i) => 0.05 * Math.sin(i + 1)),
      g: Float32Array.from({ length: n }, (_, i) => (i === 77 ? NaN : pick(i, 0.3, 1e-6, 1e-21, 1e-39))),
      m: Float32Array.from({ length: n }, (_, i) => pick(i, 0.02, 1e-7, 1e-33, 1e-40)),
      v: Float32Array.from({ length: n }, (_, i) => Math.abs(pick(i, 1e-3, 1e-12, 1e-36, 1e-39)))
    }
    const { cpu, wasm } = await onBoth((tf) => {
      const [w, g, m, v] = (["w", "g", "m", "v"] as const).map((k) => tf.tensor1d(data[k]))
      const h = { beta1: 0.9, beta2: 0.95, eps: 1e-8, c1: 1 - 0.9 ** 3, c2: 1 - 0.95 ** 3, lr: 3e-3, lrScale: 0.5, decay: 0.1 }
      const next = adamw(tf, w!, g!, m!, v!, tf.tensor1d([0.8]), h, adamStepValues(tf, h))
      const odd = tf.tensor1d(data.w.slice(0, 7))
      return [next.w, next.m, next.v, makeSumSquares(tf)([odd, tf.tensor2d(data.m.slice(0, 150), [10, 15]), odd])]
    })
    const finite = (x: Float32Array) => x.map((a, i) => (i === 77 ? 0 : a))
    for (let i = 0; i < 3; i++) {
      closeEach(finite(wasm[i]!), finite(cpu[i]!), 1e-6, ["w", "m", "v"][i]!)
      assert.isNaN(wasm[i]![77], `${["w", "m", "v"][i]}: NaN gradient`)
    }
    // the small gradients' Adam steps are not flushed: each moves w by about lr·lrScale
    for (const i of [2, 3, 10, 11]) assert.isAbove(Math.abs(wasm[0]![i]! - data.w[i]!), 1e-4, `w[${i}]`)
    // cpu keeps subnormal moments (so the inputs make them); wasm flushes them to 0
    const subnormal = (x: Float32Array) => x.filter((a) => a !== 0 && Math.abs(a) < 2 ** -126).length
    assert.isAbove(subnormal(cpu[1]!) + subnormal(cpu[2]!), 10)
    assert.strictEqual(subnormal(wasm[1]!) + subnormal(wasm[2]!), 0)
    close(wasm[3]!, cpu[3]!, 1e-6, "Σx²")
  })

  it("masked cross-entropy: value and gradient (rows of 29 in JavaScript, of 32 in SIMD), masked rows, labels outside the vocabulary, logits of ±80", async () => {
    // 37 rows of V logits: every third row spans ±80, the others ±4; rows 5 and 20 masked, rows 11
    // and 30 with labels −1 and V (no target), so they add nothing
    for (const V of [29, 32]) await crossEntropyCase(37, V)
  })


  it("exact GELU: value and gradient (odd sizes, large and tiny inputs); SiLU: the gradient fused, the value op by op", async () => {
    const { cpu, fused, off } = await onRoutes((tf) => {
      // [5, 7, 11]: a normal spread, and every 13th value from ±80 down to ±1e-4
      const x = tf.tensor3d(Float32Array.from({ length: 385 }, (_, i) => (i % 13 === 0 ? (i % 2 ? 80 : -80) / 10 ** (i % 5) : Math.sin(i * 0.7) * 3.1)), [5, 7, 11])
      const dy = tf.randomNormal([5, 7, 11], 0, 1, "float32", 21)
      const activate = makeActivate(tf)
      const outs: Array<Tensor> = []
      for (const a of ["gelu", "silu"] as const) outs.push(activate(x, a), tf.grad((t: Tensor) => activate(t, a))(x, dy as never))
      return outs
    })
    for (const [route, got] of [["fused", fused], ["off", off]] as const) {
      for (let i = 0; i < 4; i++) closeEach(got.values[i]!, cpu.values[i]!, 1e-5, `${route} ${["GELU", "GELU gradient", "SiLU", "SiLU gradient"][i]}`)
    }
    assert.includeMembers(fused.kernels, ["ConceptmoeGelu", "ConceptmoeGeluGrad", "ConceptmoeSiluGrad"])
    // slower on wasm than tfjs's Sigmoid and Mul (bench/wasm-elementwise.ts): not registered there
    assert.notInclude(fused.kernels, "ConceptmoeSilu")
    assert.isFalse(off.kernels.some((k) => k.startsWith("Conceptmoe")), off.kernels.join(" "))
  })

  it("attention's masked softmax: value and gradient fused (rows of 4k in SIMD, of other widths in JavaScript); masked entries exactly 0", async () => {
    for (const len of [16, 7]) {
      const { cpu, fused, off } = await onRoutes((tf) => {
        const scores = tf.randomNormal([3, 2, len, len], 0, 4, "float32", 31)
        const mask = tf.tensor2d(Array.from({ length: len * len }, (_, i) => (i % len <= Math.floor(i / len) ? 0 : -1e9)), [len, len])
        const dy = tf.randomNormal([3, 2, len, len], 0, 1, "float32", 32)
        const softmax = makeMaskedSoftmax(tf)
        return [softmax(scores, 0.3, mask), tf.grad((t: Tensor) => softmax(t, 0.3, mask))(scores, dy as never)]
      })
      for (const [route, got] of [["fused", fused], ["off", off]] as const) {
        closeEach(got.values[0]!, cpu.values[0]!, 1e-5, `${route} softmax ${len}`)
        closeEach(got.values[1]!, cpu.values[1]!, 1e-5, `${route} softmax gradient ${len}`)
      }
      // above the diagonal: masked, so 0 and no gradient
      assert.strictEqual(fused.values[0]![1], 0)
      assert.strictEqual(fused.values[1]![1], 0)
      assert.includeMembers(fused.kernels, ["ConceptmoeMaskedSoftmax", "ConceptmoeMaskedSoftmaxGrad"])
    }
  })

  it("a dense training step: loss and parameters after three steps", async () => {
    const config = { kind: "dense", vocab: 64, hidden: 32, layers: 1, heads: 2, ffnHidden: 64, activation: "gelu", contextLength: 32 }
    const m = await Effect.runPromise(modelFromJson(config, "tiny.json"))
    const settings = Schema.decodeUnknownSync(TrainSettings)({ steps: 10, batchSize: 2, seqLen: 32, optimizer: { warmup: 1 } })
    const batch = {
      rows: 2,
      length: 32,
      ids: Int32Array.from({ length: 64 }, (_, i) => (i * 7) % 64),
      targets: Int32Array.from({ length: 64 }, (_, i) => (i * 5 + 1) % 64)
    }
    const results: Array<{ losses: Array<number>; params: Array<Float32Array> }> = []
    for (const name of ["cpu", "wasm"] as const) {
      const { tf } = await runtime(name)
      const low = materialize(tf, m.analysis, 3)
      const opt = newOptimizer(low)
      const losses = [0, 1, 2].map((s) => trainStep(low, opt, batch, settings, s).loss)
      results.push({ losses, params: [...low.variables.values()].map((v) => v.dataSync() as Float32Array) })
      release(low)
      tf.dispose([...opt.m.values(), ...opt.v.values()])
    }
    close(results[1]!.losses, results[0]!.losses, 1e-5, "losses")
    results[0]!.params.forEach((p, i) => close(results[1]!.params[i]!, p, 1e-5, `parameter ${i}`))
  })
})

describe("MoE training on wasm", () => {
  it("dispatches grouped (fitted to the step's routing, and the worst case): loss and gradients equal the sparse dispatch's", async () => {
    const { tf } = await runtime("wasm")
    const config = { kind: "moe", vocab: 64, hidden: 32, layers: 2, heads: 2, experts: 4, topK: 2, expertHidden: 16, tiedEmbeddings: true, contextLength: 32 }
    const m = await Effect.runPromise(modelFromJson(config, "moe.json"))
    const settings = Schema.decodeUnknownSync(TrainSettings)({ steps: 10, batchSize: 2, seqLen: 32 })
    assert.strictEqual(stepOptions({ tf } as never, settings, 0).dispatch, "fitted")
    const low = materialize(tf, m.analysis, 4)
    const batch = { rows: 2, length: 32, ids: Int32Array.from({ length: 64 }, (_, i) => (i * 7) % 64), targets: Int32Array.from({ length: 64 }, (_, i) => (i * 5 + 1) % 64) }
    const vars = [...low.variables.values()]
    const run = (dispatch: "sparse" | "grouped" | "fitted") =>
      tf.tidy(() => {
        const { grads, value } = tf.variableGrads(() => loss(low, batch, { ...stepOptions(low, settings, 0), dispatch }).total, vars)
        return [value.dataSync()[0]!, ...vars.map((v) => grads[v.name]!.dataSync() as Float32Array)] as const
      })
    const [sparseLoss, ...sparse] = run("sparse")
    for (const dispatch of ["grouped", "fitted"] as const) {
      const [groupedLoss, ...grouped] = run(dispatch)
      close([groupedLoss], [sparseLoss], 1e-6, `${dispatch} loss`)
      grouped.forEach((g, i) => close(g, sparse[i]!, 1e-5, `${dispatch} gradient ${i}`))
    }
    release(low)
  })
})
