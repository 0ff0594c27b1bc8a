"""Trainer -> rollout server weight sync.

method "tensor" (the embedded server): each pipeline stage exports its own parameters under HF names,
gathered over TP one tensor at a time (`hf_mapping.gather_megatron_to_hf`); the stage's (DP 0, TP 0)
rank pushes them to every server in buckets of at most `bucket_mb` (safetensors payloads on
`/update_weights_from_tensor`), so no rank ever holds a full-model copy. Each bucket carries the new
weight version; servers report it with every response.

method "disk" (SGLang / vLLM): the policy is written as an HF checkpoint (`export_hf`, one shard per
stage) and every server reloads it through `/update_weights_from_disk`. Slower, but it only needs the
servers' stock routes; a shared file system between trainer and servers is assumed.
"""

from __future__ import annotations

from pathlib import Path

import torch.distributed as dist
from megatron.core import parallel_state

from calibrl_mcore.trainer.export import export_hf
from rollout.client import RolloutClient


class WeightSync:
    def __init__(self, policy, urls: list[str], *, api_key: str = "", bucket_mb: int = 64,
                 timeout_s: float = 600.0, max_retries: int = 3, method: str = "tensor",
                 src_dir: str | Path | None = None, stage_dir: str | Path | None = None) -> None:
        if method not in ("tensor", "disk"):
            raise ValueError(f"weight sync method {method!r} is not one of tensor, disk")
        if method == "disk" and (src_dir is None or stage_dir is None):
            raise ValueError("disk weight sync needs src_dir (config/tokenizer source) and stage_dir")
        self.policy, self.method = policy, method
        self.src_dir, self.stage_dir = src_dir, Path(stage_dir) if stage_dir else None
        self.bucket_bytes = bucket_mb * 2**20
        self.pusher = (parallel_state.get_data_parallel_rank() == 0
                       and parallel_state.get_tensor_model_parallel_rank() == 0)
        if method == "disk":
            self.pusher = dist.get_rank() == 0  # one reload request per server
        self.client = (RolloutClient(urls, api_key=api_key or None, timeout=timeout_s, max_retries=max_retries)
                       if self.pusher else None)

    def push(self, version: int) -> None:
        """Every rank calls this: DP-0 ranks gather over TP, TP-0 of each stage sends its buckets."""
        if self.method == "disk":
            path = export_hf(self.policy, self.src_dir, self.stage_dir / "latest")
            if self.client is not None:
                self.client.update_weights_from_disk(str(path), weight_version=version)
            dist.barrier()
            return
        if parallel_state.get_data_parallel_rank() == 0:
            bucket, size = [], 0
            for name, tensor in self.policy.iter_hf_weights():
                if self.client is None:
                    continue  # TP peers only take part in the gathers
                bucket.append((name, tensor.cpu()))
                size += tensor.numel() * tensor.element_size()
                if size >= self.bucket_bytes:
                    self.client.update_weights_from_tensors(bucket, weight_version=version)
                    bucket, size = [], 0
            if self.client is not None and bucket:
                self.client.update_weights_from_tensors(bucket, weight_version=version)
        dist.barrier()

    def close(self) -> None:
        if self.client is not None:
            self.client.close()
