"""The benchmarks run end to end at tiny sizes on CPU (so CI keeps them working); numbers are not checked."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def run_bench(script: str, *args: str, out: Path) -> dict:
    proc = subprocess.run([sys.executable, str(REPO / "bench" / script), *args, "--out", str(out)], cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(out.read_text())


def test_losses_bench(tmp_path):
    r = run_bench("losses.py", "--batch", "32", "--seq", "64", "--repeats", "1", out=tmp_path / "l.json")
    assert r["speedup_vs_per_sample_reference"] > 0 and r["calibrl_over_grpo"] > 0


@pytest.mark.slow
def test_gpu_train_bench_runs_on_cpu(tmp_path):
    r = run_bench("gpu_train.py", "--shape", "tiny", "--seq", "32", "--steps", "1", "--warmup", "0",
                  "--stacks", "eager,transformers", out=tmp_path / "g.json")
    assert set(r["stacks"]) == {"megatron_calibrl", "transformers_sdpa"}
    assert r["megatron_over_transformers_throughput"] > 0
    # rows of varied lengths: padded vs packed (model.packed_sequences), real tokens counted
    r = run_bench("gpu_train.py", "--shape", "tiny", "--seq", "32", "--steps", "1", "--warmup", "0",
                  "--rows", "3", "--stacks", "eager,packed,transformers", out=tmp_path / "g2.json")
    assert r["stacks"]["megatron_calibrl_packed"]["throughput_over_transformers"] > 0
    assert r["real_tokens"] < 3 * 32


@pytest.mark.slow
def test_trainer_bench_runs_on_cpu(tmp_path):
    r = run_bench("trainer.py", "--layers", "1", "--hidden", "64", "--rows", "8", "--repeats", "1",
                  out=tmp_path / "t.json")
    assert r["ours_over_bare"] > 0


def test_logprob_bench_runs_on_cpu(tmp_path):
    r = run_bench("logprob.py", "--device", "cpu", "--tokens", "40", "--vocab", "96", "--chunks", "16",
                  "--repeats", "1", out=tmp_path / "lp.json")
    assert set(r["results"]) == {"unfused", "fused_chunk16"}
    assert r["max_abs_diff_vs_unfused"]["fused_chunk16"]["logp"] < 1e-5


def test_gpu_rollout_bench_runs_on_cpu(tmp_path):
    r = run_bench("gpu_rollout.py", "--device", "cpu", "--prompts", "2", "--prompt-len", "8", "--new-tokens", "4",
                  out=tmp_path / "r.json")
    assert r["case"]["engine_tokens"] > 0 and r["case"]["hf_tokens"] > 0 and r["engine_over_hf_generate"] > 0


def test_data_plane_bench_estimate():
    """The paper-scale estimate's code path (assign_rows + pack_shard on synthetic sizes) at 8 of the 480 prompts,
    in process; the measured part (4 torchrun ranks) is what tests/test_data_plane.py's worker runs."""
    sys.path.insert(0, str(REPO / "bench"))
    from data_plane import paper_estimate, parse_args

    r = paper_estimate(parse_args(["--paper-scale", str(8 / 480), "--paper-dp", "2,4"]))
    assert r["pixel_bytes_per_prompt"] == 5476 * 1176 * 4  # 1024 px -> 1036 px: 74 x 74 patches, fp32
    two, four = r["by_dp"][2], r["by_dp"][4]
    assert four["bytes_per_rank_max"] < two["bytes_per_rank_max"] < r["broadcast_bytes_per_rank"] / 50
