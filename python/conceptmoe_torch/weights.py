"""Reading and writing ``model.safetensors`` of an export (names and layout from ``graph.json``).

Each stored parameter has one name, or one per slice along axis 0 (stacked experts stored one tensor
per expert, as Hugging Face does); tied parameters are not stored. Rows listed by a parameter's
``rowOrder`` are stored in the file's order (DeepSeek's interleaved rotary features, ``file_rows``). ``to_ours`` / ``from_ours`` convert
between PyTorch layout and the TypeScript runtime's checkpoint layout (matrices ``[in, out]``, names
``param/<graph path>``), which ``conceptmoe generate --checkpoint`` reads.
"""
from __future__ import annotations

import torch
from safetensors.torch import load_file, save_file


def file_rows(p: dict) -> torch.Tensor | None:
    """For a parameter whose rows the file keeps in another order (``rowOrder``: DeepSeek's rotary
    features, pairs interleaved there and halves here), the file row of each of the module's rows."""
    o = p.get("rowOrder")
    if o is None:
        return None
    period, offset, rope = o["period"], o["offset"], o["rope"]
    rows = p["torchShape"][0]
    out = []
    for r in range(rows):
        j = r % period
        i = j - offset
        out.append(r if j < offset else r - j + offset + (2 * i if i < rope // 2 else 2 * (i - rope // 2) + 1))
    return torch.tensor(out, dtype=torch.long)


def from_file(p: dict, tensors: dict[str, torch.Tensor], prefix: str = "") -> torch.Tensor:
    """A parameter's value in the module's layout from the file's tensors (``prefix`` + its name(s))."""
    names = p["file"]
    value = tensors[prefix + names] if isinstance(names, str) else torch.stack([tensors[prefix + n] for n in names])
    rows = file_rows(p)
    return value if rows is None else value.index_select(0, rows)


def state_from_file(model, tensors: dict[str, torch.Tensor]) -> None:
    """Copies the tensors of an export's ``model.safetensors`` into the model's parameters."""
    with torch.no_grad():
        for p in model.owned():
            names = p["file"]
            value = from_file(p, tensors)
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
        rows = file_rows(p)
        if rows is not None:
            v = torch.empty_like(v).index_copy_(0, rows, v)
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
