/**
 * Does a ConceptMoE hold its compression at the target R while it trains? For each strategy and R,
 * the solver's best match for the baseline (as `compare` picks it) trains for `--steps` steps; the
 * table gives the lowest and highest mean sampled R of the 10-step windows of the second half, the
 * second half's mean, and the threshold R (p ≥ ½) on validation at the last step, with pass/fail
 * against ±10% (windows) and ±15% (threshold).
 *
 * Run: node bench/ratio-hold.ts [--baseline examples/compare/moe-tiny.json] [--strategies topk,loop,width]
 *   [--ratios 1.5,2,4] [--steps 100] [--batch 8] [--seq-len 128] [--control pi|plain] [--kp K] [--ki K]
 *   [--lambda L] [--threshold-weight W] [--chunk-lr M] [--part-beta1 JSON]
 *   [--eval-every N] [--eval-batches 4] [--encoder-layers 2] [--decoder-layers 2] [--backend wasm] [--seed 0] [--json FILE]
 * A (strategy, R) that the solver cannot match is listed as such.
 */
import { NodeServices } from "@effect/platform-node"
import { Effect, Layer, Result, Schema } from "effect"
import * as fs from "node:fs"
import * as os from "node:os"
import * as path from "node:path"
import { modelFromJson } from "../src/models/Load.ts"
import { reallocate } from "../src/models/Reallocate.ts"
import { layer as backendLayer } from "../src/runtime/Backend.ts"
import { compressionSummary, within } from "../src/train/Compression.ts"
import { byteTokenizer, sotuSplits } from "../src/train/Data.ts"
import { train, TrainSettings } from "../src/train/Train.ts"

const arg = (name: string, fallback: string): string => {
  const i = process.argv.indexOf(`--${name}`)
  return i >= 0 && i + 1 < process.argv.length ? process.argv[i + 1]! : fallback
}
const baselineFile = arg("baseline", path.join(import.meta.dirname, "..", "examples", "compare", "moe-tiny.json"))
const strategies = arg("strategies", "topk,loop,width").split(",") as Array<"topk" | "loop" | "width">
const ratios = arg("ratios", "1.5,2,4").split(",").map(Number)
const steps = Number(arg("steps", "100"))
const control = arg("control", "pi")
const overrides = {
  ratioControl: control,
  ...(process.argv.includes("--kp") ? { kp: Number(arg("kp", "")) } : {}),
  ...(process.argv.includes("--ki") ? { ki: Number(arg("ki", "")) } : {}),
  ...(process.argv.includes("--lambda") ? { lambda: Number(arg("lambda", "")) } : {}),
  ...(process.argv.includes("--threshold-weight") ? { thresholdWeight: Number(arg("threshold-weight", "")) } : {})
}
const settings = Schema.decodeUnknownSync(TrainSettings)({
  steps,
  batchSize: Number(arg("batch", "8")),
  seqLen: Number(arg("seq-len", "128")),
  seed: Number(arg("seed", "0")),
  // --eval-every 1 measures the threshold R on the same validation bytes after every step (printed per step)
  evalEvery: Number(arg("eval-every", String(steps))),
  evalBatches: Number(arg("eval-batches", "4")),
  checkpointEvery: steps,
  logEvery: steps,
  optimizer: {
    ...(process.argv.includes("--chunk-lr") ? { partLr: { chunk: Number(arg("chunk-lr", "1")) } } : {}),
    // e.g. --part-beta1 '{}': every part with β₁ 0.9, the router's momentum back (default { chunk: 0 })
    ...(process.argv.includes("--part-beta1") ? { partBeta1: JSON.parse(arg("part-beta1", "{}")) } : {})
  }
})
const baselineJson = JSON.parse(fs.readFileSync(baselineFile, "utf8"))
const data = sotuSplits(byteTokenizer, settings.seed)

interface Row {
  readonly strategy: string
  readonly ratio: number
  readonly model?: string
  readonly windows?: { readonly min: number; readonly max: number }
  readonly meanSampledR?: number
  readonly valCompression?: number
  readonly valBitsPerByte?: number
  readonly pass?: boolean
  readonly note?: string
}

const program = Effect.gen(function*() {
  const base = yield* modelFromJson(baselineJson, baselineFile)
  const rows: Array<Row> = []
  for (const strategy of strategies) {
    for (const ratio of ratios) {
      const found = yield* Effect.result(reallocate(base.decoder!, base.analysis, {
        ratio,
        strategy,
        encoderLayers: Number(arg("encoder-layers", "2")),
        decoderLayers: Number(arg("decoder-layers", "2")),
        limit: 1
      }))
      if (Result.isFailure(found)) {
        rows.push({ strategy, ratio, note: "no match" })
        continue
      }
      const { ratio: r, ...rest } = found.success[0]!.spec
      const model = yield* modelFromJson({ kind: "conceptmoe", name: found.success[0]!.name, baseline: baselineJson, ratio: r, ...rest, ...overrides }, "ratio-hold")
      const out = fs.mkdtempSync(path.join(os.tmpdir(), "ratio-hold-"))
      const t0 = performance.now()
      const result = yield* train(model, settings, { out, resume: false, quiet: true, data })
      fs.rmSync(out, { recursive: true, force: true })
      const s = compressionSummary(result.metrics, { steps })
      const windowsOk = s.windows !== undefined && within(s.windows.min, ratio, 0.1) && within(s.windows.max, ratio, 0.1)
      const row: Row = {
        strategy,
        ratio,
        model: model.name,
        ...(s.windows === undefined ? {} : { windows: s.windows }),
        ...(s.meanSampledR === undefined ? {} : { meanSampledR: s.meanSampledR }),
        ...(s.valCompression === undefined ? {} : { valCompression: s.valCompression }),
        valBitsPerByte: result.finalValBitsPerByte,
        pass: windowsOk && within(s.valCompression, ratio, 0.15)
      }
      rows.push(row)
      console.error(`${strategy} R ${ratio} ${model.name}: ${JSON.stringify(row)} (${((performance.now() - t0) / 1000).toFixed(0)} s)`)
      const perStep = result.metrics.map((m) => m.compression?.toFixed(2)).join(" ")
      console.error(`  sampled R per step: ${perStep}`)
      if (settings.evalEvery < steps) console.error(`  threshold R (p ≥ ½) on validation per evaluation: ${result.metrics.filter((m) => m.valCompression !== undefined).map((m) => `${m.step + 1}:${m.valCompression!.toFixed(2)}`).join(" ")}`)
      const perStepThreshold = result.metrics.map((m) => (m.thresholdRate === undefined ? "-" : (1 / m.thresholdRate).toFixed(2))).join(" ")
      console.error(`  threshold R (p ≥ ½) of the training batch per step: ${perStepThreshold}`)
    }
  }
  const f = (x: number | undefined) => (x === undefined ? "-" : x.toFixed(2))
  console.log(`ratio control ${JSON.stringify(overrides)}; ${steps} steps of ${settings.batchSize}×${settings.seqLen}; windows: 10 steps of the second half`)
  console.log("| strategy | R | model | windows' mean sampled R (min–max) | second half | threshold R (val) | val bits/byte | within ±10% / ±15% |")
  console.log("|---|---|---|---|---|---|---|---|")
  for (const row of rows) {
    console.log(row.note !== undefined
      ? `| ${row.strategy} | ${row.ratio} | ${row.note} | | | | | |`
      : `| ${row.strategy} | ${row.ratio} | ${row.model} | ${f(row.windows?.min)}–${f(row.windows?.max)} | ${f(row.meanSampledR)} | ${f(row.valCompression)} | ${row.valBitsPerByte!.toFixed(4)} | ${row.pass ? "pass" : "FAIL"} |`)
  }
  const json = arg("json", "")
  if (json !== "") fs.writeFileSync(json, JSON.stringify({ overrides, settings: { steps, batchSize: settings.batchSize, seqLen: settings.seqLen }, rows }, null, 1))
})

Effect.runPromise(program.pipe(Effect.provide(Layer.merge(backendLayer(arg("backend", "wasm") as never), NodeServices.layer)))).catch((e) => {
  console.error(e)
  process.exit(1)
})
