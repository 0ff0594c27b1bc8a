"""Chunked, fused token log-probs + entropy over a (possibly TP vocab-sharded) vocabulary.

The unfused path upcasts all selected logits to fp32 at once and keeps a [tokens, vocab] fp32 log-softmax
alive for backward: at 4096 response tokens and vocab 151936 that is 2.5 GB per copy, several copies deep.
Here the forward walks `chunk_size` tokens at a time (fp32 max, sum-exp, target logit, entropy per chunk),
keeps only two fp32 numbers per token (logsumexp and entropy), and the backward recomputes the softmax
chunk by chunk and writes the gradient straight into a tensor of the logits' dtype. The largest fp32
temporaries are two [chunk, V/tp] buffers.

Math, per token with logits z over the full vocab, p = softmax(z), lse = log Σ exp z:
    log p(y)  = z_y − lse
    H         = −Σ p log p = lse − Σ p z
    ∂ log p(y) / ∂z = onehot(y) − p
    ∂ H / ∂z_j      = −Σ_k (log p_k + 1) p_k (δ_kj − p_j) = −p_j (log p_j + H)
Under tensor parallelism (vocab-parallel, Megatron's layout: TP rank r holds ids [r·V/tp, (r+1)·V/tp))
the forward all-reduces per chunk: MAX of the row maxima, then one SUM of [Σe, Σe·(z−m), z_y−m]. The
backward needs no communication: given the global lse and H, each rank's slice of the gradient is local
(the output layer's backward reduces the hidden-state gradient across TP itself).

Labels must be valid global vocab ids (no ignore index): select the positions first.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

DEFAULT_CHUNK_TOKENS = 1024
"""Tokens per chunk: two fp32 [1024, 151936] buffers are ~1.2 GB, against ~2.5 GB per full fp32 copy at 4096."""


def _vocab_slice(
    vocab_local: int, tp_group: dist.ProcessGroup | None
) -> tuple[int, dist.ProcessGroup | None]:
    """(first global vocab id held here, the group to reduce over or None when the vocab is not split)."""
    if tp_group is None or dist.get_world_size(tp_group) == 1:
        return 0, None
    return dist.get_rank(tp_group) * vocab_local, tp_group


def _local_labels(labels: torch.Tensor, start: int, vocab_local: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Labels as column indices into this rank's slice (clamped) and whether the slice holds them."""
    local = labels - start
    held = (local >= 0) & (local < vocab_local)  # [c]
    return local.clamp(0, vocab_local - 1), held


class ChunkedLogProbEntropy(torch.autograd.Function):
    """(logits [n, V/tp], labels [n]) -> (log p(labels) [n] fp32, entropy [n] fp32), chunked; see module doc."""

    @staticmethod
    def forward(
        ctx,
        logits: torch.Tensor,
        labels: torch.Tensor,
        chunk_size: int,
        tp_group: dist.ProcessGroup | None,
        entropy_grad: bool,
        temperature: float,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        n, vocab_local = logits.shape
        start, group = _vocab_slice(vocab_local, tp_group)
        logp = torch.empty(n, dtype=torch.float32, device=logits.device)
        lse = torch.empty_like(logp)
        entropy = torch.empty_like(logp)
        for i in range(0, n, chunk_size):
            z = logits[i : i + chunk_size].to(torch.float32, copy=True)  # [c, V/tp] fp32, ours to edit
            if temperature != 1.0:
                z.div_(temperature)
            m = z.amax(dim=-1)  # [c]
            if group is not None:
                dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
            z.sub_(m[:, None])  # z − m  [c, V/tp]
            cols, held = _local_labels(labels[i : i + chunk_size], start, vocab_local)
            target = z.gather(1, cols[:, None]).squeeze(1) * held  # z_y − m where held, else 0  [c]
            e = z.exp()  # [c, V/tp]
            sums = torch.stack([e.sum(dim=-1), e.mul_(z).sum(dim=-1), target])  # [3, c]
            del e, z
            if group is not None:
                dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=group)
            sum_e, sum_ez, target = sums.unbind(0)
            log_sum_e = torch.log(sum_e)
            logp[i : i + chunk_size] = target - log_sum_e
            lse[i : i + chunk_size] = m + log_sum_e
            entropy[i : i + chunk_size] = log_sum_e - sum_ez / sum_e  # H = log Σe − Σe(z−m) / Σe
        ctx.save_for_backward(logits, labels, lse, entropy)
        ctx.chunk_size, ctx.start, ctx.temperature = chunk_size, start, temperature
        if not entropy_grad:
            ctx.mark_non_differentiable(entropy)
        ctx.set_materialize_grads(False)
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp: torch.Tensor | None, grad_entropy: torch.Tensor | None):
        logits, labels, lse, entropy = ctx.saved_tensors
        n, vocab_local = logits.shape
        grad_logits = torch.empty_like(logits)  # in the logits' dtype
        if grad_logp is None and grad_entropy is None:
            return grad_logits.zero_(), None, None, None, None, None
        gl = grad_logp.float() if grad_logp is not None else torch.zeros_like(lse)
        chunk, inv_t = ctx.chunk_size, 1.0 / ctx.temperature
        for i in range(0, n, chunk):
            sl = slice(i, i + chunk)
            log_p = logits[sl].to(torch.float32, copy=True)  # [c, V/tp]
            if inv_t != 1.0:
                log_p.mul_(inv_t)
            log_p.sub_(lse[sl, None])  # log p
            p = log_p.exp()  # [c, V/tp]
            if grad_entropy is None:
                grad = p.mul_(-gl[sl, None])  # −g_logp · p
            else:
                # −p · (g_logp + g_H · (log p + H))
                grad = log_p.add_(entropy[sl, None]).mul_(grad_entropy[sl, None].float())
                grad = grad.add_(gl[sl, None]).mul_(p).neg_()
            del p, log_p
            cols, held = _local_labels(labels[sl], ctx.start, vocab_local)
            grad.scatter_add_(1, cols[:, None], (gl[sl] * held)[:, None])  # + g_logp · onehot(y)
            if inv_t != 1.0:
                grad.mul_(inv_t)  # z = logits / T
            grad_logits[sl] = grad
        return grad_logits, None, None, None, None, None


def chunked_logprobs_and_entropy(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    chunk_size: int = DEFAULT_CHUNK_TOKENS,
    tp_group: dist.ProcessGroup | None = None,
    entropy_grad: bool = False,
    temperature: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(log π(labels), entropy), both fp32 of labels' shape, from logits [..., V/tp] of any float dtype.

    `tp_group`: the TP group when the vocab is sharded (this rank holds ids [rank·V/tp, (rank+1)·V/tp)),
    else None. The entropy is a metric (no gradient) unless `entropy_grad`. `temperature` divides the
    logits inside the kernel (no scaled copy of the logits is made).
    """
    if logits.shape[:-1] != labels.shape:
        raise ValueError(
            f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} disagree before vocab"
        )
    if not logits.is_floating_point():
        raise ValueError(f"logits must be floating point, got {logits.dtype}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    lead = labels.shape
    flat_logits = logits.reshape(-1, logits.shape[-1])  # [n, V/tp]
    flat_labels = labels.reshape(-1).to(device=logits.device, dtype=torch.long)  # [n]
    logp, entropy = ChunkedLogProbEntropy.apply(
        flat_logits, flat_labels, chunk_size, tp_group, entropy_grad, float(temperature)
    )
    return logp.view(lead), entropy.view(lead)
