"""Several experts per prompt: one baseline b_t from the experts' per-token log-probs, and gating of
experts that fail the verifier.

Experts have different lengths. At position t only the experts that still have a token there take part;
past every expert's length the baseline is 0 (the paper's default) and `valid` is False (the masked
variant uses it).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

EXPERT_AGGS = ("mean", "max", "logmeanexp")


def aggregate_expert_baselines(expert_logps: Sequence[torch.Tensor], mode: str = "mean") -> tuple[torch.Tensor, torch.Tensor]:
    """[T_k] log-prob vectors of K experts -> (baseline [T_max], valid [T_max] bool).

    mode: 'mean' (mean log-prob: a geometric-mean probability), 'max' (the most confident expert), or
    'logmeanexp' (log of the mean probability: a mixture of the experts).
    """
    if mode not in EXPERT_AGGS:
        raise ValueError(f"expert aggregation {mode!r} is not one of {list(EXPERT_AGGS)}")
    if not expert_logps:
        raise ValueError("expert_logps is empty: need at least one expert")
    length = max(int(e.numel()) for e in expert_logps)
    stacked = torch.zeros(len(expert_logps), length, dtype=torch.float32)  # [K, T]
    present = torch.zeros(len(expert_logps), length, dtype=torch.bool)
    for k, e in enumerate(expert_logps):
        stacked[k, : e.numel()] = e.float()
        present[k, : e.numel()] = True
    count = present.sum(0)  # [T]
    valid = count > 0
    if mode == "mean":
        base = (stacked * present).sum(0) / count.clamp(min=1)
    elif mode == "max":
        base = stacked.masked_fill(~present, float("-inf")).amax(0)
    else:
        lse = torch.logsumexp(stacked.masked_fill(~present, float("-inf")), dim=0)
        base = lse - torch.log(count.clamp(min=1).float())
    return torch.where(valid, base, torch.zeros_like(base)), valid


def expert_gate_weight(expert_accs: Sequence[float], policy: str, downweight: float) -> float:
    """Weight of a group's calibration term from its experts' verifier results.

    'none': 1. 'drop': 0 when no expert of the group passes the verifier. 'downweight': `downweight`
    when none passes. (With several experts, failing ones are also left out of the baseline.)
    """
    if policy == "none" or any(a >= 1.0 for a in expert_accs):
        return 1.0
    if policy == "drop":
        return 0.0
    if policy == "downweight":
        return downweight
    raise ValueError(f"expert gate {policy!r} is not one of none, drop, downweight")
