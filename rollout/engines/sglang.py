"""A real SGLang server, launched and supervised as a subprocess (GPU machines; `pip install .[gpu]`).

SGLang serves the rollout API natively (it is the API's reference), so the trainer talks to it exactly
as to the embedded engine; this class only starts it, restarts it (bounded) and syncs weights.

Weight sync (`rollout.weight_sync_method`): "disk" (the default for SGLang) reloads an exported HF
checkpoint; "distributed" uses SGLang's `/init_weights_update_group` + `/update_weights_from_distributed`:
the trainer's pusher is rank 0 of an NCCL group, this server's TP workers join as ranks
`rank_offset + tp_rank`, and every bucket is broadcast GPU to GPU. That needs NCCL connectivity between
the trainer's GPU and the server's GPUs (same node, or the network NCCL uses between nodes) and the
trainer's host reachable on the group's TCP port. With PP > 1 each trainer stage owns a group of its own
(`<name>_pp<stage>`), which needs an SGLang recent enough to keep several named groups.
"""

from __future__ import annotations

import sys
from typing import Any

from rollout.engines.base import ExternalServer


class SGLangServer(ExternalServer):
    """`python -m sglang.launch_server ...`; sglang is imported only by the child process."""

    package = "sglang"

    def command(self) -> list[str]:
        # --enable-deterministic-inference: only with it does SGLang act on each request's
        # `sampling_seed`, which is how the trainer's rollouts stay reproducible (rollout/client.py).
        # --base-gpu-id: GPUs of its own, never a trainer rank's (launcher.server_base_gpu).
        cmd = [sys.executable, "-m", "sglang.launch_server", "--model-path", self.model_path,
               "--host", self.host, "--port", str(self.port), "--tp-size", str(self.tp_size),
               "--base-gpu-id", str(self.base_gpu_id), "--enable-deterministic-inference"]
        if self.mem_fraction_static is not None:
            cmd += ["--mem-fraction-static", str(self.mem_fraction_static)]
        if self.context_length is not None:
            cmd += ["--context-length", str(self.context_length)]
        if self.api_key is not None:
            cmd += ["--api-key", self.api_key]
        return cmd + list(self.extra_args)

    def update_weights_from_disk(self, model_path: str, weight_version: int | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {"model_path": model_path}
        if weight_version is not None:
            body["weight_version"] = str(weight_version)  # SGLang keeps versions as strings
        return self._post("/update_weights_from_disk", body)

    def update_weights_from_tensor(
        self,
        serialized_named_tensors: list[str],
        load_format: str | None = None,
        flush_cache: bool = True,
        weight_version: int | None = None,
    ) -> dict[str, Any]:
        """SGLang's route as is: one serialized payload per TP rank (SGLang's own serializer, or
        `load_format` naming another), produced by the trainer's weight-sync code."""
        body: dict[str, Any] = {"serialized_named_tensors": serialized_named_tensors, "flush_cache": flush_cache}
        if load_format is not None:
            body["load_format"] = load_format
        if weight_version is not None:
            body["weight_version"] = str(weight_version)
        return self._post("/update_weights_from_tensor", body)

    def init_weights_update_group(self, master_address: str, master_port: int, rank_offset: int, world_size: int,
                                  group_name: str = "weight_update_group", backend: str = "nccl") -> dict[str, Any]:
        """Join the trainer's group (blocks until the trainer, rank 0, joins too: call it from a thread)."""
        return self._post("/init_weights_update_group", {
            "master_address": master_address, "master_port": master_port, "rank_offset": rank_offset,
            "world_size": world_size, "group_name": group_name, "backend": backend})

    def update_weights_from_distributed(self, names: list[str], dtypes: list[str], shapes: list[list[int]],
                                        group_name: str = "weight_update_group", flush_cache: bool = True,
                                        weight_version: int | None = None) -> dict[str, Any]:
        """Announce a bucket; rank 0 then broadcasts one tensor per name, in order (from another thread)."""
        body: dict[str, Any] = {"names": names, "dtypes": dtypes, "shapes": shapes, "group_name": group_name,
                                "flush_cache": flush_cache}
        if weight_version is not None:
            body["weight_version"] = str(weight_version)
        return self._post("/update_weights_from_distributed", body)

    def destroy_weights_update_group(self, group_name: str = "weight_update_group") -> dict[str, Any]:
        return self._post("/destroy_weights_update_group", {"group_name": group_name})

    def flush_cache(self) -> dict[str, Any]:
        return self._post("/flush_cache", {})
