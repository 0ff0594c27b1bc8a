"""Rows (one sampled or expert sequence each) -> length-sorted, right-padded micro-batches.

Padding bound: rows are sorted by total length before chunking, so within a micro-batch of b rows the
padding is at most the length spread of b neighbours in sorted order; `padding_fraction()` reports the
measured waste, logged every step. Micro-batches hold `train.micro_batch_size` rows, or with
`train.max_tokens_per_micro_batch` as many rows as fit a token budget (`chunk_by_tokens`; with
`model.packed_sequences` the budget counts real tokens only, so short rows share a micro-batch).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from calibrl_mcore.data.images import ImageRef
from calibrl_mcore.trainer.policy import MicroBatch
from model_providers.context_parallel import cp_pad_multiple
from model_providers.packing import packed_length


@dataclass
class Row:
    """One sequence of the step: a prompt plus an on-policy response or the group's expert solution."""

    uid: str  # prompt uid
    group_id: int  # int64 label shared by a prompt's rows
    is_expert: bool
    prompt_ids: list[int]
    response_ids: list[int]
    pixel_values: torch.Tensor | None = None  # [n_patches, C·T·P·P]; set on a replica's first stage only
    image_grid_thw: torch.Tensor | None = None  # [n_images, 3]
    images: tuple[ImageRef, ...] = ()  # the prompt's images by reference: each DP replica encodes its own
    prompt_text: str = ""  # the chat-templated prompt the images are encoded with (placeholders unexpanded)
    rollout_logprobs: list[float] | None = None  # from the rollout server (on-policy rows)
    reward: float = 0.0
    acc: float = 0.0
    fmt: float = 0.0
    finish_reason: str = ""
    text: str = ""
    extras: dict[str, object] = field(default_factory=dict)

    @property
    def length(self) -> int:
        return len(self.prompt_ids) + len(self.response_ids)


def chunk_by_length(indices: Sequence[int], rows: Sequence[Row], micro_batch_size: int) -> list[list[int]]:
    """Length-sorted chunks of row indices (stable, deterministic)."""
    order = sorted(indices, key=lambda i: (rows[i].length, i))
    return [order[i : i + micro_batch_size] for i in range(0, len(order), micro_batch_size)]


def chunk_by_tokens(indices: Sequence[int], rows: Sequence[Row], max_tokens: int, *, packed: bool) -> list[list[int]]:
    """Length-sorted chunks of row indices whose computed tokens stay within `max_tokens`: the sum of the
    lengths for packed micro-batches, rows x the longest (the last in sorted order) for padded ones. A row
    longer than the budget gets a micro-batch of its own. Stable and deterministic, like `chunk_by_length`."""
    order = sorted(indices, key=lambda i: (rows[i].length, i))
    chunks: list[list[int]] = []
    current: list[int] = []
    used = 0
    for i in order:
        length = rows[i].length
        cost = used + length if packed else (len(current) + 1) * length
        if current and cost > max_tokens:
            chunks.append(current)
            current, cost = [], length
        current.append(i)
        used = cost if packed else 0
    if current:
        chunks.append(current)
    return chunks


def micro_batch_chunks(
    indices: Sequence[int], rows: Sequence[Row], micro_batch_size: int, max_tokens: int = 0, *, packed: bool = False
) -> list[list[int]]:
    """`train.max_tokens_per_micro_batch` > 0: token-budget chunks (`chunk_by_tokens`); else
    `micro_batch_size` rows per chunk (`chunk_by_length`)."""
    if max_tokens > 0:
        return chunk_by_tokens(indices, rows, max_tokens, packed=packed)
    return chunk_by_length(indices, rows, micro_batch_size)


def collate(
    rows: Sequence[Row],
    chunk: Sequence[int],
    position_ids_fn: Callable[..., torch.Tensor],
    token_extras: dict[str, Callable[[int], Sequence[float]]] | None = None,
    row_extras: dict[str, Callable[[int], float | bool]] | None = None,
    pad_id: int = 0,
    pad_multiple: int | None = None,
) -> MicroBatch:
    """Right-pad rows `chunk` into a MicroBatch, its length a multiple of `pad_multiple` (default: what
    context parallelism needs, `cp_pad_multiple()`; 1 without CP).

    `token_extras[name](i)` gives row i's per-response-token values (length = len(response_ids)); they
    are placed at the prediction columns of the response: value j sits at column prompt_len − 1 + j.
    `row_extras[name](i)` gives one value per row.
    """
    sel = [rows[i] for i in chunk]
    multiple = cp_pad_multiple() if pad_multiple is None else pad_multiple
    seq = -(-max(r.length for r in sel) // multiple) * multiple
    b = len(sel)
    input_ids = torch.full((b, seq), pad_id, dtype=torch.long)
    attn = torch.zeros(b, seq, dtype=torch.long)
    loss_mask = torch.zeros(b, seq, dtype=torch.bool)
    tok = {name: torch.zeros(b, seq, dtype=torch.float32) for name in (token_extras or {})}
    for k, (i, r) in enumerate(zip(chunk, sel)):
        p, n = len(r.prompt_ids), len(r.response_ids)
        input_ids[k, : p + n] = torch.tensor(r.prompt_ids + r.response_ids, dtype=torch.long)
        attn[k, : p + n] = 1
        loss_mask[k, p - 1 : p - 1 + n] = True  # logits at p-1 predict the first response token
        for name, fn in (token_extras or {}).items():
            values = torch.as_tensor(list(fn(i)), dtype=torch.float32)
            if values.numel() != n:
                raise ValueError(f"token extra {name!r} has {values.numel()} values for {n} response tokens")
            tok[name][k, p - 1 : p - 1 + n] = values
    labels = torch.zeros_like(input_ids)
    labels[:, :-1] = input_ids[:, 1:]  # [b, s]: token predicted at each position
    pixels = [r.pixel_values for r in sel if r.pixel_values is not None]
    grids = [r.image_grid_thw for r in sel if r.image_grid_thw is not None]
    grid = torch.cat(grids) if grids else None
    extras: dict[str, torch.Tensor] = dict(tok)
    for name, fn in (row_extras or {}).items():
        values = [fn(i) for i in chunk]
        dtype = torch.bool if isinstance(values[0], bool) else torch.float32
        extras[name] = torch.tensor(values, dtype=dtype)
    return MicroBatch(
        input_ids=input_ids,
        position_ids=position_ids_fn(input_ids, grid, attn),
        pixel_values=torch.cat(pixels) if pixels else None,
        image_grid_thw=grid,
        labels=labels,
        loss_mask=loss_mask,
        row_index=torch.tensor(list(chunk), dtype=torch.long),
        seq_lengths=attn.sum(dim=1),
        extras=extras,
    )


def padding_fraction(micro_batches: Sequence[MicroBatch], packed_multiple: int = 0) -> float:
    """Share of computed token slots that are padding: [b, s] slots, or with packed sequences
    (`packed_multiple` > 0, model_providers/packing.py) the real tokens rounded up to that multiple."""
    real = sum(int(mb.seq_lengths.sum()) for mb in micro_batches)
    if packed_multiple:
        slots = sum(packed_length(int(mb.seq_lengths.sum()), packed_multiple) for mb in micro_batches)
    else:
        slots = sum(mb.input_ids.numel() for mb in micro_batches)
    return max(0.0, 1.0 - real / max(slots, 1))
