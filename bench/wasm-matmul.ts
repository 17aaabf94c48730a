/**
 * Batched vs unstacked (one 2-D product per matrix) matmuls on tfjs-backend-wasm, for the shapes
 * attention takes in prefill (256 queries) and decode (1 query). Run: node bench/wasm-matmul.ts
 * Used to choose when `makeMatMul` unstacks (src/runtime/Fixes.ts); results in docs/inference.md.
 */
import * as tf from "@tensorflow/tfjs"
import "@tensorflow/tfjs-backend-wasm"

await tf.setBackend("wasm")
const time = (f: () => tf.Tensor, n = 10) => {
  f().dispose()
  const t = performance.now()
  for (let i = 0; i < n; i++) f().dispose()
  return (performance.now() - t) / n
}
console.log("batch  m     k     n      batched ms  unstacked ms  GFLOP/s batched  unstacked")
for (const [B, m, k, n] of [[8, 1, 32, 4096], [8, 1, 32, 8192], [8, 1, 8192, 32], [8, 256, 32, 8192], [8, 256, 8192, 32]] as const) {
  const a = tf.randomNormal([B, m, k])
  const b = tf.randomNormal([B, k, n])
  const batched = time(() => tf.matMul(a, b))
  const unstacked = time(() => tf.tidy(() => {
    const bs = tf.unstack(b)
    return tf.stack(tf.unstack(a).map((x, i) => tf.matMul(x, bs[i]!)))
  }))
  const g = (ms: number) => ((2 * B * m * k * n) / ms / 1e6).toFixed(2)
  console.log(
    `${String(B).padEnd(6)} ${String(m).padEnd(5)} ${String(k).padEnd(5)} ${String(n).padEnd(6)} ${batched.toFixed(2).padStart(10)}  ${unstacked.toFixed(2).padStart(12)}  ${g(batched).padStart(15)}  ${g(unstacked).padStart(9)}`
  )
  a.dispose()
  b.dispose()
}
