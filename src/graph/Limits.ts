/**
 * The limits every config, graph and command-line value is checked against before anything is
 * built or allocated. Each is far above any published model (DeepSeek-V3: 61 layers, width 7,168,
 * 256 experts, top-8, vocabulary 129,280, context 163,840) and low enough that the cost of the
 * largest accepted config is computed in seconds and its counts stay exact. A value past a limit
 * is refused with a typed error that names the field and the limit. docs/reliability.md lists them.
 *
 * @since 0.2.0
 */
import { Schema } from "effect"

export const limits = {
  /**
   * Transformer layers of a config (`layers`, `num_hidden_layers`, `n_layer`): costing takes about
   * 0.15 ms per layer (bench/budget.ts layers), so the largest config is costed in about 2 s.
   */
  layers: 16_384,
  /** Model width (`hidden`, `hidden_size`, `n_embd`) and any projection width. */
  width: 1 << 20,
  /** Hidden width of an FFN or expert (`ffnHidden`, `expertHidden`, `intermediate_size`, ...). */
  ffnWidth: 1 << 24,
  /** Attention heads, KV heads, and the size of one head. */
  heads: 1 << 16,
  headDim: 1 << 16,
  /** Routed experts of one MoE layer, and the experts one token activates. */
  experts: 1 << 20,
  topK: 1 << 20,
  /** Vocabulary size. */
  vocab: 1 << 24,
  /** Context length of a model, and any sequence length asked of it. */
  seqLen: 1 << 24,
  /** Passes of a looped block. */
  loopTimes: 1 << 10,
  /**
   * Work of one reallocation search, in layers of candidate models built and costed: about 150 µs
   * a layer on a loaded 2-core machine, so at most about 30–40 s. The largest search of the examples
   * (examples/hf/qwen3-30b-a3b.json, topk, overheads included) needs 127,536; a loop search tries every loop depth, so its work grows with the square
   * of the layer count (a 400-layer baseline would need millions).
   */
  solverLayers: 200_000,
  /** Nesting depth and node count of a graph written node by node (the built-ins nest at most 7 deep). */
  depth: 256,
  nodes: 200_000
} as const

export type LimitName = keyof typeof limits

/** `1,048,576`: a limit as the messages print it. */
export const formatLimit = (n: number): string => n.toLocaleString("en-US")

/** 2^53 − 1, as the messages print it. */
export const safeText = formatLimit(Number.MAX_SAFE_INTEGER)

/**
 * A positive integer no larger than `limits[name]`; the message names the limit. Use for config
 * fields (the Schema failure carries the field's path).
 */
export const DimAtMost = (name: LimitName) =>
  Schema.Int.pipe(
    Schema.check(Schema.isGreaterThan(0)),
    Schema.check(Schema.makeFilter<number>((n) =>
      n <= limits[name] ? undefined : `Expected at most ${formatLimit(limits[name])} (the limit on ${name}), got ${n}`
    ))
  )

/** A non-negative integer no larger than `limits[name]`. */
export const CountAtMost = (name: LimitName) =>
  Schema.Int.pipe(
    Schema.check(Schema.isGreaterThanOrEqualTo(0)),
    Schema.check(Schema.makeFilter<number>((n) =>
      n <= limits[name] ? undefined : `Expected at most ${formatLimit(limits[name])} (the limit on ${name}), got ${n}`
    ))
  )
