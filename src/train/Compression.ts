/**
 * Measured compression of a ConceptMoE run, from its step metrics: pure functions, no tensors.
 *
 * The sampled R of a step is its tokens over its concepts (the boundaries the chunk module drew);
 * the threshold R of an evaluation is the same ratio on the validation batches with boundaries
 * p ≥ ½. {@link compressionSummary} gives the training mean over the second half of a run (total
 * tokens over total concepts of those steps, so every token weighs the same) and the last
 * evaluation's threshold R; {@link windowedSampledR} the same mean over consecutive windows.
 *
 * @since 0.4.0
 */

/** What the helpers read from a step's metrics (`StepMetrics` in Train.ts). */
export interface CompressionMetrics {
  readonly step: number
  /** Sampled R of the step (tokens / concepts); absent for models without a concept stage. */
  readonly compression?: number
  /** Sampled boundary rate F (concepts / tokens). */
  readonly boundaryRate?: number
  /** Threshold R on validation (p ≥ ½), at evaluation steps. */
  readonly valCompression?: number
}

/** Tokens and concepts of a step, up to a common factor (concepts/tokens = F). */
const rate = (m: CompressionMetrics): number | undefined =>
  m.boundaryRate !== undefined ? m.boundaryRate : m.compression !== undefined && m.compression > 0 ? 1 / m.compression : undefined

/**
 * Sampled R over a set of steps: Σ tokens / Σ concepts. Every step of a run has the same number of
 * tokens, so this is 1 / (mean boundary rate). Undefined when no step has a concept stage.
 */
export const meanSampledR = (metrics: ReadonlyArray<CompressionMetrics>): number | undefined => {
  let sum = 0
  let n = 0
  for (const m of metrics) {
    const f = rate(m)
    if (f === undefined) continue
    sum += f
    n++
  }
  return n === 0 || sum === 0 ? undefined : n / sum
}

/** The steps of the second half of a run: `step ≥ ⌊steps/2⌋` (steps counted from 0). */
export const secondHalf = <M extends CompressionMetrics>(metrics: ReadonlyArray<M>, steps?: number): ReadonlyArray<M> => {
  const total = steps ?? (metrics.length === 0 ? 0 : Math.max(...metrics.map((m) => m.step)) + 1)
  return metrics.filter((m) => m.step >= Math.floor(total / 2))
}

/** {@link meanSampledR} of each window of `size` consecutive steps (the last may be shorter). */
export const windowedSampledR = (metrics: ReadonlyArray<CompressionMetrics>, size: number): ReadonlyArray<{ readonly from: number; readonly to: number; readonly r: number | undefined }> => {
  const sorted = [...metrics].sort((a, b) => a.step - b.step)
  const out: Array<{ from: number; to: number; r: number | undefined }> = []
  for (let i = 0; i < sorted.length; i += size) {
    const w = sorted.slice(i, i + size)
    out.push({ from: w[0]!.step, to: w[w.length - 1]!.step, r: meanSampledR(w) })
  }
  return out
}

/** The last evaluation's threshold R (p ≥ ½ on validation), if any evaluation measured one. */
export const lastValCompression = (metrics: ReadonlyArray<CompressionMetrics>): number | undefined =>
  [...metrics].reverse().find((m) => m.valCompression !== undefined)?.valCompression

export interface CompressionSummary {
  /** Σ tokens / Σ concepts over the second half of training (sampled boundaries). */
  readonly meanSampledR: number | undefined
  /** The last evaluation's threshold R on validation (p ≥ ½). */
  readonly valCompression: number | undefined
  /** The 10-step windows of the second half: lowest and highest mean sampled R. */
  readonly windows: { readonly min: number; readonly max: number } | undefined
}

/**
 * A run's compression: the second half's mean sampled R, the extremes of its 10-step windows
 * (`window` steps), and the last threshold R. `steps` is the run's length (default: the metrics').
 */
export const compressionSummary = (metrics: ReadonlyArray<CompressionMetrics>, options?: { readonly steps?: number; readonly window?: number }): CompressionSummary => {
  const half = secondHalf(metrics, options?.steps)
  const rs = windowedSampledR(half, options?.window ?? 10).map((w) => w.r).filter((r): r is number => r !== undefined)
  return {
    meanSampledR: meanSampledR(half),
    valCompression: lastValCompression(metrics),
    windows: rs.length === 0 ? undefined : { min: Math.min(...rs), max: Math.max(...rs) }
  }
}

/** Whether `value` lies within ± `tolerance` (a fraction) of `target`. */
export const within = (value: number | undefined, target: number, tolerance: number): boolean =>
  value !== undefined && Math.abs(value / target - 1) <= tolerance
