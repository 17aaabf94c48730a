"""Builds a ``torch.nn.Module`` from an exported graph (``graph.json``).

Every node of the graph is a module of its kind's class (see ``blocks/``), its children registered
under their path segments, so the module tree is the graph and a parameter's name in
``state_dict()`` is its graph path with ``/`` written ``.`` (``layers.3.mixer.attn.q.weight``).
Matrices are in PyTorch layout: a weight applied as ``x·W`` in the graph (``[in, out]``) is held as
``[out, in]``; stacked expert matrices ``[E, in, out]`` as ``[E, out, in]``; embedding tables as
they are. A tied parameter (a tied LM head) is the same ``Parameter`` object as its owner.
"""
from __future__ import annotations

import json
from typing import Callable

import torch
from torch import nn

from .context import Context

#: block kind name → module class; :func:`register` adds user kinds
KINDS: dict[str, type] = {}


def register(name: str):
    """Class decorator registering the PyTorch module of a block kind."""
    def wrap(cls):
        KINDS[name] = cls
        return cls
    return wrap


class UnknownKind(Exception):
    """A graph names a block kind that has no PyTorch module."""

    def __init__(self, kind: str, path: str):
        super().__init__(f"block kind {kind!r} at {path or '(root)'} has no PyTorch module; register one with conceptmoe_torch.register({kind!r})")
        self.kind = kind
        self.path = path


class Block(nn.Module):
    """Base of every kind's module: its spec, its children (in order) and its own parameters."""

    def __init__(self, node: dict, children: list["Block"]):
        super().__init__()
        self.kind = node["kind"]
        self.path = node["path"]
        self.spec = node["spec"]
        self.children_in_order = []
        for i, (child, cnode) in enumerate(zip(children, node["children"])):
            segment = cnode["name"] if cnode.get("name") is not None else str(i)
            self.add_module(segment, child)
            self.children_in_order.append(child)
        for p in node["params"]:
            init = torch.zeros(p["torchShape"], dtype=torch.float32)
            # a buffer (DeepSeek-V3's score-correction bias) is read, never trained: no gradient
            _declare(self, p["name"], nn.Parameter(init, requires_grad=not p.get("buffer", False)))

    def p(self, name: str) -> torch.Tensor | None:
        """Own parameter by its name in the graph (``q.weight``), or None."""
        try:
            return self.get_parameter(name)
        except AttributeError:
            return None

    def forward(self, ctx: Context, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError


def _declare(module: nn.Module, dotted: str, param: nn.Parameter) -> None:
    *heads, last = dotted.split(".")
    for h in heads:
        if not hasattr(module, h):
            module.add_module(h, nn.Module())
        module = getattr(module, h)
    module.register_parameter(last, param)


def _build(node: dict) -> Block:
    children = [_build(c) for c in node["children"]]
    cls = KINDS.get(node["kind"])
    if cls is None:
        raise UnknownKind(node["kind"], node["path"])
    return cls(node, children)


class Model(nn.Module):
    """A whole exported model: token ids ``[rows, T]`` → logits ``[rows·T, vocab]``."""

    def __init__(self, graph: dict):
        super().__init__()
        import importlib
        from . import blocks  # noqa: F401  (registers the built-in kinds)
        for kind in graph.get("userModules", {}):
            importlib.import_module(f"{__package__}.user_{''.join(c if c.isalnum() or c == '_' else '_' for c in kind)}")
        self.graph = graph
        self.root = _build(graph["root"])
        self.params = graph["params"]
        by_path = {p["path"]: p for p in self.params}
        # tied parameters are the owner's Parameter object
        for p in self.params:
            if p.get("tiedTo") is not None:
                owner = self.root.get_parameter(_dotted(by_path[p["tiedTo"]]["path"]))
                node = self.root.get_submodule(_dotted(p["path"][: len(p["path"]) - len(p["name"]) - 1]))
                _declare_tied(node, p["name"], owner)

    def owned(self) -> list[dict]:
        """The parameters that are stored (tied ones excluded), in graph order."""
        return [p for p in self.params if p.get("tiedTo") is None]

    def parameter(self, path: str) -> nn.Parameter:
        return self.root.get_parameter(_dotted(path))

    def forward(self, ids: torch.Tensor, document_starts: torch.Tensor | None = None, *, training: bool | None = None,
                seed: int = 0, balance_weight: float = 0.01, boundaries: torch.Tensor | None = None, ratio_integral: float = 0.0,
                draw_skip: int = 0):
        rows, length = ids.shape
        starts = torch.zeros_like(ids, dtype=torch.bool) if document_starts is None else document_starts
        ctx = Context(rows=rows, length=length, document_starts=starts, training=self.training if training is None else training,
                      seed=seed, balance_weight=balance_weight, boundaries=None if boundaries is None else boundaries.reshape(-1).to(torch.bool),
                      device=ids.device, ratio_integral=ratio_integral)
        ctx.draw_skip = draw_skip
        logits = self.root(ctx, ids.reshape(-1))
        return logits, ctx

    def loss(self, ids, targets, document_starts=None, **kw):
        """Mean next-token cross-entropy over positions with a target (≥ 0), plus the auxiliary losses."""
        logits, ctx = self(ids, document_starts, **kw)
        t = targets.reshape(-1)
        mask = (t >= 0).to(logits.dtype)
        nll = -torch.log_softmax(logits.float(), dim=-1).gather(1, t.clamp(min=0).reshape(-1, 1)).reshape(-1)
        ce = (nll * mask).sum() / mask.sum().clamp(min=1)
        aux = torch.stack([a.reshape(()) for a in ctx.aux_losses]).sum() if ctx.aux_losses else torch.zeros((), device=logits.device)
        return ce + aux, ce, aux, ctx


def _declare_tied(module: nn.Module, dotted: str, owner: nn.Parameter) -> None:
    *heads, last = dotted.split(".")
    for h in heads:
        module = getattr(module, h)
    delattr(module, last)
    module.register_parameter(last, owner)


def _dotted(path: str) -> str:
    return path.replace("/", ".")


def load_graph(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def build_model(graph: dict | str) -> Model:
    """The module of an exported graph (a dict, or the path of ``graph.json``)."""
    return Model(load_graph(graph) if isinstance(graph, str) else graph)
