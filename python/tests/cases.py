"""The configs the parity tests export: every small example config, small random models of every
Hugging Face model type among the examples (the full-size ones shrunk, same type), ConceptMoE in each
of its variants, and a graph holding the remaining block kinds."""
import glob
import json
import os

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))

#: fields of Hugging Face configs set to small values (only those a config has)
SMALL_HF = {
    "hidden_size": 32, "n_embd": 32, "intermediate_size": 48, "moe_intermediate_size": 16,
    "shared_expert_intermediate_size": 24, "num_attention_heads": 4, "n_head": 4, "num_hidden_layers": 2,
    "n_layer": 2, "vocab_size": 64, "max_position_embeddings": 64, "n_positions": 64, "n_ctx": 64,
    "n_routed_experts": 4, "num_local_experts": 4, "num_experts": 4, "num_experts_per_tok": 2,
    "kv_lora_rank": 16, "qk_nope_head_dim": 8, "qk_rope_head_dim": 4, "v_head_dim": 8, "head_dim": 8,
    "n_group": 1, "topk_group": 1, "first_k_dense_replace": 1,
}


def small_hf(config: dict) -> dict:
    out = dict(config)
    for key, value in SMALL_HF.items():
        if key in out:
            out[key] = value
    if "num_key_value_heads" in out:
        out["num_key_value_heads"] = 4 if config.get("num_key_value_heads") == config.get("num_attention_heads") else 2
    if out.get("q_lora_rank") is not None:
        out["q_lora_rank"] = 24
    if isinstance(out.get("sliding_window"), int) and out.get("use_sliding_window", True):
        out["sliding_window"] = 5
    return out


MOE_TINY = {"kind": "moe", "name": "moe-tiny", "vocab": 64, "hidden": 32, "layers": 4, "heads": 4, "experts": 4, "topK": 2,
            "expertHidden": 16, "tiedEmbeddings": True, "contextLength": 64}


def concept(name: str, **extra) -> dict:
    return {"kind": "conceptmoe", "name": name, "baseline": MOE_TINY, "ratio": 2, "encoderLayers": 1, "decoderLayers": 1, **extra}


OTHER_KINDS = {
    "kind": "graph", "name": "other-kinds", "contextLength": 64,
    "graph": {"block": "sequence", "children": [
        {"block": "embedding", "name": "embed", "spec": {"vocab": 64, "d": 32, "positions": 64}},
        {"block": "residual", "name": "a", "children": [
            {"block": "layernorm", "name": "norm", "spec": {"d": 32}},
            {"block": "branch", "name": "split", "spec": {"merge": "concat"}, "children": [
                {"block": "linear", "name": "left", "spec": {"dIn": 32, "dOut": 16, "bias": True}},
                {"block": "sequence", "name": "right", "children": [
                    {"block": "linear", "name": "in", "spec": {"dIn": 32, "dOut": 24}},
                    {"block": "projector", "name": "out", "spec": {"dIn": 24, "dOut": 16, "bias": True}}]}]}]},
        {"block": "residual", "name": "b", "children": [
            {"block": "rmsnorm", "name": "norm", "spec": {"d": 32, "eps": 1e-5}},
            {"block": "branch", "name": "sum", "spec": {"merge": "sum"}, "children": [
                {"block": "rotary", "name": "rope", "spec": {"heads": 4, "headDim": 8, "dim": 4}},
                {"block": "mlp", "name": "mlp", "spec": {"d": 32, "hidden": 40, "activation": "gelu_tanh", "bias": True}}]}]},
        {"block": "residual", "name": "c", "children": [
            {"block": "rmsnorm", "name": "norm", "spec": {"d": 32}},
            {"block": "attention", "name": "attn", "spec": {"d": 32, "heads": 4, "kvHeads": 1, "headDim": 8, "qkvBias": True, "outBias": True,
                                                            "qkNorm": "full", "causal": False, "window": 6}}]},
        {"block": "residual", "name": "d", "children": [
            {"block": "rmsnorm", "name": "norm", "spec": {"d": 32}},
            {"block": "loop", "name": "loop", "spec": {"times": 2}, "children": [
                {"block": "mlp", "name": "mlp", "spec": {"d": 32, "hidden": 24, "activation": "relu"}}]}]},
        {"block": "lmhead", "name": "lmHead", "spec": {"d": 32, "vocab": 64, "bias": True}}]},
}


def cases() -> dict[str, dict]:
    """Case name → config (a dict)."""
    out: dict[str, dict] = {}
    for path in sorted(glob.glob(os.path.join(ROOT, "examples", "*.json")) + glob.glob(os.path.join(ROOT, "examples", "compare", "*.json"))):
        config = json.load(open(path))
        name = os.path.relpath(path, os.path.join(ROOT, "examples")).replace("/", "_")[:-5]
        if "model" in config:
            continue  # training configs: their models are cases already
        if config.get("kind") in ("dense", "moe") and config["hidden"] <= 128:
            out[name] = config
        elif config.get("kind") == "conceptmoe" and isinstance(config["baseline"], str):
            baseline = json.load(open(os.path.join(os.path.dirname(path), config["baseline"])))
            if baseline["hidden"] <= 128:
                out[name] = {**config, "baseline": baseline}
    for path in sorted(glob.glob(os.path.join(ROOT, "examples", "hf", "*.json"))):
        out["hf_" + os.path.basename(path)[:-5]] = small_hf(json.load(open(path)))
    # DeepSeek's group-limited routing and routed scaling (8 experts in 4 groups)
    v3 = small_hf(json.load(open(os.path.join(ROOT, "examples", "hf", "deepseek-v3.json"))))
    out["hf_deepseek-v3-grouped"] = {**v3, "n_routed_experts": 8, "n_group": 4, "topk_group": 2, "num_experts_per_tok": 3, "routed_scaling_factor": 2.5}
    v2 = small_hf(json.load(open(os.path.join(ROOT, "examples", "hf", "deepseek-v2-lite.json"))))
    out["hf_deepseek-v2-grouped"] = {**v2, "n_routed_experts": 8, "n_group": 4, "topk_group": 1, "topk_method": "group_limited_greedy",
                                     "routed_scaling_factor": 16.0}
    # rotary scaling from rope_scaling (linear; YaRN with a ramp inside the head, and DeepSeek's mscale on the scores)
    llama = small_hf(json.load(open(os.path.join(ROOT, "examples", "hf", "llama-3-8b.json"))))
    out["hf_llama-linear"] = {**llama, "rope_scaling": {"rope_type": "linear", "factor": 2.0}}
    out["hf_llama-yarn"] = {**llama, "rope_theta": 10.0, "rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16,
                                                                           "beta_fast": 8.0, "attention_factor": 1.2}}
    out["hf_deepseek-v3-yarn"] = {**v3, "rope_scaling": {"type": "yarn", "factor": 40.0, "original_max_position_embeddings": 16, "beta_fast": 32,
                                                          "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 0.8}}
    out["gqa_window"] = {"kind": "dense", "name": "gqa-window", "vocab": 64, "hidden": 32, "layers": 2, "heads": 4, "kvHeads": 2,
                         "ffnHidden": 48, "window": 5, "tiedEmbeddings": False, "contextLength": 64}
    out["dense_variants"] = {"kind": "dense", "name": "dense-variants", "vocab": 64, "hidden": 32, "layers": 2, "heads": 4, "ffnHidden": 48,
                             "norm": "layer", "positions": "learned", "qkNorm": "head", "activation": "gelu", "attentionBias": True, "contextLength": 64}
    out["moe_shared"] = {**MOE_TINY, "name": "moe-shared", "sharedHidden": 24, "sharedGate": True}
    out["concept_sum"] = concept("concept-sum", topK=3)
    out["concept_last"] = concept("concept-last", merge="last")
    out["concept_loop"] = concept("concept-loop", encoderLayers=1, decoderLayers=1, loopLayers=1, loopTimes=2)
    out["concept_wide"] = concept("concept-wide", hidden=48, experts=3, expertHidden=16, topK=2)
    out["concept_plain_ratio"] = concept("concept-plain", jointDecoding=False, ratioControl="plain")
    out["other_kinds"] = OTHER_KINDS
    return out
