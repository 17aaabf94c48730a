/**
 * Small statistics for comparing training runs over seeds: mean and sample standard deviation,
 * Student's t quantiles, the paired difference with its confidence interval, and per-step bands of
 * loss curves. Pure functions on numbers; no tensors, no I/O.
 *
 * @since 0.3.0
 */

/** Count, mean and sample standard deviation (n − 1 in the denominator; 0 for a single value). */
export interface Summary {
  readonly n: number
  readonly mean: number
  readonly sd: number
}

export const summarize = (xs: ReadonlyArray<number>): Summary => {
  const n = xs.length
  if (n === 0) return { n: 0, mean: NaN, sd: NaN }
  const mean = xs.reduce((s, x) => s + x, 0) / n
  const sd = n < 2 ? 0 : Math.sqrt(xs.reduce((s, x) => s + (x - mean) ** 2, 0) / (n - 1))
  return { n, mean, sd }
}

/** log Γ(x) for x > 0 (Lanczos, g = 7, nine coefficients; relative error below 1e-13). */
export const logGamma = (x: number): number => {
  const c = [
    0.99999999999980993, 676.5203681218851, -1259.1392167224028, 771.32342877765313, -176.61502916214059,
    12.507343278686905, -0.13857109526572012, 9.9843695780195716e-6, 1.5056327351493116e-7
  ]
  if (x < 0.5) return Math.log(Math.PI / Math.abs(Math.sin(Math.PI * x))) - logGamma(1 - x)
  const z = x - 1
  let a = c[0]!
  const t = z + 7.5
  for (let i = 1; i < 9; i++) a += c[i]! / (z + i)
  return 0.5 * Math.log(2 * Math.PI) + (z + 0.5) * Math.log(t) - t + Math.log(a)
}

/** The continued fraction of the incomplete beta function (modified Lentz), for x < (a+1)/(a+b+2). */
const betaFraction = (a: number, b: number, x: number): number => {
  const tiny = 1e-300
  let c = 1
  let d = 1 - ((a + b) * x) / (a + 1)
  if (Math.abs(d) < tiny) d = tiny
  d = 1 / d
  let h = d
  for (let m = 1; m <= 300; m++) {
    const m2 = 2 * m
    let aa = (m * (b - m) * x) / ((a + m2 - 1) * (a + m2))
    d = 1 + aa * d
    if (Math.abs(d) < tiny) d = tiny
    c = 1 + aa / c
    if (Math.abs(c) < tiny) c = tiny
    d = 1 / d
    h *= d * c
    aa = (-(a + m) * (a + b + m) * x) / ((a + m2) * (a + m2 + 1))
    d = 1 + aa * d
    if (Math.abs(d) < tiny) d = tiny
    c = 1 + aa / c
    if (Math.abs(c) < tiny) c = tiny
    d = 1 / d
    const step = d * c
    h *= step
    if (Math.abs(step - 1) < 1e-15) break
  }
  return h
}

/** The regularized incomplete beta function I_x(a, b). */
export const incompleteBeta = (a: number, b: number, x: number): number => {
  if (x <= 0) return 0
  if (x >= 1) return 1
  const front = Math.exp(logGamma(a + b) - logGamma(a) - logGamma(b) + a * Math.log(x) + b * Math.log(1 - x))
  return x < (a + 1) / (a + b + 2) ? (front * betaFraction(a, b, x)) / a : 1 - (front * betaFraction(b, a, 1 - x)) / b
}

/** The CDF of Student's t distribution with `df` degrees of freedom. */
export const tCdf = (t: number, df: number): number => {
  const tail = 0.5 * incompleteBeta(df / 2, 0.5, df / (df + t * t))
  return t >= 0 ? 1 - tail : tail
}

/** The `p` quantile of Student's t with `df` degrees of freedom (bisection on the CDF, to 1e-10). */
export const tQuantile = (p: number, df: number): number => {
  if (!(p > 0 && p < 1) || !(df > 0)) return NaN
  if (p === 0.5) return 0
  let lo = -1
  let hi = 1
  while (tCdf(lo, df) > p) lo *= 2
  while (tCdf(hi, df) < p) hi *= 2
  for (let i = 0; i < 200 && hi - lo > 1e-10; i++) {
    const mid = (lo + hi) / 2
    if (tCdf(mid, df) < p) lo = mid
    else hi = mid
  }
  return (lo + hi) / 2
}

/** A mean with a two-sided confidence interval from Student's t (`null` below two values). */
export interface Interval extends Summary {
  readonly level: number
  readonly low: number | null
  readonly high: number | null
}

/** The t interval of the mean of `xs` at `level` (default 95%). */
export const meanInterval = (xs: ReadonlyArray<number>, level = 0.95): Interval => {
  const s = summarize(xs)
  if (s.n < 2) return { ...s, level, low: null, high: null }
  const half = (tQuantile(1 - (1 - level) / 2, s.n - 1) * s.sd) / Math.sqrt(s.n)
  return { ...s, level, low: s.mean - half, high: s.mean + half }
}

/**
 * The paired difference `b[i] − a[i]` (the same seed, so the same batches, for both), its mean, sd
 * and t interval. Fails loudly on arrays of different lengths: that is a programming error.
 */
export const pairedDifference = (a: ReadonlyArray<number>, b: ReadonlyArray<number>, level = 0.95): Interval => {
  if (a.length !== b.length) throw new Error(`paired samples of different sizes: ${a.length} and ${b.length}`)
  return meanInterval(b.map((y, i) => y - a[i]!), level)
}

/** One point of a band: the mean over runs at `x` and mean ± sd. */
export interface BandPoint {
  readonly x: number
  readonly n: number
  readonly mean: number
  readonly low: number
  readonly high: number
}

/**
 * Per-x mean ± sd over several curves (each a list of points); an `x` present in only some curves
 * is summarised over those.
 */
export const bands = (curves: ReadonlyArray<ReadonlyArray<{ readonly x: number; readonly y: number }>>): ReadonlyArray<BandPoint> => {
  const byX = new Map<number, Array<number>>()
  for (const c of curves) {
    for (const p of c) {
      const ys = byX.get(p.x) ?? []
      ys.push(p.y)
      byX.set(p.x, ys)
    }
  }
  return [...byX.entries()].sort((a, b) => a[0] - b[0]).map(([x, ys]) => {
    const s = summarize(ys)
    return { x, n: s.n, mean: s.mean, low: s.mean - s.sd, high: s.mean + s.sd }
  })
}

/** Means of consecutive windows of `size` values (the last, shorter window included). */
export const windowMeans = (xs: ReadonlyArray<number>, size: number): ReadonlyArray<number> => {
  const out: Array<number> = []
  for (let i = 0; i < xs.length; i += size) {
    const w = xs.slice(i, i + size)
    out.push(w.reduce((s, x) => s + x, 0) / w.length)
  }
  return out
}
