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
import os
import socket
import sys
from pathlib import Path

from rollout.engines.base import ExternalServer

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


def start_rollout_server(cfg, model_path: str | Path, run_dir: Path) -> ExternalServer:
    """Start the server a trainer colocates with itself (`rollout.engine`: embedded | sglang | vllm)."""
    log_path = Path(run_dir) / "rollout_server.log"
    if cfg.engine == "embedded":
        return EmbeddedServerProcess(model_path, api_key=cfg.api_key, log_path=log_path,
                                     extra_args=["--device", cfg.server_device, "--dtype", cfg.server_dtype,
                                                 "--decode-graphs", cfg.decode_graphs]).start()
    if cfg.engine in ("sglang", "vllm"):
        if cfg.engine == "sglang":
            from rollout.engines.sglang import SGLangServer as server_class
        else:
            from rollout.engines.vllm import VLLMServer as server_class
        return server_class(str(model_path), port=free_port(), api_key=cfg.api_key or None,
                            tp_size=cfg.server_tp_size, mem_fraction_static=cfg.server_mem_fraction,
                            log_path=str(log_path)).start()
    raise ValueError(f"rollout.engine={cfg.engine!r} is not one of embedded, sglang, vllm")
