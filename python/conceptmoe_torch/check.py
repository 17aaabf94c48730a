"""Compares an export with the reference values the TypeScript runtime wrote next to it
(``conceptmoe export --reference``): ``python -m conceptmoe_torch.check DIR`` prints the
differences and exits non-zero when one exceeds its tolerance."""
from __future__ import annotations

import json
import os
import sys

import torch
from safetensors.torch import load_file

from .graph import build_model
from .weights import from_file, load_weights


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖a − b‖ / ‖b‖ (‖a − b‖ when b is zero)."""
    d = torch.linalg.vector_norm((a - b).double()).item()
    n = torch.linalg.vector_norm(b.double()).item()
    return d / n if n > 0 else d


def executed_flops(model, ids, starts) -> int:
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(ids, starts, training=False)
    return counter.get_total_flops()


def compare(directory: str) -> dict:
    """The differences between this package's model and the reference, as a dict of numbers."""
    ref = json.load(open(os.path.join(directory, "reference.json")))
    tensors = load_file(os.path.join(directory, "reference.safetensors"))
    model = build_model(os.path.join(directory, "graph.json"))
    load_weights(model, os.path.join(directory, "model.safetensors"))
    b = ref["batch"]
    ids = torch.tensor(b["ids"], dtype=torch.int64).reshape(b["rows"], b["length"])
    targets = torch.tensor(b["targets"], dtype=torch.int64).reshape(b["rows"], b["length"])
    starts = torch.zeros(b["rows"] * b["length"], dtype=torch.bool)
    starts[b["documentStarts"]] = True
    starts = starts.reshape(b["rows"], b["length"])
    out: dict = {}
    model.eval()
    with torch.no_grad():
        logits, ctx = model(ids, starts, training=False)
    out["logits_max_abs"] = (logits - tensors["logits"]).abs().max().item()
    if ref["eval"]["boundaries"] is not None:
        own = ctx.chunk["b"].to(torch.int64).tolist()
        out["eval_boundaries_equal"] = own == ref["eval"]["boundaries"]
    ours = ref["eval"]["flops"]
    out["flops_torch"] = executed_flops(model, ids, starts)
    out["flops_ours"] = ours["weights"] + ours["attentionMap"] + ours["other"]
    out["flops_static"] = ref["eval"]["staticFlops"]
    out["flops_weights_ours"] = ours["weights"]
    imposed = None if ref["train"]["boundaries"] is None else torch.tensor(ref["train"]["boundaries"], dtype=torch.bool)
    model.train()
    model.zero_grad()
    total, ce, aux, tctx = model.loss(ids, targets, starts, training=True, seed=ref["seed"], balance_weight=ref["balanceWeight"], boundaries=imposed)
    total.backward()
    out["loss_abs"] = abs(total.item() - ref["train"]["loss"])
    out["ce_abs"] = abs(ce.item() - ref["train"]["ce"])
    out["aux_abs"] = abs(aux.item() - ref["train"]["aux"])
    pairs = []
    for p in model.owned():
        g = model.parameter(p["path"]).grad
        g = torch.zeros_like(model.parameter(p["path"])) if g is None else g
        expected = from_file(p, tensors, "grad/")
        pairs.append((p["path"], g, expected))
    # a gradient that is zero analytically (a key bias under softmax) is rounding noise on both sides:
    # below 1e-6 of the largest gradient's norm on both, it counts as equal
    largest = max(torch.linalg.vector_norm(e.double()).item() for _, _, e in pairs)
    worst, where, zero = 0.0, None, []
    for path, g, expected in pairs:
        small = 1e-6 * largest
        if torch.linalg.vector_norm(g.double()).item() <= small and torch.linalg.vector_norm(expected.double()).item() <= small:
            zero.append(path)
            continue
        r = rel(g, expected)
        if r > worst:
            worst, where = r, path
    out["grad_zero"] = zero
    out["grad_rel_max"] = worst
    out["grad_rel_worst"] = where
    if imposed is not None:
        # the same step with boundaries this package samples itself (the runtime's generator and seed)
        with torch.no_grad():
            _, _, _, own = model.loss(ids, targets, starts, training=True, seed=ref["seed"], balance_weight=ref["balanceWeight"])
        out["train_boundaries_equal"] = own.chunk["b"].to(torch.int64).tolist() == ref["train"]["boundaries"]
    return out


def main() -> None:
    out = compare(sys.argv[1])
    print(json.dumps(out, indent=1))
    ok = out["logits_max_abs"] <= 1e-4 and out["loss_abs"] <= 1e-4 and out["grad_rel_max"] <= 1e-4 and out["flops_torch"] == out["flops_ours"]
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
