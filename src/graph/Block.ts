/**
 * Blocks: a model is a tree of plain, immutable values.
 *
 * A {@link Block} holds a kind, that kind's spec (plain JSON data), an optional name (its path
 * segment) and its children. It holds no tensors. Everything static about a block comes from its
 * {@link BlockKind}: the spec's Schema, its declared input and output feature sizes, its named
 * parameters with shapes, and its cost. Tensors are created only when a graph is lowered.
 *
 * Axis vocabulary used in docs across the library: `batch`, `seq` (tokens), `concepts` (merged
 * positions), `embedding` (model width d), `heads`, `kv_heads`, `head_dim`, `experts`, `neurons`
 * (hidden width of an MLP or expert), `vocab`. A block maps `[batch, seq, in] → [batch, seq, out]`;
 * its {@link Width}s are the feature sizes `in` and `out` (`"ids"` for integer token ids).
 *
 * Feature sizes are tracked in the type: `Block<64, 128>` does not compose after a `Block<32, 64>`
 * in {@link sequence}. Sizes only known at run time (from a config file) are `number` and checked
 * by {@link analyze} instead.
 *
 * @since 0.1.0
 */
import type { Schema } from "effect"
import type { Cost } from "../cost/Cost.ts"
import type { ApplyFn } from "./Apply.ts"

/** A feature size, or `"ids"` for integer token ids. */
export type Width = number | "ids"

/** A parameter tensor a block owns, with its shape. No tensor is allocated. */
export interface ParamDecl {
  /** Name relative to the block ("weight", "experts.up"). */
  readonly name: string
  readonly shape: ReadonlyArray<number>
  /** The part it is reported under ("attention", "experts", "router", "norm", "embedding", ...). */
  readonly part: string
  /**
   * For stacked expert weights: `used` of `of` slices along axis 0 are read per token, so the
   * activated count is numel·used/of.
   */
  readonly active?: { readonly used: number; readonly of: number }
  /**
   * The absolute path of the parameter this one is the same tensor as (a tied LM head). A tied
   * parameter is counted once, at its owner.
   */
  readonly tiedTo?: string
  /** Initialisation: normal(0, std) (default std 0.02), zeros, ones, or the identity (square matrices). */
  readonly init?: "zeros" | "ones" | "identity" | { readonly normal: number }
  /**
   * A buffer: a value the model reads but no gradient reaches (DeepSeek-V3's score-correction bias,
   * which its own balancing rule adjusts outside back-propagation). Stored, loaded and exported as a
   * parameter, but not counted as one (as transformers does not count buffers).
   */
  readonly buffer?: true
}

/** A parameter with its absolute path, as listed by analysis. */
export interface ParamEntry extends ParamDecl {
  readonly path: string
  readonly numel: number
}

/** What a kind's `cost` receives. */
export interface CostContext {
  readonly path: string
  /** This block's own parameters, resolved. Their counts are added by the analyzer. */
  readonly params: ReadonlyArray<ParamEntry>
  /** The full costs of the children, in order. */
  readonly children: ReadonlyArray<Cost>
}

/**
 * A block kind: one per file under `src/blocks/` (or in your own code). Adding a kind needs no edit
 * elsewhere; register it in a {@link Registry} only to read graphs that name it from JSON.
 */
export interface BlockKind<S = any> {
  /** Unique name, also used in JSON graphs and tables. */
  readonly name: string
  readonly summary: string
  /** Decodes and validates a spec (cross-field checks included). */
  readonly spec: Schema.Decoder<S>
  /** Declared input and output sizes from the (raw) spec and children. Never throws. */
  readonly io: (spec: any, children: ReadonlyArray<Block>) => { readonly in: Width; readonly out: Width }
  /** Connectivity checks of a combinator over its children: each message is a problem. */
  readonly connect?: (spec: S, children: ReadonlyArray<Block>) => ReadonlyArray<string>
  /**
   * Positions child `index` runs on per input token of this block (default 1). A concept stage
   * runs its concept model at 1/R. Only used to put per-token figures in the per-path rows; the
   * kind's own `cost` applies the rate to the totals.
   */
  readonly childRate?: (spec: S, index: number) => number
  /** Own parameters (leaves). */
  readonly params?: (spec: S) => ReadonlyArray<ParamDecl>
  /**
   * Compute, attention and KV terms. Parameter counts of own params are added by the analyzer,
   * so a leaf returns only its FLOPs and terms; a combinator returns its children's combined cost.
   */
  readonly cost: (spec: S, ctx: CostContext) => Cost
  /** How the block runs on tensors (see `Apply.ts`). Kinds without one cannot be lowered. */
  readonly apply?: ApplyFn<S>
  /**
   * How `apply` behaves when a sequence arrives in pieces (prefill, then decode with caches):
   * `"local"` — the kind itself mixes no positions (each output position reads only its own input
   * position, `ctx.stream.positions` and its children); `"stateful"` — it mixes positions and keeps what
   * it needs across pieces through `ctx.cache`. Kinds without it cannot be decoded incrementally.
   */
  readonly stream?: "local" | "stateful"
}

declare const WidthIn: unique symbol
declare const WidthOut: unique symbol

/** A node of a model graph: a kind, its spec, a name and children. Immutable. */
export interface Block<In extends Width = Width, Out extends Width = Width> {
  readonly kind: BlockKind
  readonly spec: unknown
  readonly name: string | undefined
  readonly children: ReadonlyArray<Block>
  /** Declared input size. */
  readonly in: In
  /** Declared output size. */
  readonly out: Out
  /** Phantom markers so `Block<A, B>` is invariant in its sizes. */
  readonly [WidthIn]?: (w: In) => In
  readonly [WidthOut]?: (w: Out) => Out
}

/** Any block, whatever its sizes. */
export type AnyBlock = Block<any, any>

/**
 * Builds a node. Kind files wrap this in typed constructors.
 *
 * @category constructors
 */
export const make = <In extends Width = Width, Out extends Width = Width>(
  kind: BlockKind,
  spec: unknown,
  options?: { readonly name?: string | undefined; readonly children?: ReadonlyArray<AnyBlock> }
): Block<In, Out> => {
  const children = options?.children ?? []
  const io = kind.io(spec, children)
  return Object.freeze({
    kind,
    spec,
    name: options?.name,
    children: Object.freeze([...children]),
    in: io.in as In,
    out: io.out as Out
  })
}

/**
 * Returns the block with a new name (its path segment). Data-first.
 *
 * @category combinators
 */
export const named = <B extends AnyBlock>(block: B, name: string): B => Object.freeze({ ...block, name }) as B

/** The part of a kind's spec every leaf accepts: an optional name. */
export interface Named {
  readonly name?: string
}

/** Splits the `name` off a constructor argument. */
export const splitName = <T extends Named>(spec: T): { readonly name: string | undefined; readonly spec: Omit<T, "name"> } => {
  const { name, ...rest } = spec
  return { name, spec: rest }
}

/** Defines a leaf kind's typed constructor: `(spec & {name?}) → Block`. */
export const leaf = <In extends Width, Out extends Width>(kind: BlockKind, spec: object): Block<In, Out> => {
  const { name, spec: rest } = splitName(spec as Named)
  return make<In, Out>(kind, rest, { name })
}

/** Product of a shape. */
export const numel = (shape: ReadonlyArray<number>): number => shape.reduce((a, b) => a * b, 1)
