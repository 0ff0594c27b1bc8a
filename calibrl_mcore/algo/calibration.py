"""CalibRL's calibration term, agg(|A|·LeakyReLU_α(−s(ℓ − b))), as one cache-blocked autograd function.

Per token the term is a handful of elementwise steps. As separate PyTorch ops over [B, T] each step streams
the whole batch through memory once more, and autograd adds as many passes in backward plus a [B, T]
gradient for the aggregation: the term then cost about half as much again as the whole GRPO loss
(bench/losses.py). Here rows are processed in blocks of about `BLOCK_ELEMENTS` that stay in cache: the
forward pass reads ℓ, b and the mask once and writes only a bool map of the LeakyReLU side; the aggregation
takes fp64 row sums per block; backward writes the gradient once, scaling two per-row slopes by the
aggregation's own gradient (`aggregate_grad`) instead of materialising a [B, T] one.

    value, full_valid, row_tokens = CalibrationTerm.apply(lp, b, sw, cal_mask, mask, alpha, norm)

`sw` [B, 1] = s·|A| (or s·rarity), `cal_mask` = the response mask (times the expert mask in the masked
variant), `mask` = the response mask (the aggregation's per-row denominators, as for every other term).
Returned with the value: per row, the valid tokens on the full-slope side and the valid tokens (metrics).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from calibrl_mcore.algo.aggregation import LossNormalizer, aggregate_grad

BLOCK_ELEMENTS = 1 << 16  # 256 KB of fp32 per [rows, T] block: the block's few temporaries stay in L2


def _row_blocks(batch: int, width: int) -> list[slice]:
    rows = max(1, BLOCK_ELEMENTS // max(width, 1))
    return [slice(start, min(start + rows, batch)) for start in range(0, batch, rows)]


def aggregate_row_sums(row_sums: torch.Tensor, mask: torch.Tensor, norm: LossNormalizer) -> torch.Tensor:
    """`aggregate` from fp64 per-row sums of the masked values ([B] -> 0-dim fp64); `mask` [B, T] gives the
    row token counts of seq-mean-token-mean."""
    if norm.agg == "seq-mean-token-mean":
        row_tokens = mask.sum(dim=-1) if norm.row_tokens is None else norm.row_tokens.to(mask)
        return (row_sums / row_tokens.clamp(min=1)).sum() / norm.num_seqs
    if norm.agg == "token-mean":
        return row_sums.sum() / norm.num_tokens
    if norm.agg == "seq-mean-token-sum":
        return row_sums.sum() / norm.num_seqs
    return row_sums.sum() / (norm.num_seqs * norm.norm_length)


class CalibrationTerm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, lp: torch.Tensor, baseline: torch.Tensor, sw: torch.Tensor, cal_mask: torch.Tensor,
                mask: torch.Tensor, alpha: float, norm: LossNormalizer):
        batch, width = lp.shape
        blocks = _row_blocks(batch, width)
        full = torch.empty(batch, width, dtype=torch.bool, device=lp.device)  # [B, T]
        row_sums = torch.empty(batch, dtype=torch.float64, device=lp.device)  # [B]
        full_count = torch.empty(batch, dtype=torch.int64, device=lp.device)  # [B]
        row_tokens = torch.empty(batch, dtype=torch.float32, device=lp.device)  # [B]
        scratch = torch.empty(blocks[0].stop - blocks[0].start, width, dtype=lp.dtype, device=lp.device)  # [r, T]
        for rows in blocks:
            # (b − ℓ)·s·w, zero where masked: leaky(0) = 0, so the block's values need no second mask
            y = torch.sub(baseline[rows], lp[rows], out=scratch[: rows.stop - rows.start])  # [r, T]
            y.mul_(sw[rows]).mul_(cal_mask[rows])
            side = torch.ge(y, 0, out=full[rows])  # true on masked positions too
            torch.sum(F.leaky_relu_(y, alpha), dim=-1, dtype=torch.float64, out=row_sums[rows])
            torch.sum(cal_mask[rows], dim=-1, out=row_tokens[rows])
            torch.sum(side, dim=-1, out=full_count[rows])
        # masked positions count as full: subtract them (exact integer counts in fp32)
        full_valid = full_count.to(torch.float32) - (width - row_tokens)  # [B]
        ctx.save_for_backward(full, sw, cal_mask, mask)
        ctx.alpha, ctx.norm = alpha, norm
        ctx.mark_non_differentiable(full_valid, row_tokens)
        value = aggregate_row_sums(row_sums, mask, norm).to(lp.dtype)
        return value, full_valid, row_tokens

    @staticmethod
    def backward(ctx, grad_value: torch.Tensor, _grad_full_valid, _grad_row_tokens):
        full, sw, cal_mask, mask = ctx.saved_tensors
        scale = aggregate_grad(grad_value, mask, ctx.norm)  # [B, 1] or [1, 1]
        # d cal / d ℓ = −s·w on the full-slope side, −α·s·w on the damped side; 0 where masked
        slope_full, slope_damped = -sw * scale, (-ctx.alpha * sw) * scale  # [B, 1]
        grad = torch.empty_like(cal_mask)  # [B, T]
        for rows in _row_blocks(*grad.shape):
            torch.where(full[rows], slope_full[rows], slope_damped[rows], out=grad[rows]).mul_(cal_mask[rows])
        return grad, None, None, None, None, None, None
