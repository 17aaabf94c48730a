/**
 * `conceptmoe compare`: the matched MoE / ConceptMoE pair, trained on the same data and token
 * budget over one or more seeds, compared on validation bits per byte, with the compute each
 * actually spent and the unigram and bigram floors. The work is `train/Compare.ts`'s.
 *
 * @since 0.1.0
 */
import { Console, Effect, Option, Schema } from "effect"
import { Argument, Command, Flag } from "effect/cli"
import { formatNumber, formatPercent, renderTable } from "../internal/Table.ts"
import { loadModel, modelFromJson } from "../models/Load.ts"
import { strategies } from "../models/Reallocate.ts"
import { layer as backendLayer } from "../runtime/Backend.ts"
import { type ComparisonReport, compareMatched, lossBands, matchModels, type Overheads } from "../train/Compare.ts"
import { TrainSettings } from "../train/Train.ts"
import { limits } from "../graph/Limits.ts"
import { flagLimits, format, handled, intFlag, numberFlag, positive, ratioFlag, tolerance, UsageError } from "./shared.ts"
import { backend } from "./train.ts"
import * as Stop from "../train/Stop.ts"
import * as Progress from "../internal/Progress.ts"
import { dataFlag, splitsFor, valFraction } from "./data.ts"
import { loadBaseline, solveOn, solverOptions } from "./baseline.ts"

const fixed = (x: number, digits = 4) => (Number.isFinite(x) ? x.toFixed(digits) : "-")
const signed = (x: number, digits = 4) => (x >= 0 ? "+" : "") + x.toFixed(digits)

/** The human summary of a comparison. */
export const renderComparison = (r: ComparisonReport): string => {
  const [a, b] = r.models
  const lines: Array<string> = []
  const convention = (o: Overheads) => (o === "include" ? "every part counted" : "chunk module and joint decoding left out (the paper's convention)")
  lines.push(
    `matched pair: ${a.name} and ${b.name}, ${convention(r.overheads)}, within ±${formatPercent(r.tolerance).slice(1)}: ` +
      `params ${formatPercent(r.residual[r.overheads].params)}, FLOPs/token ${formatPercent(r.residual[r.overheads].flops)}` +
      ` (${r.overheads === "include" ? "paper's convention" : "every part counted"}: params ${formatPercent(r.residual[r.overheads === "include" ? "exclude" : "include"].params)}, FLOPs/token ${formatPercent(r.residual[r.overheads === "include" ? "exclude" : "include"].flops)})`
  )
  const d = r.data
  lines.push(
    `data: ${d.kind === "sotu" ? "State of the Union addresses (before 2000 train, 2000 on validate)" : `${d.source} (${d.kind}${d.valFraction === null ? "" : `, validation fraction ${d.valFraction}`})`}; ` +
      `train ${formatNumber(d.trainBytes)} bytes, validation ${formatNumber(d.validationBytes)} bytes; sha256 ${d.sha256.slice(0, 16)}…`
  )
  lines.push(
    `floors (byte counts of the training split, add-0.1): unigram ${fixed(r.reference.evaluated.unigram, 3)}, bigram ${fixed(r.reference.evaluated.bigram, 3)} bits/byte ` +
      `on the ${formatNumber(r.reference.evaluated.bytes)} validation bytes the models are scored on; ${fixed(r.reference.validation.unigram, 3)} and ${fixed(r.reference.validation.bigram, 3)} on the whole validation split`
  )
  const seeds = r.seeds.length
  const rs = (x: number | undefined) => (x === undefined ? "-" : x.toFixed(2))
  const rel = (x: { relative: number; flagged: boolean } | undefined) => (x === undefined ? "" : ` (${formatPercent(x.relative)}${x.flagged ? " !" : ""})`)
  lines.push("")
  lines.push(renderTable(
    [
      "model",
      "params",
      `FLOPs/token matched`,
      "R train (2nd half)",
      "FLOPs/token realised",
      "R eval (p ≥ ½)",
      "FLOPs/token at eval R",
      seeds === 1 ? "val bits/byte" : `val bits/byte (mean ± sd, ${seeds} seeds)`,
      "train tokens/s"
    ],
    r.models.map((m) => [
      m.name,
      formatNumber(m.params),
      formatNumber(Math.round(m.flopsPerToken.staticCounted)),
      m.targetRatio === undefined ? "-" : `${rs(m.realisedTrain?.ratio)} (target ${m.targetRatio})`,
      m.realisedTrain === undefined ? "-" : formatNumber(Math.round(m.realisedTrain.flopsPerToken)) + rel(m.realisedTrain),
      rs(m.realisedEval?.ratio),
      m.realisedEval === undefined ? "-" : formatNumber(Math.round(m.realisedEval.flopsPerToken)) + rel(m.realisedEval),
      seeds === 1 ? fixed(m.valBitsPerByte.mean) : `${fixed(m.valBitsPerByte.mean)} ± ${fixed(m.valBitsPerByte.sd)}`,
      formatNumber(Math.round(m.tokensPerSecond.mean))
    ]),
    [1, 2, 4, 6, 7, 8]
  ))
  const diff = r.difference
  lines.push("")
  lines.push(
    `${b.name} − ${a.name}: ${signed(diff.mean)} bits/byte` +
      (diff.low === null || diff.high === null
        ? " (one seed: no interval; --seeds N gives a paired 95% t interval)"
        : `, 95% interval [${signed(diff.low)}, ${signed(diff.high)}] (paired by seed, t with ${diff.n - 1} df; sd of the differences ${fixed(diff.sd)})`)
  )
  for (const w of r.warnings) lines.push(`note: ${w}`)
  if (r.warnings.length === 0 && r.models.some((m) => m.realisedTrain !== undefined)) {
    lines.push(`realised FLOPs/token within ±5% of the matched budget in training and evaluation`)
  }
  return lines.join("\n")
}

export const compare = Command.make(
  "compare",
  {
    baseline: Argument.String("baseline").pipe(Argument.withDescription("the MoE baseline config")),
    candidate: Flag.String("candidate").pipe(
      Flag.withDescription("a ConceptMoE config to compare (it must match the baseline's budget); default: the solver's best at --ratio/--strategy"),
      Flag.optional
    ),
    ratio: ratioFlag.pipe(Flag.withDescription("target compression ratio R > 1"), Flag.withDefault(2)),
    strategy: Flag.Literals("strategy", strategies).pipe(Flag.withDescription("reallocation strategy"), Flag.withDefault("topk")),
    encoderLayers: intFlag("encoder-layers", 0, limits.layers).pipe(Flag.withDescription("baseline layers that become the encoder"), Flag.withDefault(4)),
    decoderLayers: intFlag("decoder-layers", 0, limits.layers).pipe(Flag.withDescription("baseline layers that become the decoder"), Flag.withDefault(4)),
    overheads: Flag.Literals("overheads", ["include", "exclude"]).pipe(
      Flag.withDescription("include (default): match with the chunk module and joint decoding counted; exclude: the paper's convention"),
      Flag.withDefault("include")
    ),
    tolerance,
    steps: intFlag("steps", 1, flagLimits.steps).pipe(Flag.withDescription("training steps for each model"), Flag.withDefault(200)),
    batch: intFlag("batch", 1, flagLimits.batch).pipe(Flag.withDescription("rows per batch"), Flag.withDefault(8)),
    seqLen: intFlag("seq-len", 1, limits.seqLen).pipe(Flag.withDescription("tokens per row"), Flag.withDefault(128)),
    lr: numberFlag("lr", 0, 10, { above: true }).pipe(Flag.withDescription("peak learning rate"), Flag.withDefault(3e-3)),
    warmup: intFlag("warmup", 0, flagLimits.steps).pipe(Flag.withDescription("warm-up steps"), Flag.withDefault(20)),
    seed: intFlag("seed", 0, flagLimits.seed).pipe(Flag.withDescription("the first seed (data order, initialisation and sampling)"), Flag.withDefault(0)),
    seeds: intFlag("seeds", 1, 1000).pipe(Flag.withDescription("train each model on this many seeds (seed, seed+1, …); mean ± sd and a paired interval"), Flag.withDefault(1)),
    evalEvery: intFlag("eval-every", 1, flagLimits.steps).pipe(Flag.withDescription("steps between validation evaluations"), Flag.withDefault(50)),
    evalBatches: intFlag("eval-batches", 1, 10_000).pipe(Flag.withDescription("validation batches per evaluation (the same windows for every seed)"), Flag.withDefault(8)),
    data: dataFlag,
    valFraction,
    backend,
    format,
    out: Flag.String("out").pipe(Flag.withDescription("run directory"), Flag.withDefault("runs/compare"))
  },
  Effect.fn("compare")(function*(f) {
    for (const [name, v] of [["steps", f.steps], ["batch", f.batch], ["seq-len", f.seqLen], ["eval-every", f.evalEvery], ["eval-batches", f.evalBatches], ["seeds", f.seeds]] as const) {
      yield* positive(name, Option.some(v))
    }
    if (!(f.lr > 0)) return yield* new UsageError({ message: `--lr must be a positive number, got ${f.lr}` })
    if (f.warmup < 0) return yield* new UsageError({ message: `--warmup must be 0 or more, got ${f.warmup}` })
    const json = f.format === "json"
    const say = (s: string) => (json ? Effect.void : Console.log(s))
    const baseline = yield* loadBaseline(f.baseline)
    const base = baseline.model
    const concept = Option.isSome(f.candidate)
      ? yield* loadModel(f.candidate.value)
      : yield* Effect.gen(function*() {
        const [best] = yield* solveOn(baseline, { ...solverOptions(f), limit: 1 }, ["--ratio", "--strategy", "--encoder-layers", "--decoder-layers"])
        const { ratio, ...rest } = best!.spec
        return yield* modelFromJson({ kind: "conceptmoe", name: best!.name, baseline: base.config, ratio, ...rest }, f.baseline)
      })
    // the typed proof: a pair read from files that does not match stops here (BudgetMismatch)
    const pair = yield* matchModels(base, concept, { tolerance: f.tolerance, overheads: f.overheads })
    const settings = Schema.decodeUnknownSync(TrainSettings)({
      steps: f.steps,
      batchSize: f.batch,
      seqLen: f.seqLen,
      seed: f.seed,
      evalEvery: f.evalEvery,
      evalBatches: f.evalBatches,
      checkpointEvery: f.steps,
      logEvery: Math.max(1, Math.floor(f.steps / 20)),
      optimizer: { lr: f.lr, warmup: f.warmup }
    })
    const data = splitsFor(f.data, f.valFraction, f.batch, f.seqLen)
    yield* data(f.seed) // refuse bad data before anything trains
    yield* say(`matched pair: ${base.name} and ${concept.name} (${f.overheads === "include" ? "every part counted" : "the paper's convention"}); ${f.seeds} seed${f.seeds === 1 ? "" : "s"}, ${f.steps} steps of ${f.batch}×${f.seqLen} tokens each`)
    const done = yield* compareMatched(pair, {
      settings,
      seeds: Array.from({ length: f.seeds }, (_, i) => f.seed + i),
      data,
      overheads: f.overheads,
      out: f.out,
      quiet: json
    }).pipe(
      Effect.provide(backendLayer(Option.getOrUndefined(f.backend))),
      // a run that ends early (a signal, divergence, a failure) leaves no progress bar under its message
      Effect.ensuring(Progress.clear),
      Effect.catchTag("Stopped", (e) => Stop.report(e, Stop.seriesHint(e)).pipe(Effect.as(undefined)))
    )
    if (done === undefined) return
    const { report, runs, files } = done
    if (json) {
      const window = Math.max(1, Math.floor(f.steps / 50))
      yield* Console.log(JSON.stringify({ ...report, lossBands: lossBands([base.name, concept.name], runs, window), files }, null, 2))
      return
    }
    yield* Console.log(`\n${renderComparison(report)}`)
    yield* Console.log(`\nwrote ${files.losses} and ${files.summary}`)
  }, handled)
).pipe(
  Command.withDescription("Train an MoE baseline and its matched ConceptMoE on the same data and token budget (over seeds), and compare them."),
  Command.withExamples([
    { command: "conceptmoe compare examples/compare/moe-tiny.json --encoder-layers 2 --decoder-layers 2 --ratio 2 --strategy topk", description: "a matched pair, one seed" },
    { command: "conceptmoe compare examples/compare/moe-tiny.json --encoder-layers 2 --decoder-layers 2 --seeds 3 --format json", description: "three seeds, every number as JSON" },
    { command: "conceptmoe compare examples/compare/moe-tiny.json --encoder-layers 2 --decoder-layers 2 --data my-corpus/", description: "on your own bytes" }
  ])
)
