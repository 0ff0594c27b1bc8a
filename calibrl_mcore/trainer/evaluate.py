"""`calibrl eval`: greedy accuracy (acc × fmt) of an HF checkpoint on a held-out set, through a rollout
server (started here on loopback unless `rollout.urls` is set)."""

from __future__ import annotations

from calibrl_mcore.config import Config
from calibrl_mcore.data.dataset import PromptDataset
from calibrl_mcore.trainer.rollout_stage import RolloutStage
from rollout.client import RolloutClient
from rollout.launcher import EmbeddedServerProcess


def evaluate_checkpoint(cfg: Config, model_path: str | None = None, limit: int | None = None) -> dict[str, float]:
    model_path = model_path or cfg.model.hf_path
    if not cfg.data.eval_path:
        raise ValueError("data.eval_path is empty: give the held-out set to evaluate on")
    dataset = PromptDataset.from_path(cfg.data.eval_path, seed=cfg.train.seed)
    n = min(limit or cfg.train.eval_prompts, len(dataset))
    server = None
    urls = list(cfg.rollout.urls)
    if not urls:
        server = EmbeddedServerProcess(model_path, api_key=cfg.rollout.api_key).start()
        urls = [server.url]
    try:
        # all prompts in one request per server: batched the same way every time (see Trainer.__init__)
        with RolloutClient(urls, api_key=cfg.rollout.api_key or None, timeout=cfg.rollout.timeout_s,
                           batch_size=max(8, -(-n // len(urls)))) as client:
            stage = RolloutStage(cfg.rollout, cfg.algo, model_path, client, cfg.data.image_backend,
                                 rewards=cfg.rewards, train_seed=cfg.train.seed)
            return stage.evaluate([dataset[i] for i in range(n)], samples=cfg.train.eval_samples)
    finally:
        if server is not None:
            server.stop()
