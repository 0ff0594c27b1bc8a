"""Benchmark: chunked fused log-prob + entropy vs the unfused fp32 log-softmax path, same logits, one run.

    python bench/logprob.py                       # GPU: 4096 tokens x vocab 151936, bf16 -> results/logprob.json
    python bench/logprob.py --device cpu          # CPU: tiny shapes -> results/logprob_cpu.json

The unfused side is the no-TP branch of `trainer/objective.logprobs_and_entropy`: one `log_softmax` over the
upcast [tokens, vocab] logits, gather, entropy. The fused side is `algo/fused_logprob.py` at a few chunk
sizes. Each is timed forward-only (the old-log-prob pass) and forward+backward of Σ w·logp (entropy as a
metric) and of Σ w·logp + Σ w'·H (entropy bonus). On CUDA, peak memory is torch.cuda.max_memory_allocated
above what the inputs already hold. On CPU the peak is not measured (tracemalloc does not see torch's
allocator): the JSON gives the analytical size of the largest fp32 buffer each side allocates instead.
Also reports the largest differences between the two sides (values in fp32, gradients in the logits' dtype).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from calibrl_mcore.algo.fused_logprob import chunked_logprobs_and_entropy  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
GPU_DEFAULTS = dict(tokens=4096, vocab=151936, chunks=[512, 1024, 2048])
CPU_DEFAULTS = dict(tokens=256, vocab=4096, chunks=[32, 128])

Side = Callable[[torch.Tensor, torch.Tensor, bool], tuple[torch.Tensor, torch.Tensor]]


def unfused(
    logits: torch.Tensor, labels: torch.Tensor, entropy_grad: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """objective.logprobs_and_entropy without TP: everything over the full fp32 [n, V] log-softmax."""
    log_probs = torch.log_softmax(logits.float(), dim=-1)  # [n, V] fp32
    logp = log_probs.gather(-1, labels[:, None]).squeeze(-1)
    with torch.set_grad_enabled(entropy_grad and torch.is_grad_enabled()):
        entropy = -(log_probs.exp() * log_probs).sum(dim=-1)
    return logp, entropy


def fused(chunk: int) -> Side:
    def side(logits: torch.Tensor, labels: torch.Tensor, entropy_grad: bool):
        return chunked_logprobs_and_entropy(logits, labels, chunk_size=chunk, entropy_grad=entropy_grad)

    return side


def run(side: Side, mode: str, x: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """One call in `mode` (forward | fwd_bwd | fwd_bwd_entropy); returns logp, entropy (and the gradient)."""
    if mode == "forward":
        with torch.no_grad():
            return side(x["logits"], x["labels"], False)
    logits = x["logits"].detach().requires_grad_(True)
    entropy_grad = mode == "fwd_bwd_entropy"
    logp, ent = side(logits, x["labels"], entropy_grad)
    loss = (x["w_logp"] * logp).sum() + ((x["w_ent"] * ent).sum() if entropy_grad else 0.0)
    loss.backward()
    return logp.detach(), ent.detach(), logits.grad


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(side: Side, mode: str, x: dict, repeats: int, device: torch.device) -> dict:
    """Median seconds over `repeats` (after one warm-up) and, on CUDA, peak GiB above the inputs."""
    run(side, mode, x)  # warm-up
    sync(device)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    clock = time.perf_counter if device.type == "cuda" else time.process_time
    times = []
    for _ in range(repeats):
        start = clock()
        out = run(side, mode, x)
        sync(device)
        times.append(clock() - start)
        del out
    result = {"median_s": statistics.median(times), "all_s": times}
    if device.type == "cuda":
        result["peak_extra_gib"] = (torch.cuda.max_memory_allocated() - base) / 2**30
    return result


def max_diffs(a: tuple[torch.Tensor, ...], b: tuple[torch.Tensor, ...]) -> dict[str, float]:
    names = ("logp", "entropy", "grad")
    return {
        n: (p.float() - q.float()).abs().max().item() if p.numel() else 0.0 for n, p, q in zip(names, a, b)
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tokens", type=int, default=None, help="default: 4096 on GPU, 256 on CPU")
    parser.add_argument("--vocab", type=int, default=None, help="default: 151936 on GPU, 4096 on CPU")
    parser.add_argument("--chunks", type=int, nargs="+", default=None, help="fused chunk sizes (tokens)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    device = torch.device(args.device)
    on_gpu = device.type == "cuda"
    if not on_gpu:
        torch.set_num_threads(1)
    defaults = GPU_DEFAULTS if on_gpu else CPU_DEFAULTS
    n, vocab = args.tokens or defaults["tokens"], args.vocab or defaults["vocab"]
    chunks = args.chunks or defaults["chunks"]
    out = args.out or Path(__file__).parent / "results" / ("logprob.json" if on_gpu else "logprob_cpu.json")

    g = torch.Generator().manual_seed(0)
    x = {  # logits ~ N(0, 2²): a spread like a trained LM head's
        "logits": (2 * torch.randn(n, vocab, generator=g)).to(device=device, dtype=DTYPES[args.dtype]),
        "labels": torch.randint(0, vocab, (n,), generator=g).to(device),
        "w_logp": torch.randn(n, generator=g).to(device),
        "w_ent": torch.randn(n, generator=g).to(device),
    }
    sides: dict[str, Side] = {"unfused": unfused, **{f"fused_chunk{c}": fused(c) for c in chunks}}
    modes = ("forward", "fwd_bwd", "fwd_bwd_entropy")
    results: dict[str, dict] = {name: {} for name in sides}
    for mode in modes:  # the sides back to back per mode, so machine drift hits them alike
        for name, side in sides.items():
            results[name][mode] = measure(side, mode, x, args.repeats, device)
    ref = run(unfused, "fwd_bwd_entropy", x)
    diffs = {
        name: max_diffs(run(side, "fwd_bwd_entropy", x), ref)
        for name, side in sides.items()
        if name != "unfused"
    }

    best = min(chunks, key=lambda c: results[f"fused_chunk{c}"]["fwd_bwd"]["median_s"])
    base, best_r = results["unfused"], results[f"fused_chunk{best}"]
    ratios = {f"{m}_speedup": base[m]["median_s"] / best_r[m]["median_s"] for m in modes}
    if on_gpu:
        ratios.update(
            {f"{m}_peak_ratio": best_r[m]["peak_extra_gib"] / base[m]["peak_extra_gib"] for m in modes}
        )
    fp32_bytes = {"unfused": n * vocab * 4, **{f"fused_chunk{c}": min(c, n) * vocab * 4 for c in chunks}}
    report = {
        "benchmark": "token log-prob + entropy: chunked fused vs unfused fp32 log_softmax",
        "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if on_gpu else None,
        "shape": {"tokens": n, "vocab": vocab, "dtype": args.dtype},
        "repeats": args.repeats,
        "time": "wall (median)" if on_gpu else "process CPU time, 1 thread (median)",
        "memory": "torch.cuda.max_memory_allocated above the inputs"
        if on_gpu
        else "not measured on CPU (tracemalloc does not see torch's allocator); see largest_fp32_buffer_bytes",
        "largest_fp32_buffer_bytes": fp32_bytes,
        "results": results,
        "best_chunk": best,
        "best_chunk_vs_unfused": ratios,
        "max_abs_diff_vs_unfused": diffs,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    for name in sides:
        row = ", ".join(
            f"{m} {results[name][m]['median_s'] * 1e3:.1f} ms"
            + (f" / {results[name][m]['peak_extra_gib']:.2f} GiB" if on_gpu else "")
            for m in modes
        )
        print(f"{name}: {row}")
    print(json.dumps({"best_chunk": best, **ratios, "max_abs_diff": diffs[f"fused_chunk{best}"]}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
