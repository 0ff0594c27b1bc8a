"""Packed (THD) micro-batches: the padding of a right-padded [b, s] micro-batch removed before the decoder.

The trainer's micro-batches are rows of different lengths padded to the longest. With packing, the
model concatenates the rows' real tokens into one sequence of T = sum(lengths) tokens (plus a tail that
rounds T up to `pad_multiple`, for sequence parallelism), runs the decoder on it with Megatron's
`PackedSeqParams(qkv_format="thd")`, and scatters the last stage's output back to [b, s, ...]. Every
layer then works on T tokens instead of b * s; only the core attention has to know where rows start:

    rows (b = 3, s = 6)        packed (T = 12 -> 12, pad_multiple 4)     cu_seqlens
    a a a a . .                a a a a b b b b b b c c                  [0, 4, 10, 12]
    b b b b b b
    c c . . . .

Exactness: each row attends only to itself (causal within its segment), its positions are its own
(M-RoPE ids are per token; plain RoPE restarts at 0 per segment), and norms / MLPs are per token, so
packed logits equal the padded model's at every real token. The tail (if any) is one more segment of
padding tokens; nobody reads its outputs. The unpacked logits at padding positions are zero.

Who reads what (Megatron 0.16.1): `Attention.forward` squeezes q/k/v to [T, heads, hn] and applies RoPE
per segment from `cu_seqlens_q_padded` when that is set, else `cu_seqlens_q` (its THD RoPE calls
`.tolist()` / `.item()` on them); the core attention gets the whole `PackedSeqParams`. So the `_padded`
fields hold a *CPU* copy of the boundaries (no device sync per layer in RoPE) and `cu_seqlens_q/kv` the
device copy the attention kernels take (`sdpa_attention`: torch varlen flash on CUDA, one SDPA per
segment elsewhere). Transformer Engine reads the `_padded` fields as device tensors, so the TE spec gets
device tensors in both (`packed_seq_params(device_boundaries_only=True)`).

Not combined with context parallelism (Megatron's THD CP layout pads every segment to 2·CP chunks: not
implemented here) and not with the local spec (its attention has no THD path).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from megatron.core.packed_seq_params import PackedSeqParams
from torch import Tensor


@dataclass(frozen=True)
class PackedLayout:
    """Where the real tokens of a right-padded [b, s] micro-batch go in the packed sequence."""

    batch: int  # b
    seq_len: int  # s: the padded row length
    index: Tensor  # [T_real] long, flat b-major indices (row * s + column) of the real tokens, on the device
    cu_seqlens: Tensor  # [n + 1] int32 on the device: segment boundaries (rows, then the tail if any)
    cu_seqlens_cpu: Tensor  # the same on the CPU
    max_seqlen: int  # longest segment
    total: int  # T: packed length including the tail

    @classmethod
    def from_lengths(
        cls, seq_lengths: Tensor, seq_len: int, *, pad_multiple: int = 1, device: torch.device | None = None
    ) -> PackedLayout:
        """Layout of rows whose first `seq_lengths[i]` columns (of `seq_len`) are real tokens."""
        lengths = [int(n) for n in seq_lengths.tolist()]
        if not lengths or min(lengths) < 1 or max(lengths) > seq_len:
            raise ValueError(f"seq_lengths {lengths} must be in 1..{seq_len} (the micro-batch's padded length)")
        real = sum(lengths)
        total = packed_length(real, pad_multiple)
        segments = lengths + ([total - real] if total > real else [])
        cu = torch.zeros(len(segments) + 1, dtype=torch.int32)
        cu[1:] = torch.tensor(segments, dtype=torch.int32).cumsum(0)
        index = torch.cat([torch.arange(n) + row * seq_len for row, n in enumerate(lengths)])
        device = device or torch.device("cpu")
        return cls(
            batch=len(lengths),
            seq_len=seq_len,
            index=index.to(device),
            cu_seqlens=cu.to(device),
            cu_seqlens_cpu=cu,
            max_seqlen=max(segments),
            total=total,
        )

    @property
    def real_tokens(self) -> int:
        return int(self.index.numel())

    def pack(self, x: Tensor, *, batch_dim: int = 0) -> Tensor:
        """[.., b, s, ..] (b at `batch_dim`, s right after) -> [.., T, ..] (the tail zero-filled)."""
        if x.shape[batch_dim : batch_dim + 2] != (self.batch, self.seq_len):
            raise ValueError(
                f"tensor {tuple(x.shape)} has no [b={self.batch}, s={self.seq_len}] at dims {batch_dim}, {batch_dim + 1}"
            )
        flat = x.flatten(batch_dim, batch_dim + 1).index_select(batch_dim, self.index)
        tail = self.total - self.real_tokens
        if tail:
            shape = list(flat.shape)
            shape[batch_dim] = tail
            flat = torch.cat([flat, flat.new_zeros(shape)], dim=batch_dim)
        return flat

    def unpack(self, x: Tensor, *, batch_dim: int = 0) -> Tensor:
        """[.., T, ..] -> [.., b, s, ..], zeros at padding positions (autograd flows to the real tokens)."""
        real = x.narrow(batch_dim, 0, self.real_tokens)
        shape = list(x.shape)
        shape[batch_dim] = self.batch * self.seq_len
        out = x.new_zeros(shape).index_copy(batch_dim, self.index, real)
        return out.unflatten(batch_dim, (self.batch, self.seq_len))

    def packed_seq_params(self, *, device_boundaries_only: bool = False) -> PackedSeqParams:
        """Megatron's THD parameters (see the module docstring for the `_padded` fields)."""
        padded = self.cu_seqlens if device_boundaries_only else self.cu_seqlens_cpu
        return PackedSeqParams(
            qkv_format="thd",
            cu_seqlens_q=self.cu_seqlens,
            cu_seqlens_kv=self.cu_seqlens,
            cu_seqlens_q_padded=padded,
            cu_seqlens_kv_padded=padded,
            max_seqlen_q=self.max_seqlen,
            max_seqlen_kv=self.max_seqlen,
        )


def packed_length(real_tokens: int, pad_multiple: int = 1) -> int:
    """T: the packed sequence's length, real tokens plus the tail up to a multiple of `pad_multiple`."""
    return -(-real_tokens // pad_multiple) * pad_multiple


def check_packing_supported(backend: str, cp_size: int) -> None:
    """Packed sequences need a THD attention (sdpa or te spec) and no context parallelism (module docstring)."""
    if backend == "local":
        raise ValueError("packed sequences need the 'sdpa' or 'te' spec (model.spec; the local attention has "
                         "no THD path)")
    if cp_size > 1:
        raise NotImplementedError(f"packed sequences (model.packed_sequences) do not combine with context "
                                  f"parallelism (context_parallel_size={cp_size})")


def segment_bounds(packed_seq_params: PackedSeqParams) -> list[int]:
    """The segment boundaries as Python ints, from the CPU copy when there is one (no device sync)."""
    cu = packed_seq_params.cu_seqlens_q_padded
    if cu is None or cu.device.type != "cpu":
        cu = packed_seq_params.cu_seqlens_q
    return [int(c) for c in cu.tolist()]
