"""ConceptMoE's dechunk: EMA over each row's concepts, plug-back to tokens, STE confidence.

ĉ^ema_m = P_m·ĉ_m + (1 − P_m)·ĉ^ema_{m−1} (P: the boundary probability that opened concept m, 1 − P
floored at 1e-6; restarting at a document start), computed per row as the lower-triangular matrix L_mj = Π_{i=j+1..m}(1 − P_i)·P_j
times the concepts; token n receives the EMA of its concept ψ(n), and
z_n = h_n + STE(c_n)·ĉ^ema_ψ(n) with c_n = p_n at a boundary, 1 − p_n elsewhere (forward value 1).
"""
import torch

from ..context import ste
from ..graph import Block, register

EMA_FLOOR = 1e-6


def ema_of_row(P, y):
    M = P.shape[0]
    not_first = torch.ones(M, dtype=P.dtype, device=P.device)
    not_first[0] = 0
    cs = torch.cumsum(torch.log(torch.clamp(1 - P, min=EMA_FLOOR)) * not_first, 0)
    diff = torch.clamp(cs.reshape(M, 1) - cs.reshape(1, M), max=0)
    tril = torch.tril(torch.ones(M, M, dtype=P.dtype, device=P.device))
    # the EMA restarts exactly at a document start (P = 1 exactly): no weight across it
    count = torch.cumsum((P.detach() == 1).to(P.dtype), 0)
    resets = (count.reshape(M, 1) == count.reshape(1, M)).to(P.dtype)
    return torch.matmul(torch.exp(diff) * tril * P.reshape(1, M) * resets, y)


@register("dechunk")
class Dechunk(Block):
    def forward(self, ctx, y):
        ch = ctx.chunk
        if ch is None:
            raise RuntimeError("a dechunk runs inside a concept stage, after its chunk module")
        b, p = ch["b"], ch["p"]
        P = p[b]
        parts, offset = [], 0
        for M in ch["concepts"]:
            if M > 0:
                parts.append(ema_of_row(P[offset:offset + M], y[offset:offset + M]))
            offset += M
        table = torch.cat(parts, 0)
        cz = table[ch["receive"]]
        bf = b.to(p.dtype)
        confidence = bf * p + (1 - bf) * (1 - p)
        ctx.concept = cz
        return ch["h"] + cz * ste(confidence).reshape(-1, 1)
