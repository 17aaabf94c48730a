"""The ratio controller of the PyTorch side: the same rules as the runtime's (blocks/Chunker.ts),
so that a run trained with the exported train.py holds R the way `conceptmoe train` does."""
import pytest

from conceptmoe_torch.blocks.chunk import controlled_rate, ratio_control_step


def test_integrates_near_the_target_only_and_clamps():
    s = 0.0
    # errors 2F − 1: −0.2 and +0.1 are integrated; −0.8 and +0.4 (beyond ±0.25) are not
    for f in [0.4, 0.1, 0.55, 0.7]:
        s = ratio_control_step(s, 2, f)
    assert s == pytest.approx(-0.1, abs=1e-12)
    high = 0.0
    for _ in range(400):
        high = ratio_control_step(high, 4, 0.3)
    assert high == 50.0


def test_holds_the_mean_of_the_sampled_and_threshold_rates_with_pi():
    pi = {"ratioControl": "pi", "thresholdWeight": 0.5}
    assert controlled_rate(pi, 0.3, 0.2) == pytest.approx(0.25)
    assert controlled_rate({"ratioControl": "pi", "thresholdWeight": 0.25}, 0.3, 0.2) == pytest.approx(0.275)
    assert controlled_rate({"ratioControl": "plain", "thresholdWeight": 1}, 0.3, 0.2) == 0.3
