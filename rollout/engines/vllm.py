"""vLLM: what the pinned version serves, and why `calibrl train` refuses it at start.

The `gpu` extra pins vllm==0.30.0 (its own pins, torch==2.13.0 and transformers>=5.10.4, fit ours). It
serves the OpenAI routes (`/v1/completions` with token-id prompts and `logprobs`, `/v1/chat/completions`
with images), `/health`, `/version`, and in dev mode (VLLM_SERVER_DEV_MODE=1) its RL weight path:
`/pause`, `/init_weight_transfer_engine`, `/start_weight_update`, `/update_weights`,
`/finish_weight_update`, `/resume` (vllm/entrypoints/serve/dev/rlhf/api_router.py), whose NCCL engine
moves weights in vLLM's own packed format (vllm/distributed/weight_transfer/nccl_engine.py). It has no
`/generate`, no `/update_weights_from_disk` and no `/update_weights_from_distributed`.

calibrl's trainer and `calibrl eval` speak SGLang's routes (rollout/client.py). Driving vLLM's completion
routes and its weight-transfer engine is not written yet, so a vLLM server is refused before the first
step (`check_vllm`) with this message instead of a 404 mid-run; `calibrl serve --engine vllm` still
launches and supervises one.
"""

from __future__ import annotations

import os
import shutil
import sys

from rollout.engines.base import ExternalServer

VLLM_VERSION = "0.30.0"  # pyproject's `gpu` extra; the Dockerfile names it (not installed there)
UNSUPPORTED = (
    f"vLLM {VLLM_VERSION} (the pinned version) serves /v1/completions and its dev-mode weight-transfer engine "
    "(/init_weight_transfer_engine, /update_weights), not SGLang's /generate and /update_weights_from_* routes "
    "that calibrl train and calibrl eval use; calibrl does not drive vLLM's routes yet: use rollout.engine=sglang "
    "(sglang==0.5.4.post3) or embedded"
)


def check_vllm(what: str) -> None:
    """Refuse a vLLM server for `what` (a config key or a URL) before any request is sent."""
    raise ValueError(f"{what}: {UNSUPPORTED}")


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
