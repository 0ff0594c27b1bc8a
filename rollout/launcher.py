"""The embedded rollout server as a supervised child process on loopback (the trainer's colocated mode).

    server = EmbeddedServerProcess(model_path).start()      # python -m rollout.server on a free port
    client = RolloutClient([server.url])
    server.ensure_running(check_health=True)                 # restarts it (bounded) if it died or hangs
    server.stop()

The supervision (process group, health wait, bounded restarts, stop) is `ExternalServer`'s, shared with
the SGLang and vLLM launchers; this class only says how to start our own server.
"""

from __future__ import annotations

import atexit
import logging
import os
import socket
import sys
from pathlib import Path

import torch

from rollout.engines.base import ExternalServer

logger = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class EmbeddedServerProcess(ExternalServer):
    """`python -m rollout.server --model PATH` (embedded engine) on 127.0.0.1."""

    package = "rollout"  # our own package: always importable

    def __init__(self, model_path: str | Path, *, port: int | None = None, api_key: str = "",
                 log_path: str | Path | None = None, extra_args: list[str] | None = None,
                 health_timeout: float = 300.0, max_restarts: int = 3) -> None:
        super().__init__(str(model_path), port=port or free_port(), api_key=api_key or None,
                         extra_args=tuple(extra_args or ()), health_timeout=health_timeout,
                         max_restarts=max_restarts, log_path=str(log_path) if log_path else None)
        atexit.register(self.stop)  # a crashing trainer must not leave the server holding its port

    def command(self) -> list[str]:
        cmd = [sys.executable, "-m", "rollout.server", "--model", self.model_path, "--host", self.host,
               "--port", str(self.port)]
        if self.api_key:
            cmd += ["--api-key", self.api_key]
        return cmd + list(self.extra_args)

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["PYTHONPATH"] = f"{REPO}:{env.get('PYTHONPATH', '')}"
        return env

    def __enter__(self) -> EmbeddedServerProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def server_base_gpu(cfg, method: str, trainer_gpus: int, device_count: int) -> int | None:
    """The first GPU of the server the trainer starts on this node (it takes `server_tp_size` GPUs from
    there), or None when it runs on the CPU. `rollout.server_base_gpu` = -1 puts it after the node's
    `trainer_gpus` trainer ranks. A server that would share a GPU with a trainer rank is refused for
    `distributed` sync (NCCL refuses one GPU on both ends of a communicator: "Duplicate GPU detected")
    and allowed, with a warning, otherwise."""
    on_gpu = cfg.engine in ("sglang", "vllm") or str(cfg.server_device).startswith("cuda")
    if not on_gpu:
        return None
    base = cfg.server_base_gpu if cfg.server_base_gpu >= 0 else trainer_gpus
    gpus = range(base, base + (cfg.server_tp_size if cfg.engine != "embedded" else 1))
    shared = [g for g in gpus if g < trainer_gpus]
    if gpus.stop > device_count or shared:
        problem = (f"GPUs {list(gpus)} of a server beside {trainer_gpus} trainer GPU(s) on a node with "
                   f"{device_count}")
        if method == "distributed":
            raise ValueError(f"rollout.weight_sync_method=distributed: {problem}: the server would share a GPU "
                             f"with a trainer rank, which NCCL refuses; give the server its own GPUs "
                             f"(rollout.server_base_gpu, fewer trainer ranks per node, or rollout.urls)")
        logger.warning("%s: the server shares a GPU with the trainer", problem)
    return base


def start_rollout_server(cfg, model_path: str | Path, run_dir: Path, *, method: str = "tensor",
                         trainer_gpus: int = 0) -> ExternalServer:
    """Start the server a trainer colocates with itself (`rollout.engine`: embedded | sglang | vllm) on
    GPUs of its own (`server_base_gpu`)."""
    log_path = Path(run_dir) / "rollout_server.log"
    device_count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    base = server_base_gpu(cfg, method, trainer_gpus, device_count)
    if cfg.engine == "embedded":
        device = f"cuda:{base}" if base is not None and cfg.server_device == "cuda" else cfg.server_device
        return EmbeddedServerProcess(model_path, api_key=cfg.api_key, log_path=log_path,
                                     extra_args=["--device", device, "--dtype", cfg.server_dtype,
                                                 "--decode-graphs", cfg.decode_graphs]).start()
    if cfg.engine in ("sglang", "vllm"):
        if cfg.engine == "sglang":
            from rollout.engines.sglang import SGLangServer as server_class
        else:
            from rollout.engines.vllm import VLLMServer as server_class
        return server_class(str(model_path), port=free_port(), api_key=cfg.api_key or None,
                            tp_size=cfg.server_tp_size, mem_fraction_static=cfg.server_mem_fraction,
                            log_path=str(log_path), base_gpu_id=base or 0).start()
    raise ValueError(f"rollout.engine={cfg.engine!r} is not one of embedded, sglang, vllm")
