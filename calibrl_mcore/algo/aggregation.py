"""Token → scalar aggregation with data-parallel-exact normalisers.

Every loss family reduces ``[B, T]`` per-token values with one of four modes (CALIBRL.md, "Loss"):

- ``token-mean``: Σ_tokens v / N_tokens                         (DAPO / CalibRL default)
- ``seq-mean-token-mean``: (1/N_seqs) Σ_seqs (Σ_t v / T_seq)      (original GRPO)
- ``seq-mean-token-sum``: (1/N_seqs) Σ_seqs Σ_t v
- ``seq-mean-token-sum-norm``: (1/N_seqs) Σ_seqs Σ_t v / L        (Dr. GRPO; L = a constant length)

The normalisers (N_tokens, N_seqs, L) belong to the whole *global mini-batch*: all micro-batches on all
data-parallel ranks. :func:`compute_loss_normalizer` computes them once (one all-reduce); each rank's
loss is then its own share, so that the shares summed over micro-batches and DP ranks equal the
single-process loss, and summed gradients equal the single-process gradient.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Literal, get_args

import torch
import torch.distributed as dist

AggMode = Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"]
AGG_MODES: tuple[str, ...] = get_args(AggMode)


def check_agg_mode(agg: str) -> None:
    if agg not in AGG_MODES:
        raise ValueError(f"agg={agg!r} is not a known aggregation mode; choose one of {list(AGG_MODES)}")


@dataclass(frozen=True)
class LossNormalizer:
    """Global (mini-batch × DP) denominators for one aggregation mode."""

    agg: str
    num_tokens: float
    """valid tokens in the global mini-batch"""
    num_seqs: float
    """rows with at least one valid token in the global mini-batch"""
    norm_length: float
    """L of seq-mean-token-sum-norm (the global max response length unless given)"""
    row_tokens: torch.Tensor | None = None
    """[B] valid tokens of each whole row, for seq-mean-token-mean when the values hold only part of each
    row (context parallelism); None = count them from the mask. Set per micro-batch with `for_rows`."""

    def for_rows(self, row_tokens: torch.Tensor | None) -> LossNormalizer:
        """This normaliser with the micro-batch's whole-row token counts (unchanged for None)."""
        return self if row_tokens is None else replace(self, row_tokens=row_tokens)


def _dp_active(dp_group: dist.ProcessGroup | None) -> bool:
    return dp_group is not None and dist.get_world_size(dp_group) > 1


def compute_loss_normalizer(
    response_masks: torch.Tensor | Sequence[torch.Tensor],
    agg: str = "token-mean",
    *,
    norm_length: int | None = None,
    dp_group: dist.ProcessGroup | None = None,
) -> LossNormalizer:
    """Denominators of ``agg`` over the given masks (one per micro-batch) and all DP ranks.

    Call once per mini-batch with all its micro-batches' ``[B, T]`` masks and pass the result to every
    loss call of that mini-batch (``normalizer=``). Empty totals are clamped to 1 so that a batch with
    no valid tokens yields a zero loss rather than NaN.
    """
    check_agg_mode(agg)
    masks = [response_masks] if isinstance(response_masks, torch.Tensor) else list(response_masks)
    if not masks:
        raise ValueError("response_masks is empty: pass at least one [B, T] mask")
    device = masks[0].device
    counts = torch.zeros(2, dtype=torch.float64, device=device)
    max_len = torch.zeros(1, dtype=torch.float64, device=device)
    for i, m in enumerate(masks):
        if m.dim() != 2:
            raise ValueError(f"response_masks[{i}] must be [B, T], got shape {tuple(m.shape)}")
        mf = m.to(torch.float64)
        counts[0] += mf.sum()
        counts[1] += (mf.sum(dim=-1) > 0).sum()
        max_len = torch.maximum(max_len, torch.tensor([float(m.shape[-1])], device=device))
    if _dp_active(dp_group):
        dist.all_reduce(counts, group=dp_group)
        if agg == "seq-mean-token-sum-norm" and norm_length is None:
            dist.all_reduce(max_len, op=dist.ReduceOp.MAX, group=dp_group)
    length = float(norm_length) if norm_length is not None else float(max_len)
    if length <= 0:
        raise ValueError(f"norm_length must be positive, got {norm_length}")
    return LossNormalizer(
        agg=agg,
        num_tokens=max(float(counts[0]), 1.0),
        num_seqs=max(float(counts[1]), 1.0),
        norm_length=length,
    )


def aggregate(values: torch.Tensor, mask: torch.Tensor, norm: LossNormalizer, *,
              premasked: bool = False) -> torch.Tensor:
    """This rank's share of ``agg(values)``; ``mask`` is the float ``[B, T]`` validity mask (``premasked``:
    ``values`` are already zero where it is 0).

    Sums accumulate in fp64: the terms have both signs, so an fp32 sum's rounding depends on the order,
    and a DP split (a different order) would then change the loss in the 6th digit.
    """
    masked = values if premasked else values * mask  # [B, T]
    if norm.agg == "seq-mean-token-mean":
        row_tokens = mask.sum(dim=-1) if norm.row_tokens is None else norm.row_tokens.to(mask)
        per_seq = masked.sum(dim=-1, dtype=torch.float64) / row_tokens.clamp(min=1)  # [B]
        total = per_seq.sum() / norm.num_seqs
    elif norm.agg == "token-mean":
        total = masked.sum(dtype=torch.float64) / norm.num_tokens
    elif norm.agg == "seq-mean-token-sum":
        total = masked.sum(dtype=torch.float64) / norm.num_seqs
    else:
        total = masked.sum(dtype=torch.float64) / (norm.num_seqs * norm.norm_length)
    return total.to(values.dtype)


def aggregate_grad(grad: torch.Tensor, mask: torch.Tensor, norm: LossNormalizer) -> torch.Tensor:
    """d aggregate(values) / d values as autograd forms it from the loss gradient `grad` (0-dim, the values'
    dtype), before the mask: [B, 1] for seq-mean-token-mean, else [1, 1]. Same operations in the same
    precision as autograd's chain (cast to fp64, the divisions, cast back), so the result is bit-identical;
    a custom autograd function can then scale per row instead of materialising a [B, T] gradient."""
    g = grad.detach().to(torch.float64)
    if norm.agg == "seq-mean-token-mean":
        row_tokens = mask.sum(dim=-1) if norm.row_tokens is None else norm.row_tokens.to(mask)
        per_row = (g / norm.num_seqs).expand(mask.shape[0]) / row_tokens.clamp(min=1)  # [B]
        return per_row.to(mask.dtype)[:, None]
    if norm.agg == "token-mean":
        scale = g / norm.num_tokens
    elif norm.agg == "seq-mean-token-sum":
        scale = g / norm.num_seqs
    else:
        scale = g / (norm.num_seqs * norm.norm_length)
    return scale.to(mask.dtype).reshape(1, 1)


def token_fraction(flags: torch.Tensor, mask: torch.Tensor, norm: LossNormalizer) -> torch.Tensor:
    """This rank's share of the fraction of all valid tokens where ``flags`` holds (a metric)."""
    return (flags.to(mask.dtype) * mask).sum().detach() / norm.num_tokens


def reduce_metrics(
    metrics: dict[str, torch.Tensor], dp_group: dist.ProcessGroup | None
) -> dict[str, torch.Tensor]:
    """Sum per-rank metric shares over DP in one all-reduce; returns detached 0-dim tensors."""
    if not metrics:
        return {}
    names = list(metrics)
    packed = torch.stack([metrics[k].detach().to(torch.float64).reshape(()) for k in names])
    if _dp_active(dp_group):
        dist.all_reduce(packed, group=dp_group)
    return dict(zip(names, packed.unbind(0)))
