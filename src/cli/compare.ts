/**
 * `conceptmoe compare`: the matched MoE / ConceptMoE pair, trained on the same data and token
 * budget, compared on validation bits per byte.
 *
 * @since 0.1.0
 */
import { Console, Effect, FileSystem, Option, Path, Schema } from "effect"
import { Argument, Command, Flag } from "effect/cli"
import * as Cost from "../cost/Cost.ts"
import { formatNumber, formatPercent, renderTable } from "../internal/Table.ts"
import { modelFromJson, readJson } from "../models/Load.ts"
import { reallocate as solve, strategies } from "../models/Reallocate.ts"
import { lineChart, toSvg } from "../report/Plots.ts"
import { layer as backendLayer } from "../runtime/Backend.ts"
import { byteTokenizer, sotuSplits } from "../train/Data.ts"
import { train as trainModel, type TrainResult, TrainSettings } from "../train/Train.ts"
import * as Stop from "../train/Stop.ts"
import { handled, positive, tolerance, UsageError } from "./shared.ts"
import { backend } from "./train.ts"

export const compare = Command.make(
  "compare",
  {
    baseline: Argument.String("baseline").pipe(Argument.withDescription("the MoE baseline config")),
    ratio: Flag.Finite("ratio").pipe(Flag.withDescription("target compression ratio R > 1"), Flag.withDefault(2)),
    strategy: Flag.Literals("strategy", strategies).pipe(Flag.withDescription("reallocation strategy"), Flag.withDefault("topk")),
    encoderLayers: Flag.Int("encoder-layers").pipe(Flag.withDescription("baseline layers that become the encoder"), Flag.withDefault(4)),
    decoderLayers: Flag.Int("decoder-layers").pipe(Flag.withDescription("baseline layers that become the decoder"), Flag.withDefault(4)),
    tolerance,
    steps: Flag.Int("steps").pipe(Flag.withDescription("training steps for each model"), Flag.withDefault(200)),
    batch: Flag.Int("batch").pipe(Flag.withDescription("rows per batch"), Flag.withDefault(8)),
    seqLen: Flag.Int("seq-len").pipe(Flag.withDescription("tokens per row"), Flag.withDefault(128)),
    seed: Flag.Int("seed").pipe(Flag.withDescription("seed of data order, initialisation and sampling"), Flag.withDefault(0)),
    evalEvery: Flag.Int("eval-every").pipe(Flag.withDescription("steps between validation evaluations"), Flag.withDefault(50)),
    backend,
    out: Flag.String("out").pipe(Flag.withDescription("run directory"), Flag.withDefault("runs/compare"))
  },
  Effect.fn("compare")(function*(f) {
    for (const [name, v] of [["steps", f.steps], ["batch", f.batch], ["seq-len", f.seqLen], ["eval-every", f.evalEvery]] as const) {
      yield* positive(name, Option.some(v))
    }
    const json = yield* readJson(f.baseline)
    const base = yield* modelFromJson(json, f.baseline)
    if (base.decoder === undefined) return yield* new UsageError({ message: `${f.baseline}: the baseline must be a decoder config` })
    const [best] = yield* solve(base.decoder, base.analysis, {
      ratio: f.ratio,
      strategy: f.strategy,
      tolerance: f.tolerance,
      encoderLayers: f.encoderLayers,
      decoderLayers: f.decoderLayers,
      limit: 1
    })
    const { ratio, ...rest } = best!.spec
    const concept = yield* modelFromJson({ kind: "conceptmoe", name: best!.name, baseline: json, ratio, ...rest }, f.baseline)
    yield* Console.log(
      `matched pair: ${base.name} and ${concept.name} (params ${formatPercent(best!.matched.residual.params)}, FLOPs/token ${formatPercent(best!.matched.residual.flops)}; with chunk + joint decoding ${formatPercent(best!.residualAll.params)}, ${formatPercent(best!.residualAll.flops)})`
    )
    const settings = Schema.decodeUnknownSync(TrainSettings)({
      steps: f.steps,
      batchSize: f.batch,
      seqLen: f.seqLen,
      seed: f.seed,
      evalEvery: f.evalEvery,
      checkpointEvery: f.steps,
      logEvery: Math.max(1, Math.floor(f.steps / 20))
    })
    const data = sotuSplits(byteTokenizer, f.seed)
    const path = yield* Path.Path
    const results: Array<TrainResult> = []
    for (const m of [base, concept]) {
      const r = yield* trainModel(m, settings, { out: path.join(f.out, m.name), resume: false, data }).pipe(
        Effect.provide(backendLayer(Option.getOrUndefined(f.backend))),
        Effect.catchTag("Stopped", (e) => Stop.report(e, Stop.compareHint([base, concept].map((x) => x.name), results.length, path.join(f.out, m.name), f.out)).pipe(Effect.as(undefined)))
      )
      if (r === undefined) return
      results.push(r)
    }
    const rows = [base, concept].map((m, i) => {
      const r = results[i]!
      const last = [...r.metrics].reverse().find((x) => x.compression !== undefined)
      return [
        m.name,
        formatNumber(Cost.total(m.analysis.cost.params)),
        formatNumber(Cost.matmulPerToken(m.analysis.cost)),
        last?.compression === undefined ? "-" : last.compression.toFixed(2),
        r.finalValBitsPerByte.toFixed(4),
        r.tokensPerSecond.toFixed(0)
      ]
    })
    const table = renderTable(["model", "params", "FLOPs/token (static)", "actual R (last step)", "val bits/byte", "train tokens/s"], rows, [1, 2, 3, 4, 5])
    yield* Console.log(`\n${table}`)
    const svg = yield* Effect.promise(() =>
      toSvg(lineChart({
        title: `Training loss: ${base.name} vs ${concept.name} (same data, same tokens)`,
        x: "step",
        y: "loss (nats/token)",
        linear: true,
        rows: [base, concept].flatMap((m, i) => results[i]!.metrics.map((x) => ({ series: m.name, x: x.step + 1, y: x.loss })))
      }))
    )
    const fs = yield* FileSystem.FileSystem
    const file = path.join(f.out, "losses.svg")
    yield* fs.writeFileString(`${file}.tmp-${process.pid}`, svg)
    yield* fs.rename(`${file}.tmp-${process.pid}`, file)
    const summary = path.join(f.out, "summary.json")
    yield* fs.writeFileString(`${summary}.tmp-${process.pid}`, JSON.stringify({
      settings,
      models: [base, concept].map((m, i) => ({
        name: m.name,
        params: Cost.total(m.analysis.cost.params),
        flopsPerToken: Cost.matmulPerToken(m.analysis.cost),
        valBitsPerByte: results[i]!.finalValBitsPerByte,
        tokensPerSecond: results[i]!.tokensPerSecond,
        compression: [...results[i]!.metrics].reverse().find((x) => x.compression !== undefined)?.compression ?? null
      }))
    }, null, 2))
    yield* fs.rename(`${summary}.tmp-${process.pid}`, summary)
    yield* Console.log(`\nwrote ${file} and ${summary}`)
  }, handled)
).pipe(
  Command.withDescription("Train an MoE baseline and its matched ConceptMoE on the same data and token budget, and compare them."),
  Command.withExamples([
    { command: "conceptmoe compare examples/compare/moe-tiny.json --encoder-layers 2 --decoder-layers 2 --ratio 2 --strategy topk", description: "the README's main job" }
  ])
)
