import { Effect, Layer, Schema } from "effect"
import { NodeServices } from "@effect/platform-node"
import * as fs from "node:fs"
import { modelFromJson } from "./src/models/Load.ts"
import { layer } from "./src/runtime/Backend.ts"
import { train, TrainSettings } from "./src/train/Train.ts"
const base = JSON.parse(fs.readFileSync("examples/compare/moe-tiny.json", "utf8"))
const scale = Number(process.argv[2] ?? "1")
const settings = Schema.decodeUnknownSync(TrainSettings)({ steps: 100, batchSize: 8, seqLen: 128, logEvery: 1000, evalEvery: 100, evalBatches: 4, optimizer: { partLr: { chunk: scale } } })
const prog = Effect.gen(function*() {
  const m = yield* modelFromJson({ kind: "conceptmoe", name: "c", baseline: base, ratio: 2, encoderLayers: 2, decoderLayers: 2, topK: 7 }, "x.json")
  const r = yield* train(m, settings, { out: `/tmp/run-scale-${scale}`, resume: false, quiet: true })
  const rs = r.metrics.map((x) => x.compression!)
  console.log("scale", scale, "val", r.finalValBitsPerByte.toFixed(4), "R by 10 steps:", [0,1,2,3,4,5,6,7,8,9].map(i => (rs.slice(i*10, i*10+10).reduce((a,b)=>a+b,0)/10).toFixed(2)).join(" "))
})
await Effect.runPromise(prog.pipe(Effect.provide(Layer.merge(layer("wasm"), NodeServices.layer))))
