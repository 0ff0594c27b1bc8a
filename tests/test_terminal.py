"""What a user sees in the terminal (calibrl_mcore/terminal.py, `calibrl env`, the W&B sink).

    1. logging: known library fallback warnings are counted, not shown; unknown warnings and errors show;
       --verbose shows everything
    2. the progress line: in place on a TTY, a few lines in a log; the summary block
    3. line budgets: the demo's printing helpers, and README's Training commands run literally (small sizes)
    4. `calibrl env` on this CPU machine without optional backends, against a real embedded server
    5. metrics to an offline W&B run (real wandb, no network), read back from its transaction log
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import shlex
import struct
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from calibrl_mcore import terminal
from tests.torchrun_utils import REPO


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update({"PYTHONPATH": f"{REPO}:{env.get('PYTHONPATH', '')}", "OMP_NUM_THREADS": "1",
                "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"})
    return env


# ------------------------------------------------------------------------------------------ 1. logging


def test_known_fallbacks_are_counted_unknown_warnings_and_errors_show(restore_logging):
    out = io.StringIO()
    terminal.configure_logging("info", stream=out)
    before = sum(terminal.hidden_fallbacks().values())
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        # the exact text megatron-core 0.16.1 warns with (optimizer/__init__.py:24)
        warnings.warn("Transformer Engine and Apex are not installed. Falling back to Torch optimizers.",
                      stacklevel=1)
        warnings.warn("something new went wrong", stacklevel=1)
    logging.getLogger("math_verify.parser").warning(
        "Timeout is disabled as parsing_timeout is None or <= 0, you must provide ...")
    logging.getLogger("httpx").info('HTTP Request: POST http://127.0.0.1:1/generate "HTTP/1.1 200 OK"')
    logging.getLogger("megatron.core.optimizer").info("Setting up optimizer with config OptimizerConfig(...)")
    logging.getLogger("megatron.core.optimizer").error("a real Megatron error")
    logging.getLogger("calibrl_mcore.trainer.loop").info("our own line")
    shown = out.getvalue().splitlines()
    assert sum(terminal.hidden_fallbacks().values()) - before == 2
    assert len(shown) == 3, shown
    assert shown[0].startswith("WARNING py.warnings: ") and shown[0].endswith("UserWarning: something new went wrong")
    assert shown[1:] == ["ERROR megatron.core.optimizer: a real Megatron error", "our own line"]
    assert "library warnings about these fallbacks hidden (--verbose shows them)" in terminal.hidden_note()


def test_verbose_shows_everything_with_timestamps(restore_logging):
    out = io.StringIO()
    terminal.configure_logging("verbose", stream=out)
    logging.getLogger("httpx").info("HTTP Request: GET /health")
    logging.getLogger("math_verify.grader").warning("Timeout is disabled as timeout_seconds is None")
    lines = out.getvalue().splitlines()
    assert len(lines) == 2 and all(re.match(r"\d{4}-\d\d-\d\d ", line) for line in lines), lines
    with pytest.raises(ValueError, match="train.log_level='loud'"):
        terminal.configure_logging("loud")


# ------------------------------------------------------------------------------------------ 2. progress, summary


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_line_in_a_log_and_on_a_tty():
    log = io.StringIO()
    line = terminal.ProgressLine("train calibrl", 100, terminal.TRAIN_FIELDS, stream=log, interval_s=3600)
    for step in range(1, 101):
        line.update(step, {"reward/mean": 0.5, "train/loss": 0.01, "ignored": 1.0})
    line.update(100, {"eval/accuracy": 0.25})  # the final eval logged at the same step: no second line
    line.close()
    lines = log.getvalue().splitlines()
    assert len(lines) == 2, lines  # first step, last step
    assert lines[0].startswith("train calibrl  step 1/100  reward 0.5  loss 0.01  ") and "eta" in lines[0]
    assert "eta" not in lines[1] and "s/step" in lines[1]

    tty = _Tty()
    line = terminal.ProgressLine("sft", 3, terminal.SFT_FIELDS, stream=tty)
    for step in (1, 2, 3):
        line.update(step, {"sft/nll": 2.0 - step / 10})
    line.close()
    text = tty.getvalue()
    assert text.count("\n") == 1 and text.count("\r\x1b[K") == 3 and "sft  step 3/3  loss 1.7" in text


def test_summary_block_splits_wall_time_and_lists_paths():
    block = terminal.summary_block(
        "train calibrl", {"reward/mean": 0.4125, "train/entropy": 6.5912, "other": 3.0}, terminal.TRAIN_FIELDS,
        wall_s=30.0, split={"rollout": 10.0, "train": 15.0, "weight sync": 0.0},
        written={"checkpoint": "runs/x/checkpoints/step_3", "metrics": "runs/x/metrics.jsonl"})
    assert block.splitlines() == [
        "train calibrl: done in 30.0s (rollout 10.0s, train 15.0s, other 5.0s)",
        "  final       reward 0.4125  entropy 6.591",
        "  checkpoint  runs/x/checkpoints/step_3",
        "  metrics     runs/x/metrics.jsonl",
    ]


# ------------------------------------------------------------------------------------------ 3. line budgets


def test_demo_phase_lines_are_short(tmp_path):
    """One short line per demo phase: the sub-command and its short settings, never the long paths (those go
    to demo.log). The demo's whole output has its budget in tests/test_demo.py (a real quick demo)."""
    from calibrl_mcore.demo import phase_line

    log = tmp_path / "demo.log"
    long_path = "/very/long/" + "x" * 200
    phases = [["data", "synth", "--out", long_path, "--n", "512"],
              ["sft", "--config", long_path, f"model.hf_path={long_path}", "sft.steps=250", "train.progress=false"],
              ["eval", "--model", long_path],
              *(["train", "--config", long_path, f"data.train_path={long_path}", f"algo.name={a}", "train.steps=30"]
                for a in ("calibrl", "grpo"))]
    lines = [phase_line(p, log) for p in phases]
    assert max(map(len, lines)) <= 160, "\n".join(lines)  # no path-long command lines
    assert "$ calibrl train algo.name=grpo train.steps=30   (output: demo.log)" in lines
    assert lines[0] == "$ calibrl data synth   (output: demo.log)"


README_LINE_BUDGET = 40
# Smaller sizes for README's Training commands (the flow is the same; only how much work each step does).
README_SMALL = {"data synth": [], "sft": ["sft.steps=2"],
                "train": ["train.steps=1", "train.prompts_per_step=4", "train.eval_prompts=4"],
                "eval": ["--limit", "2"], "tools/make_tiny_model.py": [], "tools/plot_metrics.py": []}


def _readme_training_commands() -> list[list[str]]:
    text = (REPO / "README.md").read_text()
    section = text.split("\n## Training\n", 1)[1]
    block = section.split("```bash\n", 1)[1].split("```", 1)[0]
    commands = []
    for line in block.replace("\\\n", " ").splitlines():
        words = shlex.split(line.split("  #", 1)[0])
        if words:
            commands.append(words)
    return commands


def test_readme_training_flow_fits_its_line_budget(tmp_path):
    """README's Training commands, run literally in an empty folder (sizes shrunk), without --verbose."""
    for name in ("configs", "tools"):
        (tmp_path / name).symlink_to(REPO / name)
    commands = _readme_training_commands()
    assert [c[0] for c in commands] == ["calibrl", "python", "calibrl", "calibrl", "calibrl", "python"]
    output: list[str] = []
    for words in commands:
        key = next(k for k in README_SMALL if k in " ".join(words[:3]))
        if key == "data synth":
            words = [w if prev not in ("--n", "--heldout") else {"--n": "16", "--heldout": "4"}[prev]
                     for prev, w in zip(["", *words], words)]
        argv = ([sys.executable, "-m", "calibrl_mcore.cli", *words[1:]] if words[0] == "calibrl"
                else [sys.executable, *words[1:]]) + README_SMALL[key]
        proc = subprocess.run(argv, cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=300)
        text = proc.stdout + proc.stderr
        assert proc.returncode == 0, f"{' '.join(words)}\n{text}"
        output += text.splitlines()
    shown = "\n".join(output)
    assert len(output) <= README_LINE_BUDGET, f"{len(output)} lines:\n{shown}"
    for noise in ("httpx", "Params for bucket", "UserWarning", "Timeout is disabled", "OptimizerConfig("):
        assert noise not in shown, shown
    # what the user came for: the progress lines, the summaries with the paths written, the kernels line
    assert re.search(r"^train calibrl  step 1/1  reward .* entropy .* loss .*s/step", shown, re.M), shown
    assert re.search(r"^sft  step 2/2  loss ", shown, re.M) and "hf checkpoint  runs/default/sft_hf" in shown
    assert re.search(r"^train calibrl: done in .*\(rollout .*, train .*\)", shown, re.M), shown
    assert "checkpoint   runs/default/checkpoints/step_" in shown and "runs/default/metrics.jsonl" in shown
    assert shown.count("kernels: spec=local") == 2 and "library warnings about these fallbacks hidden" in shown
    assert (tmp_path / "plots" / "reward.png").is_file()


# ------------------------------------------------------------------------------------------ 4. calibrl env


def test_calibrl_env_on_cpu_without_optional_backends(tiny_checkpoints):
    from rollout.launcher import EmbeddedServerProcess, free_port

    dead = f"http://127.0.0.1:{free_port()}"
    with EmbeddedServerProcess(tiny_checkpoints["qwen2_5_vl"]) as server:
        proc = subprocess.run([sys.executable, "-m", "calibrl_mcore.cli", "env", "--json",
                               f"rollout.urls=[{server.url},{dead}]"], cwd=REPO, env=_env(), capture_output=True,
                              text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        text = subprocess.run([sys.executable, "-m", "calibrl_mcore.cli", "env"], cwd=REPO, env=_env(),
                              capture_output=True, text=True, timeout=120)
    report = json.loads(proc.stdout)
    assert report["cuda_available"] is False and report["gpus"] == []
    packages = report["packages"]
    assert packages["torch"].startswith("2.13") and packages["megatron-core"] == "0.16.1"
    for optional in ("transformer-engine", "sglang", "vllm", "nvidia-dali-cuda120", "flash-attn"):
        assert packages[optional] is None, f"{optional} is installed here: this test wants a bare CPU machine"
    assert report["spec"]["backend"] == "local" and "no CUDA" in report["spec"]["why"]
    assert report["fp8"] == {"backend": "none", "why": "no CUDA device"}
    assert report["kernels"]["adam"].startswith("torch.optim.AdamW")
    live, gone = report["rollout_servers"]
    assert live["healthy"] and live["engine"] == "embedded" and live["version"] and gone["healthy"] is False
    assert text.returncode == 0 and "rollout servers: none configured" in text.stdout
    assert "layer spec: model.spec=auto -> local" in text.stdout and text.stderr == ""


# ------------------------------------------------------------------------------------------ 5. W&B


def _wandb_history(run_file: Path) -> list[dict]:
    """History records of a W&B transaction log (`run-<id>.wandb`), checked against wandb 0.31.0: a 7-byte file
    header (":W&B", magic 0xBEE1, version 0), then LevelDB-log records in 32 KiB blocks (crc32c u32, length u16,
    type u8: 1 full, 2 first, 3 middle, 4 last) whose payloads are `wandb_internal_pb2.Record` messages."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = run_file.read_bytes()
    assert data[:4] == b":W&B", data[:8]
    pos, block, payload, rows = 7, 32768, b"", []
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # block trailer
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if length == 0 and kind == 0:
            pos += left  # zero padding to the end of the block
            continue
        payload += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(payload)
            payload = b""
            if record.WhichOneof("record_type") == "history":
                rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                             for item in record.history.item})
    return rows


def test_metrics_go_to_an_offline_wandb_run_and_a_resume_continues_it(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    from calibrl_mcore.config import TrainConfig
    from calibrl_mcore.trainer.metrics import MetricsLogger
    from calibrl_mcore.trainer.wandb_sink import WandbSink

    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_API_KEY", "")  # no credentials anywhere: offline must not need them
    train = TrainConfig(wandb="calibrl-test", wandb_mode="offline")
    assert WandbSink.from_config(TrainConfig(), tmp_path, {}, "train") is None
    for steps in ((1, 2), (3,)):  # a run, then its resume in the same run_dir
        sink = WandbSink.from_config(train, tmp_path, {"algo": {"name": "calibrl"}}, "train")
        logger = MetricsLogger(tmp_path, enabled=True, tensorboard=False, wandb=sink)
        for step in steps:
            logger.log(step, {"reward/mean": step / 10, "train/loss": float("nan")})
        logger.close(summary=False)
    runs = sorted((tmp_path / "wandb").glob("offline-run-*"))
    run_id = (tmp_path / "wandb" / "run_id").read_text().strip()
    # wandb names a run's folder by its start second and id, adding -1, -2, ... when a resume starts within
    # the same second as the run before it
    assert runs and all(re.fullmatch(rf"offline-run-\d{{8}}_\d{{6}}-{run_id}(-\d+)?", r.name) for r in runs), runs
    history = [row for r in runs for row in _wandb_history(next(r.glob("run-*.wandb")))]
    assert [(row["_step"], row["reward/mean"]) for row in history] == [(1, 0.1), (2, 0.2), (3, 0.3)]
    assert all("train/loss" not in row for row in history)  # non-finite values stay out, as in metrics.jsonl
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 3
