"""Weight-update process groups: trainer rank 0 broadcasts tensors to rollout-server ranks 1..N.

Every side builds the group exactly as SGLang's `init_custom_process_group` does (sglang 0.5.4.post3,
srt/utils/common.py; tests/test_sglang_contract.py joins with that very function): the store of a
`tcp://master_address:master_port` rendezvous (hosted by rank 0, the trainer), wrapped in
`PrefixStore(group_name)`, handed to torch's own group constructor `_new_process_group_helper`, which
prefixes its keys with `"{group_name}/"` and the device again. Building the backend on the store
directly (as this module once did) waits on other keys, and the join times out. The group lives beside
torch's default group (a torchrun trainer owns one; the embedded server has none), under its own
`group_name`, so several groups (one per pipeline stage) coexist and `dist.get_rank()` is untouched.
Rank 0 = trainer, ranks `rank_offset + i` = server ranks.

Gloo's group constructor is the rendezvous (it returns once every rank connected); NCCL's
communicator forms at the first collective. Either way both sides must be inside the call at the same
time, which is why the trainer sends its HTTP request from a thread while it joins.

The transfer itself follows SGLang's `/update_weights_from_distributed`: the request carries `names`,
`dtypes`, `shapes`; rank 0 then broadcasts one tensor per name, in that order.
"""

from __future__ import annotations

import datetime
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from rollout.engines.base import EngineInputError

BACKENDS = ("gloo", "nccl")


def parse_dtype(name: str) -> torch.dtype | None:
    """'bfloat16' or 'torch.bfloat16' -> torch.bfloat16; None for anything that is not a dtype."""
    value = getattr(torch, name.removeprefix("torch."), None)
    return value if isinstance(value, torch.dtype) else None


def dtype_name(dtype: torch.dtype) -> str:
    """torch.bfloat16 -> 'bfloat16' (SGLang's spelling on the wire)."""
    return str(dtype).removeprefix("torch.")


def create_group(
    master_address: str,
    master_port: int,
    rank: int,
    world_size: int,
    group_name: str,
    backend: str,
    timeout_s: float = 300.0,
) -> dist.ProcessGroup:
    """Join (rank > 0) or host (rank 0) a weight-update group; blocks until all ranks joined (gloo)."""
    from torch.distributed.distributed_c10d import Backend, _new_process_group_helper, _world

    if backend not in BACKENDS:
        raise ValueError(f"backend {backend!r} is not one of {', '.join(BACKENDS)}")
    if backend == "nccl" and (not dist.is_nccl_available() or not torch.cuda.is_available()):
        raise ValueError("backend 'nccl' needs a CUDA build of torch and a visible GPU")
    timeout = datetime.timedelta(seconds=timeout_s)
    # The store a `tcp://` rendezvous makes outside torchelastic (rendezvous._create_c10d_store). Not
    # `rendezvous()` itself: under torchrun it would connect to the elastic agent's store instead of
    # hosting this one, and nobody would answer.
    store = dist.TCPStore(master_address, master_port, world_size, is_master=rank == 0, timeout=timeout,
                          multi_tenant=True)
    group, _ = _new_process_group_helper(world_size, rank, [], Backend(backend), dist.PrefixStore(group_name, store),
                                         group_name=group_name, backend_options=None, timeout=timeout)
    _world.pg_group_ranks[group] = {i: i for i in range(world_size)}  # group rank == rank in the group
    return group


def broadcast_async(
    group: dist.ProcessGroup, tensors: Sequence[torch.Tensor], src: int = 0
) -> list[dist.Work]:
    """Issue one broadcast per tensor, in order (every rank must issue the same sequence)."""
    options = dist.BroadcastOptions()
    options.rootRank = src
    return [group.broadcast([tensor], options) for tensor in tensors]


def close_group(group: dist.ProcessGroup) -> None:
    """Best effort: release the group's connections and its name (a broken peer must not stop the caller)."""
    try:
        group.abort()  # NCCL: do not wait for a peer that may be gone
    except Exception:  # noqa: BLE001 - gloo has nothing to abort; a broken group may refuse
        pass
    try:
        dist.destroy_process_group(group)  # frees group_name for the next join
    except Exception:  # noqa: BLE001 - tearing down a possibly broken group
        pass


@dataclass
class _ServerGroup:
    group: dist.ProcessGroup
    backend: str
    rank: int
    world_size: int
    lock: threading.Lock = field(default_factory=threading.Lock)  # one transfer at a time per group


class WeightUpdateGroups:
    """The server's side: named groups it joined, and receiving a broadcast bucket through one."""

    def __init__(self, device: torch.device | str, timeout_s: float = 300.0) -> None:
        self.device = torch.device(device)
        self.timeout_s = timeout_s
        self._groups: dict[str, _ServerGroup] = {}
        self._lock = threading.Lock()

    def names(self) -> list[str]:
        with self._lock:
            return sorted(self._groups)

    def init(
        self,
        master_address: str,
        master_port: int,
        rank_offset: int,
        world_size: int,
        group_name: str,
        backend: str,
    ) -> None:
        """Join as rank `rank_offset` (this server has one rank); blocks until the trainer joins too."""
        if backend == "nccl" and self.device.type != "cuda":
            raise EngineInputError(
                "backend", f"'nccl' needs a CUDA engine; this engine runs on {self.device}"
            )
        with self._lock:
            if group_name in self._groups:
                raise EngineInputError("group_name", f"group {group_name!r} exists; destroy it first")
            self._groups[group_name] = None  # type: ignore[assignment]  # reserved while joining
        try:
            group = create_group(
                master_address, master_port, rank_offset, world_size, group_name, backend, self.timeout_s
            )
        except Exception as exc:
            with self._lock:
                self._groups.pop(group_name, None)
            if isinstance(exc, EngineInputError):
                raise
            raise EngineInputError(
                "master_address",
                f"cannot join {master_address}:{master_port} as rank {rank_offset}/{world_size}: {exc}",
            ) from exc
        with self._lock:
            self._groups[group_name] = _ServerGroup(group, backend, rank_offset, world_size)

    def destroy(self, group_name: str) -> None:
        with self._lock:
            entry = self._groups.pop(group_name) if self._groups.get(group_name) is not None else None
        if entry is None:
            raise EngineInputError(
                "group_name", f"no weight-update group {group_name!r} (have {self._known()})"
            )
        close_group(entry.group)

    def get(self, group_name: str) -> _ServerGroup:
        with self._lock:
            entry = self._groups.get(group_name)
        if entry is None:  # unknown, or still joining
            raise EngineInputError(
                "group_name", f"no weight-update group {group_name!r} (have {self._known()})"
            )
        return entry

    def receive(
        self, group_name: str, specs: Sequence[tuple[str, torch.dtype, tuple[int, ...]]]
    ) -> list[tuple[str, torch.Tensor]]:
        """Receive one broadcast from rank 0 per (name, dtype, shape), in order."""
        entry = self.get(group_name)
        device = torch.device("cpu") if entry.backend == "gloo" else self.device
        with entry.lock:
            tensors = [torch.empty(shape, dtype=dtype, device=device) for _, dtype, shape in specs]
            for work in broadcast_async(entry.group, tensors):
                work.wait()
        return [(name, tensor) for (name, _, _), tensor in zip(specs, tensors)]

    def close(self) -> None:
        with self._lock:
            groups, self._groups = list(self._groups.values()), {}
        for entry in groups:
            if entry is not None:
                close_group(entry.group)

    def _known(self) -> str:
        with self._lock:
            return ", ".join(repr(n) for n in sorted(self._groups) if self._groups[n] is not None) or "none"
