/**
 * The static cost algebra.
 *
 * A `Cost` describes what one block costs *per input token*, with no tensor allocated:
 *
 * - `params`: unique parameters by part (a looped block counts its weights once);
 * - `activated`: parameters one position touches in a forward pass, by part (the top-k of E routed
 *   experts; the whole embedding and LM head, as Mixtral, Qwen and OLMoE count them);
 * - `flops`: forward matmul FLOPs per token by part, 2 FLOPs per multiply-add, attention map excluded;
 * - `attention`: one term per attention layer, from which the attention-map FLOPs (QKᵀ and AV) are
 *   evaluated at any sequence length, full or causal;
 * - `kv`: one term per attention layer, from which KV-cache sizes are evaluated.
 *
 * Costs form a monoid under {@link add} with identity {@link zero}. {@link loop} multiplies compute but
 * not parameters; {@link atRate} scales compute and sequence lengths for a stage that runs on fewer
 * positions than there are tokens (a concept model runs at rate 1/R).
 *
 * This module depends on nothing but TypeScript: the cost side never imports the runtime.
 *
 * @since 0.1.0
 */

/** A breakdown by part name ("attention", "experts", "router", "lmHead", ...). */
export type Parts = Readonly<Record<string, number>>

/**
 * One attention layer's contribution to the attention map.
 * Per query position it does `heads·dQK` multiply-adds per key for QKᵀ and `heads·dV` for AV.
 */
export interface AttentionTerm {
  readonly path: string
  readonly heads: number
  readonly dQK: number
  readonly dV: number
  /** Keys a query may see at most (sliding window), or null for the whole prefix/sequence. */
  readonly window: number | null
  /** Rotary dimensions of this layer's table (0 when it has none); only used for the excluded rotary term. */
  readonly ropeDim: number
  /** Passes per position: a block looped n times has n. */
  readonly passes: number
  /** Positions per input token: 1 at token rate, 1/R in a concept model. */
  readonly rate: number
}

/** One attention layer's KV cache: `elements` cached numbers per position and pass. */
export interface KvTerm {
  readonly path: string
  readonly elements: number
  readonly window: number | null
  readonly passes: number
  readonly rate: number
}

export interface Cost {
  readonly params: Parts
  readonly activated: Parts
  readonly flops: Parts
  readonly attention: ReadonlyArray<AttentionTerm>
  readonly kv: ReadonlyArray<KvTerm>
}

/** @category constructors */
export const zero: Cost = { params: {}, activated: {}, flops: {}, attention: [], kv: [] }

/** @category constructors */
export const make = (parts: Partial<Cost>): Cost => ({ ...zero, ...parts })

/**
 * The value of one part, 0 when absent. Part names come from configs, so the lookup is by own key
 * only: a part named "constructor" or "__proto__" is an ordinary part, never a property of Object.
 */
export const part = (parts: Parts, name: string): number => (Object.hasOwn(parts, name) ? parts[name]! : 0)

/** Builds a breakdown from a Map (own data properties only, whatever the part names). */
export const partsOf = (m: ReadonlyMap<string, number>): Parts => Object.fromEntries(m)

const accumulate = (into: Map<string, number>, parts: Parts, k = 1): void => {
  for (const [key, v] of Object.entries(parts)) into.set(key, (into.get(key) ?? 0) + v * k)
}

const scaleParts = (a: Parts, k: number): Parts => {
  const out = new Map<string, number>()
  accumulate(out, a, k)
  return partsOf(out)
}

/** The monoid operation: costs of blocks that run one after another (or side by side) add. */
export const add = (a: Cost, b: Cost): Cost => sum([a, b])

/**
 * Folds {@link add} over a list in one pass: time linear in the number of parts and terms (a
 * pairwise fold would copy the growing term lists once per element, quadratic in the layer count).
 */
export const sum = (costs: Iterable<Cost>): Cost => {
  const params = new Map<string, number>()
  const activated = new Map<string, number>()
  const flops = new Map<string, number>()
  const attention: Array<AttentionTerm> = []
  const kv: Array<KvTerm> = []
  for (const c of costs) {
    accumulate(params, c.params)
    accumulate(activated, c.activated)
    accumulate(flops, c.flops)
    for (const t of c.attention) attention.push(t)
    for (const t of c.kv) kv.push(t)
  }
  return { params: partsOf(params), activated: partsOf(activated), flops: partsOf(flops), attention, kv }
}

/**
 * The same weights run `n` times per position (layer looping): compute, attention passes and KV
 * caches multiply by `n`; parameters and activated parameters do not.
 */
export const loop = (c: Cost, n: number): Cost => ({
  params: c.params,
  activated: c.activated,
  flops: scaleParts(c.flops, n),
  attention: c.attention.map((t) => ({ ...t, passes: t.passes * n })),
  kv: c.kv.map((t) => ({ ...t, passes: t.passes * n }))
})

/**
 * The block runs on `rate` positions per input token (for a concept model, rate = 1/R): per-token
 * compute scales by `rate`, and its attention and KV caches see `rate·T` positions for T tokens.
 * Parameters and activated parameters (per position) are unchanged.
 */
export const atRate = (c: Cost, rate: number): Cost => ({
  params: c.params,
  activated: c.activated,
  flops: scaleParts(c.flops, rate),
  attention: c.attention.map((t) => ({ ...t, rate: t.rate * rate })),
  kv: c.kv.map((t) => ({ ...t, rate: t.rate * rate }))
})

/** Sum of a breakdown. */
export const total = (parts: Parts): number => {
  let s = 0
  for (const v of Object.values(parts)) s += v
  return s
}

/** Forward matmul FLOPs per token (attention map excluded). */
export const matmulPerToken = (c: Cost): number => total(c.flops)

/**
 * A count that may pass 2^53 − 1 (`Number.MAX_SAFE_INTEGER`), beyond which a double no longer holds
 * every integer: a number while it is a safe integer (or a fraction: see {@link product}), a bigint
 * above. Sequence totals (attention map, forward and training FLOPs, KV bytes) are `Exact`;
 * per-token counts are safe numbers (analysis refuses a graph whose counts pass 2^53 − 1).
 */
export type Exact = number | bigint

const MAX_SAFE = BigInt(Number.MAX_SAFE_INTEGER)

/** A bigint as an {@link Exact}: a number when it is safe. */
export const exact = (b: bigint): Exact => (b <= MAX_SAFE && b >= -MAX_SAFE ? Number(b) : b)

/** True for a safe integer or a bigint: a value the exact arithmetic below can carry. */
const integral = (x: Exact): boolean => typeof x === "bigint" || Number.isSafeInteger(x)

/** The nearest double (for ratios and plots). */
export const toNumber = (x: Exact): number => (typeof x === "bigint" ? Number(x) : x)

/**
 * A product, exact when every factor is an integer (bigint arithmetic); otherwise the double
 * product, left to right. Fractions appear only at a concept model's rate 1/R.
 */
export const product = (...xs: ReadonlyArray<Exact>): Exact => {
  if (xs.every(integral)) return exact(xs.reduce<bigint>((a, x) => a * BigInt(x), 1n))
  return xs.reduce<number>((a, x) => a * toNumber(x), 1)
}

/**
 * A sum of any length (an array, never spread into arguments), exact when every term is an
 * integer; otherwise the double sum, left to right.
 */
export const sumExact = (xs: ReadonlyArray<Exact>): Exact => {
  if (xs.every(integral)) return exact(xs.reduce<bigint>((a, x) => a + BigInt(x), 0n))
  return xs.reduce<number>((a, x) => a + toNumber(x), 0)
}

/** `a + b`, exact when both are integers. */
export const plus = (a: Exact, b: Exact): Exact => sumExact([a, b])

/** Query–key pairs a layer evaluates over `n` positions. */
export const attendedPairs = (n: number, window: number | null, causal: boolean): number =>
  toNumber(attendedPairsExact(n, window, causal))

/** {@link attendedPairs}, exact for integer `n`. */
export const attendedPairsExact = (n: number, window: number | null, causal: boolean): Exact => {
  if (!Number.isSafeInteger(n) || (window !== null && !Number.isSafeInteger(window))) {
    const w = window ?? Infinity
    if (!causal) return n * Math.min(n, w)
    if (n <= w) return (n * (n + 1)) / 2
    return (w * (w + 1)) / 2 + (n - w) * w
  }
  const N = BigInt(n)
  const W = window === null || window >= n ? N : BigInt(window)
  // full: n·min(n, w); causal: Σ_{i=1..n} min(i, w)
  if (!causal) return exact(N * W)
  return exact((W * (W + 1n)) / 2n + (N - W) * W)
}

/**
 * Forward attention-map FLOPs (QKᵀ and AV, 2 per multiply-add) over one sequence of `seqLen` tokens.
 * `causal: false` is the full T×T map (FlopCounterMode, PaLM, Chinchilla); `causal: true` counts only
 * the pairs a causal mask keeps, T(T+1)/2.
 */
export const attentionMapFlops = (c: Cost, seqLen: number, causal = false): number =>
  toNumber(attentionMapFlopsExact(c, seqLen, causal))

/** {@link attentionMapFlops}, exact past 2^53 when every term is integral. */
export const attentionMapFlopsExact = (c: Cost, seqLen: number, causal = false): Exact =>
  sumExact(c.attention.map((t) =>
    product(t.passes, 2, t.heads, t.dQK + t.dV, attendedPairsExact(t.rate * seqLen, t.window, causal))
  ))

/** KV-cache elements held after `seqLen` tokens. */
export const kvElements = (c: Cost, seqLen: number): number => toNumber(kvElementsExact(c, seqLen))

/** {@link kvElements}, exact past 2^53 when every term is integral. */
export const kvElementsExact = (c: Cost, seqLen: number): Exact =>
  sumExact(c.kv.map((t) => product(t.passes, t.elements, Math.min(t.rate * seqLen, t.window ?? Infinity))))

/** KV-cache elements added per token (ignoring sliding windows, which cap the total). */
export const kvElementsPerToken = (c: Cost): number => {
  let s = 0
  for (const t of c.kv) s += t.passes * t.elements * t.rate
  return s
}

/**
 * The rotary-table FLOPs transformers spends once per forward (the `inv_freq` outer product,
 * ropeDim·T). Excluded from model FLOPs; reported so totals can be compared with FlopCounterMode.
 */
export const rotaryTableFlops = (c: Cost, seqLen: number): number => {
  let d = 0
  for (const t of c.attention) d = Math.max(d, t.ropeDim)
  return d * seqLen
}

/**
 * What the budgets and reports of this folder read of an analysed graph (graph/Analyze.ts's
 * `Analysis` is one): the folded cost, every parameter with its path, and one row per node with its
 * forward FLOPs. Declared here, so that the cost side imports nothing from the graph side.
 */
export interface Costed {
  readonly cost: Cost
  readonly params: ReadonlyArray<{ readonly path: string; readonly part: string; readonly numel: number; readonly tiedTo?: string | undefined; readonly buffer?: true | undefined }>
  readonly rows: ReadonlyArray<{ readonly path: string; readonly flops: number }>
}
