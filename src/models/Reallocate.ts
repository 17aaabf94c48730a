/**
 * The reallocation solver: given an MoE baseline, a target compression ratio R and one of the
 * paper's three strategies (§3.5, method spec §10), search integer ConceptMoE configurations whose
 * total parameters and activated FLOPs per token (attention map excluded) match the baseline.
 *
 * 1. `topk`: more activated experts in the concept model (params unchanged).
 * 2. `loop`: more activated experts and looped concept-model layers (params unchanged).
 *
 *    For both, when nothing matches with the baseline's experts (the usual case when the chunk
 *    module and joint decoding are counted: nothing else pays for their parameters), the solver
 *    also tries fewer and narrower concept-model experts: for each expert hidden size (multiples
 *    of 8 up to the baseline's) the expert count is set by the parameter budget and the top-k by
 *    the FLOPs (`expertLever`, on by default; the name gains `-e<experts>` and `-h<hidden>`). Of
 *    the matches, the widest experts come first, then the closest budget.
 * 3. `width`: a wider concept model (more heads of the same size) with fewer, wider experts, and the
 *    two width projectors.
 *
 * Budgets are compared as the paper compares them: by default the chunk module and joint decoding
 * (the `chunk` and `jointDecoding` parts) are left out of both sides ("overheads": "exclude"), and
 * each candidate also reports its residual with them included. `overheads: "include"` matches on
 * everything.
 *
 * Flops are monotone in top-k and parameters in the expert count, so each free integer is found by
 * bisection and its neighbours are evaluated exactly by building and analysing the graph.
 *
 * @since 0.1.0
 */
import { Effect, Result, Schema } from "effect"
import { analyzeResult, type Analysis } from "../graph/Analyze.ts"
import { budgetOf, type Matched, match, relative } from "../cost/Budget.ts"
import { baselineStages, conceptStages, type StageCost, stageCosts } from "../cost/Stages.ts"
import { buildConceptMoE, type ConceptLayout, type ConceptSpec, conceptLayout, shortName } from "./ConceptMoE.ts"
import type { DecoderConfig, DecoderLayer } from "./Decoder.ts"
import { formatLimit, limits } from "../graph/Limits.ts"

export type Strategy = "topk" | "loop" | "width"
export const strategies: ReadonlyArray<Strategy> = ["topk", "loop", "width"]

/** The parts ConceptMoE adds that the paper leaves out of its budget comparison. */
export const overheadParts = ["chunk", "jointDecoding"] as const

export interface ReallocateOptions {
  readonly ratio: number
  readonly strategy: Strategy
  readonly tolerance?: number
  readonly overheads?: "exclude" | "include"
  readonly encoderLayers?: number
  readonly decoderLayers?: number
  readonly merge?: "sum" | "last"
  readonly jointDecoding?: boolean
  /** Strategy 2: fix the number of looped layers (default: try 1..L_C). */
  readonly loopLayers?: number
  readonly loopTimes?: number
  /** How many candidates to return at most (default 10). */
  readonly limit?: number
  /** Sequence length the concept count is checked against (R may not exceed it). */
  readonly seqLen?: number
  /**
   * Strategies 1 and 2: when nothing matches with the baseline's experts (typically with
   * `overheads: "include"`, where nothing else pays for the chunk module's parameters), also try
   * fewer and narrower concept-model experts (default true; false: the paper's search only).
   */
  readonly expertLever?: boolean
  /**
   * The most work one search may do, in layers of candidate models built and costed (default
   * `limits.solverLayers`). A search that would do more fails with {@link InvalidReallocation}
   * instead of running for minutes or hours.
   */
  readonly maxWork?: number
}

export interface Candidate {
  readonly name: string
  readonly spec: ConceptSpec
  readonly layout: ConceptLayout
  readonly analysis: Analysis
  /** Proof of the match, under the chosen overhead convention. */
  readonly matched: Matched
  /** Relative errors against the baseline with every part included. */
  readonly residualAll: { readonly params: number; readonly flops: number }
}

/** Bad solver input: the field and why, with the nearest valid value where one exists. */
export class InvalidReallocation extends Schema.TaggedError<InvalidReallocation>()("InvalidReallocation", {
  field: Schema.String,
  message: Schema.String
}) {}

/** No configuration met the budget: which constraint failed and the nearest miss. */
export class NoReallocation extends Schema.TaggedError<NoReallocation>()("NoReallocation", {
  strategy: Schema.String,
  ratio: Schema.Number,
  tolerance: Schema.Number,
  reason: Schema.String,
  nearest: Schema.NullOr(Schema.Struct({
    name: Schema.String,
    params: Schema.Number,
    flops: Schema.Number
  }))
}) {
  override get message(): string {
    const n = this.nearest
    return `no ${this.strategy} configuration at R=${this.ratio} matches the baseline within ±${this.tolerance * 100}%: ${this.reason}` +
      (n === null ? "" : `; nearest: ${n.name} (params ${(n.params * 100).toFixed(2)}%, FLOPs/token ${(n.flops * 100).toFixed(2)}%)`)
  }
}

interface Evaluated {
  readonly spec: ConceptSpec
  readonly layout: ConceptLayout
  readonly analysis: Analysis
  readonly params: number
  readonly flops: number
}

const score = (e: { readonly params: number; readonly flops: number }) => Math.max(Math.abs(e.params), Math.abs(e.flops))

/** Largest integer in [lo, hi] with f(x) ≤ 0 for a non-decreasing f (lo − 1 if none). */
const lastNonPositive = (lo: number, hi: number, f: (x: number) => number): number => {
  let a = lo - 1
  let b = hi
  while (a < b) {
    const mid = Math.ceil((a + b) / 2)
    if (f(mid) <= 0) a = mid
    else b = mid - 1
  }
  return a
}

type MoELayer = DecoderLayer & { ffn: { kind: "moe" } }

/** R above 1, and at most the sequence length when one is given (at least one concept per sequence). */
const checkRatio = (R: number, seqLen: number | undefined): Effect.Effect<void, InvalidReallocation> => {
  if (!(R > 1) || !Number.isFinite(R)) {
    return Effect.fail(new InvalidReallocation({ field: "ratio", message: `the compression ratio R must be a finite number above 1, got ${R}` }))
  }
  if (seqLen !== undefined && R > seqLen) {
    return Effect.fail(new InvalidReallocation({
      field: "ratio",
      message: `R=${R} leaves less than one concept in a sequence of ${seqLen} tokens; at most ${seqLen}`
    }))
  }
  return Effect.void
}

/** The fields every candidate starts from: the options' layer split, merge and loop count; nothing looped. */
const baseSpec = (options: ReallocateOptions): ConceptSpec => ({
  ratio: options.ratio,
  encoderLayers: options.encoderLayers ?? 4,
  decoderLayers: options.decoderLayers ?? 4,
  merge: options.merge ?? "sum",
  tau: 6,
  lambda: 0.03,
  jointDecoding: options.jointDecoding ?? true,
  loopLayers: 0,
  loopTimes: options.loopTimes ?? 2
})

/** The concept model's layers (those the split leaves between encoder and decoder) and its first MoE layer. */
const conceptModelOf = (baseline: DecoderConfig, base: ConceptSpec): Effect.Effect<{ readonly layers: number; readonly moe: MoELayer }, InvalidReallocation> =>
  Effect.gen(function*() {
    const layout = conceptLayout(baseline, base)
    if (Result.isFailure(layout)) return yield* new InvalidReallocation(layout.failure)
    const layers = baseline.layers.slice(...layout.success.concept)
    const moe = layers.find((l) => l.ffn.kind === "moe") as MoELayer | undefined
    if (moe === undefined) {
      return yield* new InvalidReallocation({ field: "baseline", message: "the baseline's concept-model layers have no MoE FFN: there are no experts to reallocate" })
    }
    return { layers: layers.length, moe }
  })

/** Thrown by {@link Search.evaluate} when the search has done its allowed work. */
const exhausted = Symbol("exhausted")

/**
 * The search's tools over one baseline: candidates built, costed against the budget and cached
 * (counting the work done; past `maxWork` an evaluation throws {@link exhausted}), the top-k and
 * expert-count bisections, the expert lever and the candidates' names.
 */
interface Search {
  /** The baseline's experts in the concept model (E), its depth there (lc), and its first MoE layer there. */
  readonly E: number
  readonly lc: number
  readonly moe: MoELayer
  /** The top-k values around where FLOPs cross the target, for fixed other fields. */
  readonly aroundTopK: (spec: ConceptSpec, experts: number) => Array<Evaluated>
  /** The expert counts around where parameters cross the target (top-k at most the baseline's), each with {@link aroundTopK}. */
  readonly aroundExperts: (spec: ConceptSpec, keep?: (experts: number) => boolean) => Array<Evaluated>
  /** Fewer and/or narrower concept-model experts (see {@link makeSearch}). */
  readonly expertLever: (spec: ConceptSpec) => Array<Evaluated>
  readonly nameOf: (e: Evaluated) => string
}

const makeSearch = (
  baseline: DecoderConfig,
  target: { readonly params: number; readonly matmulPerToken: number },
  exclude: ReadonlyArray<string>,
  conceptModel: { readonly layers: number; readonly moe: MoELayer },
  options: ReallocateOptions,
  maxWork: number
): Search => {
  const { moe } = conceptModel
  const E = moe.ffn.spec.experts
  const k0 = moe.ffn.spec.topK
  const L = baseline.layers.length
  let work = 0
  const cache = new Map<string, Evaluated | null>()
  const evaluate = (spec: ConceptSpec): Evaluated | null => {
    const key = JSON.stringify(spec)
    if (cache.has(key)) return cache.get(key)!
    work += L
    if (work > maxWork) throw exhausted
    const built = buildConceptMoE(baseline, spec)
    let out: Evaluated | null = null
    if (Result.isSuccess(built)) {
      const a = analyzeResult(built.success.graph, { input: "ids" })
      if (Result.isSuccess(a)) {
        const b = budgetOf(a.success, exclude)
        out = {
          spec,
          layout: built.success.layout,
          analysis: a.success,
          params: relative(target.params, b.params),
          flops: relative(target.matmulPerToken, b.matmulPerToken)
        }
      }
    }
    cache.set(key, out)
    return out
  }
  const aroundTopK = (spec: ConceptSpec, experts: number): Array<Evaluated> => {
    const at = (k: number) => evaluate({ ...spec, topK: k })
    const k = lastNonPositive(1, experts, (x) => at(x)?.flops ?? Infinity)
    return [k - 1, k, k + 1, k + 2].filter((x) => x >= 1 && x <= experts).map(at).filter((e): e is Evaluated => e !== null)
  }
  const aroundExperts = (spec: ConceptSpec, keep: (experts: number) => boolean = () => true): Array<Evaluated> => {
    const params = (e: number) => evaluate({ ...spec, experts: e, topK: Math.min(k0, e) })?.params ?? Infinity
    const e = lastNonPositive(1, 4 * E, params)
    return [e, e + 1].filter((x) => x >= 1 && keep(x)).flatMap((experts) => aroundTopK({ ...spec, experts }, experts))
  }
  /**
   * The lever for budgets that count the chunk module and joint decoding: fewer and/or narrower
   * concept-model experts pay for their parameters. For each expert hidden size (multiples of 8 up
   * to the baseline's, and the baseline's), the expert count is set by the parameter budget and
   * the top-k by the FLOPs. Past 256 such sizes (experts wider than 2,048) the step grows so that
   * 256 sizes are tried: each size builds and costs a few models, and an expert a million wide
   * would otherwise mean a million models.
   */
  const expertLever = (spec: ConceptSpec): Array<Evaluated> => {
    const h0 = moe.ffn.spec.expertHidden
    const step = 8 * Math.max(1, Math.ceil(h0 / 8 / 256))
    const hiddens = [...new Set([...Array.from({ length: Math.floor(h0 / step) }, (_, i) => step * (i + 1)), h0])].filter((h) => h <= h0)
    return hiddens.flatMap((h) => aroundExperts(h === h0 ? spec : { ...spec, expertHidden: h }, (experts) => !(experts === E && h === h0)))
  }
  /** The short name, with `-h<size>` where the lever narrowed the experts (the width strategy's names are unchanged). */
  const nameOf = (e: Evaluated) =>
    shortName(e.spec, e.layout, k0, baseline.d).replace(/-R[^-]*$/, (r) =>
      options.strategy !== "width" && e.spec.expertHidden !== undefined && e.spec.expertHidden !== moe.ffn.spec.expertHidden ? `-h${e.spec.expertHidden}${r}` : r)
  return { E, lc: conceptModel.layers, moe, aroundTopK, aroundExperts, expertLever, nameOf }
}

/** What a strategy's search tried, and the constraint it searched under (for a miss's message). */
interface Tried {
  readonly tried: ReadonlyArray<Evaluated>
  readonly reason: string
}

const leverReason = `, or with fewer or narrower concept-model experts (expert count and hidden size set by the budget)`

/** Strategy 1: more activated experts; then, when nothing fits and the lever is on, fewer or narrower ones. */
const searchTopK = (s: Search, base: ConceptSpec, options: ReallocateOptions, fits: (xs: ReadonlyArray<Evaluated>) => boolean): Tried => {
  const tried = s.aroundTopK(base, s.E)
  if (fits(tried) || options.expertLever === false) return { tried, reason: `the concept model's top-k is between 1 and ${s.E} experts` }
  return { tried: [...tried, ...s.expertLever(base)], reason: `the concept model's top-k is between 1 and ${s.E} experts${leverReason}` }
}

/** Strategy 2: as {@link searchTopK}, for each number of looped layers (or the one given). */
const searchLoop = (
  s: Search,
  base: ConceptSpec,
  options: ReallocateOptions,
  fits: (xs: ReadonlyArray<Evaluated>) => boolean
): Result.Result<Tried, InvalidReallocation> => {
  const { lc } = s
  if (options.loopLayers !== undefined && (options.loopLayers < 1 || options.loopLayers > lc)) {
    return Result.fail(new InvalidReallocation({
      field: "loopLayers",
      message: `loopLayers must be between 1 and the ${lc} concept-model layers, got ${options.loopLayers}; the nearest valid value is ${Math.min(Math.max(options.loopLayers, 1), lc)}`
    }))
  }
  const counts = options.loopLayers !== undefined ? [options.loopLayers] : Array.from({ length: lc }, (_, i) => i + 1)
  const tried = counts.flatMap((n) => s.aroundTopK({ ...base, loopLayers: n }, s.E))
  const reason = `looping ${options.loopLayers ?? `1..${lc}`} of ${lc} layers with top-k in 1..${s.E}`
  if (fits(tried) || options.expertLever === false) return Result.succeed({ tried, reason })
  return Result.succeed({ tried: [...tried, ...counts.flatMap((n) => s.expertLever({ ...base, loopLayers: n }))], reason: reason + leverReason })
}

/** Strategy 3: more heads of the same size (up to 1.5·√R times as many), with wider experts set by the budget. */
const searchWidth = (s: Search, base: ConceptSpec): Result.Result<Tried, InvalidReallocation> => {
  const m = s.moe.mixer
  if (m.kind !== "attention") {
    return Result.fail(new InvalidReallocation({ field: "strategy", message: "the width strategy needs an MHA/GQA attention baseline" }))
  }
  const hd = m.spec.headDim
  const group = m.spec.heads / m.spec.kvHeads
  const h0 = s.moe.ffn.spec.expertHidden
  const maxHeads = Math.ceil(m.spec.heads * Math.sqrt(base.ratio) * 1.5)
  const tried: Array<Evaluated> = []
  for (let heads = m.spec.heads + group; heads <= maxHeads; heads += group) {
    const w = heads / m.spec.heads
    const hiddens = [...new Set([h0, Math.round((h0 * Math.sqrt(w)) / 8) * 8, Math.round((h0 * w) / 8) * 8])].filter((h) => h > 0)
    for (const expertHidden of hiddens) tried.push(...s.aroundExperts({ ...base, hidden: heads * hd, heads, kvHeads: heads / group, expertHidden }))
  }
  return Result.succeed({ tried, reason: "wider concept models (more heads of the same size) with the expert count set by the parameter budget" })
}

/**
 * The matches within tolerance, at most `limit`, each spec once. Strategies 1 and 2: the experts
 * closest to the baseline's shape first (the lever's widest experts that match; fewer, larger
 * experts also dispatch fewer products), then the closest match.
 */
const bestWithin = (tried: ReadonlyArray<Evaluated>, tolerance: number, options: ReallocateOptions, baselineExpertHidden: number): Array<Evaluated> => {
  const shape = (e: Evaluated) => (options.strategy === "width" ? 0 : -(e.spec.expertHidden ?? baselineExpertHidden))
  return tried
    .filter((e) => score(e) <= tolerance)
    .sort((a, b) => shape(a) - shape(b) || score(a) - score(b))
    .filter((e, i, all) => all.findIndex((x) => JSON.stringify(x.spec) === JSON.stringify(e.spec)) === i)
    .slice(0, options.limit ?? 10)
}

/** Nothing within tolerance: why, and the nearest miss. */
const noMatch = (search: Search, t: Tried, options: ReallocateOptions, tolerance: number): NoReallocation => {
  const nearest = [...t.tried].sort((a, b) => score(a) - score(b))[0]
  return new NoReallocation({
    strategy: options.strategy,
    ratio: options.ratio,
    tolerance,
    reason: t.tried.length === 0 ? `no buildable configuration (${t.reason})` : `nothing within tolerance (${t.reason})`,
    nearest: nearest === undefined ? null : { name: search.nameOf(nearest), params: nearest.params, flops: nearest.flops }
  })
}

/** A match as a candidate: its proof under the chosen convention and its residual with every part counted. */
const toCandidate = (
  search: Search,
  e: Evaluated,
  baselineAnalysis: Analysis,
  match_: { readonly tolerance: number; readonly exclude: ReadonlyArray<string> }
): Effect.Effect<Candidate> =>
  Effect.map(match(baselineAnalysis, e.analysis, match_).pipe(Effect.orDie), (matched) => {
    const targetAll = budgetOf(baselineAnalysis)
    const all = budgetOf(e.analysis)
    return {
      name: search.nameOf(e),
      spec: e.spec,
      layout: e.layout,
      analysis: e.analysis,
      matched,
      residualAll: { params: relative(targetAll.params, all.params), flops: relative(targetAll.matmulPerToken, all.matmulPerToken) }
    }
  })

/**
 * Searches ConceptMoE configurations for a baseline. Succeeds with the candidates within tolerance,
 * best first; fails with {@link InvalidReallocation} for bad input or {@link NoReallocation} when
 * nothing matches.
 *
 * @category solver
 */
export const reallocate = (
  baseline: DecoderConfig,
  baselineAnalysis: Analysis,
  options: ReallocateOptions
): Effect.Effect<ReadonlyArray<Candidate>, InvalidReallocation | NoReallocation> =>
  Effect.gen(function*() {
    const tolerance = options.tolerance ?? 0.01
    const exclude = options.overheads === "include" ? [] : [...overheadParts]
    yield* checkRatio(options.ratio, options.seqLen)
    const base = baseSpec(options)
    const conceptModel = yield* conceptModelOf(baseline, base)
    // the search's work, in layers of models built and costed: a deep baseline (or a loop search over
    // every depth of one) would otherwise run for hours. The least work a strategy can do is checked
    // first, the rest as the search goes.
    const maxWork = options.maxWork ?? limits.solverLayers
    const L = baseline.layers.length
    const loopAll = options.strategy === "loop" && options.loopLayers === undefined
    const tooMuch = new InvalidReallocation({
      field: loopAll ? "loopLayers" : "baseline",
      message: `the ${options.strategy} search over this ${formatLimit(L)}-layer baseline would build and cost more than ${formatLimit(maxWork)} layers of ` +
        `candidate models (the solver's limit on work); ${loopAll ? "fix the number of looped layers (loopLayers) or " : ""}search a shallower baseline`
    })
    const search = makeSearch(baseline, budgetOf(baselineAnalysis, exclude), exclude, conceptModel, options, maxWork)
    const least = L * (loopAll ? search.lc : 1) * Math.max(1, Math.ceil(Math.log2(search.E + 1)))
    if (least > maxWork) return yield* tooMuch
    const fits = (xs: ReadonlyArray<Evaluated>) => xs.some((e) => score(e) <= tolerance)
    let searched: Result.Result<Tried, InvalidReallocation>
    try {
      searched = options.strategy === "topk"
        ? Result.succeed(searchTopK(search, base, options, fits))
        : options.strategy === "loop"
        ? searchLoop(search, base, options, fits)
        : searchWidth(search, base)
    } catch (e) {
      if (e === exhausted) return yield* tooMuch
      throw e
    }
    if (Result.isFailure(searched)) return yield* searched.failure
    const within = bestWithin(searched.success.tried, tolerance, options, conceptModel.moe.ffn.spec.expertHidden)
    if (within.length === 0) return yield* noMatch(search, searched.success, options, tolerance)
    return yield* Effect.forEach(within, (e) => toCandidate(search, e, baselineAnalysis, { tolerance, exclude }))
  })

/** What `conceptmoe reallocate --format json` prints for each candidate. */
export interface CandidateReport {
  readonly name: string
  /** A complete ConceptMoE config (baseline inline): `conceptmoe budget` reads it back. */
  readonly config: Record<string, unknown>
  readonly params: { readonly total: number; readonly baseline: number }
  readonly flops: { readonly matmulPerToken: number; readonly baseline: number }
  /** (candidate − baseline) / baseline under the matching convention, and with every part. */
  readonly relative: { readonly params: number; readonly flops: number }
  readonly relativeAllParts: { readonly params: number; readonly flops: number }
  readonly excludedParts: ReadonlyArray<string>
  readonly seqLen: number
  /** Per stage at `seqLen`, for both models (the baseline split by the same layer ranges). */
  readonly stages: { readonly baseline: Record<string, StageCost>; readonly conceptmoe: Record<string, StageCost> }
  /** Baseline ÷ ConceptMoE for the concept model's attention map (full) and KV cache at `seqLen`. */
  readonly conceptModelReduction: { readonly attentionMap: number; readonly kvCache: number }
}

/** The JSON report of a candidate. `baselineJson` is the baseline config as read. */
export const candidateReport = (
  c: Candidate,
  baselineJson: unknown,
  options: { readonly seqLen: number; readonly bytesPerElement?: number }
): CandidateReport => {
  const b = budgetOf(c.matched.baseline)
  const m = budgetOf(c.analysis)
  const stages = {
    baseline: stageCosts(c.matched.baseline, baselineStages(c.layout), options),
    conceptmoe: stageCosts(c.analysis, conceptStages, options)
  }
  const { ratio, ...rest } = c.spec
  return {
    name: c.name,
    config: { kind: "conceptmoe", name: c.name, baseline: baselineJson, ratio, ...rest },
    params: { total: m.params, baseline: b.params },
    flops: { matmulPerToken: m.matmulPerToken, baseline: b.matmulPerToken },
    relative: c.matched.residual,
    relativeAllParts: c.residualAll,
    excludedParts: c.matched.excluded,
    seqLen: options.seqLen,
    stages,
    conceptModelReduction: {
      attentionMap: stages.baseline["conceptModel"]!.attentionMap / stages.conceptmoe["conceptModel"]!.attentionMap,
      kvCache: stages.baseline["conceptModel"]!.kvElements / stages.conceptmoe["conceptModel"]!.kvElements
    }
  }
}
