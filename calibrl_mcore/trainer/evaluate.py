"""`calibrl eval`: greedy accuracy (acc × fmt) of an HF checkpoint on a held-out set, through a rollout
server (started here on loopback unless `rollout.urls` is set; its log goes to <train.run_dir>/eval_server.log)."""

from __future__ import annotations

from pathlib import Path

from calibrl_mcore.config import Config
from calibrl_mcore.data.dataset import PromptDataset
from calibrl_mcore.terminal import EVAL_FIELDS, ProgressLine
from calibrl_mcore.trainer.rollout_stage import RolloutStage
from rollout.client import RolloutClient
from rollout.launcher import EmbeddedServerProcess

CHUNK = 64  # prompts per request batch: one progress update each


def evaluate_checkpoint(cfg: Config, model_path: str | None = None, limit: int | None = None,
                        progress: bool | None = None) -> dict[str, float]:
    model_path = model_path or cfg.model.hf_path
    if not cfg.data.eval_path:
        raise ValueError("data.eval_path is empty: give the held-out set to evaluate on")
    dataset = PromptDataset.from_path(cfg.data.eval_path, seed=cfg.train.seed)
    n = min(limit or cfg.train.eval_prompts, len(dataset))
    server = None
    urls = list(cfg.rollout.urls)
    if not urls:
        run_dir = Path(cfg.train.run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        server = EmbeddedServerProcess(model_path, api_key=cfg.rollout.api_key,
                                       log_path=run_dir / "eval_server.log").start()
        urls = [server.url]
    show = cfg.train.progress if progress is None else progress
    line = ProgressLine(f"eval {Path(cfg.data.eval_path).name}", n, EVAL_FIELDS, unit="item") if show else None
    try:
        # Fixed-size chunks, each in one request per server: batched the same way every time (see
        # Trainer.__init__), so a rerun samples the same tokens; the chunks feed the progress line.
        with RolloutClient(urls, api_key=cfg.rollout.api_key or None, timeout=cfg.rollout.timeout_s,
                           batch_size=max(8, -(-min(CHUNK, n) // len(urls)))) as client:
            stage = RolloutStage(cfg.rollout, cfg.algo, model_path, client, cfg.data.image_backend,
                                 rewards=cfg.rewards, train_seed=cfg.train.seed)
            totals: dict[str, float] = {}
            result: dict[str, float] = {}
            for start in range(0, n, CHUNK):
                part = stage.evaluate([dataset[i] for i in range(start, min(start + CHUNK, n))],
                                      samples=cfg.train.eval_samples)
                for key, value in part.items():  # means -> sums, weighted by the chunk's size
                    totals[key] = totals.get(key, 0.0) + (value if key == "eval/n" else value * part["eval/n"])
                done = totals.get("eval/n", 0.0)
                result = {k: (v if k == "eval/n" else v / max(done, 1.0)) for k, v in totals.items()}
                if line is not None:
                    line.update(int(done), result)
            return result
    finally:
        if line is not None:
            line.close()
        if server is not None:
            server.stop()
