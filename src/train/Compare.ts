/**
 * The comparison of a matched pair: an MoE baseline and a candidate (typically its ConceptMoE)
 * whose budgets {@link matchModels} proved equal, trained on the same batches for each of several
 * seeds, and reported with what each model actually spent.
 *
 * - **Matched, then realised.** The pair is matched on static cost; a ConceptMoE's cost depends on
 *   the compression it realises, so each model is also costed at its measured R: the training mean
 *   over the second half of the run and the threshold R at the last evaluation
 *   (`Compression.compressionSummary`), through `Verify.staticFlopsAt` (the concept model's
 *   per-position cost times the concepts, plus everything at token rate). A realised cost more than
 *   5% from the matched one is flagged.
 * - **Every part counted by default.** `overheads: "include"` matches with the chunk module and joint
 *   decoding counted; `"exclude"` is the paper's convention. Both conventions' residuals are reported.
 * - **Seeds.** Each seed trains both models on the same batches (data order, initialisation and
 *   sampling follow the seed; validation windows are the same for every seed); the report gives
 *   mean ± sd of validation bits per byte and the paired difference with a t interval (`Stats.ts`).
 * - **Floors.** Unigram and bigram bits per byte (add-0.1, counted on the training split) on the
 *   same validation targets the models are scored on, and on the whole validation split.
 *
 * Only {@link compareMatched} trains; {@link comparisonReport} is the pure part.
 *
 * @since 0.3.0
 */
import { Effect, FileSystem, Path } from "effect"
import type { Analysis } from "../graph/Analyze.ts"
import { budgetOf, type BudgetMismatch, match, type Matched, relative } from "../cost/Budget.ts"
import * as Cost from "../cost/Cost.ts"
import type { LoadedModel } from "../models/Load.ts"
import { overheadParts } from "../models/Reallocate.ts"
import { bandChart, toSvg } from "../report/Plots.ts"
import { staticFlopsAt } from "../runtime/Verify.ts"
import { compressionSummary } from "./Compression.ts"
import { type DataInfo, ngramCounts, type Reference, referenceOnBatches, referenceOnStream, type Splits, validationBatches } from "./Data.ts"
import { type Interval, pairedDifference, type Summary, summarize, windowMeans, bands } from "./Stats.ts"
import { type StepMetrics, train, type TrainSettings } from "./Train.ts"
import * as Stop from "./Stop.ts"
import * as Progress from "../internal/Progress.ts"

/** Which parts a budget counts: all (`include`), or all but the chunk module and joint decoding (`exclude`, the paper's). */
export type Overheads = "include" | "exclude"

/** The parts left out under a convention. */
export const excludedParts = (overheads: Overheads): ReadonlyArray<string> => (overheads === "include" ? [] : [...overheadParts])

/** An analysis that carries the model it belongs to, so a {@link Matched} pair carries its models. */
export interface ModelAnalysis extends Analysis {
  readonly model: LoadedModel
}

/** Proof that two loaded models' budgets match: the only input {@link compareMatched} accepts. */
export type MatchedModels = Matched<ModelAnalysis, ModelAnalysis>

/**
 * Matches two loaded models (total parameters and matmul FLOPs per token within `tolerance`, under
 * the `overheads` convention). A pair read from files that does not match fails with a
 * `BudgetMismatch` that shows each part's difference.
 */
export const matchModels = (
  baseline: LoadedModel,
  candidate: LoadedModel,
  options: { readonly tolerance: number; readonly overheads: Overheads }
): Effect.Effect<MatchedModels, BudgetMismatch> =>
  match({ ...baseline.analysis, model: baseline }, { ...candidate.analysis, model: candidate }, {
    tolerance: options.tolerance,
    exclude: excludedParts(options.overheads),
    names: [baseline.name, candidate.name]
  })

/** Relative differences of the candidate from the baseline under both conventions. */
export const residuals = (a: Analysis, b: Analysis): Record<Overheads, { readonly params: number; readonly flops: number }> => {
  const of = (o: Overheads) => {
    const x = budgetOf(a, excludedParts(o))
    const y = budgetOf(b, excludedParts(o))
    return { params: relative(x.params, y.params), flops: relative(x.matmulPerToken, y.matmulPerToken) }
  }
  return { include: of("include"), exclude: of("exclude") }
}

/**
 * Forward matmul FLOPs per token at a realised compression R (`undefined`: the static cost), with
 * the parts a convention leaves out subtracted (they run at token rate).
 */
export const realisedFlopsPerToken = (a: Analysis, ratio: number | undefined, overheads: Overheads = "include"): number => {
  const all = ratio === undefined ? Cost.matmulPerToken(a.cost) : staticFlopsAt(a, 1, 1 / ratio)
  return all - excludedParts(overheads).reduce((n, p) => n + (a.cost.flops[p] ?? 0), 0)
}

/** One training run of one model: its seed, final validation, speed and curves. */
export interface RunResult {
  readonly seed: number
  readonly valBitsPerByte: number
  readonly tokensPerSecond: number
  /** Σ tokens / Σ concepts over the second half of training (sampled boundaries); ConceptMoE only. */
  readonly meanSampledR?: number
  /** Threshold R (p ≥ ½) at the last evaluation; ConceptMoE only. */
  readonly valCompression?: number
  readonly metrics: ReadonlyArray<StepMetrics>
}

/** Realised cost against the matched (static) one. */
export interface Realised {
  readonly ratio: number
  readonly flopsPerToken: number
  /** (realised − static) / static. */
  readonly relative: number
  readonly flagged: boolean
}

export interface ModelReport {
  readonly name: string
  readonly params: number
  readonly flopsPerToken: { readonly static: number; readonly staticCounted: number }
  /** Target R of a ConceptMoE. */
  readonly targetRatio?: number
  /** At the second half's mean sampled R (over seeds: 1 / mean boundary rate). */
  readonly realisedTrain?: Realised
  /** At the last evaluation's threshold R (mean over seeds, as a rate). */
  readonly realisedEval?: Realised
  readonly valBitsPerByte: Summary
  readonly tokensPerSecond: Summary
  readonly runs: ReadonlyArray<Omit<RunResult, "metrics">>
}

export interface ComparisonReport {
  readonly overheads: Overheads
  readonly tolerance: number
  /** (candidate − baseline) / baseline, every part counted and under the paper's convention. */
  readonly residual: Record<Overheads, { readonly params: number; readonly flops: number }>
  readonly models: readonly [ModelReport, ModelReport]
  /** Candidate − baseline validation bits per byte, paired by seed, with the 95% t interval. */
  readonly difference: Interval
  readonly reference: { readonly evaluated: Reference; readonly validation: Reference }
  readonly data: DataInfo
  readonly settings: TrainSettings
  readonly seeds: ReadonlyArray<number>
  /** Plain-language notes: realised costs that left the matched budget by more than 5%. */
  readonly warnings: ReadonlyArray<string>
}

/** How far (relative) a realised cost may drift from the matched one before it is flagged. */
export const realisedTolerance = 0.05

const harmonic = (rs: ReadonlyArray<number | undefined>): number | undefined => {
  const ok = rs.filter((r): r is number => r !== undefined && r > 0)
  return ok.length === 0 ? undefined : ok.length / ok.reduce((s, r) => s + 1 / r, 0)
}

/** The report of a finished comparison (pure). */
export const comparisonReport = (
  pair: MatchedModels,
  runs: readonly [ReadonlyArray<RunResult>, ReadonlyArray<RunResult>],
  context: {
    readonly overheads: Overheads
    readonly reference: ComparisonReport["reference"]
    readonly data: DataInfo
    readonly settings: TrainSettings
  }
): ComparisonReport => {
  const warnings: Array<string> = []
  const models = ([pair.baseline, pair.candidate] as const).map((a, i): ModelReport => {
    const rs = runs[i]!
    const stat = Cost.matmulPerToken(a.cost)
    const counted = realisedFlopsPerToken(a, undefined, context.overheads)
    const stage = a.rows.find((r) => r.kind === "concept-stage")
    const target = stage === undefined ? undefined : (a.specs.get(stage.path) as { ratio: number }).ratio
    const realised = (ratio: number | undefined, what: string): Realised | undefined => {
      if (target === undefined || ratio === undefined) return undefined
      const flops = realisedFlopsPerToken(a, ratio, context.overheads)
      const rel = relative(counted, flops)
      const flagged = Math.abs(rel) > realisedTolerance
      if (flagged) {
        warnings.push(
          `${a.model.name}: at the ${what} R of ${ratio.toFixed(2)} (target ${target}) it spends ${Math.round(flops).toLocaleString("en-US")} FLOPs/token, ` +
            `${Math.abs(rel * 100).toFixed(1)}% ${rel > 0 ? "more" : "less"} than the matched ${Math.round(counted).toLocaleString("en-US")}: the pair is matched on paper, not as it ran`
        )
      }
      return { ratio, flopsPerToken: flops, relative: rel, flagged }
    }
    const trainR = harmonic(rs.map((r) => r.meanSampledR))
    const evalR = harmonic(rs.map((r) => r.valCompression))
    const realisedTrain = realised(trainR, "training (second-half mean)")
    const realisedEval = realised(evalR, "evaluation (threshold)")
    return {
      name: a.model.name,
      params: Cost.total(a.cost.params),
      flopsPerToken: { static: stat, staticCounted: counted },
      ...(target === undefined ? {} : { targetRatio: target }),
      ...(realisedTrain === undefined ? {} : { realisedTrain }),
      ...(realisedEval === undefined ? {} : { realisedEval }),
      valBitsPerByte: summarize(rs.map((r) => r.valBitsPerByte)),
      tokensPerSecond: summarize(rs.map((r) => r.tokensPerSecond)),
      runs: rs.map(({ metrics: _m, ...rest }) => rest)
    }
  })
  return {
    overheads: context.overheads,
    tolerance: pair.tolerance,
    residual: residuals(pair.baseline, pair.candidate),
    models: [models[0]!, models[1]!],
    difference: pairedDifference(runs[0].map((r) => r.valBitsPerByte), runs[1].map((r) => r.valBitsPerByte)),
    reference: context.reference,
    data: context.data,
    settings: context.settings,
    seeds: runs[0].map((r) => r.seed),
    warnings
  }
}

/** The training-loss curves of each model, averaged over windows of `window` steps, as mean ± sd over seeds. */
export const lossBands = (names: readonly [string, string], runs: readonly [ReadonlyArray<RunResult>, ReadonlyArray<RunResult>], window: number) =>
  names.flatMap((series, i) =>
    bands(runs[i]!.map((r) => {
      const ys = windowMeans(r.metrics.map((m) => m.loss), window)
      return ys.map((y, w) => ({ x: Math.min((w + 1) * window, r.metrics.length), y }))
    })).map((b) => ({ series, x: b.x, mean: b.mean, low: b.low, high: b.high }))
  )

/**
 * Trains both models of a matched pair for each seed (the same batches for both within a seed),
 * into `out/<model>` (one seed) or `out/seed-<s>/<model>`, and writes `out/losses.svg` (loss curves,
 * mean ± sd over seeds) and `out/summary.json` (the {@link ComparisonReport}).
 */
export const compareMatched = <E, R>(
  pair: MatchedModels,
  options: {
    readonly settings: TrainSettings
    readonly seeds: ReadonlyArray<number>
    /** The splits for a seed (its training order); validation must not depend on the seed. */
    readonly data: (seed: number) => Effect.Effect<Splits, E, R>
    readonly overheads: Overheads
    readonly out: string
    readonly quiet?: boolean
  }
) =>
  Effect.gen(function*() {
    const path = yield* Path.Path
    const fs = yield* FileSystem.FileSystem
    const models = [pair.baseline.model, pair.candidate.model] as const
    const runs: [Array<RunResult>, Array<RunResult>] = [[], []]
    let first: Splits | undefined
    const finished: Array<string> = []
    for (const seed of options.seeds) {
      const data = yield* options.data(seed)
      first ??= data
      const settings = { ...options.settings, seed }
      for (const [i, m] of models.entries()) {
        const dir = options.seeds.length === 1 ? path.join(options.out, m.name) : path.join(options.out, `seed-${seed}`, m.name)
        if (options.quiet !== true) yield* Progress.line(`\n${m.name}, seed ${seed}:`)
        const r = yield* train(m, settings, { out: dir, resume: false, data, ...(options.quiet === true ? { quiet: true } : {}) }).pipe(
          Stop.inSeries(finished, options.seeds.length * models.length)
        )
        finished.push(dir)
        const c = r.compression ?? (m.concept === undefined ? undefined : compressionSummary(r.metrics, { steps: settings.steps }))
        runs[i]!.push({
          seed,
          valBitsPerByte: r.finalValBitsPerByte,
          tokensPerSecond: r.tokensPerSecond,
          ...(c?.meanSampledR === undefined ? {} : { meanSampledR: c.meanSampledR }),
          ...(c?.valCompression === undefined ? {} : { valCompression: c.valCompression }),
          metrics: r.metrics
        })
      }
    }
    const counts = ngramCounts(first!.train)
    const s = options.settings
    const reference = {
      evaluated: referenceOnBatches(counts, validationBatches(first!.validation, s.batchSize, s.seqLen, s.evalBatches)),
      validation: referenceOnStream(counts, first!.validation)
    }
    const report = comparisonReport(pair, runs, { overheads: options.overheads, reference, data: first!.info, settings: s })
    yield* fs.makeDirectory(options.out, { recursive: true })
    const window = Math.max(1, Math.floor(s.steps / 50))
    const svg = yield* Effect.promise(() =>
      toSvg(bandChart({
        title: `Training loss: ${models[0].name} vs ${models[1].name} (same batches; ${options.seeds.length === 1 ? "one seed" : `mean ± sd over ${options.seeds.length} seeds`})`,
        x: "step",
        y: `loss (nats/token, mean of ${window}-step windows)`,
        rows: lossBands([models[0].name, models[1].name], runs, window)
      }))
    )
    const losses = path.join(options.out, "losses.svg")
    const summary = path.join(options.out, "summary.json")
    for (const [file, text] of [[losses, svg], [summary, JSON.stringify(report, null, 2) + "\n"]] as const) {
      const tmp = `${file}.tmp-${process.pid}`
      yield* fs.writeFileString(tmp, text)
      yield* fs.rename(tmp, file)
    }
    return { report, runs, files: { losses, summary } }
  })
