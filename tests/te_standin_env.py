"""Running Megatron's TE spec on the CPU: the Transformer Engine stand-ins of tests/te_standin.

`te_env()` is the environment for a torchrun / subprocess that should see Transformer Engine: the stand-in
package put first on PYTHONPATH, unless the real TE can run here (installed and CUDA up), in which case the
same tests run against it. It must be set before Megatron is imported: Megatron decides at import time
(`HAVE_TE`) whether its TE wrappers subclass TE's classes, so the stand-ins never share a process with the
pytest process's TE-less Megatron.

`prepare_megatron()` (call in the worker, before building a model): TEDotProductAttention creates a
`torch.cuda.Stream` for context parallelism on first use; on the CPU it gets a placeholder (the stand-in
attention never uses it).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

STANDIN = Path(__file__).resolve().parent / "te_standin"
REPO = STANDIN.parents[1]


def real_te_usable() -> bool:
    import torch

    return torch.cuda.is_available() and importlib.util.find_spec("transformer_engine") is not None


def te_env() -> dict[str, str]:
    """Extra environment for `run_torchrun(..., extra_env=te_env())`."""
    if real_te_usable():
        return {}
    return {"PYTHONPATH": os.pathsep.join([str(STANDIN), str(REPO), os.environ.get("PYTHONPATH", "")])}


def prepare_megatron() -> None:
    import torch
    import transformer_engine

    if getattr(transformer_engine, "STANDIN", False) and not torch.cuda.is_available():
        from megatron.core.extensions.transformer_engine import TEDotProductAttention

        if TEDotProductAttention.cp_stream is None:
            TEDotProductAttention.cp_stream = "no CUDA stream: TE stand-in"
