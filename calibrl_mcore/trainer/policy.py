"""The Megatron-Core policy: build a stage from an HF checkpoint, run micro-batches through the pipeline
schedule, step the optimizer, export HF-named weights.

Parallelism is applied from outside the model, in this order:
  1. `init_distributed` set up TP/PP/DP groups (done by the caller);
  2. the model provider builds *this rank's stage* (`pre_process` / `post_process` by PP rank, TP-sharded
     layers) and HF weights are streamed into it through the declarative map (`hf_mapping`);
  3. Megatron `DistributedDataParallel` wraps the stage (contiguous grad buffers, DP all-reduce);
  4. `get_megatron_optimizer` (Adam + grad clip over all TP/PP ranks) and the LR scheduler;
  5. the TransformerConfig gets the schedule hooks (`finalize_model_grads`, `no_sync`) and
     `variable_seq_lengths`, so micro-batches can have their own padded length under PP.

Loss scaling contract: loss callbacks return this rank's *share* of the global mini-batch loss (see
`calibrl_mcore.algo.aggregation`). Megatron's schedule divides a 2-tuple loss by the number of
micro-batches and DDP averages gradients over DP, so `loss_scale()` undoes both: the summed gradient is
exactly the single-process gradient.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from megatron.core import parallel_state
from megatron.core.distributed import (
    DistributedDataParallel,
    DistributedDataParallelConfig,
    finalize_model_grads,
)
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.pipeline_parallel import get_forward_backward_func
from safetensors import safe_open

from calibrl_mcore.config import ModelConfig, OptimConfig
from calibrl_mcore.parallel.fused import log_fused_backends
from model_providers.context_parallel import cp_size_rank, split_for_cp
from model_providers.fp8 import FP8Settings, sequence_pad_multiple
from model_providers.fp8 import describe as describe_fp8
from model_providers.hf_mapping import Placement, gather_megatron_to_hf, get_mapping, load_hf_weights
from model_providers.packing import PackedLayout
from model_providers.pipeline_split import EVEN, PipelineSplit
from model_providers.registry import build_model

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
log = logging.getLogger(__name__)


@dataclass
class MicroBatch:
    """One micro-batch of right-padded sequences, as the model and the loss callbacks consume it.

    Token tensors are aligned to *predictions*: column t holds data about the token at t + 1 (the one the
    logits at t predict); the last column is padding.
    """

    input_ids: torch.Tensor  # [b, s] long
    position_ids: torch.Tensor  # [3, b, s] M-RoPE positions
    pixel_values: torch.Tensor | None  # [n_patches, C·T·P·P] for all images of the rows, in row order
    image_grid_thw: torch.Tensor | None  # [n_images, 3]
    labels: torch.Tensor  # [b, s] long: input_ids shifted left, 0 in the last column
    loss_mask: torch.Tensor  # [b, s] bool: response tokens that enter the loss
    row_index: torch.Tensor  # [b] long: the rows' indices in this rank's batch
    seq_lengths: torch.Tensor  # [b] long: real (unpadded) lengths
    extras: dict[str, torch.Tensor]  # loss inputs ([b, s] token or [b] row tensors)
    row_tokens: torch.Tensor | None = None  # [b]: whole rows' loss tokens, set when the [b, s] tensors are a CP part

    def context_parallel_part(self) -> MicroBatch:
        """What the loss callbacks of this context-parallel rank see (self without CP).

        The model returns logits for this rank's s / cp positions (`context_parallel.split_for_cp`), so the
        token tensors (labels, loss_mask, [b, s] extras) are split the same way; `input_ids`,
        `position_ids` and row tensors stay whole, and `row_tokens` keeps the whole rows' token counts.
        """
        if cp_size_rank()[0] == 1:
            return self
        shape = self.loss_mask.shape

        def part(t: torch.Tensor) -> torch.Tensor:
            return split_for_cp(t, 1) if t.shape == shape else t

        return replace(
            self,
            labels=part(self.labels),
            loss_mask=part(self.loss_mask),
            extras={k: part(v) for k, v in self.extras.items()},
            row_tokens=self.loss_mask.sum(dim=1),
        )


def read_hf_config(path: str | Path):
    from transformers import AutoConfig

    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"model.hf_path={str(path)!r} has no config.json: point it at an HF checkpoint")
    return AutoConfig.from_pretrained(path)


def iter_safetensors(path: str | Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Stream (name, tensor) pairs shard by shard; only one tensor is materialised at a time."""
    files = sorted(Path(path).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in {path}")
    for file in files:
        with safe_open(file, framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open has no __iter__)
                yield name, f.get_tensor(name)


class MegatronPolicy:
    """This rank's pipeline stage of the policy, wrapped for training."""

    def __init__(
        self,
        model_cfg: ModelConfig,
        optim_cfg: OptimConfig | None,
        *,
        total_steps: int = 1,
        sequence_parallel: bool = False,
        pipeline_split: PipelineSplit = EVEN,
    ) -> None:
        self.hf_config = read_hf_config(model_cfg.hf_path)
        self.arch = self.hf_config.model_type
        self.dtype = DTYPES[model_cfg.dtype]
        self.fp8 = FP8Settings.from_model_config(model_cfg)
        model = build_model(
            self.hf_config,
            params_dtype=self.dtype,
            pre_process=parallel_state.is_pipeline_first_stage(),
            post_process=parallel_state.is_pipeline_last_stage(),
            spec=model_cfg.spec,
            recompute=model_cfg.recompute,
            fp8=self.fp8,
            sequence_parallel=sequence_parallel,
            packed_sequences=model_cfg.packed_sequences,
            compile_layers=model_cfg.compile,
            pipeline_split=pipeline_split,
        )
        self.mapping = get_mapping(self.arch, self.hf_config, model.backend)
        self.placement = Placement.from_parallel_state(model.config)
        load_hf_weights(model, iter_safetensors(model_cfg.hf_path), self.mapping, self.placement)
        self.config = model.config
        self.config.variable_seq_lengths = True  # micro-batches are padded to their own length
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else None
        if device is not None:
            model.cuda(device)
        self.device = device or torch.device("cpu")
        # Micro-batch lengths must split into 2·CP chunks (context parallelism), each a multiple of TP
        # under sequence parallelism, and under FP8 leave every rank a multiple of 16 (blockwise 128) tokens;
        # packed micro-batches (no CP: build_model refuses it) round their packed length up to the same
        # multiple. collate / PackedLayout / padding_fraction all take this number.
        self.pad_multiple = sequence_pad_multiple(
            parallel_state.get_context_parallel_world_size(),
            parallel_state.get_tensor_model_parallel_world_size(),
            sequence_parallel,
            self.fp8,
        )
        self.packed_sequences = model_cfg.packed_sequences
        self.distributed_optimizer = bool(optim_cfg and optim_cfg.distributed_optimizer)
        ddp_config = DistributedDataParallelConfig(
            grad_reduce_in_fp32=True,
            overlap_grad_reduce=False,
            use_distributed_optimizer=self.distributed_optimizer,
        )
        self.model = DistributedDataParallel(config=self.config, ddp_config=ddp_config, module=model)
        self.config.finalize_model_grads_func = finalize_model_grads
        self.config.no_sync_func = self.model.no_sync
        self.optimizer = None
        self.scheduler = None
        if optim_cfg is not None:
            self._build_optimizer(optim_cfg, total_steps)
        if torch.distributed.get_rank() == 0:
            log_fused_backends(spec_backend=model.backend)  # which Adam / norm kernels run, and why
            if self.fp8.enabled:  # quiet when off: the start-up screen has a line budget (tests/test_terminal.py)
                log.info("%s; micro-batch lengths padded to multiples of %d", describe_fp8(self.fp8),
                         self.pad_multiple)
            pp = parallel_state.get_pipeline_model_parallel_world_size()
            if pp > 1:
                log.info("decoder layers per pipeline stage: %s",
                         pipeline_split.describe(self.hf_config.text_config.num_hidden_layers, pp))

    # -- optimizer -----------------------------------------------------------------------------------------

    def _build_optimizer(self, cfg: OptimConfig, total_steps: int) -> None:
        opt_config = OptimizerConfig(
            optimizer="adam",
            lr=cfg.lr,
            min_lr=cfg.min_lr,
            weight_decay=cfg.weight_decay,
            adam_beta1=cfg.adam_beta1,
            adam_beta2=cfg.adam_beta2,
            adam_eps=cfg.adam_eps,
            clip_grad=cfg.grad_clip,
            bf16=self.dtype == torch.bfloat16,
            params_dtype=self.dtype,
            use_distributed_optimizer=cfg.distributed_optimizer,
        )
        self.optimizer = get_megatron_optimizer(opt_config, [self.model])
        self.scheduler = OptimizerParamScheduler(
            self.optimizer,
            init_lr=0.0 if cfg.warmup_steps else cfg.lr,
            max_lr=cfg.lr,
            min_lr=cfg.min_lr,
            lr_warmup_steps=cfg.warmup_steps,
            lr_decay_steps=max(total_steps, cfg.warmup_steps + 1),
            lr_decay_style=cfg.lr_schedule,
            start_wd=cfg.weight_decay,
            end_wd=cfg.weight_decay,
            wd_incr_steps=max(total_steps, 1),
            wd_incr_style="constant",
        )

    def optimizer_step(self) -> dict[str, float]:
        """Clip, step, advance the LR schedule; returns grad norm and LR (same on every rank)."""
        assert self.optimizer is not None and self.scheduler is not None, "built without an optimizer"
        success, grad_norm, _ = self.optimizer.step()
        if not success:
            raise FloatingPointError("optimizer step skipped: non-finite gradients")
        self.scheduler.step(increment=1)
        lr = self.optimizer.param_groups[0]["lr"]
        return {"grad_norm": float(grad_norm) if grad_norm is not None else 0.0, "lr": float(lr)}

    # -- forward / backward --------------------------------------------------------------------------------

    def loss_scale(self, num_microbatches: int) -> float:
        """Undo the schedule's 1/num_microbatches and DDP's 1/DP (module docstring). Under context parallelism
        the schedule also multiplies the loss by CP and DDP averages over DP x CP: those cancel."""
        return float(num_microbatches * parallel_state.get_data_parallel_world_size())

    def run(
        self,
        micro_batches: Sequence[MicroBatch],
        loss_fn: Callable[[MicroBatch, torch.Tensor], tuple[torch.Tensor, dict]],
        *,
        forward_only: bool,
    ) -> list[dict]:
        """Run micro-batches through Megatron's schedule (1F1B under PP).

        `loss_fn(mb, logits)` is called on the last stage with logits [b, s, V/tp] and returns
        (loss share, outputs dict); under context parallelism it gets this rank's part of the micro-batch
        (`MicroBatch.context_parallel_part`) and logits [b, s / cp, V/tp]. Returns the outputs dicts on the last stage, [] elsewhere.
        Gradients accumulate into the DDP buffers; call `optimizer_step()` afterwards.
        """
        if not micro_batches:
            return []
        scale = self.loss_scale(len(micro_batches))
        device = self.device

        def forward_step(data_iterator, model):
            mb: MicroBatch = next(data_iterator)
            packed = None
            if self.packed_sequences:
                packed = PackedLayout.from_lengths(
                    mb.seq_lengths, mb.input_ids.shape[1], pad_multiple=self.pad_multiple, device=device
                )
            output = model(
                mb.input_ids.to(device),
                mb.position_ids.to(device),
                None,
                pixel_values=None if mb.pixel_values is None else mb.pixel_values.to(device, self.dtype),
                image_grid_thw=None if mb.image_grid_thw is None else mb.image_grid_thw.to(device),
                packed=packed,
            )

            def loss_func(logits: torch.Tensor):
                loss, outputs = loss_fn(mb.context_parallel_part(), logits)
                return loss * scale, outputs

            return output, loss_func

        if not forward_only:
            self.model.zero_grad_buffer()
            self.optimizer.zero_grad()
        self.model.train(not forward_only)
        seq_len = max(int(mb.input_ids.shape[1]) for mb in micro_batches)
        outputs = get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=iter(micro_batches),
            model=[self.model],
            num_microbatches=len(micro_batches),
            seq_length=seq_len,
            micro_batch_size=int(micro_batches[0].input_ids.shape[0]),
            forward_only=forward_only,
        )
        return list(outputs) if parallel_state.is_pipeline_last_stage() else []

    # -- weights out ---------------------------------------------------------------------------------------

    def iter_hf_weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        """This PP stage's parameters as HF (checkpoint-named) tensors, gathered over TP (every TP rank)."""
        yield from gather_megatron_to_hf(
            self.model.module.named_parameters(),
            self.mapping,
            self.placement,
            tp_group=parallel_state.get_tensor_model_parallel_group(),
            checkpoint_names=True,
        )

    def save_hf_config(self, out_dir: Path) -> None:
        (out_dir / "config.json").write_text(json.dumps(self.hf_config.to_dict(), indent=2))
