"""Benchmark: our Megatron policy (fwd + bwd with the CalibRL loss) vs transformers' Qwen2 with SDPA on the
same decoder shape and tokens, in one run on one device.

    python bench/gpu_train.py --shape 3b --seq 4096          # on the lent GPU (bf16)
    python bench/gpu_train.py --shape 7b --seq 4096 --recompute --stacks eager,transformers
    python bench/gpu_train.py --shape 3b --seq 4096 --rows 8 --stacks eager,packed,transformers
    python bench/gpu_train.py --shape tiny --seq 128         # on CPU (fp32): keeps the code path tested

Shapes are Qwen2.5-VL text decoders (3B: 36 layers, hidden 2048, FFN 11008, 16 heads, 2 KV heads, vocab
151936). Random weights; the same token batch for every stack. Stacks: our Megatron policy on the sdpa
spec, eager and with model.compile; with --rows > 1 (rows of varied lengths, padded to --seq) also packed
(model.packed_sequences); transformers' Qwen2 with SDPA (padded rows: attention mask). Reports tokens/s of
real tokens, model TFLOP/s (6·N·tokens + causal attention 6·L·s·h per token), MFU against --peak-tflops,
peak memory, and each Megatron stack's throughput and memory over transformers'. Writes
bench/results/gpu_train.json (or --out).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SHAPES = {
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=768),
    "3b": dict(hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16,
               num_key_value_heads=2, vocab_size=151936),
    "7b": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
               num_key_value_heads=4, vocab_size=152064),
}


def vl_config(shape: dict):
    from transformers import Qwen2_5_VLConfig

    head_dim = shape["hidden_size"] // shape["num_attention_heads"]
    section = [head_dim // 8, 3 * head_dim // 16, 3 * head_dim // 16]  # 16:24:24 of 128, scaled
    text = dict(shape, rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": section},
                max_position_embeddings=32768, rms_norm_eps=1e-6, tie_word_embeddings=False)
    vision = dict(depth=1, hidden_size=32, num_heads=2, intermediate_size=64, out_hidden_size=shape["hidden_size"],
                  fullatt_block_indexes=[0], patch_size=14, spatial_merge_size=2, window_size=56)
    return Qwen2_5_VLConfig(text_config=text, vision_config=vision, image_token_id=shape["vocab_size"] - 3,
                            video_token_id=shape["vocab_size"] - 2, vision_start_token_id=shape["vocab_size"] - 4)


def flops_per_token(shape: dict, seq: int) -> float:
    h, f, layers, v = shape["hidden_size"], shape["intermediate_size"], shape["num_hidden_layers"], shape["vocab_size"]
    kv = h // shape["num_attention_heads"] * shape["num_key_value_heads"]
    params = layers * (h * h * 2 + 2 * h * kv + 3 * h * f) + h * v  # attention + MLP + output layer
    return 6 * params + 6 * layers * seq * h  # causal attention: half of 12·L·s·h


def loss_inputs(b: int, s: int, device, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    old = (-torch.rand(b, s, generator=g) * 4).to(device)
    return dict(old=old, expert=(old - 0.1), adv=torch.randn(b, generator=g).to(device),
                passed=(torch.rand(b, generator=g) > 0.5).to(device), mask=torch.ones(b, s, dtype=torch.bool, device=device))


def calibrl_step_loss(logp, x):
    from calibrl_mcore.algo.losses import calibrl_loss

    loss, _ = calibrl_loss(logp, x["old"], x["expert"], x["adv"], x["passed"], x["mask"])
    return loss


def measure(step, steps: int, warmup: int, device) -> tuple[list[float], float | None]:
    """Per-step seconds after warm-up, and peak device memory (GiB) while stepping."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = time_steps(step, steps, warmup, device)
    return times, (torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None)


def time_steps(fn, steps: int, warmup: int, device) -> list[float]:
    out = []
    for i in range(warmup + steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            out.append(time.perf_counter() - t0)
    return out


def bench_megatron(cfg, tokens, x, dtype, steps, warmup, device, *, recompute: bool = False,
                   compile_layers: bool = False, lengths: torch.Tensor | None = None, packed: bool = False):
    """Our policy's train step: sdpa spec (TE is absent on the lent GPU), fwd + CalibRL loss + bwd.

    `lengths` [b]: right-padded rows of these real lengths (`tokens` [b, s]); `packed`: run them packed
    (model.packed_sequences). `compile_layers`: model.compile."""
    from calibrl_mcore.trainer.objective import response_logprobs_and_entropy
    from model_providers.packing import PackedLayout
    from model_providers.registry import build_model

    model = build_model(cfg, params_dtype=dtype, spec="auto", recompute="full" if recompute else "none",
                        compile_layers=compile_layers, packed_sequences=packed).to(device)
    labels = torch.roll(tokens, -1, dims=1)
    pos = torch.arange(tokens.shape[1], device=device).expand_as(tokens)
    real = torch.ones_like(tokens, dtype=torch.bool)
    if lengths is not None:
        real = torch.arange(tokens.shape[1], device=device)[None, :] < lengths.to(device)[:, None]
    layout = PackedLayout.from_lengths(lengths, tokens.shape[1], device=device) if packed else None

    def step():
        logits = model(tokens, pos, None, packed=layout)
        # The trainer's path: the chunked fused log-prob kernel (no whole fp32 [tokens, V] copy).
        logp, _ = response_logprobs_and_entropy(logits, labels, real)
        calibrl_step_loss(logp, dict(x, mask=real)).backward()
        model.zero_grad(set_to_none=True)

    return measure(step, steps, warmup, device)


def bench_transformers(cfg, tokens, x, dtype, steps, warmup, device, *, lengths: torch.Tensor | None = None):
    """transformers' Qwen2 with SDPA on the same tokens (padded rows: with an attention mask)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    text = cfg.text_config.to_dict()
    text.pop("rope_parameters", None)
    qcfg = Qwen2Config(**{k: text[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                               "num_attention_heads", "num_key_value_heads", "vocab_size",
                                               "rms_norm_eps", "max_position_embeddings")},
                       attn_implementation="sdpa", use_cache=False)
    with torch.device(device):  # initialise on the device: a 3B CPU init takes minutes
        model = Qwen2ForCausalLM._from_config(qcfg, torch_dtype=dtype)
    labels = torch.roll(tokens, -1, dims=1)
    mask = None
    if lengths is not None:
        mask = (torch.arange(tokens.shape[1], device=device)[None, :] < lengths.to(device)[:, None]).long()

    def step():
        logits = model(input_ids=tokens, attention_mask=mask, use_cache=False).logits
        logp = torch.log_softmax(logits.float(), -1).gather(-1, labels[..., None]).squeeze(-1)
        calibrl_step_loss(logp, x if mask is None else dict(x, mask=mask.bool())).backward()
        model.zero_grad(set_to_none=True)

    return measure(step, steps, warmup, device)


def row_lengths(rows: int, seq: int, seed: int = 0) -> torch.Tensor:
    """`rows` lengths in [seq/4, seq] (RL responses vary): the padded batch is [rows, seq]."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(seq // 4, seq + 1, (rows,), generator=g)
    lengths[0] = seq  # the longest row sets the padded length
    return lengths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--recompute", action="store_true", help="full activation recompute (Megatron side)")
    parser.add_argument("--rows", type=int, default=1,
                        help="> 1: a batch of rows of varied lengths (up to --seq), padded vs packed")
    parser.add_argument("--stacks", default="eager,compiled,transformers",
                        help="comma list of: eager, compiled (model.compile), transformers; with --rows > 1 "
                             "'packed' and 'packed_compiled' too")
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak for MFU (H100/H200)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "gpu_train.json")
    args = parser.parse_args()

    from calibrl_mcore.parallel import ParallelConfig, destroy_distributed, init_distributed

    info = init_distributed(ParallelConfig())
    device = info.device
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    shape = SHAPES[args.shape]
    cfg = vl_config(shape)
    torch.manual_seed(0)
    tokens = torch.randint(0, shape["vocab_size"] - 8, (args.rows, args.seq), device=device)
    lengths = row_lengths(args.rows, args.seq) if args.rows > 1 else None
    real_tokens = int(lengths.sum()) if lengths is not None else args.seq
    x = loss_inputs(args.rows, args.seq, device)
    fpt = flops_per_token(shape, args.seq)  # attention term at the longest row: an upper bound for rows
    common = (cfg, tokens, x, dtype, args.steps, args.warmup, device)
    every = {
        "eager": lambda: bench_megatron(*common, recompute=args.recompute, lengths=lengths),
        "compiled": lambda: bench_megatron(*common, recompute=args.recompute, lengths=lengths, compile_layers=True),
        "packed": lambda: bench_megatron(*common, recompute=args.recompute, lengths=lengths, packed=True),
        "packed_compiled": lambda: bench_megatron(*common, recompute=args.recompute, lengths=lengths, packed=True,
                                                  compile_layers=True),
        "transformers": lambda: bench_transformers(*common, lengths=lengths),
    }
    names = {"eager": "megatron_calibrl", "compiled": "megatron_calibrl_compiled", "packed": "megatron_calibrl_packed",
             "packed_compiled": "megatron_calibrl_packed_compiled", "transformers": "transformers_sdpa"}
    wanted = [w.strip() for w in args.stacks.split(",") if w.strip()]
    unknown = sorted(set(wanted) - set(every))
    if unknown or (args.rows == 1 and any(w.startswith("packed") for w in wanted)):
        parser.error(f"--stacks {args.stacks!r}: choose from {sorted(every)} (packed ones need --rows > 1)")
    result = {"shape": args.shape, "seq": args.seq, "rows": args.rows, "real_tokens": real_tokens,
              "recompute": args.recompute, "dtype": str(dtype), "device": str(device),
              "gpu": torch.cuda.get_device_name() if device.type == "cuda" else None, "stacks": {}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for key in wanted:
        try:
            times, peak = every[key]()
        except Exception as exc:  # noqa: BLE001 - one failing stack (e.g. no Triton for compile) keeps the rest
            result["stacks"][names[key]] = {"error": f"{type(exc).__name__}: {exc}"}
            print(f"{names[key]} failed: {exc}", file=sys.stderr, flush=True)
        else:
            step_s = statistics.median(times)
            tps = real_tokens / step_s
            result["stacks"][names[key]] = {"step_s": step_s, "tokens_per_s": tps, "model_tflops": tps * fpt / 1e12,
                                            "mfu": tps * fpt / 1e12 / args.peak_tflops, "peak_gb": peak, "all_s": times}
            print(f"{names[key]}: {tps:,.0f} tokens/s, peak {peak} GB", flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
        add_ratios(result)
        args.out.write_text(json.dumps(result, indent=2) + "\n")  # after every stack: a time limit keeps the rest
    print(json.dumps(result, indent=2))
    destroy_distributed()


def add_ratios(result: dict) -> None:
    """Each Megatron stack's throughput and peak memory over transformers' (when both ran)."""
    stacks = {name: stack for name, stack in result["stacks"].items() if "error" not in stack}
    base = stacks.get("transformers_sdpa")
    if base is None:
        return
    for name, stack in stacks.items():
        if name != "transformers_sdpa":
            stack["throughput_over_transformers"] = stack["tokens_per_s"] / base["tokens_per_s"]
            if stack["peak_gb"] is not None:
                stack["peak_memory_over_transformers"] = stack["peak_gb"] / base["peak_gb"]
    if "megatron_calibrl" in stacks:  # the key tools/gpu_smoke.sh and earlier results use
        result["megatron_over_transformers_throughput"] = stacks["megatron_calibrl"]["throughput_over_transformers"]


if __name__ == "__main__":
    main()
