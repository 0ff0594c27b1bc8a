"""Policy losses of every family the trainer compares: GRPO, DAPO, LUFFY, RL-PLUS and CalibRL.

Shared conventions (one signature style for all families):
- token quantities are ``[B, T]`` (``logp`` carries the graph; everything else is treated as data and
  detached), row quantities are ``[B]``;
- ``response_mask`` ``[B, T]`` marks valid response tokens (bool or 0/1);
- ``agg`` selects the aggregation (see :mod:`calibrl_mcore.algo.aggregation`); ``normalizer`` carries the
  global mini-batch denominators when a mini-batch is split into micro-batches, else it is computed here
  from ``response_mask`` over ``dp_group``;
- optional regularisers: ``entropy`` ``[B, T]`` with ``entropy_coef`` (a bonus: subtracted) and
  ``ref_logp`` ``[B, T]`` with ``kl_coef`` (k3 estimator of KL(π‖π_ref), added);
- return ``(loss, metrics)``: ``loss`` is this rank's share (see aggregation), ``metrics`` are detached
  0-dim tensors already summed over ``dp_group``: summing them over the micro-batches of a mini-batch
  gives the mini-batch value.

All arithmetic runs in fp32 even for bf16 inputs (exp of bf16 log-ratios is too coarse); gradients flow
back into ``logp`` in its own dtype.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from calibrl_mcore.algo.aggregation import (
    LossNormalizer,
    aggregate,
    check_agg_mode,
    compute_loss_normalizer,
    reduce_metrics,
    token_fraction,
)
from calibrl_mcore.algo.calibration import CalibrationTerm

Metrics = dict[str, torch.Tensor]


# ----------------------------------------------------------------------------------------------------
# input checks


def _check_token(name: str, t: torch.Tensor, shape: torch.Size) -> None:
    if t.shape != shape:
        raise ValueError(f"{name} must have shape [B, T]={tuple(shape)} like logp, got {tuple(t.shape)}")


def _check_row(name: str, t: torch.Tensor, batch: int) -> None:
    if t.shape != (batch,):
        raise ValueError(f"{name} must have shape [B]=({batch},), got {tuple(t.shape)}")


def _prepare(
    logp: torch.Tensor,
    response_mask: torch.Tensor,
    tokens: dict[str, torch.Tensor | None],
    rows: dict[str, torch.Tensor | None],
    agg: str,
    normalizer: LossNormalizer | None,
    dp_group: dist.ProcessGroup | None,
) -> tuple[torch.Tensor, LossNormalizer]:
    """Validate shapes, return the fp32 mask and the (global) normaliser."""
    if logp.dim() != 2:
        raise ValueError(f"logp must be [B, T], got shape {tuple(logp.shape)}")
    check_agg_mode(agg)
    _check_token("response_mask", response_mask, logp.shape)
    for name, t in tokens.items():
        if t is not None:
            _check_token(name, t, logp.shape)
    for name, t in rows.items():
        if t is not None:
            _check_row(name, t, logp.shape[0])
    if normalizer is None:
        normalizer = compute_loss_normalizer(response_mask, agg, dp_group=dp_group)
    elif normalizer.agg != agg:
        raise ValueError(f"normalizer was computed for agg={normalizer.agg!r} but agg={agg!r}")
    return response_mask.to(torch.float32), normalizer


# ----------------------------------------------------------------------------------------------------
# shared per-token terms


@dataclass
class _ClippedPG:
    loss: torch.Tensor  # [B, T] per-token clipped policy-gradient loss
    log_ratio: torch.Tensor  # [B, T]
    clip_low: torch.Tensor  # [B, T] bool: A < 0 and ratio < 1 − ε_low
    clip_high: torch.Tensor  # [B, T] bool: A > 0 and ratio > 1 + ε_high
    dual: torch.Tensor  # [B, T] bool: dual clip −A·c active (A < 0)


def _clipped_pg(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    clip_low: float,
    clip_high: float,
    dual_clip: float | None,
) -> _ClippedPG:
    """PPO/GRPO clipped surrogate with optional dual clip (CALIBRL.md, Loss 1)."""
    log_ratio = logp - old_logp  # [B, T]
    ratio = torch.exp(log_ratio)
    neg_a = -advantages[:, None]  # [B, 1]
    unclipped = neg_a * ratio
    clipped = neg_a * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    loss = torch.maximum(unclipped, clipped)
    clip_active = clipped > unclipped
    if dual_clip is not None:
        if dual_clip <= 1.0:
            raise ValueError(f"dual_clip must be > 1 (or None to disable), got {dual_clip}")
        dual_bound = neg_a * dual_clip  # [B, 1], > 0 where A < 0
        dual = (neg_a > 0) & (loss > dual_bound)
        loss = torch.where(dual, dual_bound, loss)
    else:
        dual = torch.zeros_like(clip_active)
    return _ClippedPG(
        loss=loss,
        log_ratio=log_ratio,
        clip_low=clip_active & (neg_a > 0),
        clip_high=clip_active & (neg_a < 0),
        dual=dual,
    )


def _finish(
    terms: dict[str, tuple[float, torch.Tensor]],
    mask: torch.Tensor,
    norm: LossNormalizer,
    metrics: Metrics,
    *,
    entropy: torch.Tensor | None,
    entropy_coef: float,
    ref_logp: torch.Tensor | None,
    logp: torch.Tensor,
    kl_coef: float,
    dp_group: dist.ProcessGroup | None,
) -> tuple[torch.Tensor, Metrics]:
    """Aggregate the weighted per-token terms (+ regularisers) and reduce the metrics over DP."""
    if entropy is not None:
        terms["entropy"] = (-entropy_coef, entropy.float())
    if ref_logp is not None:
        delta = ref_logp.detach().float() - logp  # log π_ref − log π
        terms["kl"] = (kl_coef, torch.exp(delta) - delta - 1.0)  # k3 ≥ 0, unbiased for KL(π‖π_ref)
    loss = logp.new_zeros((), dtype=torch.float32)
    for name, (coef, values) in terms.items():
        value = values if values.dim() == 0 else aggregate(values, mask, norm)  # 0-dim: aggregated already
        metrics[f"{name}_loss" if name in ("pg", "cal", "off_policy") else name] = value.detach()
        if coef != 0.0:
            loss = loss + coef * value
    metrics["loss"] = loss.detach()
    return loss, reduce_metrics(metrics, dp_group)


def _ratio_metrics(pg: _ClippedPG, mask: torch.Tensor, norm: LossNormalizer) -> Metrics:
    k3 = torch.exp(pg.log_ratio.detach()) - 1.0 - pg.log_ratio.detach()  # ≥ 0, estimates KL(π_old‖π)
    return {
        "clip_frac_low": token_fraction(pg.clip_low, mask, norm),
        "clip_frac_high": token_fraction(pg.clip_high, mask, norm),
        "clip_frac_dual": token_fraction(pg.dual, mask, norm),
        "approx_kl": (k3 * mask).sum() / norm.num_tokens,
    }


# ----------------------------------------------------------------------------------------------------
# loss families


def grpo_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    dual_clip: float | None = 3.0,
    agg: str = "token-mean",
    normalizer: LossNormalizer | None = None,
    entropy: torch.Tensor | None = None,
    entropy_coef: float = 0.0,
    ref_logp: torch.Tensor | None = None,
    kl_coef: float = 0.0,
    dp_group: dist.ProcessGroup | None = None,
) -> tuple[torch.Tensor, Metrics]:
    """GRPO/PPO clipped policy-gradient loss on on-policy rows (CALIBRL.md, Loss 1)."""
    mask, norm = _prepare(
        logp, response_mask, {"old_logp": old_logp, "entropy": entropy, "ref_logp": ref_logp},
        {"advantages": advantages}, agg, normalizer, dp_group,
    )
    lp = logp.float()
    pg = _clipped_pg(lp, old_logp.detach().float(), advantages.detach().float(), clip_low, clip_high, dual_clip)
    return _finish(
        {"pg": (1.0, pg.loss)}, mask, norm, _ratio_metrics(pg, mask, norm),
        entropy=entropy, entropy_coef=entropy_coef, ref_logp=ref_logp, logp=lp, kl_coef=kl_coef,
        dp_group=dp_group,
    )


def dapo_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    clip_low: float = 0.2,
    clip_high: float = 0.28,
    dual_clip: float | None = 3.0,
    agg: str = "token-mean",
    **kwargs,
) -> tuple[torch.Tensor, Metrics]:
    """DAPO's loss: GRPO with clip-higher (ε_high = 0.28) and token-mean aggregation.

    Its other two ingredients act on the data, not the loss: see :mod:`calibrl_mcore.algo.dapo`
    (dynamic sampling, overlong penalty).
    """
    return grpo_loss(
        logp, old_logp, advantages, response_mask,
        clip_low=clip_low, clip_high=clip_high, dual_clip=dual_clip, agg=agg, **kwargs,
    )


def calibrl_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    expert_logp: torch.Tensor,
    advantages: torch.Tensor,
    passed: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    alpha: float = 0.5,
    lam: float = 0.1,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    dual_clip: float | None = 3.0,
    agg: str = "token-mean",
    expert_mask: torch.Tensor | None = None,
    rarity: torch.Tensor | None = None,
    normalizer: LossNormalizer | None = None,
    entropy: torch.Tensor | None = None,
    entropy_coef: float = 0.0,
    ref_logp: torch.Tensor | None = None,
    kl_coef: float = 0.0,
    dp_group: dist.ProcessGroup | None = None,
) -> tuple[torch.Tensor, Metrics]:
    """CalibRL: clipped PG + λ · |A| · LeakyReLU_α(−s (log π − b)) (CALIBRL.md, Loss 2–3).

    Args:
        expert_logp: ``[B, T]`` b_t, the old policy's log-prob of the row's group expert token at the
            same position t; 0 where t is past the expert's length (the paper's behaviour).
        passed: ``[B]`` bool, s = +1 for passing rows, −1 otherwise.
        expert_mask: optional ``[B, T]``; where given, positions outside it get no calibration term
            (the "masked" variant). The normaliser stays the on-policy token count, so λ keeps its scale.
        rarity: ``[B]`` weights; defaults to |advantages|.
    """
    mask, norm = _prepare(
        logp, response_mask,
        {"old_logp": old_logp, "expert_logp": expert_logp, "expert_mask": expert_mask, "entropy": entropy,
         "ref_logp": ref_logp},
        {"advantages": advantages, "passed": passed, "rarity": rarity}, agg, normalizer, dp_group,
    )
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha (LeakyReLU slope) must be in [0, 1], got {alpha}")
    lp = logp.float()
    adv = advantages.detach().float()
    pg = _clipped_pg(lp, old_logp.detach().float(), adv, clip_low, clip_high, dual_clip)

    weight = adv.abs() if rarity is None else rarity.detach().float()  # [B], ≥ 0
    sign = passed.to(torch.float32) * 2.0 - 1.0  # [B], s ∈ {+1, −1}
    # |A|·LeakyReLU(x) == LeakyReLU(|A|·x) for |A| ≥ 0, so weight and sign fold into one [B, 1] factor.
    cal_mask = mask if expert_mask is None else mask * expert_mask.to(torch.float32)
    cal, damped, row_tokens = CalibrationTerm.apply(
        lp, expert_logp.detach().float(), (sign * weight)[:, None], cal_mask, mask, alpha, norm)

    metrics = _ratio_metrics(pg, mask, norm)
    # Side of the LeakyReLU each pushed token is on (for w > 0, the sign of −s(ℓ − b)); tokens of zero-rarity
    # rows get no push and count in neither fraction.
    pushed_tokens = ((weight > 0).to(torch.float64) * row_tokens.to(torch.float64)).sum()  # exact counts
    metrics["leaky_pos_frac"] = ((pushed_tokens - damped) / norm.num_tokens).to(torch.float32)
    metrics["leaky_neg_frac"] = (damped / norm.num_tokens).to(torch.float32)
    # The calibration weight |A|·T per row, split by push direction (failing rows are pushed down): at low pass
    # rates most of it pushes down, since groups that all fail but differ in format have |A| > 0.
    mass = weight * row_tokens.to(torch.float32)  # [B]
    up = passed.to(torch.float32)
    metrics["cal_mass_up"] = (mass * up).sum() / norm.num_tokens
    metrics["cal_mass_down"] = (mass * (1.0 - up)).sum() / norm.num_tokens
    return _finish(
        {"pg": (1.0, pg.loss), "cal": (lam, cal)}, mask, norm, metrics,
        entropy=entropy, entropy_coef=entropy_coef, ref_logp=ref_logp, logp=lp, kl_coef=kl_coef,
        dp_group=dp_group,
    )


def _hybrid_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    is_expert: torch.Tensor,
    off_policy_token_loss,
    *,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    dual_clip: float | None = 3.0,
    agg: str = "token-mean",
    normalizer: LossNormalizer | None = None,
    entropy: torch.Tensor | None = None,
    entropy_coef: float = 0.0,
    ref_logp: torch.Tensor | None = None,
    kl_coef: float = 0.0,
    dp_group: dist.ProcessGroup | None = None,
) -> tuple[torch.Tensor, Metrics]:
    """On-policy rows: clipped PG; expert rows: ``off_policy_token_loss(logp, old_logp, adv)``.

    Both kinds of rows share one normaliser (all valid tokens of the mini-batch), as in LUFFY.
    """
    mask, norm = _prepare(
        logp, response_mask, {"old_logp": old_logp, "entropy": entropy, "ref_logp": ref_logp},
        {"advantages": advantages, "is_expert": is_expert}, agg, normalizer, dp_group,
    )
    if is_expert.dtype != torch.bool:
        raise ValueError(f"is_expert must be a bool tensor, got dtype {is_expert.dtype}")
    lp = logp.float()
    old = old_logp.detach().float()
    adv = advantages.detach().float()
    pg = _clipped_pg(lp, old, adv, clip_low, clip_high, dual_clip)
    expert_rows = is_expert[:, None]  # [B, 1]
    on_mask = mask * (~expert_rows).float()
    off_mask = mask * expert_rows.float()
    off = off_policy_token_loss(lp, old, adv[:, None])
    metrics = _ratio_metrics(pg, on_mask, norm)
    metrics["off_policy_token_frac"] = off_mask.sum() / norm.num_tokens
    return _finish(
        {"pg": (1.0, pg.loss * on_mask), "off_policy": (1.0, off * off_mask)}, mask, norm, metrics,
        entropy=entropy, entropy_coef=entropy_coef, ref_logp=ref_logp, logp=lp, kl_coef=kl_coef,
        dp_group=dp_group,
    )


def luffy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    is_expert: torch.Tensor,
    *,
    gamma: float = 0.1,
    **options,
) -> tuple[torch.Tensor, Metrics]:
    """LUFFY: expert rows trained off-policy with policy shaping −A_e · π/(π + γ), π = exp(log π).

    ``advantages`` should come from :func:`compute_group_advantages` with ``include_expert_in_stats``.
    ``options``: clip_low, clip_high, dual_clip, agg, normalizer, entropy, entropy_coef, ref_logp, kl_coef,
    dp_group, with the meanings and defaults of :func:`grpo_loss`.
    """
    if gamma <= 0:
        raise ValueError(f"gamma must be > 0, got {gamma}")

    def shaped(lp: torch.Tensor, old: torch.Tensor, adv: torch.Tensor) -> torch.Tensor:
        prob = torch.exp(lp)
        return -adv * prob / (prob + gamma)

    return _hybrid_loss(logp, old_logp, advantages, response_mask, is_expert, shaped, **options)


def rlplus_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    is_expert: torch.Tensor,
    *,
    exploration_exponent: float = 0.5,
    **options,
) -> tuple[torch.Tensor, Metrics]:
    """RL-PLUS: expert tokens use the mixed importance ratio 2π / (π_old + ½(π_old + 1)), weighted by the
    exploration factor (1 − π)^κ (κ = 0.5, detached): loss = −A_e · (1 − π)^κ · ratio.
    ``options`` as in :func:`luffy_loss`.
    """

    def mixed_ratio(lp: torch.Tensor, old: torch.Tensor, adv: torch.Tensor) -> torch.Tensor:
        prob = torch.exp(lp)
        prob_old = torch.exp(old)
        ratio = 2.0 * prob / (prob_old + 0.5 * (prob_old + 1.0))
        explore = (1.0 - prob.detach()).clamp(min=0.0) ** exploration_exponent
        return -adv * explore * ratio

    return _hybrid_loss(logp, old_logp, advantages, response_mask, is_expert, mixed_ratio, **options)


LOSS_FNS = {
    "grpo": grpo_loss,
    "dapo": dapo_loss,
    "calibrl": calibrl_loss,
    "luffy": luffy_loss,
    "rlplus": rlplus_loss,
}
