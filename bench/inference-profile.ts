/**
 * Where a decode step and a prefill piece spend their time, per model: the MoE baseline of
 * `bench inference` and its matched ConceptMoE variants (R = 2 by default), under tf.profile.
 * For each model: a session prefills `--length` − `--chunk` tokens untimed, then one prefill piece
 * of `--chunk` tokens and `--steps` decode steps are profiled. Prints per phase the kernels, the
 * time inside kernels, the host time (wall − kernels) and the kinds of kernel that cost most.
 *
 * Run: node bench/inference-profile.ts [--length 4096] [--chunk 256] [--steps 8] [--ratios 2]
 *   [--strategies topk,loop] [--rows 2] [--backend wasm] [--top 12]
 */
import { NodeServices } from "@effect/platform-node"
import { Effect, Layer } from "effect"
import * as path from "node:path"
import { contendersOf, forcedEvery, tokens } from "../src/infer/Bench.ts"
import { loadModel, readJson } from "../src/models/Load.ts"
import type { Strategy } from "../src/models/Reallocate.ts"
import { layer as backendLayer, Tensors } from "../src/runtime/Backend.ts"
import { session } from "../src/runtime/Decode.ts"
import { release } from "../src/runtime/Lower.ts"

const arg = (name: string, fallback: string): string => {
  const i = process.argv.indexOf(`--${name}`)
  return i >= 0 && i + 1 < process.argv.length ? process.argv[i + 1]! : fallback
}
const baselineFile = arg("baseline", path.join(import.meta.dirname, "..", "examples", "inference", "moe-bench.json"))
const length = Number(arg("length", "4096"))
const chunk = Number(arg("chunk", "256"))
const steps = Number(arg("steps", "8"))
const rows = Number(arg("rows", "2"))
const top = Number(arg("top", "12"))
const ratios = arg("ratios", "2").split(",").map(Number)
const dispatch = process.argv.includes("--dispatch") ? { dispatch: arg("dispatch", "sparse") as "sparse" | "dense" | "fitted" | "grouped" } : {}
const strategies = arg("strategies", "topk,loop").split(",") as Array<Strategy>

interface Kernel { readonly name: string; readonly kernelTimeMs: number | { error: string } }

const summary = (label: string, wall: number, kernels: ReadonlyArray<Kernel>, per: number) => {
  const byKind = new Map<string, { n: number; ms: number }>()
  let inside = 0
  for (const k of kernels) {
    const ms = typeof k.kernelTimeMs === "number" ? k.kernelTimeMs : 0
    // a custom-gradient function ("unnamed scope") runs kernels that are profiled on their own
    if (k.name !== "unnamed scope") inside += ms
    const e = byKind.get(k.name) ?? { n: 0, ms: 0 }
    e.n++
    e.ms += ms
    byKind.set(k.name, e)
  }
  const n = kernels.filter((k) => k.name !== "unnamed scope").length
  console.log(`  ${label}: ${(wall / per).toFixed(2)} ms wall, ${(n / per).toFixed(0)} kernels, ${(inside / per).toFixed(2)} ms in kernels, host ${((wall - inside) / per).toFixed(2)} ms (${(((wall - inside) / n) * 1000).toFixed(1)} µs per kernel)`)
  const kinds = [...byKind].filter(([name]) => name !== "unnamed scope").sort((a, b) => b[1].ms - a[1].ms).slice(0, top)
  for (const [name, e] of kinds) console.log(`    ${name.padEnd(22)} ${(e.n / per).toFixed(1).padStart(7)} × ${((e.ms / e.n) * 1000).toFixed(1).padStart(8)} µs = ${(e.ms / per).toFixed(2).padStart(8)} ms`)
}

const program = Effect.gen(function*() {
  const { tf, description } = yield* Tensors
  const baseline = yield* loadModel(baselineFile)
  const json = yield* readJson(baselineFile)
  const contenders = yield* contendersOf(baseline, json, { ratios, strategies, tolerance: 0.01, encoderLayers: 2, decoderLayers: 2 })
  console.log(`${description}; ${rows} rows, KV length ${length}, prefill piece ${chunk}, ${steps} decode steps, dispatch ${dispatch.dispatch ?? "default"}`)
  const vocab = baseline.decoder!.vocab
  for (const c of contenders) {
    const s = session(c.low, { rows, ...dispatch, ...(c.ratio === null ? {} : { forcedBoundary: forcedEvery(c.ratio) }) })
    const pre = length - chunk
    if (pre > 0) s.prefill(tokens(rows, pre, vocab, 1), pre, chunk).dispose()
    // warm the piece's shapes once? no: the piece at this KV length runs once, as in the benchmark
    const ids = tokens(rows, chunk, vocab, 2)
    let t = performance.now()
    const p = yield* Effect.promise(() => tf.profile(() => { s.feed(ids, chunk).dispose() }))
    const prefillWall = performance.now() - t
    s.feed(tokens(rows, 1, vocab, 3), 1).dispose()
    const kernels: Array<Kernel> = []
    let wall = 0
    for (let i = 0; i < steps; i++) {
      t = performance.now()
      const d = yield* Effect.promise(() => tf.profile(() => { s.feed(tokens(rows, 1, vocab, 4 + i), 1).dispose() }))
      wall += performance.now() - t
      kernels.push(...(d.kernels as Array<Kernel>))
    }
    console.log(`${c.model.name} (${c.strategy ?? "baseline"}${c.ratio === null ? "" : `, R=${c.ratio}`}); realised R ${(s.compression.tokens / Math.max(1, s.compression.concepts)).toFixed(2)}`)
    summary(`prefill piece (${chunk} tokens at ${pre})`, prefillWall, p.kernels as Array<Kernel>, 1)
    summary(`decode step (mean of ${steps})`, wall, kernels, steps)
    s.dispose()
  }
  for (const c of contenders) release(c.low)
})

await Effect.runPromise(program.pipe(Effect.provide(Layer.mergeAll(backendLayer(arg("backend", "wasm") as "wasm"), NodeServices.layer))))
