"""`make demo` / `calibrl demo`: the whole product on 2 CPU cores in a few minutes, nothing downloaded.

1. synthetic visual-reasoning data (PIL-drawn images, exact answers, expert solutions);
2. a tiny random Qwen2.5-VL-architecture checkpoint with a real tokenizer and processor;
3. SFT warm start on the expert solutions (teaches the answer format);
4. CalibRL and GRPO from that same start, same prompts, same seeds;
5. greedy evaluation of the SFT start and both runs on the held-out split; a table and comparison plots.

Each phase runs as its own `calibrl` process, exactly as a user would run it. The table reports what
these runs measured; at this scale the differences between algorithms are small and noisy.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def phase_line(args: list[str], log: Path) -> str:
    """What the terminal shows per phase: the sub-command and its short settings (the full command line and
    the phase's own output go to `log`)."""
    head = args[: next((i for i, a in enumerate(args) if a.startswith("-") or "=" in a), len(args))]  # sub-command
    settings = [a for a in args if "=" in a and not Path(a.partition("=")[2]).is_absolute()]
    return f"$ calibrl {' '.join([*head, *settings])}   (output: {log.name})"


def accuracy_table(table: dict) -> str:
    """The held-out accuracy table (markdown; also summary.md)."""
    lines = ["| policy | eval accuracy (acc×fmt) | eval format | entropy at end |", "|---|---|---|---|"]
    for name, row in table.items():
        ent = "–" if row["entropy"] is None else f"{row['entropy']:.3f}"
        lines.append(f"| {name} | {row['accuracy']:.3f} | {row['format']:.3f} | {ent} |")
    return "\n".join(lines)


def result_block(table: dict, n_eval: int, rl_steps: int, seconds: float, plots: list[Path], out: Path) -> str:
    """The demo's closing block: the held-out accuracy table and where everything was written."""
    head = f"Held-out accuracy on {n_eval} synthetic prompts ({rl_steps} RL steps each, {seconds:.0f}s total):"
    shown = [str(p.relative_to(out)) if p.is_relative_to(out) else str(p) for p in plots]
    tail = [f"written: {out} (summary.md, summary.json, demo.log, one run folder per phase)",
            "plots:   " + ", ".join(shown)]
    return "\n".join([head, accuracy_table(table), *tail])


def _run(args: list[str], log: Path) -> None:
    cmd = [sys.executable, "-m", "calibrl_mcore.cli", *args]
    print(phase_line(args, log), flush=True)
    with open(log, "a") as f:
        f.write(f"$ calibrl {' '.join(args)}\n")
        f.flush()
        proc = subprocess.run(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        raise SystemExit(f"step failed (exit {proc.returncode}): see {log}")


def _last(run_dir: Path, key: str) -> float | None:
    path = run_dir / "metrics.jsonl"
    vals = [json.loads(line)[key] for line in path.read_text().splitlines() if key in json.loads(line)]
    return vals[-1] if vals else None


def run_demo(out: str | Path = "runs/demo", quick: bool = False) -> dict:
    from tools.make_tiny_model import make_tiny_model

    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    log = out / "demo.log"
    t0 = time.time()
    n_train, n_eval = (64, 16) if quick else (512, 64)
    sft_steps, rl_steps = (20, 2) if quick else (250, 30)

    data = out / "data"
    if not (data / "train.jsonl").exists():
        _run(["data", "synth", "--out", str(data), "--n", str(n_train), "--heldout", str(n_eval), "--seed", "0"], log)
    base = out / "tiny_qwen2_5_vl"
    if not (base / "config.json").exists():
        make_tiny_model("qwen2_5_vl", base, seed=0, num_layers=2)
    common = ["--config", str(REPO / "configs/tiny_cpu.yaml"), f"data.train_path={data / 'train.jsonl'}",
              f"data.eval_path={data / 'eval.jsonl'}", f"train.eval_prompts={n_eval}", "train.progress=false"]

    sft_dir = out / "sft"
    _run(["sft", *common, f"model.hf_path={base}", f"train.run_dir={sft_dir}", f"sft.steps={sft_steps}",
          f"sft.out_dir={sft_dir / 'hf'}"], log)
    eval_start = out / "eval_sft.json"
    print(phase_line(["eval", "--model", str(sft_dir / "hf")], log), flush=True)
    with open(eval_start, "w") as f:
        subprocess.run([sys.executable, "-m", "calibrl_mcore.cli", "eval", *common, "--model", str(sft_dir / "hf")],
                       cwd=REPO, stdout=f, stderr=open(log, "a"), check=True)
    start = json.loads(eval_start.read_text())

    table = {"sft start": {"accuracy": start["eval/accuracy"], "format": start["eval/format"], "entropy": None}}
    for algo in ("calibrl", "grpo"):
        run_dir = out / algo
        _run(["train", *common, f"model.hf_path={sft_dir / 'hf'}", f"algo.name={algo}",
              f"train.run_dir={run_dir}", f"train.steps={rl_steps}", "checkpoint.resume=false"], log)
        table[algo] = {"accuracy": _last(run_dir, "eval/accuracy"), "format": _last(run_dir, "eval/format"),
                       "entropy": _last(run_dir, "train/entropy")}

    from tools.plot_metrics import plot_runs

    plots = plot_runs([out / "calibrl", out / "grpo"], out / "plots")
    block = result_block(table, n_eval, rl_steps, time.time() - t0, plots, out)
    (out / "summary.md").write_text(accuracy_table(table) + "\n")
    (out / "summary.json").write_text(json.dumps(table, indent=2) + "\n")
    print("\n" + block)
    return table
