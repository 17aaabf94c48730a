/**
 * Our wasm kernels (src/runtime/wasm/Kernels.ts, Simd.ts) against tfjs's ops one by one, at the
 * shapes of a dense 2-layer d128 training step (batch 8×128, vocab 256, 4 heads): the masked
 * cross-entropy over logits [1024, 256], exact GELU and SiLU over [1024, 512] and attention's masked
 * softmax over [32, 128, 128] (SiLU and the softmax: forward op by op, as the makers run them on
 * wasm, and our gradient kernel). Forward alone and forward + backward, timed in alternating rounds
 * in one process (the median round of each), so that the ratio holds on a loaded machine. Then whole
 * training steps of that model (forward, backward, clipping, AdamW; the trainer's `trainStep`) with
 * those kernels in and out, alternating (the other wasm kernels, RMSNorm, rotary, AdamW and Σx²,
 * and our matmul stay in).
 * Run: node bench/wasm-elementwise.ts [rounds]
 */
import type * as TF from "@tensorflow/tfjs"
import { Effect, Schema } from "effect"
import type { Tensor } from "../src/graph/Apply.ts"
import { load } from "../src/runtime/Backend.ts"
import { settingsOf, useSettings } from "../src/runtime/Env.ts"
import { makeOneHot } from "../src/runtime/Fixes.ts"
import { makeActivate, makeMaskedNll, makeMaskedSoftmax, wasmFused } from "../src/runtime/Fused.ts"
import { materialize } from "../src/runtime/Lower.ts"
import { modelFromJson } from "../src/models/Load.ts"
import { newOptimizer, trainStep, TrainSettings } from "../src/train/Step.ts"

const rounds = Number(process.argv[2] ?? 7)
const { tf } = await Effect.runPromise(load("wasm"))
if (!wasmFused(tf)) throw new Error("our wasm kernels are off (CONCEPTMOE_FUSED=off?)")

/** The makers' functions with our kernels (`fused`) and without (`ops`: CONCEPTMOE_FUSED=off). */
const build = (fused: boolean) => {
  const saved = settingsOf(tf)
  useSettings(tf, { ...saved, fused })
  const made = { nll: makeMaskedNll(tf, makeOneHot(tf)), activate: makeActivate(tf), softmax: makeMaskedSoftmax(tf) }
  useSettings(tf, saved)
  return made
}
const ops = build(false)

const ours = build(true)

const n = 1024
const V = 256
const logits = tf.mul(tf.randomNormal([n, V], 0, 1, "float32", 1), 4)
const labels = tf.tensor1d(Array.from({ length: n }, (_, i) => (i * 37) % V), "int32")
const mask = tf.tensor1d(Array.from({ length: n }, (_, i) => (i % 97 === 0 ? 0 : 1)))
const hidden = tf.randomNormal([n, 512], 0, 1, "float32", 2)
const dHidden = tf.randomNormal([n, 512], 0, 1, "float32", 3)
const scores = tf.randomNormal([32, 128, 128], 0, 4, "float32", 4)
const dScores = tf.randomNormal([32, 128, 128], 0, 1, "float32", 5)
const causal = tf.tensor2d(Float32Array.from({ length: 128 * 128 }, (_, i) => (i % 128 <= Math.floor(i / 128) ? 0 : -1e9)), [128, 128])

type Made = ReturnType<typeof build>
const cases: Array<[string, (m: Made) => Tensor, (m: Made) => Tensor]> = [
  ["masked NLL [1024,256]", (m) => m.nll(logits, labels, mask), (m) => tf.grad((l: Tensor) => m.nll(l, labels, mask))(logits)],
  ["GELU [1024,512]", (m) => m.activate(hidden, "gelu"), (m) => tf.grad((x: Tensor) => m.activate(x, "gelu"))(hidden, dHidden as TF.Tensor)],
  ["SiLU [1024,512]", (m) => m.activate(hidden, "silu"), (m) => tf.grad((x: Tensor) => m.activate(x, "silu"))(hidden, dHidden as TF.Tensor)],
  ["softmax [32,128,128]", (m) => m.softmax(scores, 1 / Math.sqrt(32), causal), (m) => tf.grad((s: Tensor) => m.softmax(s, 1 / Math.sqrt(32), causal))(scores, dScores as TF.Tensor)]
]

/** ms per call of `f` over `calls` calls. */
const time = (f: () => Tensor, calls: number) => {
  const t = performance.now()
  // the wasm backend runs each kernel when called: no read needed (a read would copy the result)
  for (let i = 0; i < calls; i++) tf.tidy(f).dispose()
  return (performance.now() - t) / calls
}
const median = (xs: Array<number>) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)]!

console.log(`wasm backend, ${rounds} alternating rounds of about 100 ms each, median ms per call (SiLU and softmax: forward op by op, our gradient kernel)`)
console.log("kernel                  pass      ours ms   ops ms   ops ÷ ours")
for (const [name, forward, both] of cases) {
  for (const [pass, f] of [["forward", forward], ["fwd+bwd", both]] as const) {
    // warm up both (JIT, kernel setup), then alternate
    const calls = Math.max(3, Math.round(100 / Math.max(0.5, time(() => f(ops), 3))))
    time(() => f(ours), calls)
    const a: Array<number> = []
    const b: Array<number> = []
    for (let r = 0; r < rounds; r++) {
      a.push(time(() => f(ours), calls))
      b.push(time(() => f(ops), calls))
    }
    const [x, y] = [median(a), median(b)]
    console.log(`${name.padEnd(23)} ${pass.padEnd(8)} ${x.toFixed(2).padStart(8)} ${y.toFixed(2).padStart(8)} ${(y / x).toFixed(2).padStart(11)}`)
  }
}

// whole steps: our loss, activation and softmax kernels in and out by (un)registering them (the
// makers look for a kernel when each forward pass builds its context)
const mine = new Map(["ConceptmoeMaskedNll", "ConceptmoeMaskedNllGrad", "ConceptmoeGelu", "ConceptmoeGeluGrad", "ConceptmoeSiluGrad", "ConceptmoeMaskedSoftmaxGrad"].map((k) => [k, tf.getKernel(k, "wasm")!]))
const useMine = (on: boolean) => {
  for (const [k, config] of mine) {
    const has = tf.getKernel(k, "wasm") !== undefined
    if (on && !has) tf.registerKernel(config)
    if (!on && has) tf.unregisterKernel(k, "wasm")
  }
}
const config = { kind: "dense", vocab: 256, hidden: 128, layers: 2, heads: 4, ffnHidden: 512, activation: "gelu", contextLength: 256 }
const model = await Effect.runPromise(modelFromJson(config, "dense-2L-d128.json"))
const settings = Schema.decodeUnknownSync(TrainSettings)({ steps: 1000, batchSize: 8, seqLen: 128 })
const batch = {
  rows: 8,
  length: 128,
  ids: Int32Array.from({ length: 1024 }, (_, i) => (i * 7 + (i % 13) * 5) % 256),
  targets: Int32Array.from({ length: 1024 }, (_, i) => (i * 11 + 3) % 256)
}
const low = materialize(tf, model.analysis, 1)
const opt = newOptimizer(low)
let step = 0
const steps = (on: boolean, count: number) => {
  useMine(on)
  const t = performance.now()
  for (let i = 0; i < count; i++) trainStep(low, opt, batch, settings, step++)
  return (performance.now() - t) / count
}
steps(true, 2)
steps(false, 2)
const a: Array<number> = []
const b: Array<number> = []
for (let r = 0; r < rounds; r++) {
  a.push(steps(true, 3))
  b.push(steps(false, 3))
}
useMine(true)
const [x, y] = [median(a), median(b)]
console.log(`training step, dense 2L-d128, batch 8×128: ${x.toFixed(1)} ms with our loss, activation and softmax kernels, ${y.toFixed(1)} ms without (${(y / x).toFixed(2)}×, ${(y - x).toFixed(1)} ms saved)`)
