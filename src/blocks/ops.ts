/**
 * Tensor routines shared by block applies. Everything goes through the context's tfjs namespace.
 *
 * @since 0.1.0
 */
import type { ForwardContext, Tensor, Tensor2D } from "../graph/Apply.ts"
import type { Activation } from "./MLP.ts"

/** x·W (+ b), counted as a weight product. */
export const linear = (ctx: ForwardContext, x: Tensor, w: Tensor, b?: Tensor): Tensor2D => {
  const y = ctx.matMul(x, w, "weights")
  return (b === undefined ? y : ctx.tf.add(y, b)) as Tensor2D
}

export const rmsNorm = (ctx: ForwardContext, x: Tensor, g: Tensor, eps: number): Tensor2D => {
  const { tf } = ctx
  const ms = tf.mean(tf.mul(x, x), -1, true)
  return tf.mul(tf.mul(x, tf.rsqrt(tf.add(ms, eps))), g) as Tensor2D
}

export const layerNorm = (ctx: ForwardContext, x: Tensor, g: Tensor, b: Tensor | undefined, eps: number): Tensor2D => {
  const { tf } = ctx
  const { mean, variance } = tf.moments(x, -1, true)
  const y = tf.mul(tf.mul(tf.sub(x, mean), tf.rsqrt(tf.add(variance, eps))), g)
  return (b === undefined ? y : tf.add(y, b)) as Tensor2D
}

export const activate = (ctx: ForwardContext, x: Tensor, a: Activation): Tensor => {
  const { tf } = ctx
  switch (a) {
    case "swiglu":
    case "silu":
      return tf.mul(x, tf.sigmoid(x))
    case "geglu":
    case "gelu":
      // exact GELU: x·Φ(x)
      return tf.mul(tf.mul(x, 0.5), tf.add(tf.erf(tf.mul(x, Math.SQRT1_2)), 1))
    case "gelu_tanh": {
      const inner = tf.mul(tf.add(x, tf.mul(tf.mul(tf.mul(x, x), x), 0.044715)), Math.sqrt(2 / Math.PI))
      return tf.mul(tf.mul(x, 0.5), tf.add(tf.tanh(inner), 1))
    }
    case "relu":
      return tf.relu(x)
  }
}

/** A feed-forward network with the parameter names of `ffnParams`. */
export const ffn = (
  ctx: ForwardContext,
  x: Tensor,
  p: (name: string) => Tensor | undefined,
  activation: Activation
): Tensor2D => {
  const { tf } = ctx
  const gate = p("gate.weight")
  const up = linear(ctx, x, p("up.weight")!, p("up.bias"))
  const hidden = gate === undefined
    ? activate(ctx, up, activation)
    : tf.mul(activate(ctx, linear(ctx, x, gate, p("gate.bias")), activation), up)
  return linear(ctx, hidden, p("down.weight")!, p("down.bias"))
}

/** cos and sin tables `[N, 1, dim/2]` for the context's positions (HF `rotate_half` convention). */
export const ropeTables = (ctx: ForwardContext, dim: number, base: number) => {
  const half = dim / 2
  const n = ctx.positions.length
  const cos = new Float32Array(n * half)
  const sin = new Float32Array(n * half)
  for (let i = 0; i < n; i++) {
    for (let j = 0; j < half; j++) {
      const angle = ctx.positions[i]! * base ** (-(2 * j) / dim)
      cos[i * half + j] = Math.cos(angle)
      sin[i * half + j] = Math.sin(angle)
    }
  }
  return { cos: ctx.tf.tensor3d(cos, [n, 1, half]), sin: ctx.tf.tensor3d(sin, [n, 1, half]) }
}

/** Rotates the first `dim` features of each head of `x [N, heads, hd]`. */
export const applyRope = (ctx: ForwardContext, x: Tensor, dim: number, tables: { cos: Tensor; sin: Tensor }): Tensor => {
  const { tf } = ctx
  const [n, heads, hd] = x.shape as [number, number, number]
  const half = dim / 2
  const x1 = tf.slice(x, [0, 0, 0], [n, heads, half])
  const x2 = tf.slice(x, [0, 0, half], [n, heads, half])
  const r1 = tf.sub(tf.mul(x1, tables.cos), tf.mul(x2, tables.sin))
  const r2 = tf.add(tf.mul(x2, tables.cos), tf.mul(x1, tables.sin))
  return dim === hd ? tf.concat([r1, r2], 2) : tf.concat([r1, r2, tf.slice(x, [0, 0, dim], [n, heads, hd - dim])], 2)
}

const maskCache = new Map<string, Float32Array>()

/** Additive causal (and sliding-window) mask `[L, L]`: 0 where a query may attend, −1e9 elsewhere. */
const mask = (L: number, causal: boolean, window: number | null): Float32Array => {
  const key = `${L}/${causal}/${window}`
  let m = maskCache.get(key)
  if (m === undefined) {
    m = new Float32Array(L * L)
    for (let i = 0; i < L; i++) {
      for (let j = 0; j < L; j++) {
        const ok = (!causal || j <= i) && (window === null || (causal ? i - j < window : Math.abs(i - j) < window))
        m[i * L + j] = ok ? 0 : -1e9
      }
    }
    maskCache.set(key, m)
  }
  return m
}

/**
 * Scaled dot-product attention of `q [N, H, dqk]`, `k [N, KV, dqk]`, `v [N, KV, dv]` over the rows of
 * the context's layout (each row attends within itself). Returns `[N, H·dv]`.
 */
export const attend = (
  ctx: ForwardContext,
  q: Tensor,
  k: Tensor,
  v: Tensor,
  options: { readonly causal: boolean; readonly window: number | null }
): Tensor2D => {
  const { tf } = ctx
  const [, H, dqk] = q.shape as [number, number, number]
  const [, KV, dv] = v.shape as [number, number, number]
  const group = H / KV
  const rows = ctx.layout
  const block = (qs: Tensor, ks: Tensor, vs: Tensor, R: number, L: number): Tensor => {
    // [R·L, heads, d] → [R, heads, L, d]
    const q4 = tf.transpose(tf.reshape(qs, [R, L, H, dqk]), [0, 2, 1, 3])
    const expand = (t: Tensor, d: number) => {
      const t4 = tf.transpose(tf.reshape(t, [R, L, KV, d]), [0, 2, 1, 3])
      // repeat each KV head for its group of query heads (rank-4 tile: tfjs has no rank-5 tile gradient)
      return group === 1 ? t4 : tf.reshape(tf.tile(tf.reshape(t4, [R, KV, 1, L * d]), [1, 1, group, 1]), [R, H, L, d])
    }
    const k4 = expand(ks, dqk)
    const v4 = expand(vs, dv)
    const scores = tf.mul(ctx.matMul(tf.reshape(q4, [R * H, L, dqk]), tf.transpose(tf.reshape(k4, [R * H, L, dqk]), [0, 2, 1]), "attentionMap"), 1 / Math.sqrt(dqk))
    const masked = tf.add(scores, tf.tensor2d(mask(L, options.causal, options.window), [L, L]))
    const out = ctx.matMul(tf.softmax(masked), tf.reshape(v4, [R * H, L, dv]), "attentionMap")
    return tf.reshape(tf.transpose(tf.reshape(out, [R, H, L, dv]), [0, 2, 1, 3]), [R * L, H * dv])
  }
  const L0 = rows[0] ?? 0
  if (rows.every((r) => r === L0)) return block(q, k, v, rows.length, L0) as Tensor2D
  const parts: Array<Tensor> = []
  let start = 0
  for (const L of rows) {
    if (L > 0) {
      const s = (t: Tensor) => tf.slice(t, [start, 0, 0], [L, -1, -1])
      parts.push(block(s(q), s(k), s(v), 1, L))
    }
    start += L
  }
  return tf.concat(parts, 0) as Tensor2D
}
