"""`calibrl sweep`: run a grid of training configurations and compare them.

    calibrl sweep --config configs/tiny_cpu.yaml --out runs/sweep \
        --grid algo.name=grpo,dapo,luffy,rlplus,calibrl algo.alpha=0.2,0.5,1.0 \
        --set model.hf_path=CKPT data.train_path=D/train.jsonl data.eval_path=D/eval.jsonl

Every cell is the same `calibrl train` command (same seeds, data and start checkpoint) with its grid
values as overrides, run one after another as separate processes (or under torchrun with --nproc).
Collected per cell from its metrics.jsonl: final held-out accuracy, entropy trajectory, mean pass rate,
mean step time. Outputs in --out: results.json, results.csv, summary.md, and plots (accuracy against
each numeric grid key, one line per algorithm; entropy curves per cell).
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def parse_grid(items: list[str]) -> dict[str, list[str]]:
    grid: dict[str, list[str]] = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"--grid entries look like key.sub=v1,v2; got {item!r}")
        key, values = item.split("=", 1)
        vals = [v for v in values.split(",") if v != ""]
        if not vals:
            raise ValueError(f"--grid {key}: no values")
        grid[key] = vals
    return grid


def cell_name(assignment: dict[str, str]) -> str:
    parts = []
    for key, value in assignment.items():
        short = key.split(".")[-1]
        value = Path(value).parent.name if "/" in value else value
        parts.append(f"{short}={value}")
    return "__".join(parts).replace("/", "_")


def read_cell(run_dir: Path) -> dict:
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    steps = [x for x in lines if "time/step_s" in x]
    evals = [x["eval/accuracy"] for x in lines if "eval/accuracy" in x]
    return {
        "final_eval_accuracy": evals[-1] if evals else None,
        "entropy": [x.get("train/entropy") for x in steps],
        "pass_rate_mean": statistics.mean(x["reward/pass_rate"] for x in steps) if steps else None,
        "step_time_mean_s": statistics.mean(x["time/step_s"] for x in steps) if steps else None,
        "steps": len(steps),
    }


def check_cells(config: str, grid: dict[str, list[str]], fixed: list[str]) -> None:
    """Every cell's config and input files, before the first cell starts (ConfigError / InputError, one line)."""
    from calibrl_mcore.config import load_config
    from calibrl_mcore.inputs import check_command_inputs

    keys = list(grid)
    for values in itertools.product(*(grid[k] for k in keys)):
        check_command_inputs("train", load_config(config, [*fixed, *(f"{k}={v}" for k, v in zip(keys, values))]))


def run_sweep(config: str, grid: dict[str, list[str]], fixed: list[str], out: Path, nproc: int = 1,
              extra_env: dict | None = None) -> list[dict]:
    out.mkdir(parents=True, exist_ok=True)
    keys = list(grid)
    results = []
    for values in itertools.product(*(grid[k] for k in keys)):
        assignment = dict(zip(keys, values))
        name = cell_name(assignment)
        run_dir = out / name
        launcher = ([sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}"]
                    if nproc > 1 else [sys.executable])
        cmd = [*launcher, "-m", "calibrl_mcore.cli", "train", "--config", config, *fixed,
               *[f"{k}={v}" for k, v in assignment.items()], f"train.run_dir={run_dir}",
               "checkpoint.resume=false", "train.progress=false"]
        print(f"[sweep] {name}", flush=True)
        with open(out / f"{name}.log", "w") as log:
            proc = subprocess.run(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=extra_env)
        row = {"cell": name, **assignment, "returncode": proc.returncode}
        if proc.returncode == 0:
            row.update(read_cell(run_dir))
        else:
            print(f"[sweep] {name} failed (exit {proc.returncode}); see {out / (name + '.log')}", flush=True)
        results.append(row)
        (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    write_reports(results, keys, out)
    return results


def write_reports(results: list[dict], keys: list[str], out: Path) -> None:
    cols = ["cell", *keys, "final_eval_accuracy", "pass_rate_mean", "step_time_mean_s", "returncode"]
    with open(out / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(results)

    def fmt(v):
        return "–" if v is None else (f"{v:.3f}" if isinstance(v, float) else str(v))

    head = [*keys, "eval acc", "pass rate (mean)", "entropy (last)", "step s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        ent = (r.get("entropy") or [None])[-1]
        lines.append("| " + " | ".join([*(fmt(r.get(k)) for k in keys), fmt(r.get("final_eval_accuracy")),
                                        fmt(r.get("pass_rate_mean")), fmt(ent), fmt(r.get("step_time_mean_s"))]) + " |")
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    _plots(results, keys, out)


def _plots(results: list[dict], keys: list[str], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in results if r.get("returncode") == 0]
    for key in keys:
        try:
            xs_all = sorted({float(r[key]) for r in ok})
        except ValueError:
            continue  # not numeric
        fig, ax = plt.subplots(figsize=(5, 3.4))
        by_algo: dict[str, list[tuple[float, float]]] = {}
        for r in ok:
            if r.get("final_eval_accuracy") is not None:
                by_algo.setdefault(r.get("algo.name", "run"), []).append((float(r[key]), r["final_eval_accuracy"]))
        for algo, pts in sorted(by_algo.items()):
            pts.sort()
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=algo)
        ax.set_xticks(xs_all)
        ax.set_xlabel(key)
        ax.set_ylabel("held-out accuracy")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / f"accuracy_vs_{key.replace('.', '_')}.png", dpi=110)
        plt.close(fig)
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for r in ok:
        ent = [e for e in r.get("entropy") or [] if e is not None]
        if ent:
            ax.plot(range(1, len(ent) + 1), ent, label=r["cell"])
    ax.set_xlabel("step")
    ax.set_ylabel("policy entropy")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(out / "entropy_curves.png", dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="calibrl sweep", description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--grid", nargs="+", required=True, help="key.sub=v1,v2 ...")
    parser.add_argument("--set", nargs="*", default=[], help="fixed overrides for every cell")
    parser.add_argument("--out", type=Path, default=Path("runs/sweep"))
    parser.add_argument("--nproc", type=int, default=1, help="torchrun processes per cell")
    args = parser.parse_args(argv)
    check_cells(args.config, parse_grid(args.grid), args.set)
    results = run_sweep(args.config, parse_grid(args.grid), args.set, args.out, args.nproc)
    print((args.out / "summary.md").read_text())
    return 0 if all(r["returncode"] == 0 for r in results) else 1
