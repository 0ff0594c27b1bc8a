"""Context parallelism (CP): how a sequence is split over the CP ranks, and the collectives that undo it.

Megatron's layout (the one Transformer Engine's CP attention and Megatron's RoPE slicing,
`rope_utils.get_pos_emb_on_this_cp_rank`, both assume): a sequence of length S is cut into 2·cp equal
chunks and CP rank r holds chunks r and 2·cp − 1 − r, concatenated. Under a causal mask the early chunks
are cheap and the late ones expensive, so pairing chunk r with its mirror gives every rank the same
attention work. S must be a multiple of 2·cp (`cp_pad_multiple`).

Where the split happens in this project:
  * the model (`VisionLanguageModel.embed`) merges image features into the *full* sequence first, then
    keeps this rank's chunks (`split_for_cp`); the vision tower itself is replicated over CP;
  * position ids stay full length: Megatron's (M-)RoPE computes the full table and slices it;
  * the SDPA core attention all-gathers K/V over CP (`gather_for_cp`, whose backward reduce-scatters);
  * the trainer slices labels, loss masks and per-token loss inputs the same way (`split_for_cp`), and
    gathers forward-only per-token outputs (old/expert log-probs) back to full length (`gather_from_cp`).

Everything here is the identity when CP is 1.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from torch import Tensor


def cp_group() -> dist.ProcessGroup | None:
    return parallel_state.get_context_parallel_group(check_initialized=False)


def cp_size_rank(group: dist.ProcessGroup | None = None) -> tuple[int, int]:
    """(CP size, CP rank); (1, 0) when parallel state is not initialised or CP is off."""
    group = group if group is not None else cp_group()
    if group is None:
        return 1, 0
    return group.size(), group.rank()


def cp_pad_multiple(cp_size: int | None = None) -> int:
    """Sequence lengths must be multiples of this (2·cp; 1 without CP)."""
    size = cp_size_rank()[0] if cp_size is None else cp_size
    return 1 if size == 1 else 2 * size


def local_chunks(cp_size: int, cp_rank: int) -> tuple[int, int]:
    """The two of 2·cp chunks that CP rank `cp_rank` holds."""
    return cp_rank, 2 * cp_size - 1 - cp_rank


def local_positions(seq_len: int, cp_size: int, cp_rank: int, device=None) -> Tensor:
    """Global positions of this rank's tokens, in local order: [seq_len / cp] long."""
    _check_divisible(seq_len, cp_size)
    c = seq_len // (2 * cp_size)
    first, second = local_chunks(cp_size, cp_rank)
    pos = torch.cat([torch.arange(first * c, (first + 1) * c), torch.arange(second * c, (second + 1) * c)])
    return pos.to(device) if device is not None else pos


def _check_divisible(seq_len: int, cp_size: int) -> None:
    if seq_len % (2 * cp_size):
        raise ValueError(
            f"sequence length {seq_len} is not a multiple of 2 x context_parallel_size = {2 * cp_size}: "
            "pad micro-batches to cp_pad_multiple()"
        )


def split_for_cp(t: Tensor, seq_dim: int, group: dist.ProcessGroup | None = None) -> Tensor:
    """Keep this CP rank's two chunks of `t` along `seq_dim` (a view-free copy; autograd flows through)."""
    size, rank = cp_size_rank(group)
    if size == 1:
        return t
    seq_len = t.shape[seq_dim]
    _check_divisible(seq_len, size)
    return t.index_select(seq_dim, local_positions(seq_len, size, rank, t.device))


def _restore_order(gathered: list[Tensor], seq_dim: int, size: int) -> Tensor:
    """Rank-ordered local shards [2 chunks each] -> the full sequence in natural chunk order."""
    chunks: list[Tensor | None] = [None] * (2 * size)
    for rank, shard in enumerate(gathered):
        a, b = shard.chunk(2, dim=seq_dim)
        first, second = local_chunks(size, rank)
        chunks[first], chunks[second] = a, b
    return torch.cat(chunks, dim=seq_dim)  # type: ignore[arg-type]


def _all_gather(t: Tensor, group: dist.ProcessGroup) -> list[Tensor]:
    out = [torch.empty_like(t) for _ in range(group.size())]
    dist.all_gather(out, t.contiguous(), group=group)
    return out


class _GatherForCP(torch.autograd.Function):
    """All-gather a CP-local tensor to full length (natural order); backward sums the full-length gradients
    of all CP ranks and returns this rank's chunks (a reduce-scatter)."""

    @staticmethod
    def forward(ctx, t: Tensor, seq_dim: int, group: dist.ProcessGroup) -> Tensor:
        ctx.seq_dim, ctx.group = seq_dim, group
        return _restore_order(_all_gather(t, group), seq_dim, group.size())

    @staticmethod
    def backward(ctx, grad: Tensor):
        grad = grad.contiguous()
        # gloo has no reduce-scatter: all-reduce, then keep this rank's chunks (same sums, more traffic).
        dist.all_reduce(grad, group=ctx.group)
        return split_for_cp(grad, ctx.seq_dim, ctx.group), None, None


def gather_for_cp(t: Tensor, seq_dim: int, group: dist.ProcessGroup | None = None) -> Tensor:
    """Differentiable all-gather of CP-local `t` to the full sequence along `seq_dim` (identity without CP)."""
    group = group if group is not None else cp_group()
    if group is None or group.size() == 1:
        return t
    return _GatherForCP.apply(t, seq_dim, group)


@torch.no_grad()
def gather_from_cp(t: Tensor, seq_dim: int, group: dist.ProcessGroup | None = None) -> Tensor:
    """Forward-only all-gather of CP-local `t` back to the full sequence (identity without CP)."""
    group = group if group is not None else cp_group()
    if group is None or group.size() == 1:
        return t
    return _restore_order(_all_gather(t, group), seq_dim, group.size())
