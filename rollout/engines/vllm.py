"""vLLM: the pinned version, what calibrl drives of it, and the start-time refusals of what it lacks.

The `gpu` extra pins vllm==0.30.0 (its own pins, torch==2.13.0 and transformers>=5.10.4, fit ours). The
trainer and `calibrl eval` drive it through rollout/vllm_adapter.py: OpenAI `/v1/completions` with
token-id prompts, n, per-request `seed`, `logprobs=0` and `return_token_ids`, and, in dev mode
(VLLM_SERVER_DEV_MODE=1), weights from disk via `/pause`, `/collective_rpc` reload_weights,
`/update_weight_version`, `/resume` (vllm/entrypoints/serve/dev/{rlhf,rpc}/api_router.py). Not driven:
its NCCL weight-transfer engine (`/init_weight_transfer_engine`, `/update_weights`, vLLM's own packed
format, vllm/distributed/weight_transfer/nccl_engine.py) and images with token prompts (0.30.0's
`/v1/completions` has none). Those, and servers older than 0.30.0, are refused before the first step.
"""

from __future__ import annotations

import os
import shutil
import sys

from rollout.engines.base import ExternalServer

VLLM_VERSION = "0.30.0"  # pyproject's `gpu` extra; the Dockerfile names it (not installed there)


def _release(version: str) -> tuple[int, ...]:
    return tuple(int(p) for p in version.split("+")[0].split(".")[:3] if p.isdigit())


def check_vllm(url: str, version: str) -> None:
    """Refuse a vLLM server at `url` whose `/version` is older than the routes calibrl drives."""
    if not version or _release(version) < _release(VLLM_VERSION):
        raise ValueError(f"rollout.urls: {url} is vLLM {version or '(unknown version)'}; calibrl drives vLLM's "
                         f"/v1/completions return_token_ids and dev-mode /pause, /collective_rpc reload_weights, "
                         f"/update_weight_version routes, which need vllm>={VLLM_VERSION}")


def check_vllm_method(method: str) -> str:
    """`rollout.weight_sync_method` for vLLM: disk (auto) only."""
    if method not in ("auto", "disk"):
        raise ValueError(f"rollout.weight_sync_method={method!r}: with rollout.engine=vllm only 'disk' (or auto) is "
                         f"supported; vLLM {VLLM_VERSION}'s NCCL weight-transfer engine is not driven by calibrl yet")
    return "disk"


class VLLMServer(ExternalServer):
    package = "vllm"

    def command(self) -> list[str]:
        executable = shutil.which("vllm")
        cmd = [executable, "serve", self.model_path] if executable else [
            sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", self.model_path]
        cmd += ["--host", self.host, "--port", str(self.port), "--tensor-parallel-size", str(self.tp_size)]
        if self.mem_fraction_static is not None:
            cmd += ["--gpu-memory-utilization", str(self.mem_fraction_static)]
        if self.context_length is not None:
            cmd += ["--max-model-len", str(self.context_length)]
        if self.api_key is not None:
            cmd += ["--api-key", self.api_key]
        return cmd + list(self.extra_args)

    def env(self) -> dict[str, str]:
        """vLLM has no --base-gpu-id: its GPUs are chosen by CUDA_VISIBLE_DEVICES."""
        gpus = ",".join(str(self.base_gpu_id + i) for i in range(self.tp_size))
        return {**os.environ, "CUDA_VISIBLE_DEVICES": gpus}
