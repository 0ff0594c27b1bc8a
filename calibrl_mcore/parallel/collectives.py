"""Small collective helpers on top of Megatron's parallel_state groups."""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist


def all_reduce_sum_(tensor: torch.Tensor, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """In-place sum over `group` (the world if None); a no-op outside torch.distributed. Returns `tensor`."""
    if dist.is_initialized() and dist.get_world_size(group) > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)
    return tensor


def grad_sq_norm_local(params: Iterable[torch.nn.Parameter]) -> torch.Tensor:
    """Sum of squared grads over this rank's parameters, counting each global parameter once:
    TP-replicated params (layernorms, row-parallel biases) only on TP rank 0, and the output-layer copy of
    tied embeddings (`shared=True`) not at all. Float64 scalar; reduce it over the model-parallel group."""
    from megatron.core.tensor_parallel import param_is_not_tensor_parallel_duplicate
    from megatron.core.transformer.module import param_is_not_shared

    squares = [
        p.grad.detach().double().pow(2).sum()
        for p in params
        if p.grad is not None and param_is_not_shared(p) and param_is_not_tensor_parallel_duplicate(p)
    ]
    if squares:
        return torch.stack(squares).sum()  # on the grads' device, as nccl needs
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else "cpu"
    return torch.zeros((), dtype=torch.float64, device=device)


def global_grad_norm(params: Iterable[torch.nn.Parameter]) -> float:
    """L2 norm of all gradients of the model, all-reduced over the TP x PP (model-parallel) group.
    Grads are assumed already reduced over DP (as after Megatron's finalize_model_grads)."""
    from megatron.core import parallel_state

    sq = grad_sq_norm_local(params)
    all_reduce_sum_(sq, parallel_state.get_model_parallel_group())
    return sq.sqrt().item()
