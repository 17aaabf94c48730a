/**
 * Lowering: a checked graph becomes tfjs variables and a forward function.
 *
 * Parameters are created from the analysis' parameter list, so the runtime's parameter count is the
 * static count by construction (a tied parameter is the owner's variable). Each node runs its kind's
 * `apply` with its decoded spec, its parameters and its children as callables.
 *
 * @since 0.1.0
 */
import type * as TF from "@tensorflow/tfjs"
import type { Analysis } from "../graph/Analyze.ts"
import { joinPath } from "../graph/Analyze.ts"
import type { ChildApply, ContextKey, DecodeCache, FlopCounter, ForwardContext, Provision, Tensor, Tensor2D, Tf, TokenStream } from "../graph/Apply.ts"
import type { AnyBlock } from "../graph/Block.ts"
import { type ChunkState, type Compression, type ConceptFeeds, ConceptOps, type DeviceCompression, makeConceptOps } from "../blocks/ConceptContext.ts"
import { type Dispatch, MoeOps } from "../blocks/MoE.ts"
import { backendOps } from "./Ops.ts"
import { makeActivate, makeCombine, makeMaskedNll, makeMaskedSoftmax, makeRepeat, makeRmsNorm, makeRotate, makeRoute, makeSlots, makeTopMask } from "./Fused.ts"
import { makeDetach, makeMatMul, makeOneHot, makeSte, makeStop } from "./Fixes.ts"
import { prng } from "../internal/Random.ts"
import { NotLowerable, Unsupported } from "../internal/RunErrors.ts"
import { withSwapped } from "../internal/Swap.ts"

export interface Lowered {
  readonly tf: Tf
  readonly analysis: Analysis
  /** The trainable variables, one per owned parameter, by path. */
  readonly variables: ReadonlyMap<string, TF.Variable>
  /** Parameters by node path and name (tied ones resolve to their owner's variable). */
  readonly nodeParams: ReadonlyMap<string, Readonly<Record<string, TF.Variable>>>
}

export { NotLowerable } from "../internal/RunErrors.ts"

/** Mixes a seed and an index into a new 31-bit seed. */
export const mixSeed = (seed: number, i: number): number => {
  let h = (seed ^ Math.imul(i + 1, 0x9e3779b1)) >>> 0
  h = Math.imul(h ^ (h >>> 16), 0x85ebca6b) >>> 0
  h = Math.imul(h ^ (h >>> 13), 0xc2b2ae35) >>> 0
  return (h ^ (h >>> 16)) & 0x7fffffff
}

/**
 * Creates the variables of an analysed graph: normal(0, 0.02) unless the parameter asks for zeros,
 * ones or another standard deviation; deterministic in `seed`.
 */
export const materialize = (tf: Tf, analysis: Analysis, seed: number): Lowered => {
  const check = (block: AnyBlock, path: string) => {
    if (block.kind.apply === undefined) throw new NotLowerable({ path, kind: block.kind.name })
    block.children.forEach((c, i) => check(c, joinPath(path, c.name ?? `${i}`)))
  }
  check(analysis.root, "")
  const variables = new Map<string, TF.Variable>()
  analysis.params.forEach((p, i) => {
    if (p.tiedTo !== undefined) return
    const init = p.init ?? { normal: 0.02 }
    const value = init === "zeros"
      ? tf.zeros([...p.shape])
      : init === "ones"
      ? tf.ones([...p.shape])
      : init === "identity"
      ? tf.eye(p.shape[0]!, p.shape[1])
      : tf.randomNormal([...p.shape], 0, init.normal, "float32", mixSeed(seed, i))
    variables.set(p.path, tf.variable(value, true))
    value.dispose()
  })
  const nodeParams = new Map<string, Record<string, TF.Variable>>()
  for (const p of analysis.params) {
    const node = p.path.slice(0, p.path.length - p.name.length - 1)
    const v = variables.get(p.tiedTo ?? p.path)!
    const entry = nodeParams.get(node) ?? {}
    entry[p.name] = v
    nodeParams.set(node, entry)
  }
  return { tf, analysis, variables, nodeParams }
}

/** Frees the variables of a lowered model. */
export const release = (m: Lowered): void => {
  for (const v of m.variables.values()) v.dispose()
}

/** Total elements of the runtime's variables, buffers left out (as the static count leaves them). */
export const runtimeParamCount = (m: Lowered): number => {
  const buffers = new Set(m.analysis.params.filter((p) => p.buffer === true).map((p) => p.path))
  let n = 0
  for (const [path, v] of m.variables) if (!buffers.has(path)) n += v.size
  return n
}

/** A batch of token rows: `ids` is `[rows · T]`, row-major. */
export interface Batch {
  readonly rows: number
  readonly length: number
  readonly ids: Int32Array
  /** Next-token targets, same layout; −1 where there is none. */
  readonly targets?: Int32Array
  /** Flat token indices where a new document starts inside a row (packed rows). */
  readonly documentStarts?: ReadonlySet<number>
}

export interface ForwardOptions {
  readonly training: boolean
  readonly seed: number
  readonly balanceWeight?: number
  /** Incremental decoding: the batch holds the next positions of each row (see `Decode.ts`). */
  readonly cache?: DecodeCache
  /** Position of each token within its row; by default 0, 1, … restarting at document starts. */
  readonly positions?: Int32Array
  /** Host reads (default: `dataSync`); see {@link recordReads}. */
  readonly read?: (t: Tensor) => Float32Array | Int32Array
  /** MoE dispatch (default `sparse`; `grouped` on webgpu and with `concept`); see {@link Dispatch}. */
  readonly dispatch?: Dispatch
  /**
   * Device tensors to use instead of uploading the batch's host arrays: token ids `[n]` int32,
   * positions `[n]` int32, labels `[n]` int32 (targets with −1 as 0) and mask `[n]` float32 (1 where
   * there is a target). A captured step (`webgpu/Capture.ts`) feeds new values into them each step.
   */
  readonly feeds?: Feeds
  /** Static-shape ConceptMoE training (see `ConceptFeeds`); MoE layers then stay on the device (`grouped` unless `dispatch` says `dense` or a capacity). */
  readonly concept?: ConceptFeeds
  /** The ratio controller's state for a training step (`Chunker.RatioControl`). */
  readonly ratioControl?: { readonly integral: number }
  /**
   * Draws the pass's first random stream (its chunk module's boundary draws) skips: a shard of a
   * batch (`train/Parallel.ts`) continues the whole batch's stream after the rows before it.
   */
  readonly drawOffset?: number
  /** A converted model's ramp position s ∈ [0, 1] (`ConceptOps.ramp`); default none (s = 1, the paper's model). */
  readonly ramp?: number
  /**
   * Implementations of context keys for the pass (`Apply.provide(key, make)`): a user kind's own
   * keys, or replacements of the runtime's (`MoE.MoeOps`, `ConceptContext.ConceptOps`); a later one
   * wins.
   */
  readonly provide?: ReadonlyArray<Provision>
}

/**
 * The context of a finished pass as its caller sees it: the blocks' {@link ForwardContext} plus
 * read-only views of what the pass measured. Decoding, `verify`, the trainer and the export's
 * reference values read these; no block does.
 */
export interface PassContext extends ForwardContext {
  /** Tokens and concepts seen by the concept stages, Σ boundary probability, concepts at p ≥ ½ (summed over stages). */
  readonly compression: Compression
  /** With `ConceptFeeds`: the same measures on the device, summed over the stages. */
  readonly deviceCompression: DeviceCompression | undefined
  /** The chunk state of the last concept stage that ran (its boundaries, concepts per row), or undefined. */
  readonly chunk: ChunkState | undefined
  /** Token-expert pairs routed and kept by capacity dispatches, summed over the layers (on the device), or undefined. */
  readonly expertRouting: { readonly routed: Tensor; readonly kept: Tensor } | undefined
}

export interface Feeds {
  readonly ids: Tensor
  readonly positions: Tensor
  readonly labels: Tensor
  readonly mask: Tensor
}

/** The host arrays behind {@link Feeds} for a batch: positions restart at document starts. */
export const feedValues = (batch: Batch) => ({ ids: batch.ids, positions: positionsOf(batch), ...targetValues(batch) })

/** Labels (targets with −1 as 0) and the mask of positions with a target. */
const targetValues = (batch: Batch) => {
  const targets = batch.targets ?? new Int32Array(batch.rows * batch.length).fill(-1)
  return { labels: targets.map((t) => Math.max(t, 0)), mask: Float32Array.from(targets, (t) => (t >= 0 ? 1 : 0)) }
}

/**
 * The host values of `ConceptFeeds` for a batch and a pass's seed: the chunk module's Bernoulli
 * draws (mulberry32 seeded with `mixSeed(seed, 0)`, drawn row by row for the tokens that are not
 * forced boundaries, exactly as the host path draws them; 0 elsewhere) and 1 at document starts.
 * One concept stage per model (the first `nextSeed` of a pass is its chunk module's).
 */
export const conceptFeedValues = (batch: Batch, seed: number): { readonly random: Float32Array; readonly documentStart: Float32Array } => {
  const n = batch.rows * batch.length
  const starts = batch.documentStarts ?? new Set<number>()
  const random = new Float32Array(n)
  const documentStart = new Float32Array(n)
  const draw = prng(mixSeed(seed, 0))
  for (let t = 0; t < n; t++) {
    if (starts.has(t)) documentStart[t] = 1
    else if (t % batch.length !== 0) random[t] = draw()
  }
  return { random, documentStart }
}

/** Position of each token within its row, restarting at document starts. */
const positionsOf = (batch: Batch): Int32Array => {
  const starts = batch.documentStarts ?? new Set<number>()
  const positions = new Int32Array(batch.rows * batch.length)
  for (let r = 0; r < batch.rows; r++) {
    let pos = 0
    for (let i = 0; i < batch.length; i++) {
      const t = r * batch.length + i
      if (starts.has(t)) pos = 0
      positions[t] = pos++
    }
  }
  return positions
}

/**
 * The document of each token within its row, float32 `[rows·T]`, from the positions (a position 0
 * opens a document: the row's start and each document start): Σ_{i ≤ t} [position_i = 0] − 1.
 * Arithmetic on the int positions only, so it works on fed positions (a captured step) too.
 */
const documentsOf = (tf: Tf, positions: Tensor, rows: number, length: number): Tensor =>
  tf.tidy(() => {
    const start = tf.sub(1, tf.minimum(tf.cast(positions, "float32"), 1))
    return tf.reshape(tf.sub(tf.cumsum(tf.reshape(start, [rows, length]), 1), 1), [rows * length])
  })

/** The same on the host, from the document starts. */
const hostDocuments = (rows: number, length: number, starts: ReadonlySet<number>): Float32Array => {
  const out = new Float32Array(rows * length)
  for (let r = 0; r < rows; r++) {
    let doc = 0
    for (let i = 0; i < length; i++) {
      if (i > 0 && starts.has(r * length + i)) doc++
      out[r * length + i] = doc
    }
  }
  return out
}

/** The runtime's implementation of `MoE.MoeOps` for a pass, and the pass's count of routed and kept pairs. */
const moeOps = (tf: Tf, flops: FlopCounter, options: ForwardOptions) => {
  const slots = makeSlots(tf)
  // the fallback's product is counted with the grouped one's, not again
  const uncounted = makeMatMul(tf, { weights: 0, attentionMap: 0, other: 0 })
  const gathered = (x: Tensor, w: Tensor, groups: Tensor) => uncounted(x, slots.gatherGroups(w, groups), "weights")
  const groupedMatMul = backendOps(tf).groupedMatMul?.(tf, gathered) ?? gathered
  let routing: { readonly routed: Tensor; readonly kept: Tensor } | undefined
  const ops: MoeOps = {
    dispatch: options.concept !== undefined
      ? options.dispatch === undefined || options.dispatch === "sparse" ? "grouped" : options.dispatch
      : options.dispatch ?? backendOps(tf).dispatch?.forward ?? "sparse",
    balanceWeight: options.balanceWeight ?? 0.01,
    topMask: makeTopMask(tf, makeOneHot(tf)),
    combine: makeCombine(tf),
    route: makeRoute(tf),
    ...slots,
    groupedMatMul: (x, w, groups) => {
      flops.weights += 2 * x.size * w.shape[2]!
      return groupedMatMul(x, w, groups)
    },
    countRouting: (routed, kept) => {
      routing = routing === undefined ? { routed, kept } : { routed: tf.add(routing.routed, routed), kept: tf.add(routing.kept, kept) }
    }
  }
  return { ops, routing: () => routing }
}

/** Runs the graph on a batch; returns the logits `[rows · T, vocab]` and the pass's context. */
export const forward = (m: Lowered, batch: Batch, options: ForwardOptions): { readonly logits: Tensor2D; readonly ctx: PassContext } => {
  const { tf } = m
  const starts = batch.documentStarts ?? new Set<number>()
  const flops: FlopCounter = { weights: 0, attentionMap: 0, other: 0 }
  let seedCounter = 0
  const positionTensors = new WeakMap<Int32Array, Tensor>()
  const memos = new WeakMap<Int32Array, Map<string, unknown>>()
  let tokenDocuments: Tensor | undefined
  let scope = ""
  let stream: TokenStream = {
    layout: Array.from({ length: batch.rows }, () => batch.length),
    positions: options.positions ?? positionsOf(batch),
    documentStarts: starts,
    // packed documents: each row's documents from the batch's document starts, or (fed positions,
    // which change every step of a captured step) from the fed positions on the device
    documents: options.cache !== undefined
      ? undefined
      : options.feeds !== undefined
      ? () => tokenDocuments ??= documentsOf(tf, options.feeds!.positions, batch.rows, batch.length)
      : starts.size > 0
      ? () => tokenDocuments ??= tf.tensor1d(hostDocuments(batch.rows, batch.length, starts))
      : undefined,
    valid: undefined
  }
  if (options.feeds !== undefined) positionTensors.set(stream.positions, options.feeds.positions)
  const moe = moeOps(tf, flops, options)
  // the extensions: the runtime's own, then the caller's (a later provision of a key wins)
  const provisions = new Map<string, Provision["make"]>([
    [MoeOps.id, () => moe.ops],
    [ConceptOps.id, () =>
      makeConceptOps(tf, {
        ramp: options.ramp === undefined ? undefined : Math.min(1, Math.max(0, options.ramp)),
        feeds: options.concept,
        ratioControl: options.ratioControl
      })]
  ])
  for (const p of options.provide ?? []) provisions.set(p.id, p.make)
  const extensions = new Map<string, unknown>()
  const get = <S>(key: ContextKey<S>): S => {
    if (extensions.has(key.id)) return extensions.get(key.id) as S
    const make = provisions.get(key.id) ?? key.make
    if (make === undefined) {
      throw new Unsupported({ at: scope, problem: `needs the context extension "${key.id}", which nothing provides: pass it in the forward options' \`provide\` (Apply.provide), or give the key a default (\`make\`)` })
    }
    const value = make(ctx) as S
    extensions.set(key.id, value)
    return value
  }
  const ctx: PassContext = {
    tf,
    training: options.training,
    cache: options.cache,
    get scope() {
      return scope
    },
    get stream() {
      return stream
    },
    withScope: <A>(inner: string, f: () => A): A => withSwapped(() => scope, (s) => { scope = s }, inner, f),
    withStream: <A>(inner: TokenStream, f: () => A): A => withSwapped(() => stream, (s) => { stream = s }, inner, f),
    get,
    positionIds: () => {
      let t = positionTensors.get(stream.positions)
      if (t === undefined) positionTensors.set(stream.positions, t = tf.tensor1d(stream.positions, "int32"))
      return t
    },
    memo: <T>(key: string, make: () => T): T => {
      let byKey = memos.get(stream.positions)
      if (byKey === undefined) memos.set(stream.positions, byKey = new Map())
      if (!byKey.has(key)) byKey.set(key, make())
      return byKey.get(key) as T
    },
    auxLosses: [],
    flops,
    nextSeed: () => {
      const i = seedCounter++
      // the PRNG (internal/Random.ts, mulberry32) adds 0x6d2b79f5 to its state per draw: skipping k draws is
      // starting k·0x6d2b79f5 further on (tests/parallel.test.ts checks it against the stream)
      return i === 0 && options.drawOffset ? (mixSeed(options.seed, 0) + Math.imul(options.drawOffset, 0x6d2b79f5)) >>> 0 : mixSeed(options.seed, i)
    },
    matMul: makeMatMul(tf, flops),
    detach: makeDetach(tf),
    stop: makeStop(tf),
    ste: makeSte(tf),
    rmsNorm: makeRmsNorm(tf),
    rotate: makeRotate(tf),
    activate: makeActivate(tf),
    softmax: makeMaskedSoftmax(tf),
    repeat: makeRepeat(tf),
    oneHot: makeOneHot(tf),
    read: options.read ?? ((t) => t.dataSync() as Float32Array | Int32Array),
    // what the pass measured, read-only
    get compression() {
      return get(ConceptOps).measured().host
    },
    get deviceCompression() {
      return get(ConceptOps).measured().device
    },
    get chunk() {
      return get(ConceptOps).measured().chunk
    },
    get expertRouting() {
      return moe.routing()
    }
  }
  // a child's scope extends its parent's scope at call time (a loop adds `#pass` to its own)
  const run = (block: AnyBlock, path: string, inner: string, x: Tensor): Tensor => {
    const children: Array<ChildApply> = block.children.map((c, i) => {
      const name = c.name ?? `${i}`
      return (y: Tensor) => run(c, joinPath(path, name), joinPath(scope, name), y)
    })
    return ctx.withScope(inner, () => block.kind.apply!(ctx, m.analysis.specs.get(path), x, m.nodeParams.get(path) ?? {}, children))
  }
  const logits = run(m.analysis.root, "", "", options.feeds?.ids ?? tf.tensor1d(batch.ids, "int32")) as Tensor2D
  return { logits, ctx }
}

/**
 * Mean next-token cross-entropy over positions with a target (≥ 0), plus the auxiliary losses.
 * Call inside `tf.tidy` / an optimizer's `minimize`.
 */
export const loss = (m: Lowered, batch: Batch, options: ForwardOptions) => {
  const { tf } = m
  const { ctx, logits } = forward(m, batch, options)
  const host = options.feeds === undefined ? targetValues(batch) : undefined
  const labels = options.feeds?.labels ?? tf.tensor1d(host!.labels, "int32")
  const mask = options.feeds?.mask ?? tf.tensor1d(host!.mask)
  let tokens = 0
  for (const t of batch.targets ?? []) if (t >= 0) tokens++
  // mean over the positions with a target, as a masked sum: the shapes do not depend on the targets
  const ce = tf.div(makeMaskedNll(tf, ctx.oneHot)(logits, labels, mask), tf.maximum(tf.sum(mask), 1))
  const aux = ctx.auxLosses.length === 0 ? tf.scalar(0) : tf.addN(ctx.auxLosses)
  return { total: tf.add(ce, aux) as TF.Scalar, ce: ce as TF.Scalar, aux: aux as TF.Scalar, ctx, tokens }
}

/**
 * Thrown by a recording pass at the first read it has no value for (see `Decode.feedAsync`): control
 * flow, caught by the caller that reads the value and runs the pass again, never seen by a user.
 */
export class PendingRead {
  readonly tensor: Tensor
  constructor(tensor: Tensor) {
    this.tensor = tensor
  }
}

/**
 * The host values a forward pass reads, obtained asynchronously (for backends without synchronous
 * reads, such as webgpu in Node): the pass runs untaped until its first unknown read, that tensor
 * is read with `await data()`, and the pass runs again, until it completes. With dense MoE dispatch
 * a ConceptMoE reads once per concept stage (its boundaries), so this is two passes. A later
 * `forward` / `loss` with `read: replay(values)` then runs taped without reading.
 */
export const recordReads = async (m: Lowered, batch: Batch, options: ForwardOptions): Promise<Array<Float32Array | Int32Array>> => {
  const { tf } = m
  const values: Array<Float32Array | Int32Array> = []
  for (;;) {
    let i = 0
    let pending: Tensor | undefined
    tf.tidy(() => {
      try {
        forward(m, batch, {
          ...options,
          read: (t) => {
            if (i < values.length) return values[i++]!
            throw new PendingRead(t)
          }
        })
      } catch (e) {
        if (!(e instanceof PendingRead)) throw e
        pending = tf.keep(e.tensor)
      }
    })
    if (pending === undefined) return values
    values.push(await pending.data() as Float32Array | Int32Array)
    pending.dispose()
  }
}

/** A reader that hands out recorded values in order, and fails if the pass reads more. */
export const replay = (values: ReadonlyArray<Float32Array | Int32Array>) => {
  let i = 0
  return (t: Tensor): Float32Array | Int32Array => {
    const v = values[i++]
    // an invariant (the pass replays the reads it recorded), not something an input can cause
    if (v === undefined || v.length !== t.size) throw new Error(`replayed read ${i - 1} does not match the pass (recorded ${values.length} reads)`)
    return v
  }
}
