"""Logits -> token log-probs / entropy (vocab-parallel), and the loss callbacks the schedule calls.

Logits arrive sharded over TP on the vocab axis ([b, s, V/tp]); nothing here gathers them. Log-probs use
Megatron's vocab-parallel cross-entropy; entropy uses the same max / sum-exp all-reduces written out
(differentiable through Megatron's `reduce_from_tensor_model_parallel_region`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
from megatron.core import parallel_state, tensor_parallel

from calibrl_mcore.algo.aggregation import LossNormalizer, aggregate
from calibrl_mcore.algo.fused_logprob import chunked_logprobs_and_entropy
from calibrl_mcore.algo.losses import LOSS_FNS
from calibrl_mcore.config import AlgoConfig
from calibrl_mcore.trainer.policy import MicroBatch
from model_providers.context_parallel import gather_from_cp

LossFn = Callable[[MicroBatch, torch.Tensor], tuple[torch.Tensor, dict]]


def token_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log π(labels) from vocab-sharded logits: [b, s, V/tp], [b, s] -> [b, s] (fp32)."""
    # vocab_parallel_cross_entropy edits its input in place (max subtraction): give it its own fp32 copy.
    return -tensor_parallel.vocab_parallel_cross_entropy(logits.float().clone(), labels.to(logits.device))


def vocab_parallel_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of softmax(logits) over the full vocab from TP shards: [b, s, V/tp] -> [b, s] (fp32)."""
    z = logits.float()
    z_max = z.detach().amax(dim=-1, keepdim=True)  # [b, s, 1]
    tp_group = parallel_state.get_tensor_model_parallel_group()
    if parallel_state.get_tensor_model_parallel_world_size() > 1:
        dist.all_reduce(z_max, op=dist.ReduceOp.MAX, group=tp_group)
    e = torch.exp(z - z_max)
    sum_e = tensor_parallel.reduce_from_tensor_model_parallel_region(e.sum(dim=-1))  # [b, s]
    sum_ez = tensor_parallel.reduce_from_tensor_model_parallel_region((e * (z - z_max)).sum(dim=-1))
    # H = log Σe − Σ e·(z − max) / Σe
    return torch.log(sum_e) - sum_ez / sum_e


def logprobs_and_entropy(
    logits: torch.Tensor, labels: torch.Tensor, *, entropy_grad: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """(log π(labels), entropy), both [b, s] fp32, sharing one softmax where the vocab is not split.

    Without TP one fused `log_softmax` serves both; under TP the vocab-parallel routines above do.
    The entropy is a metric unless `entropy_grad` (an entropy bonus in the loss).
    """
    if parallel_state.get_tensor_model_parallel_world_size() > 1:
        logp = token_logprobs(logits, labels)
        with torch.set_grad_enabled(entropy_grad and torch.is_grad_enabled()):
            return logp, vocab_parallel_entropy(logits)
    log_probs = torch.log_softmax(logits.float(), dim=-1)  # [b, s, V]
    logp = log_probs.gather(-1, labels.to(logits.device).unsqueeze(-1)).squeeze(-1)
    with torch.set_grad_enabled(entropy_grad and torch.is_grad_enabled()):
        entropy = -(log_probs.exp() * log_probs).sum(dim=-1)
    return logp, entropy


def response_logprobs_and_entropy(
    logits: torch.Tensor,
    labels: torch.Tensor,
    mask: torch.Tensor,
    *,
    entropy_grad: bool = False,
    temperature: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(log π(labels), entropy) of softmax(logits / temperature), both [b, s] fp32, only where `mask` [b, s]
    holds (zeros elsewhere).

    RL prompts (with their image tokens) are usually longer than the responses, and only response
    positions enter the loss: selecting them first saves most of the [tokens, vocab] work. The selected
    rows go through the chunked fused kernel (`algo.fused_logprob`): fp32 a chunk of tokens at a time,
    vocab-parallel under TP, never a whole fp32 [tokens, V] copy. The entropy is a metric unless
    `entropy_grad` (an entropy bonus in the loss).
    """
    mask = mask.to(logits.device)
    tp = parallel_state.get_tensor_model_parallel_world_size()
    sel_logp, sel_ent = chunked_logprobs_and_entropy(
        logits[mask],  # [n, V/tp]
        labels.to(logits.device)[mask],  # [n]
        tp_group=parallel_state.get_tensor_model_parallel_group() if tp > 1 else None,
        entropy_grad=entropy_grad and torch.is_grad_enabled(),
        temperature=temperature,
    )
    logp = torch.zeros(mask.shape, dtype=sel_logp.dtype, device=logits.device).masked_scatter(mask, sel_logp)
    ent = torch.zeros(mask.shape, dtype=sel_ent.dtype, device=logits.device).masked_scatter(mask, sel_ent)
    return logp, ent


def logprob_fn(temperature: float = 1.0, with_entropy: bool = False) -> LossFn:
    """Forward-only callback: returns the micro-batch's token log-probs (and entropy), no loss.

    Under context parallelism the CP ranks' parts are gathered: every rank returns whole rows [b, s].
    """

    def fn(mb: MicroBatch, logits: torch.Tensor):
        logp, entropy = response_logprobs_and_entropy(logits, mb.labels, mb.loss_mask, temperature=temperature)
        out = {"row_index": mb.row_index, "logp": gather_from_cp(logp.detach(), 1)}
        if with_entropy:
            out["entropy"] = gather_from_cp(entropy.detach(), 1)
        return logits.new_zeros(()), out

    return fn


def sft_loss_fn(normalizer: LossNormalizer) -> LossFn:
    """Token-mean negative log-likelihood over the masked (expert response) tokens."""

    def fn(mb: MicroBatch, logits: torch.Tensor):
        mask = mb.loss_mask.to(logits.device).float()
        nll = -token_logprobs(logits, mb.labels)
        loss = aggregate(nll, mask, normalizer.for_rows(mb.row_tokens))
        return loss, {"metrics": {"nll": loss.detach()}}

    return fn


def rl_loss_fn(cfg: AlgoConfig, normalizer: LossNormalizer, temperature: float = 1.0) -> LossFn:
    """The configured algorithm's loss on one micro-batch (metrics are this rank's shares, unreduced).

    Micro-batch extras used: `old_logp`, `advantages`, and per family `expert_logp`, `expert_valid`,
    `passed` (calibrl) or `is_expert` (luffy / rlplus). Rows the family does not train (expert rows in
    grpo/dapo/calibrl) must already be out of `loss_mask`.
    """
    fn_loss = LOSS_FNS[cfg.name]
    need_entropy_grad = cfg.entropy_coef != 0.0

    def fn(mb: MicroBatch, logits: torch.Tensor):
        dev = logits.device
        x = {k: v.to(dev) for k, v in mb.extras.items()}
        logp, entropy = response_logprobs_and_entropy(logits, mb.labels, mb.loss_mask,
                                                      entropy_grad=need_entropy_grad, temperature=temperature)
        common = dict(
            clip_low=cfg.clip_low,
            clip_high=cfg.clip_high,
            dual_clip=cfg.dual_clip if cfg.dual_clip > 0 else None,
            agg=cfg.agg,
            normalizer=normalizer.for_rows(mb.row_tokens),
            entropy=entropy,
            entropy_coef=cfg.entropy_coef,
        )
        mask = mb.loss_mask.to(dev)
        gate = x.get("gate", torch.ones_like(x["advantages"]))  # expert gating weight per row's group
        if cfg.name == "calibrl":
            loss, metrics = fn_loss(
                logp, x["old_logp"], x["expert_logp"], x["advantages"], x["passed"], mask,
                alpha=cfg.alpha, lam=cfg.lam, rarity=x["advantages"].abs() * gate,
                expert_mask=x["expert_valid"].bool() if cfg.expert_mask else None, **common,
            )
        elif cfg.name in ("luffy", "rlplus"):
            extra = {"gamma": cfg.luffy_gamma} if cfg.name == "luffy" else {"exploration_exponent": cfg.rlplus_exponent}
            # A gated expert row keeps only `gate` of its off-policy advantage.
            adv = x["advantages"] * torch.where(x["is_expert"], gate, torch.ones_like(gate))
            loss, metrics = fn_loss(logp, x["old_logp"], adv, mask, x["is_expert"], **extra, **common)
        else:
            loss, metrics = fn_loss(logp, x["old_logp"], x["advantages"], mask, **common)
        return loss, {"metrics": metrics}

    return fn
