"""`calibrl sweep` on a 2×1 grid on CPU (real training processes, tiny model, one step each)."""

from __future__ import annotations

import json

import pytest

from calibrl_mcore.data.synth import generate_synthetic
from calibrl_mcore.make_tiny_model import make_tiny_model
from calibrl_mcore.sweep import cell_name, main, parse_grid


def test_parse_grid_and_names():
    grid = parse_grid(["algo.name=grpo,calibrl", "algo.alpha=0.2"])
    assert grid == {"algo.name": ["grpo", "calibrl"], "algo.alpha": ["0.2"]}
    assert cell_name({"algo.name": "grpo", "data.train_path": "/x/noise03/train.jsonl"}) == "name=grpo__train_path=noise03"
    with pytest.raises(ValueError, match="key.sub=v1,v2"):
        parse_grid(["algo.name"])


@pytest.mark.slow
def test_sweep_runs_a_two_cell_grid(tmp_path):
    model = make_tiny_model("qwen2_5_vl", tmp_path / "m", seed=0)
    generate_synthetic(tmp_path / "d", n=16, heldout=4)
    out = tmp_path / "sweep"
    rc = main(["--config", "configs/tiny_cpu.yaml", "--out", str(out), "--grid", "algo.name=grpo,calibrl",
               "--set", f"model.hf_path={model}", f"data.train_path={tmp_path / 'd/train.jsonl'}",
               f"data.eval_path={tmp_path / 'd/eval.jsonl'}", "train.steps=1", "train.prompts_per_step=4",
               "rollout.max_new_tokens=8", "train.eval_prompts=4", "train.tensorboard=false"])
    assert rc == 0
    results = json.loads((out / "results.json").read_text())
    assert [r["algo.name"] for r in results] == ["grpo", "calibrl"]
    for r in results:
        assert r["returncode"] == 0 and r["steps"] == 1 and r["final_eval_accuracy"] is not None
        assert len(r["entropy"]) == 1
    assert "| grpo |" in (out / "summary.md").read_text()
    assert (out / "results.csv").exists() and (out / "entropy_curves.png").exists()
