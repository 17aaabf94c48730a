"""Exports every case with this runtime's reference values (``conceptmoe export --reference``), once
per session, into a temporary directory; the tests build the PyTorch modules from those exports."""
import json
import os
import subprocess
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from cases import ROOT, cases  # noqa: E402


def node() -> str:
    local = os.path.join(ROOT, "node_modules", ".bin", "node")
    return local if os.path.exists(local) else "node"


def export(config: dict, out: str, *extra: str) -> subprocess.CompletedProcess:
    cfg = out + ".config.json"
    with open(cfg, "w") as f:
        json.dump(config, f)
    return subprocess.run([node(), os.path.join(ROOT, "bin", "conceptmoe.js"), "export", cfg, "--to", "pytorch", "--out", out, *extra],
                          capture_output=True, text=True, cwd=ROOT)


@pytest.fixture(scope="session")
def exports(tmp_path_factory):
    base = tmp_path_factory.mktemp("exports")
    out = {}
    for name, config in cases().items():
        d = str(base / name)
        r = export(config, d, "--reference")
        out[name] = (d, r)
    return out
