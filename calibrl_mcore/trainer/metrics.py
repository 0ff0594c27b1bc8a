"""Step metrics: DP reduction of loss shares, hand-over from the last pipeline stage, JSONL/TensorBoard/W&B,
the progress line and the summary block.

Loss callbacks return *shares* (summing over micro-batches and DP ranks gives the mini-batch value), so
the reduction is a plain sum over the DP group. Metrics that only the last pipeline stage computes are
then broadcast over the pipeline group to the first stage, where global rank 0 writes them.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from calibrl_mcore.terminal import COMMAND_STARTED, TRAIN_FIELDS, ProgressLine, summary_block
from calibrl_mcore.trainer.wandb_sink import WandbSink


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


# Wall-time parts of a step the summary splits the run into (metric key -> name).
TIME_SPLIT = {"rollout/time_s": "rollout", "time/train_s": "train", "time/weight_sync_s": "weight sync"}


class MetricsLogger:
    """metrics.jsonl (+ TensorBoard events, + a W&B run, + the progress line) in the run directory; a no-op when
    disabled (ranks other than 0). `close(written)` prints the summary block (terminal.summary_block)."""

    def __init__(self, run_dir: Path, *, enabled: bool, tensorboard: bool = True, progress_total: int | None = None,
                 label: str = "train", fields: Sequence[tuple[str, str]] = TRAIN_FIELDS,
                 wandb: WandbSink | None = None, started: float | None = None) -> None:
        self.enabled = enabled
        self.run_dir = run_dir
        self.label, self.fields = label, fields
        self.started = COMMAND_STARTED if started is None else started
        self.latest: dict[str, float] = {}
        self.time_split = dict.fromkeys(TIME_SPLIT.values(), 0.0)
        self._tb = None
        self._line = None
        self.wandb = wandb
        if not enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        self._file = open(run_dir / "metrics.jsonl", "a")  # noqa: SIM115 (kept open for the run)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(run_dir / "tensorboard"))
        if progress_total:
            self._line = ProgressLine(label, progress_total, fields)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        clean = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and math.isfinite(v)}
        self._file.write(json.dumps({"step": step, **clean}, sort_keys=True) + "\n")
        self._file.flush()
        if self._tb is not None:
            for k, v in clean.items():
                self._tb.add_scalar(k, v, step)
        if self.wandb is not None:
            self.wandb.log(step, clean)
        self.latest.update(clean)
        for key, part in TIME_SPLIT.items():
            self.time_split[part] += clean.get(key, 0.0)
        if self._line is not None:
            self._line.update(step, self.latest)

    def files(self) -> dict[str, str]:
        """What this logger wrote, for the summary block."""
        out = {"metrics": str(self.run_dir / "metrics.jsonl")}
        if self._tb is not None:
            out["tensorboard"] = str(self.run_dir / "tensorboard")
        if self.wandb is not None:
            out["wandb"] = str(self.wandb.dir)
        return out

    def close(self, written: dict[str, str | Path] | None = None, *, summary: bool = True) -> None:
        """Close the sinks and (`summary`) print the summary block: final metrics, wall time split, the paths
        written (`written` first, e.g. the checkpoint, then this logger's files)."""
        if not self.enabled:
            return
        self._file.close()
        if self._tb is not None:
            self._tb.close()
        if self.wandb is not None:
            self.wandb.close()
        if self._line is not None:
            self._line.close()
        if summary:
            wall = time.perf_counter() - self.started
            print(summary_block(self.label, self.latest, self.fields, wall_s=wall, split=self.time_split,
                                written={**(written or {}), **self.files()}), flush=True)
