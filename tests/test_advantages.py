"""compute_group_advantages vs a plain per-group Python reference, and its bad-input errors."""

from __future__ import annotations

import math
import statistics

import pytest
import torch

from calibrl_mcore.algo.advantages import compute_group_advantages
from calibrl_mcore.algo.dapo import dynamic_sampling_keep_mask, overlong_penalty


def ref_group_stats(rewards, group_ids, is_expert, norm_by_std=False, include_expert=False):
    groups: dict[int, list[float]] = {}
    for r, g, e in zip(rewards, group_ids, is_expert):
        if include_expert or not e:
            groups.setdefault(g, []).append(r)
    out = []
    for r, g, e in zip(rewards, group_ids, is_expert):
        vals = groups[g]
        mean = sum(vals) / len(vals)
        std = statistics.stdev(vals) if len(vals) > 1 else 0.0
        adv = r - mean
        if norm_by_std and std > 0:
            adv = adv / (std + 1e-6)
        if std == 0 and (include_expert or not e):
            adv = 0.0
        pass_rate = sum(v > 0.1 for v in vals) / len(vals)
        out.append((adv, abs(adv), r > 0.1, mean, std, pass_rate, len(vals)))
    return out


def make_batch(seed, n_groups=6, g=5):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(-(2**40), 2**40, (n_groups,), generator=gen)  # arbitrary int64 labels
    rewards, group_ids, is_expert = [], [], []
    for k in range(n_groups):
        acc = (torch.rand(g, generator=gen) < [0.0, 1.0, 0.5, 0.2, 0.8, 0.5][k % 6]).tolist()
        fmt = (torch.rand(g, generator=gen) < 0.7).tolist()
        rewards += [float(a) + 0.1 * float(f) for a, f in zip(acc, fmt)] + [1.1]  # python floats
        group_ids += [int(ids[k])] * (g + 1)
        is_expert += [False] * g + [True]
    perm = torch.randperm(len(rewards), generator=gen)  # rows in any order
    return ([rewards[i] for i in perm], [group_ids[i] for i in perm], [is_expert[i] for i in perm])


@pytest.mark.parametrize("norm_by_std", [False, True])
@pytest.mark.parametrize("include_expert", [False, True])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_reference(seed, norm_by_std, include_expert):
    rewards, gids, expert = make_batch(seed)
    out = compute_group_advantages(
        torch.tensor(rewards), torch.tensor(gids), torch.tensor(expert),
        norm_by_std=norm_by_std, include_expert_in_stats=include_expert,
    )
    ref = ref_group_stats(rewards, gids, expert, norm_by_std, include_expert)
    for i, (adv, rar, passed, mean, std, pr, n) in enumerate(ref):
        assert out.advantages[i].item() == pytest.approx(adv, abs=1e-5), i
        assert out.rarity[i].item() == pytest.approx(rar, abs=1e-5)
        assert bool(out.passed[i]) == passed
        assert out.group_mean[i].item() == pytest.approx(mean, abs=1e-6)
        assert out.group_std[i].item() == pytest.approx(std, abs=1e-6)
        assert out.group_pass_rate[i].item() == pytest.approx(pr, abs=1e-6)
        assert int(out.group_size[i]) == n


def test_all_agree_group_has_exact_zero_rarity():
    r = torch.tensor([0.1, 0.1, 0.1, 1.1])
    out = compute_group_advantages(r, torch.tensor([7, 7, 7, 7]), torch.tensor([False, False, False, True]))
    assert out.rarity[:3].tolist() == [0.0, 0.0, 0.0]
    assert out.all_equal.all()
    assert out.advantages[3].item() == pytest.approx(1.0)  # the expert still differs from the group


def test_single_correct_answer_gets_largest_rarity():
    r = torch.tensor([1.1, 0.1, 0.1, 0.1, 0.0])
    out = compute_group_advantages(r, torch.zeros(5, dtype=torch.long), torch.zeros(5, dtype=torch.bool))
    assert int(out.rarity.argmax()) == 0
    assert out.advantages[0].item() == pytest.approx(1.1 - 1.4 / 5)


def test_dapo_helpers():
    r = torch.tensor([1.0, 1.0, 0.0, 1.0, 1.0, 1.0])
    keep = dynamic_sampling_keep_mask(r, torch.tensor([1, 1, 1, 2, 2, 2]), torch.zeros(6, dtype=torch.bool))
    assert keep.tolist() == [True, True, True, False, False, False]
    pen = overlong_penalty(torch.tensor([10, 80, 90, 100, 120]), max_length=100, buffer_length=20)
    assert pen.tolist() == pytest.approx([0.0, 0.0, -0.5, -1.0, -1.0])


def test_bad_inputs():
    ok_r, ok_g, ok_e = torch.tensor([1.0, 0.0]), torch.tensor([3, 3]), torch.tensor([False, False])
    with pytest.raises(ValueError, match="rewards contains NaN"):
        compute_group_advantages(torch.tensor([math.nan, 0.0]), ok_g, ok_e)
    with pytest.raises(ValueError, match="group_ids must have shape"):
        compute_group_advantages(ok_r, torch.tensor([3]), ok_e)
    with pytest.raises(ValueError, match="is_expert must have shape"):
        compute_group_advantages(ok_r, ok_g, torch.tensor([False]))
    with pytest.raises(ValueError, match="rewards is empty"):
        compute_group_advantages(torch.zeros(0), torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"group_ids \[5\] have no on-policy rows"):
        compute_group_advantages(torch.tensor([1.0, 0.0, 1.1]), torch.tensor([3, 3, 5]),
                                 torch.tensor([False, False, True]))
    with pytest.raises(ValueError, match="is_expert must be a bool"):
        compute_group_advantages(ok_r, ok_g, torch.tensor([0, 0]))
    with pytest.raises(ValueError, match="group_ids must be an integer"):
        compute_group_advantages(ok_r, torch.tensor([3.0, 3.0]), ok_e)
