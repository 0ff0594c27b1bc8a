"""Seed statistics (calibrl_mcore/stats.py), the seed-study summary (seed_study.py) and the rollout seed."""

from __future__ import annotations

import itertools
import json
import math
import random
import statistics

import pytest

from calibrl_mcore.seed_study import RunResult, read_run, render_markdown, summarize
from calibrl_mcore.stats import (
    describe,
    familywise_level,
    paired_difference,
    pass_at_k,
    pass_at_k_values,
    t_quantile,
    verdict,
)
from calibrl_mcore.trainer.rollout_stage import EVAL_STEP, rollout_seed

# Student-t 0.975 / 0.95 quantiles as printed in standard tables (e.g. NIST/SEMATECH e-Handbook, table 1.3.6.7.2).
T_TABLE = {(0.975, 1): 12.706, (0.975, 2): 4.303, (0.975, 3): 3.182, (0.975, 4): 2.776, (0.975, 7): 2.365,
           (0.975, 9): 2.262, (0.975, 30): 2.042, (0.95, 3): 2.353, (0.95, 10): 1.812}


@pytest.mark.parametrize(("p", "df"), sorted(T_TABLE))
def test_t_quantile_matches_the_table(p, df):
    assert t_quantile(p, df) == pytest.approx(T_TABLE[p, df], abs=6e-4)


def test_t_quantile_tends_to_the_normal():
    z = statistics.NormalDist().inv_cdf(0.975)
    assert t_quantile(0.975, 1000) == pytest.approx(1.962, abs=6e-4)  # table value
    assert t_quantile(0.975, 100) > t_quantile(0.975, 1000) > t_quantile(0.975, 5000) > z
    with pytest.raises(ValueError, match="df >= 1"):
        t_quantile(0.975, 0)


def test_paired_difference_is_the_t_interval_of_the_per_seed_differences():
    a, b = [0.20, 0.25, 0.10, 0.30], [0.15, 0.20, 0.12, 0.20]
    d = [x - y for x, y in zip(a, b)]
    diff = paired_difference(a, b)
    half = 3.182446305 * statistics.stdev(d) / 2.0  # t(0.975, 3) · sd / √4
    assert (diff.n, diff.mean, diff.sd) == (4, pytest.approx(statistics.fmean(d)), pytest.approx(statistics.stdev(d)))
    assert (diff.lo, diff.hi) == (pytest.approx(diff.mean - half), pytest.approx(diff.mean + half))
    with pytest.raises(ValueError, match="equally long"):
        paired_difference([1.0], [1.0, 2.0])


def test_verdict_is_computed_from_the_interval():
    same = paired_difference([0.1, 0.3, 0.2], [0.2, 0.2, 0.2])
    assert same.covers_zero
    assert verdict(same, "calibrl", "grpo", "acc").startswith("acc: no significant difference at 3 seeds")
    up = paired_difference([0.31, 0.42, 0.29, 0.35], [0.20, 0.30, 0.21, 0.22])
    assert not up.covers_zero and verdict(up, "calibrl", "grpo", "acc").startswith("acc: calibrl higher than grpo at 4")
    down = paired_difference([0.0, 0.1, 0.05], [0.3, 0.35, 0.31])
    assert "calibrl lower than grpo at 3 seeds" in verdict(down, "calibrl", "grpo", "acc")
    one = paired_difference([0.3], [0.1])
    assert "1 seed: no interval, no verdict" in verdict(one, "calibrl", "grpo", "acc")


def test_pass_at_k_equals_the_average_over_all_k_subsets():
    for n, c in [(8, 0), (8, 1), (8, 3), (6, 6), (5, 2)]:
        right = [1] * c + [0] * (n - c)
        for k in range(1, n + 1):
            subsets = list(itertools.combinations(right, k))
            assert pass_at_k(n, c, k) == pytest.approx(sum(any(s) for s in subsets) / len(subsets))
    assert pass_at_k_values(8) == [1, 2, 4, 8] and pass_at_k_values(6) == [1, 2, 4, 6]


def test_rollout_seed_separates_seeds_steps_and_rounds():
    keys = [(s, k, r) for s in range(4) for k in [EVAL_STEP, *range(200)] for r in range(3)]
    seeds = [rollout_seed(*key) for key in keys]
    assert len(set(seeds)) == len(keys)  # an affine mix would collide here
    assert all(0 <= x < 2**31 for x in seeds)
    assert rollout_seed(3, 7, 1) == rollout_seed(3, 7, 1)  # a pure function (no Python hash salt)


def _run(arm: str, seed: int, acc: float, ent: float) -> RunResult:
    return RunResult(arm, seed, f"/x/{arm}/{seed}", 0, {"eval/accuracy": acc, "eval/format": 1.0, "entropy_end": ent,
                                                      "eval/pass@1": acc, "eval/pass@4": min(1.0, 3 * acc)})


def test_summarize_pairs_by_seed_and_leaves_failed_runs_out():
    rng = random.Random(0)
    runs = []
    for seed in range(4):
        base = rng.uniform(0.1, 0.3)
        runs += [_run("grpo", seed, base, 0.3), _run("calibrl", seed, base + 0.05, 0.4 + 0.01 * seed)]
    runs.append(RunResult("grpo", 4, "/x/grpo/4", 1))  # failed: seed 4 has no pair
    runs.append(_run("calibrl", 4, 0.9, 0.9))
    report = summarize(runs, reference="grpo")
    assert report.seeds == [0, 1, 2, 3] and report.failed == ["grpo seed 4"]
    acc = report.differences["calibrl"]["eval/accuracy"]
    assert acc["mean"] == pytest.approx(0.05) and acc["sd"] == pytest.approx(0.0, abs=1e-12)
    assert report.per_arm["grpo"]["eval/accuracy"]["n"] == 4
    assert any(v.startswith("entropy (last 5 steps): calibrl higher than grpo at 4 seeds") for v in report.verdicts)
    text = render_markdown(report)
    assert "Seeds [0, 1, 2, 3] (n = 4 per arm" in text and "eval/pass@4" in text and "grpo seed 4" in text


def test_familywise_intervals_widen_with_the_number_of_comparisons():
    assert familywise_level(1) == pytest.approx(0.95) and familywise_level(10) == pytest.approx(0.995)
    runs = [_run(arm, seed, 0.2 + (0.03 + 0.01 * seed if arm == "a" else 0.0), 0.3)
            for seed in range(4) for arm in ("ref", "a", "b")]
    plain, fw = summarize(runs, "ref"), summarize(runs, "ref", familywise=True)
    assert fw.level == pytest.approx(1 - 0.05 / 4)  # 2 arms × 2 compared metrics
    d_plain, d_fw = plain.differences["a"]["eval/accuracy"], fw.differences["a"]["eval/accuracy"]
    assert d_fw["lo"] < d_plain["lo"] and d_fw["hi"] > d_plain["hi"]
    assert "98.75% CI" in " ".join(fw.verdicts) and "Bonferroni over 4 comparisons" in render_markdown(fw)


def test_read_run_takes_the_final_eval_and_the_last_steps(tmp_path):
    rows = [{"step": k, "train/entropy": 0.1 * k, "reward/pass_rate": 0.5, "algo/lam": 0.1,
             **({"reward/pass_broken_format_frac": 1.0} if k % 2 else {})} for k in range(1, 11)]
    rows.append({"step": 10, "eval/accuracy": 0.25, "eval/format": 0.75, "eval/n": 256.0})
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    got = read_run(tmp_path, window=5)
    assert got["eval/accuracy"] == 0.25 and "eval/n" not in got
    assert got["entropy_end"] == pytest.approx(0.8) and got["entropy_start"] == pytest.approx(0.1)
    assert got["broken_format_end"] == 1.0  # only the steps where something passed count
    assert read_run(tmp_path / "missing") == {}
    assert math.isnan(describe([0.5]).sd)
