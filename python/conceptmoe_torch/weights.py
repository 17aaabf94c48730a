"""Reading and writing ``model.safetensors`` of an export (names and layout from ``graph.json``).

Each stored parameter has one name, or one per slice along axis 0 (stacked experts stored one tensor
per expert, as Hugging Face does); tied parameters are not stored. ``to_ours`` / ``from_ours`` convert
between PyTorch layout and the TypeScript runtime's checkpoint layout (matrices ``[in, out]``, names
``param/<graph path>``), which ``conceptmoe generate --checkpoint`` reads.
"""
from __future__ import annotations

import torch
from safetensors.torch import load_file, save_file


def state_from_file(model, tensors: dict[str, torch.Tensor]) -> None:
    """Copies the tensors of an export's ``model.safetensors`` into the model's parameters."""
    with torch.no_grad():
        for p in model.owned():
            names = p["file"]
            value = tensors[names] if isinstance(names, str) else torch.stack([tensors[n] for n in names])
            target = model.parameter(p["path"])
            if list(value.shape) != list(target.shape):
                raise ValueError(f"{names}: shape {list(value.shape)}, expected {list(target.shape)}")
            target.copy_(value)


def load_weights(model, path: str) -> None:
    state_from_file(model, load_file(path))


def file_tensors(model, values: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The tensors of ``model.safetensors`` from the model (or from ``values``, by graph path)."""
    out = {}
    for p in model.owned():
        v = (model.parameter(p["path"]) if values is None else values[p["path"]]).detach().float().cpu()
        names = p["file"]
        if isinstance(names, str):
            out[names] = v.contiguous()
        else:
            for e, n in enumerate(names):
                out[n] = v[e].contiguous()
    return out


def save_weights(model, path: str, metadata: dict[str, str] | None = None) -> None:
    save_file(file_tensors(model), path, metadata={"format": "pt", **(metadata or {})})


def to_ours(p: dict, value: torch.Tensor) -> torch.Tensor:
    """A parameter in PyTorch layout → the runtime's layout."""
    return value.transpose(-1, -2).contiguous() if p["transposed"] else value.contiguous()
