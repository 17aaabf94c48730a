/**
 * `conceptmoe reallocate`: ConceptMoE configurations that match an MoE baseline's budget.
 *
 * @since 0.1.0
 */
import { Console, Effect, Option } from "effect"
import { Argument, Command, Flag } from "effect/cli"
import { formatNumber, formatPercent, renderTable } from "../internal/Table.ts"
import { candidateReport, strategies } from "../models/Reallocate.ts"
import { limits } from "../graph/Limits.ts"
import { flagLimits, format, handled, intFlag, kvBytes, ratioFlag, seqLen, tolerance } from "./shared.ts"
import { loadBaseline, seqLenFor, solveOn, solverOptions } from "./baseline.ts"

export const reallocate = Command.make(
  "reallocate",
  {
    baseline: Argument.String("baseline").pipe(Argument.withDescription("the MoE baseline: a conceptmoe \"moe\" config or a Hugging Face MoE config.json")),
    ratio: ratioFlag.pipe(Flag.withDescription("target compression ratio R > 1")),
    strategy: Flag.Literals("strategy", strategies).pipe(
      Flag.withDescription("topk: more experts; loop: more experts + looped layers; width: wider concept model, fewer experts")
    ),
    seqLen,
    format,
    tolerance,
    kvBytes,
    overheads: Flag.Literals("overheads", ["exclude", "include"]).pipe(
      Flag.withDescription("exclude (the paper's convention) or include the chunk module and joint decoding when matching"),
      Flag.withDefault("exclude")
    ),
    encoderLayers: intFlag("encoder-layers", 0, limits.layers).pipe(Flag.withDescription("baseline layers that become the encoder"), Flag.withDefault(4)),
    decoderLayers: intFlag("decoder-layers", 0, limits.layers).pipe(Flag.withDescription("baseline layers that become the decoder"), Flag.withDefault(4)),
    loopLayers: intFlag("loop-layers", 1, limits.layers).pipe(Flag.withDescription("strategy loop: fix how many concept-model layers loop"), Flag.optional),
    merge: Flag.Literals("merge", ["sum", "last"]).pipe(Flag.withDescription("how a chunk becomes a concept"), Flag.withDefault("sum")),
    limit: intFlag("limit", 1, flagLimits.candidates).pipe(Flag.withDescription("at most this many candidates"), Flag.withDefault(10))
  },
  Effect.fn("reallocate")(function*(f) {
    const baseline = yield* loadBaseline(f.baseline)
    const { json, model } = baseline
    const T = yield* seqLenFor(f.seqLen, model)
    const candidates = yield* solveOn(baseline, {
      ...solverOptions(f),
      merge: f.merge,
      limit: f.limit,
      seqLen: T,
      ...(Option.isSome(f.loopLayers) ? { loopLayers: f.loopLayers.value } : {})
    }, ["--ratio", "--strategy", "--encoder-layers", "--decoder-layers", "--loop-layers"])
    const reports = candidates.map((c) => candidateReport(c, json, { seqLen: T, bytesPerElement: f.kvBytes }))
    if (f.format === "json") {
      yield* Console.log(JSON.stringify(reports, null, 2))
      return
    }
    const x = (n: number) => `${n.toFixed(2)}×`
    yield* Console.log(
      `${model.name}: ${candidates.length} ${f.strategy} candidate${candidates.length === 1 ? "" : "s"} at R=${f.ratio} within ±${f.tolerance * 100}%` +
        ` (${f.overheads === "exclude" ? "chunk and joint-decoding parts excluded, as the paper matches" : "all parts included"}); seq-len ${formatNumber(T)}\n`
    )
    yield* Console.log(renderTable(
      ["candidate", "top-k", "loop", "width", "experts", "expert hidden", "Δparams", "ΔFLOPs/token", "Δparams all parts", "ΔFLOPs all parts", "concept attn ÷", "concept KV ÷"],
      reports.map((r, i) => {
        const c = candidates[i]!
        return [
          r.name,
          `${c.spec.topK ?? ""}`,
          c.layout.loop === null ? "-" : `${c.layout.loop.layers}×${c.layout.loop.times}`,
          `${c.layout.width}`,
          `${c.spec.experts ?? "="}`,
          `${c.spec.expertHidden ?? "="}`,
          formatPercent(r.relative.params),
          formatPercent(r.relative.flops),
          formatPercent(r.relativeAllParts.params),
          formatPercent(r.relativeAllParts.flops),
          x(r.conceptModelReduction.attentionMap),
          x(r.conceptModelReduction.kvCache)
        ]
      }),
      [1, 4, 5, 6, 7, 8, 9, 10, 11]
    ))
    yield* Console.log(
      `\nbaseline: ${formatNumber(reports[0]!.params.baseline)} params, ${formatNumber(reports[0]!.flops.baseline)} FLOPs/token (matmul, forward). ` +
        `attn ÷ and KV ÷: the concept model's attention map and KV cache at seq-len, baseline over ConceptMoE.`
    )
    yield* Console.log("Each candidate's full config: --format json → [i].config (conceptmoe budget reads it).")
  }, handled)
).pipe(
  Command.withDescription("Search ConceptMoE configurations whose total params and activated FLOPs/token match an MoE baseline."),
  Command.withExamples([
    { command: "conceptmoe reallocate examples/latency/baseline-attn8.json --ratio 2 --strategy topk", description: "more experts at R=2 (finds 1L-top24-R2)" },
    { command: "conceptmoe reallocate examples/latency/baseline-attn8.json --ratio 2 --strategy loop --format json", description: "looped layers, as JSON" },
    { command: "conceptmoe reallocate examples/moe-base.json --ratio 2 --strategy width", description: "a wider concept model with fewer experts" },
    {
      command: "conceptmoe reallocate examples/compare/moe-tiny.json --ratio 2 --strategy topk --encoder-layers 2 --decoder-layers 2 --overheads include",
      description: "every part counted: narrower, more numerous concept-model experts pay for the chunk module"
    }
  ])
)
