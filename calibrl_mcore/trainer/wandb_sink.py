"""Metrics to a Weights & Biases run, next to metrics.jsonl and TensorBoard (`train.wandb=PROJECT`).

    sink = WandbSink.open(run_dir, project="calibrl", mode="offline", config=resolved_config_dict, job="train")
    sink.log(step, {"reward/mean": 0.4, ...})
    sink.close()

The run's files live in `<run_dir>/wandb/`; its id is kept in `<run_dir>/wandb/run_id`, so a resumed training
run (same run_dir) continues the same W&B run instead of starting a second one. `mode`: online (the W&B
server, needs `wandb login` or WANDB_API_KEY), offline (writes locally, no network; upload later with
`wandb sync <run_dir>/wandb/offline-run-*`) or auto (WANDB_MODE if set, else online). `wandb` is imported
only here, only when asked for (`pip install 'calibrl-mcore[wandb]'`).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from calibrl_mcore.config import TrainConfig


class WandbSink:
    def __init__(self, run: Any) -> None:
        self.run = run

    @classmethod
    def open(cls, run_dir: Path, *, project: str, mode: str = "auto", config: Mapping[str, Any] | None = None,
             job: str = "train", name: str | None = None) -> WandbSink:
        try:
            import wandb
        except ImportError as exc:
            raise RuntimeError(f"train.wandb={project!r} needs the wandb package: pip install "
                               f"'calibrl-mcore[wandb]' (or unset train.wandb)") from exc
        root = Path(run_dir) / "wandb"
        root.mkdir(parents=True, exist_ok=True)
        id_file = root / "run_id"
        run_id = id_file.read_text().strip() if id_file.is_file() else uuid.uuid4().hex[:8]
        id_file.write_text(run_id + "\n")
        resolved = os.environ.get("WANDB_MODE", "online") if mode == "auto" else mode
        run = wandb.init(
            project=project, name=name or Path(run_dir).resolve().name, id=run_id, resume="allow",
            dir=str(run_dir), mode=resolved, job_type=job, config=dict(config or {}),
            # our own progress line is the terminal output; W&B's banner and console capture would add to it
            settings=wandb.Settings(silent=True, console="off"),
        )
        return cls(run)

    @classmethod
    def from_config(cls, train: TrainConfig, run_dir: Path, config: Mapping[str, Any], job: str) -> WandbSink | None:
        """The run `train.wandb` / `train.wandb_mode` ask for, or None when train.wandb is empty."""
        if not train.wandb:
            return None
        return cls.open(run_dir, project=train.wandb, mode=train.wandb_mode, config=config, job=job)

    @property
    def dir(self) -> Path:
        """The run's local folder (<run_dir>/wandb/<offline-|>run-<time>-<id>)."""
        return Path(self.run.dir).parent

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        self.run.log(dict(metrics), step=step)

    def close(self) -> None:
        self.run.finish()
