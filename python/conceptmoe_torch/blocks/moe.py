"""Mixture of experts: a router scores E experts, each token runs its top-k (sparse dispatch).

Gates are the router's probabilities (softmax or sigmoid) on the chosen experts, renormalised to sum
1 when ``normalizeTopK``, times ``routedScale``. With ``groups`` and ``groupTopK`` (DeepSeek's
group-limited routing) the top-k is taken among the experts of each token's ``groupTopK`` best groups
(a group scores its largest probability, ``max``, or the sum of its two largest, ``top2``); with
``scoreBias`` the buffer ``router.scoreBias`` is added to the scores that choose (DeepSeek-V3's score
correction), not to the gates; optional
shared experts run on every token, optionally scaled by a sigmoid
gate. In training, the Switch load-balancing loss ``E·Σ_e f_e·P_e`` (f: fraction of token-slot pairs
routed to e, P: mean probability), weighted by the step's balance weight, joins the auxiliary losses.
"""
import torch

from ..context import linear, activate
from ..graph import Block, register
from .mlp import ffn


@register("moe")
class MoE(Block):
    def forward(self, ctx, x):
        s = self.spec
        n, E, k = x.shape[0], s["experts"], s["topK"]
        probs = linear(x, self.p("router.weight"), self.p("router.bias"))
        probs = torch.softmax(probs, dim=-1) if s["scoring"] == "softmax" else torch.sigmoid(probs)
        chosen = torch.topk(self._selection(probs.detach()), k, dim=-1).indices  # [n, k]
        gates = probs.gather(1, chosen)
        if s["normalizeTopK"]:
            gates = gates / gates.sum(1, keepdim=True)
        if s.get("routedScale", 1) != 1:
            gates = gates * s["routedScale"]
        flat_expert = chosen.reshape(-1)
        flat_token = torch.arange(n, device=x.device).repeat_interleave(k)
        flat_gate = gates.reshape(-1)
        routed = torch.zeros_like(x)
        for e in torch.unique(flat_expert).tolist():
            pairs = (flat_expert == e).nonzero().reshape(-1)
            tokens = flat_token[pairs]
            y = ffn(x[tokens], lambda name: self._expert(name, e), s["activation"])
            routed = routed.index_add(0, tokens, y * flat_gate[pairs].reshape(-1, 1))
        out = routed
        if s["shared"] is not None:
            shared = ffn(x, lambda name: self.p(f"shared.{name}"), s["activation"])
            if s["shared"]["gate"]:
                shared = shared * torch.sigmoid(linear(x, self.p("sharedGate.weight")))
            out = out + shared
        if ctx.training and ctx.balance_weight > 0:
            fraction = torch.bincount(flat_expert, minlength=E).to(probs.dtype) / (n * k)
            ctx.aux_losses.append((probs.mean(0) * fraction).sum() * (E * ctx.balance_weight))
        return out

    def _selection(self, probs):
        """The scores the top-k is taken over: plus the score bias, if any; outside each token's best groups, 0."""
        s = self.spec
        if s.get("scoreBias", False):
            probs = probs + self.p("router.scoreBias").detach()
        groups, keep = s.get("groups", 1), s.get("groupTopK")
        if groups == 1 or keep is None or keep >= groups:
            return probs
        n = probs.shape[0]
        by_group = probs.reshape(n, groups, -1)
        score = by_group.max(-1).values if s.get("groupScore", "max") == "max" else by_group.topk(2, dim=-1).values.sum(-1)
        mask = torch.zeros_like(score).scatter_(1, torch.topk(score, keep, dim=-1).indices, 1.0)
        return (by_group * mask.unsqueeze(-1)).reshape(n, -1)

    def _expert(self, name, e):
        w = self.p(f"experts.{name}")
        return None if w is None else w[e]
