"""train.py's AdamW groups treat parameters as ``conceptmoe train`` does: a part's own beta1
(``partBeta1``, by default none for the chunk module), its learning-rate multiplier, decay on
matrices only."""
import os

from conftest import export
from conceptmoe_torch.graph import build_model
from conceptmoe_torch.train import DEFAULTS, param_groups

TINY = {"kind": "moe", "name": "tiny", "vocab": 256, "hidden": 16, "layers": 3, "heads": 2, "experts": 2, "topK": 1,
        "expertHidden": 16, "tiedEmbeddings": True, "contextLength": 32}
CONCEPT = {"model": {"kind": "conceptmoe", "name": "tiny-concept", "baseline": TINY, "ratio": 2, "encoderLayers": 1,
                     "decoderLayers": 1, "topK": 2}}


def groups_by_path(tmp_path, optimizer):
    d = str(tmp_path / "export")
    r = export(CONCEPT, d)
    assert r.returncode == 0, r.stderr
    model = build_model(os.path.join(d, "graph.json"))
    path_of = {id(model.parameter(p["path"])): p["path"] for p in model.owned()}
    return {path_of[id(q)]: g for g in param_groups(model, optimizer) for q in g["params"]}


def test_the_chunk_module_trains_without_momentum_by_default(tmp_path):
    by = groups_by_path(tmp_path, DEFAULTS["optimizer"])
    assert by["concept/chunk/q.weight"]["betas"] == (0.0, 0.95)
    assert by["concept/chunk/k.weight"]["betas"] == (0.0, 0.95)
    assert by["encoder/0/mixer/attn/q.weight"]["betas"] == (0.9, 0.95)
    assert by["encoder/0/mixer/attn/q.weight"]["weight_decay"] == 0.1
    norms = [g for p, g in by.items() if "norm" in p]
    assert norms and all(g["weight_decay"] == 0.0 for g in norms)


def test_an_empty_part_beta1_gives_every_part_beta1_and_part_lr_scales(tmp_path):
    o = {**DEFAULTS["optimizer"], "partBeta1": {}, "partLr": {"chunk": 0.5}}
    by = groups_by_path(tmp_path, o)
    assert {g["betas"] for g in by.values()} == {(0.9, 0.95)}
    assert by["concept/chunk/q.weight"]["lr_scale"] == 0.5
    assert by["encoder/0/mixer/attn/q.weight"]["lr_scale"] == 1.0
