"""Launch a worker script under a real `torchrun` (gloo on CPU) and collect its JSON result.

Workers live in tests/workers/. Each receives `--out DIR` and writes `rank{RANK}.json` there; the test
reads the files back and compares layouts. Failures surface the workers' stdout/stderr in the assertion.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from rollout.launcher import free_port

REPO = Path(__file__).resolve().parents[1]
WORKERS = REPO / "tests" / "workers"


def run_torchrun(
    worker: str,
    nproc: int,
    out_dir: Path,
    *args: str,
    timeout: float = 600,
    nnodes: int = 1,
    extra_env: dict[str, str] | None = None,
) -> list[dict]:
    """Run tests/workers/<worker> on `nproc` local processes; return each rank's JSON result, by rank."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env.update({"OMP_NUM_THREADS": "1", "PYTHONPATH": f"{REPO}:{env.get('PYTHONPATH', '')}"})
    env.update(extra_env or {})
    cmd = [
        sys.executable, "-m", "torch.distributed.run",
        f"--nproc_per_node={nproc}", f"--nnodes={nnodes}",
        "--master_addr=127.0.0.1", f"--master_port={free_port()}",
        str(WORKERS / worker), "--out", str(out_dir), *args,
    ]
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(
            f"torchrun {worker} x{nproc} failed (rc={proc.returncode})\n"
            f"--- stdout ---\n{proc.stdout[-6000:]}\n--- stderr ---\n{proc.stderr[-8000:]}"
        )
    results = []
    for rank in range(nproc * nnodes):
        path = out_dir / f"rank{rank}.json"
        if path.exists():
            results.append(json.loads(path.read_text()))
    return results
