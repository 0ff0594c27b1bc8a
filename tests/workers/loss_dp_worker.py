"""torchrun worker: advantages + every loss family on a data set whose groups are split over DP ranks.

Each rank takes every world_size-th row of a shuffled global batch, so groups straddle ranks in
arbitrary order. Writes its loss shares, metrics, and per-row advantages/gradients keyed by global row id.
"""

from __future__ import annotations

import argparse
import json
import os

import torch
import torch.distributed as dist

from calibrl_mcore.algo.advantages import compute_group_advantages
from calibrl_mcore.algo.aggregation import AGG_MODES
from calibrl_mcore.algo.losses import calibrl_loss, grpo_loss, luffy_loss, rlplus_loss

N_GROUPS, G, T = 8, 5, 12


def global_batch():
    g = torch.Generator().manual_seed(1234)
    ids = torch.randint(0, 10**12, (N_GROUPS,), generator=g)
    rows = N_GROUPS * (G + 1)
    group_ids = ids.repeat_interleave(G + 1)
    is_expert = torch.tensor(([False] * G + [True]) * N_GROUPS)
    acc = (torch.rand(rows, generator=g) < 0.5).double()
    fmt = (torch.rand(rows, generator=g) < 0.8).double()
    rewards = (acc + 0.1 * fmt).float()
    rewards[is_expert] = 1.1
    old = -torch.rand(rows, T, generator=g) * 3 - 0.05
    logp = (old + 0.4 * torch.randn(rows, T, generator=g)).clamp(max=-1e-3)
    lengths = torch.randint(1, T + 1, (rows,), generator=g)
    mask = torch.arange(T)[None, :] < lengths[:, None]
    expert_logp_per_group = -torch.rand(N_GROUPS, T, generator=g) * 3
    expert_logp = expert_logp_per_group.repeat_interleave(G + 1, dim=0)
    perm = torch.randperm(rows, generator=g)
    return {k: v[perm] for k, v in dict(
        row_id=torch.arange(rows), group_ids=group_ids, is_expert=is_expert, rewards=rewards, old=old,
        logp=logp, mask=mask, expert_logp=expert_logp).items()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    group = dist.group.WORLD
    data = {k: v[rank::world] for k, v in global_batch().items()}

    result = {"rank": rank, "world": world, "cases": {}}
    for include_expert in (False, True):
        stats = compute_group_advantages(data["rewards"], data["group_ids"], data["is_expert"],
                                         include_expert_in_stats=include_expert, dp_group=group)
        result[f"adv_include_expert={include_expert}"] = dict(zip(
            data["row_id"].tolist(), stats.advantages.tolist()))
        on = ~data["is_expert"]
        for agg in AGG_MODES:
            for family in (("luffy", "rlplus") if include_expert else ("grpo", "calibrl")):
                rows = slice(None) if include_expert else on
                logp = data["logp"][rows].clone().requires_grad_(True)
                common = dict(agg=agg, dp_group=group)
                if family == "grpo":
                    loss, m = grpo_loss(logp, data["old"][rows], stats.advantages[rows], data["mask"][rows],
                                        **common)
                elif family == "calibrl":
                    loss, m = calibrl_loss(logp, data["old"][rows], data["expert_logp"][rows],
                                           stats.advantages[rows], stats.passed[rows], data["mask"][rows],
                                           **common)
                else:
                    fn = luffy_loss if family == "luffy" else rlplus_loss
                    loss, m = fn(logp, data["old"][rows], stats.advantages[rows], data["mask"][rows],
                                 data["is_expert"][rows], **common)
                loss.backward()
                ids = data["row_id"][rows].tolist()
                result["cases"][f"{family}/{agg}"] = {
                    "loss_share": loss.item(),
                    "metrics": {k: v.item() for k, v in m.items()},
                    "grads": dict(zip(ids, logp.grad.tolist())),
                }
    with open(os.path.join(args.out, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
