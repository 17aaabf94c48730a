/**
 * Our SIMD matrix product on wasm (src/runtime/wasm/Gemm.ts) against XNNPACK's route
 * (`CONCEPTMOE_MATMUL=tfjs`), in one process, on the products of the benchmark's training steps
 * (bench/train.ts: batch 8×128 tokens) and of prefill. Each shape is timed both ways, alternating,
 * and the median of `--reps` (default 15) runs is printed with GFLOP/s and the ratio. With
 * `--orders`, instead: our kernel with B's panels outside A's blocks against inside (Gemm.ts,
 * `panelsOuter`), alternating over the same heap, and the order the kernel chooses.
 * Run: node bench/wasm-gemm.ts [--reps N] [--format json] [--orders]
 */
import * as tf from "@tensorflow/tfjs"
import { Effect } from "effect"
import { load } from "../src/runtime/Backend.ts"
import { settingsOf, useSettings } from "../src/runtime/Env.ts"
import { makeGemm, panelsOuter } from "../src/runtime/wasm/Gemm.ts"

const argv = process.argv.slice(2)
const option = (name: string) => (argv.includes(name) ? argv[argv.indexOf(name) + 1] : undefined)
const reps = Number(option("--reps") ?? 15)
if (!Number.isInteger(reps) || reps < 1) throw new Error(`--reps: expected a whole number ≥ 1, got "${option("--reps")}"`)
const json = option("--format") === "json"

await Effect.runPromise(load("wasm"))
const tfjs = tf as unknown as Parameters<typeof settingsOf>[0]
const ours = settingsOf(tfjs)
const xnnpack = { ...ours, matmul: "tfjs" }

// [use, batch, m, k, n, transposeA, transposeB]
const shapes: ReadonlyArray<readonly [string, number, number, number, number, boolean, boolean]> = [
  ["d128 projection", 1, 1024, 128, 128, false, false],
  ["d128 FFN up", 1, 1024, 128, 512, false, false],
  ["d128 FFN down, input gradient", 1, 1024, 128, 512, false, true],
  ["d128 FFN up, weight gradient", 1, 128, 1024, 512, true, false],
  ["d128 FFN down, weight gradient", 1, 512, 1024, 128, true, false],
  ["d128 QKV, weight gradient", 1, 128, 1024, 384, true, false],
  ["attention scores (32 heads·rows)", 32, 128, 32, 128, false, true],
  ["attention values", 32, 128, 128, 32, false, false],
  ["attention scores' gradient", 32, 32, 128, 128, true, false],
  ["MoE groups (48 × 64 rows)", 48, 64, 64, 32, false, false],
  ["prefill scores", 8, 256, 32, 512, false, true]
]

const median = (xs: Array<number>) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)]!
if (argv.includes("--orders")) {
  const b = tf.backend() as unknown as { wasm: { asm: { memory: WebAssembly.Memory }; _malloc: (n: number) => number; _free: (p: number) => void }; dataIdMap: { get: (d: object) => { memoryOffset: number } } }
  const gemm = makeGemm({ memory: b.wasm.asm.memory, malloc: b.wasm._malloc, free: b.wasm._free })!
  const at = (t: tf.Tensor) => b.dataIdMap.get(t.dataId).memoryOffset
  console.log("| use | batch×m×k×n | panels inside ms | panels outside ms | inside ÷ outside | chosen |")
  console.log("|---|---|---|---|---|---|")
  for (const [use, batch, m, k, n, ta, tb] of shapes) {
    const a = tf.randomNormal([batch, ...(ta ? [k, m] : [m, k])])
    const bm = tf.randomNormal([batch, ...(tb ? [n, k] : [k, n])])
    const c = tf.zeros([batch, m, n])
    const times = { inside: [] as Array<number>, outside: [] as Array<number> }
    for (let r = 0; r < reps + 1; r++) {
      for (const order of (r % 2 === 0 ? ["inside", "outside"] : ["outside", "inside"]) as Array<"inside" | "outside">) {
        const t0 = performance.now()
        gemm.product({ a: at(a), b: at(bm), c: at(c), batch, aBatched: true, bBatched: true, m, k, n, transposeA: ta, transposeB: tb, panelsOuter: order === "outside" })
        if (r > 0) times[order].push(performance.now() - t0)
      }
    }
    const [i, o] = [median(times.inside), median(times.outside)]
    console.log(`| ${use} | ${batch}×${m}×${k}×${n}${ta ? " Aᵀ" : ""}${tb ? " Bᵀ" : ""} | ${i.toFixed(3)} | ${o.toFixed(3)} | ${(i / o).toFixed(3)} | ${panelsOuter(m, k, n) ? "outside" : "inside"} |`)
    tf.dispose([a, bm, c])
  }
  process.exit(0)
}
const rows: Array<Record<string, unknown>> = []
for (const [use, batch, m, k, n, ta, tb] of shapes) {
  const a = tf.randomNormal(batch > 1 ? [batch, ...(ta ? [k, m] : [m, k])] : ta ? [k, m] : [m, k])
  const b = tf.randomNormal(batch > 1 ? [batch, ...(tb ? [n, k] : [k, n])] : tb ? [n, k] : [k, n])
  const times = { ours: [] as Array<number>, xnnpack: [] as Array<number> }
  for (let r = 0; r < reps + 1; r++) {
    for (const [name, settings] of [["ours", ours], ["xnnpack", xnnpack]] as const) {
      useSettings(tfjs, settings)
      const t0 = performance.now()
      tf.matMul(a, b, ta, tb).dispose()
      if (r > 0) times[name].push(performance.now() - t0)
    }
  }
  useSettings(tfjs, ours)
  const flop = 2 * batch * m * k * n
  const row = {
    use,
    shape: `${batch}×${m}×${k}×${n}${ta ? " Aᵀ" : ""}${tb ? " Bᵀ" : ""}`,
    oursMs: Number(median(times.ours).toFixed(3)),
    xnnpackMs: Number(median(times.xnnpack).toFixed(3)),
    oursGflops: Number((flop / median(times.ours) / 1e6).toFixed(1)),
    xnnpackGflops: Number((flop / median(times.xnnpack) / 1e6).toFixed(1)),
    speedup: Number((median(times.xnnpack) / median(times.ours)).toFixed(2))
  }
  rows.push(row)
  if (json) console.log(JSON.stringify(row))
  tf.dispose([a, b])
}
if (!json) {
  console.log("| use | batch×m×k×n | ours ms (GFLOP/s) | XNNPACK route ms (GFLOP/s) | XNNPACK ÷ ours |")
  console.log("|---|---|---|---|---|")
  for (const r of rows) console.log(`| ${r["use"]} | ${r["shape"]} | ${r["oursMs"]} (${r["oursGflops"]}) | ${r["xnnpackMs"]} (${r["xnnpackGflops"]}) | ${r["speedup"]}× |`)
}
