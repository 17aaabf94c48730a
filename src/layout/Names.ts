/**
 * Hugging Face parameter names for the decoders that have a Hugging Face counterpart (the plain
 * dense and MoE decoders: `hf/llama`, `hf/mistral`, `hf/mixtral`, `hf/qwen2_moe`, `hf/qwen3_moe`,
 * `hf/olmoe`, `hf/deepseek_v2`, `hf/deepseek_v3`, and our `dense` and `moe` configs, named as Llama
 * and Qwen3-MoE). Stacked experts `[E, …]` are stored one tensor per expert, as Hugging Face does.
 * GPT-2 (fused Conv1D q/k/v), ConceptMoE and `graph` configs keep native names.
 *
 * | graph path (layer i)                       | Hugging Face name                                   |
 * | ------------------------------------------ | --------------------------------------------------- |
 * | `embed/weight`                             | `model.embed_tokens.weight`                         |
 * | `layers/i/mixer/norm/weight`               | `model.layers.i.input_layernorm.weight`             |
 * | `layers/i/mixer/attn/{q,k,v,o}.weight`     | `model.layers.i.self_attn.{q,k,v,o}_proj.weight`    |
 * | `layers/i/mixer/attn/{qNorm,kNorm}.weight` | `model.layers.i.self_attn.{q,k}_norm.weight`        |
 * | MLA `qA`, `qANorm`, `qB`, `kvA`, `kvANorm`, `kvB` | `q_a_proj`, `q_a_layernorm`, `q_b_proj`, `kv_a_proj_with_mqa`, `kv_a_layernorm`, `kv_b_proj` |
 * | `layers/i/ffn/norm/weight`                 | `model.layers.i.post_attention_layernorm.weight`    |
 * | `layers/i/ffn/mlp/{gate,up,down}.weight`   | `model.layers.i.mlp.{gate,up,down}_proj.weight`     |
 * | `layers/i/ffn/moe/router.weight`           | `model.layers.i.mlp.gate.weight` (Mixtral: `block_sparse_moe.gate.weight`) |
 * | `layers/i/ffn/moe/router.scoreBias` (a buffer) | `model.layers.i.mlp.gate.e_score_correction_bias` (DeepSeek-V3) |
 * | `layers/i/ffn/moe/experts.{gate,up,down}.weight` `[E, …]` | `….mlp.experts.e.{gate,up,down}_proj.weight` per expert (Mixtral: `block_sparse_moe.experts.e.{w1,w3,w2}.weight`) |
 * | `layers/i/ffn/moe/shared.{gate,up,down}.weight` | `….mlp.shared_expert.…` (Qwen2-MoE), `….mlp.shared_experts.…` (DeepSeek) |
 * | `layers/i/ffn/moe/sharedGate.weight`       | `….mlp.shared_expert_gate.weight`                   |
 * | `norm/weight`                              | `model.norm.weight`                                 |
 * | `lmHead/weight` (untied)                   | `lm_head.weight`                                    |
 *
 * Layout: matrices `[out, in]` as `torch.nn.Linear` keeps them (Graph.ts). DeepSeek (`hf/deepseek_v2`,
 * `hf/deepseek_v3`) also orders the rotary features of each head differently ({@link hfRowOrder}):
 * its checkpoints keep each rotary pair adjacent (`x0, y0, x1, y1, …`, de-interleaved by its
 * modelling code before a rotate-half RoPE), where this runtime keeps the halves apart
 * (`x0, x1, …, y0, y1, …`). The rows of `q_b_proj` (or `q_proj`) and `kv_a_proj_with_mqa` that
 * produce rotary features are stored in DeepSeek's order.
 *
 * GPT-2 ({@link gpt2Source}; import only: the export keeps native names, since its `Conv1D` stores
 * matrices `[in, out]` and fuses q, k and v):
 *
 * | graph path (layer i)                       | GPT-2 name (`transformer.` prefix optional)          |
 * | ------------------------------------------ | --------------------------------------------------- |
 * | `embed/weight`, `embed/positions`          | `transformer.wte.weight`, `transformer.wpe.weight`  |
 * | `layers/i/mixer/norm/{weight,bias}`        | `transformer.h.i.ln_1.{weight,bias}`                |
 * | `layers/i/mixer/attn/{q,k,v}.{weight,bias}` | thirds (last axis) of `transformer.h.i.attn.c_attn.{weight,bias}` |
 * | `layers/i/mixer/attn/o.{weight,bias}`      | `transformer.h.i.attn.c_proj.{weight,bias}`         |
 * | `layers/i/ffn/norm/{weight,bias}`          | `transformer.h.i.ln_2.{weight,bias}`                |
 * | `layers/i/ffn/mlp/{up,down}.{weight,bias}` | `transformer.h.i.mlp.{c_fc,c_proj}.{weight,bias}`   |
 * | `norm/{weight,bias}`                       | `transformer.ln_f.{weight,bias}`                    |
 *
 * @since 0.4.0
 */
import type { ParamEntry } from "../graph/Block.ts"

type Family = "llama" | "mixtral" | "qwen2_moe" | "qwen3_moe" | "deepseek"

const families: Readonly<Record<string, Family>> = {
  "hf/llama": "llama",
  "hf/mistral": "llama",
  "hf/mixtral": "mixtral",
  "hf/qwen2_moe": "qwen2_moe",
  "hf/qwen3_moe": "qwen3_moe",
  "hf/olmoe": "qwen3_moe",
  "hf/deepseek_v2": "deepseek",
  "hf/deepseek_v3": "deepseek",
  "conceptmoe/dense": "llama",
  "conceptmoe/moe": "qwen3_moe"
}

const attn: Readonly<Record<string, string>> = {
  q: "q_proj", k: "k_proj", v: "v_proj", o: "o_proj", qNorm: "q_norm", kNorm: "k_norm",
  qA: "q_a_proj", qANorm: "q_a_layernorm", qB: "q_b_proj", kvA: "kv_a_proj_with_mqa", kvANorm: "kv_a_layernorm", kvB: "kv_b_proj"
}
const proj: Readonly<Record<string, string>> = { gate: "gate_proj", up: "up_proj", down: "down_proj" }
const mixtralExpert: Readonly<Record<string, string>> = { gate: "w1", up: "w3", down: "w2" }

/** A leaf name `a.b` (`q.weight`, `experts.gate.weight`) mapped by its head(s). */
const leafName = (family: Family, where: "attn" | "mlp" | "moe", name: string, experts: number): string | ReadonlyArray<string> | undefined => {
  const parts = name.split(".")
  const suffix = parts[parts.length - 1]!
  if (where === "attn") {
    const to = attn[parts[0]!]
    return parts.length === 2 && to !== undefined ? `self_attn.${to}.${suffix}` : undefined
  }
  if (where === "mlp") {
    const to = proj[parts[0]!]
    return parts.length === 2 && to !== undefined ? `mlp.${to}.${suffix}` : undefined
  }
  const block = family === "mixtral" ? "block_sparse_moe" : "mlp"
  if (parts.length === 2 && parts[0] === "router") return suffix === "scoreBias" ? (family === "deepseek" ? `mlp.gate.e_score_correction_bias` : undefined) : `${block}.gate.${suffix}`
  if (parts.length === 2 && parts[0] === "sharedGate") return family === "qwen2_moe" ? `mlp.shared_expert_gate.${suffix}` : undefined
  if (parts.length === 3 && parts[0] === "experts") {
    const to = family === "mixtral" ? mixtralExpert[parts[1]!] : proj[parts[1]!]
    return to === undefined ? undefined : Array.from({ length: experts }, (_, e) => `${block}.experts.${e}.${to}.${suffix}`)
  }
  if (parts.length === 3 && parts[0] === "shared") {
    const to = proj[parts[1]!]
    const group = family === "qwen2_moe" ? "shared_expert" : family === "deepseek" ? "shared_experts" : undefined
    return to === undefined || group === undefined ? undefined : `mlp.${group}.${to}.${suffix}`
  }
  return undefined
}

/** The Hugging Face name(s) of one parameter of a decoder graph, or undefined. */
const hfName = (family: Family, p: ParamEntry): string | ReadonlyArray<string> | undefined => {
  if (p.path === "embed/weight") return "model.embed_tokens.weight"
  if (p.path === "norm/weight") return "model.norm.weight"
  if (p.path === "lmHead/weight") return "lm_head.weight"
  const m = /^layers\/(\d+)\/(mixer|ffn)\/(norm|attn|mlp|moe)\/(.+)$/.exec(p.path)
  if (m === null) return undefined
  const [, i, sub, node, name] = m as unknown as [string, string, string, string, string]
  const layer = `model.layers.${i}`
  if (node === "norm") return name === "weight" ? `${layer}.${sub === "mixer" ? "input_layernorm" : "post_attention_layernorm"}.weight` : undefined
  const leaf = leafName(family, node as "attn" | "mlp" | "moe", name, p.shape[0] ?? 0)
  return leaf === undefined ? undefined : typeof leaf === "string" ? `${layer}.${leaf}` : leaf.map((n) => `${layer}.${n}`)
}

/**
 * Hugging Face names for every parameter of a model of `format`, or undefined when the format has no
 * counterpart or a parameter has no Hugging Face name (then every parameter keeps its native name).
 */
export const hfNames = (format: string, params: ReadonlyArray<ParamEntry>): ReadonlyMap<string, string | ReadonlyArray<string>> | undefined => {
  const family = families[format]
  if (family === undefined) return undefined
  const out = new Map<string, string | ReadonlyArray<string>>()
  for (const p of params) {
    if (p.tiedTo !== undefined) continue
    const n = hfName(family, p)
    if (n === undefined) return undefined
    out.set(p.path, n)
  }
  return out
}

/**
 * Where a GPT-2 parameter is in a Hugging Face GPT-2 checkpoint: the tensor's name, and for q, k and
 * v which third of `c_attn` along its last axis. `Conv1D` stores matrices `[in, out]`, as this
 * runtime does, so nothing is transposed.
 */
export interface Gpt2Source {
  readonly name: string
  readonly part?: { readonly index: number; readonly of: number }
}

const gpt2Leaf: Readonly<Record<string, string>> = { o: "attn.c_proj", up: "mlp.c_fc", down: "mlp.c_proj" }

export const gpt2Source = (path: string): Gpt2Source | undefined => {
  if (path === "embed/weight") return { name: "transformer.wte.weight" }
  if (path === "embed/positions") return { name: "transformer.wpe.weight" }
  const top = /^norm\/(weight|bias)$/.exec(path)
  if (top !== null) return { name: `transformer.ln_f.${top[1]}` }
  const m = /^layers\/(\d+)\/(mixer|ffn)\/(norm|attn|mlp)\/(?:(\w+)\.)?(weight|bias)$/.exec(path)
  if (m === null) return undefined
  const [, i, sub, node, head, suffix] = m as unknown as [string, string, string, string, string | undefined, string]
  const layer = `transformer.h.${i}`
  if (node === "norm") return head === undefined ? { name: `${layer}.${sub === "mixer" ? "ln_1" : "ln_2"}.${suffix}` } : undefined
  if (head === undefined) return undefined
  const qkv = ["q", "k", "v"].indexOf(head)
  if (node === "attn" && qkv >= 0) return { name: `${layer}.attn.c_attn.${suffix}`, part: { index: qkv, of: 3 } }
  const to = gpt2Leaf[head]
  return to === undefined || (node === "attn") !== (head === "o") ? undefined : { name: `${layer}.${to}.${suffix}` }
}

/**
 * Output features of a parameter (rows in PyTorch layout) whose order in a Hugging Face checkpoint
 * differs from ours: in each block of `period` features, the `rope` features from `offset` on are
 * rotary pairs, stored interleaved there and as two halves here.
 */
export interface RowOrder {
  readonly period: number
  readonly offset: number
  readonly rope: number
}

/** The {@link RowOrder} of a parameter of a model of `format`, or undefined when it has none. */
export const hfRowOrder = (format: string, kind: string, spec: unknown, name: string): RowOrder | undefined => {
  if ((format !== "hf/deepseek_v2" && format !== "hf/deepseek_v3") || kind !== "mla") return undefined
  const s = spec as { readonly qkNopeHeadDim: number; readonly qkRopeHeadDim: number; readonly kvLoraRank: number }
  if (name === "qB.weight" || name === "q.weight" || name === "q.bias") return { period: s.qkNopeHeadDim + s.qkRopeHeadDim, offset: s.qkNopeHeadDim, rope: s.qkRopeHeadDim }
  if (name === "kvA.weight" || name === "kvA.bias") return { period: s.kvLoraRank + s.qkRopeHeadDim, offset: s.kvLoraRank, rope: s.qkRopeHeadDim }
  return undefined
}

/** Where our row `r` is in the Hugging Face order. */
export const hfRow = (o: RowOrder, r: number): number => {
  const j = r % o.period
  if (j < o.offset) return r
  const i = j - o.offset
  const half = o.rope / 2
  return r - j + o.offset + (i < half ? 2 * i : 2 * (i - half) + 1)
}
