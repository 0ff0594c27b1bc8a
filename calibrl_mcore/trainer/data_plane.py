"""The step's data plane: each data-parallel replica receives, encodes and holds only its own rows.

    driver (global rank 0)   rows (token ids + image refs) -> `assign_rows` -> one shard per DP replica
                             (`pack_shard`) -> point-to-point to each replica's leader
    replica leader           the rank of the replica with TP = CP = PP rank 0; it broadcasts the shard bytes
                             over the replica's own group (its TP x CP x PP ranks)
    every rank               `unpack_shard`; the first pipeline stage (the one that runs the vision tower)
                             encodes the images of its prompts once per prompt (processor / PIL / DALI)

The driver sends every row once (its send volume is the step's rows, whatever DP is), each rank receives
about 1/DP of them, and no pixel tensor crosses a process boundary. The driver packs and unpacks its own
shard too, so one process runs exactly the code a replica runs. Bytes are counted at the wire:
`data/bytes_received` is the shard a rank decodes (for the driver: its own).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from calibrl_mcore.trainer.batch import Row
from calibrl_mcore.trainer.row_plan import RowPlan
from calibrl_mcore.trainer.shard_codec import pack_shard, unpack_shard

__all__ = ["DataPlane", "LocalRows", "encode_prompt_images"]

log = logging.getLogger(__name__)


@dataclass
class LocalRows:
    """This rank's share of the step: its replica's rows (in the driver's row order) and what to do with them."""

    rows: list[Row]
    trained: list[int]
    """indices into `rows` this replica trains (the others are its groups' forward-only expert rows)."""
    mini_batch: list[int]
    """per row of `rows`: its mini-batch."""
    runnable: list[bool]
    """per mini-batch: every DP rank trains rows of it (the same list on every rank)."""
    complete: bool
    """every DP rank trains at least one row this step (the same on every rank)."""
    global_index: list[int] = field(default_factory=list)
    """per row: its index in the driver's row list."""
    wire_bytes: int = 0
    """size of the shard this rank decoded."""
    encode_s: float = 0.0
    """seconds this rank spent encoding its rows' images (0 off the first pipeline stage)."""

    def mini_batches(self) -> list[list[int]]:
        """The trained rows of each mini-batch (one PPO epoch)."""
        return [[i for i in self.trained if self.mini_batch[i] == m] for m in range(len(self.runnable))]


def encode_prompt_images(rows: Sequence[Row], encoder: Any) -> int:
    """Fill `pixel_values` of rows with images: each prompt (group) encoded once, its rows share the tensor.

    The encoder's token ids must be the driver's (which were planned from the image sizes): a mismatch means
    the two ran different processors or image settings. Returns the number of prompts encoded."""
    done: dict[int, dict] = {}
    for r in rows:
        if not r.images:
            continue
        if r.group_id not in done:
            enc = encoder.encode(r.prompt_text, r.images)
            if enc["input_ids"] != r.prompt_ids:
                raise RuntimeError(
                    f"prompt of {r.uid!r} (group {r.group_id}): this replica's processor gives "
                    f"{len(enc['input_ids'])} tokens, the driver planned {len(r.prompt_ids)}: every rank must load "
                    "the same processor and data.image_backend"
                )
            done[r.group_id] = enc
        r.pixel_values = done[r.group_id].get("pixel_values")
        grid = done[r.group_id].get("image_grid_thw")
        if grid is not None:
            r.image_grid_thw = grid
    return len(done)


def _replica_groups(dp_rank: int) -> tuple[dist.ProcessGroup | None, list[int], list[int]]:
    """(this replica's process group, its global ranks, each DP replica's leader). Every rank must call this
    (new_group is collective); replicas are found by gathering each rank's DP rank. A replica's leader is
    its lowest global rank, which in Megatron's rank order has TP = CP = PP rank 0."""
    world = dist.get_world_size()
    ranks_dp: list[int] = [0] * world
    dist.all_gather_object(ranks_dp, dp_rank)
    replicas = [[r for r in range(world) if ranks_dp[r] == d] for d in range(max(ranks_dp) + 1)]
    group, mine = None, []
    for d, members in enumerate(replicas):
        g = dist.new_group(members) if len(members) > 1 else None  # the same calls, in order, on every rank
        if d == dp_rank:
            group, mine = g, members
    return group, mine, [members[0] for members in replicas]


class DataPlane:
    """Ships each DP replica its rows (see the module docstring). Build it on every rank after
    `init_distributed`; `encoder` (a `PromptEncoder`) is needed on first-stage ranks when rows have images."""

    def __init__(self, encoder: Any | None, device: torch.device) -> None:
        self.encoder = encoder
        self.device = device  # where collectives want their tensors (the GPU under nccl)
        self.dp = parallel_state.get_data_parallel_world_size()
        self.encodes = parallel_state.is_pipeline_first_stage()
        self.group, members, self.leaders = _replica_groups(parallel_state.get_data_parallel_rank())
        self.leader = members[0]
        self.is_leader = dist.get_rank() == self.leader
        if self.leaders[0] != 0:
            raise RuntimeError(f"global rank 0 must lead DP replica 0, whose first rank is {self.leaders[0]}")

    # --------------------------------------------------------------------------------------- transport

    def _send(self, shards: list[bytes]) -> Callable[[], None]:
        """Driver: post shard r to replica r's leader (sizes first, so receivers allocate exactly). Returns
        the wait for those sends, which the driver calls once its own replica's work is done: the transfers
        overlap that work instead of holding rank 0 until every leader has been scheduled to receive."""
        sizes = [torch.tensor([len(s)], dtype=torch.int64, device=self.device) for s in shards]
        payloads = [self._as_tensor(s) for s in shards[1:]]  # alive until every send has completed
        works = []
        for r in range(1, self.dp):
            works.append(dist.isend(sizes[r], dst=self.leaders[r]))
            works.append(dist.isend(payloads[r - 1], dst=self.leaders[r]))

        def wait() -> None:
            for w in works:
                w.wait()
            sizes.clear()
            payloads.clear()

        return wait

    def _recv(self) -> bytes:
        size = torch.zeros(1, dtype=torch.int64, device=self.device)
        dist.recv(size, src=0)
        buf = torch.empty(int(size.item()), dtype=torch.uint8, device=self.device)
        dist.recv(buf, src=0)
        return buf.cpu().numpy().tobytes()

    def _broadcast_in_replica(self, data: bytes | None) -> bytes:
        """Leader -> the other TP / CP / PP ranks of its replica."""
        if self.group is None:
            return data
        size = torch.tensor([len(data) if self.is_leader else 0], dtype=torch.int64, device=self.device)
        dist.broadcast(size, src=self.leader, group=self.group)
        buf = self._as_tensor(data) if self.is_leader else torch.empty(int(size.item()), dtype=torch.uint8,
                                                                      device=self.device)
        dist.broadcast(buf, src=self.leader, group=self.group)
        return data if self.is_leader else buf.cpu().numpy().tobytes()

    def _as_tensor(self, data: bytes) -> torch.Tensor:
        return torch.frombuffer(bytearray(data), dtype=torch.uint8).to(self.device)

    # --------------------------------------------------------------------------------------- one step

    def exchange(self, rows: Sequence[Row] | None, plan: RowPlan | None) -> tuple[LocalRows, dict[str, float]]:
        """Every rank calls this once per step; the driver (global rank 0) passes the step's rows and plan.
        Returns this rank's rows and the data metrics (cross-rank max / min: the same on every rank)."""
        dispatch_s = pack_s = send_wait_s = 0.0
        data: bytes | None = None
        wait_for_sends: Callable[[], None] | None = None
        if dist.get_rank() == 0:
            t0 = time.perf_counter()
            shards = [self._pack(rows, plan, r) for r in range(self.dp)]
            pack_s = time.perf_counter() - t0
            wait_for_sends = self._send(shards)
            dispatch_s = time.perf_counter() - t0
            data = shards[0]
        elif self.is_leader:
            data = self._recv()
        data = self._broadcast_in_replica(data)
        local_rows, index, header = unpack_shard(data)
        encode_s = 0.0
        if self.encodes and any(r.images for r in local_rows):
            if self.encoder is None:
                raise RuntimeError("rows with images reached a first-stage rank without a prompt encoder")
            t_enc = time.perf_counter()
            encode_prompt_images(local_rows, self.encoder)
            encode_s = time.perf_counter() - t_enc
        local = LocalRows(rows=local_rows, trained=header["trained"], mini_batch=header["mini_batch"],
                          runnable=header["runnable"], complete=header["complete"], global_index=index,
                          wire_bytes=len(data), encode_s=encode_s)
        if wait_for_sends is not None:
            t_wait = time.perf_counter()
            wait_for_sends()
            send_wait_s = time.perf_counter() - t_wait
        metrics = self._reduce_metrics(len(data), encode_s)
        if plan is not None:
            metrics.update({"data/dispatch_s": dispatch_s, "data/pack_s": pack_s, "data/send_wait_s": send_wait_s,
                            "data/split_groups": float(plan.split_groups),
                            "data/token_imbalance": plan.token_imbalance})
        return local, metrics

    @staticmethod
    def _pack(rows: Sequence[Row], plan: RowPlan, rank: int) -> bytes:
        indices = plan.rows_of(rank)
        trained = set(plan.trained(rank))
        header = {"trained": [k for k, i in enumerate(indices) if i in trained],
                  "mini_batch": [plan.mini_batch[i] for i in indices],
                  "runnable": plan.runnable, "complete": plan.complete}
        return pack_shard(rows, indices, header)

    def _reduce_metrics(self, nbytes: int, encode_s: float) -> dict[str, float]:
        """Per-rank figures -> their max and min over all ranks (one all-reduce of 4 numbers)."""
        values = torch.tensor([nbytes, encode_s, -nbytes, -encode_s], dtype=torch.float64, device=self.device)
        if dist.get_world_size() > 1:
            dist.all_reduce(values, op=dist.ReduceOp.MAX)
        hi_bytes, hi_enc, lo_bytes, lo_enc = values.tolist()
        return {"data/bytes_received": hi_bytes, "data/bytes_received_min": -lo_bytes,
                "data/encode_s": hi_enc, "data/encode_s_min": -lo_enc}
