"""What every rollout engine offers the HTTP server, independent of how it generates.

The server speaks SGLang's HTTP API; an engine only sees the typed requests below. Field names follow
SGLang's (`max_new_tokens`, `top_k=-1` for "off", `finish_reason={"type": ...}`) so that translating
between the wire format and these objects is a rename-free copy.
"""

from __future__ import annotations

import abc
import concurrent.futures
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image


class EngineInputError(ValueError):
    """A request the engine refuses; `field` names the offending request field (the server's 4xx)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


@dataclass(frozen=True)
class SamplingParams:
    """Sampling settings of one request (SGLang's `sampling_params`, the subset we implement)."""

    max_new_tokens: int = 128
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = -1  # -1 (or 0) = no top-k, as in SGLang
    n: int = 1  # samples per prompt; they share one prefill
    stop: tuple[str, ...] = ()  # stop strings: the text is cut before them
    stop_token_ids: tuple[int, ...] = ()  # extra token ids that end a sample, like eos
    seed: int | None = None  # token j of sample i draws hash((seed, i), j): reproducible in any batch
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    no_stop_trim: bool = False  # keep the matched stop string at the end of the text

    def validate(self) -> None:
        """Raise EngineInputError naming the first bad field."""
        prefix = "sampling_params."
        if self.max_new_tokens < 0:
            raise EngineInputError(prefix + "max_new_tokens", f"must be >= 0, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise EngineInputError(prefix + "temperature", f"must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise EngineInputError(prefix + "top_p", f"must be in (0, 1], got {self.top_p}")
        if self.top_k < -1:
            raise EngineInputError(prefix + "top_k", f"must be -1 (off) or >= 0, got {self.top_k}")
        if self.n < 1:
            raise EngineInputError(prefix + "n", f"must be >= 1, got {self.n}")
        if any(not s for s in self.stop):
            raise EngineInputError(prefix + "stop", "stop strings must be non-empty")


@dataclass
class GenerateRequest:
    """One prompt to sample `sampling.n` completions for. Exactly one of text / input_ids is set."""

    text: str | None = None
    input_ids: list[int] | None = None
    images: list[Image.Image] = field(default_factory=list)
    sampling: SamplingParams = field(default_factory=SamplingParams)
    return_logprob: bool = False


@dataclass
class SampleOutput:
    """One completion, in SGLang's vocabulary (see `finish_reason`)."""

    text: str
    output_ids: list[int]
    # log p(token) under the raw (temperature 1, unfiltered) distribution, fp32; one per output id.
    output_logprobs: list[float]
    # {"type": "stop", "matched": token_id | str} or {"type": "length", "length": n}, as SGLang reports.
    finish_reason: dict[str, Any]
    prompt_tokens: int
    weight_version: int  # version of the weights when the sample finished

    @property
    def completion_tokens(self) -> int:
        return len(self.output_ids)


class RolloutEngine(abc.ABC):
    """An engine the rollout server can drive. Methods are thread-safe."""

    model_path: str
    weight_version: int
    max_context_len: int

    @abc.abstractmethod
    def submit(self, request: GenerateRequest) -> concurrent.futures.Future[list[SampleOutput]]:
        """Validate and queue one request; the future yields its `n` samples (validation errors raise here)."""

    def submit_batch(self, requests: list[GenerateRequest]) -> list[concurrent.futures.Future[list[SampleOutput]]]:
        """Validate and queue several requests that should batch together (one HTTP call's prompts); an engine
        whose batching depends on arrival order overrides this to queue them as one unit. A validation error
        names the prompt (`prompt i`) and cancels the ones already queued."""
        futures = []
        for i, request in enumerate(requests):
            try:
                futures.append(self.submit(request))
            except EngineInputError as exc:
                for future in futures:
                    future.cancel()
                if len(requests) > 1:
                    raise EngineInputError(exc.field, f"{exc.message} (prompt {i})") from exc
                raise
        return futures

    def generate(self, requests: list[GenerateRequest]) -> list[list[SampleOutput]]:
        """Blocking convenience: submit all requests (so they batch together) and wait for them."""
        return [f.result() for f in self.submit_batch(requests)]

    @abc.abstractmethod
    def apply_chat_template(self, messages: list[dict[str, Any]]) -> str:
        """Render OpenAI-style messages (images as `{"type": "image"}` parts) into a prompt string."""

    @abc.abstractmethod
    def update_weights_from_disk(self, model_path: str, weight_version: int | None = None) -> int:
        """Load HF weights from `model_path` in place; returns the new weight version."""

    def load_weights_from_disk(self, model_path: str, weight_version: int | None = None) -> int:
        """Alias of update_weights_from_disk (the name the trainer's design notes use)."""
        return self.update_weights_from_disk(model_path, weight_version)

    @abc.abstractmethod
    def update_weights_from_tensors(
        self, named_tensors: Iterable[tuple[str, torch.Tensor]], weight_version: int | None = None
    ) -> int:
        """Copy (HF name, tensor) pairs into the model in place; returns the new weight version."""

    def flush_cache(self) -> None:
        """Drop any cached prefixes (engines without a cross-request cache have nothing to drop)."""
        return None

    @abc.abstractmethod
    def model_info(self) -> dict[str, Any]:
        """What GET /get_model_info reports."""

    @abc.abstractmethod
    def shutdown(self) -> None:
        """Stop background threads; pending requests fail."""


class ExternalServer:
    """Launch, health-check, restart (bounded) and stop an external inference server process.

    Subclasses give the package to require and the command line; the supervisor is shared. Weight
    sync goes through the server's own HTTP routes (see the subclasses).
    """

    package: str = ""  # importable module that must exist (sglang / vllm)

    def __init__(
        self,
        model_path: str,
        host: str = "127.0.0.1",
        port: int = 30000,
        api_key: str | None = None,
        tp_size: int = 1,
        mem_fraction_static: float | None = None,
        context_length: int | None = None,
        extra_args: tuple[str, ...] = (),
        health_timeout: float = 900.0,
        max_restarts: int = 3,
        require_installed: bool = True,  # False only for tests / printing the command
        log_path: str | None = None,  # server stdout/stderr go here (appended); None = inherited
        base_gpu_id: int = 0,  # first of the tp_size GPUs the server uses (see launcher.server_base_gpu)
    ) -> None:
        if require_installed:
            _require_package(self.package)
        self.model_path, self.host, self.port, self.api_key = model_path, host, port, api_key
        self.tp_size, self.mem_fraction_static, self.context_length = tp_size, mem_fraction_static, context_length
        self.extra_args = tuple(extra_args)
        self.health_timeout, self.max_restarts = health_timeout, max_restarts
        self.log_path = log_path
        self.base_gpu_id = base_gpu_id
        self.restarts = 0
        self.process: Any = None  # subprocess.Popen once started

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def command(self) -> list[str]:
        raise NotImplementedError

    def env(self) -> dict[str, str] | None:
        """Environment of the child (None = inherit)."""
        return None

    def start(self):
        """Launch and wait for /health; returns self (so `Server(...).start()` chains)."""
        import subprocess

        out = open(self.log_path, "ab") if self.log_path else None  # noqa: SIM115 (the child owns it)
        # A new session makes the server and its workers (TP ranks, tokenizer manager) one process
        # group, so stop() can end all of them by the group id of the process we started.
        self.process = subprocess.Popen(self.command(), start_new_session=True, env=self.env(), stdout=out,
                                        stderr=subprocess.STDOUT if out else None)
        self.wait_healthy()
        return self

    def healthy(self) -> bool:
        import httpx

        try:
            return httpx.get(self.url + "/health", timeout=5.0).status_code == 200
        except httpx.HTTPError:
            return False

    def wait_healthy(self) -> None:
        import time

        deadline = time.monotonic() + self.health_timeout
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"{self.package} server exited with code {self.process.returncode} before "
                                   f"becoming healthy; command: {' '.join(self.command())}"
                                   + (f"; log: {self.log_path}" if self.log_path else ""))
            if self.healthy():
                return
            time.sleep(0.5)
        self.stop()
        raise TimeoutError(f"{self.package} server not healthy after {self.health_timeout:.0f} s at {self.url}")

    def ensure_running(self, check_health: bool = False) -> bool:
        """Restart the server if it died (or, with `check_health`, stopped answering /health); give up
        after `max_restarts` restarts. Returns whether it restarted."""
        if self.process is None:
            return False
        if self.process.poll() is None and not (check_health and not self.healthy()):
            return False
        if self.restarts >= self.max_restarts:
            raise RuntimeError(f"{self.package} server died {self.restarts + 1} times; not restarting again")
        self.restarts += 1
        self.stop()
        self.start()
        return True

    def stop(self, timeout: float = 30.0) -> None:
        import os
        import signal
        import subprocess

        if self.process is None or self.process.poll() is not None:
            return
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(self.process.pid, sig)
            except ProcessLookupError:
                return
            try:
                self.process.wait(timeout=timeout)
                return
            except subprocess.TimeoutExpired:
                continue

    def run_forever(self, poll_interval: float = 2.0) -> int:
        """`calibrl serve --engine sglang|vllm`: supervise until SIGINT/SIGTERM."""
        import signal
        import threading

        stopping = threading.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stopping.set())
        self.start()
        try:
            while not stopping.wait(poll_interval):
                self.ensure_running()
        finally:
            self.stop()
        return 0

    def _post(self, route: str, body: dict[str, Any], timeout: float = 600.0) -> dict[str, Any]:
        import httpx

        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        response = httpx.post(self.url + route, json=body, headers=headers, timeout=timeout)
        response.raise_for_status()
        return response.json()


def _require_package(package: str) -> None:
    import importlib.util

    if importlib.util.find_spec(package) is None:
        raise RuntimeError(f"{package} is not installed: pip install calibrl-mcore[gpu] on a GPU machine "
                           f"(or use --engine embedded)")
