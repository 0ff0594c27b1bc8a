"""Step metrics: DP reduction of loss shares, hand-over from the last pipeline stage, JSONL/TensorBoard/tqdm.

Loss callbacks return *shares* (summing over micro-batches and DP ranks gives the mini-batch value), so
the reduction is a plain sum over the DP group. Metrics that only the last pipeline stage computes are
then broadcast over the pipeline group to the first stage, where global rank 0 writes them.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import parallel_state


def reduce_shares(shares: dict[str, torch.Tensor], prefix: str = "") -> dict[str, float]:
    """Sum per-rank metric shares over DP x CP (call on every rank of a last pipeline stage): under context
    parallelism each CP rank holds the share of its part of the tokens."""
    if not shares:
        return {}
    names = sorted(shares)
    packed = torch.stack([torch.as_tensor(shares[k], dtype=torch.float64).reshape(()) for k in names])
    if parallel_state.get_data_parallel_world_size(with_context_parallel=True) > 1:
        dist.all_reduce(packed, group=parallel_state.get_data_parallel_group(with_context_parallel=True))
    return {prefix + k: float(v) for k, v in zip(names, packed.tolist())}


def from_last_stage(metrics: dict[str, float]) -> dict[str, float]:
    """Every rank calls this; returns the last stage's `metrics` (identity without PP)."""
    if parallel_state.get_pipeline_model_parallel_world_size() == 1:
        return metrics
    group = parallel_state.get_pipeline_model_parallel_group()
    last = parallel_state.get_pipeline_model_parallel_last_rank()
    payload = [metrics if parallel_state.is_pipeline_last_stage() else None]
    dist.broadcast_object_list(payload, src=last, group=group)
    return payload[0]


def mean_of(dicts: list[dict[str, float]]) -> dict[str, float]:
    """Key-wise mean over mini-batches."""
    keys = {k for d in dicts for k in d}
    return {k: sum(d[k] for d in dicts if k in d) / sum(k in d for d in dicts) for k in keys}


class MetricsLogger:
    """metrics.jsonl (+ TensorBoard events, + a tqdm bar) in the run directory; no-op when disabled."""

    def __init__(self, run_dir: Path, *, enabled: bool, tensorboard: bool = True, progress_total: int | None = None):
        self.enabled = enabled
        self._tb = None
        self._bar = None
        if not enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        self._file = open(run_dir / "metrics.jsonl", "a")  # noqa: SIM115 (kept open for the run)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(run_dir / "tensorboard"))
        if progress_total:
            from tqdm import tqdm

            self._bar = tqdm(total=progress_total, desc="calibrl", dynamic_ncols=True)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        clean = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and math.isfinite(v)}
        self._file.write(json.dumps({"step": step, **clean}, sort_keys=True) + "\n")
        self._file.flush()
        if self._tb is not None:
            for k, v in clean.items():
                self._tb.add_scalar(k, v, step)
        if self._bar is not None:
            self._bar.n = step
            shown = {k.split("/")[-1]: f"{clean[k]:.3g}" for k in ("reward/mean", "train/loss", "train/entropy")
                     if k in clean}
            self._bar.set_postfix(shown, refresh=True)

    def close(self) -> None:
        if not self.enabled:
            return
        self._file.close()
        if self._tb is not None:
            self._tb.close()
        if self._bar is not None:
            self._bar.close()
