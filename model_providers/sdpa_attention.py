"""Megatron's core-attention slot filled by `torch.nn.functional.scaled_dot_product_attention` (spec 'sdpa').

Megatron's local `DotProductAttention` builds the [b, np, sq, sk] score matrix (baddbmm), softmaxes it and
multiplies by V: S x S memory per head on every device (on an H200 the 3B decoder ran at half the speed of
SDPA, see docs/gpu.md). `SDPACoreAttention` takes the same constructor arguments and the same forward
arguments and returns the same [sq, b, np * hn] tensor, so it drops into `SelfAttentionSubmodules.core_attention`
of the local spec without changing any parameter name (it has no parameters). On CUDA, SDPA dispatches to
flash attention (no mask tensor) or the memory-efficient kernel (boolean mask): neither stores S x S.

Masks (the local spec's semantics):
  * `attention_mask` given: Megatron's boolean mask, True = masked out, broadcastable to [b, np, sq, sk]
    ([1, 1, s, s] block-diagonal vision windows, [b, 1, s, s] full masks, [b, 1, 1, s] padding). It is
    used as given, whatever the mask type (like the local spec, which ignores the type when a mask is
    passed); SDPA's convention is the opposite (True = attend), so it receives `~attention_mask`.
  * no mask, causal: `is_causal=True` when sq == sk (no S x S tensor); sq == 1 (one new token against a
    KV cache) attends to everything, as in the local spec; 1 < sq < sk gets an explicit bottom-right mask.
  * no mask, any other type: full attention.
  One difference: a query row whose keys are *all* masked gets zeros (and zero grads) from SDPA, where the
  local spec's -10000 fill gives the mean of V. Only all-padding query rows have that, and nobody reads them.

GQA (ng < np query groups): with no mask tensor SDPA takes K/V with ng heads (`enable_gqa=True`, torch >= 2.5;
flash supports it). With a mask tensor K/V are repeated to np heads first: CUDA's memory-efficient kernel,
the only fused one that takes a mask, rejects ng != np and SDPA would fall back to the S x S math kernel.

Packed sequences (`packed_seq_params`, qkv_format "thd", see `packing.py`): query [T, np, hn] holds several
rows back to back; each attends causally within its own segment. On CUDA in bf16/fp16 that is one torch
varlen flash-attention call (`torch.nn.attention.varlen`, torch >= 2.10; GQA native); elsewhere one SDPA
call per segment (CPU tests check that against the padded model).

Context parallelism (config.context_parallel_size > 1; Megatron's local spec has none): the rank holds
query/K/V of its two load-balanced chunks (`context_parallel`); K/V are all-gathered over the CP group
(backward: reduce-scatter) and each local query chunk g attends causally to keys 0 .. (g + 1)·c − 1, a
bottom-right mask against a prefix of the keys, so no S x S tensor exists. Only causal attention without an
explicit mask (the decoder's) is supported; the vision towers are not context-parallel.

Scale 1/sqrt(hn) unless `softmax_scale` (config.softmax_scale, passed in by `Attention`) says otherwise;
`apply_query_key_layer_scaling` divides the scores by the layer number and multiplies them back inside the
fp32 softmax, a no-op in exact arithmetic, so it is ignored here. Attention dropout (config or argument)
applies in training only, under the tensor-parallel RNG tracker like the local spec. np and ng are the
per-TP-partition head counts, as in the local spec.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import math

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.utils import divide
from torch import Tensor

from .context_parallel import cp_size_rank, gather_for_cp, local_chunks
from .packing import segment_bounds

_CAUSAL_TYPES = (AttnMaskType.causal, AttnMaskType.causal_bottom_right)


class SDPACoreAttention(MegatronModule):
    """Drop-in for Megatron's `DotProductAttention` (local spec) computed by torch SDPA. See module docstring."""

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: float | None = None,
        softmax_scale: float | None = None,
        cp_comm_type: str | None = None,
        pg_collection: ProcessGroupCollection | None = None,
    ) -> None:
        super().__init__(config=config)
        unsupported = {
            f"softmax_type={config.softmax_type!r}": config.softmax_type != "vanilla",
            f"window_size={config.window_size}": config.window_size is not None,
        }
        if any(unsupported.values()):
            bad = ", ".join(k for k, v in unsupported.items() if v)
            raise NotImplementedError(f"SDPACoreAttention does not support {bad}; use the TE spec")

        self.layer_number = max(1, layer_number)
        self.attn_mask_type = attn_mask_type
        self.attention_type = attention_type  # unused, as in the local spec

        if pg_collection is None:
            pg_collection = ProcessGroupCollection.use_mpu_process_groups(required_pgs=["tp", "cp"])
        self.pg_collection = pg_collection
        self.tp_group = pg_collection.tp
        self.cp_group = getattr(pg_collection, "cp", None) if config.context_parallel_size > 1 else None
        tp_size = self.tp_group.size()
        self.head_dim = config.kv_channels  # hn
        self.num_heads = divide(config.num_attention_heads, tp_size)  # np: query heads on this rank
        self.num_groups = divide(config.num_query_groups, tp_size)  # ng: K/V heads on this rank
        self.softmax_scale = 1.0 / math.sqrt(self.head_dim) if softmax_scale is None else softmax_scale
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        attention_mask: Tensor | None,
        attn_mask_type: AttnMaskType | None = None,
        attention_bias: Tensor | None = None,
        packed_seq_params: PackedSeqParams | None = None,
    ) -> Tensor:
        """query [sq, b, np, hn], key/value [sk, b, ng, hn], attention_mask bool (True = masked) or None
        -> context [sq, b, np * hn]."""
        if attention_bias is not None:
            raise NotImplementedError("attention_bias is not supported (nor by the local spec)")
        mask_type = self.attn_mask_type if attn_mask_type is None else attn_mask_type
        if packed_seq_params is not None:
            return self._packed(query, key, value, attention_mask, mask_type, packed_seq_params)
        heads, groups = query.size(2), key.size(2)
        if heads != self.num_heads or groups != self.num_groups:
            raise ValueError(
                f"expected {self.num_heads} query / {self.num_groups} K/V heads per rank, "
                f"got query {tuple(query.shape)}, key {tuple(key.shape)}"
            )
        if self.cp_group is not None:
            return self._context_parallel(query, key, value, attention_mask, mask_type)
        return self._attend(query, key, value, attention_mask, mask_type)

    def _packed(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        attention_mask: Tensor | None,
        mask_type: AttnMaskType,
        params: PackedSeqParams,
    ) -> Tensor:
        """Causal attention within each segment of a packed sequence: query [T, np, hn], key/value
        [T, ng, hn] (Megatron squeezes the batch dim for THD) -> [T, np * hn].

        CUDA, bf16/fp16: torch's varlen flash attention over all segments in one kernel. Elsewhere (CPU
        tests, fp32): one SDPA call per segment, `is_causal` within it; the same function.
        """
        if params.qkv_format != "thd":
            raise NotImplementedError(f"packed_seq_params.qkv_format={params.qkv_format!r}: only 'thd' is supported")
        if attention_mask is not None or mask_type not in _CAUSAL_TYPES or self.cp_group is not None:
            raise NotImplementedError(
                "packed sequences in the sdpa spec support causal attention without an explicit mask and "
                f"without context parallelism (got mask_type={mask_type}, "
                f"attention_mask={'given' if attention_mask is not None else None}, cp_group={self.cp_group})"
            )
        if query.dim() != 3 or query.size(1) != self.num_heads or key.size(1) != self.num_groups:
            raise ValueError(
                f"packed attention expects query [T, {self.num_heads}, hn] and key [T, {self.num_groups}, hn], "
                f"got {tuple(query.shape)} / {tuple(key.shape)}"
            )
        total = query.size(0)
        dropout_p = self.dropout_p if self.training else 0.0
        if _varlen_usable(query, dropout_p):
            context = _varlen_causal(query, key, value, params, self.softmax_scale)  # [T, np, hn]
            return context.reshape(total, self.num_heads * self.head_dim)
        bounds = segment_bounds(params)
        if bounds[-1] != total:
            raise ValueError(f"packed_seq_params covers {bounds[-1]} tokens, the packed sequence has {total}")
        outs = [
            # [len, np, hn] -> [len, 1, np, hn]: one segment is a batch of one
            self._attend(query[a:b, None], key[a:b, None], value[a:b, None], None, mask_type)[:, 0]
            for a, b in zip(bounds[:-1], bounds[1:])
            if b > a
        ]
        return torch.cat(outs, dim=0)  # [T, np * hn]

    def _context_parallel(
        self, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None, mask_type: AttnMaskType
    ) -> Tensor:
        """Causal attention of this CP rank's two query chunks against all-gathered K/V.

        Local tokens are global chunks r and 2·cp − 1 − r (`context_parallel`); query chunk g sees keys
        0 .. (g + 1)·c − 1 with a bottom-right causal mask. K/V are gathered once per layer (the
        all-gather's backward reduce-scatters their gradients); no S x S tensor is formed.
        """
        if attention_mask is not None or mask_type not in _CAUSAL_TYPES:
            raise NotImplementedError(
                "context parallelism in the sdpa spec supports causal attention without an explicit mask "
                f"(got mask_type={mask_type}, attention_mask={'given' if attention_mask is not None else None})"
            )
        size, rank = cp_size_rank(self.cp_group)
        key_full = gather_for_cp(key, 0, self.cp_group)  # [S, b, ng, hn]
        value_full = gather_for_cp(value, 0, self.cp_group)
        c = query.size(0) // 2
        outs = []
        for i, g in enumerate(local_chunks(size, rank)):
            q = query[i * c : (i + 1) * c]
            end = (g + 1) * c
            outs.append(self._attend(q, key_full[:end], value_full[:end], None, mask_type))
        return torch.cat(outs, dim=0)

    def _attend(
        self, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None, mask_type: AttnMaskType
    ) -> Tensor:
        """SDPA of query [sq, b, np, hn] against key/value [sk, b, ng, hn] -> [sq, b, np * hn]."""
        sq, b, heads, _ = query.shape
        sk, groups = key.size(0), key.size(2)
        attend, is_causal = self._sdpa_mask(attention_mask, mask_type, sq, sk, query.device)
        enable_gqa = groups != heads
        if enable_gqa and attend is not None:
            # Repeat K/V to np heads: the memory-efficient kernel (the fused one that takes a mask) has
            # no GQA; with enable_gqa SDPA would fall back to the S x S math kernel. Same head order as
            # enable_gqa / the local spec: query head i reads K/V group i // (np / ng).
            key = key.repeat_interleave(heads // groups, dim=2)  # [sk, b, ng, hn] -> [sk, b, np, hn]
            value = value.repeat_interleave(heads // groups, dim=2)
            enable_gqa = False

        # [s, b, n, hn] -> [b, n, s, hn] (views; SDPA handles the strides)
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        dropout_p = self.dropout_p if self.training else 0.0
        with self._dropout_rng(dropout_p):
            context = F.scaled_dot_product_attention(
                q, k, v,
                attn_mask=attend,
                dropout_p=dropout_p,
                is_causal=is_causal,
                scale=self.softmax_scale,
                enable_gqa=enable_gqa,
            )  # [b, np, sq, hn]  # fmt: skip
        # [b, np, sq, hn] -> [sq, b, np, hn] -> [sq, b, np * hn]
        return context.permute(2, 0, 1, 3).reshape(sq, b, heads * self.head_dim)

    @staticmethod
    def _sdpa_mask(
        attention_mask: Tensor | None, mask_type: AttnMaskType, sq: int, sk: int, device: torch.device
    ) -> tuple[Tensor | None, bool]:
        """(SDPA boolean mask with True = attend, or None; is_causal) for Megatron's mask and type."""
        if attention_mask is not None:
            if attention_mask.dtype != torch.bool:
                raise TypeError(
                    f"attention_mask must be bool (True = masked out, Megatron's convention), "
                    f"got {attention_mask.dtype}"
                )
            return ~attention_mask, False
        if mask_type not in _CAUSAL_TYPES or sq == 1:
            return None, False
        if sq == sk:
            return None, True
        # Queries are the last sq of sk positions (chunked prefill against a cache): bottom-right aligned.
        # [sq, sk], True = attend: query i sees keys 0 .. sk - sq + i.
        return torch.ones(sq, sk, dtype=torch.bool, device=device).tril(diagonal=sk - sq), False

    def _dropout_rng(self, dropout_p: float) -> contextlib.AbstractContextManager:
        """The TP RNG tracker's fork for attention dropout, as the local spec (no-op without dropout)."""
        if dropout_p > 0.0 and not self.config.sequence_parallel:
            return tensor_parallel.get_cuda_rng_tracker().fork()
        return contextlib.nullcontext()


def _varlen_usable(query: Tensor, dropout_p: float) -> bool:
    """torch's varlen (flash) attention: CUDA, half precision, no dropout, and a torch that has it."""
    if not query.is_cuda or query.dtype not in (torch.bfloat16, torch.float16) or dropout_p > 0.0:
        return False
    return _varlen_signature() is not None


@functools.cache
def _varlen_signature() -> frozenset[str] | None:
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:  # torch < 2.10
        return None
    return frozenset(inspect.signature(varlen_attn).parameters)


def _varlen_causal(query: Tensor, key: Tensor, value: Tensor, params: PackedSeqParams, scale: float) -> Tensor:
    """`torch.nn.attention.varlen.varlen_attn`, causal within segments. Its signature changed after torch
    2.10 (`is_causal` -> `window_size=(-1, 0)`, `enable_gqa` added): both are handled."""
    from torch.nn.attention.varlen import varlen_attn

    names = _varlen_signature()
    kwargs = {"window_size": (-1, 0)} if "window_size" in names else {"is_causal": True}
    if "scale" in names:
        kwargs["scale"] = scale
    elif scale != 1.0 / math.sqrt(query.size(-1)):
        raise NotImplementedError("this torch's varlen_attn has no `scale`; softmax_scale must be 1/sqrt(hn)")
    if key.size(1) != query.size(1):
        if "enable_gqa" in names:
            kwargs["enable_gqa"] = True
        else:
            key = key.repeat_interleave(query.size(1) // key.size(1), dim=1)
            value = value.repeat_interleave(query.size(1) // value.size(1), dim=1)
    cu_q = params.cu_seqlens_q.to(query.device, torch.int32)
    cu_k = params.cu_seqlens_kv.to(query.device, torch.int32)
    return varlen_attn(query, key, value, cu_q, cu_k, params.max_seqlen_q, params.max_seqlen_kv, **kwargs)
