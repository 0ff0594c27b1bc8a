"""DAPO's data-side ingredients: dynamic sampling (drop all-equal groups) and the soft overlong penalty.

The loss side of DAPO (clip-higher, token-mean) is :func:`calibrl_mcore.algo.losses.dapo_loss`.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from calibrl_mcore.algo.advantages import compute_group_advantages


def dynamic_sampling_keep_mask(
    rewards: torch.Tensor,
    group_ids: torch.Tensor,
    is_expert: torch.Tensor,
    *,
    dp_group: dist.ProcessGroup | None = None,
) -> torch.Tensor:
    """``[N]`` bool: keep rows whose group's on-policy rewards are *not* all equal.

    Groups where every rollout gets the same reward have zero advantage and only dilute the batch;
    DAPO drops them and refills the batch with new prompts (the refill is the trainer's job). Groups
    split over DP ranks are judged on their global statistics.
    """
    stats = compute_group_advantages(rewards, group_ids, is_expert, dp_group=dp_group)
    return ~stats.all_equal


def overlong_penalty(
    response_lengths: torch.Tensor, max_length: int, buffer_length: int, penalty_factor: float = 1.0
) -> torch.Tensor:
    """DAPO's soft overlong punishment added to the reward, ``[N]``.

    0 up to ``max_length − buffer_length``; then linear down to −penalty_factor at ``max_length``;
    −penalty_factor beyond.
    """
    if not 0 < buffer_length <= max_length:
        raise ValueError(f"buffer_length must be in (0, max_length={max_length}], got {buffer_length}")
    lengths = response_lengths.to(torch.float32)
    start = max_length - buffer_length
    ramp = (start - lengths) / buffer_length * penalty_factor  # ≤ 0 past start
    penalty = torch.where(lengths <= start, torch.zeros_like(lengths), ramp)
    return penalty.clamp(min=-penalty_factor)
