"""Group statistics ("rarity") for GRPO-style advantages, exact under data parallelism.

A prompt's group = its G on-policy rollouts (+ the expert row, which is *not* part of the statistics
by default but receives its group's values). The trainer may spread one group's rows over several
data-parallel ranks, in any order; each rank then holds only part of the group. We make every rank see
the statistics one process would see by all-reducing per-group sufficient statistics
(Σr, Σr², Σpass, count) keyed by group id over the DP group.

Group ids are arbitrary int64 labels. To reduce them across ranks we first agree on the global sorted
set of ids (one all-gather of each rank's unique ids), then scatter local sums into that dense index
space and all-reduce once. Everything is vectorised: no Python loop over groups or rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

PASS_THRESHOLD = 0.1  # r = acc + 0.1·fmt, so only acc = 1 passes


@dataclass
class GroupAdvantages:
    """Per-row outputs of :func:`compute_group_advantages` (all tensors are ``[N]``)."""

    advantages: torch.Tensor
    """A_i = r_i − mean_r (or divided by std_r + eps with ``norm_by_std``); expert rows get r_e − mean_r."""
    rarity: torch.Tensor
    """|A_i|: the CalibRL exploration weight; 0 for groups whose on-policy rewards all agree."""
    passed: torch.Tensor
    """bool, r_i > pass_threshold."""
    group_mean: torch.Tensor
    """mean of the row's group rewards (statistic rows only)."""
    group_std: torch.Tensor
    """std of the row's group rewards, Bessel-corrected (n−1) like GRPO references; 0 for n = 1."""
    group_pass_rate: torch.Tensor
    """fraction of the group's statistic rows that pass."""
    group_size: torch.Tensor
    """number of statistic rows in the row's group, over all DP ranks (int64)."""

    @property
    def all_equal(self) -> torch.Tensor:
        """bool: the row's group has zero reward spread (no learning signal for GRPO)."""
        return self.group_std == 0


def _check_inputs(rewards: torch.Tensor, group_ids: torch.Tensor, is_expert: torch.Tensor) -> None:
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D [N], got shape {tuple(rewards.shape)}")
    n = rewards.shape[0]
    for name, t in (("group_ids", group_ids), ("is_expert", is_expert)):
        if t.shape != (n,):
            raise ValueError(f"{name} must have shape [N]=({n},) like rewards, got {tuple(t.shape)}")
    if n == 0:
        raise ValueError("rewards is empty: every rank needs at least one row (got N=0)")
    if not rewards.is_floating_point():
        raise ValueError(f"rewards must be a floating tensor, got dtype {rewards.dtype}")
    if group_ids.is_floating_point() or group_ids.dtype == torch.bool:
        raise ValueError(f"group_ids must be an integer tensor, got dtype {group_ids.dtype}")
    if is_expert.dtype != torch.bool:
        raise ValueError(f"is_expert must be a bool tensor, got dtype {is_expert.dtype}")
    bad = ~torch.isfinite(rewards)
    if bad.any():
        rows = bad.nonzero().flatten()[:8].tolist()
        raise ValueError(f"rewards contains NaN/inf at rows {rows} (group ids {group_ids[rows].tolist()})")


def _global_group_index(
    group_ids: torch.Tensor, dp_group: dist.ProcessGroup | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Map local group ids to a dense index over the union of ids on all DP ranks.

    Returns ``(global_ids [K], index [N])`` with ``global_ids[index] == group_ids``.
    """
    local_ids = torch.unique(group_ids.long())  # sorted
    if dp_group is None or dist.get_world_size(dp_group) == 1:
        return local_ids, torch.searchsorted(local_ids, group_ids.long())
    world = dist.get_world_size(dp_group)
    # Ranks hold different numbers of groups: gather sizes, pad to the max, gather, drop padding.
    size = torch.tensor([local_ids.numel()], dtype=torch.long, device=group_ids.device)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    dist.all_gather(sizes, size, group=dp_group)
    max_k = int(torch.stack(sizes).max())
    padded = torch.zeros(max_k, dtype=torch.long, device=group_ids.device)
    padded[: local_ids.numel()] = local_ids
    gathered = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(gathered, padded, group=dp_group)
    valid = torch.cat([g[: int(s)] for g, s in zip(gathered, sizes)])
    global_ids = torch.unique(valid)
    return global_ids, torch.searchsorted(global_ids, group_ids.long())


def compute_group_advantages(
    rewards: torch.Tensor,
    group_ids: torch.Tensor,
    is_expert: torch.Tensor,
    *,
    norm_by_std: bool = False,
    pass_threshold: float = PASS_THRESHOLD,
    include_expert_in_stats: bool = False,
    eps: float = 1e-6,
    dp_group: dist.ProcessGroup | None = None,
) -> GroupAdvantages:
    """Group-relative advantages and rarity weights, identical for any split of groups over DP ranks.

    Args:
        rewards: ``[N]`` scalar reward per row (float; NaN/inf is an error naming the rows).
        group_ids: ``[N]`` int64 prompt-group label per row; arbitrary values, rows in any order.
        is_expert: ``[N]`` bool, True for expert (off-policy) rows. They are excluded from the statistics
            unless ``include_expert_in_stats`` (LUFFY / RL-PLUS put the expert in the group).
        norm_by_std: GRPO's A = (r − mean)/(std + eps); CalibRL's default is the plain difference.
        pass_threshold: a row passes when r > threshold.
        dp_group: data-parallel process group over which a group's rows may be spread.
    """
    _check_inputs(rewards, group_ids, is_expert)
    in_stats = torch.ones_like(is_expert) if include_expert_in_stats else ~is_expert
    r = rewards.double()  # sums of squares in fp64: var = E[r²] − E[r]² must not cancel badly
    passed = rewards > pass_threshold

    global_ids, index = _global_group_index(group_ids, dp_group)
    w = in_stats.double()
    # [K, 4] sufficient statistics per group: Σr, Σr², Σpass, count (statistic rows only).
    sums = torch.zeros(global_ids.numel(), 4, dtype=torch.float64, device=rewards.device)
    sums.index_add_(0, index, torch.stack([r * w, r * r * w, passed.double() * w, w], dim=1))
    if dp_group is not None and dist.get_world_size(dp_group) > 1:
        dist.all_reduce(sums, group=dp_group)

    sum_r, sum_r2, sum_pass, count = sums.unbind(dim=1)
    present = torch.zeros(global_ids.numel(), dtype=torch.bool, device=rewards.device)
    present[index] = True
    empty = present & (count == 0)
    if empty.any():
        ids = global_ids[empty][:8].tolist()
        raise ValueError(
            f"group_ids {ids} have no on-policy rows (only an expert row): every group needs at least one "
            "rollout; drop such groups before computing advantages"
        )
    safe_n = count.clamp(min=1)
    mean = sum_r / safe_n
    # Bessel-corrected variance from the sums; clamp tiny negatives from rounding.
    var = ((sum_r2 - sum_r * mean) / (count - 1).clamp(min=1)).clamp(min=0)
    std = torch.where(count > 1, var.sqrt(), torch.zeros_like(var))
    # Exact zero spread when all rewards agree (the fp64 formula can leave ~1e-17 residue).
    std = torch.where(var <= 1e-12 * (1 + mean.abs()), torch.zeros_like(std), std)

    row_mean, row_std = mean[index], std[index]
    adv = r - row_mean
    if norm_by_std:
        # A zero-spread group is left unnormalised: dividing by eps would blow up its expert row.
        adv = torch.where(row_std > 0, adv / (row_std + eps), adv)
    # Statistic rows of an all-agree group carry no signal: exact zeros rather than rounding noise
    # (mean of three 0.1s is not exactly 0.1). An expert row keeps r_e − mean: it may disagree.
    adv = torch.where((row_std == 0) & in_stats, torch.zeros_like(adv), adv)
    dtype = rewards.dtype
    return GroupAdvantages(
        advantages=adv.to(dtype),
        rarity=adv.abs().to(dtype),
        passed=passed,
        group_mean=row_mean.to(dtype),
        group_std=row_std.to(dtype),
        group_pass_rate=(sum_pass / safe_n)[index].to(dtype),
        group_size=count[index].long(),
    )
