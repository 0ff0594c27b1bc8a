"""torchrun worker: chunked log-prob/entropy with the vocab split over TP ranks (Megatron's layout).

Every rank builds the same global logits [N, VOCAB] (seeded) and keeps its TP slice of the vocab
([rank·V/tp, (rank+1)·V/tp)). For each case it runs `chunked_logprobs_and_entropy` on the slice, backward
of a fixed weighted sum of log-probs (and entropy when it has a gradient), and writes the values and its
slice of the logits gradient. The test concatenates the slices and compares them with the unsharded
computation. Also writes Megatron's `vocab_parallel_cross_entropy` on the same slice, so the vocab
layout here is checked against Megatron's own.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
import torch.distributed as dist

N, VOCAB = 13, 48
CASES = [  # (name, dtype, chunk_size, entropy_grad, temperature)
    ("fp32_chunk5_entgrad", torch.float32, 5, True, 1.0),
    ("fp32_chunk64_noentgrad", torch.float32, 64, False, 1.0),
    ("fp32_chunk4_temp07", torch.float32, 4, True, 0.7),
    ("bf16_chunk3_entgrad", torch.bfloat16, 3, True, 1.0),
]


def make_case(
    dtype: torch.dtype, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Global logits [N, VOCAB] (dtype), labels [N], and loss weights for log-prob / entropy [N]."""
    g = torch.Generator().manual_seed(seed)
    logits = (3 * torch.randn(N, VOCAB, generator=g)).to(dtype)
    labels = torch.randint(0, VOCAB, (N,), generator=g)
    return logits, labels, torch.randn(N, generator=g), torch.randn(N, generator=g)


def run_case(logits, labels, w_logp, w_ent, chunk, entropy_grad, temperature, tp_group=None):
    """(logp, entropy, grad of logits) for one case; the loss is Σ w·logp (+ Σ w'·H with entropy grad)."""
    from calibrl_mcore.algo.fused_logprob import chunked_logprobs_and_entropy

    x = logits.clone().requires_grad_(True)
    logp, ent = chunked_logprobs_and_entropy(
        x, labels, chunk_size=chunk, tp_group=tp_group, entropy_grad=entropy_grad, temperature=temperature
    )
    loss = (w_logp * logp).sum() + ((w_ent * ent).sum() if entropy_grad else 0.0)
    loss.backward()
    return logp.detach(), ent.detach(), x.grad


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    from megatron.core import parallel_state, tensor_parallel

    from calibrl_mcore.parallel import ParallelConfig, destroy_distributed, init_distributed

    world = int(os.environ["WORLD_SIZE"])
    info = init_distributed(ParallelConfig(tensor_model_parallel_size=world, backend="gloo"))
    group = parallel_state.get_tensor_model_parallel_group()
    part = VOCAB // info.tp_size
    cols = slice(info.tp_rank * part, (info.tp_rank + 1) * part)
    result = {"rank": info.rank, "tp_rank": info.tp_rank, "tp_size": info.tp_size, "cases": {}}
    for name, dtype, chunk, entropy_grad, temperature in CASES:
        logits, labels, w_logp, w_ent = make_case(dtype)
        local = logits[:, cols].contiguous()
        logp, ent, grad = run_case(local, labels, w_logp, w_ent, chunk, entropy_grad, temperature, group)
        assert grad.dtype == dtype, grad.dtype
        megatron = -tensor_parallel.vocab_parallel_cross_entropy(local.float() / temperature, labels)
        result["cases"][name] = {
            "logp": logp.tolist(),
            "entropy": ent.tolist(),
            "grad_slice": grad.float().tolist(),
            "megatron_logp": megatron.tolist(),
        }
    # n = 0 under TP: no collective is issued, nothing hangs.
    empty_logp, _, empty_grad = run_case(
        torch.zeros(0, part),
        torch.zeros(0, dtype=torch.long),
        torch.zeros(0),
        torch.zeros(0),
        4,
        True,
        1.0,
        group,
    )
    result["empty_ok"] = empty_logp.shape == (0,) and empty_grad.shape == (0, part)
    dist.barrier()
    Path(args.out, f"rank{info.rank}.json").write_text(json.dumps(result))
    destroy_distributed()


if __name__ == "__main__":
    main()
