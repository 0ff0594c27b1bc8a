"""Distributed setup: torchrun env -> torch.distributed -> Megatron parallel_state (+ the CPU shim)."""

from .cpu_shim import apply_cpu_shim, maybe_apply_cpu_shim
from .init import DistInfo, ParallelConfig, destroy_distributed, get_dp_group, init_distributed

__all__ = [
    "DistInfo",
    "ParallelConfig",
    "apply_cpu_shim",
    "destroy_distributed",
    "get_dp_group",
    "init_distributed",
    "maybe_apply_cpu_shim",
]
