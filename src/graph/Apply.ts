/**
 * The lowering contract: how a block kind runs on tensors.
 *
 * A kind's optional `apply` receives a {@link ForwardContext} (the tfjs namespace and tensor
 * operations, the mode, the token stream it runs on, collectors for auxiliary losses and executed
 * FLOPs, and the extensions some kinds declare with a {@link ContextKey}), its decoded spec, its
 * input, its own parameters by name, and its children as callables. Only *types* come from tfjs
 * here, so the graph and cost rooms never load a tensor library.
 *
 * Layout: the token stream is `[rows · T, d]` (rows of equal length T). Inside a concept stage the
 * concept model sees the packed concepts of every row, `[Σ M_b, d]`, with `stream.layout = [M_0, …]`;
 * attention runs per row.
 *
 * Incremental decoding (prefill, then one token at a time) runs the same applies on the new
 * positions only, with `ctx.cache` set: a block whose output at a position depends on earlier
 * positions keeps what it needs in `ctx.cache.state(ctx.scope, …)` (attention its KV cache, the
 * chunk module the previous token, the dechunk its EMA). A kind declares which it is with
 * `stream` (see `Block.ts`).
 *
 * @since 0.1.0
 */
import type * as TF from "@tensorflow/tfjs"

export type Tf = typeof TF
export type Tensor = TF.Tensor
export type Tensor2D = TF.Tensor2D

/** Matmul FLOPs executed in a forward pass, by category. */
export interface FlopCounter {
  /** Products with weight matrices (what the static `flops` count). */
  weights: number
  /** QKᵀ and AV (the static attention map). */
  attentionMap: number
  /** Anything else done with a matmul (the dechunk EMA as a matrix, one-hot tricks). */
  other: number
}

/**
 * A per-row buffer that grows by appending: `rows` rows of `width` floats each, with per-row
 * lengths. Storage is preallocated and doubled when full, never re-concatenated per append.
 */
export interface RowBuffer {
  readonly rows: number
  readonly width: number
  /** `rows`: stored `[rows, capacity, width]`; `columns`: `[rows, width, capacity]`. */
  readonly layout: "rows" | "columns"
  /** The whole storage, capacity included (owned by the buffer: valid until the next append). */
  store(): Tensor
  /** Elements held per row. */
  readonly lengths: ReadonlyArray<number>
  /** Allocated capacity in elements per row. */
  readonly capacity: number
  /** Appends `counts[b]` new elements to row b, taken in row order from `x [Σ counts, width]`. */
  append(x: Tensor, counts: ReadonlyArray<number>): void
  /** Row b's elements `[lengths[b], width]` (`[width, lengths[b]]` in the columns layout). */
  row(b: number): Tensor2D
  /** Every row's elements `[rows, length, width]` (columns: `[rows, width, length]`); lengths must be equal. */
  all(): Tensor
  /** Forgets the elements past `lengths[b]` in each row (a piece that is run again). */
  truncate(lengths: ReadonlyArray<number>): void
  dispose(): void
}

/** State kept across the pieces of an incrementally decoded stream. */
export interface DecodeCache {
  /** Rows of the token stream. */
  readonly rows: number
  /** The state of the node at `scope`, created by `init` on first use. */
  state<A>(scope: string, init: () => A): A
  /** A new growable per-row buffer on the runtime's backend (its bytes count as cache). */
  buffer(rows: number, width: number, layout?: "rows" | "columns"): RowBuffer
  /** Boundaries imposed on concept stages instead of the chunk module's (benchmarks), or undefined. */
  readonly forcedBoundary: ((row: number, position: number) => boolean) | undefined
}

/**
 * The token stream a block sees: an immutable value. A block that runs its children on another
 * stream (a concept stage: the concepts of each row) hands it to them with
 * {@link ForwardContext.withStream}.
 */
export interface TokenStream {
  /** Row lengths (all T at token level). */
  readonly layout: ReadonlyArray<number>
  /** Position of each element within its row (for rotary). */
  readonly positions: Int32Array
  /** Row starts that begin a new document (forced boundaries), as flat token indices of the batch. */
  readonly documentStarts: ReadonlySet<number>
  /**
   * The document of each element within its row (0 from the row's start, +1 at each document
   * start), float32 `[N]` off the tape, or undefined when every row is one document. Attention keeps
   * each query within its own document (a block-diagonal mask).
   */
  readonly documents: (() => Tensor) | undefined
  /**
   * Which elements are real (1) or padding (0), `[N]` float32; undefined when all are (a
   * static-shape concept stage pads each row's concepts; MoE balance losses count the real ones).
   */
  readonly valid: Tensor | undefined
}

/**
 * A typed key for an extension of the context: primitives or per-pass state that only some block
 * kinds need (MoE routing, ConceptMoE's concept stages, a user kind's own). The block file that
 * needs it declares the key with its shape `S` (`export const MyOps = ContextKey<MyOps>("pkg/MyOps")`);
 * an apply reads it with `ctx.get(MyOps)`. The runtime provides it (`Lower.forward`'s `provide`
 * option; the built-in keys by the runtime itself), or else the key's own `make` builds it, once per
 * forward pass. Keys are told apart by `id`: use a namespaced one.
 */
export interface ContextKey<S> {
  readonly id: string
  /** Builds the value when nothing provides the key, at most once per forward pass; none: it must be provided. */
  readonly make: ((ctx: ForwardContext) => S) | undefined
  /** The shape's type only (never set). */
  readonly Shape?: (s: S) => S
}

/** Declares a context key (see {@link ContextKey}). */
export const ContextKey = <S>(id: string, options?: { readonly make?: (ctx: ForwardContext) => S }): ContextKey<S> => ({
  id,
  make: options?.make
})

/** An implementation of a key for one forward pass, built on the pass's first `ctx.get(key)`. */
export interface Provision {
  readonly id: string
  readonly make: (ctx: ForwardContext) => unknown
}

/** Provides `key` with what `make` builds, once per forward pass. */
export const provide = <S>(key: ContextKey<S>, make: (ctx: ForwardContext) => S): Provision => ({ id: key.id, make })

/**
 * What a block's apply runs with: tensor operations, the description of the token stream, the
 * collectors of a pass (auxiliary losses, executed FLOPs), and the extensions that some kinds
 * declare ({@link ContextKey}). No block writes into it for another block to read.
 */
export interface ForwardContext {
  readonly tf: Tf
  readonly training: boolean
  /** Set while decoding incrementally: the input holds only the new positions of each row. */
  readonly cache: DecodeCache | undefined
  /** Where the running node is: its path, with `#pass` after a loop's path for each pass. */
  readonly scope: string
  /** Runs `f` (a block's children) under `scope` (a loop's pass: `path#i`), and restores the current one on every exit path. */
  readonly withScope: <A>(scope: string, f: () => A) => A
  /** The token stream the running node sees. */
  readonly stream: TokenStream
  /** Runs `f` (a block's children) on `stream`, and restores the current one on every exit path. */
  readonly withStream: <A>(stream: TokenStream, f: () => A) => A
  /** The extension `key` in this pass (see {@link ContextKey}); an `Unsupported` error when nothing provides it. */
  readonly get: <S>(key: ContextKey<S>) => S
  /**
   * `stream.positions` as an int32 tensor, made once per positions array (or fed: a captured step's
   * input) and shared by every block that needs it.
   */
  readonly positionIds: () => Tensor
  /** Values derived once per forward pass and positions array (rotary tables), by key. */
  readonly memo: <T>(key: string, make: () => T) => T
  /** Auxiliary losses, already weighted, summed into the training loss. */
  readonly auxLosses: Array<Tensor>
  /** Executed matmul FLOPs, when counting. */
  readonly flops: FlopCounter
  /**
   * A deterministic seed source for sampling: the i-th call of a pass gives the pass's i-th seed (a
   * ConceptMoE's chunk module draws the first).
   */
  readonly nextSeed: () => number
  /**
   * Matmul with explicit-transpose gradients, counted under `category` (as the full product). With
   * `triangle`, a promise about causal attention's map that lets a backend skip the blocks outside
   * it ({@link CausalTriangle}); backends without such a kernel compute the whole product.
   */
  readonly matMul: (a: Tensor, b: Tensor, category: keyof FlopCounter, triangle?: CausalTriangle) => Tensor
  /** Forward: the value; backward: no gradient. */
  readonly detach: (x: Tensor) => Tensor
  /** The same values off the tape: ops on the result are not differentiated at all (for indices). */
  readonly stop: (x: Tensor) => Tensor
  /** Straight-through estimator: forward 1, backward identity. */
  readonly ste: (x: Tensor) => Tensor
  /** RMSNorm over the last axis, `x·g / √(mean(x²) + eps)` (fused kernels where the runtime has them). */
  readonly rmsNorm: (x: Tensor, g: Tensor, eps: number) => Tensor
  /** An activation function (of the gate, for GLU kinds), fused where the runtime can. */
  readonly activate: (x: Tensor, activation: "swiglu" | "silu" | "geglu" | "gelu" | "gelu_tanh" | "relu") => Tensor
  /**
   * Softmax over the last axis of `scores [..., n, len]·scale + mask [n, len]` (no gradient into the
   * mask; fused where the runtime can). `causal`: a promise that the maps are square (n = len) and
   * the mask −1e9 above each diagonal, so a kernel may stop each row at its diagonal.
   */
  readonly softmax: (scores: Tensor, scale: number, mask: Tensor, causal?: boolean) => Tensor
  /** `x [o, ...rest]` → `[o, times, ...rest]`, every row `times` times (fused where the runtime can). */
  readonly repeat: (x: Tensor, times: number) => Tensor
  /** Rotary embedding of the first `dim` features of `x [n, heads, hd]` with tables `cos`, `sin [n, 1, dim/2]`. */
  readonly rotate: (x: Tensor, dim: number, cos: Tensor, sin: Tensor) => Tensor
  /**
   * Host values of a tensor, for the decisions a block takes on the host (MoE routing, chunk
   * boundaries). Sync backends read at once; on a backend that can only read asynchronously (webgpu
   * in Node) the runtime replays values read in an earlier pass (`Lower.recordReads`).
   */
  readonly read: (t: Tensor) => Float32Array | Int32Array
  /** A float32 one-hot that is correct on every backend. */
  readonly oneHot: (indices: Tensor, depth: number) => Tensor
}

/**
 * What a causal attention product promises about its last two axes (square maps, query i and key j):
 * - `"lowerC"`: only the result's lower triangle (j ≤ i) is used, and the gradient that comes back
 *   is 0 above the diagonal (the scores under a causal mask: the softmax's probabilities, and so
 *   their gradient, are exactly 0 there). The entries above may come out as 0 or as the product.
 * - `"lowerA"`: A is 0 above the diagonal (the probabilities times the values).
 */
export type CausalTriangle = "lowerC" | "lowerA"

/**
 * Where an MoE layer's token-expert pairs go, without reading the routing back (the layout of
 * `MoE.MoeOps.route`; declared here because the runtime's kernels import it from here):
 * `{ capacity: C }` gives each expert C rows (expert e's at e·C); `{ tile: T }` packs the pairs
 * expert by expert, each expert's rows padded to a multiple of T (a group), nothing dropped.
 */
export type RouteLayout =
  | { readonly capacity: number }
  /** `rows`: the rows the groups take (whole groups); by default the worst case, room for every pair plus each expert's padding. */
  | { readonly tile: number; readonly rows?: number }

/** A child as a callable. */
export type ChildApply = (x: Tensor) => Tensor

/** The apply function a block kind may provide. */
export type ApplyFn<S> = (
  ctx: ForwardContext,
  spec: S,
  x: Tensor,
  params: Readonly<Record<string, Tensor>>,
  children: ReadonlyArray<ChildApply>
) => Tensor
