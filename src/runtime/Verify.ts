/**
 * The executed-cost check: run one forward pass, count the matmul FLOPs the kernels actually did,
 * and compare them with the static cost, evaluated at the compression each concept stage measured.
 *
 * @since 0.1.0
 */
import * as Cost from "../cost/Cost.ts"
import type { Analysis } from "../graph/Analyze.ts"
import type { FlopCounter } from "../graph/Apply.ts"
import { forward, type Batch, type ForwardOptions, type Lowered, recordReads, replay, runtimeParamCount } from "./Lower.ts"

export interface VerifyReport {
  readonly params: { readonly static: number; readonly runtime: number }
  readonly flops: {
    /** Static forward weight-matmul FLOPs of the batch at the target ratio. */
    readonly static: number
    /** Static forward weight-matmul FLOPs of the batch at the measured ratio. */
    readonly staticAtMeasured: number
    /** Weight-matmul FLOPs the kernels executed. */
    readonly executed: number
    readonly attentionMapStatic: number
    /** The static map without sliding windows: what a runtime that masks (rather than skips) executes. */
    readonly attentionMapDense: number
    readonly attentionMapExecuted: number
    /** Other matmuls executed (the dechunk EMA as a matrix product): not model FLOPs. */
    readonly otherExecuted: number
  }
  readonly compression?: { readonly target: number; readonly actual: number; readonly tokens: number; readonly concepts: number }
  readonly tokens: number
}

interface StageInfo {
  readonly path: string
  readonly ratio: number
  /** Per-position FLOPs of its concept model. */
  readonly bodyPerPosition: number
}

const stagesOf = (a: Analysis): ReadonlyArray<StageInfo> =>
  a.rows.filter((r) => r.kind === "concept-stage").map((r) => {
    const ratio = (a.specs.get(r.path) as { ratio: number }).ratio
    const body = a.rows.find((x) => x.depth === r.depth + 1 && x.path.startsWith(`${r.path}/`) && x.kind !== "chunk" && x.kind !== "dechunk")!
    return { path: r.path, ratio, bodyPerPosition: body.flops * ratio }
  })

/** Static weight FLOPs of `tokens` tokens when the stages made `concepts` concepts. */
export const staticFlopsAt = (a: Analysis, tokens: number, concepts: number | undefined): number => {
  const perToken = Cost.matmulPerToken(a.cost)
  const stages = stagesOf(a)
  if (stages.length === 0 || concepts === undefined) return perToken * tokens
  let total = perToken * tokens
  for (const s of stages) total += s.bodyPerPosition * (concepts / stages.length) - (s.bodyPerPosition / s.ratio) * tokens
  return total
}

/** Static attention-map FLOPs of a batch whose concept stages made `conceptsPerRow` concepts per row. */
export const staticAttentionAt = (
  a: Analysis,
  rows: number,
  length: number,
  conceptsPerRow: ReadonlyArray<number> | undefined,
  dense = false
): number => {
  const stages = stagesOf(a).map((s) => s.path)
  let total = 0
  for (const t of a.cost.attention) {
    const inStage = stages.some((p) => t.path.startsWith(`${p}/`))
    const perPair = t.passes * 2 * t.heads * (t.dQK + t.dV)
    if (inStage && conceptsPerRow !== undefined) {
      for (const m of conceptsPerRow) total += perPair * Cost.attendedPairs(m, dense ? null : t.window, false)
    } else {
      total += rows * perPair * Cost.attendedPairs(t.rate * length, dense ? null : t.window, false)
    }
  }
  return total
}

/**
 * Runs one forward pass (evaluation mode, MoE dispatch sparse: the activated experts only) and
 * compares executed with static costs. `read` supplies host reads (see {@link verifyAsync}).
 */
export const verify = (m: Lowered, batch: Batch, seed = 0, read?: ForwardOptions["read"]): VerifyReport => {
  const { tf } = m
  let flops: FlopCounter = { weights: 0, attentionMap: 0, other: 0 }
  let compression = { tokens: 0, concepts: 0 }
  let perRow: ReadonlyArray<number> | undefined
  tf.tidy(() => {
    const { ctx } = forward(m, batch, { training: false, seed, dispatch: "sparse", ...(read === undefined ? {} : { read }) })
    flops = { ...ctx.flops }
    compression = { tokens: ctx.compression.tokens, concepts: ctx.compression.concepts }
    // the pass's read-only measures (Lower.PassContext): the last concept stage's concepts per row
    perRow = ctx.chunk?.concepts
  })
  const tokens = batch.rows * batch.length
  const a = m.analysis
  const stages = stagesOf(a)
  const concepts = stages.length > 0 ? compression.concepts : undefined
  return {
    params: { static: Cost.total(a.cost.params), runtime: runtimeParamCount(m) },
    flops: {
      static: Cost.matmulPerToken(a.cost) * tokens,
      staticAtMeasured: staticFlopsAt(a, tokens, concepts),
      executed: flops.weights,
      attentionMapStatic: staticAttentionAt(a, batch.rows, batch.length, stages.length > 0 ? perRow : undefined),
      attentionMapDense: staticAttentionAt(a, batch.rows, batch.length, stages.length > 0 ? perRow : undefined, true),
      attentionMapExecuted: flops.attentionMap,
      otherExecuted: flops.other
    },
    ...(stages.length > 0
      ? {
        compression: {
          target: stages[0]!.ratio,
          actual: compression.concepts === 0 ? Infinity : compression.tokens / compression.concepts,
          tokens: compression.tokens,
          concepts: compression.concepts
        }
      }
      : {}),
    tokens
  }
}

/** {@link verify} for backends that read only asynchronously (webgpu in Node): reads recorded first. */
export const verifyAsync = async (m: Lowered, batch: Batch, seed = 0): Promise<VerifyReport> => {
  const reads = await recordReads(m, batch, { training: false, seed, dispatch: "sparse" })
  return verify(m, batch, seed, replay(reads))
}
