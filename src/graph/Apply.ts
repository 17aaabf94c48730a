/**
 * The lowering contract: how a block kind runs on tensors.
 *
 * A kind's optional `apply` receives a {@link ForwardContext} (the tfjs namespace, the mode, the
 * batch layout, side inputs, and collectors for auxiliary losses and executed FLOPs), its decoded
 * spec, its input, its own parameters by name, and its children as callables. Only *types* come
 * from tfjs here, so the graph and cost rooms never load a tensor library.
 *
 * Layout: the token stream is `[rows · T, d]` (rows of equal length T). Inside a concept stage the
 * concept model sees the packed concepts of every row, `[Σ M_b, d]`, with `layout.rows = [M_0, …]`;
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

/** State a ConceptMoE stage hands from its chunk module to its dechunk and the decoder. */
export interface ChunkState {
  /** Token-stream input of the stage `[N, d]`. */
  readonly h: Tensor2D
  /** Boundary probabilities `[N]`. */
  readonly p: Tensor
  /** Boundaries per token (host copy), row-major. */
  readonly boundaries: Uint8Array
  /**
   * Concept index each token receives after dechunking (ψ), global over rows. Decoding
   * incrementally, it indexes `[carried concept of each row; this piece's new concepts]`.
   */
  readonly receive: Int32Array
  /** Concepts per row (new concepts of this piece, when decoding). */
  readonly concepts: ReadonlyArray<number>
  /**
   * Set instead of the host arrays when the stage runs with static shapes ({@link ConceptFeeds}):
   * boundaries `b [N]` (float 0/1), the slot each token receives `receive [N]` (int32, row·C + index
   * of its concept), every row padded to `capacity` concept slots.
   */
  readonly slots?: { readonly b: Tensor; readonly receive: Tensor; readonly capacity: number; readonly documentStart: Tensor }
}

/**
 * Device inputs that let a ConceptMoE training step run with static shapes, so that it can be
 * recorded and replayed (`train/Captured.ts`): every row gets `ceil(capacity·T/R)` concept slots
 * (at most T), the Bernoulli draws come in as `random [N]` (the host generator's values, in the
 * order the host path would draw them, 0 at forced boundaries) and the document starts as
 * `documentStart [N]` (1 where a new document starts inside a row). Sampled boundaries that would
 * overflow a row's slots are dropped, keeping room for the forced ones still to come.
 */
export interface ConceptFeeds {
  readonly random: Tensor
  readonly documentStart: Tensor
  readonly capacity: number
  /**
   * The ratio controller's integral (`Chunker.RatioControl`) as a scalar tensor, so that a recorded
   * step replays with each step's value instead of the one it was recorded with. Without it the
   * pass's `ratioControl` is used as a constant.
   */
  readonly ratioIntegral?: Tensor
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

export interface ForwardContext {
  readonly tf: Tf
  readonly training: boolean
  /** Set while decoding incrementally: the input holds only the new positions of each row. */
  readonly cache: DecodeCache | undefined
  /** Where the running node is: its path, with `#pass` after a loop's path for each pass. */
  scope: string
  /** Row lengths of the current stream (all T at token level). */
  layout: ReadonlyArray<number>
  /** Positions of each element of the current stream within its row (for rotary). */
  positions: Int32Array
  /**
   * `positions` as an int32 tensor, made once per positions array (or fed: a captured step's input)
   * and shared by every block that needs it.
   */
  readonly positionIds: () => Tensor
  /** Values derived once per forward pass and positions array (rotary tables), by key. */
  readonly memo: <T>(key: string, make: () => T) => T
  /** Row starts that begin a new document (forced boundaries), as flat token indices. */
  readonly documentStarts: ReadonlySet<number>
  /**
   * The document of each position of the current stream within its row (0 from the row's start,
   * +1 at each document start), float32 `[N]` off the tape, or undefined when every row is one
   * document. Attention keeps each query within its own document (a block-diagonal mask); a concept
   * stage sets its concepts' documents for the concept model.
   */
  documents: (() => Tensor) | undefined
  /**
   * Where a converted model is on its ramp (`train/Convert.ts`), s ∈ [0, 1], or undefined (s = 1,
   * the paper's model): the chunk module floors p at 1 − s·(1 − p) and aims at R_s = 1 + s·(R − 1),
   * and the concept stage hands the dechunk ĉ − (1 − s)·c (c the concept model's input). At s = 0
   * every token is a boundary and the decoder input is the concept model's output: the source MoE.
   */
  readonly ramp: number | undefined
  /** The dechunked concept per token, for joint-decoding attention (set by a concept stage). */
  concept: Tensor2D | undefined
  /** Chunk state of the innermost concept stage. */
  chunk: ChunkState | undefined
  /** Auxiliary losses, already weighted, summed into the training loss. */
  readonly auxLosses: Array<Tensor>
  /** Executed matmul FLOPs, when counting. */
  readonly flops: FlopCounter
  /**
   * Measured compression: tokens and concepts seen by concept stages, the sum of their boundary
   * probabilities, and the concepts the same pass would have at evaluation (p ≥ ½, forced included).
   */
  readonly compression: { tokens: number; concepts: number; boundaryProbSum: number; thresholdConcepts: number }
  /**
   * With {@link ConceptFeeds}: the same measures on the device (concepts, Σ boundary probability,
   * sampled boundaries dropped for want of slots), summed over the stages.
   */
  deviceCompression: { readonly concepts: Tensor; readonly boundaryProbSum: Tensor; readonly dropped: Tensor; readonly threshold: Tensor } | undefined
  /** Static-shape ConceptMoE training inputs, if the step runs with them. */
  readonly conceptFeeds: ConceptFeeds | undefined
  /**
   * Which positions of the current stream are real (1) or padding (0), `[N]` float32; undefined
   * when all are. Set by a static-shape concept stage for its concept model (MoE balance losses
   * count the real positions only).
   */
  valid: Tensor | undefined
  /** A deterministic seed source for sampling. */
  readonly nextSeed: () => number
  /** The ratio controller's state for this training step (`Chunker.RatioControl`); undefined: its initial state. */
  readonly ratioControl?: { readonly integral: number } | undefined
  /** Matmul with explicit-transpose gradients, counted under `category`. */
  readonly matMul: (a: Tensor, b: Tensor, category: keyof FlopCounter) => Tensor
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
  /** Softmax over the last axis of `scores [..., n, len]·scale + mask [n, len]` (no gradient into the mask; fused where the runtime can). */
  readonly softmax: (scores: Tensor, scale: number, mask: Tensor) => Tensor
  /** 1 where a score of `scores [n, E]` is among the `k` largest of its row, else 0 (no gradient; fused where the runtime can). */
  readonly topMask: (scores: Tensor, k: number) => Tensor
  /** `x [o, ...rest]` → `[o, times, ...rest]`, every row `times` times (fused where the runtime can). */
  readonly repeat: (x: Tensor, times: number) => Tensor
  /** An MoE dense dispatch's combine: `ys [E, n, d]`, `gates [n, E]` → Σ_e gates[n, e]·ys[e, n, :] (fused where the runtime can). */
  readonly combine: (ys: Tensor, gates: Tensor) => Tensor
  /**
   * An MoE layer's routing tables for `mask [n, E]` (k experts per token) in a layout of rows by
   * capacity or by groups of `tile` rows per expert: `slots [E, n]` (the row of pair (i, e), or −1),
   * `tokens [rows]` (each row's pair as e·n + i, or −1) and, by tile, `groups` (each group's
   * expert); earlier tokens first; no gradient (fused where the runtime can; `Fused.makeRoute`).
   */
  readonly route: (mask: Tensor, layout: RouteLayout, k: number) => {
    readonly slots: Tensor
    readonly tokens: Tensor
    readonly groups?: Tensor
  }
  /** `x [n, d]` → `[rows, d]`: each row's token (zeros where empty), by {@link route}'s tables. */
  readonly toSlots: (x: Tensor, tokens: Tensor, slots: Tensor) => Tensor
  /** `ys [rows, d]` → `[n, d]`: Σ_e w[i, e]·ys[slots[e, i]] over the experts that kept token i. */
  readonly fromSlots: (ys: Tensor, slots: Tensor, tokens: Tensor, w: Tensor) => Tensor
  /** `w [E, ...]` → `[G, ...]`: each group's expert's parameter (differentiable in w). */
  readonly gatherGroups: (w: Tensor, groups: Tensor) => Tensor
  /**
   * `x [G, T, a]` times each group's expert's matrix of `w [E, a, b]` → `[G, T, b]`, counted as
   * weight FLOPs; the same as `matMul(x, gatherGroups(w, groups))`, where the runtime can without
   * the gather (`MatMul.makeGroupedMatMul`).
   */
  readonly groupedMatMul: (x: Tensor, w: Tensor, groups: Tensor) => Tensor
  /** Rotary embedding of the first `dim` features of `x [n, heads, hd]` with tables `cos`, `sin [n, 1, dim/2]`. */
  readonly rotate: (x: Tensor, dim: number, cos: Tensor, sin: Tensor) => Tensor
  /**
   * Host values of a tensor, for the decisions a block takes on the host (MoE routing, chunk
   * boundaries). Sync backends read at once; on a backend that can only read asynchronously (webgpu
   * in Node) the runtime replays values read in an earlier pass (`Lower.recordReads`).
   */
  readonly read: (t: Tensor) => Float32Array | Int32Array
  /** How MoE layers dispatch (see {@link Dispatch}). */
  readonly dispatch: Dispatch
  /**
   * Token-expert pairs routed and kept by capacity dispatches, summed over the layers (on the device;
   * undefined until a layer dispatches by capacity).
   */
  expertRouting: { readonly routed: Tensor; readonly kept: Tensor } | undefined
  /** A float32 one-hot that is correct on every backend. */
  readonly oneHot: (indices: Tensor, depth: number) => Tensor
  /** Weights of auxiliary losses. */
  readonly lossWeights: { readonly balance: number }
}

/**
 * How MoE layers dispatch: `sparse` reads the routing back and runs each expert on its tokens
 * (executed FLOPs = activated FLOPs, nothing dropped). The others stay on the device (no read):
 * `dense` runs every expert on every token, weighted by a gate that is zero outside the top-k (E/k
 * times the expert FLOPs); `grouped` sorts the token-expert pairs by expert into groups of rows of
 * one expert each (an expert's last group padded) and runs each group with its expert's weights
 * (nothing dropped; static shapes, so every step runs the worst case, n·k rows plus room for each
 * expert's padding); `{ capacity: c }` runs each expert on
 * `ceil(c·n·k/E)` rows (at most n) filled by its tokens in order, and a token-expert pair that finds
 * its expert's rows full is dropped (its output from that expert is zero), as in GShard and the
 * Switch Transformer (c·k/E of dense's expert FLOPs; c ≥ E/k never drops).
 */
export type Dispatch = "sparse" | "dense" | "grouped" | { readonly capacity: number }

/**
 * Where an MoE layer's token-expert pairs go, without reading the routing back:
 * `{ capacity: C }` gives each expert C rows (expert e's at e·C); `{ tile: T }` packs the pairs
 * expert by expert, each expert's rows padded to a multiple of T (a group), nothing dropped.
 */
export type RouteLayout = { readonly capacity: number } | { readonly tile: number }

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
