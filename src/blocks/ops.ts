/**
 * Tensor routines shared by block applies. Everything goes through the context's tfjs namespace.
 *
 * @since 0.1.0
 */
import type { DecodeCache, ForwardContext, Tensor, Tensor2D } from "../graph/Apply.ts"
import type { Activation } from "./MLP.ts"
import { Unsupported } from "../internal/RunErrors.ts"

/** x·W (+ b), counted as a weight product. */
export const linear = (ctx: ForwardContext, x: Tensor, w: Tensor, b?: Tensor, product?: Product): Tensor2D => {
  const y = product === undefined ? ctx.matMul(x, w, "weights") : product(x, w)
  return (b === undefined ? y : ctx.tf.add(y, b)) as Tensor2D
}

export const rmsNorm = (ctx: ForwardContext, x: Tensor, g: Tensor, eps: number): Tensor2D => ctx.rmsNorm(x, g, eps) as Tensor2D

export const layerNorm = (ctx: ForwardContext, x: Tensor, g: Tensor, b: Tensor | undefined, eps: number): Tensor2D => {
  const { tf } = ctx
  const { mean, variance } = tf.moments(x, -1, true)
  const y = tf.mul(tf.mul(tf.sub(x, mean), tf.rsqrt(tf.add(variance, eps))), g)
  return (b === undefined ? y : tf.add(y, b)) as Tensor2D
}

export const activate = (ctx: ForwardContext, x: Tensor, a: Activation): Tensor => ctx.activate(x, a)

/** How a {@link linear} multiplies by its weight (default: `ctx.matMul`, counted as weight FLOPs). */
export type Product = (x: Tensor, w: Tensor) => Tensor

/** A feed-forward network with the parameter names of `ffnParams`, its weights multiplied by `product`. */
export const ffn = (
  ctx: ForwardContext,
  x: Tensor,
  p: (name: string) => Tensor | undefined,
  activation: Activation,
  product?: Product
): Tensor2D => {
  const { tf } = ctx
  const gate = p("gate.weight")
  const up = linear(ctx, x, p("up.weight")!, p("up.bias"), product)
  const hidden = gate === undefined
    ? activate(ctx, up, activation)
    : tf.mul(activate(ctx, linear(ctx, x, gate, p("gate.bias"), product), activation), up)
  return linear(ctx, hidden, p("down.weight")!, p("down.bias"), product)
}

/**
 * The rotary tables kept for one tensor library (keyed by its environment object, as the masks):
 * by backend, frequencies and attention factor, cos and sin `[P, 1, half]` of positions 0 … P − 1.
 */
const ropeCaches = new WeakMap<object, Map<string, { readonly cos: Tensor; readonly sin: Tensor; readonly rows: number }>>()
/** Tables past this many entries (rows · half) are not kept: such passes compute their angles instead. */
const ropeTableBudget = 1 << 22

/**
 * cos and sin `[N, 1, half]` for the pass's positions of angles position · `inverse[j]` (times the
 * attention factor), once per pass (`ctx.memo`). They are rows of tables of positions 0 … P − 1
 * (P a power of two past the largest position) kept per tensor library and backend, gathered by
 * `ctx.positionIds()`: the float32 angle as the device computes it (the product of the float32
 * position and frequency), its cosine and sine in double precision rounded to float32, as cpu's and
 * wasm's kernels compute them (webgpu's shader functions are less exact); a training step computed
 * Cast, Multiply, Sin and Cos (Math.sin, Math.cos over every entry) each pass before. Past
 * {@link ropeTableBudget} entries the angles are computed on the device as before.
 */
export const ropeTablesFor = (ctx: ForwardContext, inverse: ArrayLike<number>, attention: number) =>
  ctx.memo(`rope/${Array.prototype.join.call(inverse, ",")}/${attention}`, () => {
    const { tf } = ctx
    const half = inverse.length
    const freq = Float32Array.from(inverse)
    let top = 0
    for (const q of ctx.stream.positions) top = Math.max(top, q)
    let rows = 1
    while (rows <= top) rows *= 2
    if (rows * half > ropeTableBudget) {
      const angles = tf.mul(tf.reshape(tf.cast(ctx.positionIds(), "float32"), [-1, 1, 1]), tf.tensor3d(freq, [1, 1, half]))
      return attention === 1
        ? { cos: tf.cos(angles), sin: tf.sin(angles) }
        : { cos: tf.mul(tf.cos(angles), attention), sin: tf.mul(tf.sin(angles), attention) }
    }
    const key = `${tf.getBackend()}/${Array.prototype.join.call(freq, ",")}/${attention}`
    const byLibrary = ropeCaches.get(tf.env()) ?? new Map<string, { cos: Tensor; sin: Tensor; rows: number }>()
    ropeCaches.set(tf.env(), byLibrary)
    let table = byLibrary.get(key)
    if (table === undefined || table.rows < rows || table.cos.isDisposed || table.sin.isDisposed) {
      if (table !== undefined) tf.dispose([table.cos, table.sin])
      const cos = new Float32Array(rows * half)
      const sin = new Float32Array(rows * half)
      const factor = Math.fround(attention)
      for (let q = 0; q < rows; q++) {
        for (let j = 0; j < half; j++) {
          const angle = Math.fround(q * freq[j]!)
          cos[q * half + j] = attention === 1 ? Math.cos(angle) : Math.fround(Math.cos(angle)) * factor
          sin[q * half + j] = attention === 1 ? Math.sin(angle) : Math.fround(Math.sin(angle)) * factor
        }
      }
      table = { cos: tf.keep(tf.tensor3d(cos, [rows, 1, half])), sin: tf.keep(tf.tensor3d(sin, [rows, 1, half])), rows }
      byLibrary.set(key, table)
    }
    const ids = ctx.positionIds()
    return { cos: tf.gather(table.cos, ids), sin: tf.gather(table.sin, ids) }
  })

/** cos and sin tables `[N, 1, dim/2]` for the context's positions (HF `rotate_half` convention): {@link ropeTablesFor}. */
export const ropeTables = (ctx: ForwardContext, dim: number, base: number) =>
  ropeTablesFor(ctx, Float64Array.from({ length: dim / 2 }, (_, j) => base ** (-(2 * j) / dim)), 1)

/** Rotates the first `dim` features of each head of `x [N, heads, hd]`. */
export const applyRope = (ctx: ForwardContext, x: Tensor, dim: number, tables: { cos: Tensor; sin: Tensor }): Tensor =>
  ctx.rotate(x, dim, tables.cos, tables.sin)

/** Which keys a query sees: causal or not, within a sliding window or not. */
type Masking = { readonly causal: boolean; readonly window: number | null }

/**
 * The masks kept for one tensor library (keyed by its environment object, so two copies of tfjs in a
 * process keep their own): by backend and shape, oldest first, and their element count.
 */
const maskCaches = new WeakMap<object, { readonly masks: Map<string, Tensor>; elements: number }>()
/** At most this many mask elements are kept per tensor library (64 MB). */
const maskBudget = 16 * 1024 * 1024

/**
 * Additive mask `[n, len]` for `n` queries at positions `past … past+n−1` over keys `0 … len−1`:
 * 0 where a query may attend, −1e9 elsewhere (causal and sliding window). Full passes use
 * `past = 0`, `n = len`. Kept across calls per tensor library and backend (at most 64 shapes and 64 MB
 * per library; the oldest is dropped first): a mask made on one backend and used on another would be
 * copied through a synchronous read.
 */
const mask = (ctx: ForwardContext, n: number, len: number, past: number, causal: boolean, window: number | null): Tensor => {
  const key = `${ctx.tf.getBackend()}/${n}/${len}/${past}/${causal}/${window}`
  const cache = maskCaches.get(ctx.tf.env()) ?? { masks: new Map<string, Tensor>(), elements: 0 }
  maskCaches.set(ctx.tf.env(), cache)
  const maskCache = cache.masks
  let m = maskCache.get(key)
  if (m === undefined || m.isDisposed) {
    const a = new Float32Array(n * len)
    for (let i = 0; i < n; i++) {
      const q = past + i
      for (let j = 0; j < len; j++) {
        const ok = (!causal || j <= q) && (window === null || (causal ? q - j < window : Math.abs(q - j) < window))
        a[i * len + j] = ok ? 0 : -1e9
      }
    }
    m = ctx.tf.keep(ctx.tf.tensor2d(a, [n, len]))
    maskCache.set(key, m)
    cache.elements += n * len
    while (maskCache.size > 1 && (maskCache.size > 64 || cache.elements > maskBudget)) {
      const [oldest, t] = maskCache.entries().next().value!
      maskCache.delete(oldest)
      cache.elements -= t.size
      t.dispose()
    }
  }
  return m
}

/**
 * Attention of `R` rows at once, the keys given transposed: queries `q [R·n, H, dqk]` at positions
 * `past …` of each row, keys `kt [R·KV, dqk, len]`, values `v [R·KV, len, dv]` or transposed
 * `vt [R·KV, dv, len]` (as a KV cache stores them). Returns `[R·n, H·dv]`. `keyValid [R·len]`
 * (1 real, 0 padding) masks padded keys.
 */
const attendCore = (
  ctx: ForwardContext,
  q: Tensor,
  kt: Tensor,
  values: { readonly v: Tensor } | { readonly vt: Tensor },
  R: number,
  n: number,
  len: number,
  past: number,
  options: Masking,
  keyValid?: Tensor,
  documents?: Tensor
): Tensor => {
  const { tf } = ctx
  const [, H, dqk] = q.shape as [number, number, number]
  const KV = kt.shape[0]! / R
  const dv = "v" in values ? values.v.shape[2]! : values.vt.shape[1]!
  const group = H / KV
  // repeat each KV head of `[R·KV, a, b]` for its group of query heads
  const expand = (t: Tensor) => {
    const [, a, b] = t.shape as [number, number, number]
    return group === 1 ? t : tf.reshape(ctx.repeat(t, group), [R * H, a, b])
  }
  // [R·n, heads, d] → [R·heads, n, d]
  const q3 = tf.reshape(tf.transpose(tf.reshape(q, [R, n, H, dqk]), [0, 2, 1, 3]), [R * H, n, dqk])
  // a causal square map (a full pass): the scores above the diagonal are masked, the
  // probabilities 0 there; a backend may skip those blocks
  const square = options.causal && past === 0 && n === len
  let raw = ctx.matMul(q3, expand(kt), "attentionMap", square ? "lowerC" : undefined)
  // packed documents: a query sees only keys of its own document (`documents [R, 1, n, len]`)
  if (documents !== undefined) raw = tf.reshape(tf.add(tf.reshape(raw, [R, H, n, len]), documents), [R * H, n, len])
  const m = mask(ctx, n, len, past, options.causal, options.window)
  let p: Tensor
  if (keyValid === undefined) p = ctx.softmax(raw, 1 / Math.sqrt(dqk), m, square)
  else {
    // padded keys (static-shape concept slots) take no attention
    const bias = tf.reshape(tf.mul(tf.sub(keyValid, 1), 1e9), [R, 1, 1, len])
    const logits = tf.add(tf.mul(raw, 1 / Math.sqrt(dqk)), m)
    p = tf.softmax(tf.reshape(tf.add(tf.reshape(logits, [R, H, n, len]), bias), [R * H, n, len]))
  }
  // stored values: with one query (P·V)ᵀ = Vᵀ·Pᵀ, where Pᵀ is a reshape; with a block of queries
  // P·V, transposing Vᵀ (len·dv, smaller than P's n·len)
  const out = "v" in values
    ? ctx.matMul(p, expand(values.v), "attentionMap", square ? "lowerA" : undefined)
    : n === 1
    ? ctx.matMul(expand(values.vt), tf.reshape(p, [R * H, len, 1]), "attentionMap")
    : ctx.matMul(p, tf.transpose(expand(values.vt), [0, 2, 1]), "attentionMap")
  return tf.reshape(tf.transpose(tf.reshape(out, [R, H, n, dv]), [0, 2, 1, 3]), [R * n, H * dv])
}

/**
 * The additive document mask `[R, 1, L, L]` of `R` rows of `L` positions from their documents
 * `docs [R·L]` (float, off the tape): 0 where query and key are in the same document, −1e9
 * elsewhere. Built from the document ids with arithmetic only (no comparison on the tape).
 */
export const documentMask = (ctx: ForwardContext, docs: Tensor, R: number, L: number): Tensor => {
  const { tf } = ctx
  const d = ctx.stop(docs)
  const apart = tf.minimum(tf.abs(tf.sub(tf.reshape(d, [R, 1, L, 1]), tf.reshape(d, [R, 1, 1, L]))), 1)
  return tf.mul(apart, -1e9)
}

/** Attention of `R` rows of `L` positions each: `q [R·L, H, dqk]`, `k [R·L, KV, dqk]`, `v [R·L, KV, dv]`. */
const attendRows = (ctx: ForwardContext, q: Tensor, k: Tensor, v: Tensor, R: number, L: number, options: Masking, documents?: Tensor): Tensor => {
  const { tf } = ctx
  const [, KV, dqk] = k.shape as [number, number, number]
  const dv = v.shape[2]!
  const kt = tf.reshape(tf.transpose(tf.reshape(k, [R, L, KV, dqk]), [0, 2, 3, 1]), [R * KV, dqk, L])
  const v3 = tf.reshape(tf.transpose(tf.reshape(v, [R, L, KV, dv]), [0, 2, 1, 3]), [R * KV, L, dv])
  // causal attention never sees the padding (it follows the real positions of each row)
  return attendCore(ctx, q, kt, { v: v3 }, R, L, L, 0, options, options.causal ? undefined : ctx.stream.valid, documents)
}

/**
 * Scaled dot-product attention of `q [N, H, dqk]`, `k [N, KV, dqk]`, `v [N, KV, dv]` over the rows of
 * the context's layout (each row attends within itself). Returns `[N, H·dv]`.
 *
 * With `ctx.stream.documents` (rows packing several documents), a query attends only to keys of its own
 * document: the block-diagonal mask is made once per pass and stream ({@link documentMask}).
 *
 * While decoding incrementally (`ctx.cache`), the inputs are each row's new positions: their keys
 * and values are appended to the node's KV cache and the queries attend over the whole cache
 * (a decoded row is one document).
 */
export const attend = (ctx: ForwardContext, q: Tensor, k: Tensor, v: Tensor, options: Masking): Tensor2D => {
  const { tf } = ctx
  const rows = ctx.stream.layout
  if (ctx.cache !== undefined) return attendCached(ctx, ctx.cache, q, k, v, options)
  const L0 = rows[0] ?? 0
  const docs = ctx.stream.documents
  const documents = (R: number, L: number, start: number) =>
    docs === undefined ? undefined : ctx.memo(`documents/${R}/${L}/${start}`, () => {
      const all = docs()
      return documentMask(ctx, R * L === all.size ? all : tf.slice(all, [start], [R * L]), R, L)
    })
  if (rows.every((r) => r === L0)) return attendRows(ctx, q, k, v, rows.length, L0, options, documents(rows.length, L0, 0)) as Tensor2D
  return eachRow(ctx, rows, (_, start, L) => {
    const s = (t: Tensor) => tf.slice(t, [start, 0, 0], [L, -1, -1])
    return attendRows(ctx, s(q), s(k), s(v), 1, L, options, documents(1, L, start))
  })
}

/**
 * A ragged batch one row at a time: `f(row, start, count)` for each row with positions (`counts`
 * per row, rows one after the other), the results concatenated in order.
 */
const eachRow = (ctx: ForwardContext, counts: ReadonlyArray<number>, f: (row: number, start: number, count: number) => Tensor): Tensor2D => {
  const parts: Array<Tensor> = []
  let start = 0
  counts.forEach((n, b) => {
    if (n > 0) parts.push(f(b, start, n))
    start += n
  })
  return ctx.tf.concat(parts, 0) as Tensor2D
}

/** {@link attend} while decoding: the new keys and values appended to the node's cache, the queries over all of it. */
const attendCached = (ctx: ForwardContext, cache: DecodeCache, q: Tensor, k: Tensor, v: Tensor, options: Masking): Tensor2D => {
  const { tf } = ctx
  if (!options.causal) throw new Unsupported({ at: ctx.scope, problem: "the attention is not causal (causal: false): it cannot be decoded incrementally" })
  const [N, KV, dqk] = k.shape as [number, number, number]
  const dv = v.shape[2]!
  const counts = ctx.stream.layout
  const R = counts.length
  // keys and values are stored feature-major ([rows, KV·d, capacity]): Kᵀ and Vᵀ need no transpose
  const state = cache.state(ctx.scope, () => ({ k: cache.buffer(R, KV * dqk, "columns"), v: cache.buffer(R, KV * dv, "columns") }))
  const past = [...state.k.lengths]
  state.k.append(tf.reshape(k, [N, KV * dqk]), counts)
  state.v.append(tf.reshape(v, [N, KV * dv]), counts)
  // rows [from, from + count) of the stores, positions [0, len): the whole store when it is exactly that
  const stored = (from: number, count: number, len: number) => {
    const take = (buffer: typeof state.k, d: number) => {
      const all = buffer.store()
      const t = count === R && len === buffer.capacity ? all : tf.slice(all, [from, 0, 0], [count, -1, len])
      return tf.reshape(t, [count * KV, d, len])
    }
    return { kt: take(state.k, dqk), vt: take(state.v, dv) }
  }
  const n0 = counts[0] ?? 0
  if (counts.every((c) => c === n0) && past.every((p) => p === past[0])) {
    const { kt, vt } = stored(0, R, past[0]! + n0)
    return attendStored(ctx, q, kt, vt, R, n0, past[0]! + n0, past[0]!, options) as Tensor2D
  }
  return eachRow(ctx, counts, (b, start, n) => {
    const { kt, vt } = stored(b, 1, past[b]! + n)
    return attendStored(ctx, tf.slice(q, [start, 0, 0], [n, -1, -1]), kt, vt, 1, n, past[b]! + n, past[b]!, options)
  })
}

/** Attention over stored (feature-major) keys and values; frees its intermediates at once. */
const attendStored = (
  ctx: ForwardContext,
  q: Tensor,
  kt: Tensor,
  vt: Tensor,
  R: number,
  n: number,
  len: number,
  past: number,
  options: Masking
): Tensor => ctx.tf.tidy(() => attendCore(ctx, q, kt, { vt }, R, n, len, past, options))
