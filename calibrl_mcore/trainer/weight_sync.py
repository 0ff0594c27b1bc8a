"""Trainer -> rollout server weight sync.

Every method starts the same way: each pipeline stage exports its own parameters under HF names,
gathered over TP one tensor at a time (`hf_mapping.gather_megatron_to_hf`), and the stage's
(DP 0, CP 0, TP 0) rank sends them in buckets of at most `bucket_mb`, so no rank ever holds a full-model
copy. Each bucket carries the new weight version; servers report it with every response.

method "tensor" (the embedded server): buckets are safetensors payloads on `/update_weights_from_tensor`.

method "distributed" (SGLang's `/init_weights_update_group` + `/update_weights_from_distributed`, and
the embedded server's copy of those routes): at the first push each stage's pusher hosts a
weight-update group (rollout/weight_group.py) in which it is rank 0 and the servers' ranks follow
(server i joins as ranks `1 + sum(ranks of servers < i)` onwards; an SGLang server has `tp_size` ranks,
the embedded server 1). Per bucket the pusher POSTs the names/dtypes/shapes and, while that request is
in flight, broadcasts the tensors in the same order; the servers receive straight into their weights'
loading path. With PP > 1 every stage's pusher owns its own group (`<group_name>_pp<stage>`), so the
stages send in parallel and nothing is gathered across stages. The backend is gloo for CPU tensors and
NCCL for CUDA ones; an SGLang server needs NCCL, i.e. a network path between the trainer's GPUs and
the server's GPUs (NCCL_SOCKET_IFNAME / IB as for the trainer itself). If a server refuses a bucket,
the broadcast is abandoned, the group torn down, and the next push joins a fresh one.

method "disk" (SGLang / vLLM without a collective): the policy is written as an HF checkpoint
(`export_hf`, one shard per stage) and every server reloads it through `/update_weights_from_disk`.
Slower, but it only needs the servers' stock routes; a shared file system is assumed.

A fleet (rollout/pool.py, held by rank 0): every push goes to the pool's live and suspect servers (rank 0
broadcasts the list). A server whose push fails is marked out and the push goes on with the others; the
failures of every stage's pusher are gathered on rank 0. With "distributed" the group is the servers it
was formed with: a different set (one lost, one back) tears it down and forms a new one, and a broadcast
that fails takes every member out of service (unreachable ones out, the others suspect, since they may
hold half a push). `ensure_live`, collective, before each step's rollout: suspects get the current
weights and must report the current `weight_version` before they are live again; below
`min_live_servers` it waits up to `recovery_timeout_s`, then stops naming every server's last error.
"""

from __future__ import annotations

import concurrent.futures
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from calibrl_mcore.trainer.export import export_hf
from rollout.client import RolloutClient, tensor_update_body
from rollout.launcher import free_port
from rollout.pool import LIVE, SUSPECT, PoolExhausted, ServerPool
from rollout.weight_group import broadcast_async, close_group, create_group, dtype_name

METHODS = ("tensor", "disk", "distributed")
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


def sync_method(method: str, engine: str) -> str:
    """`rollout.weight_sync_method` -> the method for a server of `engine` (auto: tensor for the embedded
    engine; disk for SGLang, since "distributed" needs NCCL between the trainer's and the servers'
    GPUs, which only the operator knows is there). vLLM: disk only (rollout/engines/vllm.py)."""
    if engine == "vllm":
        from rollout.engines.vllm import check_vllm_method

        return check_vllm_method(method)
    if method == "auto":
        return "tensor" if engine == "embedded" else "disk"
    if method not in METHODS:
        raise ValueError(f"rollout.weight_sync_method={method!r} is not one of auto, {', '.join(METHODS)}")
    if engine == "sglang" and method == "tensor":
        raise ValueError(
            "rollout.weight_sync_method='tensor' is the embedded server's safetensors route; "
            "use distributed or disk with SGLang"
        )
    return method


class WeightSync:
    def __init__(
        self,
        policy,
        urls: list[str],
        *,
        api_key: str = "",
        bucket_mb: int = 64,
        timeout_s: float = 600.0,
        max_retries: int = 3,
        method: str = "tensor",
        src_dir: str | Path | None = None,
        stage_dir: str | Path | None = None,
        group_name: str = "calibrl_weights",
        backend: str = "auto",
        pool: ServerPool | None = None,
        min_live_servers: int = 1,
        recovery_timeout_s: float = 300.0,
    ) -> None:
        if method not in METHODS:
            raise ValueError(f"weight sync method {method!r} is not one of {', '.join(METHODS)}")
        if method == "disk" and (src_dir is None or stage_dir is None):
            raise ValueError("disk weight sync needs src_dir (config/tokenizer source) and stage_dir")
        if backend not in ("auto", "gloo", "nccl"):
            raise ValueError(f"weight sync backend {backend!r} is not one of auto, gloo, nccl")
        self.policy, self.method, self.timeout_s = policy, method, timeout_s
        self.src_dir, self.stage_dir = src_dir, Path(stage_dir) if stage_dir else None
        self.bucket_bytes = bucket_mb * 2**20
        self.pusher = (
            parallel_state.get_data_parallel_rank(with_context_parallel=True) == 0
            and parallel_state.get_tensor_model_parallel_rank() == 0
        )
        if method == "disk":
            self.pusher = dist.get_rank() == 0  # one reload request per server
        self.client = (
            RolloutClient(urls, api_key=api_key or None, timeout=timeout_s, max_retries=max_retries)
            if self.pusher
            else None
        )
        # rank 0 keeps the fleet's health (the trainer shares its pool with the rollout client)
        self.is_rank0 = dist.get_rank() == 0
        self._own_pool = pool is None and self.is_rank0
        self.pool = ServerPool(urls) if self._own_pool else pool
        self.min_live_servers, self.recovery_timeout_s = min_live_servers, recovery_timeout_s
        self.version: int | None = None  # last pushed
        self._members: list[str] = []  # distributed: the servers of the current group
        if self.client is not None:
            self.client.check_servers()  # a vLLM server gets its own weight routes (rollout/vllm_adapter.py)
            if self.client.engine == "vllm" and method != "disk":
                raise ValueError(f"rollout.urls: {urls} are vLLM servers but weight_sync_method={method!r}; "
                                 "set rollout.engine=vllm (vLLM takes weights from disk)")
        # distributed: this pusher's group (it is rank 0), joined at the first push.
        self.group_name = f"{group_name}_pp{parallel_state.get_pipeline_model_parallel_rank()}"
        self.backend = backend
        self._group: Any = None
        self._backend: str | None = None

    def push(self, version: int, *, suspects_only: bool = False) -> None:
        """Every rank calls this: DP-0 ranks gather over TP, TP-0 of each stage sends its buckets to the
        pool's live and suspect servers (`suspects_only`: a re-sync); a server that fails is left out."""
        targets = [self._targets(suspects_only)]
        dist.broadcast_object_list(targets, src=0)
        self._failed: dict[str, tuple[str, bool]] = {}  # url -> (reason, still healthy)
        if targets[0]:
            self._push_to(targets[0], version)
        failed: list = [None] * dist.get_world_size() if self.is_rank0 else None
        dist.gather_object(self._failed, failed, dst=0)
        self.version = version
        if self.is_rank0:
            self._settle(targets[0], {url: f for part in failed for url, f in part.items()}, version)
        dist.barrier()

    def ensure_live(self) -> None:
        """Collective, before a step's rollout: re-sync the suspects; below `min_live_servers` wait for
        recovery up to `recovery_timeout_s`, then raise PoolExhausted naming the servers (on every rank)."""
        deadline = time.monotonic() + self.recovery_timeout_s
        resynced_once = False
        while True:
            decision = [None]
            if self.is_rank0:
                until_suspect = not resynced_once or len(self.pool.live()) < self.min_live_servers
                try:
                    left = max(0.0, deadline - time.monotonic())
                    decision = [self.pool.wait_for(self.min_live_servers, left, until_suspect=until_suspect,
                                                    configured_timeout_s=self.recovery_timeout_s)]
                except PoolExhausted as exc:
                    decision = [str(exc)]
            dist.broadcast_object_list(decision, src=0)
            if decision[0] == LIVE:
                return
            if decision[0] != SUSPECT:
                raise PoolExhausted(decision[0])
            resynced_once = True
            if self.version is None:  # nothing pushed yet: the checkpoint's weights are the current ones
                if self.is_rank0:
                    self._settle(self.pool.suspects(), {}, None)
                dist.barrier()
            else:
                self.push(self.version, suspects_only=True)

    def _targets(self, suspects_only: bool) -> list[str]:
        if not self.is_rank0:
            return []
        return self.pool.suspects() if suspects_only else self.pool.targets()

    def _push_to(self, targets: list[str], version: int) -> None:
        if self.method == "disk":
            path = export_hf(self.policy, self.src_dir, self.stage_dir / "latest")
            if self.client is not None:
                self._record(self.client.push_disk_each(str(path), version, targets))
            return
        if parallel_state.get_data_parallel_rank(with_context_parallel=True) != 0:
            return
        send = self._send_tensors if self.method == "tensor" else self._broadcast_bucket
        if self.client is not None and self.method == "distributed":
            self._form_group(targets)
        bucket, size = [], 0
        for name, tensor in self.policy.iter_hf_weights():
            if self.client is None:
                continue  # TP peers only take part in the gathers
            bucket.append((name, tensor))
            size += tensor.numel() * tensor.element_size()
            if size >= self.bucket_bytes:
                send(bucket, version, targets)
                bucket, size = [], 0
        if self.client is not None and bucket:
            send(bucket, version, targets)

    def _record(self, results: dict[str, Any]) -> None:
        for url, result in results.items():
            if isinstance(result, Exception):
                self._failed.setdefault(url, (f"{type(result).__name__}: {result}", False))

    def _settle(self, targets: list[str], failed: dict[str, tuple[str, bool]], version: int | None) -> None:
        """Rank 0, after a push: failures out (a healthy member of a broken group: suspect, it may hold half
        a push); suspects that took it live once they report the new version."""
        self.pool.version = "" if version is None else str(version)
        for url, (reason, healthy) in failed.items():
            if healthy:
                self.pool.mark_suspect(url, f"was in a weight-update group that failed ({reason})")
            else:
                self.pool.mark_out(url, f"weight push of version {version}: {reason}")
        for url in targets:
            if url not in failed and self.pool.state(url) == SUSPECT:
                self.pool.resynced(url, self.client.reported_weight_version(url))

    def close(self) -> None:
        if self._group is not None:
            self._leave_group()
        if self.client is not None:
            self.client.close()
        if self._own_pool:
            self.pool.close()

    # ----------------------------------------------------------------------------------------------
    def _send_tensors(self, bucket: list[tuple[str, torch.Tensor]], version: int, targets: list[str]) -> None:
        urls = [u for u in targets if u not in self._failed]
        if urls:
            body = tensor_update_body([(n, t.cpu()) for n, t in bucket], version)
            self._record(self.client.post_each("/update_weights_from_tensor", body, urls))

    def _form_group(self, targets: list[str]) -> None:
        """The group must hold exactly `targets`: a lost or a returning server re-forms it."""
        if self._group is not None and self._members != targets:
            self._leave_group()
        if self._group is None:
            try:
                self._join_group(targets)
            except Exception as exc:  # noqa: BLE001 - handed to the pool: the push goes on without them
                self._fail_group(targets, exc)

    def _join_group(self, urls: list[str]) -> None:
        """Host the group (rank 0) while every server joins it (the request runs in a thread)."""
        ranks = self.client.server_ranks(urls)
        offsets = [1 + sum(ranks[:i]) for i in range(len(ranks))]
        world_size = 1 + sum(ranks)
        backend = self._pick_backend()
        address, port = _address_towards(urls[0]), free_port()
        group = _together(
            lambda: self.client.init_weights_update_group(
                address, port, offsets, world_size, self.group_name, backend, urls
            ),
            lambda: create_group(address, port, 0, world_size, self.group_name, backend, self.timeout_s),
            self.timeout_s,
            what=f"joining weight-update group {self.group_name!r} at {address}:{port}",
        )
        self._group, self._backend, self._members = group, backend, list(urls)

    def _broadcast_bucket(self, bucket: list[tuple[str, torch.Tensor]], version: int, targets: list[str]) -> None:
        if self._group is None:
            return  # the group failed earlier in this push: its members are recorded as failed
        device = "cpu" if self._backend == "gloo" else torch.cuda.current_device()
        tensors = [t.detach().to(device).contiguous() for _, t in bucket]
        group, members = self._group, self._members
        try:
            _together(
                lambda: self.client.update_weights_from_distributed(
                    [n for n, _ in bucket],
                    [dtype_name(t.dtype) for t in tensors],
                    [list(t.shape) for t in tensors],
                    self.group_name,
                    weight_version=version,
                    urls=members,
                ),
                lambda: [work.wait() for work in broadcast_async(group, tensors)],
                self.timeout_s,
                what=f"broadcasting {len(tensors)} tensors over {self.group_name!r}",
            )
        except Exception as exc:  # noqa: BLE001 - handed to the pool: the servers re-sync at the next step
            self._leave_group()  # the servers may hold a half-used group: start over at the next push
            self._fail_group(members, exc)

    def _fail_group(self, members: list[str], exc: Exception) -> None:
        """A collective failed and does not say which member broke it: the unreachable ones are out, the
        others suspect (they may hold part of the push) and re-join at the next re-sync."""
        healthy = self.client.health(members)
        for url in members:
            self._failed.setdefault(url, (f"{type(exc).__name__}: {exc}", healthy[url]))

    def _leave_group(self) -> None:
        group, members, self._group, self._members = self._group, self._members, None, []
        try:
            self.client.destroy_weights_update_group(self.group_name, members)
        except Exception:  # noqa: BLE001 - best effort: a server may never have joined
            pass
        close_group(group)

    def _pick_backend(self) -> str:
        """gloo on a CPU trainer, or when every server says it runs on the CPU; NCCL otherwise."""
        if self.backend != "auto":
            return self.backend
        if not torch.cuda.is_available():
            return "gloo"
        devices = [str(info.get("device", "cuda")) for info in self.client.get_model_info()]
        return "gloo" if all(d.startswith("cpu") for d in devices) else "nccl"


def _address_towards(url: str) -> str:
    """This host's address as seen from the server at `url` (the interface that routes to it)."""
    host = urlsplit(url).hostname or "127.0.0.1"
    if host in LOOPBACK_HOSTS:
        return "127.0.0.1"
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.connect((host, 9))  # UDP: picks the route, sends nothing
        return probe.getsockname()[0]


def _in_thread(fn: Callable[[], Any]) -> concurrent.futures.Future:
    """Run fn in a daemon thread (a collective stuck on a vanished peer must not block exit)."""
    future: concurrent.futures.Future = concurrent.futures.Future()

    def run() -> None:
        try:
            future.set_result(fn())
        except BaseException as exc:  # noqa: BLE001 - handed to the waiting caller
            future.set_exception(exc)

    threading.Thread(target=run, daemon=True, name="weight-sync").start()
    return future


def _together(remote: Callable[[], Any], local: Callable[[], Any], timeout_s: float, what: str) -> Any:
    """Run the servers' HTTP request and this rank's side of the collective at the same time.

    Both block until the other side is in the collective too, so neither may wait for the other to
    finish first. The first failure wins: a server that refused the request never joins, and this
    rank's side would otherwise wait for it until the group's timeout."""
    futures = [_in_thread(remote), _in_thread(local)]
    done, _ = concurrent.futures.wait(
        futures, timeout=timeout_s, return_when=concurrent.futures.FIRST_EXCEPTION
    )
    for future in futures:
        if future in done and future.exception() is not None:
            raise future.exception()
    if len(done) < len(futures):
        raise TimeoutError(f"{what}: no answer within {timeout_s:.0f} s")
    return futures[1].result()
