"""DeepSeek's routing as its Hugging Face modelling code does it, written here independently (the
score-correction bias on the scores that choose, group scores, masked_fill of the groups left out,
top-k, gates from the plain scores, renormalise, scale), against the MoE module that
the graph of a DeepSeek config builds. The parity tests then carry the module's routing to this
runtime (``hf_deepseek-*-grouped`` cases)."""
import torch
import torch.nn.functional as F

from conceptmoe_torch.blocks.moe import MoE
from conceptmoe_torch.context import Context

D, H, E = 16, 8, 8


def block(spec: dict) -> MoE:
    full = {"d": D, "experts": E, "expertHidden": H, "activation": "swiglu", "bias": False, "shared": None, "routerBias": False,
            "normalizeTopK": False, "groups": 1, "groupTopK": None, "groupScore": "max", "routedScale": 1, "scoreBias": False, **spec}
    params = [{"name": "router.weight", "torchShape": [E, D]}] + ([{"name": "router.scoreBias", "torchShape": [E], "buffer": True}] if full["scoreBias"] else []) + [
        {"name": f"experts.{m}.weight", "torchShape": [E, H, D] if m != "down" else [E, D, H]} for m in ("gate", "up", "down")]
    m = MoE({"kind": "moe", "path": "moe", "spec": full, "params": params, "children": []}, [])
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return m


def experts_out(m: MoE, x, idx, w):
    """Σ_k w·expert(x) with the module's expert weights (the routing given)."""
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for j in range(idx.shape[1]):
            e = idx[t, j].item()
            gate, up, down = (m.get_parameter(f"experts.{n}.weight")[e] for n in ("gate", "up", "down"))
            out[t] += w[t, j] * F.linear(F.silu(F.linear(x[t], gate)) * F.linear(x[t], up), down)
    return out


def v3_router(logits, bias, top_k, n_group, topk_group, norm, scale):
    scores = logits.sigmoid()
    choice = scores.detach() + bias
    group_scores = choice.view(-1, n_group, E // n_group).topk(2, dim=-1)[0].sum(dim=-1)
    group_idx = torch.topk(group_scores, k=topk_group, dim=-1, sorted=False)[1]
    group_mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1)
    score_mask = group_mask.unsqueeze(-1).expand(-1, n_group, E // n_group).reshape(-1, E)
    idx = torch.topk(choice.masked_fill(~score_mask.bool(), 0.0), k=top_k, dim=-1, sorted=False)[1]
    w = scores.gather(1, idx)
    if norm:
        w = w / (w.sum(dim=-1, keepdim=True) + 1e-20)
    return idx, w * scale


def v2_router(logits, top_k, n_group, topk_group, norm, scale):
    scores = logits.softmax(dim=-1)
    group_scores = scores.view(-1, n_group, E // n_group).max(dim=-1).values
    group_idx = torch.topk(group_scores, k=topk_group, dim=-1, sorted=False)[1]
    group_mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1)
    score_mask = group_mask.unsqueeze(-1).expand(-1, n_group, E // n_group).reshape(-1, E)
    idx = torch.topk(scores.masked_fill(~score_mask.bool(), 0.0), k=top_k, dim=-1, sorted=False)[1]
    w = scores.gather(1, idx)
    if top_k > 1 and norm:
        w = w / (w.sum(dim=-1, keepdim=True) + 1e-20)
    else:
        w = w * scale
    return idx, w


def run(m, x):
    ctx = Context(rows=1, length=x.shape[0], document_starts=torch.zeros(x.shape[0]), training=False, seed=0,
                  balance_weight=0.0, boundaries=None, device=x.device)
    with torch.no_grad():
        return m(ctx, x)


def test_deepseek_v3_group_limited_scaled():
    # 8 experts in 4 groups, the best 2 groups, top-3, renormalised, ×2.5, a score-correction bias
    # (as transformers maps n_group 4, topk_group 2, routed_scaling_factor 2.5, e_score_correction_bias)
    m = block({"topK": 3, "scoring": "sigmoid", "normalizeTopK": True, "groups": 4, "groupTopK": 2, "groupScore": "top2", "routedScale": 2.5,
               "scoreBias": True})
    assert not m.get_parameter("router.scoreBias").requires_grad
    x = torch.randn(64, D, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        bias = m.get_parameter("router.scoreBias")
        logits = F.linear(x, m.get_parameter("router.weight"))
        idx, w = v3_router(logits, bias, 3, 4, 2, True, 2.5)
        expected = experts_out(m, x, idx, w)
        # the bias changes the choice for some tokens (else this would not test it)
        unbiased, _ = v3_router(logits, torch.zeros_like(bias), 3, 4, 2, True, 2.5)
        assert not torch.equal(torch.sort(idx, 1).values, torch.sort(unbiased, 1).values)
    got = run(m, x)
    assert (got - expected).abs().max().item() <= 1e-5 * expected.abs().max().item()
    # the groups change the choice for some tokens (else this would not test them)
    assert not torch.equal(torch.sort(idx, 1).values, torch.sort(torch.topk(logits.sigmoid(), 3).indices, 1).values)


def test_deepseek_v2_group_limited_greedy_scaled():
    m = block({"topK": 2, "scoring": "softmax", "normalizeTopK": False, "groups": 4, "groupTopK": 1, "groupScore": "max", "routedScale": 16.0})
    x = torch.randn(64, D, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        logits = F.linear(x, m.get_parameter("router.weight"))
        idx, w = v2_router(logits, 2, 4, 1, False, 16.0)
        expected = experts_out(m, x, idx, w)
    got = run(m, x)
    assert (got - expected).abs().max().item() <= 1e-5 * expected.abs().max().item()
    assert not torch.equal(torch.sort(idx, 1).values, torch.sort(torch.topk(logits.softmax(-1), 2).indices, 1).values)
