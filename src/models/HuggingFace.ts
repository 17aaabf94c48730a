/**
 * Hugging Face `config.json` import: a transformers config becomes a {@link DecoderConfig} (and so a
 * graph) whose total parameter count equals `sum(p.numel())` of the transformers model built from
 * that config, tied weights counted once.
 *
 * One Schema per `model_type`, with transformers' defaults for absent keys and cross-field checks
 * that name the config field at fault. Supported: gpt2, llama, mistral, mixtral, qwen2_moe,
 * qwen3_moe, deepseek_v2, deepseek_v3, olmoe.
 *
 * Conventions that follow transformers (see docs/cost-model.md):
 * - DeepSeek-V3's `e_score_correction_bias` is a buffer in transformers, not a parameter, so it is
 *   not counted (DeepSeek's "671B" includes it: +256 per MoE layer).
 * - DeepSeek's multi-token-prediction layers (`num_nextn_predict_layers`) are not built by
 *   transformers and not counted.
 * - DeepSeek's routing: group-limited top-k (`n_group`, `topk_group`; V2 with `topk_method:
 *   group_limited_greedy` scoring a group by its best probability, V3 always, by the sum of its two
 *   best) and `routed_scaling_factor` (V3 after renormalising, V2 only when it does not renormalise)
 *   as transformers; an absent `n_group` means no groups (transformers' V3 default is 8). V3's
 *   score-correction bias, a buffer, is not modelled: its top-k is over the plain scores.
 * - `rope_scaling` of type `linear` or `yarn` (`rope_type`, or the older `type`) scales the rotary
 *   frequencies as transformers' rope init functions do (`blocks/Rotary.ts`, {@link ropeScalingOf});
 *   DeepSeek under it also multiplies its attention scale by `mscale_all_dim`'s mscale squared. Other
 *   types (`dynamic`, `longrope`, `llama3`) are read but not applied (plain RoPE; `import` says so).
 *
 * @since 0.1.0
 */
import { Schema } from "effect"
import type { Activation } from "../blocks/MLP.ts"
import { CountAtMost, DimAtMost, limits, type LimitName } from "../graph/Limits.ts"
import { crossCheck, PositiveNumber, withDefault } from "../graph/Spec.ts"
import type { RopeScaling } from "../blocks/Rotary.ts"
import { attentionMixer, type DecoderConfig, type DecoderLayer, type FFN, type Mixer } from "./Decoder.ts"

const optionalDim = (limit: LimitName) => Schema.optionalKey(Schema.NullOr(DimAtMost(limit)))
const bool = (v: boolean) => withDefault(Schema.Boolean, v)
const dim = (limit: LimitName, v: number) => withDefault(DimAtMost(limit), v)
const count = (limit: LimitName, v: number) => withDefault(CountAtMost(limit), v)
const num = (v: number) => withDefault(PositiveNumber, v)

/** The head size divides the width, and is even: every model checked with this uses rotary positions, which rotate pairs. */
const headsDivide = (hidden: string, heads: string) => (c: Record<string, unknown>) => {
  const h = c[hidden] as number
  const n = c[heads] as number
  const given = c["head_dim"] as number | null | undefined
  if (given == null && h % n !== 0) return [heads, `${hidden} (${h}) is not divisible by ${heads} (${n}) and no head_dim is given`] as const
  if (given != null && given % 2 !== 0) return ["head_dim", `head_dim (${given}) is odd; rotary positions need an even head size`] as const
  if (given == null && (h / n) % 2 !== 0) {
    return [heads, `${hidden} (${h}) / ${heads} (${n}) gives a head size of ${h / n}, which is odd; rotary positions need an even head size`] as const
  }
  return undefined
}
const kvDivide = (c: Record<string, unknown>) => {
  const n = c["num_attention_heads"] as number
  const kv = c["num_key_value_heads"] as number | null | undefined
  return kv != null && n % kv !== 0
    ? ["num_key_value_heads", `num_attention_heads (${n}) is not a multiple of num_key_value_heads (${kv})`] as const
    : undefined
}
const topKFits = (experts: string) => (c: Record<string, unknown>) => {
  const e = c[experts] as number
  const k = c["num_experts_per_tok"] as number
  return k > e ? ["num_experts_per_tok", `num_experts_per_tok (${k}) exceeds ${experts} (${e})`] as const : undefined
}
const all = (...checks: ReadonlyArray<(c: Record<string, unknown>) => readonly [string, string] | undefined>) =>
<S extends Schema.Top>(self: S): S["Rebuild"] =>
  self.check(crossCheck<S["Type"]>((c) => {
    for (const f of checks) {
      const bad = f(c as Record<string, unknown>)
      if (bad !== undefined) return bad
    }
    return undefined
  }))

/** `rope_scaling` as transformers configs write it (the keys read; others are ignored). */
const HfRopeScaling = Schema.Struct({
  rope_type: Schema.optionalKey(Schema.String),
  type: Schema.optionalKey(Schema.String),
  factor: Schema.optionalKey(Schema.Finite.pipe(Schema.check(Schema.isGreaterThanOrEqualTo(1)))),
  original_max_position_embeddings: Schema.optionalKey(Schema.Int.pipe(Schema.check(Schema.isGreaterThan(0)))),
  attention_factor: Schema.optionalKey(Schema.NullOr(PositiveNumber)),
  beta_fast: Schema.optionalKey(Schema.NullOr(PositiveNumber)),
  beta_slow: Schema.optionalKey(Schema.NullOr(PositiveNumber)),
  mscale: Schema.optionalKey(Schema.NullOr(Schema.Finite)),
  mscale_all_dim: Schema.optionalKey(Schema.NullOr(Schema.Finite)),
  truncate: Schema.optionalKey(Schema.Boolean)
})
type HfRopeScaling = typeof HfRopeScaling.Type
const ropeScalingField = Schema.optionalKey(Schema.NullOr(HfRopeScaling))

/** YaRN's attention temperature for a scale `s` (1 at or below 1). */
const yarnMscale = (s: number, m = 1) => (s <= 1 ? 1 : 0.1 * m * Math.log(s) + 1)

/** The type of a config's `rope_scaling` (`rope_type`, or the older `type`), or undefined when it has none. */
export const ropeScalingType = (c: { readonly rope_scaling?: HfRopeScaling | null | undefined }): string | undefined =>
  c.rope_scaling == null ? undefined : c.rope_scaling.rope_type ?? c.rope_scaling.type ?? "default"

/**
 * The rotary scaling a config's `rope_scaling` asks for, resolved as transformers' rope init
 * functions resolve it: `linear` divides the frequencies by `factor`; `yarn` takes the original
 * context from `original_max_position_embeddings` (the factor is then `max_position_embeddings`
 * over it) or `max_position_embeddings`, the attention factor from `attention_factor`, or from
 * `mscale` and `mscale_all_dim` when both are given (`(0.1·mscale·ln f + 1) / (0.1·mscale_all_dim·ln f
 * + 1)`), or `0.1·ln f + 1`; `beta_fast` 32 and `beta_slow` 1 when absent. Null for none, `default`
 * and the types not applied.
 */
export const ropeScalingOf = (c: { readonly rope_scaling?: HfRopeScaling | null | undefined; readonly max_position_embeddings: number }): RopeScaling | null => {
  const r = c.rope_scaling
  const type = ropeScalingType(c)
  if (r == null || r.factor === undefined) return null
  if (type === "linear") return { type: "linear", factor: r.factor }
  if (type !== "yarn") return null
  const original = r.original_max_position_embeddings
  const factor = original === undefined ? r.factor : c.max_position_embeddings / original
  const attention = r.attention_factor ??
    (r.mscale && r.mscale_all_dim ? yarnMscale(factor, r.mscale) / yarnMscale(factor, r.mscale_all_dim) : yarnMscale(factor))
  return {
    type: "yarn",
    factor,
    originalContext: original ?? c.max_position_embeddings,
    betaFast: r.beta_fast || 32,
    betaSlow: r.beta_slow || 1,
    attention,
    truncate: r.truncate ?? true
  }
}

const HfActivation = withDefault(Schema.Literals(["silu", "swish", "gelu", "gelu_new", "gelu_pytorch_tanh", "relu"]), "silu")

export const Gpt2Config = Schema.Struct({
  model_type: Schema.Literal("gpt2"),
  vocab_size: dim("vocab", 50257),
  n_positions: dim("seqLen", 1024),
  n_embd: dim("width", 768),
  n_layer: dim("layers", 12),
  n_head: dim("heads", 12),
  n_inner: optionalDim("ffnWidth"),
  activation_function: withDefault(Schema.Literals(["gelu_new", "gelu", "relu", "silu", "gelu_pytorch_tanh"]), "gelu_new"),
  layer_norm_epsilon: num(1e-5),
  tie_word_embeddings: bool(true)
}).pipe(all((c) =>
  (c["n_embd"] as number) % (c["n_head"] as number) !== 0
    ? ["n_head", `n_embd (${c["n_embd"]}) is not divisible by n_head (${c["n_head"]})`]
    : undefined
))

const llamaFields = {
  vocab_size: dim("vocab", 32000),
  hidden_size: dim("width", 4096),
  intermediate_size: dim("ffnWidth", 11008),
  num_hidden_layers: dim("layers", 32),
  num_attention_heads: dim("heads", 32),
  num_key_value_heads: optionalDim("heads"),
  head_dim: optionalDim("headDim"),
  hidden_act: HfActivation,
  max_position_embeddings: dim("seqLen", 2048),
  rms_norm_eps: num(1e-6),
  tie_word_embeddings: bool(false),
  rope_theta: num(10000),
  rope_scaling: ropeScalingField
}

export const LlamaConfig = Schema.Struct({
  model_type: Schema.Literal("llama"),
  ...llamaFields,
  attention_bias: bool(false),
  mlp_bias: bool(false)
}).pipe(all(headsDivide("hidden_size", "num_attention_heads"), kvDivide))

const mistralFields = {
  ...llamaFields,
  intermediate_size: dim("ffnWidth", 14336),
  num_key_value_heads: optionalDim("heads"),
  max_position_embeddings: dim("seqLen", 4096 * 32),
  sliding_window: optionalDim("seqLen")
}

export const MistralConfig = Schema.Struct({ model_type: Schema.Literal("mistral"), ...mistralFields })
  .pipe(all(headsDivide("hidden_size", "num_attention_heads"), kvDivide))

export const MixtralConfig = Schema.Struct({
  model_type: Schema.Literal("mixtral"),
  ...mistralFields,
  rms_norm_eps: num(1e-5),
  rope_theta: num(1e6),
  num_local_experts: dim("experts", 8),
  num_experts_per_tok: dim("topK", 2)
}).pipe(all(headsDivide("hidden_size", "num_attention_heads"), kvDivide, topKFits("num_local_experts")))

const qwenMoeFields = {
  ...llamaFields,
  vocab_size: dim("vocab", 151936),
  hidden_size: dim("width", 2048),
  num_hidden_layers: dim("layers", 24),
  max_position_embeddings: dim("seqLen", 32768),
  decoder_sparse_step: dim("layers", 1),
  mlp_only_layers: withDefault(Schema.NullOr(Schema.Array(CountAtMost("layers")).check(Schema.isMaxLength(limits.layers))), null),
  norm_topk_prob: bool(false),
  sliding_window: optionalDim("seqLen"),
  use_sliding_window: bool(false)
}

export const Qwen2MoeConfig = Schema.Struct({
  model_type: Schema.Literal("qwen2_moe"),
  ...qwenMoeFields,
  intermediate_size: dim("ffnWidth", 5632),
  num_attention_heads: dim("heads", 16),
  moe_intermediate_size: dim("ffnWidth", 1408),
  shared_expert_intermediate_size: count("ffnWidth", 5632),
  num_experts_per_tok: dim("topK", 4),
  num_experts: dim("experts", 60),
  qkv_bias: bool(true)
}).pipe(all(headsDivide("hidden_size", "num_attention_heads"), kvDivide, topKFits("num_experts")))

export const Qwen3MoeConfig = Schema.Struct({
  model_type: Schema.Literal("qwen3_moe"),
  ...qwenMoeFields,
  intermediate_size: dim("ffnWidth", 6144),
  num_attention_heads: dim("heads", 32),
  moe_intermediate_size: dim("ffnWidth", 768),
  num_experts_per_tok: dim("topK", 8),
  num_experts: dim("experts", 128),
  attention_bias: bool(false)
}).pipe(all(headsDivide("hidden_size", "num_attention_heads"), kvDivide, topKFits("num_experts")))

export const OlmoeConfig = Schema.Struct({
  model_type: Schema.Literal("olmoe"),
  ...llamaFields,
  vocab_size: dim("vocab", 50304),
  hidden_size: dim("width", 2048),
  intermediate_size: dim("ffnWidth", 2048),
  num_hidden_layers: dim("layers", 16),
  num_attention_heads: dim("heads", 16),
  max_position_embeddings: dim("seqLen", 4096),
  rms_norm_eps: num(1e-5),
  attention_bias: bool(false),
  num_experts_per_tok: dim("topK", 8),
  num_experts: dim("experts", 64),
  norm_topk_prob: bool(false)
}).pipe(all(headsDivide("hidden_size", "num_attention_heads"), kvDivide, topKFits("num_experts")))

const deepseekFields = {
  vocab_size: dim("vocab", 102400),
  hidden_size: dim("width", 4096),
  intermediate_size: dim("ffnWidth", 11008),
  moe_intermediate_size: dim("ffnWidth", 1407),
  num_hidden_layers: dim("layers", 30),
  num_attention_heads: dim("heads", 32),
  num_key_value_heads: optionalDim("heads"),
  n_shared_experts: withDefault(Schema.NullOr(CountAtMost("experts")), null),
  n_routed_experts: withDefault(Schema.NullOr(DimAtMost("experts")), null),
  num_experts_per_tok: withDefault(Schema.NullOr(DimAtMost("topK")), null),
  moe_layer_freq: dim("layers", 1),
  first_k_dense_replace: count("layers", 0),
  kv_lora_rank: dim("width", 512),
  q_lora_rank: withDefault(Schema.NullOr(DimAtMost("width")), 1536),
  qk_rope_head_dim: dim("headDim", 64),
  v_head_dim: dim("headDim", 128),
  qk_nope_head_dim: dim("headDim", 128),
  hidden_act: HfActivation,
  max_position_embeddings: dim("seqLen", 2048),
  rms_norm_eps: num(1e-6),
  tie_word_embeddings: bool(false),
  rope_theta: num(10000),
  rope_scaling: ropeScalingField,
  attention_bias: bool(false),
  norm_topk_prob: bool(false),
  scoring_func: withDefault(Schema.String, "softmax"),
  /** Group-limited routing (V2 with `topk_method: group_limited_greedy`; V3 always): absent, none. */
  n_group: withDefault(Schema.NullOr(DimAtMost("experts")), null),
  topk_group: withDefault(Schema.NullOr(DimAtMost("experts")), null),
  topk_method: withDefault(Schema.String, "greedy"),
  routed_scaling_factor: num(1)
}

/** Whether a DeepSeek config routes group-limited (and over how many groups). */
const routingGroups = (c: Record<string, unknown>): number => {
  const g = c["n_group"] as number | null
  const grouped = c["model_type"] === "deepseek_v3" || c["topk_method"] === "group_limited_greedy"
  return grouped && g !== null && g > 1 ? g : 1
}

const deepseekTopK = (c: Record<string, unknown>) => {
  const e = c["n_routed_experts"] as number | null
  const k = c["num_experts_per_tok"] as number | null
  const rope = c["qk_rope_head_dim"] as number
  if (rope % 2 !== 0) return ["qk_rope_head_dim", `qk_rope_head_dim (${rope}) is odd; rotary positions need an even size`] as const
  if (e === null) return undefined
  if (k === null) return ["num_experts_per_tok", "is required when n_routed_experts is set"] as const
  if (k > e) return ["num_experts_per_tok", `num_experts_per_tok (${k}) exceeds n_routed_experts (${e})`] as const
  const g = routingGroups(c)
  if (g === 1) return undefined
  const keep = c["topk_group"] as number | null
  if (e % g !== 0) return ["n_group", `n_routed_experts (${e}) does not split into n_group (${g}) equal groups`] as const
  if (keep === null || keep > g) return ["topk_group", `expected a number of groups from 1 to n_group (${g}) for group-limited routing, got ${keep}`] as const
  if (k > (keep * e) / g) return ["num_experts_per_tok", `num_experts_per_tok (${k}) exceeds the experts of topk_group (${keep}) groups (${(keep * e) / g})`] as const
  return undefined
}

export const DeepseekV2Config = Schema.Struct({ model_type: Schema.Literal("deepseek_v2"), ...deepseekFields })
  .pipe(all(deepseekTopK))

export const DeepseekV3Config = Schema.Struct({
  model_type: Schema.Literal("deepseek_v3"),
  ...deepseekFields,
  vocab_size: dim("vocab", 129280),
  hidden_size: dim("width", 7168),
  intermediate_size: dim("ffnWidth", 18432),
  moe_intermediate_size: dim("ffnWidth", 2048),
  num_hidden_layers: dim("layers", 61),
  num_attention_heads: dim("heads", 128),
  n_shared_experts: withDefault(Schema.NullOr(CountAtMost("experts")), 1),
  n_routed_experts: withDefault(Schema.NullOr(DimAtMost("experts")), 256),
  num_experts_per_tok: withDefault(Schema.NullOr(DimAtMost("topK")), 8),
  first_k_dense_replace: count("layers", 3),
  max_position_embeddings: dim("seqLen", 4096),
  norm_topk_prob: bool(true),
  scoring_func: withDefault(Schema.String, "sigmoid"),
  topk_method: withDefault(Schema.String, "noaux_tc"),
  routed_scaling_factor: num(2.5)
}).pipe(all(deepseekTopK))

/** Every supported `model_type`, with its Schema. */
export const hfSchemas = {
  gpt2: Gpt2Config,
  llama: LlamaConfig,
  mistral: MistralConfig,
  mixtral: MixtralConfig,
  qwen2_moe: Qwen2MoeConfig,
  qwen3_moe: Qwen3MoeConfig,
  deepseek_v2: DeepseekV2Config,
  deepseek_v3: DeepseekV3Config,
  olmoe: OlmoeConfig
} as const
export type HfModelType = keyof typeof hfSchemas
export const hfModelTypes = Object.keys(hfSchemas) as ReadonlyArray<HfModelType>

export const HfConfig = Schema.Union([
  Gpt2Config,
  LlamaConfig,
  MistralConfig,
  MixtralConfig,
  Qwen2MoeConfig,
  Qwen3MoeConfig,
  DeepseekV2Config,
  DeepseekV3Config,
  OlmoeConfig
])
export type HfConfig = typeof HfConfig.Type

const activation = (act: string, gated: boolean): Activation =>
  gated
    ? "swiglu"
    : act === "gelu_new" || act === "gelu_pytorch_tanh"
    ? "gelu_tanh"
    : act === "gelu"
    ? "gelu"
    : act === "relu"
    ? "relu"
    : "silu"

const gqa = (c: {
  readonly hidden_size: number
  readonly num_attention_heads: number
  readonly num_key_value_heads?: number | null | undefined
  readonly head_dim?: number | null | undefined
  readonly rope_theta: number
  readonly rope_scaling?: HfRopeScaling | null | undefined
  readonly max_position_embeddings: number
}, extra: Parameters<typeof attentionMixer>[1] = {}): Mixer => {
  const scaling = ropeScalingOf(c)
  const headDim = c.head_dim ?? c.hidden_size / c.num_attention_heads
  return attentionMixer({
    hidden: c.hidden_size,
    heads: c.num_attention_heads,
    kvHeads: c.num_key_value_heads,
    headDim: c.head_dim,
    ropeBase: c.rope_theta
  }, scaling === null ? extra : { ...extra, rope: { dim: headDim, base: c.rope_theta, scaling } })
}

/**
 * DeepSeek's rotary scaling, and the factor on its attention scale: under a `rope_scaling` with
 * `mscale_all_dim`, transformers multiplies `1/√(nope+rope)` by `(0.1·mscale_all_dim·ln factor + 1)²`
 * (the config's `factor`).
 */
const deepseekRope = (c: { readonly rope_scaling?: HfRopeScaling | null | undefined; readonly max_position_embeddings: number }) => {
  const scaling = ropeScalingOf(c)
  const r = c.rope_scaling
  const all = r?.mscale_all_dim
  const score = r != null && r.factor !== undefined && all ? yarnMscale(r.factor, all) ** 2 : 1
  return { ...(scaling === null ? {} : { ropeScaling: scaling }), ...(score === 1 ? {} : { scoreScale: score }) }
}

const layers = (n: number, f: (i: number) => DecoderLayer): ReadonlyArray<DecoderLayer> => Array.from({ length: n }, (_, i) => f(i))

/** Which layers of a Qwen MoE are sparse (a Set of the dense ones: linear in the layer count). */
const qwenSparse = (c: { readonly mlp_only_layers: ReadonlyArray<number> | null; readonly decoder_sparse_step: number; readonly num_experts: number }) => {
  const dense = new Set(c.mlp_only_layers ?? [])
  return (i: number) => !dense.has(i) && c.num_experts > 0 && (i + 1) % c.decoder_sparse_step === 0
}

const window = (c: { readonly sliding_window?: number | null | undefined; readonly use_sliding_window?: boolean }) =>
  c.use_sliding_window === false ? null : c.sliding_window ?? null

/**
 * Maps a decoded transformers config to the normalised decoder description.
 *
 * @category builders
 */
export const fromHf = (c: HfConfig, name: string): DecoderConfig => {
  switch (c.model_type) {
    case "gpt2": {
      const hidden = c.n_inner ?? 4 * c.n_embd
      const layer: DecoderLayer = {
        mixer: { kind: "attention", spec: { heads: c.n_head, kvHeads: c.n_head, headDim: c.n_embd / c.n_head, qkvBias: true, outBias: true } },
        ffn: { kind: "mlp", spec: { hidden, activation: activation(c.activation_function, false), bias: true } }
      }
      return {
        name,
        vocab: c.vocab_size,
        d: c.n_embd,
        positions: c.n_positions,
        norm: { kind: "layer", eps: c.layer_norm_epsilon },
        layers: layers(c.n_layer, () => layer),
        tiedEmbeddings: c.tie_word_embeddings,
        contextLength: c.n_positions
      }
    }
    case "llama":
    case "mistral":
    case "mixtral": {
      const bias = c.model_type === "llama" ? c.attention_bias : false
      const mixer = gqa(c, { qkvBias: bias, outBias: bias, window: c.model_type === "llama" ? null : window(c) })
      const ffn: FFN = c.model_type === "mixtral"
        ? { kind: "moe", spec: { experts: c.num_local_experts, topK: c.num_experts_per_tok, expertHidden: c.intermediate_size, normalizeTopK: true } }
        : { kind: "mlp", spec: { hidden: c.intermediate_size, bias: c.model_type === "llama" ? c.mlp_bias : false } }
      return decoder(name, c, layers(c.num_hidden_layers, () => ({ mixer, ffn })))
    }
    case "qwen2_moe": {
      const mixer = gqa(c, { qkvBias: c.qkv_bias, window: window(c) })
      const sparse: FFN = {
        kind: "moe",
        spec: {
          experts: c.num_experts,
          topK: c.num_experts_per_tok,
          expertHidden: c.moe_intermediate_size,
          normalizeTopK: c.norm_topk_prob,
          shared: c.shared_expert_intermediate_size > 0 ? { hidden: c.shared_expert_intermediate_size, gate: true } : null
        }
      }
      const dense: FFN = { kind: "mlp", spec: { hidden: c.intermediate_size } }
      const isSparse = qwenSparse(c)
      return decoder(name, c, layers(c.num_hidden_layers, (i) => ({ mixer, ffn: isSparse(i) ? sparse : dense })))
    }
    case "qwen3_moe":
    case "olmoe": {
      const mixer = gqa(c, {
        qkvBias: c.attention_bias,
        outBias: c.attention_bias,
        qkNorm: c.model_type === "qwen3_moe" ? "head" : "full",
        window: c.model_type === "qwen3_moe" ? window(c) : null
      })
      const sparse: FFN = {
        kind: "moe",
        spec: { experts: c.num_experts, topK: c.num_experts_per_tok, expertHidden: c.model_type === "olmoe" ? c.intermediate_size : c.moe_intermediate_size, normalizeTopK: c.norm_topk_prob }
      }
      if (c.model_type === "olmoe") return decoder(name, c, layers(c.num_hidden_layers, () => ({ mixer, ffn: sparse })))
      const dense: FFN = { kind: "mlp", spec: { hidden: c.intermediate_size } }
      const isSparse = qwenSparse(c)
      return decoder(name, c, layers(c.num_hidden_layers, (i) => ({ mixer, ffn: isSparse(i) ? sparse : dense })))
    }
    case "deepseek_v2":
    case "deepseek_v3": {
      const mixer: Mixer = {
        kind: "mla",
        spec: {
          heads: c.num_attention_heads,
          qLoraRank: c.q_lora_rank,
          kvLoraRank: c.kv_lora_rank,
          qkNopeHeadDim: c.qk_nope_head_dim,
          qkRopeHeadDim: c.qk_rope_head_dim,
          vHeadDim: c.v_head_dim,
          bias: c.attention_bias,
          ropeBase: c.rope_theta,
          ...deepseekRope(c)
        }
      }
      const dense: FFN = { kind: "mlp", spec: { hidden: c.intermediate_size } }
      const routed = c.n_routed_experts
      const v3 = c.model_type === "deepseek_v3"
      const groups = routingGroups(c)
      const topK = c.num_experts_per_tok ?? 1
      const sparse: FFN | undefined = routed === null ? undefined : {
        kind: "moe",
        spec: {
          experts: routed,
          topK,
          expertHidden: c.moe_intermediate_size,
          scoring: v3 ? "sigmoid" : "softmax",
          normalizeTopK: c.norm_topk_prob,
          groups,
          groupTopK: groups > 1 ? c.topk_group : null,
          groupScore: v3 ? "top2" : "max",
          // V3 scales after renormalising; V2 scales only the gates it does not renormalise
          routedScale: v3 || !(topK > 1 && c.norm_topk_prob) ? c.routed_scaling_factor : 1,
          // V3's e_score_correction_bias: a buffer, not counted
          scoreBias: v3,
          shared: c.n_shared_experts !== null && c.n_shared_experts > 0 ? { hidden: c.moe_intermediate_size * c.n_shared_experts } : null
        }
      }
      const isMoE = (i: number) =>
        sparse !== undefined && i >= c.first_k_dense_replace &&
        (c.model_type === "deepseek_v3" || i % c.moe_layer_freq === 0)
      return decoder(name, c, layers(c.num_hidden_layers, (i) => ({ mixer, ffn: isMoE(i) ? sparse! : dense })))
    }
  }
}

const decoder = (
  name: string,
  c: {
    readonly vocab_size: number
    readonly hidden_size: number
    readonly rms_norm_eps: number
    readonly tie_word_embeddings: boolean
    readonly max_position_embeddings: number
  },
  ls: ReadonlyArray<DecoderLayer>
): DecoderConfig => ({
  name,
  vocab: c.vocab_size,
  d: c.hidden_size,
  positions: null,
  norm: { kind: "rms", eps: c.rms_norm_eps },
  layers: ls,
  tiedEmbeddings: c.tie_word_embeddings,
  contextLength: c.max_position_embeddings
})

/** Decodes an unknown value as a config of its `model_type`. */
export const decodeHf = (modelType: HfModelType) => Schema.decodeUnknownEffect(hfSchemas[modelType], { errors: "all" })

/** Own keys only: "constructor" or "__proto__" is not a model_type. */
export const isHfModelType = (s: unknown): s is HfModelType => typeof s === "string" && Object.hasOwn(hfSchemas, s)
