"""Trains an exported model with ``torch.distributed``, as ``conceptmoe train`` does.

    torchrun --nproc_per_node N train.py [--fsdp] [--steps S] [--out DIR]
    python train.py ...                      (one process)

Same optimiser (AdamW: decay on matrices only, per-part learning-rate multipliers and β₁), schedule (linear
warm-up, cosine to ``minLrRatio``), global-norm clipping and data order (batch ``s`` of the seed) as
the TypeScript trainer; settings from ``train_settings.json``. The global batch of ``batchSize`` rows
is split by rows over the ranks; the cross-entropy is the mean over the global batch's targets (each
rank's sum is divided by the global count), so the gradients equal a one-process step's. Auxiliary
losses (MoE balance, ConceptMoE ratio) are computed from each rank's own rows, as usual under data
parallelism. ConceptMoE boundaries are drawn from the global batch's sequence of draws.

DDP by default; ``--fsdp`` shards with FSDP2 (``fully_shard``) each layer of every stack of layers,
then the root. Backend: NCCL on CUDA (``--bf16`` runs the forward under bf16 autocast), gloo on CPU.
Writes ``OUT/checkpoint.safetensors``: the export's tensors and names (PyTorch layout) with the
metadata of a ``conceptmoe train`` checkpoint in the standard layout (``conceptmoe: checkpoint/2``,
step, model config, naming scheme and ``layout``), which ``conceptmoe generate/verify --checkpoint
OUT`` read (no optimizer state: ``conceptmoe train --resume`` cannot continue it); and
``OUT/model.safetensors``, the same tensors as an export's weights file.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import time

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from .context import mix_seed
from .data import load_stream, train_batch
from .graph import build_model
from .weights import file_tensors, load_weights
from .blocks.chunk import controlled_rate, ratio_control_step


def learning_rate(o: dict, steps: int, step: int) -> float:
    if step < o["warmup"]:
        return o["lr"] * (step + 1) / o["warmup"]
    progress = min(1.0, (step - o["warmup"]) / max(1, steps - o["warmup"]))
    return o["lr"] * (o["minLrRatio"] + (1 - o["minLrRatio"]) * 0.5 * (1 + math.cos(math.pi * progress)))


DEFAULTS = {"seqLen": 128, "batchSize": 8, "steps": 200, "seed": 0, "balanceWeight": 0.01, "logEvery": 10,
            "optimizer": {"lr": 3e-3, "warmup": 20, "minLrRatio": 0.1, "weightDecay": 0.1, "beta1": 0.9, "beta2": 0.95,
                          "eps": 1e-8, "clip": 1.0, "partLr": {}, "partBeta1": {"chunk": 0.0}}}


def param_groups(model, o: dict) -> list:
    """AdamW's parameter groups, as ``conceptmoe train`` treats parameters: a part's learning-rate
    multiplier (``partLr``), decay on matrices only, and a part's own beta1 (``partBeta1``: the chunk
    module trains without momentum by default)."""
    groups = {}
    for p in model.owned():
        key = (o["partLr"].get(p["part"], 1.0), o["weightDecay"] if len(p["shape"]) >= 2 else 0.0,
               o.get("partBeta1", {}).get(p["part"], o["beta1"]))
        groups.setdefault(key, []).append(model.parameter(p["path"]))
    return [{"params": ps, "lr_scale": k[0], "weight_decay": k[1], "betas": (k[2], o["beta2"])} for k, ps in groups.items()]


def settings_of(directory: str) -> dict:
    path = os.path.join(directory, "train_settings.json")
    given = json.load(open(path)) if os.path.exists(path) else {}
    s = {**DEFAULTS, **given}
    s["optimizer"] = {**DEFAULTS["optimizer"], **given.get("optimizer", {})}
    return s


def stacks(model) -> list:
    """FSDP units: each layer of every stack of layers (a sequence whose children are all sequences)."""
    units = []
    for m in model.root.modules():
        kids = getattr(m, "children_in_order", [])
        if getattr(m, "kind", None) == "sequence" and len(kids) > 1 and all(getattr(k, "kind", None) == "sequence" for k in kids):
            units.extend(kids)
    return units


def non_forced_before(doc_starts: torch.Tensor, rows: int) -> int:
    """Boundary draws the rows before ``rows`` of the global batch take (every token but row and document starts)."""
    if rows == 0:
        return 0
    d = doc_starts[:rows]
    return int(d.numel() - rows - d[:, 1:].sum())


def main(argv=None) -> None:
    here = os.getcwd()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--export", default=here, help="the export directory (default: the current one)")
    ap.add_argument("--out", default=None, help="run directory (default: EXPORT/run)")
    ap.add_argument("--steps", type=int, default=None, help="override the number of steps")
    ap.add_argument("--batch-size", type=int, default=None, help="override the global batch (rows)")
    ap.add_argument("--seq-len", type=int, default=None, help="override the row length")
    ap.add_argument("--fsdp", action="store_true", help="shard with FSDP2 (fully_shard) instead of DDP")
    ap.add_argument("--bf16", action="store_true", help="forward under bf16 autocast (CUDA)")
    a = ap.parse_args(argv)
    s = settings_of(a.export)
    for key, value in (("steps", a.steps), ("batchSize", a.batch_size), ("seqLen", a.seq_len)):
        if value is not None:
            s[key] = value
    o = s["optimizer"]
    out = a.out or os.path.join(a.export, "run")

    distributed = "WORLD_SIZE" in os.environ
    cuda = torch.cuda.is_available()
    if distributed:
        dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    if s["batchSize"] % world != 0:
        raise SystemExit(f"batchSize {s['batchSize']} must be a multiple of the {world} processes")
    local = s["batchSize"] // world

    model = build_model(os.path.join(a.export, "graph.json"))
    load_weights(model, os.path.join(a.export, "model.safetensors"))
    model.to(device)
    if a.fsdp and distributed:
        from torch.distributed.fsdp import fully_shard
        for unit in stacks(model):
            fully_shard(unit)
        fully_shard(model)
        wrapped = model
    elif distributed:
        wrapped = torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)
    else:
        wrapped = model
    opt = torch.optim.AdamW(param_groups(model, o), lr=o["lr"], betas=(o["beta1"], o["beta2"]), eps=o["eps"])
    params = [q for g in opt.param_groups for q in g["params"]]
    stream = load_stream(os.path.join(a.export, "data"), "train")
    integral = 0.0
    log = []
    for step in range(s["steps"]):
        t0 = time.time()
        ids, targets, starts = train_batch(stream, s["batchSize"], s["seqLen"], s["seed"], step)
        count = int((targets >= 0).sum())
        rows = slice(rank * local, (rank + 1) * local)
        lr = learning_rate(o, s["steps"], step)
        for g in opt.param_groups:
            g["lr"] = lr * g["lr_scale"]
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=a.bf16 and cuda):
            logits, ctx = wrapped(ids[rows].to(device), starts[rows].to(device), training=True, seed=mix_seed(s["seed"], step),
                                  balance_weight=s["balanceWeight"], ratio_integral=integral,
                                  draw_skip=non_forced_before(starts, rank * local))
        t = targets[rows].reshape(-1).to(device)
        nll = -torch.log_softmax(logits.float(), dim=-1).gather(1, t.clamp(min=0).reshape(-1, 1)).reshape(-1)
        ce_local = (nll * (t >= 0)).sum() / max(count, 1)
        aux = torch.stack([x.reshape(()) for x in ctx.aux_losses]).sum() if ctx.aux_losses else torch.zeros((), device=device)
        # DDP and FSDP average the ranks' gradients: each rank's share of the global mean, times the ranks
        loss = ce_local * world + aux
        opt.zero_grad(set_to_none=True)
        loss.backward()
        norm = torch.nn.utils.get_total_norm([q.grad for q in params if q.grad is not None])
        if hasattr(norm, "full_tensor"):
            norm = norm.full_tensor()
        scale = min(o["clip"] / max(norm.item(), 1e-30), 1.0)
        for q in params:
            if q.grad is not None:
                q.grad.mul_(scale)
        opt.step()
        stats = torch.tensor([ce_local.item(), aux.item() / world, ctx.compression["tokens"], ctx.compression["concepts"],
                              ctx.compression.get("threshold", 0)], dtype=torch.float64)
        if distributed:
            dist.all_reduce(stats)
        if stats[2] > 0:
            held = controlled_rate(_chunk_spec(model), stats[3].item() / stats[2].item(), stats[4].item() / stats[2].item())
            integral = ratio_control_step(integral, _ratio(model), held)
        log.append({"step": step, "loss": stats[0].item() + stats[1].item(), "ce": stats[0].item(), "lr": lr, "seconds": time.time() - t0})
        if rank == 0 and ((step + 1) % s["logEvery"] == 0 or step == s["steps"] - 1 or step == 0):
            print(f"step {step + 1:5d}/{s['steps']}  loss {log[-1]['loss']:.4f}  lr {lr:.2e}  ({world} process{'es' if world > 1 else ''}, {'FSDP' if a.fsdp and distributed else 'DDP' if distributed else 'single'})", flush=True)
    save(model, out, s["steps"], rank, a.export, log)
    if distributed:
        # every rank past the checkpoint before any tears its process group down: a rank that
        # destroyed it while rank 0 was still writing aborted once in gloo's teardown ("terminate
        # called without an active exception", a CI run under load)
        dist.barrier()
        dist.destroy_process_group()


def _chunk_spec(model) -> dict:
    """The chunk module's spec (an empty one for a model without a concept stage)."""
    for m in model.root.modules():
        if getattr(m, "kind", None) == "chunk":
            return m.spec
    return {}


def _ratio(model) -> float:
    return _chunk_spec(model).get("ratio", 1.0)


def save(model, out: str, step: int, rank: int, export: str, log: list) -> None:
    """Gathers the full parameters and writes the checkpoint in both layouts (rank 0)."""
    values = {}
    for p in model.owned():
        v = model.parameter(p["path"]).detach()
        if hasattr(v, "full_tensor"):
            v = v.full_tensor()
        values[p["path"]] = v.float().cpu()
    if rank != 0:
        return
    os.makedirs(out, exist_ok=True)
    graph = json.load(open(os.path.join(export, "graph.json")))
    tensors = file_tensors(model, values)
    # what reading it back needs, per parameter path: its name(s) here, PyTorch shape, transposition, row order
    layout = {p["path"]: {"file": p["file"], "shape": p["torchShape"], "transposed": p["transposed"],
                          **({} if p.get("rowOrder") is None else {"rowOrder": p["rowOrder"]})} for p in model.owned()}
    meta = {"format": "pt", "conceptmoe": "checkpoint/2", "step": str(step), "model": graph["name"], "config": json.dumps(graph["config"]),
            "names": graph["names"], "layout": json.dumps(layout), "trainer": "pytorch"}
    _atomic(lambda f: save_file(tensors, f, metadata=meta), os.path.join(out, "checkpoint.safetensors"))
    _atomic(lambda f: save_file(tensors, f, metadata={"format": "pt", "step": str(step)}), os.path.join(out, "model.safetensors"))
    _atomic(lambda f: open(f, "w").write("".join(json.dumps(m) + "\n" for m in log)), os.path.join(out, "metrics.jsonl"))


def _atomic(write, path: str) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    write(tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


if __name__ == "__main__":
    main()
