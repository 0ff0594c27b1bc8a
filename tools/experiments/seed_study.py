"""The seed study of docs/experiments.md: CalibRL vs GRPO vs LUFFY over paired seeds, from a stronger SFT start.

    nice -n 10 python tools/experiments/seed_study.py [--out runs/seed_study] [--seeds 0,1,2,3,4] [--steps 120]
                                                      [--parts lr2e-4,lr5e-4] [--arms grpo,...]

1. data: `calibrl data synth --n 4096 --heldout 256 --seed 0` (8x the demo's training prompts);
2. start: the tiny 2-layer Qwen2.5-VL-architecture model, SFT'd for 2 × 500 steps (the second round restarts
   Adam from the first round's HF export; held-out accuracy and pass@8 after each round go to `start.json`);
3. arms from that start, every arm over the same seeds (`train.seed`): see ARMS and PARTS (two learning
   rates, each a paired study of its own); 8 prompts × 4 samples per step, `rollout.max_new_tokens` 38 (the
   longest expert is 30 tokens), greedy accuracy and pass@k (8 samples at temperature 1) on 256 held-out
   prompts at the end;
4. per part, in `<out>/<part>/`: `summary.md` (per arm mean ± sd; paired differences against GRPO with 95%
   intervals; verdict lines), `study.json` and `arms.png` (entropy, pass rate, broken-format passes, format;
   mean ± sd per step).

Finished runs are kept: rerunning continues an interrupted study. Every number depends on the machine's
CPU and on the thread count (one per process here); on one machine a rerun repeats them.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from calibrl_mcore.seed_study import StudySpec, run_study, summarize, write_report  # noqa: E402

MAX_NEW_TOKENS = 38
ENTROPY_BRAKE = 0.30
"""Upper edge of the entropy band of the braked arm; its lower edge is 0, so the controller only ever lowers λ
(by 1/1.1 per step above the edge), never raises it. The start's entropy on training rollouts is 0.24–0.27."""

ARMS: dict[str, list[str]] = {
    "grpo": ["algo.name=grpo"],
    "luffy": ["algo.name=luffy"],
    "calibrl_lam0.01": ["algo.name=calibrl", "algo.lam=0.01"],
    "calibrl_lam0.03": ["algo.name=calibrl", "algo.lam=0.03"],
    "calibrl_lam0.1": ["algo.name=calibrl", "algo.lam=0.1"],
    "calibrl_lam0.1_brake": ["algo.name=calibrl", "algo.lam=0.1", "algo.lam_schedule=entropy",
                             "algo.entropy_target_low=0.0", f"algo.entropy_target_high={ENTROPY_BRAKE}"],
    "calibrl_lam0.1_passgroups": ["algo.name=calibrl", "algo.lam=0.1", "algo.calibration_groups=with_pass"],
}


def _calibrl(args: list[str], log: Path, stdout=None) -> None:
    with open(log, "a") as f:  # one thread, like the runs: the start repeats bit for bit on this machine
        subprocess.run([sys.executable, "-m", "calibrl_mcore.cli", *args], cwd=REPO, stdout=stdout or f, stderr=f,
                       check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})


def build_start(out: Path, rounds: int = 2, steps: int = 500) -> Path:
    """Data and the SFT start (each step skipped when its output exists)."""
    from tools.make_tiny_model import make_tiny_model

    out.mkdir(parents=True, exist_ok=True)
    log, data = out / "start.log", out / "data"
    if not (data / "train.jsonl").exists():
        _calibrl(["data", "synth", "--out", str(data), "--n", "4096", "--heldout", "256", "--seed", "0"], log)
    model = out / "tiny"
    if not (model / "config.json").exists():
        make_tiny_model("qwen2_5_vl", model, seed=0)
    config = ["--config", str(REPO / "configs/tiny_cpu.yaml")]
    evals = {}
    for k in range(1, rounds + 1):
        sft = out / f"sft{k}"
        if not (sft / "hf" / "config.json").exists():
            _calibrl(["sft", *config, f"model.hf_path={model}", f"data.train_path={data / 'train.jsonl'}",
                      f"train.run_dir={sft}", f"sft.steps={steps}", f"sft.out_dir={sft / 'hf'}",
                      "train.progress=false", "train.tensorboard=false"], log)
        result = sft / "eval.json"
        if not result.exists():
            with open(result, "w") as f:
                _calibrl(["eval", *config, "--model", str(sft / "hf"), f"data.eval_path={data / 'eval.jsonl'}",
                          "train.eval_prompts=256", f"rollout.max_new_tokens={MAX_NEW_TOKENS}",
                          "train.eval_samples=8"], log, stdout=f)
        evals[f"after {k * steps} SFT steps"] = json.loads(result.read_text())
        model = sft / "hf"
    (out / "start.json").write_text(json.dumps(evals, indent=2) + "\n")
    return model


PARTS: dict[str, tuple[float, list[str]]] = {
    "lr2e-4": (2e-4, list(ARMS)),
    "lr5e-4": (5e-4, ["grpo", "calibrl_lam0.1", "calibrl_lam0.1_brake", "calibrl_lam0.1_passgroups"]),
}
"""Two learning rates, each its own paired study against its own GRPO arm: at 2e-4 GRPO is stable; at 5e-4 the
policy moves more (and the demo start's entropy rises under GRPO too)."""


def run_part(name: str, out: Path, start: Path, seeds: list[int], steps: int, jobs: int, arms_only: set[str]) -> int:
    lr, names = PARTS[name]
    arms = {a: ARMS[a] for a in names if not arms_only or a in arms_only}
    data = out / "start" / "data"
    t0 = time.time()
    spec = StudySpec(
        config=str(REPO / "configs/tiny_cpu.yaml"), arms=arms, seeds=seeds,
        common=[f"model.hf_path={start}", f"data.train_path={data / 'train.jsonl'}",
                f"data.eval_path={data / 'eval.jsonl'}", "train.eval_prompts=256", "train.eval_samples=8",
                f"rollout.max_new_tokens={MAX_NEW_TOKENS}", f"optim.lr={lr}", f"train.steps={steps}",
                "train.tensorboard=false", "checkpoint.keep_last=1"],
        out=out / name / "runs", jobs=jobs, threads=1)
    runs = run_study(spec)
    report = summarize(runs, reference="grpo", compared=("eval/accuracy", "eval/pass@8", "entropy_end"), familywise=True)
    from tools.plot_metrics import plot_arms

    plot_arms({arm: [Path(r.run_dir) for r in runs if r.arm == arm and r.returncode == 0] for arm in arms},
              out / name, smooth=10)
    header = (f"{name}: {steps} RL steps per run at lr {lr:g}; this invocation took {time.time() - t0:.0f}s "
              f"(finished runs are reused).\n\n")
    print(write_report(report, runs, out / name, header=header, extra={"arms": arms, "steps": steps, "lr": lr}))
    return len(report.failed)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=Path("runs/seed_study"))
    p.add_argument("--seeds", default="0,1,2,3,4")
    p.add_argument("--steps", type=int, default=120)
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--parts", default=",".join(PARTS), help="comma-separated subset of " + ", ".join(PARTS))
    p.add_argument("--arms", default="", help="only these arms (comma-separated; default: each part's arms)")
    args = p.parse_args(argv)
    out = args.out.resolve()
    start = build_start(out / "start")
    print(f"start: {(out / 'start' / 'start.json').read_text()}")
    seeds = [int(s) for s in args.seeds.split(",")]
    only = {a for a in args.arms.split(",") if a}
    failed = sum(run_part(name, out, start, seeds, args.steps, args.jobs, only) for name in args.parts.split(","))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
