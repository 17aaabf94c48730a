/**
 * Batched vs unstacked (one 2-D product per matrix) matmuls on tfjs-backend-wasm, for the shapes
 * attention takes in prefill (256 queries) and decode (1 query). Run: node bench/wasm-matmul.ts
 * Used to choose when `makeMatMul` unstacks (src/runtime/Fixes.ts); results in docs/inference.md.
 */
import * as tf from "@tensorflow/tfjs"
import { Effect } from "effect"
import { load } from "../src/runtime/Backend.ts"

// our wasm runtime (with its kernel fixes installed)
await Effect.runPromise(load("wasm"))
const time = (f: () => tf.Tensor, n = 10) => {
  f().dispose()
  const t = performance.now()
  for (let i = 0; i < n; i++) f().dispose()
  return (performance.now() - t) / n
}
console.log("batch  m     k     n      batched ms  unstacked ms  GFLOP/s batched  unstacked")
const shapes = [
  [8, 1, 32, 4096], [8, 1, 32, 8192], [8, 1, 8192, 32], // decode
  [8, 256, 32, 256], [8, 256, 32, 512], [8, 256, 32, 1024], [8, 256, 32, 8192], // prefill scores
  [8, 256, 512, 32], [8, 256, 8192, 32], // prefill values
  [32, 128, 16, 128], [32, 128, 128, 16], [32, 128, 32, 128] // training attention (d64 and d128 models)
] as const
for (const [B, m, k, n] of shapes) {
  const a = tf.randomNormal([B, m, k])
  const b = tf.randomNormal([B, k, n])
  const batched = time(() => tf.matMul(a, b))
  // as makeMatMul does it: per-matrix slices (with our in-place Slice), 2-D products, one stack
  const at = (t: tf.Tensor, i: number) => tf.reshape(tf.slice(t, [i, 0, 0], [1, -1, -1]), t.shape.slice(1))
  const unstacked = time(() => tf.tidy(() => tf.stack(Array.from({ length: B }, (_, i) => tf.matMul(at(a, i), at(b, i))))))
  const g = (ms: number) => ((2 * B * m * k * n) / ms / 1e6).toFixed(2)
  console.log(
    `${String(B).padEnd(6)} ${String(m).padEnd(5)} ${String(k).padEnd(5)} ${String(n).padEnd(6)} ${batched.toFixed(2).padStart(10)}  ${unstacked.toFixed(2).padStart(12)}  ${g(batched).padStart(15)}  ${g(unstacked).padStart(9)}`
  )
  a.dispose()
  b.dispose()
}
