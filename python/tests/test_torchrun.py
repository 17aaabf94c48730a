"""train.py: two gloo processes under torchrun, with DDP and with FSDP2, train a tiny model a few
steps and end where one process with the same global batch ends (relative norm 1e-5 per tensor);
the checkpoint is the export's tensors and names with a ``conceptmoe train`` checkpoint's metadata
(standard layout), which ``conceptmoe generate`` and ``verify`` read."""
import os
import shutil
import subprocess
import sys

import pytest
from safetensors.torch import load_file

from conftest import export

TINY = {"model": {"kind": "dense", "name": "tiny", "vocab": 256, "hidden": 32, "layers": 2, "heads": 4, "ffnHidden": 48,
                  "tiedEmbeddings": True, "contextLength": 64},
        "seqLen": 16, "batchSize": 4, "steps": 3, "logEvery": 1, "optimizer": {"lr": 0.01, "warmup": 1}}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("torchrun")
    d = str(base / "export")
    r = export(TINY, d, "--data")
    assert r.returncode == 0, r.stderr
    bindir = os.path.dirname(sys.executable)
    torchrun = os.path.join(bindir, "torchrun") if os.path.exists(os.path.join(bindir, "torchrun")) else shutil.which("torchrun")
    out = {}
    for name, cmd in {
        "single": [sys.executable, "train.py"],
        "ddp": [torchrun, "--nproc_per_node", "2", "--master_port", "29611", "train.py"],
        "fsdp": [torchrun, "--nproc_per_node", "2", "--master_port", "29612", "train.py", "--fsdp"],
    }.items():
        p = subprocess.run(cmd + ["--out", os.path.join(d, name)], cwd=d, capture_output=True, text=True, timeout=600)
        assert p.returncode == 0, p.stderr[-3000:]
        out[name] = (load_file(os.path.join(d, name, "checkpoint.safetensors")), p.stdout)
    return out


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_processes_match_one(runs, mode):
    single, _ = runs["single"]
    multi, log = runs[mode]
    assert "2 processes" in log
    assert set(single) == set(multi)
    for k in single:
        diff = ((single[k] - multi[k]).norm() / single[k].norm()).item()
        assert diff <= 1e-5, (k, diff)


def test_checkpoint_layout(runs):
    single, _ = runs["single"]
    # the export's names (a dense config is named as Llama) and PyTorch layout: matrices [out, in]
    assert single["model.embed_tokens.weight"].shape == (256, 32)
    assert single["model.layers.0.mlp.up_proj.weight"].shape == (48, 32)
    assert not any(k.startswith("param/") for k in single)
