"""Checkpoints: Megatron distributed checkpoint (model + optimizer, reloadable at any TP/PP/DP) plus the
trainer state, written to a temporary directory and renamed into place.

Layout of `<root>/step_00000012/`: `megatron/` (dist_checkpointing), `trainer_state.json` (step, weight
version, data cursor), `rank<R>.pt` (that rank's RNG states and LR-scheduler state), `config.yaml`,
`COMPLETE`. `<root>/latest` names the newest directory that has `COMPLETE`; it is replaced atomically
(write + rename) only after the rename of the checkpoint itself, so a kill at any point leaves `latest`
naming a complete checkpoint (or nothing). Leftover `.tmp-*` directories are never loaded and are
cleaned up by the next save.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, tensor_parallel

log = logging.getLogger(__name__)

# Distributed-optimizer state is saved 'dp_reshardable' (fully parallel; reloads at another DP size, not at another
# TP/PP). Megatron 0.16.1's other formats fail on the torch-Adam path (no apex/TE): its default
# 'fully_sharded_model_space' builds flattened ShardedTensors its checkpointing rejects, 'fully_reshardable'
# loads miss Adam's `step`. The plain optimizer ignores the key.
OPTIMIZER_METADATA = {"distrib_optim_sharding_type": "dp_reshardable"}


def _materialize_distributed_optimizer_state(optimizer) -> None:
    """Give a fresh distributed optimizer its Adam states before a load. Megatron 0.16.1 reads the inner
    torch Adam's `step` while building the state dict to load into (`DistributedOptimizer.state_dict`),
    which a never-stepped optimizer does not have yet; Megatron's own dummy-value initialisation fixes that
    (the loaded values replace them)."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        if isinstance(opt, DistributedOptimizer):
            opt._init_optimizer_states_with_dummy_values()


def _rng_state() -> dict:
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if state.get("tracker"):
        tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


class CheckpointManager:
    def __init__(self, root: Path, keep_last: int = 2) -> None:
        self.root = Path(root)
        self.keep_last = max(1, keep_last)

    # -- discovery -------------------------------------------------------------------------------------

    def latest(self) -> Path | None:
        pointer = self.root / "latest"
        if not pointer.is_file():
            return None
        path = self.root / pointer.read_text().strip()
        if not (path / "COMPLETE").is_file():
            log.warning("%s names %s, which is not a complete checkpoint: ignoring it", pointer, path)
            return None
        return path

    def complete(self) -> list[Path]:
        return sorted(p for p in self.root.glob("step_*") if (p / "COMPLETE").is_file())

    # -- save / load -----------------------------------------------------------------------------------

    def save(self, step: int, policy, trainer_state: dict, *, config_yaml: str = "") -> Path:
        """Collective: every rank calls it."""
        rank = dist.get_rank()
        final = self.root / f"step_{step:08d}"
        tmp = self.root / f".tmp-step_{step:08d}"
        if rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            for stale in self.root.glob(".tmp-*"):
                shutil.rmtree(stale, ignore_errors=True)
            (tmp / "megatron").mkdir(parents=True)
        dist.barrier()
        model_sd = policy.model.module.sharded_state_dict()
        sharded = {"model": model_sd,
                   "optimizer": policy.optimizer.sharded_state_dict(model_sd, metadata=OPTIMIZER_METADATA)}
        dist_checkpointing.save(sharded, str(tmp / "megatron"))
        torch.save({"rng": _rng_state(), "scheduler": policy.scheduler.state_dict()}, tmp / f"rank{rank}.pt")
        dist.barrier()
        if rank == 0:
            (tmp / "trainer_state.json").write_text(json.dumps(trainer_state, indent=2))
            (tmp / "config.yaml").write_text(config_yaml)
            (tmp / "COMPLETE").write_text(f"step {step}\n")
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            pointer_tmp = self.root / "latest.tmp"
            pointer_tmp.write_text(final.name + "\n")
            os.replace(pointer_tmp, self.root / "latest")
            # Never the one just written: a run restarted without resume into a run_dir holding later
            # steps would otherwise prune it by name order at once and leave `latest` dangling.
            others = [p for p in self.complete() if p != final]
            for old in others[: max(0, len(others) - (self.keep_last - 1))]:
                shutil.rmtree(old, ignore_errors=True)
        dist.barrier()
        return final

    def load(self, path: Path, policy) -> dict:
        """Collective: loads model + optimizer (any layout) and this rank's RNG/scheduler state if present."""
        path = Path(path)
        if not (path / "COMPLETE").is_file():
            raise FileNotFoundError(f"{path} is not a complete checkpoint (no COMPLETE marker)")
        model_sd = policy.model.module.sharded_state_dict()
        _materialize_distributed_optimizer_state(policy.optimizer)
        sharded = {"model": model_sd, "optimizer": policy.optimizer.sharded_state_dict(
            model_sd, is_loading=True, metadata=OPTIMIZER_METADATA)}
        state = dist_checkpointing.load(sharded, str(path / "megatron"))
        policy.model.module.load_state_dict(state["model"])
        with torch.no_grad():  # the distributed optimizer copies into fp32 main params that are views of leaves
            policy.optimizer.load_state_dict(state["optimizer"])
        rank_file = path / f"rank{dist.get_rank()}.pt"
        if rank_file.is_file():
            extra = torch.load(rank_file, weights_only=False)
            _set_rng_state(extra["rng"])
            policy.scheduler.load_state_dict(extra["scheduler"])
        else:
            log.warning("%s has no state for rank %d (different layout): RNG/scheduler start fresh",
                        path, dist.get_rank())
        return json.loads((path / "trainer_state.json").read_text())
