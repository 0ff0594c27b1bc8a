"""Pipeline stages in the planner: per-stage costs and the split of decoder layers that balances them.

What a stage holds beyond its decoder layers: stage 0 the embedding and the whole vision tower (its FLOPs run
at `vision_mfu`, replicated over CP, and its activations stay there), the last stage the LM head (6·V·h
FLOPs per token) and the logits. Per stage, parameters and compute are linear in the stage's decoder layers
(`StageCost`). A 1F1B pipeline over m micro-batches takes (Σ_i T_i + (m − 1)·max_i T_i) / m, T_i = stage i's
compute for the whole pass (`pipelined_s`; all equal: the classic (m + p − 1) / m bubble). Σ_i T_i does not
depend on the split, so the fullest stage sets the pace: an even split of a VL model leaves the middle
stages waiting for stage 0's ViT and the last stage's LM head.

`choose_split` searches Megatron's uneven splits (`model_providers.pipeline_split`: the first and last stage
free, the middle stages equal): for each middle count k it tries the first/last counts that balance the end
stages against each other, and keeps the split with the smallest slowest stage among those whose worst-stage
training memory is no larger than the reference split's (the even one, or the layer-balanced one when PP
does not divide the layers), so the rollout engine's KV cache never shrinks for it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from model_providers.pipeline_split import EVEN, PipelineSplit, balanced_split


@dataclass(frozen=True)
class StageCost:
    """A per-stage quantity linear in the stage's decoder layers: n_i · per_layer, plus `first` on stage 0
    and `last` on the last stage (both on the one stage at PP = 1)."""

    per_layer: float
    first: float = 0.0
    last: float = 0.0

    def stages(self, layers: Sequence[int]) -> list[float]:
        out = [n * self.per_layer for n in layers]
        out[0] += self.first
        out[-1] += self.last
        return out


def pipelined_s(stage_s: Sequence[float], micro_batches: int) -> float:
    """1F1B over `micro_batches` with stage i computing `stage_s[i]` for the whole pass (see module doc)."""
    m = max(micro_batches, 1)
    return (sum(stage_s) + (m - 1) * max(stage_s)) / m


def balancing_splits(layers: int, pp: int, compute: StageCost) -> list[PipelineSplit]:
    """The even split (when PP divides the layers) and, per middle-stage count k, the first-stage counts
    nearest to making the first and last stages equally slow (k is unused at PP = 2)."""
    if pp == 1:
        return [EVEN]
    found = {EVEN} if layers % pp == 0 else set()
    tilt = (compute.last - compute.first) / compute.per_layer if compute.per_layer else 0.0
    for k in ([0] if pp == 2 else range(1, (layers - 2) // (pp - 2) + 1)):
        ends = layers - k * (pp - 2)  # first + last
        if ends < 2:
            continue
        centre = (ends + tilt) / 2  # first·τ + e_first = (ends − first)·τ + e_last
        for first in {int(centre) - 1, int(centre), int(centre) + 1}:
            first = min(max(first, 1), ends - 1)
            counts = [first] + [k] * (pp - 2) + [ends - first]
            found.add(PipelineSplit.from_stage_layers(counts))
    return sorted(found, key=lambda s: (s.uneven, s.first or 0, s.last or 0))


def choose_split(layers: int, pp: int, compute: StageCost, memory: Callable[[PipelineSplit], float]) -> PipelineSplit:
    """The split whose slowest stage (`compute`) is fastest, among those needing no more worst-stage memory
    (`memory(split)`, bytes) than the even split, or the layer-balanced one when PP does not divide `layers`."""
    if pp == 1:
        return EVEN
    reference = EVEN if layers % pp == 0 else balanced_split(layers, pp)
    budget = memory(reference) * (1 + 1e-9)
    options = sorted(balancing_splits(layers, pp, compute),
                     key=lambda s: (max(compute.stages(s.stage_layers(layers, pp))), s != reference))  # fmt: skip
    return next((s for s in options if memory(s) <= budget), reference)


def format_split_gain(best, best_even) -> str:
    """What uneven pipeline stages gained: the fastest plan (`planner.Plan`) against the fastest with even
    splits only (None: no layout with even stages fits)."""
    if best_even is None:
        return f"uneven stages: {best.layout_name} fits where no layout with even stages does"
    gain = best_even.step_s - best.step_s
    if gain <= 0:
        return f"uneven stages: no gain ({best.layout_name} {best.step_s:.0f} s, even stages only the same)"
    return (f"uneven stages: {best.layout_name} {best.step_s:.0f} s vs {best_even.step_s:.0f} s for the fastest with "
            f"even stages ({best_even.layout_name}): -{gain:.1f} s per step (-{100 * gain / best_even.step_s:.1f} %)")
