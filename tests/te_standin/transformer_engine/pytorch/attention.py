"""TE 2.11 `DotProductAttention` (stand-in), attention/dot_product_attention/dot_product_attention.py.

Math: softmax(q k^T · scale + mask) v in fp32, GQA by repeating K/V heads, rows with every key masked give
zeros (TE's `fast_zero_fill`). Formats: sbhd / bshd ([s, b, h, d] / [b, s, h, d] -> [s, b, h·d] / [b, s, h·d])
and thd ([t, h, d] -> [t, h·d], segments from `cu_seqlens_q(_padded)`, each attended on its own). Context
parallelism (cp_group of size c, sbhd/bshd, causal): each rank holds sequence chunks r and 2c-1-r (Megatron's
load balancing); K/V are all-gathered over the group (backward: the gradient all-reduced and sliced) and the
causal rule is applied on global positions: the same result as TE's p2p ring, without the ring.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from .module import TransformerEngineBaseModule

_MASK_TYPES = ("no_mask", "padding", "causal", "padding_causal", "causal_bottom_right",
               "padding_causal_bottom_right", "arbitrary")


class _AllGatherSeq(torch.autograd.Function):
    """All-gather along dim 0 over `group`; backward: all-reduce of the full gradient, keep this rank's slice."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group, ctx.size, ctx.rank = group, dist.get_world_size(group), dist.get_rank(group)
        parts = [torch.empty_like(x) for _ in range(ctx.size)]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts, 0)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        return grad.chunk(ctx.size, 0)[ctx.rank], None


def _attend(q, k, v, allowed, scale):
    """q [b, h, sq, d], k/v [b, g, sk, d], allowed bool broadcastable to [b, h, sq, sk] -> [b, h, sq, d]."""
    h, g = q.shape[1], k.shape[1]
    if g != h:
        k, v = k.repeat_interleave(h // g, 1), v.repeat_interleave(h // g, 1)
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
    if allowed is not None:
        scores = scores.masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(scores, -1)
    if allowed is not None:
        probs = probs.nan_to_num(0.0)  # fully masked rows
    return torch.matmul(probs, v.float()).to(q.dtype)


class DotProductAttention(TransformerEngineBaseModule):
    def __init__(self, num_attention_heads: int, kv_channels, num_gqa_groups: int | None = None,
                 attention_dropout: float = 0.0, qkv_format: str = "sbhd", attn_mask_type: str = "causal",
                 window_size=None, sequence_parallel: bool = False, tp_size: int = 1, get_rng_state_tracker=None,
                 tp_group=None, layer_number: int | None = None, attention_type: str = "self", cp_group=None,
                 cp_global_ranks=None, cp_stream=None, cp_comm_type: str = "p2p", softmax_scale: float | None = None,
                 softmax_type: str = "vanilla", return_max_logit: bool | None = False) -> None:
        super().__init__()
        if attention_dropout:
            raise NotImplementedError("TE stand-in: attention dropout is not emulated")
        if window_size is not None or softmax_type != "vanilla" or return_max_logit:
            raise NotImplementedError("TE stand-in: sliding windows, softmax_type, max logits are not emulated")
        assert attn_mask_type in _MASK_TYPES, f"attn_mask_type {attn_mask_type} not supported"
        self.qkv_format, self.attn_mask_type = qkv_format, attn_mask_type
        self.tp_size = tp_size if tp_group is None else dist.get_world_size(tp_group)
        self.num_attention_heads = num_attention_heads
        self.num_gqa_groups = num_attention_heads if num_gqa_groups is None else num_gqa_groups
        self.num_gqa_groups_per_partition = self.num_gqa_groups // self.tp_size
        self.hidden_size_per_attention_head_k = kv_channels if isinstance(kv_channels, int) else kv_channels[0]
        self.softmax_scale = softmax_scale or self.hidden_size_per_attention_head_k ** -0.5
        self.layer_number, self.attention_type = layer_number, attention_type
        self.set_context_parallel_group(cp_group, cp_global_ranks, cp_stream, cp_comm_type)

    def set_context_parallel_group(self, cp_group, cp_global_ranks, cp_stream, cp_comm_type: str = "p2p") -> None:
        if cp_group is not None and cp_comm_type != "p2p":
            raise NotImplementedError(f"TE stand-in: cp_comm_type={cp_comm_type!r} (p2p only)")
        self.cp_group, self.cp_global_ranks, self.cp_stream, self.cp_comm_type = (
            cp_group, cp_global_ranks, cp_stream, cp_comm_type)

    def forward(self, query_layer, key_layer, value_layer, attention_mask=None, qkv_format: str | None = None,
                cu_seqlens_q=None, cu_seqlens_kv=None, cu_seqlens_q_padded=None, cu_seqlens_kv_padded=None,
                max_seqlen_q: int | None = None, max_seqlen_kv: int | None = None, attn_mask_type: str | None = None,
                window_size=None, checkpoint_core_attention: bool = False, core_attention_bias_type: str = "no_bias",
                core_attention_bias=None, alibi_slopes=None, fast_zero_fill: bool = True, inference_params=None,
                pad_between_seqs: bool | None = None, fp8_output: bool | None = False, num_splits: int | None = 1):
        fmt = qkv_format or self.qkv_format
        mask_type = attn_mask_type or self.attn_mask_type
        assert mask_type in _MASK_TYPES, f"attn_mask_type {mask_type} not supported"
        if core_attention_bias_type != "no_bias" or alibi_slopes is not None or inference_params is not None:
            raise NotImplementedError("TE stand-in: attention bias / alibi / inference params are not emulated")
        cp = dist.get_world_size(self.cp_group) if self.cp_group is not None and dist.is_initialized() else 1
        if fmt == "thd":
            if cp > 1:
                raise NotImplementedError("TE stand-in: context parallelism with thd is not emulated")
            return self._thd(query_layer, key_layer, value_layer, cu_seqlens_q, cu_seqlens_kv,
                             cu_seqlens_q_padded, cu_seqlens_kv_padded, "causal" in mask_type)
        if fmt == "bshd":
            query_layer, key_layer, value_layer = (t.transpose(0, 1) for t in (query_layer, key_layer, value_layer))
        elif fmt != "sbhd":
            raise ValueError(f"qkv_format {fmt!r} not supported")
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query_layer, key_layer, value_layer))  # [b, h, s, d]
        sq, sk = q.shape[2], k.shape[2]
        allowed = None
        if cp > 1:
            assert mask_type in ("causal", "padding_causal") and attention_mask is None, \
                "TE stand-in: context parallelism emulated for causal attention without a mask tensor"
            k = _AllGatherSeq.apply(k.permute(2, 0, 1, 3), self.cp_group).permute(1, 2, 0, 3)
            v = _AllGatherSeq.apply(v.permute(2, 0, 1, 3), self.cp_group).permute(1, 2, 0, 3)
            rank = dist.get_rank(self.cp_group)
            q_pos = _cp_positions(rank, cp, sq, q.device)
            k_pos = torch.cat([_cp_positions(j, cp, sq, q.device) for j in range(cp)])
            allowed = q_pos[:, None] >= k_pos[None, :]
        else:
            if "causal" in mask_type:  # top-left aligned (causal) or bottom-right
                offset = sk - sq if "bottom_right" in mask_type else 0
                allowed = torch.ones(sq, sk, dtype=torch.bool, device=q.device).tril(offset)
            if attention_mask is not None and mask_type != "causal":
                keep = ~attention_mask if not isinstance(attention_mask, tuple) else ~attention_mask[1]
                allowed = keep if allowed is None else allowed & keep
        out = _attend(q, k, v, allowed, self.softmax_scale)  # [b, h, s, d]
        out = out.permute(2, 0, 1, 3).flatten(2)  # [s, b, h·d]
        return out.transpose(0, 1) if fmt == "bshd" else out

    def _thd(self, q, k, v, cu_q, cu_kv, cu_q_padded, cu_kv_padded, causal):
        assert cu_q is not None and cu_kv is not None, "thd needs cu_seqlens_q / cu_seqlens_kv"
        starts_q = (cu_q_padded if cu_q_padded is not None else cu_q).tolist()
        starts_kv = (cu_kv_padded if cu_kv_padded is not None else cu_kv).tolist()
        lens_q, lens_kv = (cu_q[1:] - cu_q[:-1]).tolist(), (cu_kv[1:] - cu_kv[:-1]).tolist()
        out = torch.zeros(q.shape[0], q.shape[1] * v.shape[2], dtype=q.dtype, device=q.device)
        for sq0, sk0, nq, nk in zip(starts_q[:-1], starts_kv[:-1], lens_q, lens_kv):
            if nq == 0:
                continue
            qs, ks, vs = (t.permute(1, 0, 2)[None] for t in (q[sq0:sq0 + nq], k[sk0:sk0 + nk], v[sk0:sk0 + nk]))
            allowed = torch.ones(nq, nk, dtype=torch.bool, device=q.device).tril(nk - nq) if causal else None
            seg = _attend(qs, ks, vs, allowed, self.softmax_scale)[0]  # [h, nq, d]
            out = out.index_copy(0, torch.arange(sq0, sq0 + nq, device=q.device), seg.permute(1, 0, 2).flatten(1))
        return out


def _cp_positions(rank: int, cp: int, s_local: int, device) -> torch.Tensor:
    """Global positions of a CP rank's tokens: chunks `rank` and `2·cp-1-rank` of the 2·cp equal chunks."""
    n = s_local // 2
    return torch.cat([torch.arange(rank * n, (rank + 1) * n), torch.arange((2 * cp - 1 - rank) * n,
                                                                           (2 * cp - rank) * n)]).to(device)
