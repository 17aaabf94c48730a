/**
 * Human views of reports: aligned tables with thousands separators.
 *
 * @since 0.1.0
 */
import type { Analysis } from "../graph/Analyze.ts"
import { part } from "../cost/Cost.ts"
import type { BudgetReport } from "../cost/Report.ts"
import { formatNumber, renderTable } from "../internal/Table.ts"

const share = (x: number, total: number) => (total === 0 ? "" : `${((100 * x) / total).toFixed(1)}%`)

const partsTable = (
  header: ReadonlyArray<string>,
  parts: ReadonlyArray<readonly [string, ...Array<number>]>,
  totalCol: number
): string => {
  const total = parts.reduce((s, p) => s + ((p[totalCol] as number | undefined) ?? 0), 0)
  const rows = parts
    .filter((p) => p.slice(1).some((v) => v !== 0))
    .map(([name, ...vs]) => [name, ...vs.map((v) => formatNumber(v)), share(vs[totalCol - 1] ?? 0, total)])
  const totals = header.slice(1, -1).map((_, i) => parts.reduce((s, p) => s + ((p[i + 1] as number | undefined) ?? 0), 0))
  rows.push(["total", ...totals.map((v) => formatNumber(v)), "100.0%"])
  return renderTable(header, rows, header.map((_, i) => i).slice(1))
}

/** The per-path table of an analysis, down to `depth`. */
export const pathTable = (a: Analysis, depth: number): string => {
  const total = a.rows[0]?.flops ?? 0
  const rows = a.rows
    .filter((r) => r.depth > 0 && r.depth <= depth)
    .map((r) => [
      `${"  ".repeat(r.depth - 1)}${r.path.split("/").pop()}`,
      r.kind,
      `${r.in}→${r.out}`,
      formatNumber(r.params),
      formatNumber(r.activated),
      formatNumber(r.flops),
      share(r.flops, total)
    ])
  return renderTable(["path", "kind", "in→out", "params", "activated", "FLOPs/token", "share"], rows, [3, 4, 5, 6])
}

/** The `budget --format table` view. */
export const renderBudget = (r: BudgetReport, analysis: Analysis, depth: number): string => {
  const parts = [...new Set([...Object.keys(r.params.byPart), ...Object.keys(r.params.activatedByPart)])].sort()
  const params = partsTable(
    ["part", "params", "activated", "share"],
    parts.map((p) => [p, part(r.params.byPart, p), part(r.params.activatedByPart, p)] as const),
    1
  )
  const flops = partsTable(
    ["part", "FLOPs/token", "share"],
    Object.keys(r.flops.byPart).sort().map((p) => [p, part(r.flops.byPart, p)] as const),
    1
  )
  const T = formatNumber(r.seqLen)
  const seq = renderTable(["per sequence", "FLOPs"], [
    [`attention map, full ${T}×${T}`, formatNumber(r.flops.attentionMap)],
    ["attention map, causal", formatNumber(r.flops.attentionMapCausal)],
    ["forward (matmul + full map)", formatNumber(r.flops.forward)],
    ["forward, causal map", formatNumber(r.flops.forwardCausal)],
    ["training (3 × forward)", formatNumber(r.flops.training)]
  ], [1])
  const kv = renderTable(["KV cache", "elements", "bytes"], [
    ["per token", formatNumber(r.kvCache.elementsPerToken), formatNumber(r.kvCache.bytesPerToken)],
    [`after ${T} tokens`, formatNumber(r.kvCache.elements), formatNumber(r.kvCache.bytes)]
  ], [1, 2])
  const summary = renderTable(["parameters", "count"], [
    ["total", formatNumber(r.params.total)],
    ["activated (both embeddings)", formatNumber(r.params.activated)],
    ["activated, input embedding excluded", formatNumber(r.params.activatedExclInputEmbedding)],
    ["activated, non-embedding", formatNumber(r.params.activatedNonEmbedding)],
    ["embedding", formatNumber(r.params.embedding)],
    [`LM head${r.params.lmHeadTied ? " (tied to the embedding)" : ""}`, formatNumber(r.params.lmHead)]
  ], [1])
  const stages = r.stages === undefined ? [] : [
    renderTable(["stage", "params", "FLOPs/token", `attention map @ ${T}`, `KV bytes @ ${T}`], Object.entries(r.stages).map(([name, s]) => [
      name,
      formatNumber(s.params),
      formatNumber(s.matmulPerToken),
      formatNumber(s.attentionMap),
      formatNumber(s.kvBytes)
    ]), [1, 2, 3, 4]),
    ""
  ]
  return [
    `${r.model.name}  (${r.model.format}, ${r.model.file})  seq-len ${T}`,
    "",
    summary,
    "",
    params,
    "",
    flops,
    "",
    seq,
    "",
    kv,
    "",
    ...stages,
    pathTable(analysis, depth),
    "",
    `FLOPs: 2 per multiply-add, forward. FLOPs/token are matmuls only (attention map excluded, embedding lookup 0).`,
    `KV bytes at ${r.kvCache.bytesPerElement} bytes/element. Full conventions: --format json → conventions.`
  ].join("\n")
}
