"""The pinned vLLM's Python code, installed for the contract tests only, outside the runtime venv.

    python -m tests.contract.vllm_env            # install (once), print the dir

vLLM 0.30.0 pins torch==2.13.0 like us, but its wheel is CUDA-only (compiled `_C` extensions) and its
requirements pull CUDA packages. Its HTTP layer does not need them: the wheel's `vllm/**/*.py` go into
`.cache/vllm-<version>/` (the `.so` files are left out), with the light modules that importing
`vllm.entrypoints.openai.completion.protocol`, `vllm.entrypoints.serve.dev.{rlhf,rpc}.api_router` and
`vllm.entrypoints.serve.exception_handling.register` needs beyond our venv (found by importing them).
Only processes that put the directory on sys.path (tests/contract/vllm_front.py) see it.
"""

from __future__ import annotations

import fcntl
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
VLLM_VERSION = "0.30.0"  # pyproject's `gpu` extra and the Dockerfile (rollout/engines/vllm.py)
LIGHT = (
    "cbor2==6.3.0", "pyzmq==27.3.0", "aiohttp==3.14.5", "aiohappyeyeballs==2.7.1", "aiosignal==1.4.0",
    "frozenlist==1.8.0", "multidict==7.2.1", "yarl==1.25.1", "propcache==0.5.4", "attrs==26.1.0",
    "openai-harmony==0.0.8", "pybase64==1.5.1", "cachetools==8.0.2", "prometheus-client==0.26.0",
    "msgspec==0.23.0", "cloudpickle==3.1.3", "uvloop==0.23.0", "py-cpuinfo==9.0.0", "partial-json-parser==0.2.1.1.post7",
    "xgrammar==0.2.9", "apache-tvm-ffi==0.1.15.post2", "llguidance==1.9.1", "watchfiles==1.3.0",
)
TARGET = REPO / ".cache" / f"vllm-{VLLM_VERSION}"


def _run(cmd: list[str]) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"installing vLLM {VLLM_VERSION} for the contract tests failed: {' '.join(cmd)}\n"
                           f"{proc.stderr[-3000:]}")


def ensure_installed() -> Path:
    """Install once (a stamp records what was installed; a change reinstalls); returns the dir."""
    stamp = TARGET / ".installed"
    wanted = "\n".join((f"vllm=={VLLM_VERSION}", *LIGHT)) + "\n"
    TARGET.parent.mkdir(parents=True, exist_ok=True)
    with open(TARGET.parent / f".vllm-{VLLM_VERSION}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # parallel test sessions install once
        if stamp.is_file() and stamp.read_text() == wanted:
            return TARGET
        pip = [sys.executable, "-m", "pip"]
        _run([*pip, "install", "--quiet", "--no-deps", "--upgrade", "--target", str(TARGET), *LIGHT])
        with tempfile.TemporaryDirectory() as tmp:
            _run([*pip, "download", "--quiet", "--no-deps", f"vllm=={VLLM_VERSION}", "-d", tmp])
            wheel = next(Path(tmp).glob("vllm-*.whl"))
            with zipfile.ZipFile(wheel) as zf:
                zf.extractall(TARGET, [n for n in zf.namelist() if n.startswith("vllm/") and n.endswith(".py")])
        stamp.write_text(wanted)
    return TARGET


if __name__ == "__main__":
    print(ensure_installed())
