"""A real SGLang server, launched and supervised as a subprocess (GPU machines; `pip install .[gpu]`).

SGLang serves the rollout API natively (it is the API's reference), so the trainer talks to it exactly
as to the embedded engine; this class only starts it, restarts it (bounded) and syncs weights.
"""

from __future__ import annotations

import sys
from typing import Any

from rollout.engines.base import ExternalServer


class SGLangServer(ExternalServer):
    """`python -m sglang.launch_server ...`; sglang is imported only by the child process."""

    package = "sglang"

    def command(self) -> list[str]:
        cmd = [sys.executable, "-m", "sglang.launch_server", "--model-path", self.model_path,
               "--host", self.host, "--port", str(self.port), "--tp-size", str(self.tp_size)]
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

    def flush_cache(self) -> dict[str, Any]:
        return self._post("/flush_cache", {})
