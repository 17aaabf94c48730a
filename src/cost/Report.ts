/**
 * The budget report: what `conceptmoe budget --format json` prints, computed from an analysis.
 *
 * @since 0.1.0
 */
import * as Cost from "./Cost.ts"
import { type StageCost, stageCosts, type StageDef } from "./Stages.ts"

/** How every number in a report is counted. Printed with every report. */
export const conventions = {
  flopsPerMultiplyAdd: 2,
  matmulPerToken:
    "forward matmul FLOPs per token of the weights a token uses: attention projections, top-k routed and shared experts, router and gates, LM head. Not counted: the input-embedding lookup, norms, activations, softmax, top-k selection, bias and residual adds.",
  attentionMap:
    "forward QKᵀ and AV FLOPs over one sequence of seqLen tokens, full T×T (non-causal: FlopCounterMode, PaLM, Chinchilla); attentionMapCausal counts the T(T+1)/2 pairs a causal mask keeps",
  forward: "seqLen · matmulPerToken + attentionMap",
  training: "3 × forward (backward = 2 × forward, for matmuls and the attention map alike)",
  totalParams: "sum(p.numel()) of the model with tied weights counted once; buffers are not parameters",
  activatedParams:
    "parameters one token touches in a forward pass, counting the whole input embedding and LM head (Mixtral, Qwen, OLMoE); DeepSeek's convention is activatedExclInputEmbedding",
  loops: "a looped block counts its parameters once and its compute, attention map and KV cache once per pass",
  kvCache: "K and V of every attention layer per position (MLA: its latent, kv_lora_rank + qk_rope_head_dim); bytesPerElement as given",
  excluded: "flops.excluded.rotaryTable: transformers' inv_freq outer product, ropeDim·T per forward",
  otherConventions: {
    flopCounterModeForward:
      "forward FLOPs of the whole sequence as torch FlopCounterMode counts them (eager experts): forward + rotaryTable",
    palmTrainingPerToken: "PaLM App. B 6N + 12·L·H·Q·T with N the matmul weights a token uses: 3 × (matmulPerToken + attentionMap/T)",
    megatronTrainingPerToken:
      "Megatron-LM num_floating_point_operations per token: router excluded, causal map as T/2 keys: 3 × (matmulPerToken − router + attentionMap/(2T))",
    kaplanTrainingPerToken:
      "Kaplan et al. 2020 6N + 6·n_layer·n_ctx·d_attn with N the activated non-embedding params and d_attn = H·d_qk; no LM head",
    sixNActivePerToken: "6 × activated params (both embeddings)",
    sixNTotalPerToken: "6 × total params (every expert, as transformers' floating_point_ops does for MoE)"
  }
} as const

export interface BudgetReport {
  readonly model: { readonly name: string; readonly format: string; readonly file: string }
  readonly seqLen: number
  readonly params: {
    readonly total: number
    readonly activated: number
    readonly activatedExclInputEmbedding: number
    readonly activatedNonEmbedding: number
    readonly embedding: number
    readonly lmHead: number
    readonly lmHeadTied: boolean
    readonly byPart: Cost.Parts
    readonly activatedByPart: Cost.Parts
  }
  readonly flops: {
    readonly matmulPerToken: number
    readonly byPart: Cost.Parts
    /** Sequence totals are exact: a bigint above 2^53 − 1 (see {@link Cost.Exact}, {@link stringifyExact}). */
    readonly attentionMap: Cost.Exact
    readonly attentionMapCausal: Cost.Exact
    readonly forward: Cost.Exact
    readonly forwardCausal: Cost.Exact
    readonly training: Cost.Exact
    /** A ratio (training / seqLen), as a double. */
    readonly trainingPerToken: number
    readonly excluded: { readonly rotaryTable: number }
    /** The same model counted the ways other tools count it (see conventions.otherConventions). */
    readonly otherConventions: {
      readonly flopCounterModeForward: Cost.Exact
      readonly palmTrainingPerToken: number
      readonly megatronTrainingPerToken: number
      readonly kaplanTrainingPerToken: number
      readonly sixNActivePerToken: number
      readonly sixNTotalPerToken: number
    }
  }
  readonly kvCache: {
    readonly bytesPerElement: number
    readonly elementsPerToken: number
    readonly bytesPerToken: number
    /** KV-cache elements and bytes after seqLen tokens. */
    readonly elements: Cost.Exact
    readonly bytes: Cost.Exact
  }
  /** Per-stage costs, for graphs with stages (ConceptMoE). */
  readonly stages?: Record<string, StageCost>
  readonly conventions: typeof conventions
}

/** Parameter totals in each convention. */
export const paramSummary = (a: Cost.Costed) => {
  const total = Cost.total(a.cost.params)
  const activated = Cost.total(a.cost.activated)
  const embedding = Cost.part(a.cost.params, "embedding")
  let lmHead = 0
  let tiedHead = 0
  for (const p of a.params) {
    if (p.part !== "lmHead") continue
    lmHead += p.numel
    if (p.tiedTo !== undefined) tiedHead += p.numel
  }
  return {
    total,
    activated,
    activatedExclInputEmbedding: activated - embedding + tiedHead,
    activatedNonEmbedding: activated - embedding - (lmHead - tiedHead),
    embedding,
    lmHead,
    lmHeadTied: tiedHead > 0
  }
}

/**
 * The report of one model at one sequence length.
 *
 * @category reports
 */
export const budgetReport = (
  model: { readonly name: string; readonly format: string; readonly file: string; readonly analysis: Cost.Costed },
  options: { readonly seqLen: number; readonly bytesPerElement?: number; readonly stages?: ReadonlyArray<StageDef> }
): BudgetReport => {
  const c = model.analysis.cost
  const T = options.seqLen
  const bytesPerElement = options.bytesPerElement ?? 2
  const matmulPerToken = Cost.matmulPerToken(c)
  const attentionMap = Cost.attentionMapFlopsExact(c, T, false)
  const attentionMapCausal = Cost.attentionMapFlopsExact(c, T, true)
  const forward = Cost.plus(Cost.product(T, matmulPerToken), attentionMap)
  const forwardCausal = Cost.plus(Cost.product(T, matmulPerToken), attentionMapCausal)
  const elements = Cost.kvElementsExact(c, T)
  const elementsPerToken = Cost.kvElementsPerToken(c)
  const params = paramSummary(model.analysis)
  const rotaryTable = Cost.rotaryTableFlops(c, T)
  let dAttn = 0
  for (const t of c.attention) dAttn += t.passes * t.rate * t.heads * t.dQK
  return {
    model: { name: model.name, format: model.format, file: model.file },
    seqLen: T,
    params: { ...params, byPart: c.params, activatedByPart: c.activated },
    flops: {
      matmulPerToken,
      byPart: c.flops,
      attentionMap,
      attentionMapCausal,
      forward,
      forwardCausal,
      training: Cost.product(3, forward),
      trainingPerToken: (3 * Cost.toNumber(forward)) / T,
      excluded: { rotaryTable },
      otherConventions: {
        flopCounterModeForward: Cost.plus(forward, rotaryTable),
        palmTrainingPerToken: 3 * (matmulPerToken + Cost.toNumber(attentionMap) / T),
        megatronTrainingPerToken: 3 * (matmulPerToken - Cost.part(c.flops, "router") + Cost.toNumber(attentionMap) / (2 * T)),
        kaplanTrainingPerToken: 6 * params.activatedNonEmbedding + 6 * T * dAttn,
        sixNActivePerToken: 6 * params.activated,
        sixNTotalPerToken: 6 * params.total
      }
    },
    kvCache: {
      bytesPerElement,
      elementsPerToken,
      bytesPerToken: elementsPerToken * bytesPerElement,
      elements,
      bytes: Cost.product(elements, bytesPerElement)
    },
    ...(options.stages === undefined ? {} : { stages: stageCosts(model.analysis, options.stages, { seqLen: T, bytesPerElement }) }),
    conventions
  }
}

/**
 * `JSON.stringify` that writes every bigint as a JSON number, digit for digit (JSON numbers have
 * no size limit; `JSON.stringify` itself refuses bigints). A reader that parses numbers as doubles
 * rounds those above 2^53 − 1; one that keeps the text (Python's `json`, `JSON.parse` with a
 * reviver's source text) reads them exactly.
 */
export const stringifyExact = (value: unknown, indent?: number): string => {
  // a marker no string in `value` can contain: it is escaped as \u0000 in the output
  const mark = `\u0000${Math.random().toString(36).slice(2)}:`
  const text = JSON.stringify(value, (_k, v: unknown) => (typeof v === "bigint" ? `${mark}${v}` : v), indent)
  const escaped = JSON.stringify(mark).slice(1, -1)
  return text.split(`"${escaped}`).map((piece, i) => (i === 0 ? piece : piece.replace(/^(-?\d+)"/, "$1"))).join("")
}
