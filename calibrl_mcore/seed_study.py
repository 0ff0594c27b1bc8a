"""Paired seed studies: every arm of a comparison runs with the same seeds, and is reported as mean ± sd
per arm plus paired differences with 95% intervals and a computed verdict (`calibrl_mcore.stats`).

    spec = StudySpec(config="configs/tiny_cpu.yaml", arms={"grpo": ["algo.name=grpo"], "calibrl": []},
                     seeds=[0, 1, 2, 3], common=["model.hf_path=...", ...], out=Path("runs/study"))
    runs = run_study(spec)                  # one `calibrl train` per (arm, seed), `jobs` at a time
    report = summarize(runs, reference="grpo")

A seed fixes the start's prompt order and every rollout's sampling (`train.seed`), so arm A and arm B
at seed s differ only by the algorithm: a per-seed difference removes the shared luck of the draw.
Runs use a fixed number of torch threads each, which keeps each one bit-for-bit repeatable on one
machine. With `reuse`, a run whose metrics.jsonl already holds its final evaluation is not run again: an
interrupted study continues where it stopped (delete the run folder to redo one).
"""

from __future__ import annotations

import json
import math
import os
import re
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from calibrl_mcore.stats import describe, familywise_level, level_name, paired_difference, verdict

REPO = Path(__file__).resolve().parents[1]
WINDOW = 5
"""Training metrics are averaged over a run's last WINDOW steps (one step's rollouts are 32 samples)."""

METRICS: dict[str, str] = {
    "eval/accuracy": "eval accuracy (acc×fmt)",
    "eval/format": "eval format",
    "entropy_start": "entropy (step 1)",
    "entropy_end": f"entropy (last {WINDOW} steps)",
    "pass_rate_end": f"train pass rate (last {WINDOW} steps)",
    "broken_format_end": f"passes with broken format (last {WINDOW} steps)",
}
"""Reported per arm, in this order (eval/pass@k columns are added when the runs have them)."""

COMPARED = ("eval/accuracy", "entropy_end")
"""Metrics whose paired difference against the reference arm is reported, with a verdict line each."""


@dataclass
class StudySpec:
    config: str
    """the YAML config every run starts from."""
    arms: dict[str, list[str]]
    """arm name -> its overrides (on top of `common`)."""
    seeds: list[int]
    """train.seed values; every arm runs every seed."""
    common: list[str] = field(default_factory=list)
    """overrides shared by every run (start checkpoint, data, steps, ...)."""
    out: Path = Path("runs/study")
    """one folder per run (`<arm>/seed_<s>`), plus `<arm>/seed_<s>.log`."""
    jobs: int = 2
    """runs at a time (each: a trainer and its rollout server, which mostly take turns on one core)."""
    threads: int = 1
    """torch threads per process; the same value must be used to repeat a run bit for bit."""
    reuse: bool = True
    """keep runs whose metrics.jsonl already holds a final evaluation (continue an interrupted study); False
    reruns every run."""


@dataclass
class RunResult:
    arm: str
    seed: int
    run_dir: str
    returncode: int
    metrics: dict[str, float] = field(default_factory=dict)
    wall_s: float = 0.0


def _run_dir(spec: StudySpec, arm: str, seed: int) -> Path:
    return Path(spec.out) / arm / f"seed_{seed}"


def _command(spec: StudySpec, arm: str, seed: int) -> list[str]:
    return [sys.executable, "-m", "calibrl_mcore.cli", "train", "--config", str(spec.config), *spec.common,
            *spec.arms[arm], f"train.seed={seed}", f"train.run_dir={_run_dir(spec, arm, seed)}",
            "checkpoint.resume=false", "train.progress=false"]


def _env(threads: int) -> dict[str, str]:
    env = dict(os.environ)
    env.update({"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false",
                "PYTHONPATH": f"{REPO}{os.pathsep}{env.get('PYTHONPATH', '')}"})
    return env


def read_run(run_dir: Path, window: int = WINDOW) -> dict[str, float]:
    """A finished run's numbers: its final evaluation, and training metrics over the last `window` steps."""
    path = Path(run_dir) / "metrics.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
    evals = [r for r in rows if "eval/accuracy" in r]
    steps = [r for r in rows if "train/entropy" in r]
    if not evals or not steps:
        return {}
    out = {k: v for k, v in evals[-1].items() if k.startswith("eval/") and k != "eval/n"}
    tail = steps[-window:]

    def mean(key: str, rows_: list[dict]) -> float:
        vals = [r[key] for r in rows_ if key in r]
        return statistics.fmean(vals) if vals else math.nan

    out.update({
        "entropy_start": steps[0]["train/entropy"],
        "entropy_end": mean("train/entropy", tail),
        "pass_rate_end": mean("reward/pass_rate", tail),
        # over the window's passing rows' steps; nan if nothing passed in the last steps
        "broken_format_end": mean("reward/pass_broken_format_frac", tail),
        "lam_end": tail[-1].get("algo/lam", math.nan),
        "steps": float(len(steps)),
    })
    return out


WALL_CLOCK = ("time/", "rollout/tokens_per_s", "train/tokens_per_s")
"""Metric prefixes that measure time: with `is_wall_clock`'s suffixes, the only metrics two runs of one
command on one machine may differ in."""


def is_wall_clock(key: str) -> bool:
    """Seconds (`rollout/time_s`, `data/encode_s`, `data/encode_s_min`, ...) and rates."""
    return key.startswith(WALL_CLOCK) or re.search(r"_s(_min|_max)?$", key) is not None


def trajectory(run_dir: Path) -> list[dict]:
    """A run's metrics.jsonl without its wall-clock metrics (what a rerun must repeat bit for bit)."""
    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(x).items() if not is_wall_clock(k)} for x in lines if x.strip()]


def run_study(spec: StudySpec, log=print) -> list[RunResult]:
    """Run every (arm, seed) not already finished, seed-major (so a partial study still pairs up)."""
    todo = [(arm, seed) for seed in spec.seeds for arm in spec.arms]
    results: dict[tuple[str, int], RunResult] = {}
    running: list[tuple[tuple[str, int], subprocess.Popen, float, object]] = []
    env = _env(spec.threads)
    while todo or running:
        while todo and len(running) < spec.jobs:
            arm, seed = todo.pop(0)
            run_dir = _run_dir(spec, arm, seed)
            done = read_run(run_dir) if spec.reuse else {}
            if done:
                results[arm, seed] = RunResult(arm, seed, str(run_dir), 0, done)
                continue
            run_dir.parent.mkdir(parents=True, exist_ok=True)
            (run_dir / "metrics.jsonl").unlink(missing_ok=True)  # a half-finished run starts over
            logf = open(run_dir.parent / f"seed_{seed}.log", "w")  # noqa: SIM115 (closed when it ends)
            proc = subprocess.Popen(_command(spec, arm, seed), cwd=REPO, env=env, stdout=logf,
                                    stderr=subprocess.STDOUT)
            running.append(((arm, seed), proc, time.time(), logf))
        time.sleep(0.2)
        for item in list(running):
            (arm, seed), proc, t0, logf = item
            if proc.poll() is None:
                continue
            running.remove(item)
            logf.close()
            run_dir = _run_dir(spec, arm, seed)
            res = RunResult(arm, seed, str(run_dir), proc.returncode, read_run(run_dir), time.time() - t0)
            results[arm, seed] = res
            status = "ok" if res.returncode == 0 else f"FAILED (exit {res.returncode}, see {run_dir}.log)"
            log(f"[study] {arm} seed {seed}: {status} in {res.wall_s:.0f}s")
    return [results[arm, seed] for seed in spec.seeds for arm in spec.arms]


@dataclass
class Report:
    arms: list[str]
    reference: str
    seeds: list[int]
    """the seeds every arm finished (the pairing)."""
    per_arm: dict[str, dict[str, dict]]
    """arm -> metric -> {"n", "mean", "sd"}."""
    differences: dict[str, dict[str, dict]]
    """arm (≠ reference) -> metric -> {"n", "mean", "sd", "lo", "hi"} of arm − reference over `seeds`."""
    verdicts: list[str]
    failed: list[str]
    level: float = 0.95
    """the level of each interval (above 95% when corrected for several comparisons)."""


def summarize(runs: list[RunResult], reference: str, compared: tuple[str, ...] = COMPARED,
              familywise: bool = False) -> Report:
    """Per-arm summaries over the seeds every arm finished, and each arm's paired difference against `reference`
    on the `compared` metrics. `familywise`: intervals at the Bonferroni level for all those comparisons
    together, so that the chance of any false verdict in the table stays at 5%."""
    arms = list(dict.fromkeys(r.arm for r in runs))
    by = {(r.arm, r.seed): r.metrics for r in runs if r.returncode == 0 and r.metrics}
    all_seeds = list(dict.fromkeys(r.seed for r in runs))
    seeds = [s for s in all_seeds if all((a, s) in by for a in arms)]
    failed = [f"{r.arm} seed {r.seed}" for r in runs if (r.arm, r.seed) not in by]
    keys = [*METRICS, *_pass_at_keys(by.values())]
    per_arm: dict[str, dict[str, dict]] = {}
    for arm in arms:
        per_arm[arm] = {}
        for key in keys:
            vals = [by[arm, s][key] for s in seeds if math.isfinite(by[arm, s].get(key, math.nan))]
            if vals:
                per_arm[arm][key] = vars(describe(vals))
    differences: dict[str, dict[str, dict]] = {}
    verdicts = []
    level = familywise_level((len(arms) - 1) * len(compared)) if familywise else 0.95
    for arm in arms:
        if arm == reference or not seeds:
            continue
        differences[arm] = {}
        for key in compared:
            pairs = [(by[arm, s][key], by[reference, s][key]) for s in seeds
                     if math.isfinite(by[arm, s].get(key, math.nan)) and math.isfinite(by[reference, s].get(key, math.nan))]
            if not pairs:
                continue
            diff = paired_difference([a for a, _ in pairs], [b for _, b in pairs], level)
            differences[arm][key] = vars(diff)
            verdicts.append(verdict(diff, arm, reference, METRICS.get(key, key)))
    return Report(arms, reference, seeds, per_arm, differences, verdicts, failed, level)


def _pass_at_keys(dicts) -> list[str]:
    """The eval/pass@k keys found in any of `dicts`, by k."""
    return sorted({k for d in dicts for k in d if k.startswith("eval/pass@")}, key=lambda k: int(k.split("@")[1]))


def _cell(stat: dict | None) -> str:
    if not stat:
        return "–"
    return f"{stat['mean']:.3f} ± {stat['sd']:.3f}" if stat["n"] > 1 else f"{stat['mean']:.3f}"


def _interval(d: dict | None) -> str:
    if not d:
        return "–"
    return f"{d['mean']:+.3f} [{d['lo']:+.3f}, {d['hi']:+.3f}]" if d["n"] > 1 else f"{d['mean']:+.3f}"


def render_markdown(report: Report) -> str:
    """Tables (per-arm mean ± sd; paired differences against the reference) and the verdict lines."""
    keys = [k for k in METRICS if any(k in report.per_arm[a] for a in report.arms)]
    keys += _pass_at_keys(report.per_arm.values())
    n = len(report.seeds)
    lines = [f"Seeds {report.seeds} (n = {n} per arm, the same seeds in every arm); mean ± sd over seeds.", "",
             "| arm | " + " | ".join(METRICS.get(k, k) for k in keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for arm in report.arms:
        lines.append(f"| {arm} | " + " | ".join(_cell(report.per_arm[arm].get(k)) for k in keys) + " |")
    compared = list(dict.fromkeys(k for d in report.differences.values() for k in d))
    if compared:
        corrected = (f"; Bonferroni over {sum(len(d) for d in report.differences.values())} comparisons"
                     if report.level > 0.95 + 1e-9 else "")
        lines += ["", f"Paired differences against {report.reference} (mean, {level_name(report.level)} t-interval "
                      f"over the {n} seeds{corrected}):", "",
                  "| arm − " + report.reference + " | " + " | ".join(METRICS.get(k, k) for k in compared) + " |",
                  "|---" * (len(compared) + 1) + "|"]
        for arm, diffs in report.differences.items():
            lines.append(f"| {arm} | " + " | ".join(_interval(diffs.get(k)) for k in compared) + " |")
    lines += ["", *[f"- {v}" for v in report.verdicts]]
    if report.failed:
        lines += ["", f"Failed runs (left out of the pairing): {', '.join(report.failed)}"]
    return "\n".join(lines) + "\n"


def write_report(report: Report, runs: list[RunResult], out: Path, *, header: str = "", footer: str = "",
                 extra: dict | None = None) -> str:
    """`out/summary.md` (header, the tables and verdicts, footer; returned) and `out/study.json` (every run's
    numbers, the summaries, `extra`)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "study.json").write_text(json.dumps({"report": vars(report), "runs": [vars(r) for r in runs],
                                                **(extra or {})}, indent=2, default=str) + "\n")
    text = header + render_markdown(report) + footer
    (out / "summary.md").write_text(text)
    return text
