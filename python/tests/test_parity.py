"""The PyTorch modules built from an export equal this runtime (cpu backend) on every case:
evaluation logits within 1e-4 (ConceptMoE with its own boundaries), one training pass's loss within
1e-4 and every gradient within 1e-4 in relative norm (ConceptMoE with the runtime's boundaries
imposed; sampling with the same generator gives the same ones), and the matmul FLOPs
``torch.utils.flop_counter`` counts equal the runtime's executed count (and, without a concept stage,
the static count)."""
import pytest

from cases import cases
from conceptmoe_torch.check import compare


@pytest.mark.parametrize("case", sorted(cases()))
def test_parity(exports, case):
    directory, run = exports[case]
    assert run.returncode == 0, run.stderr
    r = compare(directory)
    assert r["logits_max_abs"] <= 1e-4, r
    assert r["loss_abs"] <= 1e-4, r
    assert r["grad_rel_max"] <= 1e-4, r
    assert r["flops_torch"] == r["flops_ours"], r
    if "eval_boundaries_equal" in r:
        assert r["eval_boundaries_equal"], r
        assert r["train_boundaries_equal"], r
    else:
        assert r["flops_weights_ours"] == r["flops_static"], r
