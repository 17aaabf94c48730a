/**
 * Fused kernels: hot chains of elementwise ops written as one WGSL program each and registered with
 * tfjs for the webgpu backend, where every op is one dispatch (tens of µs of host time) and every JS
 * number operand one buffer upload. Some are also JavaScript loops over the wasm backend's heap,
 * under the same names, where they beat tfjs's wasm ops (see {@link wasmFused}); the makers below
 * take the fused route wherever the backend has the kernel. The cpu backend runs the same maths op
 * by op. Each kernel is tested against it (tests/webgpu.test.ts, tests/wasm-kernels.test.ts).
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
 *   `MatMul.makeGroupedMatMul`) (one dispatch each way, and one per gradient: every gradient is a
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
import { makeAdamW } from "./wasm/AdamW.ts"
import { makeSimd } from "./wasm/Simd.ts"
import { registerWasmMoe } from "./wasm/Moe.ts"

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
 * per step: the fused kernels read them from it, so a captured step (`Capture.ts`) takes them as a
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
  if (tf.getBackend() === "webgpu" && settingsOf(tf).fused && registerWebGpu(tf)) {
    const run = (name: string, inputs: Record<string, Tensor>, attrs: Record<string, number>) => runKernel(tf, name, inputs, attrs)
    const m2 = run(kernels.m, { x: m, g, s: scale }, { beta: h.beta1 })
    const v2 = run(kernels.v, { x: v, g, s: scale }, { beta: h.beta2 })
    const w2 = run(kernels.w, { w, m: m2, v: v2, h: stepValues }, { lrScale: h.lrScale, eps: h.eps, decay: h.decay })
    return { w: w2, m: m2, v: v2 }
  }
  if (wasmFused(tf)) {
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

const kernels = {
  m: "ConceptmoeAdamFirstMoment",
  v: "ConceptmoeAdamSecondMoment",
  w: "ConceptmoeAdamWeights",
  norm: "ConceptmoeRmsNorm",
  normDx: "ConceptmoeRmsNormGradX",
  normDg: "ConceptmoeRmsNormGradRows",
  rotate: "ConceptmoeRotate",
  unrotate: "ConceptmoeRotateBack",
  gelu: "ConceptmoeGelu",
  geluGrad: "ConceptmoeGeluGrad",
  silu: "ConceptmoeSilu",
  siluGrad: "ConceptmoeSiluGrad",
  nll: "ConceptmoeMaskedNll",
  nllGrad: "ConceptmoeMaskedNllGrad",
  sumMiddle: "ConceptmoeSumMiddle",
  topMask: "ConceptmoeTopMask",
  sumSquares: "ConceptmoeSumSquares",
  softmax: "ConceptmoeMaskedSoftmax",
  softmaxGrad: "ConceptmoeMaskedSoftmaxGrad",
  combine: "ConceptmoeCombine",
  combineGradY: "ConceptmoeCombineGradY",
  combineGradG: "ConceptmoeCombineGradG",
  routeSlots: "ConceptmoeRouteSlots",
  routeTokens: "ConceptmoeRouteTokens",
  toSlots: "ConceptmoeToSlots",
  toSlotsWeighted: "ConceptmoeToSlotsWeighted",
  fromSlots: "ConceptmoeFromSlots",
  fromSlotsGradW: "ConceptmoeFromSlotsGradW",
  routeGroups: "ConceptmoeRouteGroups",
  sumGroups: "ConceptmoeSumGroups"
} as const

/**
 * Σ_rows mask·(−log softmax(logits)[label]) of `logits [n, V]`, `labels [n]` int32 and `mask [n]`
 * (a scalar; the gradient flows into the logits only). On webgpu and wasm fused (see the module
 * doc and {@link wasmFused}), elsewhere op by op through `oneHot`.
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

/** An activation (GLU kinds: of the gate). Fused: GELU on webgpu and wasm, SiLU on webgpu (see the module doc and {@link wasmFused}). */
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
  if (wasmFused(tf)) {
    return (xs: ReadonlyArray<Tensor>): Tensor => runKernel(tf, wasmKernels.sumSquares, Object.fromEntries(xs.map((x, i) => [`x${i}`, x])))
  }
  if (!fusedOn(tf)) return (xs: ReadonlyArray<Tensor>): Tensor => tf.addN(xs.map((x) => tf.sum(tf.square(x))))
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
 * [n, len]` (the mask broadcast over the leading axes; no gradient into it). On webgpu one row
 * kernel forward and one backward (dS = scale·P·(dP − Σ dP·P)) instead of a product, a sum, tfjs's
 * softmax and its four-op gradient; elsewhere op by op.
 */
export const makeMaskedSoftmax = (tf: Tf) => {
  const ops = (scores: Tensor, scale: number, mask: Tensor): Tensor => tf.softmax(tf.add(tf.mul(scores, scale), mask))
  // fused where the backend has the gradient kernel; the forward pass our kernel where it has that
  // too, else op by op (wasm: tfjs's softmax is faster than ours)
  if (!hasKernel(tf, kernels.softmaxGrad)) return ops
  const run = (name: string, inputs: Record<string, Tensor>, scale: number) => runKernel(tf, name, inputs, { scale })
  const forward = hasKernel(tf, kernels.softmax)
  return (scores: Tensor, scale: number, mask: Tensor): Tensor => {
    const len = scores.shape[scores.rank - 1]!
    const rows = scores.size / len
    const f = tf.customGrad(((s2: Tensor, save: (ts: Array<Tensor>) => void) => {
      const value = forward ? run(kernels.softmax, { s: s2, m: mask }, scale) : tf.reshape(ops(tf.reshape(s2, scores.shape), scale, mask), [rows, len])
      save([value])
      return { value, gradFunc: (dp: Tensor, [pr]: Array<Tensor>) => [run(kernels.softmaxGrad, { p: pr!, dp }, scale)] }
    }) as unknown as Parameters<Tf["customGrad"]>[0])
    return tf.reshape(f(tf.reshape(scores, [rows, len])) as Tensor, scores.shape)
  }
}

/** Whether our fused kernels run: on webgpu, unless `CONCEPTMOE_FUSED=off` (registers them once). */
export const fusedOn = (tf: Tf) => tf.getBackend() === "webgpu" && settingsOf(tf).fused && registerWebGpu(tf)

/**
 * Whether our kernel `name` runs on the current backend: ours are on ({@link fusedOn},
 * {@link wasmFused}) and the backend has this one (wasm has only those that beat its op-by-op route).
 * The makers that use it take one route on both backends.
 */
const hasKernel = (tf: Tf, name: string): boolean => (fusedOn(tf) || wasmFused(tf)) && tf.getKernel(name, tf.getBackend()) !== undefined

/**
 * RMSNorm of `x [..., d]` with weight `g [d]`: x·g / √(mean(x²) + eps) over the last axis. On webgpu
 * and wasm fused (see the module doc), elsewhere op by op.
 */
export const makeRmsNorm = (tf: Tf) => {
  const ops = (x: Tensor, g: Tensor, eps: number) => tf.mul(tf.mul(x, tf.rsqrt(tf.add(tf.mean(tf.mul(x, x), -1, true), eps))), g)
  if (!hasKernel(tf, kernels.norm)) return ops
  const run = (name: string, inputs: Record<string, Tensor>, eps: number) => runKernel(tf, name, inputs, { eps })
  return (x: Tensor, g: Tensor, eps: number): Tensor => {
    const d = x.shape[x.rank - 1]!
    const rows = x.size / d
    const f = tf.customGrad(((x2: Tensor, g1: Tensor, save: (ts: Array<Tensor>) => void) => {
      save([x2, g1])
      return {
        value: run(kernels.norm, { x: x2, g: g1 }, eps),
        gradFunc: (dy: Tensor, [sx, sg]: Array<Tensor>) => [
          run(kernels.normDx, { x: sx!, g: sg!, dy }, eps),
          tf.sum(run(kernels.normDg, { x: sx!, dy }, eps), 0)
        ]
      }
    }) as unknown as Parameters<Tf["customGrad"]>[0])
    return tf.reshape(f(tf.reshape(x, [rows, d]), g) as Tensor, x.shape)
  }
}

/**
 * Whether our wasm kernels run: on wasm, unless `CONCEPTMOE_FUSED=off` (registers them once). They
 * are JavaScript loops over the wasm heap, one tfjs kernel each where op by op takes many, kept
 * only where they beat tfjs's ops at a training step's shapes (`node bench/wasm-elementwise.ts`,
 * which times both in one process). tfjs's wasm elementwise ops run SIMD (a product by a scalar
 * over [1024, 512] takes about 0.3 ms, a scalar JavaScript loop about 0.7 ms), so a JavaScript kernel
 * wins by replacing several ops, or slow ones, not by its arithmetic:
 *
 * - AdamW, the clipping's Σx², RMSNorm and the rotary embedding: plain arithmetic replacing many ops.
 * - The masked cross-entropy (`makeMaskedNll`), forward and backward: one pass per row instead of
 *   tfjs's log-softmax and the one-hot (whose broadcast Equal alone costs about 17 ms at [1024, 256]);
 *   about 11× faster forward, 6× forward + backward at logits [1024, 256].
 * - Exact GELU, forward and backward: one exp and the erf polynomial per element instead of tfjs's
 *   Erf (not SIMD), Exp and about 8 SIMD ops; about 1.35× forward and forward + backward at
 *   [1024, 512].
 * - The MoE layer's routing and slots (`makeTopMask`, `makeRoute`, `makeSlots`): src/runtime/wasm/Moe.ts.
 *
 * The loss and GELU together save about 30 ms of a 2-layer d128 model's 210 ms training step (the
 * script's last line).
 * Not here, measured slower (the script registers them as candidates): SiLU (about 0.2× forward,
 * 0.4× forward + backward: tfjs's Sigmoid and Mul are SIMD) and attention's masked softmax (0.3×,
 * 0.5×: tfjs's Softmax is one SIMD kernel). The exps use {@link expNonPositive}, about twice as fast
 * as `Math.exp`. Each kernel is tested against the cpu backend's ops (tests/wasm-kernels.test.ts).
 */
export const wasmFused = (tf: Tf): boolean => tf.getBackend() === "wasm" && settingsOf(tf).fused && registerWasm(tf)

const wasmKernels = { adamw: "ConceptmoeAdamW", sumSquares: "ConceptmoeSumSquaresAll" } as const

/** The parts of tfjs-backend-wasm's backend that our kernels use. */
interface WasmBackend {
  makeOutput: (shape: Array<number>, dtype: string) => TF.TensorInfo
  typedArrayFromHeap: (t: TF.TensorInfo) => Float32Array | Int32Array
}

let wasmRegistered: boolean | undefined

/** Registers the wasm kernels once; false if the backend lacks the heap interface. */
const registerWasm = (tf: Tf): boolean => {
  if (wasmRegistered !== undefined) return wasmRegistered
  const backend = tf.backend() as unknown as Partial<WasmBackend>
  wasmRegistered = typeof backend.makeOutput === "function" && typeof backend.typedArrayFromHeap === "function"
  if (!wasmRegistered) return false
  /**
   * Registers `kernelName` for wasm: `outputs(shapes)` gives the output shapes (float32), and `run`
   * fills them from views of the inputs (taken after every output is allocated: an allocation may
   * grow the heap and detach earlier views).
   */
  const register = (
    kernelName: string,
    outputs: (shapes: Array<Array<number>>) => Array<Array<number>>,
    run: (xs: Array<Float32Array | Int32Array>, outs: Array<Float32Array>, shapes: Array<Array<number>>, attrs: Record<string, number>) => void
  ) =>
    tf.registerKernel({
      kernelName,
      backendName: "wasm",
      kernelFunc: ({ inputs, backend: b, attrs }) => {
        const wasm = b as unknown as WasmBackend
        const given = Object.values(inputs) as Array<TF.TensorInfo>
        const shapes = given.map((t) => [...t.shape])
        const made = outputs(shapes).map((shape) => wasm.makeOutput(shape, "float32"))
        run(given.map((t) => wasm.typedArrayFromHeap(t)), made.map((t) => wasm.typedArrayFromHeap(t) as Float32Array), shapes, attrs as unknown as Record<string, number>)
        return made.length === 1 ? made[0]! : made
      }
    })
  // inputs arrive in the order the call site names them
  register(kernels.norm, (sh) => [sh[0]!], ([x, g], [y], [shape], a) => {
    const d = shape![1]!
    for (let base = 0; base < x!.length; base += d) {
      let sa = 0
      for (let c = 0; c < d; c++) sa += x![base + c]! * x![base + c]!
      const r = 1 / Math.sqrt(sa / d + a["eps"]!)
      for (let c = 0; c < d; c++) y![base + c] = x![base + c]! * r * g![c]!
    }
  })
  // dx = r·g·dy − x·r³·Σ(dy·g·x)/d
  register(kernels.normDx, (sh) => [sh[0]!], ([x, g, dy], [dx], [shape], a) => {
    const d = shape![1]!
    for (let base = 0; base < x!.length; base += d) {
      let sa = 0
      let sb = 0
      for (let c = 0; c < d; c++) {
        const v = x![base + c]!
        sa += v * v
        sb += dy![base + c]! * g![c]! * v
      }
      const r = 1 / Math.sqrt(sa / d + a["eps"]!)
      const k = (r * r * r * sb) / d
      for (let c = 0; c < d; c++) dx![base + c] = r * g![c]! * dy![base + c]! - x![base + c]! * k
    }
  })
  // per row dy·x·r (the caller sums the rows)
  register(kernels.normDg, (sh) => [sh[0]!], ([x, dy], [out], [shape], a) => {
    const d = shape![1]!
    for (let base = 0; base < x!.length; base += d) {
      let sa = 0
      for (let c = 0; c < d; c++) sa += x![base + c]! * x![base + c]!
      const r = 1 / Math.sqrt(sa / d + a["eps"]!)
      for (let c = 0; c < d; c++) out![base + c] = dy![base + c]! * x![base + c]! * r
    }
  })
  // rotate-half of x [n, heads, hd] with tables [n, 1, dim/2]; back: the inverse rotation
  const rotation = (back: boolean) => (xs: Array<Float32Array | Int32Array>, outs: Array<Float32Array>, shapes: Array<Array<number>>, a: Record<string, number>) => {
    const [x, c, sn] = xs as [Float32Array, Float32Array, Float32Array]
    const y = outs[0]!
    const [n, heads, hd] = shapes[0] as [number, number, number]
    const dim = a["dim"]!
    const half = dim / 2
    const sign = back ? -1 : 1
    y.set(x)
    for (let t = 0; t < n; t++) {
      for (let h = 0; h < heads; h++) {
        const base = (t * heads + h) * hd
        for (let f = 0; f < half; f++) {
          const cs = c[t * half + f]!
          const sg = sign * sn[t * half + f]!
          const x1 = x[base + f]!
          const x2 = x[base + f + half]!
          y[base + f] = x1 * cs - x2 * sg
          y[base + f + half] = x2 * cs + x1 * sg
        }
      }
    }
  }
  register(kernels.rotate, (sh) => [sh[0]!], rotation(false))
  register(kernels.unrotate, (sh) => [sh[0]!], rotation(true))
  // AdamW of one parameter: the three outputs w', m', v' (see `adamw`); h = [lr, c1, c2], s = the
  // clipping factor; in SIMD over the heap (wasm/AdamW.ts) where the engine has it
  const memory = (tf.backend() as unknown as { wasm?: { asm?: { memory?: WebAssembly.Memory } } }).wasm?.asm?.memory
  const simdAdamW = memory === undefined ? undefined : makeAdamW(memory)
  register(wasmKernels.adamw, (sh) => [sh[0]!, sh[0]!, sh[0]!], ([w, g, m, v, s, h], [w2, m2, v2], _, a) => {
    const [lr, c1, c2] = [h![0]!, h![1]!, h![2]!]
    const scalars = { scale: s![0]!, beta1: a["beta1"]!, beta2: a["beta2"]!, eps: a["eps"]!, decay: a["decay"]!, rate: lr * a["lrScale"]!, c1, c2 }
    if (simdAdamW !== undefined) return simdAdamW(w as Float32Array, g as Float32Array, m as Float32Array, v as Float32Array, [w2!, m2!, v2!], scalars)
    const { beta1: b1, beta2: b2, eps, decay, rate, scale } = scalars
    for (let i = 0; i < w!.length; i++) {
      const gs = g![i]! * scale
      const mi = b1 * m![i]! + (1 - b1) * gs
      const vi = b2 * v![i]! + (1 - b2) * gs * gs
      m2![i] = mi
      v2![i] = vi
      const wi = w![i]!
      w2![i] = wi - rate * (mi / c1 / (Math.sqrt(vi / c2) + eps) + decay * wi)
    }
  })
  // Σ x² over all the inputs, one scalar (summed in double precision)
  register(wasmKernels.sumSquares, () => [[]], (xs, [out]) => {
    let total = 0
    for (const x of xs) for (let i = 0; i < x.length; i++) total += x[i]! * x[i]!
    out![0] = total
  })
  // the loss per row (makeMaskedNll): mask·(log Σ exp − the label's logit); a label outside [0, V)
  // contributes nothing, as with the one-hot of the op-by-op path. The labels are int32.
  register(kernels.nll, (sh) => [[sh[0]![0]!, 1]], ([l, y, m], [out], [shape]) => {
    const V = shape![1]!
    for (let row = 0, base = 0; base < l!.length; row++, base += V) {
      const label = y![row]!
      out![row] = label >= 0 && label < V ? m![row]! * (logSumExp(l!, base, V) - l![base + label]!) : 0
    }
  })
  // its gradient: (softmax − one-hot)·mask·dy per row
  register(kernels.nllGrad, (sh) => [sh[0]!], ([l, y, m, dy], [g], [shape]) => {
    const V = shape![1]!
    for (let row = 0, base = 0; base < l!.length; row++, base += V) {
      const label = y![row]!
      const valid = label >= 0 && label < V
      const scale = valid ? m![row]! * dy![0]! : 0
      // e^(l − max) into the gradient first, then scaled by mask·dy / Σ (one exp per element)
      let top = -Infinity
      for (let c = 0; c < V; c++) top = Math.max(top, l![base + c]!)
      let total = 0
      for (let c = 0; c < V; c++) total += g![base + c] = expNonPositive(l![base + c]! - top)
      const k = scale / total
      for (let c = 0; c < V; c++) g![base + c] = g![base + c]! * k
      if (valid) g![base + label] = (expNonPositive(l![base + label]! - top) / total - 1) * scale
    }
  })
  // exact GELU x·Φ(x) and its derivative Φ(x) + x·φ(x), with Φ(x) = 1 − t/2 for x ≥ 0 and t/2
  // below, t = 1 − erf(|x|/√2) (one exp each: e^(−x²/2) serves t and φ). The forward pass as
  // (x + |x|)/2 − |x|·t/2, without a branch on the sign (a fifth faster on random signs)
  // exact GELU x·Φ(x) = (x + |x|)/2 − |x|·(1 − erf(|x|/√2))/2, and Φ(x) + x·φ(x)
  const gelu = (v: number) => {
    const z = Math.abs(v)
    return 0.5 * (v + z) - 0.5 * z * erfTail(z, expNonPositive(-0.5 * v * v))
  }
  const geluGrad = (v: number, d: number) => {
    const e = expNonPositive(-0.5 * v * v)
    const half = 0.5 * erfTail(Math.abs(v), e)
    return d * ((v < 0 ? half : 1 - half) + v * e * 0.3989422804014327)
  }
  // SiLU's gradient σ(x)·(1 + x·(1 − σ(x)))
  const siluGrad = (v: number, d: number) => {
    const sg = 1 / (1 + Math.exp(-v))
    return d * sg * (1 + v * (1 - sg))
  }
  // in SIMD where the engine has it (wasm/Simd.ts: four elements a step, the last n mod 4 by the
  // scalar formulas above), else JavaScript loops
  const simd = memory === undefined ? undefined : makeSimd(memory, { siluGrad, gelu, geluGrad })
  const each = (f: (v: number) => number) => ([x]: Array<Float32Array | Int32Array>, [y]: Array<Float32Array>) => {
    for (let i = 0; i < x!.length; i++) y![i] = f(x![i]!)
  }
  const each2 = (f: (v: number, d: number) => number) => ([x, dy]: Array<Float32Array | Int32Array>, [y]: Array<Float32Array>) => {
    for (let i = 0; i < x!.length; i++) y![i] = f(x![i]!, dy![i]!)
  }
  register(kernels.gelu, (sh) => [sh[0]!], simd === undefined ? each(gelu) : ([x], [y]) => simd.gelu(x as Float32Array, y!))
  register(kernels.geluGrad, (sh) => [sh[0]!], simd === undefined ? each2(geluGrad) : ([x, dy], [y]) => simd.geluGrad(x as Float32Array, dy as Float32Array, y!))
  if (simd !== undefined) {
    // only in SIMD: in JavaScript (Math.exp) slower than tfjs's ops; their forward passes stay op by op
    register(kernels.siluGrad, (sh) => [sh[0]!], ([x, dy], [y]) => simd.siluGrad(x as Float32Array, dy as Float32Array, y!))
    // attention's softmax gradient scale·p·(dp − Σ p·dp) per row (rows of a width off multiples of 4 in JavaScript)
    register(kernels.softmaxGrad, (sh) => [sh[0]!], ([p, dp], [out], [shape], a) => {
      const width = shape![shape!.length - 1]!
      if (width % 4 === 0) return simd.softmaxGrad(p as Float32Array, dp as Float32Array, out!, width, a["scale"]!)
      for (let base = 0; base < p!.length; base += width) {
        let dot = 0
        for (let c = 0; c < width; c++) dot += p![base + c]! * dp![base + c]!
        for (let c = 0; c < width; c++) out![base + c] = a["scale"]! * p![base + c]! * (dp![base + c]! - dot)
      }
    })
  }
  // the MoE layer's routing and slots (wasm/Moe.ts)
  registerWasmMoe(tf, kernels)
  return true
}

const expTable = Float64Array.from({ length: 10200 }, (_, k) => 2 ** (-k / 64))

/**
 * e^x for x ≤ 0 (all our wasm kernels need; x > 0.005 is out of its table), for the wasm kernels
 * and bench/wasm-elementwise.ts: V8's `Math.exp` costs about twice tfjs's wasm Exp per element, this
 * about as much. x = −k·ln2/64 + r with |r| ≤ ln2/128: e^x = 2^(−k/64)·e^r, the first from a table,
 * the second by its Taylor series to r⁴ (relative error about 5e-14). Arguments below −110 count as
 * −110, whose float32 value is 0 (the kernels' sums are in double precision). NaN stays NaN.
 *
 * @internal
 */
export const expNonPositive = (x: number): number => {
  const c = x < -110 ? -110 : x
  // round to nearest by truncating a non-negative number (Math.round costs as much as Math.exp)
  const k = (c * -92.33248261689366 + 0.5) | 0
  const r = c + k * 0.010830424696249145
  return (1 + r * (1 + r * (0.5 + r * (0.16666666666666666 + r * 0.041666666666666664)))) * expTable[k]!
}

/**
 * 1 − erf(z/√2) for z ≥ 0 given e = e^(−z²/2), by Abramowitz & Stegun 7.1.26 (|error| < 1.5e-7),
 * as tfjs's cpu Erf and our WGSL (0.3275911/√2 = 0.23164188826636045).
 */
const erfTail = (z: number, e: number): number => {
  const q = 1 / (1 + 0.23164188826636045 * z)
  return q * (0.254829592 + q * (-0.284496736 + q * (1.421413741 + q * (-1.453152027 + q * 1.061405429)))) * e
}

/** log Σ exp of `x[base … base+n)` (max first, the sum in double precision). */
const logSumExp = (x: ArrayLike<number>, base: number, n: number): number => {
  let top = -Infinity
  for (let c = 0; c < n; c++) top = Math.max(top, x[base + c]!)
  let total = 0
  for (let c = 0; c < n; c++) total += expNonPositive(x[base + c]! - top)
  return top + Math.log(total)
}

/** tfjs-backend-webgpu's program interface (the fields a flat elementwise program needs). */
interface Program {
  readonly variableNames: Array<string>
  readonly outputShape: Array<number>
  readonly shaderKey: string
  readonly dispatchLayout: { x: Array<number>; y?: Array<number> }
  readonly dispatch: [number, number, number]
  readonly workgroupSize: [number, number, number]
  readonly size: boolean
  readonly uniforms: string
  getUserCode: () => string
}

interface WebGpuBackend {
  runWebGPUProgram: (p: Program, inputs: Array<TF.TensorInfo>, dtype: string, uniforms: Array<{ type: string; data: Array<number> }>) => TF.TensorInfo
}

/** A flat elementwise program over `shape`: `body` computes `value` from `index`. */
const flatProgram = (name: string, shape: Array<number>, inputs: Array<string>, uniforms: Array<string>, body: string): Program => {
  const size = shape.reduce((a, b) => a * b, 1)
  return {
    variableNames: inputs,
    outputShape: shape,
    shaderKey: name,
    dispatchLayout: { x: shape.map((_, i) => i) },
    dispatch: [Math.ceil(size / 64), 1, 1],
    workgroupSize: [64, 1, 1],
    size: true,
    uniforms: uniforms.map((u) => `${u} : f32,`).join(" "),
    getUserCode: () => `
      fn main(index : i32) {
        if (index < uniforms.size) {
          ${body}
          setOutputAtIndex(index, value);
        }
      }`
  }
}

/**
 * A program with one workgroup of 64 threads per row of its first input `[rows, width]`, whose
 * output is `[rows, width]` or, with `perRow`, `[rows, 1]`. `code` runs in every thread with `rows`,
 * `width`, `row`, `valid` (row < rows) and `t` (the thread, 0–63) defined; its barriers must stay
 * outside `if (valid)`.
 */
const rowWise = (name: string, first: string, rows: number, width: number, inputs: Array<string>, uniforms: Array<string>, perRow: boolean, code: string): Program => ({
  variableNames: inputs,
  outputShape: perRow ? [rows, 1] : [rows, width],
  shaderKey: name,
  // not flat: main() reads the workgroup and thread ids itself; rows past 65535 go to y
  dispatchLayout: { x: [0], y: [1] },
  dispatch: [Math.min(rows, 65535), Math.ceil(rows / 65535), 1],
  workgroupSize: [64, 1, 1],
  size: false,
  uniforms: uniforms.map((u) => `${u} : f32,`).join(" "),
  getUserCode: () => `
    var<workgroup> partA : array<f32, 64>;
    var<workgroup> partB : array<f32, 64>;
    fn main() {
      let rows = uniforms.${first.toLowerCase()}Shape.x;
      let width = uniforms.${first.toLowerCase()}Shape.y;
      let row = i32(workgroupId.x) + i32(workgroupId.y) * i32(numWorkgroups.x);
      let valid = row < rows;
      let t = i32(localId.x);
      ${code}
    }`
})

/** Sums `a` (and `b`) over the workgroup into `partA[0]` (and `partB[0]`), or takes their max. */
const reduceRow = (op: "sum" | "max", both: boolean) => {
  const combine = (part: string) => (op === "sum" ? `${part}[t] = ${part}[t] + ${part}[t + k];` : `${part}[t] = max(${part}[t], ${part}[t + k]);`)
  return `
      workgroupBarrier();
      for (var k = 32; k > 0; k = k / 2) {
        if (t < k) { ${combine("partA")} ${both ? combine("partB") : ""} }
        workgroupBarrier();
      }`
}

/**
 * RMSNorm's row kernels: `accumulate` adds to `sa` and `sb` for element `base` (column `c`); then
 * `write` sets `result[base]` with `r = 1/√(sa/width + eps)` and `s = sb`.
 */
const normCode = (accumulate: string, write: string) => `
      var sa = 0.0;
      var sb = 0.0;
      if (valid) {
        for (var c = t; c < width; c = c + 64) {
          let base = row * width + c;
          ${accumulate}
        }
      }
      partA[t] = sa;
      partB[t] = sb;${reduceRow("sum", true)}
      let r = inverseSqrt(partA[0] / f32(width) + uniforms.eps);
      let s = partB[0];
      if (valid) {
        for (var c = t; c < width; c = c + 64) {
          let base = row * width + c;
          ${write}
        }
      }`

/** The cross-entropy's row kernels: the row's `lse` = log Σ exp over `L`, then `write`. */
const softmaxCode = (write: string) => `
      var mx = -3.402823e38;
      if (valid) { for (var c = t; c < width; c = c + 64) { mx = max(mx, L[row * width + c]); } }
      partA[t] = mx;${reduceRow("max", false)}
      let top = partA[0];
      workgroupBarrier();
      var se = 0.0;
      if (valid) { for (var c = t; c < width; c = c + 64) { se = se + exp(L[row * width + c] - top); } }
      partA[t] = se;${reduceRow("sum", false)}
      let lse = top + log(partA[0]);
      if (valid) {
        ${write}
      }`

let registered: boolean | undefined

/** Registers the webgpu kernels once; false if the backend's program interface is not there. */
const registerWebGpu = (tf: Tf): boolean => {
  if (registered !== undefined) return registered
  const backend = tf.backend() as unknown as Partial<WebGpuBackend>
  registered = typeof backend.runWebGPUProgram === "function"
  if (!registered) return false
  const k = registrar(tf)
  registerAdam(k)
  registerNorms(k)
  registerActivations(k)
  registerRowKernels(k)
  registerCombine(k)
  registerRouting(k)
  registerSlots(k)
  registerRotary(k)
  return true
}

/** How our webgpu kernels are registered, by the shape of their program. */
interface Registrar {
  /** Registers `kernelName` for webgpu: its inputs by name, f32 uniforms from the attributes of the same names. */
  readonly register: (kernelName: string, inputs: Array<string>, uniforms: Array<string>, program: (shapes: Array<Array<number>>, attrs: Record<string, number>) => Program) => void
  /** A flat elementwise kernel over the first input's shape. */
  readonly define: (kernelName: string, inputs: Array<string>, uniforms: Array<string>, body: string) => void
  /** A kernel with a workgroup per row of the first input `[rows, width]`. */
  readonly defineRows: (kernelName: string, inputs: Array<string>, uniforms: Array<string>, perRow: boolean, code: string) => void
  /** A flat kernel whose output shape comes from the inputs' shapes. */
  readonly flat: (kernelName: string, inputs: Array<string>, out: (shapes: Array<Array<number>>) => Array<number>, body: string) => void
}

const registrar = (tf: Tf): Registrar => {
  const register = (kernelName: string, inputs: Array<string>, uniforms: Array<string>, program: (shapes: Array<Array<number>>, attrs: Record<string, number>) => Program) =>
    tf.registerKernel({
      kernelName,
      backendName: "webgpu",
      kernelFunc: ({ inputs: given, backend: b, attrs }) => {
        const xs = inputs.map((n) => given[n.toLowerCase()] as TF.TensorInfo)
        const a = attrs as unknown as Record<string, number>
        return (b as unknown as WebGpuBackend).runWebGPUProgram(program(xs.map((x) => [...x.shape]), a), xs, "float32", uniforms.map((u) => ({ type: "float32", data: [a[u]!] })))
      }
    })
  const define = (kernelName: string, inputs: Array<string>, uniforms: Array<string>, body: string) =>
    register(kernelName, inputs, uniforms, (shapes) => flatProgram(kernelName, shapes[0]!, inputs, uniforms, body))
  const defineRows = (kernelName: string, inputs: Array<string>, uniforms: Array<string>, perRow: boolean, code: string) =>
    register(kernelName, inputs, uniforms, (shapes) => rowWise(kernelName, inputs[0]!, shapes[0]![0]!, shapes[0]![1]!, inputs, uniforms, perRow, code))
  const flat = (kernelName: string, inputs: Array<string>, out: (shapes: Array<Array<number>>) => Array<number>, body: string) =>
    register(kernelName, inputs, [], (shapes) => flatProgram(kernelName, out(shapes), inputs, [], body))
  return { register, define, defineRows, flat }
}

/** AdamW's first and second moments and the weight update. */
const registerAdam = ({ define }: Registrar): void => {
  const moment = (square: boolean) => `
          let gs = G[index] * S[0];
          let value = uniforms.beta * X[index] + (1.0 - uniforms.beta) * ${square ? "gs * gs" : "gs"};`
  define(kernels.m, ["X", "G", "S"], ["beta"], moment(false))
  define(kernels.v, ["X", "G", "S"], ["beta"], moment(true))
  define(kernels.w, ["W", "M", "V", "H"], ["lrScale", "eps", "decay"], `
          let w = W[index];
          let update = (M[index] / H[1]) / (sqrt(V[index] / H[2]) + uniforms.eps);
          let value = w - H[0] * uniforms.lrScale * (update + uniforms.decay * w);`)
}

/** RMSNorm and its two gradients. */
const registerNorms = ({ defineRows }: Registrar): void => {
  const squares = "let v = X[base]; sa = sa + v * v;"
  defineRows(kernels.norm, ["X", "G"], ["eps"], false, normCode(squares, "result[base] = X[base] * r * G[c];"))
  // dx = r·g·dy − x·r³·Σ(dy·g·x)/d
  defineRows(kernels.normDx, ["X", "G", "DY"], ["eps"], false, normCode(
    "let v = X[base]; sa = sa + v * v; sb = sb + DY[base] * G[c] * v;",
    "result[base] = r * G[c] * DY[base] - X[base] * r * r * r * s / f32(width);"
  ))
  // per row: dy·x·r, summed over rows into dg by tfjs
  defineRows(kernels.normDg, ["X", "DY"], ["eps"], false, normCode(squares, "result[base] = DY[base] * X[base] * r;"))
}

/** GELU (exact) and SiLU, with their gradients. */
const registerActivations = ({ define }: Registrar): void => {
  // erf by Abramowitz & Stegun 7.1.26 (|error| < 1.5e-7), as tfjs's own kernels
  const erf = `
          let z = abs(x) * 0.7071067811865476;
          let q = 1.0 / (1.0 + 0.3275911 * z);
          let poly = q * (0.254829592 + q * (-0.284496736 + q * (1.421413741 + q * (-1.453152027 + q * 1.061405429))));
          let erfv = sign(x) * (1.0 - poly * exp(-z * z));`
  define(kernels.gelu, ["X"], [], `
          let x = X[index];${erf}
          let value = 0.5 * x * (1.0 + erfv);`)
  // d/dx x·Φ(x) = Φ(x) + x·φ(x)
  define(kernels.geluGrad, ["X", "DY"], [], `
          let x = X[index];${erf}
          let value = DY[index] * (0.5 * (1.0 + erfv) + x * exp(-0.5 * x * x) * 0.3989422804014327);`)
  define(kernels.silu, ["X"], [], `
          let x = X[index];
          let value = x / (1.0 + exp(-x));`)
  // d/dx x·σ(x) = σ(x)·(1 + x·(1 − σ(x)))
  define(kernels.siluGrad, ["X", "DY"], [], `
          let x = X[index];
          let sg = 1.0 / (1.0 + exp(-x));
          let value = DY[index] * sg * (1.0 + x * (1.0 - sg));`)
}

/** Row kernels: the masked attention softmax and its gradient, Σx² by chunks, the masked NLL and its gradient. */
const registerRowKernels = ({ defineRows }: Registrar): void => {
  // attention rows: logits S·scale + M[row mod n]
  const logit = "S[row * width + c] * uniforms.scale + M[(row % uniforms.mShape.x) * width + c]"
  defineRows(kernels.softmax, ["S", "M"], ["scale"], false, `
      var mx = -3.402823e38;
      if (valid) { for (var c = t; c < width; c = c + 64) { mx = max(mx, ${logit}); } }
      partA[t] = mx;${reduceRow("max", false)}
      let top = partA[0];
      workgroupBarrier();
      var se = 0.0;
      if (valid) { for (var c = t; c < width; c = c + 64) { se = se + exp(${logit} - top); } }
      partA[t] = se;${reduceRow("sum", false)}
      let total = partA[0];
      if (valid) { for (var c = t; c < width; c = c + 64) { result[row * width + c] = exp(${logit} - top) / total; } }`)
  defineRows(kernels.softmaxGrad, ["P", "DP"], ["scale"], false, `
      var sa = 0.0;
      if (valid) { for (var c = t; c < width; c = c + 64) { sa = sa + P[row * width + c] * DP[row * width + c]; } }
      partA[t] = sa;${reduceRow("sum", false)}
      let dot = partA[0];
      if (valid) {
        for (var c = t; c < width; c = c + 64) {
          let i = row * width + c;
          result[i] = uniforms.scale * P[i] * (DP[i] - dot);
        }
      }`)
  // Σ x² per row (a chunk of a tensor), a workgroup each
  defineRows(kernels.sumSquares, ["X"], [], true, `
      var sa = 0.0;
      if (valid) { for (var c = t; c < width; c = c + 64) { let v = X[row * width + c]; sa = sa + v * v; } }
      partA[t] = sa;${reduceRow("sum", false)}
      if (valid && t == 0) { result[row] = partA[0]; }`)
  // a label outside [0, V) contributes nothing, as with the one-hot of the op-by-op path
  defineRows(kernels.nll, ["L", "Y", "M"], [], true, softmaxCode(`
        let y = Y[row];
        if (t == 0) { result[row] = select(0.0, M[row] * (lse - L[row * width + clamp(y, 0, width - 1)]), y >= 0 && y < width); }`))
  defineRows(kernels.nllGrad, ["L", "Y", "M", "DY"], [], false, softmaxCode(`
        let scale = select(0.0, M[row] * DY[0], Y[row] >= 0 && Y[row] < width);
        for (var c = t; c < width; c = c + 64) {
          var g = exp(L[row * width + c] - lse);
          if (c == Y[row]) { g = g - 1.0; }
          result[row * width + c] = g * scale;
        }`))
}

/** The MoE top-k mask, the repeat's gradient and the weighted combine of expert outputs with its gradients. */
const registerCombine = ({ define, flat }: Registrar): void => {
  // makeRepeat's gradient (X [o, t, m] → [o, m]) and makeCombine: Y [E, n, d], G [n, E], DY [n, d]
  // E, n, d from a rank-3 shape uniform; `value` as the sum of `term` over `v` < `count`
  const dims = (shape: string) => `let E = uniforms.${shape}.x; let n = uniforms.${shape}.y; let d = uniforms.${shape}.z;`
  const sum = (v: string, count: string, term: string) =>
    `var s = 0.0; for (var ${v} = 0; ${v} < ${count}; ${v} = ${v} + 1) { s = s + ${term}; } let value = s;`
  define(kernels.topMask, ["P"], ["k"], `
          let E = uniforms.pShape.y;
          let row = (index / E) * E;
          let e = index % E;
          let v = P[index];
          var rank = 0.0;
          for (var j = 0; j < E; j = j + 1) {
            let w = P[row + j];
            if (w > v || (w == v && j < e)) { rank = rank + 1.0; }
          }
          let value = select(0.0, 1.0, rank < uniforms.k);`)
  flat(kernels.sumMiddle, ["X"], (sh) => [sh[0]![0]!, sh[0]![2]!], `
          let t = uniforms.xShape.y; let m = uniforms.xShape.z;
          let o = index / m; let i = index % m;
          ${sum("c", "t", "X[(o * t + c) * m + i]")}`)
  flat(kernels.combine, ["Y", "G"], (sh) => [sh[0]![1]!, sh[0]![2]!], `
          ${dims("yShape")}
          let i = index / d; let j = index % d;
          ${sum("e", "E", "G[i * E + e] * Y[(e * n + i) * d + j]")}`)
  flat(kernels.combineGradY, ["G", "DY"], (sh) => [sh[0]![1]!, sh[0]![0]!, sh[1]![1]!], `
          ${dims("outShape")}
          let e = index / (n * d); let r = index % (n * d);
          let value = G[(r / d) * E + e] * DY[r];`)
  flat(kernels.combineGradG, ["Y", "DY"], (sh) => [sh[0]![1]!, sh[0]![0]!], `
          ${dims("yShape")}
          let i = index / E; let e = index % E;
          ${sum("j", "d", "Y[(e * n + i) * d + j] * DY[i * d + j]")}`)
}

/** Expert dispatch by slots: the slot of each pair, the pair of each row, the expert of each group, sums by group. */
const registerRouting = ({ register }: Registrar): void => {
  // expert dispatch by slots (makeRoute, makeSlots): M [n, E] mask, C [E] its column sums, P [E, n]
  // slots, T [rows] pairs (e·n + i), W [n, E]; a layout by capacity, or by tile (capacity 0)
  const route = (kernelName: string, tokens: boolean): void =>
    register(kernelName, ["M", "C"], ["capacity", "tile", "rows"], (shapes, a) => {
      const [n, E] = shapes[0] as [number, number]
      return {
        variableNames: ["M", "C"],
        outputShape: tokens ? [1, a["rows"]!] : [E, n],
        shaderKey: kernelName,
        // not flat: main() reads the workgroup and thread ids itself
        dispatchLayout: { x: [0], y: [1] },
        dispatch: [E, 1, 1],
        workgroupSize: [64, 1, 1],
        size: false,
        uniforms: "capacity : f32, tile : f32, rows : f32,",
        // a workgroup per expert: where its rows start and how many it has, then each thread counts
        // its run of tokens and numbers them after the counts of the runs before it
        getUserCode: () => `
    var<workgroup> counts : array<f32, 64>;
    fn main() {
      let n = uniforms.mShape.x;
      let E = uniforms.mShape.y;
      let tile = i32(uniforms.tile);
      let e = i32(workgroupId.x);
      let t = i32(localId.x);
      var first = e * i32(uniforms.capacity);
      var span = i32(uniforms.capacity);
      var room = span;
      if (tile > 0) {
        first = 0;
        for (var j = 0; j < e; j = j + 1) { first = first + ((i32(C[j]) + tile - 1) / tile) * tile; }
        span = ((i32(C[e]) + tile - 1) / tile) * tile;
        room = n;
      }
      let run = (n + 63) / 64;
      let start = min(n, t * run);
      let end = min(n, start + run);
      var count = 0.0;
      for (var i = start; i < end; i = i + 1) { count = count + M[i * E + e]; }
      counts[t] = count;
      workgroupBarrier();
      var before = 0.0;
      var total = 0.0;
      for (var j = 0; j < 64; j = j + 1) {
        if (j < t) { before = before + counts[j]; }
        total = total + counts[j];
      }
      var r = i32(before);
      for (var i = start; i < end; i = i + 1) {
        let routed = M[i * E + e] > 0.5;
        ${tokens
        ? "if (routed && r < room) { result[first + r] = f32(e * n + i); }"
        : "var v = -1.0; if (routed && r < room) { v = f32(first + r); } result[e * n + i] = v;"}
        if (routed) { r = r + 1; }
      }
      ${tokens
      ? `// the expert's empty rows, and after the last expert's the rows no expert uses
      for (var c = min(i32(total), span) + t; c < span; c = c + 64) { result[first + c] = -1.0; }
      if (e == E - 1) { for (var c = first + span + t; c < i32(uniforms.rows); c = c + 64) { result[c] = -1.0; } }`
      : ""}
    }`
      }
    })
  route(kernels.routeSlots, false)
  route(kernels.routeTokens, true)
  // each group of T rows: the first expert whose padded rows end after its first row (else the last)
  register(kernels.routeGroups, ["C"], ["tile"], (_, a) => flatProgram(kernels.routeGroups, [a["rows"]! / a["tile"]!], ["C"], ["tile"], `
          let T = i32(uniforms.tile);
          let E = uniforms.cShape;
          var found = E - 1;
          var end = 0;
          for (var j = 0; j < E; j = j + 1) {
            end = end + ((i32(C[j]) + T - 1) / T) * T;
            if (index * T < end) { found = j; break; }
          }
          let value = f32(found);`))
  // makeSlots' gatherGroups gradient: X [G, size], Q [G] experts in ascending order → [E, size],
  // an expert's groups (found by bisection) summed in order
  register(kernels.sumGroups, ["X", "Q"], [], (shapes, a) => flatProgram(kernels.sumGroups, [a["experts"]!, shapes[0]![1]!], ["X", "Q"], [], `
          let size = uniforms.xShape.y;
          let G = uniforms.xShape.x;
          let e = index / size;
          let j = index % size;
          var lo = 0;
          var hi = G;
          while (lo < hi) {
            let mid = (lo + hi) / 2;
            if (i32(Q[mid]) < e) { lo = mid + 1; } else { hi = mid; }
          }
          var s = 0.0;
          for (var g = lo; g < G; g = g + 1) {
            if (i32(Q[g]) != e) { break; }
            s = s + X[g * size + j];
          }
          let value = s;`))
}

/** Rows to slots and back (with the gate weights), and the gradient by the weights. */
const registerSlots = ({ flat }: Registrar): void => {
  // row s holds pair v = e·n + i (n: the rows of X): X's row i, times W[i, e] if weighted; zero when empty
  const toSlots = (weighted: boolean) => `
          let d = uniforms.xShape.y;
          let n = uniforms.xShape.x;
          let s = index / d;
          let v = i32(T[s]);
          var value = 0.0;
          if (v >= 0) { value = X[(v % n) * d + index % d]${weighted ? " * W[(v % n) * uniforms.wShape.y + v / n]" : ""}; }`
  flat(kernels.toSlots, ["X", "T"], (sh) => [sh[1]![0]!, sh[0]![1]!], toSlots(false))
  flat(kernels.toSlotsWeighted, ["X", "T", "W"], (sh) => [sh[1]![0]!, sh[0]![1]!], toSlots(true))
  const slotDims = "let d = uniforms.yShape.y; let E = uniforms.pShape.x; let n = uniforms.pShape.y;"
  flat(kernels.fromSlots, ["Y", "P", "W"], (sh) => [sh[1]![1]!, sh[0]![1]!], `
          ${slotDims}
          let i = index / d; let j = index % d;
          var s = 0.0;
          for (var e = 0; e < E; e = e + 1) {
            let p = i32(P[e * n + i]);
            if (p >= 0) { s = s + W[i * E + e] * Y[p * d + j]; }
          }
          let value = s;`)
  flat(kernels.fromSlotsGradW, ["Y", "P", "DY"], (sh) => [sh[1]![1]!, sh[1]![0]!], `
          ${slotDims}
          let i = index / E; let e = index % E;
          let p = i32(P[e * n + i]);
          var s = 0.0;
          if (p >= 0) { for (var j = 0; j < d; j = j + 1) { s = s + DY[i * d + j] * Y[p * d + j]; } }
          let value = s;`)
}

/** The rotary embedding and its inverse (the gradient). */
const registerRotary = ({ define }: Registrar): void => {
  // rotate-half: out1 = x1·cos ∓ x2·sin, out2 = x2·cos ± x1·sin (the lower signs undo the rotation)
  const rotation = (back: boolean) => `
          let hd = uniforms.xShape.z;
          let dim = i32(uniforms.dim);
          let half = dim / 2;
          let j = index % hd;
          let t = index / (uniforms.xShape.y * hd);
          var value = X[index];
          if (j < dim) {
            let f = j % half;
            let c = C[t * half + f];
            let sn = ${back ? "-" : ""}S[t * half + f];
            if (j < half) { value = X[index] * c - X[index + half] * sn; }
            else { value = X[index] * c + X[index - half] * sn; }
          }`
  define(kernels.rotate, ["X", "C", "S"], ["dim"], rotation(false))
  define(kernels.unrotate, ["X", "C", "S"], ["dim"], rotation(true))
}
