"""The pinned SGLang, installed for the contract tests only, outside the runtime venv.

    python -m tests.contract.sglang_env          # install (once; `make test` runs it), print the dir

SGLang pins torch==2.8.0 and transformers==4.57.1; installed with its requirements it would replace the
venv's torch 2.13 / transformers 5. So the wheel goes in `--no-deps` into `.cache/sglang-<version>/`
with the modules that importing `sglang.srt.managers.io_struct`, `sglang.srt.sampling.sampling_params`
and `sglang.srt.utils.common` needs beyond our venv (found by importing them; triton is the large one:
SGLang's memory-pool module defines Triton kernels at import time; nothing here runs them). Only
processes that put the directory on sys.path (tests/contract/sglang_front.py) ever see it.
"""

from __future__ import annotations

import fcntl
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SGLANG_VERSION = "0.5.4.post3"  # the Dockerfile's SGLANG_VERSION (tests/test_dockerfile.py checks it)
REQUIREMENTS = (
    f"sglang=={SGLANG_VERSION}",
    "triton==3.4.0",  # the Triton of SGLang's torch 2.8.0
    "pybase64==1.5.1", "ipython==9.18.1", "traitlets==5.16.1", "aiohttp==3.14.5", "aiohappyeyeballs==2.7.1",
    "aiosignal==1.4.0", "frozenlist==1.8.0", "multidict==7.2.1", "yarl==1.25.1", "propcache==0.5.4",
    "attrs==26.1.0", "orjson==3.13.0", "pyzmq==27.3.0", "partial-json-parser==0.2.1.1.post7", "dill==0.4.1",
    "sentencepiece==0.2.3", "msgspec==0.23.0",
)
TARGET = REPO / ".cache" / f"sglang-{SGLANG_VERSION}"


def ensure_installed() -> Path:
    """Install once (a stamp records the requirement list; a changed list reinstalls); returns the dir."""
    stamp = TARGET / ".installed"
    wanted = "\n".join(REQUIREMENTS) + "\n"
    TARGET.parent.mkdir(parents=True, exist_ok=True)
    with open(TARGET.parent / f".sglang-{SGLANG_VERSION}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # parallel test sessions install once
        if stamp.is_file() and stamp.read_text() == wanted:
            return TARGET
        cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--upgrade", "--target", str(TARGET),
               *REQUIREMENTS]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"installing SGLang {SGLANG_VERSION} for the contract tests failed: "
                               f"{' '.join(cmd)}\n{proc.stderr[-3000:]}")
        stamp.write_text(wanted)
    return TARGET


if __name__ == "__main__":
    print(ensure_installed())
