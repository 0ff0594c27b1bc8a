"""transformer_engine.pytorch.distributed (stand-in): the RNG tracker Megatron wraps, and `checkpoint`."""

from __future__ import annotations

import contextlib
from contextlib import AbstractContextManager, ContextDecorator

import torch
import torch.utils.checkpoint

from .fp8 import FP8GlobalStateManager

_FP8_ACTIVATION_RECOMPUTE_ENABLED = False
_FP8_ACTIVATION_RECOMPUTE_PHASE = False


class activation_recompute_forward(AbstractContextManager, ContextDecorator):  # noqa: N801 (TE's name)
    """Marks the forward / recompute phase of Megatron's checkpointing for FP8 modules (TE 2.11)."""

    _is_first_fp8_module: list = []

    def __init__(self, activation_recompute: bool = False, recompute_phase: bool = False):
        super().__init__()
        self.activation_recompute, self.recompute_phase = activation_recompute, recompute_phase

    def __enter__(self):
        global _FP8_ACTIVATION_RECOMPUTE_ENABLED, _FP8_ACTIVATION_RECOMPUTE_PHASE
        _FP8_ACTIVATION_RECOMPUTE_ENABLED = self.activation_recompute and FP8GlobalStateManager.is_fp8_enabled()
        _FP8_ACTIVATION_RECOMPUTE_PHASE = self.recompute_phase
        if self.activation_recompute and not self.recompute_phase:
            activation_recompute_forward._is_first_fp8_module.append(FP8GlobalStateManager.IS_FIRST_FP8_MODULE)
        if self.activation_recompute and self.recompute_phase:
            FP8GlobalStateManager.IS_FIRST_FP8_MODULE = activation_recompute_forward._is_first_fp8_module.pop(0)

    def __exit__(self, *exc_details):
        global _FP8_ACTIVATION_RECOMPUTE_ENABLED, _FP8_ACTIVATION_RECOMPUTE_PHASE
        _FP8_ACTIVATION_RECOMPUTE_ENABLED = _FP8_ACTIVATION_RECOMPUTE_PHASE = False


def in_fp8_activation_recompute_phase() -> bool:
    return _FP8_ACTIVATION_RECOMPUTE_PHASE


class CudaRNGStatesTracker:
    """TE 2.11 `distributed.py`: named RNG states; on the CPU the forks use (and restore) the CPU generator."""

    def __init__(self) -> None:
        self.states_: dict[str, torch.Tensor] = {}
        self.seeds_: set[int] = set()

    def reset(self) -> None:
        self.states_, self.seeds_ = {}, set()

    def get_states(self) -> dict[str, torch.Tensor]:
        return dict(self.states_)

    def set_states(self, states: dict[str, torch.Tensor]) -> None:
        self.states_ = dict(states)

    def add(self, name: str, seed: int) -> None:
        if seed in self.seeds_ or name in self.states_:
            raise Exception(f"seed {seed} / state {name} already exists")
        self.seeds_.add(seed)
        saved = torch.get_rng_state()
        torch.manual_seed(seed)
        self.states_[name] = torch.get_rng_state()
        torch.set_rng_state(saved)

    @contextlib.contextmanager
    def fork(self, name: str = "model-parallel-rng"):
        if name not in self.states_:
            raise Exception(f"state {name} is not added")
        saved = torch.get_rng_state()
        torch.set_rng_state(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(saved)


def checkpoint(function, *args, distribute_saved_activations: bool = False, get_rng_state_tracker=None,
               tp_group=None, use_reentrant: bool = True, **kwargs):
    """Activation recompute (TE's signature; the stand-in recomputes with torch's non-reentrant checkpoint)."""
    return torch.utils.checkpoint.checkpoint(function, *args, use_reentrant=False, **kwargs)
