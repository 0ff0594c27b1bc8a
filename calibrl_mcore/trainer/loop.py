"""The CalibRL training step, top to bottom (`calibrl train`).

    rows    = rollout(prompts)                   # rank 0: G samples/prompt + rewards + expert rows, then each
                                                 # DP replica receives and encodes only its rows (data plane)
    stats   = group advantages, DP-reduced       # identical to one process
    old, b  = old-policy log-probs of the rows and of the groups' experts (forward-only schedule)
    for each mini-batch:                         # one PPO epoch
        fwd/bwd through Megatron's schedule with the selected loss; optimizer step
    sync weights to the rollout server; log metrics; checkpoint

Every rank runs this code; only rank 0 talks to the rollout server and writes logs. `rows` below are always
this rank's (its replica's trained rows + its groups' expert rows, `data_plane.LocalRows`), indexed locally.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from calibrl_mcore.algo.advantages import compute_group_advantages
from calibrl_mcore.algo.aggregation import compute_loss_normalizer
from calibrl_mcore.algo.experts import aggregate_expert_baselines, expert_gate_weight
from calibrl_mcore.algo.schedules import CoefficientSchedule
from calibrl_mcore.config import Config, as_container, to_yaml
from calibrl_mcore.data.dataset import PromptDataset, PromptSampler
from calibrl_mcore.parallel import ParallelConfig, destroy_distributed, init_distributed
from calibrl_mcore.trainer.batch import Row, collate, micro_batch_chunks, padding_fraction
from calibrl_mcore.trainer.checkpoint import CheckpointManager
from calibrl_mcore.trainer.data_plane import DataPlane, LocalRows
from calibrl_mcore.trainer.dynamic_sampling import refill_informative_groups
from calibrl_mcore.trainer.metrics import MetricsLogger, from_last_stage, mean_of, reduce_shares
from calibrl_mcore.trainer.objective import logprob_fn, rl_loss_fn
from calibrl_mcore.trainer.policy import MegatronPolicy, MicroBatch
from calibrl_mcore.trainer.rollout_stage import PromptEncoder, RolloutFailure, RolloutStage
from calibrl_mcore.trainer.row_plan import assign_rows
from calibrl_mcore.trainer.wandb_sink import WandbSink
from calibrl_mcore.trainer.weight_sync import WeightSync, sync_method
from model_providers.pipeline_split import PipelineSplit
from model_providers.registry import position_ids
from rollout.client import RolloutClient
from rollout.launcher import start_rollout_server

log = logging.getLogger(__name__)
TRAINS_EXPERT_ROWS = {"luffy", "rlplus"}  # families whose loss has an off-policy expert term


class Trainer:
    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.info = init_distributed(ParallelConfig.from_section(cfg.parallel, cfg.train.seed))
        self.is_rank0 = self.info.rank == 0
        self.run_dir = Path(cfg.train.run_dir)
        total_updates = cfg.train.steps * cfg.train.mini_batches_per_step
        self.policy = MegatronPolicy(cfg.model, cfg.optim, total_steps=total_updates,
                                     sequence_parallel=cfg.parallel.sequence_parallel,
                                     pipeline_split=PipelineSplit.from_section(cfg.parallel))
        self.position_ids = lambda ids, grid, attn: position_ids(self.policy.hf_config, ids, grid, attn)
        self.dataset = PromptDataset.from_path(cfg.data.train_path, max_images=cfg.data.max_images,
                                               seed=cfg.train.seed)
        # (PromptDataset logs the skipped corrupt rows itself; the count also goes into the metrics.)
        self.sampler = PromptSampler(len(self.dataset), seed=cfg.train.seed)
        self.eval_set = PromptDataset.from_path(cfg.data.eval_path, seed=cfg.train.seed) if cfg.data.eval_path else None
        self.step = 0
        self.weight_version = 0
        self.coefficients = CoefficientSchedule(cfg.algo, cfg.train.steps)
        self._check_layout()
        self.server, self.stage, urls = None, None, [list(cfg.rollout.urls)]
        if self.is_rank0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            if not urls[0]:  # colocated: we start the server ourselves, a child process on loopback
                method = sync_method(cfg.rollout.weight_sync_method, cfg.rollout.engine)
                trainer_gpus = int(os.environ.get("LOCAL_WORLD_SIZE", "1")) if torch.cuda.is_available() else 0
                self.server = start_rollout_server(cfg.rollout, cfg.model.hf_path, self.run_dir, method=method,
                                                   trainer_gpus=trainer_gpus)
                urls = [[self.server.url]]
            # One request per server per call: a server admits a request's prompts together, so a step's rows
            # batch the same way in every rerun (concurrent chunks would batch by arrival order).
            per_server = -(-max(cfg.train.prompts_per_step, cfg.train.eval_prompts) // len(urls[0]))
            client = RolloutClient(urls[0], api_key=cfg.rollout.api_key or None, timeout=cfg.rollout.timeout_s,
                                   max_retries=cfg.rollout.max_retries, batch_size=max(8, per_server))
            self.stage = RolloutStage(cfg.rollout, cfg.algo, cfg.model.hf_path, client, cfg.data.image_backend,
                                      rewards=cfg.rewards, train_seed=cfg.train.seed)
        dist.broadcast_object_list(urls, src=0)
        pad = [self.stage.pad_id if self.stage else 0]
        dist.broadcast_object_list(pad, src=0)
        self.pad_id = pad[0]
        # Each replica's first pipeline stage encodes its own rows' images (rank 0 reuses the stage's encoder).
        encoder = None
        if parallel_state.is_pipeline_first_stage():
            encoder = self.stage.encoder if self.stage else PromptEncoder(cfg.model.hf_path, cfg.data.image_backend)
        self.data_plane = DataPlane(encoder, self.policy.device)
        self.sync = WeightSync(self.policy, urls[0], api_key=cfg.rollout.api_key,
                               bucket_mb=cfg.rollout.weight_sync_bucket_mb, timeout_s=cfg.rollout.timeout_s,
                               method=sync_method(cfg.rollout.weight_sync_method, cfg.rollout.engine),
                               src_dir=cfg.model.hf_path, stage_dir=self.run_dir / "weight_sync")
        self.ckpt = CheckpointManager(self.run_dir / "checkpoints", keep_last=cfg.checkpoint.keep_last)
        wandb = WandbSink.from_config(cfg.train, self.run_dir, as_container(cfg), "train") if self.is_rank0 else None
        self.logger = MetricsLogger(self.run_dir, enabled=self.is_rank0, tensorboard=cfg.train.tensorboard,
                                    progress_total=cfg.train.steps if cfg.train.progress else None,
                                    label=f"train {cfg.algo.name}", wandb=wandb)
        if self.is_rank0:
            (self.run_dir / "config.yaml").write_text(to_yaml(cfg))

    def _check_layout(self) -> None:
        """Every DP rank needs rows in every mini-batch (DDP's gradient all-reduce is collective)."""
        t, dp = self.cfg.train, parallel_state.get_data_parallel_world_size()
        rows = t.prompts_per_step * self.cfg.rollout.n_samples // t.mini_batches_per_step
        if rows < dp:
            raise ValueError(
                f"train.prompts_per_step × rollout.n_samples / train.mini_batches_per_step = {rows} rows per "
                f"mini-batch, fewer than the {dp} data-parallel ranks: raise prompts_per_step"
            )

    # ------------------------------------------------------------------------------------------- driver

    def train(self) -> dict[str, float]:
        cfg = self.cfg
        if cfg.checkpoint.resume and self.ckpt.latest() is not None:
            self._load(self.ckpt.latest())
            self.sync.push(self.weight_version)  # the server restarted from the HF weights: bring it up to date
        metrics: dict[str, float] = {}
        first = True
        while self.step < cfg.train.steps:
            metrics = self.train_step()
            self.step += 1
            metrics["step"] = float(self.step)
            if first:  # load-time data bookkeeping, once per process (also after a resume)
                metrics["data/skipped_rows"] = float(self.dataset.num_skipped)
                first = False
            if self.eval_set is not None and cfg.train.eval_every and self.step % cfg.train.eval_every == 0:
                metrics.update(self.evaluate())
            self.logger.log(self.step, metrics)
            if cfg.checkpoint.save_every and self.step % cfg.checkpoint.save_every == 0:
                self._save()
        if self.eval_set is not None and not cfg.train.eval_every:
            final = self.evaluate()
            metrics.update(final)
            self.logger.log(self.step, final)
        self._save()
        return metrics

    def train_step(self) -> dict[str, float]:
        t0 = time.perf_counter()
        batch, metrics = self.rollout()
        if not batch.complete:  # e.g. every group all-equal (DAPO): the plan is the same on every rank
            log.warning("step %d: no trainable rows on some data-parallel rank; skipping the update", self.step)
            metrics["train/skipped_step"] = 1.0
            return metrics
        rows, local = batch.rows, batch.trained
        stats = self.advantages(rows, local)
        old, baselines = self.old_logprobs(rows, local)
        algo = self.step_coefficients(metrics)
        metrics.update({"algo/alpha": algo.alpha, "algo/lam": algo.lam})
        t_train = time.perf_counter()
        # A mini-batch runs only if every DP rank holds rows of it (DDP's all-reduce is collective); the
        # driver's plan says which, so all ranks take the same decision.
        per_mini_batch = [self.update(rows, mb_rows, stats, old, baselines, algo)
                          for mb_rows, ok in zip(batch.mini_batches(), batch.runnable) if ok]
        metrics["train/skipped_mini_batches"] = float(len(batch.runnable) - sum(batch.runnable))
        last_stage = mean_of(per_mini_batch)
        last_stage.update(self.rollout_train_mismatch(rows, local, old))
        metrics.update(from_last_stage(last_stage))
        self.coefficients.observe(metrics.get("train/entropy"))
        metrics["time/train_s"] = time.perf_counter() - t_train
        t_sync = time.perf_counter()
        self.weight_version += 1
        self.sync.push(self.weight_version)
        metrics["time/weight_sync_s"] = time.perf_counter() - t_sync
        metrics["time/step_s"] = time.perf_counter() - t0
        return metrics

    # ------------------------------------------------------------------------------------------- stages

    def rollout(self) -> tuple[LocalRows, dict[str, float]]:
        """Rank 0 samples the step's prompts and rolls them out, assigns the rows to DP ranks (`assign_rows`),
        and the data plane hands every rank its replica's rows only (`DataPlane.exchange`).

        If the servers fail (after the client's retries), rank 0 restarts its colocated server, all ranks
        re-push the current weights, and the step's rollout is retried once.
        """
        for attempt in range(2):
            payload: list = [None]
            rows, plan = None, None
            if self.is_rank0:
                cursor = self.sampler.state_dict()
                try:
                    rows, metrics = self._collect_step_rows()
                    plan = assign_rows(rows, parallel_state.get_data_parallel_world_size(),
                                       self.cfg.train.mini_batches_per_step,
                                       trains_expert=self.cfg.algo.name in TRAINS_EXPERT_ROWS)
                    payload = [("ok", metrics, self.sampler.state_dict())]
                except RolloutFailure as exc:
                    if attempt == 1 or self.server is None:
                        raise
                    log.warning("rollout failed (%s): restarting the rollout server and retrying the step", exc)
                    self.sampler.load_state_dict(cursor)
                    self.server.ensure_running(check_health=True)
                    payload = [("restarted",)]
            dist.broadcast_object_list(payload, src=0)  # small: status, metrics, data cursor
            if payload[0][0] == "ok":
                _, metrics, sampler_state = payload[0]
                self.sampler.load_state_dict(sampler_state)  # every rank's cursor identical (checkpoints)
                batch, data_metrics = self.data_plane.exchange(rows, plan)
                metrics.update(data_metrics)
                metrics["rollout/server_restarts"] = float(self.server.restarts if self.server else 0)
                return batch, metrics
            self.sync.push(self.weight_version)  # the restarted server came up with the initial weights
        raise AssertionError("unreachable")

    def _collect_step_rows(self) -> tuple[list[Row], dict[str, float]]:
        """Rank 0: sample the step's prompts and roll them out; with dynamic sampling (DAPO) keep only groups
        with reward variance and refill from further prompt batches (`dynamic_sampling.py`)."""
        want, step = self.cfg.train.prompts_per_step, self.step

        def sample(round_index: int) -> tuple[list[Row], dict]:
            examples = [self.dataset[i] for i in self.sampler.next_batch(want)]
            first = step * 1_000_000 + round_index * 10_000  # fresh group ids per round (want < 10,000)
            return self.stage.collect(step, examples, first_group_id=first, round_index=round_index)

        rows, metrics = sample(0)
        algo = self.cfg.algo
        if not (algo.dynamic_sampling or algo.name == "dapo"):
            metrics.update(self._reward_metrics(rows))
            return rows, metrics

        def sample_more(round_index: int) -> list[Row]:
            more, more_metrics = sample(round_index)
            metrics["rollout/time_s"] += more_metrics["rollout/time_s"]
            return more

        refill = refill_informative_groups(rows, want, sample_more, algo.dynamic_sampling_max_rounds)
        metrics.update(self._reward_metrics(refill.sampled))  # the policy's rewards, before the filter
        metrics["rollout/dynamic_sampling_rounds"] = float(refill.rounds)
        metrics["rollout/informative_groups"] = float(refill.groups)
        return refill.rows, metrics

    def advantages(self, rows: Sequence[Row], local: list[int]) -> dict[int, tuple[float, bool]]:
        """Group statistics over DP; returns {row index: (advantage, passed)} for the trained rows `local`.

        Without the expert in the statistics, the rank also passes its groups' expert rows (all it holds
        besides `local`): they are excluded from the sums and get their group's values. With it (LUFFY,
        RL-PLUS), only trained rows enter, so an expert row counts once, on the rank that trains it.
        """
        include_expert = self.cfg.algo.name in TRAINS_EXPERT_ROWS
        idx = list(local)
        if not include_expert:
            idx += [i for i, r in enumerate(rows) if r.is_expert]
        sel = [rows[i] for i in idx]
        stats = compute_group_advantages(
            torch.tensor([r.reward for r in sel]),
            torch.tensor([r.group_id for r in sel], dtype=torch.long),
            torch.tensor([r.is_expert for r in sel]),
            norm_by_std=self.cfg.algo.norm_by_std,
            pass_threshold=self.cfg.algo.pass_threshold,
            include_expert_in_stats=include_expert,
            dp_group=parallel_state.get_data_parallel_group(),
        )
        return {i: (float(stats.advantages[k]), bool(stats.passed[k])) for k, i in enumerate(idx)}

    def old_logprobs(self, rows: Sequence[Row], local: list[int]):
        """Old-policy log-probs of the local rows and the expert baseline of their groups (forward only).

        Returns ({row: logp [R]}, {group id: (b [T], valid [T], gate weight)}), on the last stage.
        """
        groups = {rows[i].group_id for i in local}
        experts: dict[int, list[int]] = {}
        for i, r in enumerate(rows):
            if r.is_expert and r.group_id in groups:
                experts.setdefault(r.group_id, []).append(i)
        logp = self._forward_logprobs(rows, sorted(set(local) | {i for ids in experts.values() for i in ids}))
        if not logp:  # not the last pipeline stage
            return logp, {}
        algo, baselines = self.cfg.algo, {}
        for gid, ids in experts.items():
            accs = [rows[i].acc for i in ids]
            passing = [i for i in ids if rows[i].acc >= 1.0]
            # With several experts, the ones that fail the verifier leave the baseline when others pass.
            use = passing if algo.expert_gate != "none" and passing else ids
            b, valid = aggregate_expert_baselines([logp[i] for i in use], algo.expert_agg)
            baselines[gid] = (b, valid, expert_gate_weight(accs, algo.expert_gate, algo.expert_gate_weight))
        return logp, baselines

    def step_coefficients(self, metrics: dict[str, float]):
        """This step's α and λ from the schedules (the same on every rank: inputs are broadcast)."""
        algo = self.cfg.algo
        alpha = self.coefficients.alpha(self.step, metrics.get("reward/pass_rate"))
        return dataclasses.replace(algo, alpha=alpha, lam=self.coefficients.lam(self.step))

    def _chunks(self, rows: Sequence[Row], indices: list[int]) -> list[list[int]]:
        """This rank's rows `indices` grouped into micro-batches (train.micro_batch_size or a token budget)."""
        train = self.cfg.train
        return micro_batch_chunks(indices, rows, train.micro_batch_size, train.max_tokens_per_micro_batch,
                                  packed=self.policy.packed_sequences)

    def _forward_logprobs(self, rows: Sequence[Row], indices: list[int]) -> dict[int, torch.Tensor]:
        mbs = [collate(rows, c, self.position_ids, pad_id=self.pad_id,
                       pad_multiple=self.policy.pad_multiple)
               for c in self._chunks(rows, indices)]
        outputs = self.policy.run(mbs, logprob_fn(self.cfg.rollout.temperature), forward_only=True)
        result: dict[int, torch.Tensor] = {}
        for out in outputs:
            for k, i in enumerate(out["row_index"].tolist()):
                p = len(rows[i].prompt_ids)
                result[i] = out["logp"][k, p - 1 : p - 1 + len(rows[i].response_ids)].cpu()
        return result  # only on the last pipeline stage

    def update(self, rows, indices, stats, old, baselines, algo) -> dict[str, float]:
        """One optimizer step on a mini-batch: fwd/bwd of all its micro-batches, then Adam.

        Loss inputs are only needed where the loss is computed (the last pipeline stage).
        """
        last = parallel_state.is_pipeline_last_stage()
        token_extras = row_extras = None
        if last:
            def baseline(i: int, valid: bool) -> list[float]:
                entry, n = baselines.get(rows[i].group_id), len(rows[i].response_ids)
                out = torch.zeros(n)  # b_t = 0 past the experts' lengths (valid = 0 there)
                if entry is not None:
                    b, ok, _ = entry
                    m = min(n, b.numel())
                    out[:m] = (ok[:m].float() if valid else b[:m])
                return out.tolist()

            no_cal = (groups_without_pass(rows, algo.pass_threshold)  # no calibration term for these groups
                      if algo.name == "calibrl" and algo.calibration_groups == "with_pass" else set())
            token_extras = {
                "old_logp": lambda i: old[i].tolist(),
                "expert_logp": lambda i: baseline(i, valid=False),
                "expert_valid": lambda i: baseline(i, valid=True),
            }
            row_extras = {
                "advantages": lambda i: stats[i][0],
                "passed": lambda i: stats[i][1],
                "is_expert": lambda i: bool(rows[i].is_expert),
                "gate": lambda i: (0.0 if rows[i].group_id in no_cal else
                                   baselines[rows[i].group_id][2] if rows[i].group_id in baselines else 1.0),
            }
        mbs = [collate(rows, c, self.position_ids, token_extras, row_extras, pad_id=self.pad_id,
                       pad_multiple=self.policy.pad_multiple)
               for c in self._chunks(rows, indices)]
        metrics: dict[str, float] = {}
        t0 = time.perf_counter()
        if last:
            metrics["expert/gated_group_frac"] = (sum(b[2] < 1.0 for b in baselines.values())
                                                  / max(len(baselines), 1))
            norm = compute_loss_normalizer([mb.loss_mask for mb in mbs], algo.agg,
                                           dp_group=parallel_state.get_data_parallel_group())
            outputs = self.policy.run(mbs, rl_loss_fn(algo, norm, self.cfg.rollout.temperature), forward_only=False)
            shares: dict[str, torch.Tensor] = {}
            for out in outputs:
                for name, v in out["metrics"].items():
                    shares[name] = shares.get(name, 0.0) + v.detach().double().cpu()
            metrics.update(reduce_shares(shares, prefix="train/"))
            tokens = sum(int(mb.seq_lengths.sum()) for mb in mbs)
            metrics["train/tokens_per_s"] = tokens / max(time.perf_counter() - t0, 1e-9)
            packed = self.policy.pad_multiple if self.policy.packed_sequences else 0
            metrics["train/padding_frac"] = padding_fraction(mbs, packed)
            metrics["train/micro_batches"] = len(mbs)  # this rank's, last mini-batch
        else:
            self.policy.run(mbs, None, forward_only=False)  # the loss callback runs on the last stage only
        metrics.update(self.policy.optimizer_step())
        return metrics

    # ------------------------------------------------------------------------------------------- helpers

    def _reward_metrics(self, rows: Sequence[Row]) -> dict[str, float]:
        on = [r for r in rows if not r.is_expert]
        by_group: dict[int, list[float]] = {}
        for r in on:
            by_group.setdefault(r.group_id, []).append(r.reward)
        passing = [r for r in on if r.reward > self.cfg.algo.pass_threshold]
        return {
            "reward/mean": sum(r.reward for r in on) / max(len(on), 1),
            "reward/pass_rate": len(passing) / max(len(on), 1),
            # Reward hacking under r = acc + 0.1·fmt: the share of passes bought with a broken format
            # (undefined, so not logged, in a step where nothing passes).
            "reward/pass_broken_format_frac": (sum(r.fmt < 1.0 for r in passing) / len(passing) if passing
                                               else float("nan")),
            "reward/acc": sum(r.acc for r in on) / max(len(on), 1),
            "reward/format": sum(r.fmt for r in on) / max(len(on), 1),
            "reward/group_all_equal_frac": sum(len(set(v)) == 1 for v in by_group.values()) / max(len(by_group), 1),
        }

    def rollout_train_mismatch(self, rows, local, old) -> dict[str, float]:
        """|rollout log-prob − trainer log-prob| over local on-policy response tokens (last stage)."""
        diffs = [torch.tensor(rows[i].rollout_logprobs) - old[i] for i in local
                 if i in old and rows[i].rollout_logprobs and len(rows[i].rollout_logprobs) == old[i].numel()]
        if not diffs:
            return {}
        d = torch.cat(diffs).abs()
        return {"rollout/logprob_mismatch_mean": float(d.mean()), "rollout/logprob_mismatch_max": float(d.max())}

    def evaluate(self) -> dict[str, float]:
        out: list = [None]
        if self.is_rank0 and self.eval_set is not None:
            n = min(self.cfg.train.eval_prompts, len(self.eval_set))
            out = [self.stage.evaluate([self.eval_set[i] for i in range(n)], samples=self.cfg.train.eval_samples)]
        dist.broadcast_object_list(out, src=0)
        return out[0] or {}

    def _save(self) -> None:
        self.ckpt.save(self.step, self.policy, {
            "step": self.step, "weight_version": self.weight_version, "sampler": self.sampler.state_dict(),
            "coefficients": self.coefficients.state_dict(),
        }, config_yaml=to_yaml(self.cfg))

    def _load(self, path: Path) -> None:
        state = self.ckpt.load(path, self.policy)
        self.step, self.weight_version = int(state["step"]), int(state["weight_version"])
        self.sampler.load_state_dict(state["sampler"])
        self.coefficients.load_state_dict(state.get("coefficients", {}))

    def close(self, summary: bool = True) -> None:
        """Stop the server and the sinks; `summary`: print the summary block (after a completed run)."""
        self.sync.close()
        if self.stage is not None:
            self.stage.client.close()
        if self.server is not None:
            self.server.stop()
        latest = self.ckpt.latest() if summary else None
        self.logger.close({"checkpoint": latest} if latest else {}, summary=summary)
        destroy_distributed()


def groups_without_pass(rows: Sequence[Row], pass_threshold: float) -> set[int]:
    """Ids of the groups none of whose on-policy rollouts passes (the expert row does not count)."""
    return {r.group_id for r in rows} - {r.group_id for r in rows if not r.is_expert and r.reward > pass_threshold}


def train(cfg: Config) -> dict[str, float]:
    trainer = Trainer(cfg)
    done = False
    try:
        metrics = trainer.train()
        done = True
        return metrics
    finally:
        trainer.close(summary=done)


__all__ = ["Trainer", "train", "groups_without_pass", "MicroBatch"]
