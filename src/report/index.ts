/**
 * `conceptmoe/report`: SVG plots rendered in Node with vega-lite and vega (`Plots.toSvg` of
 * `Plots.lineChart`, `Plots.stackedBars`, `Plots.bandChart`), and the reallocation report's files
 * (`Reallocation.reportFiles`: plots and a Markdown summary; `Reallocation.writeFiles`). A subpath of
 * its own so that the package root loads no plotting library.
 *
 * @since 0.4.0
 */
export * as Plots from "./Plots.ts"
export * as Reallocation from "./Reallocation.ts"
