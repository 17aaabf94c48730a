"""ConceptMoE's chunk module (boundary router).

p_n = ½(1 − cos(W_q h_n, W_k h_{n−1})) clipped to [0, 1], with p = 1 and a boundary forced at each
row start and document start. Boundaries: imposed ones where the caller gives them (``boundaries=``
of ``Model.forward``; forced ones are kept), else b_n ~ Bernoulli(sharpen_τ(p_n)) in training, drawn
with the runtime's generator and seed so that both sides sample the same boundaries, else p_n ≥ ½.
The ratio loss a·R/(R−1)·((R−1)·F·G + (1−F)(1−G)) + b·G (F: the sampled boundary rate, a
constant; G: mean p; a, b from :func:`ratio_loss_weights`, whose integral sums the errors of
:func:`controlled_rate`) joins the auxiliary losses in training.
"""
import torch

from ..context import linear, prng
from ..graph import Block, register


def sharpen(p: float, tau: float) -> float:
    return p ** (1 / tau) if p > 0.5 else 1 - (1 - p) ** (1 / tau)


def ratio_loss_weights(s: dict, integral: float) -> tuple[float, float]:
    """``(a, b)`` of L = a·R/(R−1)·((R−1)·F·G + (1−F)(1−G)) + b·G: the paper's (λ, 0) with
    ``ratioControl: "plain"``; ``(kp, ki·R/(R−1)·integral)`` with ``"pi"``."""
    if s.get("ratioControl", "plain") == "plain":
        return s["lambda"], 0.0
    return s["kp"], s["ki"] * s["ratio"] / (s["ratio"] - 1) * integral


def controlled_rate(s: dict, sampled: float, threshold: float) -> float:
    """The boundary rate whose error the controller's integral sums: the sampled one with ``"plain"``,
    else (1 − w)·F + w·F½ (F½: the rate at p ≥ ½ on the same batch, w = ``thresholdWeight``)."""
    if s.get("ratioControl", "plain") == "plain":
        return sampled
    w = s.get("thresholdWeight", 0.4)
    return (1 - w) * sampled + w * threshold


def ratio_control_step(integral: float, ratio: float, rate: float) -> float:
    """The controller's integral after a step whose held rate was ``rate``: integral + R·rate − 1 when
    that error is within ±0.25 (anti-windup), clamped to ±50."""
    e = ratio * rate - 1
    return integral if abs(e) > 0.25 else max(-50.0, min(50.0, integral + e))


def unit(t):
    return t / (torch.linalg.vector_norm(t, dim=-1, keepdim=True) + 1e-12)


@register("chunk")
class Chunk(Block):
    def forward(self, ctx, x):
        s = self.spec
        n, device = x.shape[0], x.device
        rows = ctx.layout
        row_start = torch.zeros(n, dtype=torch.bool, device=device)
        prev = torch.arange(n, device=device) - 1
        start = 0
        for length in rows:
            if length > 0:
                row_start[start] = True
                prev[start] = start
            start += length
        doc = ctx.document_starts[:n] if ctx.document_starts.shape[0] >= n else torch.nn.functional.pad(ctx.document_starts, (0, n - ctx.document_starts.shape[0]))
        forced = row_start | doc
        q = unit(linear(x, self.p("q.weight")))
        k = unit(linear(x, self.p("k.weight")))
        cos = (q * k[prev]).sum(-1)
        raw = torch.clamp((1 - cos) * 0.5, 0, 1)
        f = forced.to(x.dtype)
        probs = f + (1 - f) * raw
        random = prng(ctx.next_seed())
        for _ in range(ctx.draw_skip):
            random()
        if ctx.imposed is not None:
            b = forced | ctx.imposed.to(device)[:n]
        elif ctx.training:
            host = probs.detach().float().cpu().tolist()
            forced_host = forced.cpu().tolist()
            b = torch.tensor([fo or random() < sharpen(p, s["tau"]) for fo, p in zip(forced_host, host)], dtype=torch.bool, device=device)
        else:
            b = forced | (probs.detach() >= 0.5)
        counts = b.to(torch.int64)
        concepts, start = [], 0
        for length in rows:
            concepts.append(int(counts[start:start + length].sum()))
            start += length
        count = sum(concepts)
        # boundaries at p ≥ ½ (forced ones have p = 1), whichever boundaries the pass took; only
        # training uses them (and at evaluation they are the boundaries)
        threshold = int((probs.detach() >= 0.5).sum()) if ctx.training else count
        a, b_weight = ratio_loss_weights(s, ctx.ratio_integral)
        if ctx.training and (a > 0 or b_weight != 0):
            # the proportional term acts on the sampled rate (the integral, in train.py, on controlled_rate's mix)
            F, G, R = count / n, probs.mean(), s["ratio"]
            ctx.aux_losses.append((G * ((R - 1) * F) + (1 - G) * (1 - F)) * (R / (R - 1) * a) + G * b_weight)
        ctx.chunk = {"h": x, "p": probs, "b": b, "concepts": concepts, "receive": torch.cumsum(counts, 0) - 1}
        ctx.compression["tokens"] += n
        ctx.compression["concepts"] += count
        ctx.compression["threshold"] += threshold
        return x
