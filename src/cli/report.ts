/**
 * `conceptmoe report`: the best matched ConceptMoE for each strategy and ratio, as SVG plots and a
 * Markdown summary.
 *
 * @since 0.1.0
 */
import { Console, Effect } from "effect"
import * as Cost from "../cost/Cost.ts"
import { Argument, Command, Flag } from "effect/cli"
import { type Strategy, strategies } from "../models/Reallocate.ts"
import { type ReportEntry, reportFiles, writeFiles } from "../report/Reallocation.ts"
import { limits } from "../graph/Limits.ts"
import { format, handled, intFlag, kvBytes, seqLen, tolerance, UsageError } from "./shared.ts"
import { loadBaseline, seqLenFor, solveOn } from "./baseline.ts"

/**
 * One strategy and ratio of `report --format json`: the candidate with its spec, parameters, FLOPs
 * per token and relative differences from the baseline (under the solver's convention, and with every
 * part counted), or null with why and the nearest miss.
 */
const entryFigures = (e: ReportEntry) => {
  if (e.result._tag === "none") return { candidate: null, reason: e.result.error.reason, nearest: e.result.error.nearest }
  const c = e.result.candidate
  return {
    candidate: c.name,
    spec: c.spec,
    params: Cost.total(c.analysis.cost.params),
    flopsPerToken: Cost.matmulPerToken(c.analysis.cost),
    residual: c.matched.residual,
    excludedParts: c.matched.excluded,
    residualAll: c.residualAll
  }
}

const list = (name: string, raw: string) => raw.split(",").map((s) => s.trim()).filter((s) => s !== "").map((s) => ({ name, s }))

export const report = Command.make(
  "report",
  {
    baseline: Argument.String("baseline").pipe(Argument.withDescription("the MoE baseline config")),
    ratios: Flag.String("ratio").pipe(Flag.withDescription("comma-separated target ratios, e.g. 1.5,2"), Flag.withDefault("1.5,2")),
    strategies: Flag.String("strategy").pipe(Flag.withDescription(`comma-separated strategies among ${strategies.join(", ")}`), Flag.withDefault("topk,loop,width")),
    out: Flag.String("out").pipe(Flag.withDescription("directory to write the report into"), Flag.withDefault("report")),
    encoderLayers: intFlag("encoder-layers", 0, limits.layers).pipe(Flag.withDescription("baseline layers that become the encoder"), Flag.withDefault(4)),
    decoderLayers: intFlag("decoder-layers", 0, limits.layers).pipe(Flag.withDescription("baseline layers that become the decoder"), Flag.withDefault(4)),
    seqLen,
    tolerance,
    kvBytes,
    format
  },
  Effect.fn("report")(function*(f) {
    const ratios = list("ratio", f.ratios).map(({ s }) => Number(s))
    if (ratios.length === 0 || ratios.some((r) => !(r > 1 && r <= limits.seqLen))) {
      return yield* new UsageError({ message: `--ratio must list numbers above 1 and at most ${limits.seqLen}, separated by commas; got "${f.ratios}"` })
    }
    const chosen = list("strategy", f.strategies).map(({ s }) => s)
    const unknown = chosen.filter((s) => !(strategies as ReadonlyArray<string>).includes(s))
    if (chosen.length === 0 || unknown.length > 0) {
      return yield* new UsageError({ message: `--strategy: unknown ${unknown.join(", ") || "(none given)"}; expected ${strategies.join(", ")}` })
    }
    const baseline = yield* loadBaseline(f.baseline)
    const { json, model } = baseline
    const T = yield* seqLenFor(f.seqLen, model)
    const entries: Array<ReportEntry> = []
    const options = { tolerance: f.tolerance, encoderLayers: f.encoderLayers, decoderLayers: f.decoderLayers, seqLen: T, limit: 1 }
    for (const strategy of chosen as ReadonlyArray<Strategy>) {
      for (const ratio of ratios) {
        // a refused field names the flag behind it: one --ratio of the list, or the layer split
        const r = yield* Effect.result(solveOn(baseline, { ...options, ratio, strategy }, ["--ratio", "--strategy", "--encoder-layers", "--decoder-layers"]))
        if (r._tag === "Success") entries.push({ strategy, ratio, result: { _tag: "found", candidate: r.success[0]! } })
        else if (r.failure._tag === "NoReallocation") entries.push({ strategy, ratio, result: { _tag: "none", error: r.failure } })
        else return yield* r.failure
        if (f.format === "table") yield* Console.log(`${strategy} R=${ratio}: ${r._tag === "Success" ? r.success[0]!.name : "no match"}`)
      }
    }
    const files = yield* reportFiles(model, json, entries, { seqLen: T, bytesPerElement: f.kvBytes })
    const written = yield* writeFiles(f.out, files)
    if (f.format === "json") {
      yield* Console.log(JSON.stringify({
        baseline: model.name,
        seqLen: T,
        params: Cost.total(model.analysis.cost.params),
        flopsPerToken: Cost.matmulPerToken(model.analysis.cost),
        found: entries.map((e) => ({ strategy: e.strategy, ratio: e.ratio, ...entryFigures(e) })),
        files: written
      }, null, 2))
    } else {
      yield* Console.log(`wrote ${written.join(", ")}`)
    }
  }, handled)
).pipe(
  Command.withDescription("Write SVG plots and a Markdown summary of the matched ConceptMoE variants of an MoE baseline."),
  Command.withExamples([
    { command: "conceptmoe report examples/moe-base.json --ratio 1.5,2 --out report/", description: "all three strategies at R=1.5 and 2" }
  ])
)
