"""The forward context: what a block sees besides its input and its own parameters.

The token stream is flat, ``[N, d]`` with ``N = Σ rows``, exactly as the TypeScript runtime keeps
it: ``layout`` holds the length of each row (all ``T`` at token level; each row's concept count
inside a concept stage), ``positions`` each element's position in its row (restarting at document
starts), ``doc`` each element's document number within its row. Auxiliary losses (ratio, balance)
are appended to ``aux_losses``, already weighted.
"""
from __future__ import annotations

import math

import torch


def mix_seed(seed: int, i: int) -> int:
    """The runtime's seed mixer (``Lower.mixSeed``): a 31-bit seed from a seed and an index."""
    h = (seed ^ ((i + 1) * 0x9E3779B1 & 0xFFFFFFFF)) & 0xFFFFFFFF
    h = ((h ^ (h >> 16)) * 0x85EBCA6B) & 0xFFFFFFFF
    h = ((h ^ (h >> 13)) * 0xC2B2AE35) & 0xFFFFFFFF
    return (h ^ (h >> 16)) & 0x7FFFFFFF


def _imul(a: int, b: int) -> int:
    return (a * b) & 0xFFFFFFFF


def prng(seed: int):
    """mulberry32, the generator the runtime samples boundaries and batches with."""
    state = [seed & 0xFFFFFFFF]

    def draw() -> float:
        state[0] = (state[0] + 0x6D2B79F5) & 0xFFFFFFFF
        t = state[0]
        t = _imul(t ^ (t >> 15), t | 1)
        t ^= (t + _imul(t ^ (t >> 7), t | 61)) & 0xFFFFFFFF
        return ((t ^ (t >> 14)) & 0xFFFFFFFF) / 4294967296

    return draw


class Context:
    def __init__(self, *, rows: int, length: int, document_starts: torch.Tensor, training: bool, seed: int,
                 balance_weight: float, boundaries: torch.Tensor | None, device: torch.device, ratio_integral: float = 0.0):
        self.training = training
        self.seed = seed
        self._seeds = 0
        self.balance_weight = balance_weight
        self.device = device
        self.layout: list[int] = [length] * rows
        starts = document_starts.reshape(rows, length).to(device=device, dtype=torch.bool).clone()
        starts[:, 0] = False
        #: flat token indices where a new document starts inside a row
        self.document_starts = starts.reshape(-1)
        doc = torch.cumsum(starts.to(torch.int64), dim=1)
        #: the document of each position within its row (0 from the row's start, +1 at each document
        #: start), or None when every row is one document; attention keeps a query within its document
        self.documents = doc.reshape(-1) if bool(starts.any()) else None
        # position within the row, restarting at document starts
        idx = torch.arange(length, device=device).expand(rows, length)
        start_of = torch.where(starts, idx, torch.zeros_like(idx))
        start_of = torch.cummax(start_of, dim=1).values
        self.positions = (idx - start_of).reshape(-1)
        #: boundaries imposed on the (single) concept stage instead of its own, ``[N]`` bool
        self.imposed = boundaries
        #: the ratio controller's integral for this training step (``ratioControl: "pi"``)
        self.ratio_integral = ratio_integral
        #: boundary draws to skip first (a rank's rows of a global batch: the draws of the rows before)
        self.draw_skip = 0
        self.aux_losses: list[torch.Tensor] = []
        self.chunk = None
        self.concept: torch.Tensor | None = None
        self.compression = {"tokens": 0, "concepts": 0, "threshold": 0}
        self._memo: dict = {}

    def next_seed(self) -> int:
        s = mix_seed(self.seed, self._seeds)
        self._seeds += 1
        return s

    def rope_tables(self, dim: int, base: float, scaling: dict | None = None):
        """cos and sin ``[N, 1, dim/2]`` for the current positions (float32, as the runtime), under a
        rotary ``scaling`` when given (``rope_frequencies``)."""
        key = (id(self.positions), dim, base, None if scaling is None else tuple(sorted(scaling.items())))
        if key not in self._memo:
            half = dim // 2
            freqs, attention = rope_frequencies(dim, base, scaling)
            inverse = torch.tensor(freqs, dtype=torch.float32, device=self.device)
            angles = self.positions.to(torch.float32).reshape(-1, 1, 1) * inverse.reshape(1, 1, half)
            cos, sin = torch.cos(angles), torch.sin(angles)
            if attention != 1:
                cos, sin = cos * attention, sin * attention
            self._memo[key] = (cos, sin, self.positions)
        cos, sin, _ = self._memo[key]
        return cos, sin


def rope_frequencies(dim: int, base: float, scaling: dict | None) -> tuple[list[float], float]:
    """The inverse frequency of each rotated pair and the factor on cos and sin. ``linear``: each
    divided by ``factor``; ``yarn``: a ramp over the pairs from the plain frequency (below ``low``) to
    the one divided by ``factor`` (above ``high``), where ``low`` and ``high`` are the pairs at which a
    wave of ``originalContext`` turns ``betaFast`` and ``betaSlow`` times."""
    plain = [base ** (-(2 * j) / dim) for j in range(dim // 2)]
    if scaling is None:
        return plain, 1.0
    factor = scaling["factor"]
    if scaling["type"] == "linear":
        return [f / factor for f in plain], 1.0

    def pair_at(turns: float) -> float:
        return dim * math.log(scaling["originalContext"] / (turns * 2 * math.pi)) / (2 * math.log(base))

    low, high = pair_at(scaling.get("betaFast", 32)), pair_at(scaling.get("betaSlow", 1))
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = [min(1.0, max(0.0, (j - low) / (high - low))) for j in range(dim // 2)]
    return [(f / factor) * r + f * (1 - r) for f, r in zip(plain, ramp)], scaling.get("attention", 1.0)


def linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """x·Wᵀ (+ b) with W in PyTorch layout ``[out, in]``."""
    return torch.nn.functional.linear(x, w, b)


def rms_norm(x: torch.Tensor, g: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(torch.mean(x * x, dim=-1, keepdim=True) + eps) * g


def layer_norm(x: torch.Tensor, g: torch.Tensor, b: torch.Tensor | None, eps: float) -> torch.Tensor:
    mean = torch.mean(x, dim=-1, keepdim=True)
    var = torch.mean((x - mean) ** 2, dim=-1, keepdim=True)
    y = (x - mean) * torch.rsqrt(var + eps) * g
    return y if b is None else y + b


def activate(x: torch.Tensor, activation: str) -> torch.Tensor:
    if activation in ("swiglu", "silu"):
        return x * torch.sigmoid(x)
    if activation in ("geglu", "gelu"):
        return x * 0.5 * (torch.erf(x * math.sqrt(0.5)) + 1)
    if activation == "gelu_tanh":
        return x * 0.5 * (torch.tanh((x + 0.044715 * x * x * x) * math.sqrt(2 / math.pi)) + 1)
    if activation == "relu":
        return torch.relu(x)
    raise ValueError(f"unknown activation {activation!r}")


def rotate(x: torch.Tensor, dim: int, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of the first ``dim`` features of each head of ``x [n, heads, hd]`` (rotate-half)."""
    half = dim // 2
    x1, x2, rest = x[..., :half], x[..., half:dim], x[..., dim:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest], dim=-1)


def _mask(ctx: Context, start: int, length: int, causal: bool, window: int | None) -> torch.Tensor:
    """Additive mask ``[L, L]`` of one row: 0 where a query may attend, −1e9 elsewhere (causal, sliding
    window); rows packing several documents get a block-diagonal document mask on top (see ``_documents``)."""
    q = torch.arange(length, device=ctx.device).reshape(-1, 1)
    k = torch.arange(length, device=ctx.device).reshape(1, -1)
    ok = torch.ones(length, length, dtype=torch.bool, device=ctx.device)
    if causal:
        ok &= k <= q
    if window is not None:
        ok &= (q - k < window) if causal else ((q - k).abs() < window)
    return torch.where(ok, 0.0, -1e9).to(torch.float32)


def attend(ctx: Context, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, window: int | None) -> torch.Tensor:
    """Scaled dot-product attention of ``q [N, H, dqk]``, ``k [N, KV, dqk]``, ``v [N, KV, dv]`` within
    each row of ``ctx.layout``; a KV head serves ``H/KV`` consecutive query heads. Returns ``[N, H·dv]``."""
    rows = ctx.layout
    if len(set(rows)) <= 1:
        return _attend_rows(ctx, q, k, v, len(rows), rows[0] if rows else 0, causal, window, 0)
    parts, start = [], 0
    for length in rows:
        if length > 0:
            parts.append(_attend_rows(ctx, q[start:start + length], k[start:start + length], v[start:start + length], 1, length, causal, window, start))
        start += length
    return torch.cat(parts, dim=0)


def _documents(ctx: Context, start: int, rows: int, length: int) -> torch.Tensor:
    """Additive mask ``[rows, 1, L, L]``: 0 where query and key are in the same document, −1e9 elsewhere."""
    d = ctx.documents[start:start + rows * length].reshape(rows, 1, length)
    return torch.where(d.unsqueeze(-1) == d.unsqueeze(-2), 0.0, -1e9).to(torch.float32)


def _attend_rows(ctx, q, k, v, rows, length, causal, window, start):
    heads, dqk = q.shape[1], q.shape[2]
    kv, dv = k.shape[1], v.shape[2]
    group = heads // kv
    q4 = q.reshape(rows, length, heads, dqk).transpose(1, 2)
    k4 = k.reshape(rows, length, kv, dqk).transpose(1, 2).repeat_interleave(group, dim=1)
    v4 = v.reshape(rows, length, kv, dv).transpose(1, 2).repeat_interleave(group, dim=1)
    scores = torch.matmul(q4, k4.transpose(-1, -2)) * (1 / math.sqrt(dqk)) + _mask(ctx, 0, length, causal, window)
    if ctx.documents is not None:
        scores = scores + _documents(ctx, start, rows, length)
    out = torch.matmul(torch.softmax(scores, dim=-1), v4)
    return out.transpose(1, 2).reshape(rows * length, heads * dv)


def ste(x: torch.Tensor) -> torch.Tensor:
    """Straight-through estimator: forward 1, backward identity."""
    return x - x.detach() + 1
