"""CalibRL's calibration term, agg(|A|·LeakyReLU_α(−s(ℓ − b))), as one cache-blocked autograd function.

Per token the term is a handful of elementwise steps. As separate PyTorch ops over [B, T] each step streams
the whole batch through memory once more, and autograd adds as many passes in backward plus a [B, T]
gradient for the aggregation: the term then cost about half as much again as the whole GRPO loss
(bench/losses.py). Here rows are processed in blocks of about `BLOCK_ELEMENTS` that stay in cache: the
forward pass reads ℓ, b and the mask once and writes only a 0/1 map of the LeakyReLU side; the aggregation
takes row sums per block (added in fp64); backward writes the gradient once, scaling two per-row slopes by the
aggregation's own gradient (`aggregate_grad`) instead of materialising a [B, T] one.

    value, damped, row_tokens = CalibrationTerm.apply(lp, b, sw, cal_mask, mask, alpha, norm)

`sw` [B, 1] = s·|A| (or s·rarity), `cal_mask` = the response mask (times the expert mask in the masked
variant), `mask` = the response mask (the aggregation's per-row denominators, as for every other term).
Returned with the value (for the metrics): the number of tokens on the damped side (all of them valid tokens
of rows with w > 0), and each row's valid tokens.
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
        # The side map is kept as 0/1 floats, not bools: on CPU, torch's bool kernels (compare into bool, bool x
        # float, bool sums) run several times slower than the float ones.
        full = torch.empty(batch, width, dtype=lp.dtype, device=lp.device)  # [B, T], 1 on the full-slope side
        row_sums = torch.empty(batch, dtype=lp.dtype, device=lp.device)  # [B]
        row_tokens = torch.empty(batch, dtype=lp.dtype, device=lp.device)  # [B]
        row_full = torch.empty(batch, dtype=lp.dtype, device=lp.device)  # [B]
        scratch = torch.empty(blocks[0].stop - blocks[0].start, width, dtype=lp.dtype, device=lp.device)  # [r, T]
        for rows in blocks:
            # (b − ℓ)·s·w, zero where masked: leaky(0) = 0, so the block's values need no second mask
            y = torch.sub(baseline[rows], lp[rows], out=scratch[: rows.stop - rows.start])  # [r, T]
            y.mul_(sw[rows]).mul_(cal_mask[rows])
            torch.sum(torch.ge(y, 0, out=full[rows]), dim=-1, out=row_full[rows])  # 1 on masked positions too
            # A row's sum is the same whichever data-parallel rank holds the row, so fp32 is enough here (no
            # cast of the block); rows are added in fp64 by the aggregation.
            torch.sum(F.leaky_relu_(y, alpha), dim=-1, out=row_sums[rows])
            torch.sum(cal_mask[rows], dim=-1, out=row_tokens[rows])
        # Damped-side tokens are valid tokens of pushed rows: zero-rarity rows and masked positions give y = 0,
        # the full side. Row counts are exact in fp32, their total in fp64.
        damped = float(full.numel()) - row_full.to(torch.float64).sum()
        ctx.save_for_backward(full, sw, cal_mask, mask)
        ctx.alpha, ctx.norm = alpha, norm
        ctx.mark_non_differentiable(damped, row_tokens)
        value = aggregate_row_sums(row_sums.to(torch.float64), mask, norm).to(lp.dtype)
        return value, damped, row_tokens

    @staticmethod
    def backward(ctx, grad_value: torch.Tensor, _grad_damped, _grad_row_tokens):
        full, sw, cal_mask, mask = ctx.saved_tensors
        scale = aggregate_grad(grad_value, mask, ctx.norm)  # [B, 1] or [1, 1]
        # d cal / d ℓ = −s·w on the full-slope side, −α·s·w on the damped side; 0 where masked
        slope_full, slope_damped = -sw * scale, (-ctx.alpha * sw) * scale  # [B, 1]
        grad = torch.empty_like(cal_mask)  # [B, T]
        for rows in _row_blocks(*grad.shape):
            # valid·full·s_full + valid·damped·s_damped: each token picks its slope exactly (x·1 + 0 = x), and
            # four float products beat one torch.where on a bool map (no fast CPU kernel)
            on_full = torch.mul(full[rows], cal_mask[rows])  # [r, T], 1 on valid full-side tokens
            on_damped = torch.sub(cal_mask[rows], on_full)  # [r, T], 1 on valid damped-side tokens
            torch.addcmul(on_full.mul_(slope_full[rows]), on_damped, slope_damped[rows], out=grad[rows])
        return grad, None, None, None, None, None, None
