"""Process-group and Megatron `parallel_state` setup from torchrun's environment.

Order (each step depends on the one before):
  1. read RANK / WORLD_SIZE / LOCAL_RANK (torchrun) or fall back to a one-process world on a free local port;
  2. pick the backend (gloo on CPU, nccl on GPU) and the device (cuda:LOCAL_RANK on GPU);
  3. on CPU, apply the Megatron CPU shim (cpu_shim.py) before Megatron allocates anything;
  4. check world = DP x PP x TP x CP, init torch.distributed, then Megatron's parallel_state groups;
  5. seed python / numpy / torch and Megatron's model-parallel RNG tracker.
"""

from __future__ import annotations

import os
import random
import socket
from dataclasses import dataclass
from datetime import timedelta
from typing import Literal

import numpy as np
import torch
import torch.distributed as dist

from .cpu_shim import maybe_apply_cpu_shim


@dataclass
class ParallelConfig:
    """How the world is split. world_size = DP x PP x TP x CP; DP is whatever is left over."""

    tensor_model_parallel_size: int = 1
    """TP: ways each weight matrix is split (Megatron column/row-parallel layers)."""
    pipeline_model_parallel_size: int = 1
    """PP: number of pipeline stages the decoder layers are split across."""
    context_parallel_size: int = 1
    """CP: ways each sequence is split. CP > 1 needs the 'te' or 'sdpa' layer spec (not 'local')."""
    virtual_pipeline_model_parallel_size: int | None = None
    """Interleaved-1F1B model chunks per pipeline stage; None = plain 1F1B. Needs PP > 1."""
    seed: int = 1234
    """Base random seed (python, numpy, torch, Megatron RNG tracker); offset by 100 x PP rank."""
    backend: Literal["auto", "gloo", "nccl"] = "auto"
    """torch.distributed backend; auto = nccl when CUDA is available, else gloo."""
    timeout_minutes: int = 30
    """Timeout of collective operations, in minutes."""

    @classmethod
    def from_section(cls, section, seed: int) -> ParallelConfig:
        """The layout of a run config's `parallel` section (`calibrl_mcore.config.ParallelSection`), seeded with
        the run's `train.seed`."""
        return cls(
            tensor_model_parallel_size=section.tensor_model_parallel_size,
            pipeline_model_parallel_size=section.pipeline_model_parallel_size,
            context_parallel_size=section.context_parallel_size,
            seed=seed,
        )

    def __post_init__(self) -> None:
        sizes = {
            "tensor_model_parallel_size": self.tensor_model_parallel_size,
            "pipeline_model_parallel_size": self.pipeline_model_parallel_size,
            "context_parallel_size": self.context_parallel_size,
        }
        for name, size in sizes.items():
            if not isinstance(size, int) or size < 1:
                raise ValueError(f"{name} must be an int >= 1, got {size!r}")
        vpp = self.virtual_pipeline_model_parallel_size
        if vpp is not None and (vpp < 1 or self.pipeline_model_parallel_size == 1):
            raise ValueError(
                f"virtual_pipeline_model_parallel_size={vpp} needs pipeline_model_parallel_size > 1 "
                f"(got {self.pipeline_model_parallel_size}) and a value >= 1"
            )
        if self.backend not in ("auto", "gloo", "nccl"):
            raise ValueError(f"backend must be 'auto', 'gloo' or 'nccl', got {self.backend!r}")
        if self.timeout_minutes <= 0:
            raise ValueError(f"timeout_minutes must be > 0, got {self.timeout_minutes}")


@dataclass
class DistInfo:
    """Where this process sits in the layout (returned by `init_distributed`)."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str
    tp_size: int
    tp_rank: int
    pp_size: int
    pp_rank: int
    dp_size: int
    dp_rank: int
    cp_size: int
    cp_rank: int
    dp_group: dist.ProcessGroup
    """Ranks holding different samples (without CP): reduce per-sample statistics over this group."""

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp_size - 1


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _read_launch_env() -> tuple[int, int, int, str]:
    """(rank, world_size, local_rank, init_method) from torchrun's env, or a one-process world."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
        if missing:
            raise RuntimeError(f"RANK/WORLD_SIZE are set but {missing} are not (launch with torchrun)")
        rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        return rank, world_size, int(os.environ.get("LOCAL_RANK", rank)), "env://"
    return 0, 1, 0, f"tcp://127.0.0.1:{_free_port()}"


def _seed_everything(seed: int) -> None:
    """Megatron-LM's recipe: offset by PP rank so stages don't draw identical weights; TP ranks get their
    own 'model-parallel-rng' stream from model_parallel_cuda_manual_seed (CPU generator under the shim)."""
    from megatron.core import parallel_state, tensor_parallel

    seed = seed + 100 * parallel_state.get_pipeline_model_parallel_rank()
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


def set_device_max_connections(cfg: ParallelConfig, env) -> None:
    """CUDA_DEVICE_MAX_CONNECTIONS=1 under TP or CP (GPU): one hardware queue, so the TP / SP / CP collectives
    are scheduled in issue order ahead of the GEMMs that wait for them, as Megatron-LM's launch scripts set it
    (Megatron asserts it for TP communication overlap). A value the user exported is kept."""
    if (cfg.tensor_model_parallel_size > 1 or cfg.context_parallel_size > 1) and "CUDA_DEVICE_MAX_CONNECTIONS" not in env:
        env["CUDA_DEVICE_MAX_CONNECTIONS"] = "1"


def init_distributed(cfg: ParallelConfig) -> DistInfo:
    """Initialise torch.distributed and Megatron's parallel_state for `cfg`; see the module docstring."""
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        raise RuntimeError("init_distributed was already called; call destroy_distributed first")
    rank, world_size, local_rank, init_method = _read_launch_env()

    on_gpu = torch.cuda.is_available()
    backend = cfg.backend if cfg.backend != "auto" else ("nccl" if on_gpu else "gloo")
    if backend == "nccl" and not on_gpu:
        raise ValueError("backend='nccl' needs CUDA; use 'gloo' or 'auto' on CPU")
    if on_gpu:
        set_device_max_connections(cfg, os.environ)  # before the first CUDA context
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    maybe_apply_cpu_shim()

    tp, pp, cp = cfg.tensor_model_parallel_size, cfg.pipeline_model_parallel_size, cfg.context_parallel_size
    if world_size % (tp * pp * cp) != 0:
        raise ValueError(
            f"world size {world_size} is not divisible by TP x PP x CP = {tp} x {pp} x {cp} = {tp * pp * cp}"
        )

    if not dist.is_initialized():
        dist.init_process_group(
            backend=backend,
            init_method=init_method,
            rank=rank,
            world_size=world_size,
            timeout=timedelta(minutes=cfg.timeout_minutes),
        )
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=cfg.virtual_pipeline_model_parallel_size,
        context_parallel_size=cp,
        distributed_timeout_minutes=cfg.timeout_minutes,
    )
    _seed_everything(cfg.seed)

    return DistInfo(
        rank=rank,
        world_size=world_size,
        local_rank=local_rank,
        device=device,
        backend=backend,
        tp_size=parallel_state.get_tensor_model_parallel_world_size(),
        tp_rank=parallel_state.get_tensor_model_parallel_rank(),
        pp_size=parallel_state.get_pipeline_model_parallel_world_size(),
        pp_rank=parallel_state.get_pipeline_model_parallel_rank(),
        dp_size=parallel_state.get_data_parallel_world_size(),
        dp_rank=parallel_state.get_data_parallel_rank(),
        cp_size=parallel_state.get_context_parallel_world_size(),
        cp_rank=parallel_state.get_context_parallel_rank(),
        dp_group=parallel_state.get_data_parallel_group(),
    )


def get_dp_group() -> dist.ProcessGroup:
    """The data-parallel group (without CP) of this rank; requires `init_distributed`."""
    from megatron.core import parallel_state

    if not parallel_state.model_parallel_is_initialized():
        raise RuntimeError("get_dp_group() called before init_distributed()")
    return parallel_state.get_data_parallel_group()


def destroy_distributed() -> None:
    """Tear down Megatron's parallel_state groups, then the default process group (safe to call twice)."""
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
