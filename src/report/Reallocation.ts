/**
 * The reallocation report: for a baseline and a set of (strategy, R), the best matched ConceptMoE
 * of each, with SVG plots of attention-map FLOPs and KV-cache bytes against sequence length
 * (4K–1M), a stacked bar of where activated FLOPs go, and a Markdown summary.
 *
 * @since 0.1.0
 */
import { Effect, FileSystem, Path } from "effect"
import * as Cost from "../cost/Cost.ts"
import type { Analysis } from "../graph/Analyze.ts"
import { formatNumber, formatPercent } from "../internal/Table.ts"
import type { LoadedModel } from "../models/Load.ts"
import { type Candidate, type CandidateReport, candidateReport, type NoReallocation, type Strategy } from "../models/Reallocate.ts"
import { lineChart, stackedBars, toSvg } from "./Plots.ts"

export interface ReportEntry {
  readonly strategy: Strategy
  readonly ratio: number
  readonly result: { readonly _tag: "found"; readonly candidate: Candidate } | { readonly _tag: "none"; readonly error: NoReallocation }
}

/** Sequence lengths of the curves: 4K to 1M. */
export const lengths: ReadonlyArray<number> = Array.from({ length: 9 }, (_, i) => 4096 * 2 ** i)

const seriesOf = (baseline: LoadedModel, entries: ReadonlyArray<ReportEntry>) => [
  { series: `baseline (${baseline.name})`, analysis: baseline.analysis },
  ...entries.flatMap((e) => e.result._tag === "found" ? [{ series: `${e.strategy}: ${e.result.candidate.name}`, analysis: e.result.candidate.analysis }] : [])
]

const flopRows = (series: string, a: Analysis, seqLen: number) => [
  ...Object.entries(a.cost.flops).map(([part, value]) => ({ bar: series, part, value })),
  { bar: series, part: `attention map / token @ ${formatNumber(seqLen)}`, value: Cost.attentionMapFlops(a.cost, seqLen) / seqLen }
]

/** The files of a report: name → contents. */
export const reportFiles = (
  baseline: LoadedModel,
  baselineJson: unknown,
  entries: ReadonlyArray<ReportEntry>,
  options: { readonly seqLen: number; readonly bytesPerElement: number }
): Effect.Effect<Record<string, string>> =>
  Effect.promise(async () => {
    const series = seriesOf(baseline, entries)
    const attention = await toSvg(lineChart({
      title: "Attention-map FLOPs per sequence (forward, full T×T, all stages)",
      x: "sequence length (tokens)",
      y: "FLOPs",
      rows: series.flatMap((s) => lengths.map((T) => ({ series: s.series, x: T, y: Cost.attentionMapFlops(s.analysis.cost, T) })))
    }))
    const kv = await toSvg(lineChart({
      title: `KV cache after T tokens (${options.bytesPerElement} bytes per element, all stages)`,
      x: "sequence length (tokens)",
      y: "bytes",
      rows: series.flatMap((s) => lengths.map((T) => ({ series: s.series, x: T, y: Cost.kvElements(s.analysis.cost, T) * options.bytesPerElement })))
    }))
    const flops = await toSvg(stackedBars({
      title: "Where the activated forward FLOPs per token go",
      value: "FLOPs per token",
      rows: series.flatMap((s) => flopRows(s.series, s.analysis, options.seqLen))
    }))
    const reports = entries.flatMap((e) =>
      e.result._tag === "found" ? [[e, candidateReport(e.result.candidate, baselineJson, options)] as const] : []
    )
    return {
      "attention-map.svg": attention,
      "kv-cache.svg": kv,
      "flops-breakdown.svg": flops,
      "candidates.json": JSON.stringify(reports.map(([, r]) => r), null, 2),
      "summary.md": summary(baseline, entries, reports, options)
    }
  })

const x = (n: number) => `${n.toFixed(2)}×`

const summary = (
  baseline: LoadedModel,
  entries: ReadonlyArray<ReportEntry>,
  reports: ReadonlyArray<readonly [ReportEntry, CandidateReport]>,
  options: { readonly seqLen: number }
): string => {
  const a = baseline.analysis
  const params = Cost.total(a.cost.params)
  const flops = Cost.matmulPerToken(a.cost)
  const T = options.seqLen
  const total = (c: Candidate, f: (a: Analysis, T: number) => number, len: number) => f(a, len) / f(c.analysis, len)
  const attn = (an: Analysis, len: number) => Cost.attentionMapFlops(an.cost, len)
  const kv = (an: Analysis, len: number) => Cost.kvElements(an.cost, len)
  const rows = entries.map((e) => {
    if (e.result._tag === "none") return `| ${e.strategy} | ${e.ratio} | no match: ${e.result.error.message.replace(/\|/g, "/")} | | | | | | | | | |`
    const c = e.result.candidate
    const r = reports.find(([entry]) => entry === e)![1]
    return `| ${e.strategy} | ${e.ratio} | ${r.name} | ${c.spec.topK ?? ""} | ${c.layout.loop === null ? "-" : `${c.layout.loop.layers}×${c.layout.loop.times}`} | ${c.layout.width} | ${formatPercent(r.relative.params)} / ${formatPercent(r.relative.flops)} | ${formatPercent(r.relativeAllParts.params)} / ${formatPercent(r.relativeAllParts.flops)} | ${x(r.conceptModelReduction.attentionMap)} / ${x(r.conceptModelReduction.kvCache)} | ${x(total(c, attn, 4096))} / ${x(total(c, attn, 1 << 20))} | ${x(total(c, kv, 4096))} / ${x(total(c, kv, 1 << 20))} |`
  })
  return [
    `# ConceptMoE budget report: ${baseline.name}`,
    "",
    `Baseline \`${baseline.file}\` (${baseline.format}): ${formatNumber(params)} parameters, ${formatNumber(flops)} forward matmul FLOPs per token, ${baseline.decoder?.layers.length ?? "?"} layers.`,
    "",
    "Each row is the best configuration the solver found for a strategy and a target compression ratio R, matched to the baseline on total parameters and activated FLOPs per token (attention map excluded) with the chunk module and joint decoding left out of both sides, as the paper matches; the next column shows the residuals with them included. Reductions are baseline ÷ ConceptMoE: for the concept model alone at the report's sequence length, and for the whole model at 4K and 1M tokens.",
    "",
    `| strategy | R | candidate | top-k | loop | width | Δparams / ΔFLOPs | with chunk + joint decoding | concept-model attention ÷ / KV ÷ @ ${formatNumber(T)} | whole-model attention ÷ @ 4K / 1M | whole-model KV ÷ @ 4K / 1M |`,
    "|---|---|---|---|---|---|---|---|---|---|---|",
    ...rows,
    "",
    "## Plots",
    "",
    "![attention-map FLOPs against sequence length](attention-map.svg)",
    "",
    "![KV-cache bytes against sequence length](kv-cache.svg)",
    "",
    "![where the activated FLOPs per token go](flops-breakdown.svg)",
    "",
    "## How to read this",
    "",
    "- Strategy `topk` spends the compute freed by running the concept model on ~N/R positions on more activated experts; `loop` also runs some concept-model layers more than once with the same weights; `width` makes the concept model wider with fewer experts. All keep total parameters and per-token FLOPs equal to the baseline's.",
    "- The concept model's attention map shrinks by R² (topk), R²·L_C/(L_C+L_loop) (loop) or R^1.5 (width at √R× the width), and its KV cache by R, R·L_C/(L_C+L_loop) or √R (paper Table 1). The encoder and decoder keep full-length attention, so the whole model's reduction is smaller and grows with sequence length.",
    "- `candidates.json` holds each candidate's full config; `conceptmoe budget` reads it back.",
    ""
  ].join("\n")
}

/**
 * Writes the files into `dir`, each to a temporary name first and then renamed, so an interrupted run
 * leaves no half-written file.
 */
export const writeFiles = Effect.fnUntraced(function*(dir: string, files: Record<string, string>) {
  const fs = yield* FileSystem.FileSystem
  const path = yield* Path.Path
  yield* fs.makeDirectory(dir, { recursive: true })
  const written: Array<string> = []
  for (const [name, contents] of Object.entries(files)) {
    const target = path.join(dir, name)
    const tmp = `${target}.tmp-${process.pid}`
    yield* fs.writeFileString(tmp, contents)
    yield* fs.rename(tmp, target)
    written.push(target)
  }
  return written
})
