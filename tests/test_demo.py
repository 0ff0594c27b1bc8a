"""`calibrl demo --quick`: the real demo pipeline (synth data, tiny model, SFT, 3 arms × 2 seeds of `calibrl
train`, statistics, verdict), shortened for CI. What it checks is that the numbers printed are the ones
the runs measured, paired by seed, with the confounds the full demo removes removed here too."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from omegaconf import OmegaConf

from calibrl_mcore.demo import ARMS, QUICK, longest_expert_tokens, repeats
from calibrl_mcore.stats import paired_difference
from tests.torchrun_utils import REPO

DEMO_LINE_BUDGET = 45


def test_quick_demo_reports_paired_seeds_and_a_computed_verdict(tmp_path):
    out = tmp_path / "demo"
    proc = subprocess.run([sys.executable, "-m", "calibrl_mcore.cli", "demo", "--quick", "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    # what the terminal shows: a line per phase and per run, then the report (tables, verdicts, check)
    assert len(proc.stdout.splitlines()) <= DEMO_LINE_BUDGET, proc.stdout
    study = json.loads((out / "study.json").read_text())
    runs, report = study["runs"], study["report"]
    seeds = list(QUICK.seeds)
    assert sorted((r["arm"], r["seed"]) for r in runs) == sorted((a, s) for a in ARMS for s in seeds)
    assert report["seeds"] == seeds and not report["failed"]

    # every run really ran with its own seed and its arm's settings, over a budget above the longest expert
    longest = longest_expert_tokens(out / "tiny_qwen2_5_vl", out / "data" / "train.jsonl")
    assert study["max_new_tokens"] == longest + QUICK.token_margin
    for r in runs:
        cfg = OmegaConf.load(tmp_path / r["run_dir"] / "config.yaml")
        assert cfg["train"]["seed"] == r["seed"] and cfg["rollout"]["max_new_tokens"] > longest
        assert (cfg["algo"]["name"], cfg["algo"]["lam"]) == {"grpo": ("grpo", 0.1), "calibrl": ("calibrl", 0.1),
                                                               "calibrl_lam0": ("calibrl", 0.0)}[r["arm"]]
        assert {"eval/accuracy", "eval/pass@1", "eval/pass@2", "entropy_end"} <= set(r["metrics"])
    # seeds move the runs: the same arm at two seeds does not train on the same rollouts
    grpo = {r["seed"]: r["metrics"] for r in runs if r["arm"] == "grpo"}
    assert grpo[0]["entropy_end"] != grpo[1]["entropy_end"]

    # the printed interval is the paired one, recomputed here from the per-run numbers
    acc = {(r["arm"], r["seed"]): r["metrics"]["eval/accuracy"] for r in runs}
    want = paired_difference([acc["calibrl", s] for s in seeds], [acc["grpo", s] for s in seeds])
    got = report["differences"]["calibrl"]["eval/accuracy"]
    assert (got["lo"], got["hi"]) == (pytest.approx(want.lo), pytest.approx(want.hi))
    summary = (out / "summary.md").read_text()
    assert f"Seeds {seeds} (n = 2 per arm" in summary and "Verdict — eval accuracy (acc×fmt): " in summary
    assert summary in proc.stdout and (out / "plots" / "arms.png").is_file()
    # λ = 0 through CalibRL's code is GRPO's loss: with the same seed, the same run to the last bit
    assert f"repeated grpo bit for bit in {len(seeds)} of {len(seeds)} seeds." in summary
    runs_dir = out / "runs"
    # the check can fail: runs that differ are told apart (the quick SFT start passes no rollout, so at λ 0.1
    # CalibRL has no rarity to push with and may itself repeat GRPO here; the full demo's start does pass)
    assert not repeats(runs_dir / "grpo" / "seed_0", runs_dir / "grpo" / "seed_1")
