#!/usr/bin/env python
"""Sweep runner (real `torchrun` jobs per layout -> CSV + PNG + report) and the cluster layout files.

    python tools/scaling/sweep.py --config configs/tiny_cpu.yaml --layouts tp1 dp2 tp2 pp2 --steps 2 \\
        --out runs/sweep --model /tmp/tiny-qwen --data /tmp/synth/train.jsonl [key.sub=value ...]

A layout name is a run of `tp<N>`, `pp<N>`, `cp<N>`, `dp<N>` (missing ones are 1; `-` or `_` may separate
them): `tp2-pp2` runs 4 ranks. Each layout is one `torchrun --nproc_per_node <TP·PP·CP·DP> -m calibrl_mcore.cli
train` with `train.steps=--steps`; the runner samples the RSS of the job's whole process tree (torchrun, the
ranks, the colocated rollout server) every 0.2 s, then reads `<out>/<layout>/metrics.jsonl`
(`time/step_s`, `time/train_s`, `rollout/time_s`, `time/weight_sync_s`, `train/tokens_per_s`). Written to
`--out`: results.csv, scaling.png, report.md (measured numbers next to the planner's estimates: on CPU only
the *relative* scaling between layouts is compared; the planner's GPU memory/time numbers do not apply).

Layout files (configs/layouts/<model>_h100x<N>.yaml) are YAMLs of overrides merged after a model config:
`calibrl_mcore.config.load_config(model_yaml, layout=<file or name>)` (`calibrl train --layout NAME`), or
`load_with_layout(model_yaml, layout_yaml)`; `layout_overrides(layout_yaml)` gives the `key=value` list for
the command line; `write_layouts` regenerates them from the planner (`planner.py --write-layouts DIR`).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

if __package__ in (None, ""):  # `python tools/scaling/sweep.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from model_providers.pipeline_split import EVEN  # noqa: E402
from rollout.launcher import free_port  # noqa: E402
from tools.scaling.models import MODELS, ModelShape, get_model  # noqa: E402
from tools.scaling.planner import (  # noqa: E402
    HARDWARE,
    Assumptions,
    Hardware,
    Layout,
    Plan,
    Workload,
    best_rollout_tp,
    optimizer_s,
    pass_s,
    plan,
    rank_layouts,
)

REPO = Path(__file__).resolve().parents[2]
SHIPPED_MODELS = ["qwen2_5_vl_3b", "qwen2_5_vl_7b", "internvl3_8b", "qwen2_5_vl_32b"]
CSV_FIELDS = ["layout", "ranks", "tp", "pp", "cp", "dp", "rc", "steps", "wall_s", "step_s", "first_step_s",
              "train_s", "rollout_s", "weight_sync_s", "train_tokens_per_s", "train_tokens_per_s_all",
              "peak_rss_tree_gib",
              "peak_rss_proc_gib", "planner_train_s", "measured_train_rel", "planner_train_rel"]

# ------------------------------------------------------------------------------------------- layout files


def layout_overrides(layout_yaml: str | Path) -> list[str]:
    """A layout YAML (nested keys) flattened to `section.key=value` overrides, in file order."""
    from omegaconf import OmegaConf

    def flat(prefix: str, node) -> list[str]:
        if isinstance(node, dict):
            return [item for k, v in node.items() for item in flat(f"{prefix}{k}.", v)]
        value = "[" + ",".join(map(str, node)) + "]" if isinstance(node, list) else node
        return [f"{prefix[:-1]}={'null' if value is None else value}"]

    return flat("", OmegaConf.to_container(OmegaConf.load(layout_yaml)) or {})


def load_with_layout(model_yaml: str | Path, layout_yaml: str | Path, overrides: list[str] | None = None):
    """The model config with a cluster layout's overrides merged on top (then `overrides`); validated."""
    from calibrl_mcore.config import load_config

    return load_config(model_yaml, list(overrides or []), layout=layout_yaml)


def render_layout(model_name: str, p: Plan, hw: Hardware, a: Assumptions, even: Plan | None = None) -> str:
    """The override YAML of a plan, with the planner's estimate in its header; `even`: the same layout with
    even pipeline stages, whose step time the header quotes when `p`'s stages are uneven."""
    lay, m, t, n = p.layout, p.memory, p.time, p.layout.gpus
    fraction = math.floor(m["rollout_total"] / hw.memory_gib * 100) / 100  # floor: never more than planned
    nodes = n // hw.gpus_per_node
    where = f"{nodes} node{'s' if nodes > 1 else ''} × {hw.gpus_per_node}" if nodes else f"{n} GPUs"
    sp = "on" if lay.sequence_parallel else "off"
    dist = f"on (sharded over DP × CP = {lay.dp * lay.cp})" if lay.distributed_optimizer else "off"
    stages = f"\n# decoder layers per pipeline stage {'+'.join(map(str, p.stages))}" if lay.pp > 1 else ""
    if lay.split.uneven:  # what the uneven split gained over the even one (the planner's estimate)
        stages += f" (even: {f'step {even.step_s:.0f} s' if even and even.feasible else 'none fits'})"
    first, last = ("null" if v is None else v for v in (lay.split.first, lay.split.last))
    return f"""# {model_name} on {n} × {hw.name} ({where}): TP {lay.tp} × PP {lay.pp} × CP {lay.cp} × DP {lay.dp},
# recompute {lay.recompute}, sequence parallelism {sp}, distributed optimizer {dist};{stages}
# SGLang engines of TP {lay.rollout_tp} colocated with training on every GPU.
# Planner estimate (mfu {a.mfu}): {m["train_total"]:.1f} GiB training + {m["rollout_total"]:.1f} GiB rollout per GPU;
# step {t["step"]:.0f} s = generation {t["generation"]:.0f} + data plane {t["data_plane"]:.0f} + log-probs \
{t["logprobs"]:.0f} + train {t["train"]:.0f} + weight sync {t["weight_sync"]:.0f}.
# Written by `python tools/scaling/planner.py --write-layouts configs/layouts`. Apply with
#   calibrl train --config configs/{model_name}.yaml --layout {layout_file_name(model_name, hw, n)}
# or  calibrl train --config configs/{model_name}.yaml $(python tools/scaling/planner.py --overrides <this file>)
parallel:
  tensor_model_parallel_size: {lay.tp}
  pipeline_model_parallel_size: {lay.pp}
  num_layers_in_first_pipeline_stage: {first}
  num_layers_in_last_pipeline_stage: {last}
  context_parallel_size: {lay.cp}
  sequence_parallel: {str(lay.sequence_parallel).lower()}
model:
  recompute: {lay.recompute}
optim:
  distributed_optimizer: {str(lay.distributed_optimizer).lower()}
rollout:
  server_tp_size: {lay.rollout_tp}
  server_mem_fraction: {fraction}
"""


def layout_file_name(model_name: str, hw: Hardware, gpus: int) -> str:
    """`qwen2_5_vl_32b_h100x32`: the stem of a layout file, also its name for `calibrl train --layout`."""
    return f"{model_name}_{hw.name.split('-')[0]}x{gpus}"


def write_layouts(out_dir: Path, models: list[str], sizes: list[int], hw: Hardware, a: Assumptions) -> list[Path]:
    """The planner's fastest feasible layout per model × cluster size as override files (file name
    `layout_file_name`); infeasible sizes are skipped."""
    from calibrl_mcore.config import load_config

    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name in models:
        w = Workload.from_config(load_config(REPO / "configs" / f"{name}.yaml"))
        for gpus in sizes:
            ok, _ = rank_layouts(get_model(name), gpus, hw, w, a)
            if ok:
                best, model = ok[0].layout, get_model(name)
                even = (best_rollout_tp(model, w, replace(best, split=EVEN), hw, a)
                        if best.split.uneven and model.layers % best.pp == 0 else None)  # fmt: skip
                path = out_dir / f"{layout_file_name(name, hw, gpus)}.yaml"
                path.write_text(render_layout(name, ok[0], hw, a, even))
                written.append(path)
    return written


# ------------------------------------------------------------------------------------------- anchors
# Published or measured numbers the planner is checked against (docs/scaling.md lists the sources).
# NeMo-RL v0.4 GRPO on DGX-H100 (docs/about/performance-summary.md, recipes
# examples/configs/recipes/llm/performance/grpo-{qwen3-32b-4n8g,llama3.1-8b-instruct-2n8g}.yaml): 64 prompts ×
# 32 generations, train batch 512 (4 optimizer steps), max total length 4096, colocated vLLM at 0.6 of memory,
# KL 0.01 (a reference log-prob pass too), distributed optimizer. Prompt length ~200 tokens is our assumption
# (OpenMathInstruct-2 question + CoT instruction); the table gives the average total sequence length.
NEMO_RL = {
    "qwen3_32b": dict(gpus=32, layout=Layout(4, 4, 1, 2, "none", True, True, 4, 0.6), avg_seq=3206,
                      tok_s_gpu=540.0, step_s=393.0),
    "llama3_1_8b": dict(gpus=16, layout=Layout(1, 2, 1, 8, "full", True, False, 1, 0.6), avg_seq=1060,
                        tok_s_gpu=1562.0, step_s=97.7),
}
# NeMo-RL v0.3 blog (2025-07-21, table quoted in NVIDIA-NeMo/RL issue #959): Llama-3.1-8B-Instruct, Megatron
# backend, one 8×H100 node, 795 generated tokens per sample; phase times in s. The layout is our assumption:
# the 1n8g recipe (PP 2, activation checkpointing) with the 64 × 32 batch above.
NEMO_RL_PHASES = dict(model="llama3_1_8b", layout=Layout(1, 2, 1, 4, "full", True, False, 1, 0.6), avg_response=795,
                      phases={"generation": 58.0, "logprobs": 18.0, "train": 28.0, "weight_sync": 5.0, "step": 112.0})
# docs/gpu.md, one H200, bf16, sequence 4096, micro-batch 1, forward + backward, tokens/s.
GPU_MD = {"qwen2_5_3b": {"transformers SDPA": 20617.0, "Megatron local spec + SDPA": 17159.0},
          "qwen2_5_vl_3b": {"transformers, 256 image tokens": 12870.0}}


def anchor_results(a: Assumptions | None = None) -> list[tuple[str, float, float]]:
    """(anchor, measured, planner) for every anchor; the planner runs with `a` (default assumptions)."""
    a = a or Assumptions()
    out = []
    peak = HARDWARE["h200-141gb"].peak_bf16_tflops * 1e12
    pred = peak * a.mfu / MODELS["qwen2_5_3b"].train_flops_per_token(4096)
    for stack, measured in GPU_MD["qwen2_5_3b"].items():
        out.append((f"docs/gpu.md Qwen2.5-3B decoder, 1×H200, fwd+bwd tok/s ({stack})", measured, pred))
    vl = MODELS["qwen2_5_vl_3b"]
    for vision_mfu in (a.vision_mfu, 0.04):  # the default, and the eager ViT's measured efficiency
        step = 4096 * vl.train_flops_per_token(4096) / (peak * a.mfu)
        step += 1024 * vl.vision_train_flops_per_patch(1024) / (peak * vision_mfu)
        for stack, measured in GPU_MD["qwen2_5_vl_3b"].items():
            out.append((f"docs/gpu.md Qwen2.5-VL-3B, 1×H200, fwd+bwd tok/s ({stack}; vision_mfu {vision_mfu})",
                        measured, 4096 / step))
    for name, ref in NEMO_RL.items():
        t = plan(MODELS[name], _nemo_workload(ref["avg_seq"] - 200), ref["layout"], HARDWARE["h100-80gb"], a).time
        where = f"{ref['gpus']}×H100 {ref['layout'].name}"
        out.append((f"NeMo-RL {name} GRPO, {where}, tok/s/GPU", ref["tok_s_gpu"], t["tokens_per_s_per_gpu"]))
        out.append((f"NeMo-RL {name} GRPO, {where}, step s (planner: generation {t['generation']:.0f} + log-probs "
                    f"{t['logprobs']:.0f} + train {t['train']:.0f} + sync {t['weight_sync']:.0f})",
                    ref["step_s"], t["step"]))
    ref = NEMO_RL_PHASES
    t = plan(MODELS[ref["model"]], _nemo_workload(ref["avg_response"]), ref["layout"], HARDWARE["h100-80gb"], a).time
    for phase, measured in ref["phases"].items():
        out.append((f"NeMo-RL v0.3 blog {ref['model']}, 8×H100 (assumed {ref['layout'].name}), {phase} s",
                    measured, t[phase]))
    return out


def _nemo_workload(avg_response: float, prompt: int = 200) -> Workload:
    """NeMo-RL's performance recipes: 64 prompts × 32 generations, 4 optimizer steps, 4096 tokens at most,
    a KL reference pass; the ~200-token prompt (OpenMathInstruct-2 + CoT instruction) is our assumption."""
    return Workload(prompts=64, samples=32, mini_batches=4, micro_batch=1, max_prompt=prompt,
                    max_response=4096 - prompt, avg_prompt=prompt, avg_response=avg_response,
                    forward_extra=0, forward_passes=2)


def anchor_table(a: Assumptions | None = None) -> list[str]:
    rows = ["| anchor | measured | planner | planner / measured |", "|---|---|---|---|"]
    rows += [f"| {name} | {m:,.0f} | {p:,.0f} | {p / m:.2f} |" for name, m, p in anchor_results(a)]
    return rows


# ------------------------------------------------------------------------------------------- runs


def parse_layout(name: str) -> Layout:
    """`tp2-pp2` -> Layout(tp=2, pp=2); missing degrees are 1."""
    if not re.fullmatch(r"((tp|pp|cp|dp)\d+[-_]?)+", name):
        raise ValueError(f"layout {name!r}: expected e.g. tp1, dp2, tp2-pp2 (tp/pp/cp/dp followed by a degree)")
    degrees = {k: int(v) for k, v in re.findall(r"(tp|pp|cp|dp)(\d+)", name)}
    if any(v < 1 for v in degrees.values()):
        raise ValueError(f"layout {name!r}: degrees must be >= 1")
    return Layout(**{k: degrees.get(k, 1) for k in ("tp", "pp", "cp", "dp")})


def _tree(pid: int) -> list:
    import psutil

    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def _rss(procs: list) -> tuple[int, int]:
    """(sum, max) RSS in bytes over live processes (shared pages are counted once per process)."""
    import psutil

    sizes = []
    for p in procs:
        try:
            sizes.append(p.memory_info().rss)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return sum(sizes), max(sizes, default=0)


def _kill_tree(popen: subprocess.Popen, seen: dict) -> None:
    """SIGKILL the job's process group and every descendant seen while it ran (the rollout server runs in a
    session of its own and is reparented once its parent is gone, so the live tree alone would miss it)."""
    import psutil

    procs = [p for p in {**seen, **{q.pid: q for q in _tree(popen.pid)}}.values() if p.pid != popen.pid]
    try:
        os.killpg(popen.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    alive = []
    for p in procs:
        try:
            if p.is_running():  # same pid *and* start time: never a recycled pid
                p.kill()
                alive.append(p)
        except psutil.NoSuchProcess:
            pass
    popen.wait(timeout=30)
    psutil.wait_procs(alive, timeout=30)


def run_layout(name: str, config: Path, out: Path, steps: int, extra: list[str], timeout: float) -> dict:
    """One torchrun job; returns the CSV row of its measurements."""
    lay = parse_layout(name)
    ranks = lay.tp * lay.pp * lay.cp * lay.dp
    run_dir = out / name
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={ranks}", "--nnodes=1",
           "--master_addr=127.0.0.1", f"--master_port={free_port()}", "-m", "calibrl_mcore.cli", "train",
           "--config", str(config), f"train.run_dir={run_dir}", f"train.steps={steps}",
           f"parallel.tensor_model_parallel_size={lay.tp}", f"parallel.pipeline_model_parallel_size={lay.pp}",
           f"parallel.context_parallel_size={lay.cp}", "train.progress=false", "train.tensorboard=false",
           "checkpoint.resume=false", *extra]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                             "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1",
               PYTHONPATH=f"{REPO}:{env.get('PYTHONPATH', '')}")
    out.mkdir(parents=True, exist_ok=True)
    if run_dir.exists():  # metrics.jsonl is appended to and checkpoints resume: start every run clean
        shutil.rmtree(run_dir)
    log = out / f"{name}.log"
    peak_tree = peak_proc = 0
    seen: dict = {}
    timed_out = False
    t0 = time.monotonic()
    with open(log, "wb") as fh:
        popen = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            while popen.poll() is None:
                procs = _tree(popen.pid)
                seen.update({p.pid: p for p in procs})
                total, largest = _rss(procs)
                peak_tree, peak_proc = max(peak_tree, total), max(peak_proc, largest)
                if time.monotonic() - t0 > timeout:
                    timed_out = True
                    break
                time.sleep(0.2)
        finally:
            _kill_tree(popen, seen)  # a no-op after a clean exit; stragglers and timeouts otherwise
    rc = 124 if timed_out else popen.returncode
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()] \
        if (run_dir / "metrics.jsonl").exists() else []
    rows = [r for r in rows if "time/step_s" in r]
    steady = rows[1:] or rows  # the first step pays warm-up; use it only when it is the only one

    def mean(key: str) -> float:
        vals = [r[key] for r in steady if key in r]
        return sum(vals) / len(vals) if vals else float("nan")

    return {"layout": name, "ranks": ranks, "tp": lay.tp, "pp": lay.pp, "cp": lay.cp, "dp": lay.dp,
            "rc": rc, "steps": len(rows), "wall_s": time.monotonic() - t0, "step_s": mean("time/step_s"),
            "first_step_s": rows[0]["time/step_s"] if rows else float("nan"), "train_s": mean("time/train_s"),
            "rollout_s": mean("rollout/time_s"), "weight_sync_s": mean("time/weight_sync_s"),
            "train_tokens_per_s": mean("train/tokens_per_s"),  # rank 0's: its DP rank's tokens
            "train_tokens_per_s_all": mean("train/tokens_per_s") * lay.dp, "peak_rss_tree_gib": peak_tree / 2**30,
            "peak_rss_proc_gib": peak_proc / 2**30, "log": str(log)}


# ------------------------------------------------------------------------------------------- planner


def add_planner_estimates(rows: list[dict], cfg, model: ModelShape, hw: Hardware = HARDWARE["cpu-core"]) -> None:
    """Planner train time (fwd/bwd + optimizer) per layout on a one-core-per-rank pseudo device, and both
    measured and planned train times relative to the first successful layout."""
    ok = [r for r in rows if r["rc"] == 0 and not math.isnan(r["train_s"])]
    if not ok:
        return
    base = ok[0]
    w0 = Workload.from_config(cfg, avg_prompt=0.0, avg_response=0.0, image_tokens=0, avg_image_tokens=0.0)
    tokens = base["train_tokens_per_s_all"] * base["train_s"]  # ≈ trained tokens per step (fwd/bwd share)
    avg_seq = max(tokens / max(w0.trained_rows, 1), 1.0)
    w = replace(w0, avg_prompt=avg_seq / 2, avg_response=avg_seq / 2)
    a = Assumptions()
    for r in rows:
        lay = Layout(r["tp"], r["pp"], r["cp"], r["dp"])
        r["planner_train_s"] = pass_s(model, w, lay, hw, a, backward=True) + optimizer_s(model, w, lay, hw, a)
    for r in rows:
        r["measured_train_rel"] = r["train_s"] / base["train_s"] if r in ok else float("nan")
        r["planner_train_rel"] = r["planner_train_s"] / base["planner_train_s"]


# ------------------------------------------------------------------------------------------- outputs


def write_csv(rows: list[dict], path: Path) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        writer.writeheader()
        for r in rows:
            writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})


def write_plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["layout"] for r in rows]
    x = range(len(rows))
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    bottom = [0.0] * len(rows)
    for key, label in (("rollout_s", "rollout"), ("train_s", "train"), ("weight_sync_s", "weight sync")):
        vals = [0.0 if math.isnan(r.get(key, math.nan)) else r[key] for r in rows]
        axes[0].bar(x, vals, bottom=bottom, label=label)
        bottom = [b + v for b, v in zip(bottom, vals)]
    other = [max(r["step_s"] - b, 0.0) if not math.isnan(r["step_s"]) else 0.0 for r, b in zip(rows, bottom)]
    axes[0].bar(x, other, bottom=bottom, label="other (log-probs, advantages)")
    axes[0].set(title="measured step time", ylabel="s")
    axes[0].legend(fontsize=8)
    width = 0.4
    axes[1].bar([i - width / 2 for i in x], [r.get("measured_train_rel", math.nan) for r in rows], width,
                label="measured")
    axes[1].bar([i + width / 2 for i in x], [r.get("planner_train_rel", math.nan) for r in rows], width,
                label="planner (cpu-core)")
    axes[1].axhline(1.0, color="grey", lw=0.8)
    axes[1].set(title=f"train time relative to {names[0]}", ylabel="ratio")
    axes[1].legend(fontsize=8)
    axes[2].bar(x, [r["peak_rss_tree_gib"] for r in rows])
    axes[2].set(title="peak RSS of the process tree", ylabel="GiB")
    for ax in axes:
        ax.set_xticks(list(x), names)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _fmt(v, spec: str = ".3g") -> str:
    return "–" if isinstance(v, float) and math.isnan(v) else format(v, spec)


def write_report(rows: list[dict], path: Path, *, config: Path, model: ModelShape, steps: int, cmdline: str) -> None:
    import torch

    lines = [
        f"# Scaling sweep: {config}", "",
        f"Machine: {os.cpu_count()} CPU cores, {platform.platform()}, Python {platform.python_version()}, "
        f"torch {torch.__version__} (gloo); model `{model.name}` ({model.total_params:,} parameters); "
        f"{steps} step(s) per layout; {time.strftime('%Y-%m-%d %H:%M')}.", "",
        f"Command: `{cmdline}`", "",
        "> **CPU run.** The planner's GPU numbers (memory per GPU, absolute step times) do not apply here:",
        "> this report compares *relative* scaling only — each layout's train time (`time/train_s`, the",
        "> mini-batch updates) divided by the first layout's, measured vs the planner evaluated on a pseudo",
        "> device of one CPU core per rank (`cpu-core` in tools/scaling/planner.py). Tiny models are dominated",
        "> by per-call overheads (Python, gloo latency, process start) that the planner does not model, so",
        "> measured ratios say how the *implementation* behaves, not how the layouts would scale on GPUs.",
        "> Peak memory is the RSS of the job's process tree (torchrun, every rank, the rollout server),",
        "> sampled every 0.2 s; shared pages count once per process.", "",
        "| layout | ranks | rc | steps | step s | first step s | train s | rollout s | weight sync s "
        "| train tok/s (rank 0) | train tok/s (× DP) | peak RSS tree GiB | peak RSS largest proc GiB |",
        "|---" * 13 + "|",
    ]
    for r in rows:
        lines.append(f"| {r['layout']} | {r['ranks']} | {r['rc']} | {r['steps']} | {_fmt(r['step_s'])} "
                     f"| {_fmt(r['first_step_s'])} | {_fmt(r['train_s'])} | {_fmt(r['rollout_s'])} "
                     f"| {_fmt(r['weight_sync_s'])} | {_fmt(r['train_tokens_per_s'], ',.0f')} "
                     f"| {_fmt(r['train_tokens_per_s_all'], ',.0f')} "
                     f"| {_fmt(r['peak_rss_tree_gib'])} | {_fmt(r['peak_rss_proc_gib'])} |")
    lines += ["", "| layout | measured train s / first | planner train s / first |", "|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['layout']} | {_fmt(r.get('measured_train_rel', math.nan), '.2f')} "
                     f"| {_fmt(r.get('planner_train_rel', math.nan), '.2f')} |")
    failed = [r for r in rows if r["rc"] != 0]
    if failed:
        lines += ["", "Failed layouts (see their logs): " + ", ".join(f"{r['layout']} (rc {r['rc']}, {r['log']})"
                                                                     for r in failed)]
    lines += ["", "![scaling](scaling.png)", ""]
    path.write_text("\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", required=True, help="base config (e.g. configs/tiny_cpu.yaml)")
    ap.add_argument("--layouts", nargs="+", required=True, help="e.g. tp1 dp2 tp2 pp2 tp2-pp2")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--out", default="runs/sweep")
    ap.add_argument("--model", default=None, help="HF checkpoint (sets model.hf_path; default: the config's)")
    ap.add_argument("--data", default=None, help="training prompts (sets data.train_path; default: the config's)")
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds per layout")
    ap.add_argument("overrides", nargs="*", help="key.sub=value for every run")
    args = ap.parse_args(argv)
    from calibrl_mcore.config import load_config

    extra = list(args.overrides)
    extra += [f"model.hf_path={args.model}"] if args.model else []
    extra += [f"data.train_path={args.data}"] if args.data else []
    config, out = Path(args.config).resolve(), Path(args.out).resolve()
    cfg = load_config(config, extra)
    for name in args.layouts:
        parse_layout(name)  # fail before running anything
    model = ModelShape.from_hf_config(cfg.model.hf_path)
    rows = []
    for name in args.layouts:
        print(f"[sweep] {name} ...", flush=True)
        rows.append(run_layout(name, config, out, args.steps, extra, args.timeout))
        r = rows[-1]
        print(f"[sweep] {name}: rc={r['rc']} step {_fmt(r['step_s'])} s, train {_fmt(r['train_s'])} s, "
              f"peak RSS {r['peak_rss_tree_gib']:.2f} GiB", flush=True)
    add_planner_estimates(rows, cfg, model)
    write_csv(rows, out / "results.csv")
    write_plot(rows, out / "scaling.png")
    write_report(rows, out / "report.md", config=config, model=model, steps=args.steps,
                 cmdline="python tools/scaling/sweep.py " + " ".join(argv if argv is not None else sys.argv[1:]))
    print(f"[sweep] wrote {out / 'results.csv'}, {out / 'scaling.png'}, {out / 'report.md'}")
    return 0 if all(r["rc"] == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
