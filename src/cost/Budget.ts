/**
 * Budgets and matching.
 *
 * A {@link Budget} is what two architectures are held equal on: total parameters and activated
 * forward matmul FLOPs per token (attention map excluded, as the ConceptMoE paper compares them),
 * with the attention-map and KV-cache curves reported beside them.
 *
 * {@link match} checks a candidate against a baseline within a relative tolerance. It returns a
 * {@link Matched} value, a branded type only `match` can make, which later APIs (comparisons,
 * experiments) require; or fails with a {@link BudgetMismatch} whose message shows, part by part,
 * what differs and by how much.
 *
 * @since 0.1.0
 */
import { Effect, Schema } from "effect"
import { formatNumber, formatPercent, renderTable } from "../internal/Table.ts"
import * as Cost from "./Cost.ts"

export interface Budget {
  readonly params: number
  readonly matmulPerToken: number
  readonly paramsByPart: Cost.Parts
  readonly flopsByPart: Cost.Parts
  /** Forward attention-map FLOPs over one sequence of T tokens (full T×T). */
  readonly attentionMap: (seqLen: number) => number
  /** KV-cache elements after T tokens. */
  readonly kvElements: (seqLen: number) => number
}

const without = (parts: Cost.Parts, exclude: ReadonlyArray<string>): Cost.Parts =>
  Object.fromEntries(Object.entries(parts).filter(([k]) => !exclude.includes(k)))

/**
 * The budget of an analysed graph. Parts named in `exclude` are left out of the parameter and FLOP
 * totals (ConceptMoE's paper leaves the chunk module and joint decoding out when it matches budgets).
 */
export const budgetOf = (a: Cost.Costed, exclude: ReadonlyArray<string> = []): Budget => ({
  params: Cost.total(without(a.cost.params, exclude)),
  matmulPerToken: Cost.total(without(a.cost.flops, exclude)),
  paramsByPart: without(a.cost.params, exclude),
  flopsByPart: without(a.cost.flops, exclude),
  attentionMap: (T) => Cost.attentionMapFlops(a.cost, T),
  kvElements: (T) => Cost.kvElements(a.cost, T)
})

/** Relative difference of a candidate value from a baseline value. */
export const relative = (baseline: number, candidate: number): number =>
  baseline === 0 ? (candidate === 0 ? 0 : Infinity) : (candidate - baseline) / baseline

/** One line of a side-by-side comparison. */
export interface DiffRow {
  readonly metric: "params" | "flops"
  readonly part: string
  readonly baseline: number
  readonly candidate: number
  readonly delta: number
  readonly relative: number
}

/** Part-by-part comparison of two budgets: parameters, then FLOPs per token, then totals. */
export const diff = (baseline: Budget, candidate: Budget): ReadonlyArray<DiffRow> => {
  const rows: Array<DiffRow> = []
  const side = (metric: DiffRow["metric"], a: Cost.Parts, b: Cost.Parts, totalA: number, totalB: number) => {
    const parts = [...new Set([...Object.keys(a), ...Object.keys(b)])].sort()
    for (const part of parts) {
      const x = Cost.part(a, part)
      const y = Cost.part(b, part)
      rows.push({ metric, part, baseline: x, candidate: y, delta: y - x, relative: relative(x, y) })
    }
    rows.push({ metric, part: "total", baseline: totalA, candidate: totalB, delta: totalB - totalA, relative: relative(totalA, totalB) })
  }
  side("params", baseline.paramsByPart, candidate.paramsByPart, baseline.params, candidate.params)
  side("flops", baseline.flopsByPart, candidate.flopsByPart, baseline.matmulPerToken, candidate.matmulPerToken)
  return rows
}

/** Renders a diff as an aligned table. */
export const renderDiff = (rows: ReadonlyArray<DiffRow>, names: readonly [string, string] = ["baseline", "candidate"]): string =>
  renderTable(
    ["metric", "part", names[0], names[1], "delta", "relative"],
    rows.map((r) => [
      r.metric === "params" ? "params" : "FLOPs/token",
      r.part,
      formatNumber(r.baseline),
      formatNumber(r.candidate),
      formatNumber(r.delta),
      formatPercent(r.relative)
    ]),
    [2, 3, 4, 5]
  )

const MismatchRow = Schema.Struct({
  metric: Schema.Literals(["params", "flops"]),
  part: Schema.String,
  baseline: Schema.Number,
  candidate: Schema.Number,
  delta: Schema.Number,
  relative: Schema.Number
})

/**
 * Two budgets differ by more than the tolerance. `failed` names the metrics out of tolerance;
 * `rows` is the full part-by-part comparison.
 */
export class BudgetMismatch extends Schema.TaggedError<BudgetMismatch>()("BudgetMismatch", {
  baselineName: Schema.String,
  candidateName: Schema.String,
  tolerance: Schema.Number,
  failed: Schema.Array(Schema.Literals(["params", "flops"])),
  rows: Schema.Array(MismatchRow)
}) {
  override get message(): string {
    const totals = this.rows.filter((r) => r.part === "total" && this.failed.includes(r.metric))
    const head = totals
      .map((r) => `${r.metric === "params" ? "total params" : "activated FLOPs/token"} differ by ${formatPercent(r.relative)}`)
      .join("; ")
    return `budgets of ${this.baselineName} and ${this.candidateName} do not match within ±${formatPercent(this.tolerance).slice(1)}: ${head}\n` +
      renderDiff(this.rows, [this.baselineName, this.candidateName])
  }
}

declare const MatchedBrand: unique symbol

/**
 * Proof that a candidate's budget matches a baseline's within `tolerance`. Only {@link match} makes
 * one.
 */
export interface Matched<A = Cost.Costed, B = Cost.Costed> {
  readonly [MatchedBrand]: "Matched"
  readonly baseline: A
  readonly candidate: B
  readonly tolerance: number
  /** Parts left out of the comparison. */
  readonly excluded: ReadonlyArray<string>
  /** Relative differences (candidate − baseline) / baseline. */
  readonly residual: { readonly params: number; readonly flops: number }
  readonly rows: ReadonlyArray<DiffRow>
}

/**
 * Checks that `candidate` matches `baseline` on total parameters and activated matmul FLOPs per
 * token within a relative `tolerance` (default 1%).
 *
 * @category budgets
 */
export const match = <A extends Cost.Costed, B extends Cost.Costed>(
  baseline: A,
  candidate: B,
  options?: {
    readonly tolerance?: number
    readonly names?: readonly [string, string]
    /** Parts left out of both budgets (see {@link budgetOf}). */
    readonly exclude?: ReadonlyArray<string>
  }
): Effect.Effect<Matched<A, B>, BudgetMismatch> =>
  Effect.suspend(() => {
    const tolerance = options?.tolerance ?? 0.01
    const rows = diff(budgetOf(baseline, options?.exclude), budgetOf(candidate, options?.exclude))
    const totals = rows.filter((r) => r.part === "total")
    const params = totals.find((r) => r.metric === "params")!.relative
    const flops = totals.find((r) => r.metric === "flops")!.relative
    const failed = totals.filter((r) => !(Math.abs(r.relative) <= tolerance)).map((r) => r.metric)
    if (failed.length > 0) {
      return Effect.fail(new BudgetMismatch({
        baselineName: options?.names?.[0] ?? "baseline",
        candidateName: options?.names?.[1] ?? "candidate",
        tolerance,
        failed,
        rows
      }))
    }
    return Effect.succeed(
      { baseline, candidate, tolerance, excluded: options?.exclude ?? [], residual: { params, flops }, rows } as unknown as Matched<A, B>
    )
  })
