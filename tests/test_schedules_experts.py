"""Adaptive α/λ (schedules, entropy controller, pass-rate α) and multi-expert baselines / gating."""

from __future__ import annotations

import math

import pytest
import torch

from calibrl_mcore.algo.experts import aggregate_expert_baselines, expert_gate_weight
from calibrl_mcore.algo.schedules import (
    CoefficientSchedule,
    EntropyController,
    alpha_from_pass_rate,
    time_schedule,
)
from calibrl_mcore.config import AlgoConfig


def test_time_schedules_endpoints_and_shape():
    assert time_schedule("constant", 0.5, 0.1, 3, 10) == 0.5
    assert time_schedule("linear", 0.5, 0.1, 0, 5) == pytest.approx(0.5)
    assert time_schedule("linear", 0.5, 0.1, 2, 5) == pytest.approx(0.3)
    assert time_schedule("linear", 0.5, 0.1, 4, 5) == pytest.approx(0.1)
    assert time_schedule("cosine", 1.0, 0.0, 0, 3) == pytest.approx(1.0)
    assert time_schedule("cosine", 1.0, 0.0, 1, 3) == pytest.approx(0.5)  # cos(π/2) midway
    assert time_schedule("cosine", 1.0, 0.0, 2, 3) == pytest.approx(0.0)
    with pytest.raises(ValueError, match="schedule"):
        time_schedule("step", 1, 0, 0, 2)


def test_entropy_controller_moves_lambda_the_right_way():
    collapsing = [2.0, 1.5, 1.0, 0.6, 0.3, 0.2, 0.2, 0.2]  # entropy falling below the band
    ctl = EntropyController(lam=0.1, low=0.5, high=1.2, rate=0.2, lam_max=10)
    lams = [ctl.update(h) for h in collapsing]
    assert lams[0] < 0.1  # above the band: λ down
    assert lams[2] == lams[3] == lams[1]  # inside the band: unchanged
    assert lams[-1] > lams[5] > lams[4] > lams[3]  # below the band: λ keeps rising
    exploding = EntropyController(lam=0.5, low=0.5, high=1.2, rate=0.2)
    assert [exploding.update(3.0) for _ in range(3)] == pytest.approx([0.5 / 1.2, 0.5 / 1.44, 0.5 / 1.728])
    steady = EntropyController(lam=0.3, low=0.5, high=1.2)
    assert steady.update(0.8) == 0.3  # inside the band: unchanged
    bounded = EntropyController(lam=0.9, low=0.5, high=1.0, rate=1.0, lam_max=1.0)
    assert bounded.update(0.0) == 1.0


def test_alpha_from_pass_rate():
    assert alpha_from_pass_rate(0.0, 0.1, 0.9) == pytest.approx(0.9)
    assert alpha_from_pass_rate(1.0, 0.1, 0.9) == pytest.approx(0.1)
    assert alpha_from_pass_rate(0.5, 0.1, 0.9) == pytest.approx(0.5)


def test_coefficient_schedule_from_config():
    cfg = AlgoConfig(alpha=0.8, alpha_schedule="linear", alpha_final=0.2, lam=0.1, lam_schedule="entropy",
                     entropy_target_low=1.0, entropy_target_high=2.0, lam_rate=0.5)
    sched = CoefficientSchedule(cfg, total_steps=4)
    assert [sched.alpha(s) for s in range(4)] == pytest.approx([0.8, 0.6, 0.4, 0.2])
    assert sched.lam(0) == 0.1
    sched.observe(0.3)
    assert sched.lam(1) == pytest.approx(0.15)
    restored = CoefficientSchedule(cfg, total_steps=4)
    restored.load_state_dict(sched.state_dict())
    assert restored.lam(2) == pytest.approx(0.15)


def ref_aggregate(experts, mode):
    """Plain loops over positions."""
    length = max(len(e) for e in experts)
    out, valid = [], []
    for t in range(length):
        vals = [e[t] for e in experts if t < len(e)]
        valid.append(bool(vals))
        if mode == "mean":
            out.append(sum(vals) / len(vals))
        elif mode == "max":
            out.append(max(vals))
        else:
            out.append(math.log(sum(math.exp(v) for v in vals) / len(vals)))
    return out, valid


@pytest.mark.parametrize("mode", ["mean", "max", "logmeanexp"])
def test_multi_expert_baseline_matches_reference(mode):
    experts = [[-1.0, -2.0, -0.5], [-0.2, -3.0, -1.5, -0.7, -2.2], [-4.0]]
    base, valid = aggregate_expert_baselines([torch.tensor(e) for e in experts], mode)
    ref, ref_valid = ref_aggregate(experts, mode)
    assert base.tolist() == pytest.approx(ref, rel=1e-6)
    assert valid.tolist() == ref_valid
    single, _ = aggregate_expert_baselines([torch.tensor(experts[0])], mode)
    assert single.tolist() == pytest.approx(experts[0], rel=1e-6)  # one expert: its own log-probs


def test_expert_gating_weights():
    assert expert_gate_weight([0.0], "none", 0.5) == 1.0
    assert expert_gate_weight([0.0, 0.0], "drop", 0.5) == 0.0
    assert expert_gate_weight([0.0, 1.0], "drop", 0.5) == 1.0
    assert expert_gate_weight([0.0], "downweight", 0.25) == 0.25
    with pytest.raises(ValueError, match="expert gate"):
        expert_gate_weight([0.0], "maybe", 0.5)
    with pytest.raises(ValueError, match="aggregation"):
        aggregate_expert_baselines([torch.zeros(2)], "median")


def test_calibration_groups_with_pass_leaves_out_groups_where_nothing_passes():
    """algo.calibration_groups=with_pass: a group whose rollouts all fail (rewards may still differ, e.g. 0.1 vs 0
    by format) gets no calibration term; the expert row's own pass does not count."""
    from calibrl_mcore.trainer.batch import Row
    from calibrl_mcore.trainer.loop import groups_without_pass

    def row(group: int, reward: float, expert: bool = False) -> Row:
        return Row(uid=str(group), group_id=group, is_expert=expert, prompt_ids=[1], response_ids=[2], reward=reward)

    rows = [row(1, 0.1), row(1, 0.0), row(1, 1.1, expert=True),  # all fail, format differs: left out
            row(2, 1.1), row(2, 0.0), row(2, 1.1, expert=True),  # one passes: kept
            row(3, 1.0), row(3, 1.0)]                            # a pass with a broken format is a pass
    assert groups_without_pass(rows, pass_threshold=0.1) == {1}
