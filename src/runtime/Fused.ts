/**
 * The makers of fused operations: hot chains of tfjs ops as one kernel each, with the op-by-op
 * maths as the fallback. The kernels are registered by each backend's folder when it loads, under
 * the names of `KernelNames.ts`: WGSL programs for webgpu (`webgpu/Kernels.ts`), where every op is
 * one dispatch (tens of µs of host time) and every JS number operand one buffer upload; JavaScript
 * loops and SIMD code over the heap for wasm (`wasm/Kernels.ts`), only where they beat tfjs's wasm
 * ops. A maker takes the fused route wherever the current backend has the kernel
 * ({@link hasKernel}); the cpu backend runs the same maths op by op. Each kernel is tested against
 * it (tests/webgpu.test.ts, tests/wasm-kernels.test.ts).
 *
 * - `adamw`: the AdamW update of one parameter, three dispatches (first moment, second moment,
 *   weights) instead of about fifteen plus nine scalar uploads; the clipping scale stays a tensor.
 *
 * - `makeRmsNorm`: RMSNorm over the last axis, one dispatch forward (a workgroup per row reduces
 *   Σx² in workgroup memory) and three backward (dx with both row sums in one pass; dg as the row
 *   products, then tfjs's column sum) instead of about 6 and 12.
 *
 * - `makeRotate`: rotary embedding of `[n, heads, hd]` (rotate-half), one dispatch forward and one
 *   backward (the inverse rotation) instead of 4 slices, 6 products and a concat, and their gradients.
 *
 * - `makeActivate`: exact GELU and SiLU (SwiGLU's gate), one dispatch forward and one backward
 *   instead of 5 and about 10 (GELU) or 2 and 5 (SiLU); other activations op by op.
 *
 * - `makeMaskedNll`: the loss's Σ mask·(logsumexp − picked logit) over rows, one row kernel and a sum
 *   forward, one row kernel backward (softmax − one-hot), instead of about 16 and 20.
 *
 * - `makeMaskedSoftmax`: attention's scale, mask and softmax, one row kernel each way instead of
 *   about 3 forward and 6 backward.
 *
 * - `makeSumSquares`: Σ x² over the gradients for the clipping norm, one dispatch per gradient
 *   (a workgroup per chunk of at least 4,096 elements) instead of two, and one concat and sum.
 *
 * - `makeTopMask`: an MoE router's top-k as a 0/1 mask, one dispatch instead of tfjs's sort passes,
 *   a one-hot and a sum.
 *
 * - `makeRepeat`, `makeCombine`: rows repeated for MoE experts or GQA heads (backward: one sum over
 *   the copies instead of a slice and an add per copy) and the MoE dense dispatch's gated combine
 *   (one dispatch forward, two backward, instead of a transpose, a product and a strided reduce).
 *
 * - `makeRoute`, `makeSlots`: the MoE grouped and capacity dispatches' routing tables (a dispatch per
 *   table: a scan per expert numbers its tokens) and their gathers into expert rows and back, and of
 *   each group's expert parameters (biases; the matrices are read in place by
 *   `webgpu/MatMul.ts`'s `makeGroupedMatMul`, which the webgpu backend provides: `Ops.ts`) (one dispatch each way, and one per gradient: every gradient is a
 *   gather, no atomics), instead of a transpose, a cumulative sum's passes, a scatter, a sorted
 *   search, a concatenated zero row and gathers whose gradients scatter with atomics.
 *
 * `CONCEPTMOE_FUSED=off` turns them off (op by op everywhere), to compare or to rule them out.
 *
 * @since 0.3.0
 */
import type * as TF from "@tensorflow/tfjs"
import type { RouteLayout as Layout, Tensor, Tf } from "../graph/Apply.ts"
import { settingsOf } from "./Env.ts"
import { Unsupported } from "../internal/RunErrors.ts"
import { kernels, wasmKernels } from "./KernelNames.ts"

export interface AdamHyper {
  readonly beta1: number
  readonly beta2: number
  readonly eps: number
  /** Bias corrections 1 − β₁ᵗ and 1 − β₂ᵗ. */
  readonly c1: number
  readonly c2: number
  /** The step's learning rate. */
  readonly lr: number
  /** This parameter's multiplier of it (its part's). */
  readonly lrScale: number
  /** Decoupled weight decay (0 for vectors). */
  readonly decay: number
}

/**
 * The values of {@link AdamHyper} that change every step, `[lr, c1, c2]`, as one tensor made once
 * per step: the fused kernels read them from it, so a captured step (`webgpu/Capture.ts`) takes them as a
 * feed instead of compiling them in.
 */
export const adamStepValues = (tf: Tf, h: Pick<AdamHyper, "lr" | "c1" | "c2">): Tensor => tf.tensor1d([h.lr, h.c1, h.c2])

/**
 * One AdamW step of parameter `w` with gradient `g`, scaled by `scale` (a one-element tensor, the
 * clipping factor): m' = β₁m + (1−β₁)·g·s, v' = β₂v + (1−β₂)·(g·s)²,
 * w' = w − lr·lrScale·(m'/c₁ / (√(v'/c₂) + ε) + decay·w). `stepValues` is {@link adamStepValues}
 * (the fused kernels read lr, c1, c2 from it; the op-by-op path uses the numbers in `h`).
 * Returns the new tensors; the caller assigns them.
 */
export const adamw = (
  tf: Tf,
  w: Tensor,
  g: Tensor,
  m: Tensor,
  v: Tensor,
  scale: Tensor,
  h: AdamHyper,
  stepValues: Tensor
): { w: Tensor; m: Tensor; v: Tensor } => {
  if (hasKernel(tf, kernels.w)) {
    const run = (name: string, inputs: Record<string, Tensor>, attrs: Record<string, number>) => runKernel(tf, name, inputs, attrs)
    const m2 = run(kernels.m, { x: m, g, s: scale }, { beta: h.beta1 })
    const v2 = run(kernels.v, { x: v, g, s: scale }, { beta: h.beta2 })
    const w2 = run(kernels.w, { w, m: m2, v: v2, h: stepValues }, { lrScale: h.lrScale, eps: h.eps, decay: h.decay })
    return { w: w2, m: m2, v: v2 }
  }
  if (hasKernel(tf, wasmKernels.adamw)) {
    const [w2, m2, v2] = tf.engine().runKernel(wasmKernels.adamw, { w, g, m, v, s: scale, h: stepValues } as unknown as TF.NamedTensorMap, {
      beta1: h.beta1,
      beta2: h.beta2,
      eps: h.eps,
      lrScale: h.lrScale,
      decay: h.decay
    } as unknown as TF.NamedAttrMap) as unknown as [Tensor, Tensor, Tensor]
    return { w: w2, m: m2, v: v2 }
  }
  const gs = tf.mul(g, scale)
  const m2 = tf.add(tf.mul(m, h.beta1), tf.mul(gs, 1 - h.beta1))
  const v2 = tf.add(tf.mul(v, h.beta2), tf.mul(tf.square(gs), 1 - h.beta2))
  const update = tf.div(tf.div(m2, h.c1), tf.add(tf.sqrt(tf.div(v2, h.c2)), h.eps))
  const step = h.decay > 0 ? tf.add(update, tf.mul(w, h.decay)) : update
  return { w: tf.sub(w, tf.mul(step, h.lr * h.lrScale)), m: m2, v: v2 }
}

/** Runs one of our registered kernels through tfjs (taped, tracked like any op). */
export const runKernel = (tf: Tf, name: string, inputs: Record<string, Tensor>, attrs: Record<string, unknown> = {}): Tensor =>
  tf.engine().runKernel(name, inputs as unknown as TF.NamedTensorMap, attrs as unknown as TF.NamedAttrMap) as Tensor


/**
 * Σ_rows mask·(−log softmax(logits)[label]) of `logits [n, V]`, `labels [n]` int32 and `mask [n]`
 * (a scalar; the gradient flows into the logits only). On webgpu and wasm fused (see the module
 * doc), elsewhere op by op through `oneHot`.
 */
export const makeMaskedNll = (tf: Tf, oneHot: (indices: Tensor, depth: number) => Tensor) => {
  const ops = (logits: Tensor, labels: Tensor, mask: Tensor): Tensor => {
    const picked = tf.sum(tf.mul(tf.logSoftmax(logits), oneHot(labels, logits.shape[1]!)), -1)
    return tf.neg(tf.sum(tf.mul(picked, mask)))
  }
  if (!hasKernel(tf, kernels.nll)) return ops
  const run = (name: string, inputs: Record<string, Tensor>) => runKernel(tf, name, inputs)
  return (logits: Tensor, labels: Tensor, mask: Tensor): Tensor => {
    const f = tf.customGrad(((l: Tensor, save: (ts: Array<Tensor>) => void) => {
      save([l, labels, mask])
      return {
        value: tf.sum(run(kernels.nll, { l, y: labels, m: mask })),
        gradFunc: (dy: Tensor, [sl, sy, sm]: Array<Tensor>) => [run(kernels.nllGrad, { l: sl!, y: sy!, m: sm!, dy: tf.reshape(dy, [1]) })]
      }
    }) as unknown as Parameters<Tf["customGrad"]>[0])
    return f(logits) as Tensor
  }
}

export type Activation = "swiglu" | "silu" | "geglu" | "gelu" | "gelu_tanh" | "relu"

/** An activation (GLU kinds: of the gate). Fused: GELU and SiLU on webgpu, GELU and SiLU's gradient on wasm (see the module doc). */
export const makeActivate = (tf: Tf) => {
  const ops = (x: Tensor, a: Activation): Tensor => {
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
  // a kind is fused where the backend has its gradient kernel; its forward pass runs our kernel
  // where the backend has that too, else op by op (wasm: SiLU's, whose tfjs ops are faster)
  const geluOn = hasKernel(tf, kernels.geluGrad)
  const siluOn = hasKernel(tf, kernels.siluGrad)
  if (!geluOn && !siluOn) return ops
  const run = (name: string, inputs: Record<string, Tensor>) => runKernel(tf, name, inputs)
  const fused = (forward: string, backward: string, kind: Activation) => {
    const value = hasKernel(tf, forward) ? (x: Tensor) => run(forward, { x }) : (x: Tensor) => ops(x, kind)
    return tf.customGrad(((x: Tensor, save: (ts: Array<Tensor>) => void) => {
      save([x])
      return { value: value(x), gradFunc: (dy: Tensor, [sx]: Array<Tensor>) => [run(backward, { x: sx!, dy })] }
    }) as unknown as Parameters<Tf["customGrad"]>[0])
  }
  const gelu = fused(kernels.gelu, kernels.geluGrad, "gelu")
  const silu = fused(kernels.silu, kernels.siluGrad, "silu")
  return (x: Tensor, a: Activation): Tensor =>
    geluOn && (a === "gelu" || a === "geglu") ? gelu(x) as Tensor : siluOn && (a === "silu" || a === "swiglu") ? silu(x) as Tensor : ops(x, a)
}

/**
 * Rotates the first `dim` features of each head of `x [n, heads, hd]` by the angles whose cos and sin
 * are `cos`, `sin [n, 1, dim/2]` (HF's rotate_half convention); features past `dim` pass through. On
 * webgpu and wasm fused (see the module doc), elsewhere op by op.
 */
export const makeRotate = (tf: Tf) => {
  const ops = (x: Tensor, dim: number, cos: Tensor, sin: Tensor): Tensor => {
    const [n, heads, hd] = x.shape as [number, number, number]
    const half = dim / 2
    const x1 = tf.slice(x, [0, 0, 0], [n, heads, half])
    const x2 = tf.slice(x, [0, 0, half], [n, heads, half])
    const r1 = tf.sub(tf.mul(x1, cos), tf.mul(x2, sin))
    const r2 = tf.add(tf.mul(x2, cos), tf.mul(x1, sin))
    return dim === hd ? tf.concat([r1, r2], 2) : tf.concat([r1, r2, tf.slice(x, [0, 0, dim], [n, heads, hd - dim])], 2)
  }
  if (!hasKernel(tf, kernels.rotate)) return ops
  const run = (name: string, x: Tensor, cos: Tensor, sin: Tensor, dim: number) => runKernel(tf, name, { x, c: cos, s: sin }, { dim })
  return (x: Tensor, dim: number, cos: Tensor, sin: Tensor): Tensor => {
    // the kernel reads one table row per position: tables that would broadcast go op by op
    const full = (t: Tensor) => t.rank === 3 && t.shape[0] === x.shape[0] && t.shape[1] === 1 && t.shape[2] === dim / 2
    if (x.rank !== 3 || !full(cos) || !full(sin)) return ops(x, dim, cos, sin)
    // the tables are constants of the positions: no gradient flows into them; saved, so that the
    // backward pass still has them after the forward pass's tensors are freed
    const f = tf.customGrad(((x3: Tensor, save: (ts: Array<Tensor>) => void) => {
      save([cos, sin])
      return {
        value: run(kernels.rotate, x3, cos, sin, dim),
        gradFunc: (dy: Tensor, [c, sn]: Array<Tensor>) => [run(kernels.unrotate, dy, c!, sn!, dim)]
      }
    }) as unknown as Parameters<Tf["customGrad"]>[0])
    return f(x) as Tensor
  }
}

/**
 * `repeat(x [o, ...rest], times)` → `[o, times, ...rest]` (every row of x `times` times: an MoE
 * layer's tokens for each expert, a GQA key/value head for each of its query heads), and the MoE
 * dense dispatch's gated `combine(ys [E, n, d], gates [n, E])` → Σ_e gates[n, e]·ys[e, n, :]. On
 * webgpu the repeat's gradient is one sum over the copies (tfjs's tile gradient is a slice and an
 * add per copy) and the combine is one dispatch forward and two backward (instead of a transpose, a
 * product and a strided reduce); elsewhere op by op.
 */
export const makeRepeat = (tf: Tf) => {
  const ops = (x: Tensor, times: number): Tensor => {
    const [o, ...rest] = x.shape as [number, ...Array<number>]
    const m = rest.reduce((a, b) => a * b, 1)
    return tf.reshape(tf.tile(tf.reshape(x, [o, 1, m]), [1, times, 1]), [o, times, ...rest])
  }
  if (!fusedOn(tf)) return ops
  return (x: Tensor, times: number): Tensor => {
    const f = tf.customGrad(((x2: Tensor) => ({
      value: ops(x2, times),
      gradFunc: (dy: Tensor) => {
        const [o, ...rest] = x2.shape as [number, ...Array<number>]
        const m = rest.reduce((a, b) => a * b, 1)
        return [tf.reshape(runKernel(tf, kernels.sumMiddle, { x: tf.reshape(dy, [o, times, m]) }), x2.shape)]
      }
    })) as unknown as Parameters<Tf["customGrad"]>[0])
    return f(x) as Tensor
  }
}

/** See {@link makeRepeat}. */
export const makeCombine = (tf: Tf) => {
  const ops = (ys: Tensor, gates: Tensor): Tensor => {
    const [E, n] = ys.shape as [number, number, number]
    return tf.sum(tf.mul(ys, tf.reshape(tf.transpose(gates), [E, n, 1])), 0)
  }
  if (!fusedOn(tf)) return ops
  const run = (name: string, inputs: Record<string, Tensor>) => runKernel(tf, name, inputs)
  return (ys: Tensor, gates: Tensor): Tensor => {
    const f = tf.customGrad(((y: Tensor, g: Tensor, save: (ts: Array<Tensor>) => void) => {
      save([y, g])
      return {
        value: run(kernels.combine, { y, g }),
        gradFunc: (dy: Tensor, [sy, sg]: Array<Tensor>) => [run(kernels.combineGradY, { g: sg!, dy }), run(kernels.combineGradG, { y: sy!, dy })]
      }
    }) as unknown as Parameters<Tf["customGrad"]>[0])
    return f(ys, gates) as Tensor
  }
}

export type { RouteLayout as Layout } from "../graph/Apply.ts"

/** Rows of a layout for n tokens routed to k of E experts each (a multiple of T for tiles). */
export const layoutRows = (layout: Layout, n: number, k: number, E: number): number =>
  "capacity" in layout ? E * layout.capacity : layout.rows ?? Math.ceil((n * k + E * (layout.tile - 1)) / layout.tile) * layout.tile

/** The tables hold pairs as float32 whole numbers e·n + i: exact below 2²⁴. */
const checkCodes = (n: number, E: number) => {
  if (n * E > 2 ** 24) {
    throw new Unsupported({
      at: "MoE routing",
      problem: `an MoE layer of ${E} experts over ${n} tokens has more token-expert pairs than float32 numbers them exactly (2^24); use fewer tokens per step or dense dispatch`
    })
  }
}

/**
 * An MoE layer's routing tables for `mask [n, E]` (1 where token i is routed to expert e) and a
 * {@link Layout}, all float32 with whole values and no gradient: `slots [E, n]`, the row of pair
 * (i, e), or −1 where i is not routed to e or e's C rows are full (earlier tokens first);
 * `tokens [rows]`, the pair in each row as e·n + i, or −1 where the row is empty; with tiles also
 * `groups [rows/T]`, each group's expert, in ascending order (the empty groups at the end count as
 * the last expert's: `sumGroups` finds an expert's groups by bisection). On webgpu a column sum of
 * the mask and a dispatch per table (a workgroup per expert numbers its tokens with a scan);
 * elsewhere cumulative sums, a scatter and a sorted search. The tile layout's rows assume at most k
 * experts per token (the top-k mask; only NaN scores, whose loss stops training, break that).
 */
export const makeRoute = (tf: Tf) => {
  const ops = (mask: Tensor, layout: Layout, k: number) => tf.tidy(() => {
    const [n, E] = mask.shape as [number, number]
    checkCodes(n, E)
    const rows = layoutRows(layout, n, k, E)
    const column = tf.transpose(mask)
    const rank = tf.sub(tf.cumsum(column, 1), column)
    // where each expert's rows start, and which pairs fit
    let first: Tensor
    let kept = column
    let groups: Tensor | undefined
    if ("capacity" in layout) {
      first = tf.reshape(tf.mul(tf.range(0, E, 1, "float32"), layout.capacity), [E, 1])
      kept = tf.mul(column, tf.cast(tf.less(rank, layout.capacity), "float32"))
    } else {
      const T = layout.tile
      const padded = tf.mul(tf.ceil(tf.div(tf.sum(column, 1), T)), T)
      const ends = tf.cumsum(padded)
      first = tf.reshape(tf.sub(ends, padded), [E, 1])
      // the expert of group g: how many experts' rows end at or before its first row
      const starts = tf.mul(tf.range(0, rows / T, 1, "float32"), T)
      groups = tf.reshape(tf.cast(tf.minimum(tf.searchSorted(ends, starts, "right"), E - 1), "float32"), [rows / T])
    }
    const slots = tf.sub(tf.mul(tf.add(tf.add(first, rank), 1), kept), 1)
    // each kept pair's code e·n + i into its row (the others into a row past the end)
    const code = tf.add(tf.reshape(tf.mul(tf.range(0, E, 1, "float32"), n), [E, 1]), tf.reshape(tf.range(0, n, 1, "float32"), [1, n]))
    const at = tf.cast(tf.where(tf.greater(kept, 0), slots, tf.fill([E, n], rows)), "int32")
    const filled = tf.scatterND(tf.reshape(at, [E * n, 1]), tf.reshape(tf.mul(tf.add(code, 1), kept), [E * n]), [rows + 1])
    const tokens = tf.sub(tf.slice(filled, [0], [rows]), 1)
    return { slots, tokens, ...(groups === undefined ? {} : { groups }) }
  })
  if (!hasKernel(tf, kernels.routeSlots)) return ops
  return (mask: Tensor, layout: Layout, k: number) => {
    const [n, E] = mask.shape as [number, number]
    checkCodes(n, E)
    const rows = layoutRows(layout, n, k, E)
    const attrs = "capacity" in layout ? { capacity: layout.capacity, tile: 0, rows } : { capacity: 0, tile: layout.tile, rows }
    const inputs = { m: mask, c: tf.sum(mask, 0) }
    return {
      slots: runKernel(tf, kernels.routeSlots, inputs, attrs),
      tokens: tf.reshape(runKernel(tf, kernels.routeTokens, inputs, attrs), [rows]),
      ...("tile" in layout ? { groups: runKernel(tf, kernels.routeGroups, { c: inputs.c }, attrs) } : {})
    }
  }
}

/**
 * `toSlots(x [n, d], tokens [S], slots [E, n])` → `[S, d]`: row s holds the row of x of the pair in
 * it (zeros where empty), the tables of {@link makeRoute}. `fromSlots(ys [S, d], slots, tokens, w
 * [n, E])` → `[n, d]`: Σ_e w[i, e]·ys[slots[e, i]] over the experts that kept token i.
 * Differentiable in x, ys and w. `gatherGroups(w [E, ...], groups [G])` → `[G, ...]`: each group's
 * expert's parameter, differentiable in w. On webgpu each is one gather-like dispatch, and so is
 * each gradient, for no gradient needs a scatter (each table is the other's inverse): dx =
 * fromSlots(dxs, slots, tokens, 1), dys[s] = w[i, e]·dy[i] for the pair (i, e) in row s, dw[i, e] =
 * dy[i]·ys[slots[e, i]], and an expert's parameter gradient sums its groups' in order; no atomics,
 * so the sums are the same run after run. Elsewhere gathers (through a zero row), which tfjs
 * differentiates.
 */
export const makeSlots = (tf: Tf) => {
  const padded = (x: Tensor, index: Tensor) => {
    const [rows, d] = x.shape as [number, number]
    const at = tf.cast(tf.where(tf.less(index, 0), tf.fill(index.shape, rows), index), "int32")
    return tf.gather(tf.concat([x, tf.zeros([1, d])], 0), at)
  }
  const opsTo = (x: Tensor, tokens: Tensor, _slots: Tensor): Tensor => padded(x, tf.where(tf.less(tokens, 0), tokens, tf.mod(tokens, x.shape[0]!)))
  const opsFrom = (ys: Tensor, slots: Tensor, _tokens: Tensor, w: Tensor): Tensor => {
    const [n, E] = w.shape as [number, number]
    const rows = tf.reshape(padded(ys, tf.reshape(tf.transpose(slots), [n * E])), [n, E, ys.shape[1]!])
    return tf.sum(tf.mul(rows, tf.reshape(w, [n, E, 1])), 1)
  }
  const opsGroups = (w: Tensor, groups: Tensor): Tensor => tf.gather(w, tf.cast(groups, "int32"))
  if (!hasKernel(tf, kernels.fromSlots)) return { toSlots: opsTo, fromSlots: opsFrom, gatherGroups: opsGroups }
  const run = (name: string, inputs: Record<string, Tensor>) => runKernel(tf, name, inputs)
  // the tables are saved with the inputs: tfjs frees a pass's other tensors before its backward
  const toSlots = (x: Tensor, tokens: Tensor, slots: Tensor): Tensor => {
    const f = tf.customGrad(((x2: Tensor, save: (ts: Array<Tensor>) => void) => {
      save([slots])
      return {
        value: run(kernels.toSlots, { x: x2, t: tokens }),
        gradFunc: (dxs: Tensor, [sp]: Array<Tensor>) => [run(kernels.fromSlots, { y: dxs, p: sp!, w: tf.fill([x2.shape[0]!, sp!.shape[0]!], 1) })]
      }
    }) as unknown as Parameters<Tf["customGrad"]>[0])
    return f(x) as Tensor
  }
  const fromSlots = (ys: Tensor, slots: Tensor, tokens: Tensor, w: Tensor): Tensor => {
    const f = tf.customGrad(((y: Tensor, w2: Tensor, save: (ts: Array<Tensor>) => void) => {
      save([y, w2, slots, tokens])
      return {
        value: run(kernels.fromSlots, { y, p: slots, w: w2 }),
        gradFunc: (dy: Tensor, [sy, sw, sp, st]: Array<Tensor>) => [
          run(kernels.toSlotsWeighted, { x: dy, t: st!, w: sw! }),
          run(kernels.fromSlotsGradW, { y: sy!, p: sp!, dy })
        ]
      }
    }) as unknown as Parameters<Tf["customGrad"]>[0])
    return f(ys, w) as Tensor
  }
  const gatherGroups = (w: Tensor, groups: Tensor): Tensor => {
    const [E, ...rest] = w.shape as [number, ...Array<number>]
    const size = rest.reduce((a, b) => a * b, 1)
    const f = tf.customGrad(((w2: Tensor, save: (ts: Array<Tensor>) => void) => {
      save([groups])
      return {
        value: opsGroups(w2, groups),
        gradFunc: (dg: Tensor, [sg]: Array<Tensor>) => [tf.reshape(runKernel(tf, kernels.sumGroups, { x: tf.reshape(dg, [sg!.shape[0]!, size]), q: sg! }, { experts: E }), w2.shape)]
      }
    }) as unknown as Parameters<Tf["customGrad"]>[0])
    return f(w) as Tensor
  }
  return { toSlots, fromSlots, gatherGroups }
}

/**
 * `topMask(scores [n, E], k)`: 1 where a score is among the k largest of its row (ties to the lower
 * index, as tfjs's top-k), 0 elsewhere; no gradient (a routing decision). On webgpu one dispatch
 * (each element counts the row's larger ones) instead of tfjs's top-k sort passes, a one-hot and a
 * sum; elsewhere through `topk` and `oneHot`.
 */
export const makeTopMask = (tf: Tf, oneHot: (indices: Tensor, depth: number) => Tensor) => {
  const ops = (scores: Tensor, k: number): Tensor => {
    const [n, E] = scores.shape as [number, number]
    return tf.sum(tf.reshape(oneHot(tf.reshape(tf.topk(scores, k).indices, [n * k]), E), [n, k, E]), 1)
  }
  if (!hasKernel(tf, kernels.topMask)) return ops
  return (scores: Tensor, k: number): Tensor => runKernel(tf, kernels.topMask, { p: scores }, { k })
}

/**
 * Σ x² over all the elements of some tensors (a scalar), for gradient clipping's global norm. On
 * webgpu one dispatch per tensor, whose elements are cut into {@link sumChunks} equal chunks of
 * at least 4,096, a workgroup each (a [2048, 512] gradient: 256 workgroups, where a single one
 * would use one of a GPU's compute units for its million elements); then the chunks' sums of all
 * the tensors, concatenated, are summed. Elsewhere op by op.
 */
export const makeSumSquares = (tf: Tf) => {
  if (hasKernel(tf, wasmKernels.sumSquares)) {
    return (xs: ReadonlyArray<Tensor>): Tensor => runKernel(tf, wasmKernels.sumSquares, Object.fromEntries(xs.map((x, i) => [`x${i}`, x])))
  }
  if (!hasKernel(tf, kernels.sumSquares)) return (xs: ReadonlyArray<Tensor>): Tensor => tf.addN(xs.map((x) => tf.sum(tf.square(x))))
  const chunks = (x: Tensor): Tensor => {
    const n = sumChunks(x.size)
    return tf.reshape(runKernel(tf, kernels.sumSquares, { x: tf.reshape(x, [n, x.size / n]) }), [n])
  }
  return (xs: ReadonlyArray<Tensor>): Tensor => tf.sum(xs.length === 1 ? chunks(xs[0]!) : tf.concat(xs.map(chunks)))
}

/** Equal chunks of a tensor of `size` elements to sum in parallel: at most 1,024, of at least 4,096 elements (1 for fewer than 8,192). */
export const sumChunks = (size: number): number => {
  let n = Math.max(1, Math.min(1024, Math.floor(size / 4096)))
  while (size % n !== 0) n--
  return n
}

/**
 * Attention's probabilities: softmax over the last axis of `scores [..., n, len]·scale + mask
 * [n, len]` (the mask broadcast over the leading axes; no gradient into it). On webgpu and wasm one
 * row kernel forward and one backward (dS = scale·P·(dP − Σ dP·P)) instead of a product, a sum,
 * tfjs's softmax and its four-op gradient; elsewhere op by op. `causal`: a promise that the maps
 * are square and the mask is −1e9 above each diagonal, so that a kernel may stop each row there
 * (wasm's do: `wasm/Simd.ts`).
 */
export const makeMaskedSoftmax = (tf: Tf) => {
  const ops = (scores: Tensor, scale: number, mask: Tensor): Tensor => tf.softmax(tf.add(tf.mul(scores, scale), mask))
  // fused where the backend has the gradient kernel; the forward pass our kernel where it has that
  // too, else op by op
  if (!hasKernel(tf, kernels.softmaxGrad)) return ops
  const forward = hasKernel(tf, kernels.softmax)
  return (scores: Tensor, scale: number, mask: Tensor, causal = false): Tensor => {
    const len = scores.shape[scores.rank - 1]!
    const rows = scores.size / len
    const attrs = causal && scores.shape[scores.rank - 2] === len ? { scale, mapRows: len } : { scale }
    const run = (name: string, inputs: Record<string, Tensor>) => runKernel(tf, name, inputs, attrs)
    const f = tf.customGrad(((s2: Tensor, save: (ts: Array<Tensor>) => void) => {
      const value = forward ? run(kernels.softmax, { s: s2, m: mask }) : tf.reshape(ops(tf.reshape(s2, scores.shape), scale, mask), [rows, len])
      save([value])
      return { value, gradFunc: (dp: Tensor, [pr]: Array<Tensor>) => [run(kernels.softmaxGrad, { p: pr!, dp })] }
    }) as unknown as Parameters<Tf["customGrad"]>[0])
    return tf.reshape(f(tf.reshape(scores, [rows, len])) as Tensor, scores.shape)
  }
}

/** Whether our fused kernels run: on webgpu, unless `CONCEPTMOE_FUSED=off` (registers them once). */
export const fusedOn = (tf: Tf): boolean => tf.getBackend() === "webgpu" && hasKernel(tf, kernels.w)

/** Whether our wasm kernels run: on wasm, unless `CONCEPTMOE_FUSED=off` (see `wasm/Kernels.ts`). */
export const wasmFused = (tf: Tf): boolean => tf.getBackend() === "wasm" && hasKernel(tf, kernels.norm)

/**
 * Whether our kernel `name` runs on the current backend: ours are on (unless `CONCEPTMOE_FUSED=off`)
 * and the backend registered this one when it loaded (`Backend.load`; wasm has only those that beat
 * its op-by-op route). The makers take one route on every backend.
 */
export const hasKernel = (tf: Tf, name: string): boolean => settingsOf(tf).fused && tf.getKernel(name, tf.getBackend()) !== undefined

/**
 * RMSNorm of `x [..., d]` with weight `g [d]`: x·g / √(mean(x²) + eps) over the last axis. On webgpu
 * and wasm fused (see the module doc), elsewhere op by op.
 */
export const makeRmsNorm = (tf: Tf) => {
  const ops = (x: Tensor, g: Tensor, eps: number) => tf.mul(tf.mul(x, tf.rsqrt(tf.add(tf.mean(tf.mul(x, x), -1, true), eps))), g)
  if (!hasKernel(tf, kernels.norm)) return ops
  const run = (name: string, inputs: Record<string, Tensor>, eps: number) => runKernel(tf, name, inputs, { eps })
  // wasm: both gradients in one kernel (dg summed over the rows inside it)
  const both = hasKernel(tf, wasmKernels.normGrad)
  return (x: Tensor, g: Tensor, eps: number): Tensor => {
    const d = x.shape[x.rank - 1]!
    const rows = x.size / d
    const f = tf.customGrad(((x2: Tensor, g1: Tensor, save: (ts: Array<Tensor>) => void) => {
      save([x2, g1])
      return {
        value: run(kernels.norm, { x: x2, g: g1 }, eps),
        gradFunc: (dy: Tensor, [sx, sg]: Array<Tensor>) =>
          both
            ? tf.engine().runKernel(wasmKernels.normGrad, { x: sx!, g: sg!, dy } as unknown as TF.NamedTensorMap, { eps } as unknown as TF.NamedAttrMap) as unknown as Array<Tensor>
            : [run(kernels.normDx, { x: sx!, g: sg!, dy }, eps), tf.sum(run(kernels.normDg, { x: sx!, dy }, eps), 0)]
      }
    }) as unknown as Parameters<Tf["customGrad"]>[0])
    return tf.reshape(f(tf.reshape(x, [rows, d]), g) as Tensor, x.shape)
  }
}

