"""Batched next-token sampling and stop-string detection for the embedded engine.

Every row of a decode batch can carry its own temperature / top-p / top-k, so the filters are applied
as per-row tensors in one pass instead of a Python loop over rows. Randomness comes from one uniform
number per row per step, computed by a counter-based generator: uniform = hash(row key, token index),
where the row key derives from the request's seed and the sample's index. A seeded sample is thus
reproducible whatever else shares its batch, whenever it was scheduled, and on any device, and the
whole batch's draws are a handful of tensor ops instead of one generator call per row.

Log-probs: we return log_softmax of the *raw* logits (temperature 1, before top-p/top-k) at the sampled
token, in fp32. That is what SGLang returns by default and what an RL trainer compares against its own
teacher-forced forward pass; the sampling distribution itself is the filtered, temperature-scaled one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class SamplingTensors:
    """Per-row sampling settings of a decode batch, as tensors on the logits' device."""

    temperature: torch.Tensor  # [B] float32; 0 means greedy
    top_p: torch.Tensor  # [B] float32 in (0, 1]
    top_k: torch.Tensor  # [B] int64; <= 0 means no top-k
    uniforms: torch.Tensor  # [B] float32 in [0, 1): this step's random draw per row
    # Batch-wide shortcuts; the engine knows them from the requests, which avoids a device sync per
    # step on GPU. None: derive them from the tensors.
    all_greedy: bool | None = None
    needs_filter: bool | None = None  # some row has an active top-k or top-p

    def __post_init__(self) -> None:
        if self.all_greedy is None:
            self.all_greedy = bool((self.temperature == 0).all())
        if self.needs_filter is None:
            self.needs_filter = bool((self.top_k > 0).any() or (self.top_p < 1).any())


def sample_next_tokens(logits: torch.Tensor, params: SamplingTensors) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick one token per row and return (tokens [B] int64, logprobs [B] float32 of raw logits)."""
    logits = logits.float()  # [B, V]; fp32 so log-probs match an fp32 teacher-forced forward
    raw_logprobs = torch.log_softmax(logits, dim=-1)  # [B, V]
    greedy_tokens = logits.argmax(dim=-1)  # [B]
    if params.all_greedy:
        tokens = greedy_tokens
    else:
        tokens = torch.where(params.temperature == 0, greedy_tokens, _sample_filtered(logits, params))
    logprobs = raw_logprobs.gather(1, tokens[:, None]).squeeze(1)  # [B]
    return tokens, logprobs


def _sample_filtered(logits: torch.Tensor, params: SamplingTensors) -> torch.Tensor:
    """Inverse-CDF sampling from softmax(logits / T) restricted by top-k then top-p (HF's order).

    Rows without a filter walk the CDF in vocabulary order; rows with one walk it over the sorted vocabulary
    (the filters are rank cut-offs). Which order a row uses depends only on its own settings, so a row's
    token for a given uniform does not depend on whether a filtering row shares its batch.
    """
    vocab = logits.shape[1]
    # Greedy rows get temperature 1 here only to avoid dividing by 0; their sample is discarded.
    temperature = torch.where(params.temperature > 0, params.temperature, torch.ones_like(params.temperature))
    scaled = logits / temperature[:, None]  # [B, V]
    tokens = _inverse_cdf(torch.softmax(scaled, dim=-1), params.uniforms)  # [B], vocabulary order
    if not params.needs_filter:
        return tokens
    scaled, order = scaled.sort(dim=-1, descending=True)  # [B, V] each, best token first
    probs = torch.softmax(scaled, dim=-1)  # [B, V]
    ranks = torch.arange(vocab, device=logits.device)[None, :]  # [1, V]
    top_k = torch.where(params.top_k > 0, params.top_k, torch.full_like(params.top_k, vocab))
    probs = probs * (ranks < top_k[:, None])  # [B, V]
    # Top-p on the top-k-renormalised distribution: keep a token while the mass strictly before it
    # is < p of the kept mass (so the best token always survives).
    mass_before = probs.cumsum(dim=-1) - probs
    probs = probs * (mass_before < params.top_p[:, None] * probs.sum(dim=-1, keepdim=True))  # [B, V]
    filtered = order.gather(1, _inverse_cdf(probs, params.uniforms)[:, None]).squeeze(1)  # [B]
    return torch.where((params.top_k > 0) | (params.top_p < 1), filtered, tokens)


def _inverse_cdf(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Column index of the first cumulative mass above uniform x total mass, per row: [B, V] -> [B]."""
    cdf = probs.cumsum(dim=-1)  # [B, V]
    threshold = uniforms[:, None] * cdf[:, -1:]  # [B, 1]; u < 1 so threshold < total mass
    return torch.searchsorted(cdf, threshold, right=True).clamp_max(probs.shape[1] - 1).squeeze(1)


_MASK64 = (1 << 64) - 1


def row_key(seed: int, sample_index: int) -> int:
    """A 63-bit key per (request seed, sample index); distinct samples get unrelated streams."""
    x = (seed * 0x9E3779B97F4A7C15 + sample_index * 0xD1B54A32D192ED03 + 1) & _MASK64
    x = ((x ^ (x >> 33)) * 0xFF51AFD7ED558CCD) & _MASK64
    return (x ^ (x >> 33)) & ((1 << 63) - 1)


def counter_uniforms(keys: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
    """Uniforms in [0, 1) from (key, step) pairs: [B] int64, [B] int64 -> [B] float32.

    A splitmix64-style finaliser in int64 tensor arithmetic (multiplication wraps modulo 2^64 on
    every device; shifts are masked to act as logical shifts). 24 bits are kept so the float32
    result is exact and strictly below 1.
    """
    x = keys + steps * 0x2545F4914F6CDD1D  # int64, wrapping
    for shift, multiplier in ((30, -0x40A7B892E31B1A47), (27, -0x6B2FB644ECCEEE15)):
        # multipliers are 0xBF58476D1CE4E5B9 and 0x94D049BB133111EB written as signed int64
        x = (x ^ ((x >> shift) & ((1 << (64 - shift)) - 1))) * multiplier
    x = x ^ ((x >> 31) & ((1 << 33) - 1))
    return ((x >> 40) & 0xFFFFFF).to(torch.float32) / float(1 << 24)


def find_stop_string(text: str, stops: tuple[str, ...], search_from: int) -> tuple[int, str] | None:
    """Earliest (char index, stop) of any stop string starting at or after `search_from`, else None."""
    best: tuple[int, str] | None = None
    for stop in stops:
        index = text.find(stop, max(0, search_from))
        if index >= 0 and (best is None or index < best[0]):
            best = (index, stop)
    return best
