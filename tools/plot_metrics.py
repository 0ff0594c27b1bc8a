"""Plot training curves of one or more runs side by side.

    python tools/plot_metrics.py runs/demo/calibrl runs/demo/grpo --out runs/demo/plots

Reads each RUN_DIR/metrics.jsonl and writes one PNG per metric group (reward, entropy, losses, eval
accuracy, timing) with one line per run, labelled by the run directory's name.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

PANELS: dict[str, list[str]] = {
    "reward": ["reward/mean", "reward/pass_rate", "reward/format", "reward/pass_broken_format_frac"],
    "entropy": ["train/entropy"],
    "loss": ["train/pg_loss", "train/cal_loss", "train/loss"],
    "eval": ["eval/accuracy", "eval/format"],
    "timing": ["time/step_s", "rollout/time_s", "time/train_s"],
}


def read_metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: is {run_dir} a run directory?")
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{n}: not JSON ({exc})") from exc
    return rows


def plot_runs(run_dirs: list[Path], out_dir: Path) -> list[Path]:
    runs = {Path(d).name: read_metrics(Path(d)) for d in run_dirs}
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for panel, keys in PANELS.items():
        present = [k for k in keys if any(k in r for rows in runs.values() for r in rows)]
        if not present:
            continue
        fig, axes = plt.subplots(1, len(present), figsize=(4.5 * len(present), 3.2), squeeze=False)
        for ax, key in zip(axes[0], present):
            for name, rows in runs.items():
                pts = [(r["step"], r[key]) for r in rows if key in r]
                if pts:
                    xs, ys = zip(*pts)
                    ax.plot(xs, ys, marker="o" if len(pts) < 3 else None, label=name)
            ax.set_title(key)
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
        axes[0][0].legend()
        fig.tight_layout()
        path = out_dir / f"{panel}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


ARM_PANELS = ("train/entropy", "reward/pass_rate", "reward/pass_broken_format_frac", "reward/format")
"""What `plot_arms` draws: the curves a seed study's verdict lines are about."""


def plot_arms(arms: dict[str, list[Path]], out_dir: Path, keys: tuple[str, ...] = ARM_PANELS, smooth: int = 1) -> Path:
    """One figure, a panel per metric: each arm's mean over its seeds' runs per step, shaded ± sd; with `smooth`
    > 1 both are averaged over the last `smooth` steps (one step's rollouts are few samples: noisy)."""
    import statistics

    runs = {arm: [read_metrics(Path(d)) for d in dirs] for arm, dirs in arms.items()}
    out_dir.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 3.2), squeeze=False)
    for ax, key in zip(axes[0], keys):
        for arm, seeds in runs.items():
            by_step: dict[float, list[float]] = {}
            for rows in seeds:
                for r in rows:
                    if key in r:
                        by_step.setdefault(r["step"], []).append(r[key])
            xs = sorted(by_step)
            if not xs:
                continue
            mean = _trailing_mean([statistics.fmean(by_step[x]) for x in xs], smooth)
            sd = _trailing_mean([statistics.stdev(by_step[x]) if len(by_step[x]) > 1 else 0.0 for x in xs], smooth)
            line = ax.plot(xs, mean, label=f"{arm} (n={len(seeds)})")[0]
            ax.fill_between(xs, [m - e for m, e in zip(mean, sd)], [m + e for m, e in zip(mean, sd)],
                            color=line.get_color(), alpha=0.15)
        ax.set_title(key + (f" ({smooth}-step mean)" if smooth > 1 else ""), fontsize=9)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    path = out_dir / "arms.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _trailing_mean(xs: list[float], window: int) -> list[float]:
    return [sum(xs[max(0, i - window + 1) : i + 1]) / (i + 1 - max(0, i - window + 1)) for i in range(len(xs))]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run directories (each with metrics.jsonl)")
    parser.add_argument("--out", type=Path, default=Path("plots"), help="output folder for PNGs")
    args = parser.parse_args(argv)
    try:
        written = plot_runs(args.runs, args.out)
    except (FileNotFoundError, ValueError) as exc:  # a run folder without (readable) metrics.jsonl
        print(f"plot_metrics: error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {len(written)} plots to {args.out}: {', '.join(p.name for p in written)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
