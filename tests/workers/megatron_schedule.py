"""What the torchrun parity workers share: one micro-batch through Megatron's schedule, and the grad reductions
that a bare model (no DDP / finalize_model_grads) needs before its grads can be compared with HF's.
"""

from __future__ import annotations

import torch


def run_schedule(model, inputs: dict, token_weights: torch.Tensor, *, forward_only: bool) -> torch.Tensor | None:
    """One micro-batch of `inputs` (the model's kwargs: input_ids, position_ids, labels, pixel_values, ...).

    forward_only: returns the logits gathered over TP and CP [b, s, V] on the last stage (None elsewhere).
    Otherwise leaves the grads of Σ token_weights ⊙ cross-entropy ([b, s] weights, e.g. 1 / tokens for a
    mean); under context parallelism each rank's grads are its tokens' share (`reduce_partial_grads`).
    """
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from model_providers.context_parallel import gather_from_cp, split_for_cp

    captured = {}
    cp = parallel_state.get_context_parallel_world_size()

    def loss_func(output: torch.Tensor):
        if forward_only:
            captured["logits"] = gather_from_cp(output.detach(), 1).clone()  # [b, s, V]
            return output.sum() * 0.0, {}
        # Per-token CE of this rank's tokens [b, s / cp]; the schedule multiplies a 2-tuple loss by cp
        # (Megatron's convention for DDP's dp x cp averaging): undo it.
        loss = (output * split_for_cp(token_weights, 1).to(output.dtype)).sum() / cp
        return loss, {"loss": loss.detach().clone()}

    def forward_step(data_iterator, chunk):
        mb = dict(next(data_iterator))
        labels = mb.pop("labels")
        output = chunk(
            mb.pop("input_ids"),
            mb.pop("position_ids"),
            None,
            labels=None if forward_only else labels,
            runtime_gather_output=True if forward_only else None,
            **mb,
        )
        return output, loss_func

    b, s = inputs["input_ids"].shape
    get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=iter([inputs]),
        model=[model],
        num_microbatches=1,
        seq_length=s,
        micro_batch_size=b,
        forward_only=forward_only,
    )
    return captured.get("logits")


def reduce_partial_grads(model) -> None:
    """Sum what is partial per rank, as DDP + finalize_model_grads would: every grad over CP (each rank saw
    its tokens only), and sequence-parallel norm weights over TP."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    cp_group = parallel_state.get_context_parallel_group()
    tp_group = parallel_state.get_tensor_model_parallel_group()
    for p in model.parameters():
        if cp_group.size() > 1:
            dist.all_reduce(p.grad, group=cp_group)
        if getattr(p, "sequence_parallel", False):
            dist.all_reduce(p.grad, group=tp_group)
