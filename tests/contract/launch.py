"""Start a contract front (tests/contract/*_front.py) as its own process on a free loopback port."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

from rollout.launcher import free_port

REPO = Path(__file__).resolve().parents[2]


@contextmanager
def front(module: str, model: Path, log: Path, timeout: float = 300) -> Iterator[str]:
    """`python -m <module> --model <model> --port P` until /health answers; yields its URL, kills it after."""
    port = free_port()
    env = {**os.environ, "PYTHONPATH": f"{REPO}:{os.environ.get('PYTHONPATH', '')}", "OMP_NUM_THREADS": "1"}
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", module, "--model", str(model), "--port", str(port)],
                                cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    try:
        while True:
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-4000:]
            time.sleep(0.5)
        yield url
    finally:
        proc.kill()
        proc.wait(30)


def serve(create_app: Callable[[Any], Any]) -> int:
    """A front's main: `--model DIR --port P`, the embedded engine (CPU, fp32) behind `create_app(engine)`."""
    import argparse

    import torch
    import uvicorn

    from rollout.engines.embedded import EmbeddedEngine

    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--port", type=int, required=True)
    args = p.parse_args()
    engine = EmbeddedEngine(args.model, device="cpu", dtype=torch.float32)
    try:
        uvicorn.run(create_app(engine), host="127.0.0.1", port=args.port, log_level="warning")
    finally:
        engine.shutdown()
    return 0
