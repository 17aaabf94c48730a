/**
 * Where the host time of tfjs's webgpu matMul goes: a CPU profile (the inspector's sampling
 * profiler, 50 µs) of chains of [size, size] products through tfjs, each chain ended by one read-back.
 * Prints the wall time per product and the functions with the most self time.
 * Run: node bench/gpu/host-profile.ts [size, default 128] [products, default 2000]
 * (CONCEPTMOE_MATMUL=tfjs for tfjs's own kernel rather than the tuner's wrapper).
 */
import { Effect } from "effect"
import { Session } from "node:inspector/promises"
import type { Tensor } from "../../src/graph/Apply.ts"
import { load } from "../../src/runtime/Backend.ts"

const { tf } = await Effect.runPromise(load("webgpu"))
const size = Number(process.argv[2] ?? 128)
const products = Number(process.argv[3] ?? 2000)
const a = tf.randomNormal([size, size], 0, 1 / Math.sqrt(size))
const b = tf.randomNormal([size, size], 0, 1 / Math.sqrt(size))
await a.data()
await b.data()
const chains = async (count: number) => {
  for (let r = 0; r < count / 100; r++) {
    const made: Array<Tensor> = []
    let x: Tensor = a
    for (let i = 0; i < 100; i++) made.push(x = tf.matMul(x, b))
    await x.data()
    tf.dispose(made)
  }
}
await chains(300)
const session = new Session()
session.connect()
await session.post("Profiler.enable")
await session.post("Profiler.setSamplingInterval", { interval: 50 })
await session.post("Profiler.start")
const t0 = performance.now()
await chains(products)
const ms = performance.now() - t0
const { profile } = (await session.post("Profiler.stop")) as unknown as {
  profile: { nodes: Array<{ id: number; callFrame: { functionName: string; url: string; lineNumber: number } }>; samples: Array<number> }
}
const byId = new Map(profile.nodes.map((n) => [n.id, n]))
const self = new Map<string, number>()
for (const id of profile.samples) {
  const f = byId.get(id)!.callFrame
  const key = `${f.functionName === "" ? "(anonymous)" : f.functionName} ${f.url.split("/").at(-1)}:${f.lineNumber}`
  self.set(key, (self.get(key) ?? 0) + 1)
}
console.log(JSON.stringify({ size, products, msPerProduct: Number((ms / products).toFixed(3)), samples: profile.samples.length }))
for (const [key, n] of [...self].sort((x, y) => y[1] - x[1]).slice(0, 15)) {
  console.log(JSON.stringify({ selfPercent: Number(((100 * n) / profile.samples.length).toFixed(1)), at: key }))
}
process.exit(0)
