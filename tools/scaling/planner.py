#!/usr/bin/env python
"""Scaling planner: per-GPU memory and step time of a CalibRL run for model × layout × cluster.

    python tools/scaling/planner.py --model qwen2_5_vl_32b --gpus 8 16 32 64 128 256 [--gpu h100-80gb] [--mfu 0.4]
    python tools/scaling/planner.py --anchors          # planner vs published / measured numbers
    python tools/scaling/planner.py --constants        # the hardware and efficiency table below
    python tools/scaling/planner.py --overrides configs/layouts/qwen2_5_vl_32b_h100x32.yaml   # -> key=value ...

A step is synchronous and colocated (what calibrl_mcore/trainer/loop.py does): generate on every GPU
(rollout engines of `rollout_tp` GPUs share the GPUs with training, memory split statically), then the
old/expert log-prob forward, the mini-batch updates, the weight push. Per GPU it estimates

    memory  weights 2 B/param, fp32 grads 4 B/param (our DDP: grad_reduce_in_fp32), Adam fp32 master+m+v
            12 B/param (/DP·CP with the distributed optimizer), activations of the in-flight micro-batches
            at micro_batch × (max prompt + max response) tokens (1F1B: stage i holds min(PP − i, m) of them;
            the worst stage counts), the vision tower's (stage 0), the fp32 logits of the last stage, the rollout engine's weights and its
            KV cache L·2·kv_heads·head_dim·tokens_in_flight·2 B / min(rollout TP, kv_heads), fixed overheads;
    time    generation (prefill FLOPs; decode steps = max(max_new_tokens, tokens/concurrency), each reading
            the weight shard once plus the KV of the running sequences from HBM), log-prob forward
            (2·N FLOPs/token), training (6·N + attention, +2·N with full recompute) at `mfu` of peak, TP
            all-reduces (2 per layer forward, 2 backward, over NVLink), per pipeline stage (its decoder layers;
            stage 0 the ViT, the last the LM head) through 1F1B: (Σ T_i + (m − 1)·max T_i)/m, the decoder
            split of each layout chosen by tools/scaling/pipeline_stages.py (Megatron's uneven stages), the DP
            gradient all-reduce / reduce-scatter per optimizer step (NVLink inside a node, IB across), the
            optimizer update (HBM bound), the weight sync and the data plane (tools/scaling/data_plane.py:
            each DP replica receives and encodes only its rows; also the host memory per rank). The vision tower is replicated over CP (its
            FLOPs and activations are not split by CP).

Activation bytes per token per decoder layer (bf16, flash attention, Korthikanti et al. 2022 adapted to
SwiGLU + GQA): 8h (norm inputs/outputs; /TP only with sequence parallelism) + [2(d_q + 2 d_kv) + 2 d_q + 6f]/TP.
`selective` recompute (core attention) saves only the s×s scores, which flash attention never stores: it
is modelled as `none`. Everything is an estimate: see docs/scaling.md for how close it is.
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass, replace
from pathlib import Path

if __package__ in (None, ""):  # `python tools/scaling/planner.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from model_providers.pipeline_split import EVEN, PipelineSplit  # noqa: E402
from tools.scaling.data_plane import data_plane_cost  # noqa: E402
from tools.scaling.models import ModelShape, get_model  # noqa: E402
from tools.scaling.pipeline_stages import StageCost, choose_split, format_split_gain, pipelined_s  # noqa: E402

GiB = 1024**3

# ------------------------------------------------------------------------------------------- constants


@dataclass(frozen=True)
class Hardware:
    name: str
    memory_gib: float  # usable device memory as CUDA reports it
    peak_bf16_tflops: float  # dense
    peak_fp8_tflops: float  # dense
    hbm_tbps: float
    nvlink_busbw_gbps: float  # NCCL all-reduce bus bandwidth inside a node (nccl-tests convention)
    ib_busbw_gbps: float  # per GPU across nodes (one 400 Gb/s NDR rail per GPU ≈ 50 GB/s, ~40 achieved)
    gpus_per_node: int
    collective_latency_us: float  # fixed cost of one collective call (small-message NCCL / gloo latency)


HARDWARE: dict[str, Hardware] = {
    # H100 SXM5 80 GB: 989 / 1979 TFLOP/s dense bf16 / fp8, 3.35 TB/s HBM3, NVLink4 450 GB/s per direction.
    "h100-80gb": Hardware("h100-80gb", 79.6, 989.0, 1979.0, 3.35, 360.0, 40.0, 8, 15.0),
    # H200 141 GB: same compute, 4.8 TB/s HBM3e.
    "h200-141gb": Hardware("h200-141gb", 139.8, 989.0, 1979.0, 4.8, 360.0, 40.0, 8, 15.0),
    # One CPU core per rank, for *relative* comparisons in the CPU sweep only (never absolute numbers).
    "cpu-core": Hardware("cpu-core", 12.0, 0.05, 0.05, 0.02, 5.0, 5.0, 2, 300.0),
}


@dataclass(frozen=True)
class Assumptions:
    mfu: float = 0.40  # fraction of peak reached by training / log-prob / prefill matmuls + attention
    vision_mfu: float = 0.25  # Megatron/TE ViT; docs/gpu.md's transformers-eager ViT reached only ~0.04
    decode_hbm_efficiency: float = 0.75  # fraction of HBM bandwidth a decode step reaches
    decode_step_overhead_ms: float = 2.0  # scheduling, sampling + log-probs, launch gaps per decode step
    max_running: int = 512  # sequences an engine decodes at once (SGLang / vLLM cap)
    min_concurrency: int = 16  # fewer KV slots than this and the rollout engine is called infeasible
    weight_sync_gbps: float = 2.0  # weight push per pipeline stage (HTTP/IPC buckets; NeMo-RL refit ~1.6–2.5)
    weight_sync_engine_s: float = 0.1  # fixed cost per rollout engine per sync (flush, version bump)
    logits_bytes: float = 12.0  # per logit element: bf16 output + fp32 copies for CE and entropy (objective.py)
    memory_margin: float = 0.10  # fraction of device memory kept free (fragmentation, spikes)
    train_overhead_gib: float = 3.0  # CUDA context, NCCL buffers, cuBLAS workspaces of the trainer
    rollout_overhead_gib: float = 3.0  # the engine's own context, CUDA graphs, sampling buffers


# ------------------------------------------------------------------------------------------- inputs


@dataclass(frozen=True)
class Workload:
    """One rollout step. Rows per prompt: `samples` generated + trained, `forward_extra` forward-only
    (the expert row: its log-probs are the CalibRL baseline), `train_extra` trained off-policy (LUFFY, RL-PLUS)."""

    prompts: int
    samples: int
    mini_batches: int
    micro_batch: int
    max_prompt: int
    max_response: int
    avg_prompt: float
    avg_response: float
    image_tokens: int = 0  # LLM image tokens per sequence, worst case (memory)
    avg_image_tokens: float = 0.0
    forward_extra: int = 1
    train_extra: int = 0
    forward_passes: int = 1  # forward-only passes before the update (old log-probs; 2 with a KL reference)

    @property
    def generated_rows(self) -> int:
        return self.prompts * self.samples

    @property
    def trained_rows(self) -> int:
        return self.prompts * (self.samples + self.train_extra)

    @property
    def forward_rows(self) -> int:
        return self.prompts * (self.samples + self.forward_extra)

    @property
    def avg_seq(self) -> float:
        return self.avg_prompt + self.avg_response

    @classmethod
    def from_config(cls, cfg, avg_prompt: float | None = None, avg_response: float | None = None,
                    image_tokens: int | None = None, avg_image_tokens: float | None = None) -> Workload:
        """The workload a `calibrl_mcore.config.Config` describes; averages default to ViRL-like data:
        prompts of ~1k tokens with one image (~512 tokens), responses of a quarter of max_new_tokens."""
        t, r, d = cfg.train, cfg.rollout, cfg.data
        avg_p = min(d.max_prompt_tokens, 1024) if avg_prompt is None else avg_prompt
        return cls(
            prompts=t.prompts_per_step, samples=r.n_samples, mini_batches=t.mini_batches_per_step,
            micro_batch=t.micro_batch_size, max_prompt=d.max_prompt_tokens, max_response=r.max_new_tokens,
            avg_prompt=avg_p, avg_response=r.max_new_tokens / 4 if avg_response is None else avg_response,
            image_tokens=min(d.max_prompt_tokens, 4096) if image_tokens is None else image_tokens,
            avg_image_tokens=min(avg_p / 2, 512) if avg_image_tokens is None else avg_image_tokens,
            train_extra=1 if cfg.algo.name in ("luffy", "rlplus") else 0,
            forward_passes=2 if cfg.algo.kl_coef > 0 else 1,
        )


@dataclass(frozen=True)
class Layout:
    tp: int = 1
    pp: int = 1
    cp: int = 1
    dp: int = 1
    recompute: str = "none"  # none | selective | full
    distributed_optimizer: bool = False
    sequence_parallel: bool = False
    rollout_tp: int = 1
    rollout_mem_fraction: float | None = None  # None: the KV cache takes what training leaves
    split: PipelineSplit = EVEN  # decoder layers of the first / last PP stage (parallel.num_layers_in_*)

    @property
    def gpus(self) -> int:
        return self.tp * self.pp * self.cp * self.dp

    @property
    def name(self) -> str:
        parts = [f"tp{self.tp}", f"pp{self.pp}"] + ([f"cp{self.cp}"] if self.cp > 1 else []) + [f"dp{self.dp}"]
        return "-".join(parts)


@dataclass
class Plan:
    layout: Layout
    memory: dict[str, float]  # GiB per component (worst stage) + total
    time: dict[str, float]  # seconds per phase + step
    concurrency: int  # sequences per rollout engine in flight
    feasible: bool
    reason: str = ""
    stages: tuple[int, ...] = ()  # decoder layers per pipeline stage

    @property
    def layout_name(self) -> str:
        """`tp2-pp4-dp1`, with the layers per stage when they are uneven: `tp2-pp4-dp1 [4+8+8+8]`."""
        uneven = len(set(self.stages)) > 1
        return self.layout.name + (f" [{'+'.join(map(str, self.stages))}]" if uneven else "")

    @property
    def step_s(self) -> float:
        return self.time["step"]


# ------------------------------------------------------------------------------------------- memory


def stage_params(model: ModelShape, tp: int, pp: int, split: PipelineSplit = EVEN) -> list[float]:
    """Parameters per GPU of each pipeline stage: its decoder layers; stage 0 also the embedding and the vision
    tower, the last stage the LM head (a copy of a tied embedding when PP > 1) and the final norm. Everything
    counts as TP-split (the replicated norms are < 0.1 %)."""
    head = model.vocab * model.hidden if (not model.tied_embeddings or pp > 1) else 0
    cost = StageCost(model.layer_params, model.embedding_params + model.vision_params, head + model.hidden)
    return [p / tp for p in cost.stages(split.stage_layers(model.layers, pp))]


def activation_bytes_per_token_layer(model: ModelShape, tp: int, sp: bool) -> float:
    replicated = 8 * model.hidden
    split = 2 * (model.q_dim + 2 * model.kv_dim) + 2 * model.q_dim + 6 * model.ffn
    return replicated / (tp if sp else 1) + split / tp


def vision_bytes_per_patch_layer(model: ModelShape, tp: int) -> float:
    v = model.vision
    mlp = 6 * v.ffn if v.gated_mlp else 4 * v.ffn
    return 8 * v.hidden + (2 * 3 * v.hidden + 2 * v.hidden + mlp) / tp  # no sequence parallelism in the ViT


def micro_batches_per_rank(w: Workload, lay: Layout) -> int:
    """Micro-batches one DP rank runs per mini-batch."""
    return max(1, math.ceil(w.trained_rows / w.mini_batches / lay.dp / w.micro_batch))


def training_memory(model: ModelShape, w: Workload, lay: Layout, a: Assumptions) -> dict[str, float]:
    """GiB per component on the worst pipeline stage. 1F1B keeps min(PP − i, m) micro-batches in flight on
    stage i: stage 0 the most, with the vision tower's activations; the last stage one, with the logits."""
    layers = lay.split.stage_layers(model.layers, lay.pp)
    params = stage_params(model, lay.tp, lay.pp, lay.split)
    shard = lay.dp * lay.cp if lay.distributed_optimizer else 1
    tokens = w.micro_batch * (w.max_prompt + w.max_response) / lay.cp  # one micro-batch on this GPU
    per_layer = activation_bytes_per_token_layer(model, lay.tp, lay.sequence_parallel)
    full = lay.recompute == "full"
    stored = 2 * model.hidden / (lay.tp if lay.sequence_parallel else 1) if full else per_layer
    working = per_layer * tokens if full else 0.0  # one layer recomputed during backward
    m = micro_batches_per_rank(w, lay)
    vis = 0.0
    if model.vision is not None and w.image_tokens:
        patches = w.micro_batch * w.image_tokens * model.vision.patches_per_token
        vp = vision_bytes_per_patch_layer(model, lay.tp)
        vis_stored = 2 * model.vision.hidden if full else vp
        vis = min(lay.pp, m) * patches * model.vision.layers * vis_stored + (vp * patches if full else 0.0)
    logits = tokens * model.vocab / lay.tp * a.logits_bytes
    stages = [{"weights": 2 * p, "grads": 4 * p, "optimizer": 12 * p / shard,
               "activations": min(lay.pp - i, m) * tokens * n * stored + working,
               "vision_act": vis if i == 0 else 0.0, "logits": logits if i == lay.pp - 1 else 0.0}
              for i, (n, p) in enumerate(zip(layers, params))]  # fmt: skip
    worst = max(stages, key=lambda d: sum(d.values()))
    return {k: v / GiB for k, v in worst.items()}


def kv_bytes_per_seq(model: ModelShape, w: Workload, rollout_tp: int) -> float:
    return model.kv_bytes_per_token() * w.avg_seq / min(rollout_tp, model.kv_heads)


def plan(model: ModelShape, w: Workload, lay: Layout, hw: Hardware, a: Assumptions = Assumptions()) -> Plan:
    """Memory and time of one layout; `feasible` when everything fits below (1 − margin) of memory."""
    mem = training_memory(model, w, lay, a)
    train_gib = sum(mem.values()) + a.train_overhead_gib
    budget = hw.memory_gib * (1 - a.memory_margin)
    rollout_w = 2 * model.total_params / lay.rollout_tp / GiB
    engines = lay.gpus // lay.rollout_tp
    seqs = math.ceil(w.generated_rows / engines)
    kv_seq = kv_bytes_per_seq(model, w, lay.rollout_tp) / GiB
    if lay.rollout_mem_fraction is not None:
        kv_pool = lay.rollout_mem_fraction * hw.memory_gib - rollout_w - a.rollout_overhead_gib
    else:
        kv_pool = budget - train_gib - rollout_w - a.rollout_overhead_gib
    conc = int(min(a.max_running, seqs, max(kv_pool, 0.0) // kv_seq))
    kv = conc * kv_seq
    mem.update(train_total=train_gib, rollout_weights=rollout_w, kv_cache=kv,
               rollout_total=rollout_w + kv + a.rollout_overhead_gib)
    mem["total"] = train_gib + mem["rollout_total"]
    mem["host"] = data_plane_cost(model, w, lay, hw)["host_gib"]  # host RAM per rank for the step's rows
    time = step_time(model, w, lay, hw, a, conc)
    reason = ""
    if train_gib + rollout_w + a.rollout_overhead_gib > budget:
        reason = f"training + rollout weights need {train_gib + rollout_w + a.rollout_overhead_gib:.0f} GiB"
    elif conc < min(a.min_concurrency, seqs):
        reason = f"KV cache fits only {conc} sequences per engine"
    elif mem["total"] > budget:
        reason = f"{mem['total']:.0f} GiB > {budget:.0f} GiB"
    return Plan(lay, mem, time, conc, not reason, reason, tuple(lay.split.stage_layers(model.layers, lay.pp)))


# ------------------------------------------------------------------------------------------- time


def _allreduce_s(nbytes: float, n: int, busbw_gbps: float, latency_us: float = 0.0) -> float:
    """Ring all-reduce: latency + 2(n−1)/n · bytes / bus bandwidth (reduce-scatter + all-gather: the same)."""
    return 0.0 if n <= 1 else latency_us / 1e6 + 2 * (n - 1) / n * nbytes / (busbw_gbps * 1e9)


def generation_s(model: ModelShape, w: Workload, lay: Layout, hw: Hardware, a: Assumptions, conc: int) -> float:
    rtp, engines = lay.rollout_tp, lay.gpus // lay.rollout_tp
    seqs = math.ceil(w.generated_rows / engines)
    peak = hw.peak_bf16_tflops * 1e12
    # prefill: each prompt once (the engine's prefix cache shares it between its G samples) + the ViT
    prompts = math.ceil(w.prompts / engines)
    prefill = prompts * w.avg_prompt * 2 * model.matmul_params / (rtp * peak * a.mfu)
    if model.vision is not None:
        patches = prompts * w.avg_image_tokens * model.vision.patches_per_token
        prefill += patches * model.vision_train_flops_per_patch(patches) / 3 / (rtp * peak * a.vision_mfu)
    # decode: every step reads the weight shard once (t0) plus each running sequence's KV (per-seq cost)
    hbm = hw.hbm_tbps * 1e12 * a.decode_hbm_efficiency
    t0 = 2 * model.decoder_params / rtp / hbm + a.decode_step_overhead_ms / 1e3
    t0 += (2 * model.layers * hw.collective_latency_us / 1e6) if rtp > 1 else 0.0
    ctx = w.avg_prompt + w.avg_response / 2
    per_seq = (model.kv_bytes_per_token() * ctx / min(rtp, model.kv_heads) / hbm
               + 2 * model.matmul_params / (rtp * peak * a.mfu))
    conc = max(conc, 1)
    steps = max(w.max_response, seqs * w.avg_response / conc)  # the longest sample sets the tail
    return prefill + steps * t0 + per_seq * seqs * w.avg_response


def stage_compute(model: ModelShape, w: Workload, lay: Layout, hw: Hardware, a: Assumptions, *,
                  backward: bool) -> tuple[StageCost, int]:
    """(seconds each pipeline stage computes in the pass: per decoder layer (FLOPs + its TP all-reduces) +
    stage 0's vision tower + the last stage's LM head; micro-batches per DP rank and mini-batch) for training
    (backward=True: all mini-batches) or the forward-only log-prob pass(es)."""
    rows = w.trained_rows if backward else w.forward_rows * w.forward_passes
    seq, peak = w.avg_seq, hw.peak_bf16_tflops * 1e12
    scale = (4 / 3 if lay.recompute == "full" else 1.0) if backward else 1 / 3  # full: the forward again
    stage_gpus = lay.tp * lay.cp * lay.dp
    token_s = rows * seq * scale / (stage_gpus * peak * a.mfu)
    vis_s = 0.0
    if model.vision is not None and w.avg_image_tokens:
        patches = w.avg_image_tokens * model.vision.patches_per_token
        vis = rows * patches * model.vision_train_flops_per_patch(patches) * scale
        # the ViT is replicated over CP (model_providers/context_parallel.py): every CP rank runs all the patches
        vis_s = vis * lay.cp / (stage_gpus * peak * a.vision_mfu)
    # TP all-reduces: 2 per layer forward, 2 backward (+2 for the recomputed forward), per micro-batch
    mbs_per_rank = math.ceil(rows / lay.dp / w.micro_batch)
    calls = 2 * ((3 if lay.recompute == "full" else 2) if backward else 1)
    ar = _allreduce_s(_boundary_bytes(model, w, lay), lay.tp, hw.nvlink_busbw_gbps, hw.collective_latency_us)
    layer_s = token_s * model.layer_train_flops_per_token(seq) + mbs_per_rank * calls * ar
    m = micro_batches_per_rank(w, lay) if backward else max(1, mbs_per_rank)
    return StageCost(layer_s, vis_s, token_s * model.head_train_flops_per_token), m


def _boundary_bytes(model: ModelShape, w: Workload, lay: Layout) -> float:
    """A micro-batch's hidden states [s/CP, b, h] in bf16: a TP all-reduce's message, a PP send before /TP."""
    return w.micro_batch * w.avg_seq / lay.cp * model.hidden * 2


def pass_s(model: ModelShape, w: Workload, lay: Layout, hw: Hardware, a: Assumptions, *, backward: bool) -> float:
    """Training (backward=True: all mini-batches) or the forward-only log-prob pass(es): the stages' compute
    and TP all-reduces through the 1F1B pipeline (the slowest stage sets the pace), plus PP point-to-point."""
    rows = w.trained_rows if backward else w.forward_rows * w.forward_passes
    cost, m = stage_compute(model, w, lay, hw, a, backward=backward)
    compute = pipelined_s(cost.stages(lay.split.stage_layers(model.layers, lay.pp)), m)
    # PP point-to-point: activations (and their grads) across each stage boundary, per micro-batch
    mbs_per_rank = math.ceil(rows / lay.dp / w.micro_batch)
    intra = lay.tp * lay.cp * lay.dp < hw.gpus_per_node
    p2p_bw = hw.nvlink_busbw_gbps if intra else hw.ib_busbw_gbps
    msg = _boundary_bytes(model, w, lay) / lay.tp
    p2p = (mbs_per_rank + lay.pp - 1) * (2 if backward else 1) * msg / (p2p_bw * 1e9) if lay.pp > 1 else 0.0
    return compute + p2p


def optimizer_s(model: ModelShape, w: Workload, lay: Layout, hw: Hardware, a: Assumptions) -> float:
    """Per rollout step: DP gradient sync + the Adam update, once per mini-batch."""
    params = max(stage_params(model, lay.tp, lay.pp, lay.split))
    n = lay.dp * lay.cp
    in_node = lay.tp * lay.cp * lay.dp <= hw.gpus_per_node
    bw = hw.nvlink_busbw_gbps if in_node else hw.ib_busbw_gbps
    if lay.distributed_optimizer:  # reduce-scatter fp32 grads, all-gather bf16 params
        sync = 2 * hw.collective_latency_us / 1e6 + (n - 1) / n * params * (4 + 2) / (bw * 1e9) if n > 1 else 0.0
        shard = n
    else:
        sync = _allreduce_s(params * 4, n, bw, hw.collective_latency_us)
        shard = 1
    update = params * (2 + 4 + 24 / shard) / (hw.hbm_tbps * 1e12 * a.decode_hbm_efficiency)
    return w.mini_batches * (sync + update)


def step_time(model: ModelShape, w: Workload, lay: Layout, hw: Hardware, a: Assumptions, conc: int) -> dict:
    gen = generation_s(model, w, lay, hw, a, conc)
    logp = pass_s(model, w, lay, hw, a, backward=False)
    train = pass_s(model, w, lay, hw, a, backward=True) + optimizer_s(model, w, lay, hw, a)
    engines = lay.gpus // lay.rollout_tp
    sync = 2 * model.total_params / lay.pp / (a.weight_sync_gbps * 1e9) + engines * a.weight_sync_engine_s
    data = data_plane_cost(model, w, lay, hw)["time_s"]  # rows to each DP replica, images encoded there
    step = gen + data + logp + train + sync
    train_flops = w.trained_rows * w.avg_seq * model.train_flops_per_token(w.avg_seq)
    return {"generation": gen, "data_plane": data, "logprobs": logp, "train": train, "weight_sync": sync, "step": step,
            "tokens_per_s_per_gpu": w.generated_rows * w.avg_seq / step / lay.gpus,
            "train_mfu": train_flops / (train * lay.gpus * hw.peak_bf16_tflops * 1e12)}


# ------------------------------------------------------------------------------------------- search


def _divisors(n: int, limit: int) -> list[int]:
    return [d for d in range(1, min(n, limit) + 1) if n % d == 0]


def candidate_layouts(model: ModelShape, gpus: int, hw: Hardware, w: Workload, *, current_trainer: bool = False,
                      cps: tuple[int, ...] | None = None, a: Assumptions = Assumptions(),
                      uneven: bool = True) -> list[Layout]:
    """Valid (TP, PP, CP, DP) × recompute × optimizer sharding; rollout TP is chosen per layout later.
    TP divides attention heads, KV groups and ViT heads and stays inside a node; PP <= 16 (and <= the decoder
    layers: every such PP has a Megatron split) with its split chosen by `split_for` (`uneven=False`: PP
    divides the layers, even split); CP ∈ {1, 2}; sequence parallelism whenever TP > 1; the distributed
    optimizer on or off when DP×CP > 1.
    `current_trainer` (kept for callers and `--current-trainer`): only what calibrl_mcore/trainer/policy.py
    and model_providers/ build. They now build every layout considered here — Megatron's distributed
    optimizer over DP×CP (`optim.distributed_optimizer`), sequence parallelism (`parallel.sequence_parallel`,
    TP > 1 with model.spec=te, which the shipped GPU configs use) and CP with the te and sdpa specs — so it
    no longer restricts the search."""
    cps = cps or (1, 2)
    vis_heads = model.vision.heads if model.vision else model.heads
    tps = [t for t in _divisors(hw.gpus_per_node, hw.gpus_per_node)
           if model.heads % t == 0 and model.kv_heads % t == 0 and vis_heads % t == 0]
    out = []
    for tp in tps:
        for pp in range(1, min(model.layers, 16) + 1) if uneven else _divisors(model.layers, 16):
            for cp in cps:
                if gpus % (tp * pp * cp):
                    continue
                dp = gpus // (tp * pp * cp)
                if w.trained_rows // w.mini_batches < dp:  # the trainer's own layout check
                    continue
                shardable = dp * cp > 1  # the distributed optimizer shards over DP×CP: nothing to shard at 1
                for rec in ("none", "full"):
                    for dist in ((False, True) if shardable else (False,)):
                        lay = Layout(tp, pp, cp, dp, rec, dist, sequence_parallel=tp > 1)
                        out.append(replace(lay, split=split_for(model, w, lay, hw, a)) if uneven else lay)
    return out


def split_for(model: ModelShape, w: Workload, lay: Layout, hw: Hardware, a: Assumptions) -> PipelineSplit:
    """The decoder split of `lay` whose slowest stage is fastest without more worst-stage training memory than
    the even (or layer-balanced) split: tools/scaling/pipeline_stages.py."""
    cost, _ = stage_compute(model, w, lay, hw, a, backward=True)
    memory = lambda split: sum(training_memory(model, w, replace(lay, split=split), a).values())  # noqa: E731
    return choose_split(model.layers, lay.pp, cost, memory)


def best_rollout_tp(model: ModelShape, w: Workload, lay: Layout, hw: Hardware, a: Assumptions) -> Plan:
    """Try every rollout TP (divides the GPUs and the attention heads, inside a node); fastest feasible."""
    plans = []
    for rtp in (1, 2, 4, 8):
        if rtp > hw.gpus_per_node or lay.gpus % rtp or model.heads % rtp:
            continue
        plans.append(plan(model, w, replace(lay, rollout_tp=rtp), hw, a))
    feasible = [p for p in plans if p.feasible]
    return min(feasible or plans, key=lambda p: (not p.feasible, p.step_s, p.layout.rollout_tp))


def _rank_key(p: Plan) -> tuple:
    lay = p.layout
    return (round(p.step_s, 6), lay.tp * lay.pp * lay.cp, lay.pp, lay.tp, lay.cp, lay.recompute,
            lay.distributed_optimizer, lay.rollout_tp)


def rank_layouts(model: ModelShape, gpus: int, hw: Hardware, w: Workload, a: Assumptions = Assumptions(),
                 *, current_trainer: bool = False, uneven: bool = True) -> tuple[list[Plan], list[Plan]]:
    """(feasible plans fastest first, infeasible plans) for one cluster size; the order is deterministic.
    `uneven=False`: even pipeline splits only (what the search gained by them: `format_split_gain`)."""
    plans = [best_rollout_tp(model, w, lay, hw, a)
             for lay in candidate_layouts(model, gpus, hw, w, current_trainer=current_trainer, a=a, uneven=uneven)]
    return sorted((p for p in plans if p.feasible), key=_rank_key), [p for p in plans if not p.feasible]


def layout_from_config(cfg, gpus: int) -> Layout:
    """The layout a config runs on `gpus` GPUs: parallel sizes, `parallel.sequence_parallel`, the decoder split
    (`parallel.num_layers_in_{first,last}_pipeline_stage`), `model.recompute`, `optim.distributed_optimizer` and
    the colocated engine's `rollout.server_tp_size` / `server_mem_fraction`."""
    p = cfg.parallel
    tp, pp, cp = p.tensor_model_parallel_size, p.pipeline_model_parallel_size, p.context_parallel_size
    if gpus % (tp * pp * cp):
        raise ValueError(f"{gpus} GPUs are not divisible by TP×PP×CP = {tp}×{pp}×{cp}")
    return Layout(tp, pp, cp, gpus // (tp * pp * cp), cfg.model.recompute, bool(cfg.optim.distributed_optimizer),
                  bool(p.sequence_parallel), cfg.rollout.server_tp_size, cfg.rollout.server_mem_fraction,
                  PipelineSplit.from_section(p))


# ------------------------------------------------------------------------------------------- output


def format_table(plans: list[Plan], gpus: int) -> list[str]:
    rows = ["| GPUs | rank | layout | recompute | dist-opt | rollout TP | train GiB | rollout GiB | total GiB "
            "| host GiB | running seqs/engine | gen s | data s | logp s | train s | sync s | step s | tok/s/GPU "
            "| train MFU |",
            "|---" * 19 + "|"]
    for i, p in enumerate(plans, 1):
        lay, m, t = p.layout, p.memory, p.time
        rows.append(f"| {gpus} | {i} | {p.layout_name} | {lay.recompute} | {'yes' if lay.distributed_optimizer else 'no'} "
                    f"| {lay.rollout_tp} | {m['train_total']:.1f} | {m['rollout_total']:.1f} | {m['total']:.1f} "
                    f"| {m['host']:.1f} | {p.concurrency} | {t['generation']:.0f} | {t['data_plane']:.1f} "
                    f"| {t['logprobs']:.0f} | {t['train']:.0f} "
                    f"| {t['weight_sync']:.0f} | {t['step']:.0f} | {t['tokens_per_s_per_gpu']:.0f} "
                    f"| {t['train_mfu']:.2f} |")
    return rows


def format_constants(hw: Hardware, a: Assumptions) -> str:
    lines = [f"| hardware `{hw.name}` | value |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in vars(hw).items() if k != "name"]
    lines += ["", "| assumption | value |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in vars(a).items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="qwen2_5_vl_32b", help="table name or HF checkpoint directory")
    ap.add_argument("--config", default=None, help="workload config (default: configs/<model>.yaml)")
    ap.add_argument("--gpus", type=int, nargs="+", default=[8, 16, 32, 64, 128, 256])
    ap.add_argument("--gpu", default="h100-80gb", choices=sorted(HARDWARE))
    ap.add_argument("--mfu", type=float, default=Assumptions.mfu)
    ap.add_argument("--vision-mfu", type=float, default=Assumptions.vision_mfu)
    ap.add_argument("--top", type=int, default=5, help="feasible layouts shown per cluster size")
    ap.add_argument("--current-trainer", action="store_true",
                    help="only layouts the trainer builds: since it builds the distributed optimizer, sequence "
                         "parallelism and CP, the same search as without the flag (kept for scripts)")
    ap.add_argument("--avg-prompt", type=float, default=None)
    ap.add_argument("--avg-response", type=float, default=None)
    ap.add_argument("--image-tokens", type=int, default=None, help="worst-case image tokens per sequence")
    ap.add_argument("--anchors", action="store_true", help="compare with published / measured numbers")
    ap.add_argument("--constants", action="store_true", help="print the hardware + assumption table")
    ap.add_argument("--overrides", default=None, metavar="LAYOUT_YAML", help="print a layout as key=value")
    ap.add_argument("--write-layouts", default=None, metavar="DIR",
                    help="write the fastest feasible layout per shipped model × --gpus as override files")
    args = ap.parse_args(argv)
    a = Assumptions(mfu=args.mfu, vision_mfu=args.vision_mfu)
    hw = HARDWARE[args.gpu]
    if args.overrides:
        from tools.scaling.sweep import layout_overrides

        print(" ".join(layout_overrides(args.overrides)))
        return 0
    if args.write_layouts:
        from tools.scaling.sweep import SHIPPED_MODELS, write_layouts

        for path in write_layouts(Path(args.write_layouts), SHIPPED_MODELS, args.gpus, hw, a):
            print(path)
        return 0
    if args.constants:
        print(format_constants(hw, a))
        return 0
    if args.anchors:
        from tools.scaling.sweep import anchor_table

        print("\n".join(anchor_table(a)))
        return 0
    from calibrl_mcore.config import load_config

    model = get_model(args.model)
    repo = Path(__file__).resolve().parents[2]
    cfg_path = args.config or (repo / "configs" / f"{args.model}.yaml")
    cfg = load_config(cfg_path if Path(cfg_path).is_file() else None)
    w = Workload.from_config(cfg, args.avg_prompt, args.avg_response, args.image_tokens)
    print(f"# {model.name}: {model.total_params / 1e9:.2f} B params ({model.vision_params / 1e9:.2f} B vision) on "
          f"{hw.name}, mfu {a.mfu}; {w.prompts} prompts × {w.samples} samples, {w.mini_batches} optimizer steps, "
          f"micro-batch {w.micro_batch} × {w.max_prompt}+{w.max_response} tokens; averages prompt {w.avg_prompt:.0f}, "
          f"response {w.avg_response:.0f}, image tokens {w.avg_image_tokens:.0f} (worst {w.image_tokens}); layouts: "
          + "sequence parallel with TP, CP <= 2, with/without the distributed optimizer (all of which the trainer "
          "builds)\n")
    for gpus in args.gpus:
        ok, bad = rank_layouts(model, gpus, hw, w, a, current_trainer=args.current_trainer)
        if not ok:
            closest = min(bad, key=lambda p: p.memory["train_total"]) if bad else None
            print(f"{gpus} GPUs: no feasible layout of {len(bad)}" + (
                f"; the smallest, {closest.layout.name} with {closest.layout.recompute} recompute"
                f"{' and the distributed optimizer' if closest.layout.distributed_optimizer else ''}: "
                f"{closest.reason}" if closest else "") + "\n")
            continue
        print("\n".join(format_table(ok[: args.top], gpus)))
        even = rank_layouts(model, gpus, hw, w, a, uneven=False)[0]
        print(f"({len(ok)} feasible of {len(ok) + len(bad)} layouts; {format_split_gain(ok[0], even[0] if even else None)})\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
