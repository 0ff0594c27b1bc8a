"""A missing input is one line on stderr naming the field / flag / file and what to do, exit code 2, and
nothing heavy started: one test per CLI and kind of input (run in-process through `calibrl_mcore.cli.main`)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from calibrl_mcore import cli

CONFIG = str(Path(__file__).resolve().parents[1] / "configs" / "tiny_cpu.yaml")


pytestmark = pytest.mark.usefixtures("restore_logging")  # cli.main configures process-wide logging


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, tiny_checkpoints):
    """A good checkpoint and data file, and broken copies of the checkpoint."""
    root = tmp_path_factory.mktemp("inputs")
    good = Path(tiny_checkpoints["qwen2_5_vl"])
    data = root / "train.jsonl"
    data.write_text(json.dumps({"question": "1+1?", "answer": "2", "solution": "2"}) + "\n")
    no_weights = root / "no_weights"
    no_proc = root / "no_processor"
    for target, keep in ((no_weights, lambda n: not n.endswith(".safetensors")),
                         (no_proc, lambda n: n in ("config.json", "generation_config.json") or n.endswith(".safetensors"))):
        target.mkdir()
        for f in good.iterdir():
            if f.is_file() and keep(f.name):
                shutil.copy2(f, target / f.name)
    return {"good": str(good), "data": str(data), "no_weights": str(no_weights), "no_processor": str(no_proc),
            "root": root}


def _one_line_error(capsys, argv: list[str], *expected: str) -> str:
    rc = cli.main(argv)
    err = capsys.readouterr().err
    assert rc == 2, err
    lines = err.splitlines()
    assert len(lines) == 1, err
    for text in expected:
        assert text in lines[0], lines[0]
    return lines[0]


@pytest.mark.parametrize("command", ["train", "sft"])
def test_train_and_sft_missing_checkpoint(capsys, inputs, command):
    line = _one_line_error(capsys, [command, "--config", CONFIG, "model.hf_path=/no/such/ckpt",
                                    f"data.train_path={inputs['data']}"],
                           "model.hf_path=/no/such/ckpt", "no such directory")
    assert line.startswith(f"calibrl {command}: error: ")


def test_train_empty_checkpoint_field_says_how_to_make_one(capsys, inputs):
    _one_line_error(capsys, ["train", "--config", CONFIG, f"data.train_path={inputs['data']}"],
                    "model.hf_path is empty", "make_tiny_model.py")


def test_train_checkpoint_without_weights(capsys, inputs):
    _one_line_error(capsys, ["train", "--config", CONFIG, f"model.hf_path={inputs['no_weights']}",
                             f"data.train_path={inputs['data']}"], "no *.safetensors")


def test_sft_checkpoint_without_processor(capsys, inputs):
    _one_line_error(capsys, ["sft", "--config", CONFIG, f"model.hf_path={inputs['no_processor']}",
                             f"data.train_path={inputs['data']}"], "no tokenizer files", "copy them")


def test_train_missing_data_files(capsys, inputs):
    _one_line_error(capsys, ["train", "--config", CONFIG, f"model.hf_path={inputs['good']}"],
                    "data.train_path is empty", "calibrl data synth")
    _one_line_error(capsys, ["train", "--config", CONFIG, f"model.hf_path={inputs['good']}",
                             "data.train_path=/no/train.jsonl"], "data.train_path=/no/train.jsonl: no such file")
    _one_line_error(capsys, ["train", "--config", CONFIG, f"model.hf_path={inputs['good']}",
                             f"data.train_path={inputs['data']}", "data.eval_path=/no/eval.csv"],
                    "data.eval_path=/no/eval.csv: expected a .jsonl or .parquet file")


def test_missing_config_file_and_bad_key(capsys):
    _one_line_error(capsys, ["train", "--config", "/no/such.yaml"], "config file /no/such.yaml does not exist")
    _one_line_error(capsys, ["sft", "--config", CONFIG, "train.stepz=3"], "train.stepz")


def test_eval_missing_model_and_eval_set(capsys, inputs):
    _one_line_error(capsys, ["eval", "--config", CONFIG, "--model", "/no/model", f"data.eval_path={inputs['data']}"],
                    "--model /no/model: no such directory")
    _one_line_error(capsys, ["eval", "--config", CONFIG, "--model", inputs["good"]], "data.eval_path is empty")


def test_eval_suite_missing_benchmark_data(capsys, inputs):
    _one_line_error(capsys, ["eval", "--config", CONFIG, "--model", inputs["good"], "--suite", "math500",
                             "--bench", "math500=/no/MATH-500/test.jsonl"], "--bench math500=/no/MATH-500")
    _one_line_error(capsys, ["eval", "--config", CONFIG, "--model", inputs["good"], "--suite", "math500"],
                    "benchmark math500: no --bench math500=PATH")


def test_env_with_a_missing_config(capsys):
    _one_line_error(capsys, ["env", "--config", "/no/env.yaml"], "calibrl env: error: config file /no/env.yaml")


def test_sweep_checks_every_cell_before_running(capsys, inputs):
    out = inputs["root"] / "sweep"
    _one_line_error(capsys, ["sweep", "--config", CONFIG, "--out", str(out), "--grid", "algo.name=grpo,calibrl",
                             "--set", f"model.hf_path={inputs['good']}", "data.train_path=/no/d.jsonl"],
                    "calibrl sweep: error: data.train_path=/no/d.jsonl: no such file")
    assert not out.exists()  # no cell was started


def test_convert_verify_without_processor_files(capsys, inputs):
    """The issue's case: before, six ranks' tracebacks from deep inside the processor loading."""
    _one_line_error(capsys, ["convert", "verify", "--hf-dir", inputs["no_processor"], "--mcore-dir",
                             str(inputs["root"] / "mcore"), "--tp", "2", "--pp", "1"],
                    "calibrl convert verify: error: --hf-dir", "image processor (preprocessor_config.json)",
                    "chat template")


def test_plot_metrics_missing_run(capsys, tmp_path):
    from tools.plot_metrics import main as plot_main

    assert plot_main([str(tmp_path / "no_run"), "--out", str(tmp_path / "plots")]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "no_run/metrics.jsonl does not exist" in err[0]
