"""The running decode batch of the embedded engine: a left-padded KV slab shared by all rows.

Layout: for every layer, keys/values live in one buffer [B, H, capacity, D]; columns [0, T) are in use,
and a row whose sequence is shorter than T is padded on the *left* (its attention mask is 0 there), so
the next token of every row is written to column T. Two things make this cheaper than HF's
`DynamicCache`, which concatenates the whole cache on every step:
- appends write into spare capacity (amortised O(1) per step instead of O(T));
- the slab is rebuilt only when the batch's composition changes (a request joins, rows finish).
Positions are tracked per row, so left padding never changes a row's rotary positions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

_HEADROOM = 64  # spare columns allocated whenever a slab is (re)built or grows


@dataclass
class PromptState:
    """A tokenized prompt ready to prefill."""

    input_ids: torch.Tensor  # [L] int64, on the engine's device
    position_ids: torch.Tensor  # [3, 1, L] for M-RoPE models, else [1, L]
    next_position: int  # rotary position of the first generated token (M-RoPE: not always L)
    model_kwargs: dict[str, Any]  # pixel_values, image_grid_thw, mm_token_type_ids, ... for the prefill

    @property
    def length(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def mrope(self) -> bool:
        return self.position_ids.dim() == 3


class SlabLayer(DynamicLayer):
    """A cache layer whose `keys`/`values` are views [B, H, T, D] into a larger preallocated buffer."""

    def __init__(self, key_buffer: torch.Tensor, value_buffer: torch.Tensor, length: int) -> None:
        super().__init__()
        self.key_buffer, self.value_buffer = key_buffer, value_buffer  # [B, H, capacity, D]
        self.length = length
        self.device = key_buffer.device
        self.is_initialized = True
        self._refresh_views()

    def _refresh_views(self) -> None:
        self.keys = self.key_buffer[:, :, : self.length]
        self.values = self.value_buffer[:, :, : self.length]

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        new = key_states.shape[-2]  # key_states [B, H, new, D]
        if self.length + new > self.key_buffer.shape[-2]:
            self.key_buffer = _grow(self.key_buffer, self.length, self.length + new + _HEADROOM)
            self.value_buffer = _grow(self.value_buffer, self.length, self.length + new + _HEADROOM)
        self.key_buffer[:, :, self.length : self.length + new] = key_states
        self.value_buffer[:, :, self.length : self.length + new] = value_states
        self.length += new
        self._refresh_views()
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.length


def _grow(buffer: torch.Tensor, used: int, capacity: int) -> torch.Tensor:
    grown = buffer.new_empty(*buffer.shape[:2], capacity, buffer.shape[3])
    grown[:, :, :used] = buffer[:, :, :used]
    return grown


class DecodeBatch:
    """KV slab, attention mask, positions and last tokens of all running rows."""

    def __init__(
        self,
        layers: list[tuple[torch.Tensor, torch.Tensor]],
        mask: torch.Tensor,
        next_positions: torch.Tensor,
        length: int,
        mrope: bool,
        cache_kwarg: str,
    ) -> None:
        self.cache = DynamicCache()
        self.cache.layers = [SlabLayer(k, v, length) for k, v in layers]
        self.mask = mask  # [B, capacity] int64; 1 where a row has a real token
        self.next_positions = next_positions  # [B] int64
        self.last_tokens = torch.zeros_like(next_positions)  # [B] int64, set after each sampling
        self.length = length  # T: columns in use
        self.mrope = mrope
        self.cache_kwarg = cache_kwarg

    @property
    def size(self) -> int:
        return int(self.next_positions.shape[0])

    @classmethod
    def from_prefills(cls, prefills: list[tuple[DynamicCache, PromptState, int]], cache_kwarg: str) -> DecodeBatch:
        """A batch made of freshly prefilled prompts: (prefill cache, prompt, n rows) each."""
        cache, prompt, _ = prefills[0]
        device = prompt.input_ids.device
        empty = cls(
            layers=[(layer.keys[:0, :, :0], layer.values[:0, :, :0]) for layer in cache.layers],
            mask=torch.zeros(0, 0, dtype=torch.int64, device=device),
            next_positions=torch.zeros(0, dtype=torch.int64, device=device),
            length=0,
            mrope=prompt.mrope,
            cache_kwarg=cache_kwarg,
        )
        empty.append_prefills(prefills)
        return empty

    def append_prefills(self, prefills: list[tuple[DynamicCache, PromptState, int]]) -> None:
        """Add, per prefilled prompt, n rows starting from its KV cache (copied n times): one rebuild."""
        old_rows = self.size
        new_len = max([self.length] + [prompt.length for _, prompt, _ in prefills])
        total_rows = old_rows + sum(n for _, _, n in prefills)
        capacity = new_len + _HEADROOM
        mask = self.mask.new_zeros(total_rows, capacity)
        mask[:old_rows, new_len - self.length : new_len] = self.mask[:, : self.length]
        layers = []
        for index, slab in enumerate(self.cache.layers):
            merged = []
            for old, name in ((slab.keys, "keys"), (slab.values, "values")):
                heads, dim = old.shape[1], old.shape[3]
                # [rows, H, capacity, D]; zeros because padding columns must not hold NaN/inf garbage
                # (a masked score still multiplies its value vector).
                buffer = old.new_zeros(total_rows, heads, capacity, dim)
                buffer[:old_rows, :, new_len - self.length : new_len] = old
                row = old_rows
                for cache, prompt, n in prefills:
                    fresh = getattr(cache.layers[index], name)  # [1, H, L, D]
                    buffer[row : row + n, :, new_len - prompt.length : new_len] = fresh
                    row += n
                merged.append(buffer)
            layers.append((merged[0], merged[1]))
        positions, row = [self.next_positions], old_rows
        for _, prompt, n in prefills:
            mask[row : row + n, new_len - prompt.length : new_len] = 1
            positions.append(torch.full((n,), prompt.next_position, dtype=torch.int64, device=self.mask.device))
            row += n
        last_tokens = torch.cat([self.last_tokens, self.last_tokens.new_zeros(total_rows - old_rows)])
        self.__init__(  # type: ignore[misc]
            layers, mask, torch.cat(positions), new_len, self.mrope, self.cache_kwarg
        )
        self.last_tokens = last_tokens

    def select(self, keep: list[int]) -> DecodeBatch:
        """Keep only the given rows (finished rows leave) and drop columns that are now padding everywhere."""
        index = torch.tensor(keep, dtype=torch.int64, device=self.mask.device)
        mask = self.mask.index_select(0, index)  # [B', capacity]
        used = mask[:, : self.length].any(dim=0).nonzero()
        start = int(used[0]) if used.numel() else self.length
        layers = [
            (layer.key_buffer.index_select(0, index)[:, :, start:], layer.value_buffer.index_select(0, index)[:, :, start:])
            for layer in self.cache.layers
        ]
        batch = DecodeBatch(
            layers, mask[:, start:], self.next_positions.index_select(0, index), self.length - start,
            self.mrope, self.cache_kwarg,
        )
        batch.last_tokens = self.last_tokens.index_select(0, index)
        return batch

    def set_last_tokens(self, tokens: list[int], start_row: int) -> None:
        values = torch.tensor(tokens, dtype=torch.int64, device=self.last_tokens.device)
        self.last_tokens[start_row : start_row + len(tokens)] = values

    def step_inputs(self) -> tuple[torch.Tensor, dict[str, Any]]:
        """Inputs of the next decode step; also advances mask and positions past that step's token."""
        if self.length + 1 > self.mask.shape[1]:
            grown = self.mask.new_zeros(self.size, self.length + 1 + _HEADROOM)
            grown[:, : self.length] = self.mask[:, : self.length]
            self.mask = grown
        self.mask[:, self.length] = 1
        self.length += 1
        positions = self.next_positions[:, None]  # [B, 1]
        if self.mrope:
            positions = positions[None].expand(3, -1, -1)  # [3, B, 1]: text tokens use t = h = w
        self.next_positions = self.next_positions + 1
        inputs = {
            "attention_mask": self.mask[:, : self.length],  # [B, T + 1]
            "position_ids": positions,
            self.cache_kwarg: self.cache,
        }
        return self.last_tokens[:, None], inputs  # [B, 1]
