/**
 * What ConceptMoE's blocks (the concept stage, its chunk module and dechunk, joint-decoding
 * attention) read from the context beyond tensor operations: the pass's ConceptMoE inputs (a
 * converted model's ramp, static-shape feeds, the ratio controller's state), the hand-over inside a
 * concept stage, and the pass's compression measures. Declared here as {@link ConceptOps}, read
 * with `ctx.get(ConceptOps)`, provided by the runtime (`Lower.forward`).
 *
 * State between these blocks goes one way and explicitly. A concept stage runs each child with a
 * {@link StageScope} that gives it what it needs and nothing else: the chunk module a place to hand
 * over its {@link ChunkState}, the dechunk that state and a place to hand over the dechunked concept
 * per token. The scope exists only while that child runs (restored in a `finally`); the concept
 * model runs with none. When the stage is done it reports its chunk state and concept
 * ({@link ConceptOps.finished}): the concept is the side input of the joint-decoding attention
 * after it, and the chunk state is what the runtime's read-only pass view shows (`Lower.PassView`).
 *
 * @since 0.6.0
 */
import { ContextKey, type Tensor, type Tensor2D, type Tf } from "../graph/Apply.ts"
import { withSwapped } from "../internal/Swap.ts"

/** What a concept stage's chunk module hands it, and the stage hands its dechunk. */
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
 * Measured compression of one chunk module's pass: tokens seen, concepts (boundaries), the sum of
 * the boundary probabilities, and the concepts the same pass would have at evaluation (p ≥ ½,
 * forced included). The runtime sums them over the stages of a pass.
 */
export interface Compression {
  readonly tokens: number
  readonly concepts: number
  readonly boundaryProbSum: number
  readonly thresholdConcepts: number
}

/**
 * The same measures on the device, for a chunk module that ran with {@link ConceptFeeds}: concepts,
 * Σ boundary probability, sampled boundaries dropped for want of slots, and the concepts at p ≥ ½
 * (scalars).
 */
export interface DeviceCompression {
  readonly concepts: Tensor
  readonly boundaryProbSum: Tensor
  readonly dropped: Tensor
  readonly threshold: Tensor
}

/**
 * What a concept stage hands the child it is running, for the time that child runs: the chunk
 * module gets `chunked`, the dechunk gets `chunk` and `dechunked`; the concept model gets nothing.
 */
export interface StageScope {
  /** For the chunk module: hands the stage its chunk state. */
  readonly chunked?: (state: ChunkState) => void
  /** For the dechunk: the stage's chunk state. */
  readonly chunk?: ChunkState
  /** For the dechunk: hands the stage the dechunked concept per token `[N, d]`. */
  readonly dechunked?: (concept: Tensor2D) => void
}

/** ConceptMoE's extension of the context (see the module's documentation). */
export interface ConceptOps {
  /**
   * Where a converted model is on its ramp (`train/Convert.ts`), s ∈ [0, 1], or undefined (s = 1,
   * the paper's model): the chunk module floors p at 1 − s·(1 − p) and aims at R_s = 1 + s·(R − 1),
   * and the concept stage hands the dechunk ĉ − (1 − s)·c (c the concept model's input). At s = 0
   * every token is a boundary and the decoder input is the concept model's output: the source MoE.
   */
  readonly ramp: number | undefined
  /** Static-shape training inputs, if the step runs with them. */
  readonly feeds: ConceptFeeds | undefined
  /** The ratio controller's state for this training step (`Chunker.RatioControl`); undefined: its initial state. */
  readonly ratioControl: { readonly integral: number } | undefined
  /** Runs `f` (one child of a concept stage) with `scope`, and restores the one before on every exit path. */
  readonly inStage: <A>(scope: StageScope, f: () => A) => A
  /** What the concept stage running the current node handed it; an empty scope outside one. */
  readonly stage: () => StageScope
  /** Adds a chunk module's measures to the pass's. */
  readonly measure: (m: Compression) => void
  /** Adds a static-shape chunk module's device measures to the pass's. */
  readonly measureDevice: (m: DeviceCompression) => void
  /** The pass's measures so far, and the chunk state of the last concept stage done (read-only). */
  readonly measured: () => { readonly host: Compression; readonly device: DeviceCompression | undefined; readonly chunk: ChunkState | undefined }
  /** A concept stage reports its chunk state and the dechunked concept per token when it is done. */
  readonly finished: (chunk: ChunkState, concept: Tensor2D) => void
  /** The dechunked concept per token of the last concept stage done, for joint-decoding attention; undefined before one. */
  readonly concept: () => Tensor2D | undefined
}

/** The context key of {@link ConceptOps}. */
export const ConceptOps = ContextKey<ConceptOps>("conceptmoe/ConceptOps")

/**
 * The implementation of {@link ConceptOps} for one pass, from the pass's inputs: the runtime
 * provides the key with it (`Lower.forward`). Device measures are summed in stage order.
 */
export const makeConceptOps = (
  tf: Tf,
  inputs: { readonly ramp: number | undefined; readonly feeds: ConceptFeeds | undefined; readonly ratioControl: { readonly integral: number } | undefined }
): ConceptOps => {
  let scope: StageScope = {}
  let last: { readonly chunk: ChunkState; readonly concept: Tensor2D } | undefined
  const host = { tokens: 0, concepts: 0, boundaryProbSum: 0, thresholdConcepts: 0 }
  let device: DeviceCompression | undefined
  return {
    ...inputs,
    inStage: (inner, f) => withSwapped(() => scope, (s) => { scope = s }, inner, f),
    stage: () => scope,
    measure: (m) => {
      host.tokens += m.tokens
      host.concepts += m.concepts
      host.boundaryProbSum += m.boundaryProbSum
      host.thresholdConcepts += m.thresholdConcepts
    },
    measureDevice: (m) => {
      device = device === undefined ? m : {
        concepts: tf.add(device.concepts, m.concepts),
        boundaryProbSum: tf.add(device.boundaryProbSum, m.boundaryProbSum),
        dropped: tf.add(device.dropped, m.dropped),
        threshold: tf.add(device.threshold, m.threshold)
      }
    },
    measured: () => ({ host, device, chunk: last?.chunk }),
    finished: (chunk, concept) => {
      last = { chunk, concept }
    },
    concept: () => last?.concept
  }
}
