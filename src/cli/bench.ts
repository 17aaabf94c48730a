/**
 * `conceptmoe bench inference`: prefill and decode speed of a MoE baseline and its matched
 * ConceptMoE variants, measured against the static prediction.
 *
 * @since 0.2.0
 */
import { Console, Effect, FileSystem, Option, Path } from "effect"
import { Command, Flag } from "effect/cli"
import type { TopLevelSpec } from "vega-lite"
import { type BenchResult, type BenchSettings, run } from "../infer/Bench.ts"
import { formatNumber, renderTable } from "../internal/Table.ts"
import { loadModel, readJson } from "../models/Load.ts"
import { toSvg } from "../report/Plots.ts"
import { layer as backendLayer } from "../runtime/Backend.ts"
import { flagLimits, format, handled, intFlag, UsageError } from "./shared.ts"
import { backend } from "./train.ts"
import * as Progress from "../internal/Progress.ts"

const quickSettings: BenchSettings = {
  ratios: [1.5, 2, 4],
  strategies: ["topk", "loop"],
  encoderLayers: 2,
  decoderLayers: 2,
  lengths: [128, 256],
  rows: 2,
  decodeSteps: 4,
  repeats: 1,
  repeatUpTo: 0,
  chunk: 256,
  tolerance: 0.01
}

const fullSettings: BenchSettings = {
  ...quickSettings,
  lengths: [256, 512, 1024, 2048, 4096, 8192],
  decodeSteps: 24,
  repeats: 3,
  repeatUpTo: 1024
}

const percent = (x: number) => `${x >= 0 ? "+" : ""}${(x * 100).toFixed(1)}%`

/** The table view: one line per (phase, length, variant), then the KV-cache bytes at the longest length. */
export const renderBench = (r: BenchResult): string => {
  const table = renderTable(
    ["phase", "length", "model", "R", "strategy", "MoE ms", "ConceptMoE ms", "measured", "predicted", "time ratio", "kernels MoE / ConceptMoE", "model MoE ms", "model ConceptMoE ms", "time ratio (model)", "attn share"],
    r.rows.map((x) => [
      x.phase,
      formatNumber(x.length),
      x.model,
      String(x.ratio),
      x.strategy,
      x.msBaseline.toFixed(1),
      x.msConcept.toFixed(1),
      percent(x.speedupMeasured),
      percent(x.speedupPredicted),
      x.timeRatio.toFixed(2),
      `${formatNumber(Math.round(x.kernelsBaseline))} / ${formatNumber(Math.round(x.kernelsConcept))}`,
      x.msModelBaseline.toFixed(1),
      x.msModelConcept.toFixed(1),
      x.timeRatioModel.toFixed(2),
      `${(x.attentionShare * 100).toFixed(0)}%`
    ]),
    [1, 3, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14]
  )
  const longest = Math.max(...r.caches.map((c) => c.length))
  const caches = renderTable(
    ["model", "positions", "encoder", "concept model", "decoder", "total held", "allocated"],
    r.caches.filter((c) => c.length === longest).map((c) => [
      c.model,
      formatNumber(c.length),
      formatNumber(c.encoder),
      formatNumber(c.conceptModel),
      formatNumber(c.decoder),
      formatNumber(c.total),
      formatNumber(c.allocated)
    ]),
    [1, 2, 3, 4, 5, 6]
  )
  const c = r.calibration
  const legend = `time ratio: (1 + measured speedup) / (1 + predicted), 1 when the runtime delivers the FLOP prediction; ` +
    `time model: ms = a·FLOPs + b·kernels, a = ${c.msPerGflopPrefill.toFixed(1)} ms/GFLOP (prefill), ${c.msPerGflopDecode.toFixed(1)} ms/GFLOP (decode), b = ${c.usPerKernel.toFixed(1)} µs per kernel (a probe model's decode steps; a tiny kernel alone ${c.usPerTinyKernel.toFixed(1)} µs), calibrated on this machine before the run`
  return `${table}\n${legend}\n\nKV-cache bytes (float32, ${r.settings.rows} rows) after ${formatNumber(longest)} positions; for the baseline, "concept model" is the layers the variants compress:\n${caches}`
}

/** Measured (solid) and predicted (dashed) speedups against length, one panel per phase. */
export const benchChart = (r: BenchResult): TopLevelSpec => ({
  $schema: "https://vega.github.io/schema/vega-lite/v6.json",
  title: `ConceptMoE speedup over ${r.rows[0]?.baseline ?? "the MoE baseline"} (${r.backend}; boundaries forced to R)`,
  data: {
    values: r.rows.flatMap((x) => [
      { phase: x.phase, length: x.length, model: `${x.model} (${x.strategy}, R=${x.ratio})`, kind: "measured", speedup: x.speedupMeasured * 100 },
      { phase: x.phase, length: x.length, model: `${x.model} (${x.strategy}, R=${x.ratio})`, kind: "predicted (static)", speedup: x.speedupPredicted * 100 }
    ])
  },
  facet: { column: { field: "phase", type: "nominal", title: null, sort: ["prefill", "decode"] } },
  spec: {
    width: 360,
    height: 280,
    mark: { type: "line", point: true },
    encoding: {
      x: { field: "length", type: "quantitative", title: "prompt length (prefill) / KV length (decode)", scale: { type: "log", base: 2 }, axis: { format: "~s" } },
      y: { field: "speedup", type: "quantitative", title: "speedup over the MoE (%)" },
      color: { field: "model", type: "nominal", title: "variant", legend: { labelLimit: 400 } },
      strokeDash: { field: "kind", type: "nominal", title: "" }
    }
  }
})

const inference = Command.make(
  "inference",
  {
    baseline: Flag.String("baseline").pipe(Flag.withDescription("the MoE baseline config"), Flag.withDefault("examples/inference/moe-bench.json")),
    quick: Flag.Boolean("quick").pipe(Flag.withDescription("lengths 128 and 256, 4 decode steps, one repetition (under a minute)"), Flag.withDefault(false)),
    lengths: Flag.String("lengths").pipe(Flag.withDescription("comma-separated prompt / KV lengths (default 256,…,8192; --quick 128,256)"), Flag.optional),
    rows: intFlag("rows", 1, flagLimits.batch).pipe(Flag.withDescription("rows prefilled and decoded together"), Flag.optional),
    repeats: intFlag("repeats", 1, 100).pipe(Flag.withDescription("measure every model this many times at every length, alternating, and keep the median (default: 3 times up to 1024 tokens, once beyond; --quick once)"), Flag.optional),
    format,
    backend,
    out: Flag.String("out").pipe(Flag.withDescription("directory for inference.json and inference.svg"), Flag.withDefault("runs/bench-inference"))
  },
  Effect.fn("bench inference")(function*(f) {
    let settings = f.quick ? quickSettings : fullSettings
    if (Option.isSome(f.lengths)) {
      const lengths = f.lengths.value.split(",").map((s) => Number(s.trim()))
      if (lengths.length === 0 || lengths.some((l) => !Number.isInteger(l) || l < 2)) {
        return yield* new UsageError({ message: `--lengths must be whole numbers ≥ 2 separated by commas, got "${f.lengths.value}"` })
      }
      settings = { ...settings, lengths }
    }
    if (Option.isSome(f.rows)) {
      if (!(f.rows.value >= 1)) return yield* new UsageError({ message: `--rows must be ≥ 1, got ${f.rows.value}` })
      settings = { ...settings, rows: f.rows.value }
    }
    if (Option.isSome(f.repeats)) {
      settings = { ...settings, repeats: f.repeats.value, repeatUpTo: Math.max(...settings.lengths) }
    }
    const json = yield* readJson(f.baseline)
    const base = yield* loadModel(f.baseline)
    if (base.decoder === undefined || base.concept !== undefined) {
      return yield* new UsageError({ message: `${f.baseline}: the baseline must be a decoder (MoE) config` })
    }
    const result = yield* run(base, json, settings, { quiet: f.format === "json" }).pipe(
      Effect.provide(backendLayer(Option.getOrUndefined(f.backend))),
      // a run that ends early leaves no progress bar under its message
      Effect.ensuring(Progress.clear)
    )
    const fs = yield* FileSystem.FileSystem
    const path = yield* Path.Path
    yield* fs.makeDirectory(f.out, { recursive: true })
    const write = (name: string, text: string) =>
      Effect.gen(function*() {
        const file = path.join(f.out, name)
        const tmp = `${file}.tmp-${process.pid}`
        yield* fs.writeFileString(tmp, text)
        yield* fs.rename(tmp, file)
      })
    yield* write("inference.json", JSON.stringify(result, null, 2) + "\n")
    yield* write("inference.svg", yield* Effect.promise(() => toSvg(benchChart(result))))
    if (f.format === "json") {
      yield* Console.log(JSON.stringify(result.rows, null, 2))
    } else {
      yield* Console.log(renderBench(result))
      yield* Console.log(`\nwrote ${path.join(f.out, "inference.json")} and ${path.join(f.out, "inference.svg")} (${result.backend})`)
    }
  }, handled)
).pipe(Command.withDescription("Prefill and decode time of a MoE baseline and its matched ConceptMoE variants (R 1.5, 2, 4; strategies topk and loop), measured vs the static prediction."))

export const bench = Command.make("bench").pipe(
  Command.withDescription("Benchmarks that run the models."),
  Command.withSubcommands([inference])
)
