"""PyTorch eager peers of our training-step benchmark (bench/gpu/train-step.ts).

The same decoder-only LMs as our graphs: pre-norm layers (RMSNorm eps 1e-6 with a weight), multi-head
attention without biases and with rotary embeddings on the whole head (base 10000, rotate-half),
a causal softmax, an MLP (GELU: up, down; SwiGLU: gate, up, down) or a MoE (softmax router, top-k,
stacked SwiGLU experts, sparse dispatch by index, load-balancing loss 0.01), a final RMSNorm and an LM
head (tied to the embedding when the config says so). AdamW (lr 3e-3, betas 0.9/0.95, eps 1e-8,
weight decay 0.1 on matrices), global-norm clipping at 1.0. fp32, TF32 off.

The ConceptMoE peer (examples/compare/moe-tiny.json at R = 2: 2 encoder layers, the chunk module,
2 concept layers with top-7 experts, the dechunk EMA, 2 decoder layers with joint decoding) is written
the way one would in PyTorch: boundaries sampled from the τ = 6 sharpened probabilities (p_1 = 1), a
boundary closes its chunk, sum merge by scatter_add into concepts padded to the longest row (the
concept model's causal attention keeps padding out of real concepts), the EMA as a lower-triangular
matrix per row, plug-back by gather, the straight-through confidence, the ratio loss (λ 0.03), and
q, k, v of the decoder's attention reading the concept through their own projections.

Prints one JSON line per model: params (compare with ours), the median step over 10 steps after 3
warm-ups, and the first loss. Run on the GPU machine: python3 bench/peers/torch_lm.py [cuda|cpu] [name,...]
Options (after the positional ones): --threads N (torch.set_num_threads, CPU; default torch's, printed
as `threads`), --steps N (timed steps, default 10), --warmup N (untimed steps first, default 3).
bench/train.ts runs it on CPU at 1 and 2 threads, with its own warm-up count.
Checked on CPU (torch 2.13): parameter counts equal ours for all four models.
"""
import json
import math
import statistics
import sys
import time

import torch
import torch.nn.functional as F

WORKLOADS = [
    {"name": "dense-2L-d128", "vocab": 256, "d": 128, "layers": 2, "heads": 4, "ffn": ("gelu", 512), "tied": False, "rows": 8, "length": 128},
    {"name": "dense-4L-d512", "vocab": 256, "d": 512, "layers": 4, "heads": 8, "ffn": ("gelu", 2048), "tied": False, "rows": 16, "length": 256},
    # examples/compare/moe-tiny.json
    {"name": "moe-tiny", "vocab": 256, "d": 64, "layers": 6, "heads": 4, "ffn": ("moe", 16, 2, 32), "tied": True, "rows": 8, "length": 128},
    # the ConceptMoE matched to moe-tiny at R = 2 (bench/gpu/train-step.ts's conceptmoe-1L-top7-R2)
    {"name": "conceptmoe-1L-top7-R2", "vocab": 256, "d": 64, "heads": 4, "tied": True, "rows": 8, "length": 128,
     "concept": {"encoder": 2, "body": 2, "decoder": 2, "experts": 16, "top_k": 2, "body_top_k": 7, "hidden": 32, "ratio": 2.0}},
]


class RMSNorm(torch.nn.Module):
    def __init__(self, d):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(d))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.weight


def normal(*shape):
    return torch.nn.Parameter(torch.randn(*shape) * 0.02)


def rope(x, positions):
    # x [B, H, T, hd]; rotate-half convention
    hd = x.shape[-1]
    half = hd // 2
    freqs = 10000.0 ** (-torch.arange(0, half, device=x.device, dtype=torch.float32) * 2 / hd)
    angles = positions[:, None].float() * freqs[None, :]
    cos, sin = angles.cos(), angles.sin()
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


class Attention(torch.nn.Module):
    def __init__(self, d, heads, joint=False):
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v, self.o = normal(d, d), normal(d, d), normal(d, d), normal(d, d)
        # joint decoding: the concept's own projections into q, k, v (zero-initialised, as ours)
        self.joint = torch.nn.ParameterList([torch.nn.Parameter(torch.zeros(d, d)) for _ in range(3)]) if joint else None

    def forward(self, x, concept=None):
        B, T, d = x.shape
        hd = d // self.heads
        split = lambda t: t.view(B, T, self.heads, hd).transpose(1, 2)
        positions = torch.arange(T, device=x.device)
        q, k, v = x @ self.q, x @ self.k, x @ self.v
        if self.joint is not None:
            q, k, v = q + concept @ self.joint[0], k + concept @ self.joint[1], v + concept @ self.joint[2]
        q, k, v = rope(split(q), positions), rope(split(k), positions), split(v)
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(hd)
        mask = torch.full((T, T), float("-inf"), device=x.device).triu(1)
        out = torch.softmax(scores + mask, dim=-1) @ v
        return out.transpose(1, 2).reshape(B, T, d) @ self.o


class MLP(torch.nn.Module):
    def __init__(self, d, hidden):
        super().__init__()
        self.up, self.down = normal(d, hidden), normal(hidden, d)

    def forward(self, x):
        return F.gelu(x @ self.up) @ self.down


class MoE(torch.nn.Module):
    def __init__(self, d, experts, top_k, hidden):
        super().__init__()
        self.top_k = top_k
        self.router = normal(d, experts)
        self.gate, self.up, self.down = normal(experts, d, hidden), normal(experts, d, hidden), normal(experts, hidden, d)
        self.aux = torch.zeros(())

    def forward(self, x):
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        probs = torch.softmax(x @ self.router, dim=-1)
        gates, chosen = probs.topk(self.top_k, dim=-1)
        out = torch.zeros_like(x)
        flat = chosen.reshape(-1)
        token = torch.arange(x.shape[0], device=x.device).repeat_interleave(self.top_k)
        for e in range(self.router.shape[1]):
            pick = (flat == e).nonzero(as_tuple=True)[0]
            if pick.numel() == 0:
                continue
            xe = x[token[pick]]
            ye = (F.silu(xe @ self.gate[e]) * (xe @ self.up[e])) @ self.down[e]
            out.index_add_(0, token[pick], ye * gates.reshape(-1)[pick, None])
        fraction = torch.bincount(flat, minlength=self.router.shape[1]).float() / flat.numel()
        self.aux = (probs.mean(0) * fraction).sum() * self.router.shape[1] * 0.01
        return out.reshape(shape)


class LM(torch.nn.Module):
    def __init__(self, w):
        super().__init__()
        d = w["d"]
        self.embed = normal(w["vocab"], d)
        self.layers = torch.nn.ModuleList()
        for _ in range(w["layers"]):
            ffn = MLP(d, w["ffn"][1]) if w["ffn"][0] == "gelu" else MoE(d, *w["ffn"][1:])
            self.layers.append(torch.nn.ModuleList([RMSNorm(d), Attention(d, w["heads"]), RMSNorm(d), ffn]))
        self.norm = RMSNorm(d)
        self.head = None if w["tied"] else normal(d, w["vocab"])

    def forward(self, ids, targets):
        x = self.embed[ids]
        aux = torch.zeros((), device=ids.device)
        for n1, attn, n2, ffn in self.layers:
            x = x + attn(n1(x))
            x = x + ffn(n2(x))
            if isinstance(ffn, MoE):
                aux = aux + ffn.aux
        x = self.norm(x)
        logits = x @ (self.embed.t() if self.head is None else self.head)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1)) + aux


def moe_layer(d, heads, experts, top_k, hidden, joint=False):
    return torch.nn.ModuleList([RMSNorm(d), Attention(d, heads, joint), RMSNorm(d), MoE(d, experts, top_k, hidden)])


def run_layers(layers, x, concept=None):
    aux = torch.zeros((), device=x.device)
    for n1, attn, n2, ffn in layers:
        x = x + attn(n1(x), concept)
        x = x + ffn(n2(x))
        aux = aux + ffn.aux
    return x, aux


class ConceptLM(torch.nn.Module):
    def __init__(self, w):
        super().__init__()
        d, c = w["d"], w["concept"]
        self.ratio = c["ratio"]
        self.embed = normal(w["vocab"], d)
        self.encoder = torch.nn.ModuleList([moe_layer(d, w["heads"], c["experts"], c["top_k"], c["hidden"]) for _ in range(c["encoder"])])
        # the chunk module starts from identity projections (p from the similarity of adjacent outputs), as ours
        self.chunk_q, self.chunk_k = torch.nn.Parameter(torch.eye(d)), torch.nn.Parameter(torch.eye(d))
        self.body = torch.nn.ModuleList([moe_layer(d, w["heads"], c["experts"], c["body_top_k"], c["hidden"]) for _ in range(c["body"])])
        self.decoder = torch.nn.ModuleList([moe_layer(d, w["heads"], c["experts"], c["top_k"], c["hidden"], joint=True) for _ in range(c["decoder"])])
        self.norm = RMSNorm(d)

    def forward(self, ids, targets):
        B, T = ids.shape
        h, aux = run_layers(self.encoder, self.embed[ids])
        # chunk: p_t = (1 - cos(q_t, k_{t-1})) / 2, p_1 = 1; boundaries sampled from the sharpened p
        q, k = F.normalize(h @ self.chunk_q, dim=-1), F.normalize(h @ self.chunk_k, dim=-1)
        p = torch.cat([torch.ones(B, 1, device=h.device), ((1 - (q[:, 1:] * k[:, :-1]).sum(-1)) / 2).clamp(0, 1)], dim=1)
        tau = 6.0
        sharp = torch.where(p > 0.5, p ** (1 / tau), 1 - (1 - p) ** (1 / tau))
        b = torch.bernoulli(sharp.detach())
        b[:, 0] = 1
        F_, G = b.mean(), p.mean()
        R = self.ratio
        aux = aux + R / (R - 1) * ((R - 1) * F_ * G + (1 - F_) * (1 - G)) * 0.03
        # merge (sum): token t joins the chunk closed by the first boundary at or after it
        before = (torch.cumsum(b, 1) - b).long()
        M = int(b.sum(1).max().item())
        merged = torch.zeros(B, M + 1, h.shape[-1], device=h.device).scatter_add_(1, before[..., None].expand_as(h), h)[:, :M]
        y, a2 = run_layers(self.body, merged)
        aux = aux + a2
        # dechunk: EMA over each row's concepts with P = p at the boundaries, then plug back
        closed = before + b.long() - 1  # the concept each token receives: the last one closed at or before it
        # P[m] = p at the boundary closing concept m (other tokens go to a spare slot, dropped)
        P = torch.zeros(B, M + 1, device=h.device).scatter(1, torch.where(b > 0, closed, torch.full_like(closed, M)), p)[:, :M]
        logs = torch.log(torch.clamp(1 - P, min=1e-6))
        logs[:, 0] = 0
        cs = torch.cumsum(logs, 1)
        L = torch.exp(torch.clamp(cs[:, :, None] - cs[:, None, :], max=0)) * torch.tril(torch.ones(M, M, device=h.device))
        ema = (L * P[:, None, :]) @ y
        cz = ema.gather(1, closed.clamp(min=0)[..., None].expand_as(h))
        confidence = b * p + (1 - b) * (1 - p)
        x = h + cz * (1 + confidence - confidence.detach())[..., None]
        x, a3 = run_layers(self.decoder, x, cz)
        logits = self.norm(x) @ self.embed.t()
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1)) + aux + a3


def main():
    args = sys.argv[1:]
    options = {}
    for flag in ("--threads", "--steps", "--warmup"):
        if flag in args:
            i = args.index(flag)
            if i + 1 >= len(args) or not args[i + 1].isdigit() or int(args[i + 1]) < (0 if flag == "--warmup" else 1):
                sys.exit(f"{flag} expects a {'whole number' if flag == '--warmup' else 'positive whole number'}")
            options[flag] = int(args[i + 1])
            del args[i:i + 2]
    if "--threads" in options:
        torch.set_num_threads(options["--threads"])
    timed = options.get("--steps", 10)
    warmup = options.get("--warmup", 3)
    device = args[0] if len(args) > 0 else "cuda"
    only = args[1].split(",") if len(args) > 1 and args[1] != "" else None
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.manual_seed(0)
    for w in WORKLOADS:
        if only is not None and w["name"] not in only:
            continue
        model = (ConceptLM(w) if "concept" in w else LM(w)).to(device)
        matrices = [p for p in model.parameters() if p.dim() >= 2]
        vectors = [p for p in model.parameters() if p.dim() < 2]
        opt = torch.optim.AdamW([{"params": matrices, "weight_decay": 0.1}, {"params": vectors, "weight_decay": 0.0}], lr=3e-3, betas=(0.9, 0.95), eps=1e-8)
        n = w["rows"] * w["length"]
        ids = torch.tensor([(i * 7 + (i % 13) * 5) % 256 for i in range(n)], device=device).view(w["rows"], w["length"])
        targets = torch.tensor([(i * 11 + 3) % 256 for i in range(n)], device=device).view(w["rows"], w["length"])
        times, first = [], None
        for s in range(warmup + timed):
            if device == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            loss = model(ids, targets)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            if device == "cuda":
                torch.cuda.synchronize()
            if s == 0:
                first = loss.item()
            if s >= warmup:
                times.append((time.perf_counter() - t0) * 1000)
        params = sum(p.numel() for p in model.parameters())
        print(json.dumps({"model": w["name"], "torch": torch.__version__, "threads": torch.get_num_threads(), "params": params, "stepMsMedian": round(statistics.median(times), 2), "firstLoss": first}), flush=True)


if __name__ == "__main__":
    main()
