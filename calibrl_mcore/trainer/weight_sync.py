"""Trainer -> rollout server weight sync.

Each pipeline stage exports its own parameters under HF names, gathered over TP one tensor at a time
(`hf_mapping.gather_megatron_to_hf`); the stage's (DP 0, TP 0) rank pushes them to every server in
buckets of at most `bucket_mb`, so no rank ever holds a full-model copy. Each bucket carries the new
weight version; servers report it with every response.
"""

from __future__ import annotations

import torch.distributed as dist
from megatron.core import parallel_state

from rollout.client import RolloutClient


class WeightSync:
    def __init__(self, policy, urls: list[str], *, api_key: str = "", bucket_mb: int = 64,
                 timeout_s: float = 600.0, max_retries: int = 3) -> None:
        self.policy = policy
        self.bucket_bytes = bucket_mb * 2**20
        self.pusher = (parallel_state.get_data_parallel_rank() == 0
                       and parallel_state.get_tensor_model_parallel_rank() == 0)
        self.client = (RolloutClient(urls, api_key=api_key or None, timeout=timeout_s, max_retries=max_retries)
                       if self.pusher else None)

    def push(self, version: int) -> None:
        """Every rank calls this: DP-0 ranks gather over TP, TP-0 of each stage sends its buckets."""
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
