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

const addParts = (a: Parts, b: Parts): Parts => {
  const out: Record<string, number> = { ...a }
  for (const [k, v] of Object.entries(b)) out[k] = (out[k] ?? 0) + v
  return out
}

const scaleParts = (a: Parts, k: number): Parts => {
  const out: Record<string, number> = {}
  for (const [key, v] of Object.entries(a)) out[key] = v * k
  return out
}

/** The monoid operation: costs of blocks that run one after another (or side by side) add. */
export const add = (a: Cost, b: Cost): Cost => ({
  params: addParts(a.params, b.params),
  activated: addParts(a.activated, b.activated),
  flops: addParts(a.flops, b.flops),
  attention: [...a.attention, ...b.attention],
  kv: [...a.kv, ...b.kv]
})

/** Folds {@link add} over a list. */
export const sum = (costs: Iterable<Cost>): Cost => {
  let acc = zero
  for (const c of costs) acc = add(acc, c)
  return acc
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

/** Query–key pairs a layer evaluates over `n` positions. */
export const attendedPairs = (n: number, window: number | null, causal: boolean): number => {
  const w = window ?? Infinity
  if (!causal) return n * Math.min(n, w)
  // Σ_{i=1..n} min(i, w)
  if (n <= w) return (n * (n + 1)) / 2
  return (w * (w + 1)) / 2 + (n - w) * w
}

/**
 * Forward attention-map FLOPs (QKᵀ and AV, 2 per multiply-add) over one sequence of `seqLen` tokens.
 * `causal: false` is the full T×T map (FlopCounterMode, PaLM, Chinchilla); `causal: true` counts only
 * the pairs a causal mask keeps, T(T+1)/2.
 */
export const attentionMapFlops = (c: Cost, seqLen: number, causal = false): number => {
  let s = 0
  for (const t of c.attention) {
    s += t.passes * 2 * t.heads * (t.dQK + t.dV) * attendedPairs(t.rate * seqLen, t.window, causal)
  }
  return s
}

/** KV-cache elements held after `seqLen` tokens. */
export const kvElements = (c: Cost, seqLen: number): number => {
  let s = 0
  for (const t of c.kv) s += t.passes * t.elements * Math.min(t.rate * seqLen, t.window ?? Infinity)
  return s
}

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
