"""Start, watch and restart a rollout server process on loopback (the trainer's colocated mode).

    with EmbeddedServerProcess(model_path) as server:      # python -m rollout.server on a free port
        client = RolloutClient([server.url])
        ...
        server.ensure_alive()                               # restarts it (bounded) if it died

The child is started in its own process session so a trainer crash cannot leave it orphaned holding the
port: `stop()` kills the whole group, and `atexit` calls it too.
"""

from __future__ import annotations

import atexit
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

log = logging.getLogger(__name__)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class EmbeddedServerProcess:
    """`python -m rollout.server --model PATH` as a supervised child process on 127.0.0.1."""

    def __init__(
        self,
        model_path: str | Path,
        *,
        port: int | None = None,
        api_key: str = "",
        startup_timeout_s: float = 300.0,
        max_restarts: int = 3,
        log_path: str | Path | None = None,
        extra_args: list[str] | None = None,
    ) -> None:
        self.model_path = str(model_path)
        self.port = port or free_port()
        self.api_key = api_key
        self.startup_timeout_s = startup_timeout_s
        self.max_restarts = max_restarts
        self.restarts = 0
        self.log_path = Path(log_path) if log_path else None
        self.extra_args = extra_args or []
        self._proc: subprocess.Popen | None = None
        atexit.register(self.stop)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        cmd = [sys.executable, "-m", "rollout.server", "--model", self.model_path,
               "--host", "127.0.0.1", "--port", str(self.port)]
        if self.api_key:
            cmd += ["--api-key", self.api_key]
        return cmd + self.extra_args

    def start(self) -> EmbeddedServerProcess:
        out = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL  # noqa: SIM115
        env = dict(os.environ)
        repo = str(Path(__file__).resolve().parents[1])
        env["PYTHONPATH"] = f"{repo}:{env.get('PYTHONPATH', '')}"
        self._proc = subprocess.Popen(self.command(), stdout=out, stderr=subprocess.STDOUT, env=env,
                                      start_new_session=True)
        self._wait_healthy()
        return self

    def _wait_healthy(self) -> None:
        deadline = time.monotonic() + self.startup_timeout_s
        while time.monotonic() < deadline:
            if self._proc is not None and self._proc.poll() is not None:
                raise RuntimeError(
                    f"rollout server exited with code {self._proc.returncode} during start-up "
                    f"(command: {' '.join(self.command())}; log: {self.log_path or 'not kept'})"
                )
            if self.healthy():
                return
            time.sleep(0.25)
        self.stop()
        raise TimeoutError(f"rollout server at {self.url} not healthy after {self.startup_timeout_s:.0f}s")

    def healthy(self) -> bool:
        try:
            return httpx.get(self.url + "/health", timeout=2.0).status_code == 200
        except httpx.HTTPError:
            return False

    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def ensure_alive(self) -> bool:
        """Restart the server if its process died or stopped answering; True if a restart happened."""
        if self.alive() and self.healthy():
            return False
        if self.restarts >= self.max_restarts:
            raise RuntimeError(f"rollout server at {self.url} died {self.restarts + 1} times; giving up")
        self.restarts += 1
        log.warning("rollout server at %s is down; restart %d/%d", self.url, self.restarts, self.max_restarts)
        self.stop()
        self.start()
        return True

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=15)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait(timeout=15)

    def __enter__(self) -> EmbeddedServerProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
