/**
 * Plain-text tables with aligned columns and thousands separators.
 *
 * @internal
 */

/**
 * 1234567 → "1,234,567"; non-integers keep up to `digits` decimals. A bigint (a count past 2^53)
 * is printed digit for digit.
 */
export const formatNumber = (n: number | bigint, digits = 2): string => {
  if (typeof n === "bigint") return n.toLocaleString("en-US")
  if (!Number.isFinite(n)) return String(n)
  if (Number.isInteger(n)) return n.toLocaleString("en-US")
  return n.toLocaleString("en-US", { maximumFractionDigits: digits, minimumFractionDigits: 0 })
}

/** Signed percentage: 0.0123 → "+1.23%". */
export const formatPercent = (x: number): string =>
  !Number.isFinite(x) ? "n/a" : `${x >= 0 ? "+" : ""}${(x * 100).toFixed(2)}%`

/** Renders rows under a header; columns listed in `right` are right-aligned. */
export const renderTable = (
  header: ReadonlyArray<string>,
  rows: ReadonlyArray<ReadonlyArray<string>>,
  right: ReadonlyArray<number> = []
): string => {
  const widths = header.map((h, i) => Math.max(h.length, ...rows.map((r) => (r[i] ?? "").length)))
  const line = (cells: ReadonlyArray<string>) =>
    cells.map((c, i) => (right.includes(i) ? c.padStart(widths[i]!) : c.padEnd(widths[i]!))).join("  ").trimEnd()
  return [line(header), widths.map((w) => "-".repeat(w)).join("  "), ...rows.map(line)].join("\n")
}
