/**
 * SVG plots rendered with vega-lite + vega in Node (no browser, no canvas).
 *
 * @since 0.1.0
 */
import * as vega from "vega"
import type { TopLevelSpec } from "vega-lite"
import { compile } from "vega-lite"

/** Renders a vega-lite spec to an SVG string. */
export const toSvg = async (spec: TopLevelSpec): Promise<string> => {
  const view = new vega.View(vega.parse(compile(spec).spec), { renderer: "none" })
  try {
    return await view.toSVG()
  } finally {
    view.finalize()
  }
}

const schema = "https://vega.github.io/schema/vega-lite/v6.json"

/**
 * A line chart of `y` against `x`, one line per `series` (log-log by default). Rows with a `style`
 * are dashed by style (e.g. measured vs predicted).
 */
export const lineChart = (options: {
  readonly title: string
  readonly x: string
  readonly y: string
  readonly rows: ReadonlyArray<{ readonly series: string; readonly x: number; readonly y: number; readonly style?: string }>
  /** Linear axes (default: log-log). */
  readonly linear?: boolean
  /** Per-axis scales, overriding `linear`. */
  readonly scales?: { readonly x: "log" | "linear"; readonly y: "log" | "linear" }
}): TopLevelSpec => {
  const scales = options.scales ?? (options.linear === true ? { x: "linear", y: "linear" } : { x: "log", y: "log" })
  const styled = options.rows.some((r) => r.style !== undefined)
  return {
    $schema: schema,
    title: options.title,
    width: 520,
    height: 320,
    data: { values: options.rows.map((r) => ({ ...r })) },
    mark: { type: "line", point: options.linear !== true },
    encoding: {
      x: scales.x === "linear"
        ? { field: "x", type: "quantitative", title: options.x }
        : { field: "x", type: "quantitative", title: options.x, scale: { type: "log", base: 2 }, axis: { format: "~s" } },
      y: scales.y === "linear"
        ? { field: "y", type: "quantitative", title: options.y, scale: { zero: false } }
        : { field: "y", type: "quantitative", title: options.y, scale: { type: "log" }, axis: { format: "~s" } },
      color: { field: "series", type: "nominal", title: "model", legend: { labelLimit: 400 } },
      ...(styled ? { strokeDash: { field: "style", type: "nominal", title: "" } } : {})
    }
  }
}

/** A horizontal stacked bar per `bar`, stacked by `part`. */
export const stackedBars = (options: {
  readonly title: string
  readonly value: string
  readonly rows: ReadonlyArray<{ readonly bar: string; readonly part: string; readonly value: number }>
}): TopLevelSpec => ({
  $schema: schema,
  title: options.title,
  width: 520,
  data: { values: options.rows.map((r) => ({ ...r })) },
  mark: "bar",
  encoding: {
    y: { field: "bar", type: "nominal", title: null, sort: null },
    x: { field: "value", type: "quantitative", title: options.value, axis: { format: "~s" } },
    color: { field: "part", type: "nominal", title: "part", legend: { labelLimit: 400 } },
    tooltip: [{ field: "part" }, { field: "value", format: ",.0f" }]
  }
})

/**
 * Lines of a mean with a shaded band (e.g. mean ± sd over seeds), one colour per `series`, on
 * linear axes.
 */
export const bandChart = (options: {
  readonly title: string
  readonly x: string
  readonly y: string
  readonly rows: ReadonlyArray<{ readonly series: string; readonly x: number; readonly mean: number; readonly low: number; readonly high: number }>
}): TopLevelSpec => ({
  $schema: schema,
  title: options.title,
  width: 520,
  height: 320,
  data: { values: options.rows.map((r) => ({ ...r })) },
  encoding: {
    x: { field: "x", type: "quantitative", title: options.x },
    color: { field: "series", type: "nominal", title: "model", legend: { labelLimit: 400 } }
  },
  layer: [
    {
      mark: { type: "area", opacity: 0.25 },
      encoding: {
        y: { field: "low", type: "quantitative", title: options.y, scale: { zero: false } },
        y2: { field: "high" }
      }
    },
    {
      mark: { type: "line" },
      encoding: { y: { field: "mean", type: "quantitative", title: options.y, scale: { zero: false } } }
    }
  ]
})
