"""`calibrl sft`: supervised warm start on expert solutions with the same Megatron policy and layouts.

Teaches a fresh policy the output protocol (`<think>…</think><answer>…</answer>`) before RL, as the demo
does. Token-mean NLL over the expert response tokens of each global batch; writes an HF checkpoint.
"""

from __future__ import annotations

import logging
import random
from dataclasses import replace
from pathlib import Path

import torch.distributed as dist
from megatron.core import parallel_state

from calibrl_mcore.algo.aggregation import compute_loss_normalizer
from calibrl_mcore.config import Config, as_container
from calibrl_mcore.data.dataset import PromptDataset, PromptSampler
from calibrl_mcore.parallel import ParallelConfig, destroy_distributed, init_distributed
from calibrl_mcore.terminal import SFT_FIELDS
from calibrl_mcore.trainer.batch import Row, collate, micro_batch_chunks
from calibrl_mcore.trainer.export import export_hf
from calibrl_mcore.trainer.metrics import MetricsLogger, from_last_stage, reduce_shares
from calibrl_mcore.trainer.objective import sft_loss_fn
from calibrl_mcore.trainer.policy import MegatronPolicy
from calibrl_mcore.trainer.rollout_stage import PromptEncoder
from calibrl_mcore.trainer.wandb_sink import WandbSink
from model_providers.pipeline_split import PipelineSplit
from model_providers.registry import position_ids

log = logging.getLogger(__name__)


def sft(cfg: Config) -> Path:
    info = init_distributed(ParallelConfig.from_section(cfg.parallel, cfg.train.seed))
    try:
        return _sft(cfg, info.rank == 0)
    finally:
        destroy_distributed()


def _sft(cfg: Config, is_rank0: bool) -> Path:
    run_dir = Path(cfg.train.run_dir)
    out_dir = Path(cfg.sft.out_dir or run_dir / "sft_hf")
    optim = replace(cfg.optim, lr=cfg.sft.lr, lr_schedule="constant", warmup_steps=0)
    policy = MegatronPolicy(cfg.model, optim, total_steps=cfg.sft.steps,
                            sequence_parallel=cfg.parallel.sequence_parallel,
                            pipeline_split=PipelineSplit.from_section(cfg.parallel))
    pos = lambda ids, grid, attn: position_ids(policy.hf_config, ids, grid, attn)  # noqa: E731
    dataset = PromptDataset.from_path(cfg.data.train_path, max_images=cfg.data.max_images, seed=cfg.train.seed)
    sampler = PromptSampler(len(dataset), seed=cfg.train.seed)
    encoder = PromptEncoder(cfg.model.hf_path, cfg.data.image_backend) if is_rank0 else None
    wandb = WandbSink.from_config(cfg.train, run_dir / "sft", as_container(cfg), "sft") if is_rank0 else None
    logger = MetricsLogger(run_dir / "sft", enabled=is_rank0, tensorboard=cfg.train.tensorboard,
                           progress_total=cfg.sft.steps if cfg.train.progress else None,
                           label="sft", fields=SFT_FIELDS, wandb=wandb)
    dp, dp_rank = parallel_state.get_data_parallel_world_size(), parallel_state.get_data_parallel_rank()
    last = parallel_state.is_pipeline_last_stage()
    for step in range(cfg.sft.steps):
        payload: list = [None]
        if is_rank0:
            rows = []
            for k, i in enumerate(sampler.next_batch(cfg.sft.batch_size)):
                ex = dataset[i]
                p = encoder.prompt(ex)
                text, ids = encoder.expert(ex)
                rows.append(Row(uid=ex.uid, group_id=k, is_expert=True, prompt_ids=p.prompt_ids, response_ids=ids,
                                pixel_values=p.pixel_values, image_grid_thw=p.image_grid_thw, text=text))
            payload = [(rows, encoder.pad_id)]
        dist.broadcast_object_list(payload, src=0)
        rows, pad_id = payload[0]
        local = list(range(len(rows)))[dp_rank::dp]
        chunks = micro_batch_chunks(local, rows, cfg.train.micro_batch_size, cfg.train.max_tokens_per_micro_batch,
                                    packed=policy.packed_sequences)
        mbs = [collate(rows, c, pos, pad_id=pad_id, pad_multiple=policy.pad_multiple) for c in chunks]
        metrics: dict[str, float] = {}
        if last:
            norm = compute_loss_normalizer([mb.loss_mask for mb in mbs], "token-mean",
                                           dp_group=parallel_state.get_data_parallel_group())
            outputs = policy.run(mbs, sft_loss_fn(norm), forward_only=False)
            shares: dict = {}
            for out in outputs:
                for k, v in out["metrics"].items():
                    shares[k] = shares.get(k, 0.0) + v.detach().double().cpu()
            metrics = reduce_shares(shares, prefix="sft/")
        else:
            policy.run(mbs, None, forward_only=False)
        metrics = from_last_stage(metrics)
        metrics.update(policy.optimizer_step())
        logger.log(step + 1, metrics)
    random.seed(cfg.train.seed)
    exported = export_hf(policy, cfg.model.hf_path, out_dir)
    logger.close({"hf checkpoint": exported})
    return exported
