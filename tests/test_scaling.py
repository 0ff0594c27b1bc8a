"""Scaling tools: model shapes, planner memory/time arithmetic, feasibility and ranking, the shipped real-run
configs and cluster layout files, the anchors, and the CPU sweep runner (two real torchrun jobs)."""

from __future__ import annotations

import math
import re
from dataclasses import replace
from pathlib import Path

import psutil
import pytest

from calibrl_mcore.config import load_config
from model_providers.pipeline_split import PipelineSplit
from tools.scaling import planner as P
from tools.scaling.models import MODELS, ModelShape
from tools.scaling.sweep import (
    SHIPPED_MODELS,
    anchor_results,
    layout_file_name,
    layout_overrides,
    load_with_layout,
    parse_layout,
    render_layout,
)

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
LAYOUTS = sorted((CONFIGS / "layouts").glob("*.yaml"))
GiB = 1024**3
H100 = P.HARDWARE["h100-80gb"]

# A 1.05 B-parameter dense decoder with round shapes (MHA, no biases, untied), so every number below can
# be written out by hand: per layer 4h² (q, k, v, o) + 3hf (SwiGLU) + 2h (norms).
H, F, L, V = 2048, 5632, 16, 32000
DENSE = ModelShape("dense1b", layers=L, hidden=H, ffn=F, heads=16, kv_heads=16, vocab=V, qkv_bias=False)
N_LAYER = 4 * H * H + 3 * H * F + 2 * H  # 51,384,320
N = L * N_LAYER + 2 * V * H + H  # layers + embedding + LM head + final norm = 953,223,168


def _workload(seq: int = 4096, **kw) -> P.Workload:
    base = dict(prompts=64, samples=8, mini_batches=2, micro_batch=1, max_prompt=seq // 2, max_response=seq // 2,
                avg_prompt=seq / 4, avg_response=seq / 4)
    return P.Workload(**{**base, **kw})


# ------------------------------------------------------------------------------------------- shapes


def test_parameter_counts_match_published_totals():
    assert DENSE.total_params == N
    published = {"qwen2_5_vl_3b": 3.75e9, "qwen2_5_vl_7b": 8.29e9, "qwen2_5_vl_32b": 33.45e9,
                 "internvl3_8b": 7.94e9, "qwen3_32b": 32.8e9, "llama3_1_8b": 8.03e9}
    for name, total in published.items():
        assert MODELS[name].total_params == pytest.approx(total, rel=0.01), name
    # KV cache per token: L · 2 · kv_heads · head_dim · 2 bytes
    assert MODELS["qwen2_5_vl_32b"].kv_bytes_per_token() == 64 * 2 * 8 * 128 * 2


def test_shape_from_tiny_checkpoint_counts_every_tensor(tiny):
    from safetensors import safe_open

    for path in (tiny.model, tiny.internvl):
        with safe_open(path / "model.safetensors", framework="pt") as f:
            n = sum(f.get_tensor(k).numel() for k in f.keys())  # noqa: SIM118
        assert ModelShape.from_hf_config(path).total_params == n, path.name


# ------------------------------------------------------------------------------------------- memory


def test_memory_of_a_1b_model_by_hand():
    a, seq = P.Assumptions(), 4096
    w = _workload(seq)
    # TP=2, no PP, no recompute, no sequence parallelism, plain optimizer
    mem = P.training_memory(DENSE, w, P.Layout(tp=2, dp=4), a)
    assert mem["weights"] * GiB == pytest.approx(2 * N / 2)  # bf16 weights, half per TP rank
    assert mem["grads"] * GiB == pytest.approx(4 * N / 2)  # fp32 main grads
    assert mem["optimizer"] * GiB == pytest.approx(12 * N / 2)  # fp32 master + Adam m + v
    # activations per token per layer: 8h replicated + (2(q+k+v) + 2·attn_out + 6f)/TP, with q=k=v=h (MHA)
    per_token_layer = 8 * H + (2 * 3 * H + 2 * H + 6 * F) / 2
    assert mem["activations"] * GiB == pytest.approx(seq * L * per_token_layer)
    assert mem["logits"] * GiB == pytest.approx(seq * V / 2 * a.logits_bytes)
    # the distributed optimizer shards the 12 bytes over DP=4; sequence parallelism splits the 8h too
    mem = P.training_memory(DENSE, w, P.Layout(tp=2, dp=4, distributed_optimizer=True, sequence_parallel=True), a)
    assert mem["optimizer"] * GiB == pytest.approx(12 * N / 2 / 4)
    assert mem["activations"] * GiB == pytest.approx(seq * L * (8 * H + 2 * 3 * H + 2 * H + 6 * F) / 2)
    # full recompute keeps each layer's input (2h bytes/token) plus one layer's activations
    mem = P.training_memory(DENSE, w, P.Layout(tp=2, dp=4, recompute="full"), a)
    assert mem["activations"] * GiB == pytest.approx(seq * L * 2 * H + seq * per_token_layer)


def test_pipeline_memory_by_hand():
    """PP=2 (18 B/param: 2 + 4 + 12): stage 0 holds half the layers + the embedding and min(PP, micro-batches) = 2 micro-batches in
    flight (1F1B); the last stage half the layers + LM head + final norm, one micro-batch and the logits."""
    a, seq = P.Assumptions(), 4096
    w = _workload(seq)
    first, last = P.stage_params(DENSE, tp=1, pp=2)
    assert first == L // 2 * N_LAYER + V * H
    assert last == L // 2 * N_LAYER + V * H + H
    mem = P.training_memory(DENSE, w, P.Layout(pp=2, dp=4), a)
    per_token_layer = 8 * H + 2 * 3 * H + 2 * H + 6 * F
    stage0 = 18 * first + 2 * seq * (L // 2) * per_token_layer
    stage1 = 18 * last + seq * (L // 2) * per_token_layer + seq * V * a.logits_bytes
    assert sum(v for k, v in mem.items()) * GiB == pytest.approx(max(stage0, stage1))


def test_rollout_kv_cache_and_concurrency_by_hand():
    a = P.Assumptions()
    w = _workload(4096)
    kv_token = L * 2 * 16 * (H // 16) * 2  # L · 2 · kv_heads · head_dim · 2 bytes = 4·L·h
    assert DENSE.kv_bytes_per_token() == kv_token == 4 * L * H
    assert P.kv_bytes_per_seq(DENSE, w, rollout_tp=2) == kv_token * w.avg_seq / 2
    p = P.plan(DENSE, w, P.Layout(tp=2, dp=4, rollout_tp=2), H100, a)
    budget = H100.memory_gib * (1 - a.memory_margin)
    pool = budget - p.memory["train_total"] - 2 * N / 2 / GiB - a.rollout_overhead_gib
    seqs = w.generated_rows // (8 // 2)
    assert p.concurrency == min(a.max_running, seqs, int(pool // (kv_token * w.avg_seq / 2 / GiB)))
    assert p.memory["kv_cache"] == pytest.approx(p.concurrency * kv_token * w.avg_seq / 2 / GiB)
    assert p.feasible and p.memory["total"] <= budget


def test_step_time_components_by_hand():
    """No TP/PP/DP communication on one GPU: training time = FLOPs / (peak · mfu) + the optimizer update."""
    a, w, lay = P.Assumptions(), _workload(2048), P.Layout()
    flops = w.trained_rows * w.avg_seq * (6 * DENSE.matmul_params + 12 * L * H * w.avg_seq)
    expect = flops / (H100.peak_bf16_tflops * 1e12 * a.mfu)
    m = w.trained_rows // w.mini_batches  # micro-batches per mini-batch, no bubble without PP
    assert P.micro_batches_per_rank(w, lay) == m
    assert P.pass_s(DENSE, w, lay, H100, a, backward=True) == pytest.approx(expect)
    # with PP=2 each stage computes its layers, the last also the LM head (6·V·h FLOPs per token); 1F1B takes
    # (T0 + T1 + (m − 1)·max) / m (plus small p2p): the slower stage sets the pace
    per_flop = w.trained_rows * w.avg_seq / (H100.peak_bf16_tflops * 1e12 * a.mfu)
    layer = per_flop * (6 * N_LAYER + 12 * H * w.avg_seq)
    for first, (t0, t1) in {None: (8 * layer, 8 * layer + per_flop * 6 * V * H),
                            9: (9 * layer, 7 * layer + per_flop * 6 * V * H)}.items():
        two = P.pass_s(DENSE, w, P.Layout(pp=2, split=PipelineSplit(first)), H100, a, backward=True)
        assert two == pytest.approx((t0 + t1 + (m - 1) * max(t0, t1)) / m, rel=0.01)
    # TP=2 adds 4 all-reduces per layer per micro-batch of s·h·2 bytes at 2(t−1)/t · bytes / busbw
    tp2 = P.pass_s(DENSE, w, P.Layout(tp=2), H100, a, backward=True)
    ar = H100.collective_latency_us / 1e6 + 2 * (1 / 2) * w.avg_seq * H * 2 / (H100.nvlink_busbw_gbps * 1e9)
    assert tp2 == pytest.approx(expect / 2 + w.trained_rows * L * 4 * ar)


def test_data_plane_cost_by_hand():
    """tools/scaling/data_plane.py: wire bytes of a step, 1/DP per rank (+ straddling prompts), rank 0's
    send volume independent of DP, host memory falling with DP, and the time inside the step."""
    from tools.scaling.data_plane import DataPlaneAssumptions, data_plane_cost, step_bytes

    a = DataPlaneAssumptions()
    w = _workload(2048, avg_image_tokens=256.0)
    group = 4 * 512 + a.image_ref_bytes + 9 * (a.row_overhead_bytes + 4 * 512) + 8 * 4 * 512  # 8 samples + expert
    assert step_bytes(w) == (64 * group, group)
    vl = MODELS["qwen2_5_vl_7b"]
    one, four = (data_plane_cost(vl, w, P.Layout(dp=dp, tp=8 // dp), H100) for dp in (1, 4))
    assert one["bytes_per_rank"] == 64 * group
    assert four["bytes_per_rank"] == 64 * group / 4 + 2 * (4 * 512 + a.image_ref_bytes)
    assert four["host_gib"] < one["host_gib"] / 3 and four["encode_s"] < one["encode_s"] / 3
    # rank 0 packs every row once at any DP; only its sends grow, bounded by the step's bytes over the NIC
    sends = 64 * group * 3 / 4 / (H100.ib_busbw_gbps * 1e9) + 6 * H100.collective_latency_us / 1e6
    assert four["dispatch_s"] == pytest.approx(one["dispatch_s"] + sends)
    patches = 64 * 256 * vl.vision.patches_per_token
    assert one["encode_s"] == pytest.approx(patches * 196 / 1e6 / a.encode_mpix_per_s)
    lay = P.Layout(dp=4, tp=2)
    t = P.step_time(vl, w, lay, H100, P.Assumptions(), 64)
    assert t["data_plane"] == pytest.approx(data_plane_cost(vl, w, lay, H100)["time_s"])
    assert t["step"] == pytest.approx(sum(t[k] for k in ("generation", "data_plane", "logprobs", "train",
                                                         "weight_sync")))
    assert P.plan(vl, w, lay, H100).memory["host"] == pytest.approx(data_plane_cost(vl, w, lay, H100)["host_gib"])


# ------------------------------------------------------------------------------------------- search


def test_feasibility_filter():
    cfg = load_config(CONFIGS / "qwen2_5_vl_32b.yaml")
    w = P.Workload.from_config(cfg)
    ok8, bad8 = P.rank_layouts(MODELS["qwen2_5_vl_32b"], 8, H100, w)
    assert not ok8 and bad8 and all(p.reason for p in bad8)  # 18 B/param × 33 B params > 8 × 80 GB
    ok32, _ = P.rank_layouts(MODELS["qwen2_5_vl_32b"], 32, H100, w)
    budget = H100.memory_gib * (1 - P.Assumptions().memory_margin)
    assert ok32 and all(p.feasible and p.memory["total"] <= budget + 1e-9 for p in ok32)
    tiny_gpu = P.Hardware("small", 16.0, 989.0, 1979.0, 3.35, 360.0, 40.0, 8, 15.0)
    assert not P.rank_layouts(MODELS["qwen2_5_vl_7b"], 8, tiny_gpu, w)[0]
    # layouts respect divisibility: TP | heads and KV groups, TP inside a node, a decoder split Megatron accepts
    for lay in P.candidate_layouts(MODELS["qwen2_5_vl_3b"], 16, H100, w):
        assert 2 % lay.tp == 0 and sum(lay.split.stage_layers(36, lay.pp)) == 36 and lay.gpus == 16


def test_ranking_is_deterministic_and_sorted():
    w = P.Workload.from_config(load_config(CONFIGS / "qwen2_5_vl_7b.yaml"))
    runs = [P.rank_layouts(MODELS["qwen2_5_vl_7b"], 16, H100, w)[0] for _ in range(2)]
    names = [[(p.layout, p.step_s) for p in r] for r in runs]
    assert names[0] == names[1] and len(names[0]) > 3
    steps = [p.step_s for p in runs[0]]
    assert steps == sorted(steps)
    # the trainer builds every layout the planner considers: `current_trainer` is the full search
    current = P.rank_layouts(MODELS["qwen2_5_vl_7b"], 16, H100, w, current_trainer=True)[0]
    assert [(p.layout, p.step_s) for p in current] == names[0]
    layouts = [p.layout for p in current]
    assert all(lay.sequence_parallel == (lay.tp > 1) for lay in layouts)  # SP whenever TP > 1
    assert all(lay.dp * lay.cp > 1 for lay in layouts if lay.distributed_optimizer)
    assert {lay.cp for lay in layouts} == {1, 2}
    assert any(lay.distributed_optimizer for lay in layouts) and any(lay.sequence_parallel for lay in layouts)


def test_planner_cli_prints_the_32b_table(capsys):
    assert P.main(["--model", "qwen2_5_vl_32b", "--gpus", "8", "32", "--top", "2"]) == 0
    out = capsys.readouterr().out
    assert "8 GPUs: no feasible layout" in out
    rows = [line for line in out.splitlines() if line.startswith("| 32 |")]
    assert len(rows) == 2


def test_anchors_stay_within_a_factor():
    """The planner against docs/gpu.md's measurements and NeMo-RL's published runs (docs/scaling.md)."""
    results = anchor_results()
    assert len(results) >= 10
    for name, measured, predicted in results:
        if "vision_mfu 0.25" in name:  # the eager-transformers ViT is far slower than the default assumes
            continue
        assert 0.6 <= predicted / measured <= 1.6, (name, measured, predicted)


# ------------------------------------------------------------------------------------------- configs


def test_real_run_configs_follow_the_papers_setup():
    for name in SHIPPED_MODELS:
        cfg = load_config(CONFIGS / f"{name}.yaml")
        assert cfg.model.hf_path.startswith("/models/") and cfg.data.train_path  # placeholders to set
        assert (cfg.model.dtype, cfg.model.spec) == ("bf16", "te")
        assert (cfg.optim.lr, cfg.optim.lr_schedule, cfg.optim.weight_decay, cfg.optim.grad_clip) == (
            1e-6, "constant", 0.01, 1.0)
        assert (cfg.train.prompts_per_step, cfg.train.mini_batches_per_step) == (480, 4)  # mini-batch 120
        assert (cfg.rollout.n_samples, cfg.rollout.max_new_tokens) == (10, 4096)
        assert (cfg.data.max_prompt_tokens, cfg.data.max_images) == (20480, 10)
        assert (cfg.algo.name, cfg.algo.alpha, cfg.algo.lam, cfg.algo.kl_coef, cfg.algo.entropy_coef) == (
            "calibrl", 0.5, 0.1, 0.0, 0.0)
        assert cfg.model.arch == ("internvl" if name.startswith("internvl") else "qwen2_5_vl")


@pytest.mark.parametrize("path", LAYOUTS, ids=lambda p: p.name)
def test_layout_file_merges_validates_and_fits(path):
    m = re.fullmatch(r"(.+)_h100x(\d+)", path.stem)
    assert m, f"{path.name}: expected <model>_h100x<N>.yaml"
    name, gpus = m.group(1), int(m.group(2))
    model_yaml = CONFIGS / f"{name}.yaml"
    cfg = load_with_layout(model_yaml, path)
    overrides = layout_overrides(path)
    assert cfg == load_config(model_yaml, overrides)
    for item in overrides:  # every key of the layout file took effect
        key, value = item.split("=", 1)
        section, field = key.split(".")
        assert str(getattr(getattr(cfg, section), field)) == {"null": "None"}.get(value, value), item
    lay = P.layout_from_config(cfg, gpus)
    model = MODELS[name]
    assert model.heads % lay.tp == 0 and model.kv_heads % lay.tp == 0
    assert sum(lay.split.stage_layers(model.layers, lay.pp)) == model.layers
    plan = P.plan(model, P.Workload.from_config(cfg), lay, H100)
    assert plan.feasible, plan.reason


def test_every_feasible_cluster_size_has_a_layout_file():
    """One file per model × size where a layout fits, holding the planner's fastest layout (regenerate with
    `planner.py --write-layouts configs/layouts` after changing the planner)."""
    shipped = {p.stem for p in LAYOUTS}
    for name in SHIPPED_MODELS:
        w = P.Workload.from_config(load_config(CONFIGS / f"{name}.yaml"))
        for gpus in (8, 16, 32, 64):
            ok = P.rank_layouts(MODELS[name], gpus, H100, w)[0]
            stem = f"{name}_h100x{gpus}"
            assert (stem in shipped) == bool(ok), (name, gpus)
            if ok:
                lay = P.layout_from_config(load_config(CONFIGS / f"{name}.yaml", layout=stem), gpus)
                assert lay == replace(ok[0].layout, rollout_mem_fraction=lay.rollout_mem_fraction), stem


def test_model_configs_carry_the_layout_they_cite():
    """Each real-run config's parallel / recompute / dist-opt / rollout-engine values are those of the layout
    file its `parallel:` comment names, so merging that layout changes nothing."""
    for name in SHIPPED_MODELS:
        path = CONFIGS / f"{name}.yaml"
        cited = re.search(r"^parallel:.*the layout of configs/layouts/(\w+)\.yaml", path.read_text(), re.M)
        assert cited, f"{path.name}: the parallel section should cite its layout file"
        assert cited.group(1).startswith(f"{name}_h100x"), cited.group(1)
        assert load_config(path) == load_config(path, layout=cited.group(1)), cited.group(1)


def test_layout_with_distributed_optimizer_and_sp_loads_and_reads_back(tmp_path, monkeypatch):
    """A layout file with the distributed optimizer and sequence parallelism goes through
    `load_config(model_yaml, layout=...)` (a path or a configs/layouts name, as `calibrl train --layout`)
    and `layout_from_config` reads both keys back."""
    from calibrl_mcore import cli

    model_yaml = CONFIGS / "qwen2_5_vl_7b.yaml"
    cfg = load_config(model_yaml)
    w = P.Workload.from_config(cfg)
    want = P.Layout(tp=4, pp=2, cp=2, dp=2, recompute="full", distributed_optimizer=True, sequence_parallel=True,
                    rollout_tp=4)
    plan = P.plan(MODELS["qwen2_5_vl_7b"], w, want, H100)
    assert plan.feasible, plan.reason
    text = render_layout("qwen2_5_vl_7b", plan, H100, P.Assumptions())
    assert "sequence parallelism on" in text and "distributed optimizer on (sharded over DP × CP = 4)" in text
    path = tmp_path / f"{layout_file_name('qwen2_5_vl_7b', H100, 32)}.yaml"
    path.write_text(text)
    cfg = load_config(model_yaml, layout=path)
    assert cfg.parallel.sequence_parallel is True and cfg.optim.distributed_optimizer is True
    assert cfg.parallel.context_parallel_size == 2 and cfg.model.recompute == "full"
    assert cfg == load_with_layout(model_yaml, path) == load_config(model_yaml, layout_overrides(path))
    lay = P.layout_from_config(cfg, 32)
    assert lay == replace(want, rollout_mem_fraction=cfg.rollout.server_mem_fraction)
    # the same keys from a shipped layout, by name, through the CLI's --layout
    shipped = [p for p in LAYOUTS if "distributed_optimizer: true" in p.read_text()
               and "sequence_parallel: true" in p.read_text()]
    assert shipped, "no shipped layout uses both the distributed optimizer and sequence parallelism"
    stem = shipped[0].stem
    seen = []
    monkeypatch.setattr(cli, "cmd_train", lambda args: seen.append(cli._config(args)) or 0)
    assert cli.main(["train", "--config", str(CONFIGS / f"{stem.split('_h100x')[0]}.yaml"), "--layout", stem]) == 0
    lay = P.layout_from_config(seen[0], int(stem.split("_h100x")[1]))
    assert lay.distributed_optimizer and lay.sequence_parallel and lay.tp > 1
    # a config without the keys reads back as plain DDP without SP
    lay = P.layout_from_config(load_config(None, ["parallel.tensor_model_parallel_size=2"]), 4)
    assert (lay.tp, lay.dp, lay.distributed_optimizer, lay.sequence_parallel) == (2, 2, False, False)


def test_overrides_cli(capsys):
    path = CONFIGS / "layouts" / "qwen2_5_vl_32b_h100x32.yaml"
    assert P.main(["--overrides", str(path)]) == 0
    printed = capsys.readouterr().out.split()
    assert printed == layout_overrides(path)
    assert "parallel.tensor_model_parallel_size=2" in printed
    assert "parallel.num_layers_in_first_pipeline_stage=3" in printed  # uneven stages: 3+9+9+9+9+9+9+7


# ------------------------------------------------------------------------------------------- sweep


def test_parse_layout():
    assert parse_layout("tp2-pp2") == P.Layout(tp=2, pp=2)
    assert parse_layout("dp2").gpus == 2 and parse_layout("tp1").gpus == 1
    for bad in ("tp", "xx2", "tp0", "tp2+pp2"):
        with pytest.raises(ValueError):
            parse_layout(bad)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from types import SimpleNamespace

    from calibrl_mcore.data.synth import generate_synthetic
    from tools.make_tiny_model import make_tiny_model

    root = tmp_path_factory.mktemp("scaling")
    make_tiny_model("qwen2_5_vl", str(root / "tiny"))
    make_tiny_model("internvl", str(root / "tiny_internvl"))
    generate_synthetic(root / "synth", n=32, heldout=4)
    return SimpleNamespace(root=root, model=root / "tiny", internvl=root / "tiny_internvl",
                           data=root / "synth" / "train.jsonl")


@pytest.mark.distributed
def test_sweep_runs_two_layouts_on_cpu(tiny):
    from tools.scaling.sweep import main as sweep_main

    out = tiny.root / "sweep"
    rc = sweep_main(["--config", str(CONFIGS / "tiny_cpu.yaml"), "--layouts", "tp1", "dp2", "--steps", "1",
                     "--out", str(out), "--model", str(tiny.model), "--data", str(tiny.data), "--timeout", "400",
                     "train.prompts_per_step=4", "rollout.n_samples=2", "rollout.max_new_tokens=8"])
    assert rc == 0, (out / "tp1.log").read_text()[-3000:] + (out / "dp2.log").read_text()[-3000:]
    import csv

    rows = list(csv.DictReader((out / "results.csv").open()))
    assert [r["layout"] for r in rows] == ["tp1", "dp2"] and [r["ranks"] for r in rows] == ["1", "2"]
    for r in rows:
        assert r["rc"] == "0" and r["steps"] == "1"
        for key in ("step_s", "train_s", "train_tokens_per_s", "peak_rss_tree_gib", "planner_train_rel"):
            assert math.isfinite(float(r[key])) and float(r[key]) > 0, (key, r)
    assert float(rows[1]["peak_rss_tree_gib"]) > float(rows[1]["peak_rss_proc_gib"])  # several processes
    assert (out / "scaling.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = (out / "report.md").read_text()
    assert "relative" in report and "| tp1 |" in report and "| dp2 |" in report
    # nothing the jobs started is left running (trainers, torchrun agents, rollout servers)
    left = [p for p in psutil.process_iter(["cmdline"]) if str(out) in " ".join(p.info["cmdline"] or [])]
    assert not left, [" ".join(p.info["cmdline"])[:200] for p in left]
