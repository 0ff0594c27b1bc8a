"""A static-shape decode step over a fixed KV pool, captured in CUDA graphs.

Why: on a GPU one decode step of a 3B model for 64 rows is ~1 ms of math behind 36 layers x ~20 kernel
launches, so it is bound by the host launching kernels. A CUDA graph replays the whole step with one
launch, but it replays fixed kernels on fixed addresses: every tensor it reads or writes must keep
its shape and its storage between steps. The left-padded slab of kv_batch.py has neither (it is
rebuilt when rows join or leave, and grows columns as it decodes), hence this second layout.

Layout (`StaticKVPool`): per layer, K and V buffers [slots, kv_heads, capacity, head_dim]; slot s holds
one sample, *left-aligned* (token j of the sample at column j). Per-slot device tensors `lengths`
(tokens already in the cache = the column the next token is written to), `positions` (rotary
position of that token; M-RoPE text tokens use t = h = w), `last_tokens` and `active`, and a logits
buffer [slots, V]. Everything is updated in place, so all addresses hold until the pool grows.

The step (`StaticDecodeStep`) runs over the first B slots and the first C columns: embed the last
tokens; per layer: norm, q/k/v projections and rotary (LeanDecodeStep.run: the same modules, the
model's own `rotary_emb` and `apply_rotary_pos_emb`), scatter the new k/v to column `lengths[slot]`,
SDPA of the query against columns [0, C) under the mask `column <= lengths[slot]`, o_proj, MLP; final
norm, lm_head -> logits [B, V] copied into the pool's logits buffer; then `lengths` and `positions`
advance by `active` (0 for finished and empty slots, which keep writing one column of their own slot
and whose logits nobody reads). No host sync, no data-dependent shape: a graph of it is valid for
any contents of the pool. GQA without repeating the cache: the G query heads that share a KV head
are treated as G query positions of that head (q [B, Hq, 1, D] -> [B, Hkv, G, D]).

Buckets: B is the power of two covering the running rows (capped at the engine's max_batch_size);
C is a multiple of 256 covering max(lengths) + 1, with at most 4 buckets per doubling above 1024
(`column_bucket`), capped at the context length. `CudaGraphDecoder` captures one graph per (B, C)
lazily, on first use (warm-up on a side stream first, as torch.cuda.graphs requires; all graphs
share one memory pool; capture mode thread_local so that other threads may use the GPU meanwhile);
on the CPU, or with `graphs=False`, it runs the very same function eagerly, which is what the CPU
tests exercise.

Memory: 2 (K and V) x layers x slots x kv_heads x capacity x head_dim x dtype bytes, e.g. a Qwen2.5-3B
(36 layers, 2 KV heads, head_dim 128, bf16) is 36 KiB per slot-column: 64 slots x 1024 columns =
2.25 GiB. The pool is not sized for max_batch_size x context length up front (256 x 32k would be
300 GB for that model): `reserve` grows it to the bucket the running rows need (slots: the B bucket;
columns: the C bucket of each admitted row's longest possible length, x1.5 at least when it grows),
copying the contents and dropping every captured graph; it never shrinks. Each (re)allocation is
logged with its size.

Rows (`SlotBatch`, the engine's running batch on this path): row i of the engine is slot i. Admitted
rows are appended after the running ones (their prefill KV copied to columns [0, L)); when rows
leave, `select` moves the kept rows down with index copies of their used columns, so the step always
covers slots [0, rows). Finished rows are deactivated at once (`release_rows`) and move out at the
engine's next compaction.

Weights: the engine updates parameters in place (`copy_` into the existing tensors), which keeps the
addresses a graph reads. `sync_weights` checks that after every update and drops the graphs if a
parameter was replaced instead (they would read freed memory).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F

from rollout.engines.decode_step import LeanDecodeStep
from rollout.engines.kv_batch import PromptState

logger = logging.getLogger(__name__)

_COLUMN_QUANTUM = 256  # C buckets are multiples of this
_WARMUP_STEPS = 2  # eager runs on a side stream before a capture (lazy init, cuBLAS workspaces)


def batch_bucket(rows: int, max_slots: int) -> int:
    """B for `rows` running rows: the next power of two, capped at max_slots."""
    if not 1 <= rows <= max_slots:
        raise ValueError(f"rows={rows} must be in [1, max_slots={max_slots}]")
    return min(1 << (rows - 1).bit_length(), max_slots)


def column_bucket(columns: int, max_columns: int) -> int:
    """C for `columns` needed columns: a multiple of 256 (of 1/4 of the power of two below, above 1024),
    at most max_columns rounded up to 256. A bucket is its own bucket."""
    limit = -(-max_columns // _COLUMN_QUANTUM) * _COLUMN_QUANTUM
    if not 1 <= columns <= limit:
        raise ValueError(f"columns={columns} must be in [1, {limit}] (max_columns={max_columns})")
    step = max(_COLUMN_QUANTUM, (1 << (max(columns - 1, 1).bit_length() - 1)) // 4)
    return min(-(-columns // step) * step, limit)


class StaticKVPool:
    """KV buffers and per-slot state of the static decode step (see the module docstring)."""

    def __init__(self, layers: int, kv_heads: int, head_dim: int, vocab: int, slots: int, capacity: int,
                 dtype: torch.dtype, device: torch.device, mrope: bool) -> None:
        self.kv_heads, self.head_dim, self.mrope = kv_heads, head_dim, mrope
        self.slots, self.capacity = slots, capacity
        # Zeros, not empty: a masked column still multiplies its value vector (0 x NaN would be NaN).
        shape = (slots, kv_heads, capacity, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        state = dict(dtype=torch.int64, device=device)
        self.lengths = torch.zeros(slots, **state)  # [S] tokens in the cache = next write column
        self.positions = torch.zeros(slots, **state)  # [S] rotary position of the next token
        self.last_tokens = torch.zeros(slots, **state)  # [S] the token fed to the next step
        self.active = torch.zeros(slots, **state)  # [S] 1 while the slot's sample decodes, else 0
        self.logits = torch.zeros(slots, vocab, dtype=dtype, device=device)  # [S, V] output of the step

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)

    def grown(self, slots: int, capacity: int) -> StaticKVPool:
        """A larger pool holding this one's contents."""
        first = self.keys[0]
        pool = StaticKVPool(len(self.keys), self.kv_heads, self.head_dim, self.logits.shape[1], slots, capacity,
                            first.dtype, first.device, self.mrope)
        for old, new in zip(self.keys + self.values, pool.keys + pool.values):
            new[: self.slots, :, : self.capacity].copy_(old)
        for name in ("lengths", "positions", "last_tokens", "active"):
            getattr(pool, name)[: self.slots].copy_(getattr(self, name))
        return pool


class StaticDecodeStep:
    """One decode step of the first `rows` slots over the first `columns` columns; static shapes only."""

    def __init__(self, lean: LeanDecodeStep) -> None:
        self.lean = lean

    def __call__(self, pool: StaticKVPool, rows: int, columns: int) -> None:
        lengths = pool.lengths[:rows]  # [B]
        positions = pool.positions[:rows, None]  # [B, 1]
        if pool.mrope:
            positions = positions[None].expand(3, -1, -1)  # [3, B, 1]: text tokens use t = h = w
        column = torch.arange(columns, device=lengths.device)  # [C]
        keep = (column[None, :] <= lengths[:, None])[:, None, None, :]  # [B, 1, 1, C]
        write_at = lengths[:, None, None, None].expand(rows, pool.kv_heads, 1, pool.head_dim)  # [B, Hkv, 1, D]

        def attend(index: int, attention: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            keys, values = pool.keys[index][:rows], pool.values[index][:rows]  # [B, Hkv, capacity, D]
            keys.scatter_(2, write_at, k)  # k, v [B, Hkv, 1, D] -> column lengths[b] of each slot
            values.scatter_(2, write_at, v)
            heads, dim = q.shape[1], q.shape[3]
            grouped = q.reshape(rows, pool.kv_heads, heads // pool.kv_heads, dim)  # [B, Hkv, G, D]
            out = F.scaled_dot_product_attention(grouped, keys[:, :, :columns], values[:, :, :columns],
                                                 attn_mask=keep, scale=attention.scaling)  # [B, Hkv, G, D]
            return out.reshape(rows, heads, 1, dim)  # [B, Hq, 1, D]

        logits = self.lean.run(pool.last_tokens[:rows, None], positions, attend)  # [B, V]
        pool.logits[:rows].copy_(logits)
        pool.lengths[:rows] += pool.active[:rows]
        pool.positions[:rows] += pool.active[:rows]


class CudaGraphDecoder:
    """The static pool and its step; on CUDA (and `graphs`), one captured graph per (B, C) bucket."""

    def __init__(self, lean: LeanDecodeStep, model: torch.nn.Module, max_slots: int, max_columns: int,
                 graphs: bool) -> None:
        self.lean, self.model = lean, model
        self.step = StaticDecodeStep(lean)
        self.max_slots, self.max_columns = max_slots, max_columns
        first = lean.text_model.layers[0].self_attn
        self.layers = len(lean.text_model.layers)
        self.head_dim = int(first.head_dim)
        self.kv_heads = first.k_proj.out_features // self.head_dim
        self.vocab = lean.lm_head.weight.shape[0]
        weight = lean.lm_head.weight
        self.dtype, self.device = weight.dtype, weight.device
        self.use_graphs = graphs and self.device.type == "cuda"
        rope_type = str(getattr(lean.text_model.rotary_emb, "rope_type", "default"))
        if self.use_graphs and ("dynamic" in rope_type or rope_type == "longrope"):
            # These recompute their frequencies from max(position) on the host: a sync, not capturable.
            raise ValueError(f"rope_type {rope_type!r} reads the positions on the host; it cannot be captured")
        self.pool: StaticKVPool | None = None
        self._graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}
        self._memory_pool: Any = None
        self._weights = self._weight_addresses()
        self.captures = 0  # graphs captured so far (a test and the logs read it)

    # ---- pool ------------------------------------------------------------------------------------
    def reserve(self, slots: int, columns: int, mrope: bool) -> StaticKVPool:
        """The pool, grown if it has fewer than `slots` slots or `columns` columns (graphs dropped)."""
        pool = self.pool
        if pool is not None and pool.mrope != mrope:
            raise ValueError(f"prompt mrope={mrope} but the pool was built for mrope={pool.mrope}")
        if pool is not None and slots <= pool.slots and columns <= pool.capacity:
            return pool
        new_slots = max(batch_bucket(slots, self.max_slots), pool.slots if pool else 0)
        capacity = column_bucket(columns, self.max_columns)
        if pool is not None and capacity > pool.capacity:  # grow by half at least: few regrowths
            capacity = column_bucket(max(capacity, min(pool.capacity * 3 // 2, self.max_columns)), self.max_columns)
        capacity = max(capacity, pool.capacity if pool else 0)  # growing slots keeps the columns
        if pool is None:
            self.pool = StaticKVPool(self.layers, self.kv_heads, self.head_dim, self.vocab, new_slots, capacity,
                                     self.dtype, self.device, mrope)
        else:
            self.pool = pool.grown(new_slots, capacity)
            self.drop_graphs("the KV pool grew")
        logger.info("decode KV pool: %d slots x %d columns x %d layers x %d KV heads x %d dims = %.2f GiB "
                    "(K and V, %s)", new_slots, capacity, self.layers, self.kv_heads, self.head_dim,
                    self.pool.nbytes / 2**30, str(self.dtype).removeprefix("torch."))
        return self.pool

    def new_batch(self) -> SlotBatch:
        return SlotBatch(self)

    # ---- the step ----------------------------------------------------------------------------------
    def decode(self, rows: int, columns: int) -> torch.Tensor:
        """Run the step for buckets (rows, columns); returns the pool's logits buffer [rows, V] (a view,
        valid until the next step)."""
        pool = self.pool
        assert pool is not None and rows <= pool.slots and columns <= pool.capacity, (rows, columns)
        if not self.use_graphs:
            self.step(pool, rows, columns)
        else:
            graph = self._graphs.get((rows, columns))
            if graph is None:
                graph = self._graphs[(rows, columns)] = self._capture(pool, rows, columns)
            graph.replay()
        return pool.logits[:rows]

    def _capture(self, pool: StaticKVPool, rows: int, columns: int) -> torch.cuda.CUDAGraph:
        current = torch.cuda.current_stream(self.device)
        # The warm-up steps run for real: put lengths/positions back after each, so they leave no trace
        # (the columns they wrote are beyond every length again and get overwritten).
        saved = (pool.lengths.clone(), pool.positions.clone())
        side = torch.cuda.Stream(self.device)
        side.wait_stream(current)
        with torch.cuda.stream(side):
            for _ in range(_WARMUP_STEPS):
                self.step(pool, rows, columns)
                pool.lengths.copy_(saved[0])
                pool.positions.copy_(saved[1])
        current.wait_stream(side)
        if self._memory_pool is None:
            self._memory_pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._memory_pool, capture_error_mode="thread_local"):
            self.step(pool, rows, columns)  # recorded, not run
        self.captures += 1
        logger.info("captured the decode step for %d rows x %d columns (%d graphs)", rows, columns,
                    len(self._graphs) + 1)
        return graph

    def drop_graphs(self, why: str) -> None:
        if self._graphs:
            logger.info("dropping %d decode graphs: %s", len(self._graphs), why)
        self._graphs.clear()
        self._memory_pool = None  # a fresh pool, so the old graphs' memory can be released

    # ---- weights -----------------------------------------------------------------------------------
    def _weight_addresses(self) -> tuple[int, ...]:
        tensors = list(self.model.parameters()) + list(self.model.buffers())
        return tuple(t.data_ptr() for t in tensors)

    def sync_weights(self) -> bool:
        """After a weight update: True (and the graphs dropped) if some parameter or buffer was replaced
        rather than updated in place, since captured graphs read them by address."""
        addresses = self._weight_addresses()
        if addresses == self._weights:
            return False
        self._weights = addresses
        self.drop_graphs("model parameters were replaced, not updated in place")
        return True


class SlotBatch:
    """The engine's running rows on the static pool: row i in slot i (DecodeBatch's interface)."""

    def __init__(self, decoder: CudaGraphDecoder) -> None:
        self.decoder = decoder
        self.lengths: list[int] = []  # host copy of pool.lengths[:size] (picks C without a device sync)
        self.active: list[bool] = []
        if decoder.pool is not None:  # slots past `size` must not advance: they hold nothing
            decoder.pool.active.zero_()
            decoder.pool.lengths.zero_()

    @property
    def size(self) -> int:
        return len(self.lengths)

    @torch.inference_mode()
    def append_prefills(self, prefills: list[tuple[Any, PromptState, int]], longest: int) -> None:
        """Add, per prefilled prompt (prefill cache, prompt, n), n rows whose KV is that cache; `longest`
        is the most tokens (prompt + generated) any of them can reach, so the pool is sized once."""
        rows = self.size + sum(n for _, _, n in prefills)
        pool = self.decoder.reserve(rows, max(longest, 1), prefills[0][1].mrope)
        slot = self.size
        for cache, prompt, n in prefills:
            length = prompt.length
            for index, layer in enumerate(cache.layers):
                pool.keys[index][slot : slot + n, :, :length].copy_(layer.keys[0])  # [H, L, D] into n slots
                pool.values[index][slot : slot + n, :, :length].copy_(layer.values[0])
            pool.lengths[slot : slot + n] = length
            pool.positions[slot : slot + n] = prompt.next_position
            pool.active[slot : slot + n] = 1
            self.lengths += [length] * n
            self.active += [True] * n
            slot += n

    @torch.inference_mode()
    def set_last_tokens(self, tokens: list[int], start_row: int) -> None:
        pool = self.decoder.pool
        assert pool is not None
        pool.last_tokens[start_row : start_row + len(tokens)] = torch.tensor(tokens, device=pool.last_tokens.device)

    @torch.inference_mode()
    def release_rows(self, rows: list[int]) -> None:
        """Finished rows stop advancing at once (their slots leave at the next `select`)."""
        pool = self.decoder.pool
        assert pool is not None
        for row in rows:
            self.active[row] = False
            pool.active[row] = 0

    @torch.inference_mode()
    def select(self, keep: list[int]) -> SlotBatch:
        """Keep only the given rows, moved down to slots [0, len(keep)) in this order; in place."""
        pool = self.decoder.pool
        assert pool is not None
        moves = [(dst, src) for dst, src in enumerate(keep) if dst != src]
        if moves:
            device = pool.lengths.device
            dst = torch.tensor([d for d, _ in moves], device=device)
            src = torch.tensor([s for _, s in moves], device=device)
            used = max(self.lengths[s] for _, s in moves)  # columns [0, used) hold the moved rows' tokens
            for buffer in pool.keys + pool.values:
                buffer[dst, :, :used] = buffer[src, :, :used]  # the right side is gathered first
            for state in (pool.lengths, pool.positions, pool.last_tokens, pool.active):
                state[dst] = state[src]
        pool.active[len(keep) : self.size] = 0
        self.lengths = [self.lengths[i] for i in keep]
        self.active = [self.active[i] for i in keep]
        return self

    @torch.inference_mode()
    def decode(self) -> torch.Tensor:
        """One step of every row: logits [size, V] (finished rows' logits are garbage)."""
        assert self.decoder.pool is not None
        live = [length for length, on in zip(self.lengths, self.active) if on]
        needed = max(live, default=0) + 1  # the new token goes to column `length`
        rows = batch_bucket(self.size, self.decoder.max_slots)
        columns = column_bucket(needed, self.decoder.max_columns)
        self.decoder.reserve(rows, columns, self.decoder.pool.mrope)  # a no-op unless a row outgrew its reserve
        logits = self.decoder.decode(rows, columns)
        self.lengths = [length + on for length, on in zip(self.lengths, self.active)]
        return logits[: self.size]
