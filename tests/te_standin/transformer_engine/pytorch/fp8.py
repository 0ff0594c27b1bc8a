"""FP8 global state and `fp8_autocast` (TE 2.11 `pytorch/quantization.py`, re-exported by `pytorch/fp8.py`).

What is reproduced: the autocast state (enabled, recipe, amax group, depth) that modules read at forward;
delayed scaling's amax reduction at the exit of the *outermost* autocast (`autocast_exit` ->
`reduce_and_update_fp8_tensors(forward=True)`): one all-reduce (MAX) over the autocast's `fp8_group` of all
amaxes the modules recorded inside it, when the recipe says `reduce_amax` and the group has more than one
rank. That collective is what deadlocks DP ranks that run different numbers of micro-batches under a TP x DP
amax group; `amax_reductions` counts them (and their group sizes) for tests. TE also reduces backward
amaxes in the first backward module; the stand-in does the forward side only.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.distributed as dist

from ..common.recipe import DelayedScaling, Recipe


class FP8GlobalStateManager:
    FP8_ENABLED = False
    FP8_RECIPE: Recipe | None = None
    FP8_DISTRIBUTED_GROUP = None
    AUTOCAST_DEPTH = 0
    IS_FIRST_FP8_MODULE = False
    # Delayed scaling: (amax tensor, module meta to update) recorded inside the outermost autocast.
    pending_amaxes: list[tuple[torch.Tensor, dict]] = []
    amax_reductions: list[int] = []  # group size of every all-reduce issued (tests)

    @classmethod
    def is_fp8_enabled(cls) -> bool:
        return cls.FP8_ENABLED

    @classmethod
    def get_fp8_recipe(cls) -> Recipe | None:
        return cls.FP8_RECIPE

    @classmethod
    def get_fp8_group(cls):
        return cls.FP8_DISTRIBUTED_GROUP

    @classmethod
    def is_fp8_available(cls) -> tuple[bool, str]:
        return True, ""  # emulated: q-dq on the CPU

    @classmethod
    def with_fp8_parameters(cls) -> bool:
        return False

    @classmethod
    def is_first_fp8_module(cls) -> bool:
        first, cls.IS_FIRST_FP8_MODULE = cls.IS_FIRST_FP8_MODULE, False
        return first

    @classmethod
    def record_amax(cls, amax: torch.Tensor, meta: dict) -> None:
        cls.pending_amaxes.append((amax, meta))

    @classmethod
    def reduce_and_update_fp8_tensors(cls, forward: bool = True) -> None:
        if not forward or not cls.pending_amaxes:
            return
        recipe, group = cls.FP8_RECIPE, cls.FP8_DISTRIBUTED_GROUP
        amaxes = torch.stack([a for a, _ in cls.pending_amaxes])
        if (isinstance(recipe, DelayedScaling) and recipe.reduce_amax and dist.is_initialized()
                and dist.get_world_size(group=group) > 1):
            dist.all_reduce(amaxes, op=dist.ReduceOp.MAX, group=group)
            cls.amax_reductions.append(dist.get_world_size(group=group))
        for amax, (_, meta) in zip(amaxes, cls.pending_amaxes):
            history = meta["amax_history"]
            history.copy_(torch.roll(history, -1, 0))
            history[-1] = amax
            algo = getattr(recipe, "amax_compute_algo", "max")
            current = history.max() if algo == "max" else history[-1]
            meta["scale"] = meta["fmax"] / current.clamp_min(1e-12)
        cls.pending_amaxes = []


@contextlib.contextmanager
def fp8_autocast(
    enabled: bool = True,
    calibrating: bool = False,
    fp8_recipe: Recipe | None = None,
    fp8_group=None,
    _graph: bool = False,
) -> Iterator[None]:
    state = (FP8GlobalStateManager.FP8_ENABLED, FP8GlobalStateManager.FP8_RECIPE,
             FP8GlobalStateManager.FP8_DISTRIBUTED_GROUP)
    recipe = fp8_recipe if fp8_recipe is not None else DelayedScaling()
    FP8GlobalStateManager.FP8_ENABLED = enabled
    FP8GlobalStateManager.FP8_RECIPE = recipe
    FP8GlobalStateManager.FP8_DISTRIBUTED_GROUP = fp8_group
    if FP8GlobalStateManager.AUTOCAST_DEPTH == 0:
        FP8GlobalStateManager.IS_FIRST_FP8_MODULE = True
    FP8GlobalStateManager.AUTOCAST_DEPTH += 1
    try:
        yield
    finally:
        (FP8GlobalStateManager.FP8_ENABLED, FP8GlobalStateManager.FP8_RECIPE,
         FP8GlobalStateManager.FP8_DISTRIBUTED_GROUP) = state
        FP8GlobalStateManager.AUTOCAST_DEPTH -= 1
        if enabled and FP8GlobalStateManager.AUTOCAST_DEPTH == 0 and torch.is_grad_enabled():
            FP8GlobalStateManager.FP8_RECIPE, FP8GlobalStateManager.FP8_DISTRIBUTED_GROUP = recipe, fp8_group
            FP8GlobalStateManager.reduce_and_update_fp8_tensors(forward=True)
            FP8GlobalStateManager.FP8_RECIPE, FP8GlobalStateManager.FP8_DISTRIBUTED_GROUP = state[1:]


def fp8_model_init(enabled: bool = True, recipe: Recipe | None = None, **_):
    if enabled:
        raise NotImplementedError("TE stand-in: FP8 parameters (fp8_model_init) are not emulated")
    return contextlib.nullcontext()
