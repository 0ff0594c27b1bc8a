"""A real vLLM server (`vllm serve`), launched and supervised as a subprocess (GPU machines).

vLLM serves the OpenAI routes (`/v1/chat/completions`, `/v1/completions`) and `/health`, but not
SGLang's `/generate` or weight-update routes. Weight sync therefore restarts the server on the new
checkpoint (`reload`), which is slow; prefer SGLang for RL training and use vLLM for evaluation.
"""

from __future__ import annotations

import shutil
import sys

from rollout.engines.base import ExternalServer


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

    def reload(self, model_path: str) -> None:
        """Serve another checkpoint: stop, then start on `model_path` (vLLM has no HTTP weight update)."""
        self.stop()
        self.model_path = model_path
        self.start()

    def update_weights_from_disk(self, model_path: str, weight_version: int | None = None) -> dict[str, object]:
        self.reload(model_path)
        return {"success": True, "message": "vLLM restarted on the new checkpoint", "weight_version": weight_version}
