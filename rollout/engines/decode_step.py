"""A lean single-token decode step over a HF decoder's own modules.

A transformers forward pays for generality on every call: output dataclasses, kwargs plumbing,
deprecation and capture wrappers, causal-mask construction. For one new token per row none of that is
needed, and on small models or CPUs it costs more than the arithmetic (about 2 ms per step for the
tiny test model). This step calls the same submodules (embeddings, norms, projections, rotary, MLP,
head) in the same order, with the same `apply_rotary_pos_emb` and SDPA, so it computes the same
function; only the glue is gone. It runs decode steps and the prefill of text-only prompts (prompts
with images stay on the HF forward, which merges the vision features), and only after `matches_hf`
has compared it with the HF forward on this very model; an architecture it does not recognise keeps
the HF path. `run` is the stack with the KV cache and attention left to the caller: the static-pool,
CUDA-graph decode step (graph_decode.py) is the same stack over its own KV buffers.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

_LAYER_PARTS = ("input_layernorm", "post_attention_layernorm", "self_attn", "mlp")
_ATTENTION_PARTS = ("q_proj", "k_proj", "v_proj", "o_proj", "scaling", "head_dim")
# (layer index, attention module, q [B, Hq, L, D], k [B, Hkv, L, D], v [B, Hkv, L, D]) -> out [B, Hq, L, D]
Attend = Callable[[int, Any, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class LeanDecodeStep:
    """The decoder stack as plain tensor code: (input_ids, mask, positions, cache) -> last logits [B, V]."""

    def __init__(self, text_model: Any, lm_head: torch.nn.Module, rotate: Callable[..., Any]) -> None:
        self.text_model, self.lm_head, self.rotate = text_model, lm_head, rotate
        rotary = text_model.rotary_emb
        # Static RoPE (not the dynamic kinds, whose frequencies follow the sequence length): cos/sin of a decode
        # token depend on its position only, so they come from a table instead of being recomputed per step.
        self._rope_static = getattr(rotary, "rope_type", "default") == "default"
        self._rope_table: tuple[torch.Tensor, torch.Tensor] | None = None  # cos, sin [P, D]

    @classmethod
    def for_model(cls, model: Any) -> LeanDecodeStep | None:
        """The lean step for a Qwen2/Qwen3-style decoder inside `model`, or None if it looks different."""
        text_model = getattr(getattr(model, "model", None), "language_model", None)
        lm_head = getattr(model, "lm_head", None)
        needed = ("embed_tokens", "layers", "norm", "rotary_emb")
        if text_model is None or lm_head is None or not all(hasattr(text_model, n) for n in needed):
            return None
        for layer in text_model.layers:
            attention = getattr(layer, "self_attn", None)
            if not all(hasattr(layer, n) for n in _LAYER_PARTS) or not all(hasattr(attention, n) for n in _ATTENTION_PARTS):
                return None
            if getattr(attention, "sliding_window", None) is not None:
                return None  # sliding-window layers need a windowed mask: keep the HF path
        attention_module = sys.modules[type(text_model.layers[0].self_attn).__module__]
        rotate = getattr(attention_module, "apply_rotary_pos_emb", None)
        return None if rotate is None else cls(text_model, lm_head, rotate)

    @torch.inference_mode()
    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, position_ids: torch.Tensor,
                 cache: Any) -> torch.Tensor:
        """Logits [B, V] of the last position. Decode: input_ids [B, 1] and attention_mask [B, T+1] over
        the cached columns. Prefill of unpadded prompts: input_ids [B, L], attention_mask None (causal)."""
        length = input_ids.shape[1]
        keep = None
        if attention_mask is not None:  # the additive form SDPA would build from a bool mask in every layer
            keep = torch.zeros(attention_mask.shape, dtype=self.lm_head.weight.dtype, device=attention_mask.device)
            keep = keep.masked_fill_(attention_mask == 0, float("-inf"))[:, None, None, :]  # [B, 1, 1, T+1]

        def attend(index: int, attention: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            k, v = cache.update(k, v, index)  # [B, Hkv, T, D]
            return F.scaled_dot_product_attention(q, k, v, attn_mask=keep, is_causal=keep is None and length > 1,
                                                  scale=attention.scaling, enable_gqa=q.shape[1] != k.shape[1])

        rope = self._decode_rope(position_ids) if length == 1 and attention_mask is not None else None
        return self.run(input_ids, position_ids, attend, rope)

    def _decode_rope(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """cos, sin [B, 1, D] of decode tokens from the table (their three M-RoPE components are equal), or None
        to compute them the model's way."""
        if not self._rope_static or position_ids.device.type != "cpu":  # sizing the table reads the max position:
            return None  # a host sync per step on a GPU, where the few rotary kernels cost less anyway
        positions = position_ids.reshape(-1, position_ids.shape[-2])[0]  # [B] ([3, B, 1] or [B, 1])
        needed = int(positions.max()) + 1
        if self._rope_table is None or self._rope_table[0].shape[0] < needed:
            size = max(needed, 2 * (0 if self._rope_table is None else self._rope_table[0].shape[0]), 1024)
            table = torch.arange(size, device=positions.device)[None, None, :]  # [1, 1, P]
            if position_ids.dim() == 3:
                table = table.expand(3, -1, -1)  # M-RoPE: t = h = w
            else:
                table = table[0]
            probe = self.text_model.embed_tokens.weight[:1][None]  # dtype and device of the hidden states
            cos, sin = self.text_model.rotary_emb(probe, table)  # [1, P, D] each
            self._rope_table = (cos[0], sin[0])
        cos, sin = self._rope_table
        return cos[positions][:, None, :], sin[positions][:, None, :]  # [B, 1, D]

    def run(self, input_ids: torch.Tensor, position_ids: torch.Tensor, attend: Attend,
            rope: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """The decoder stack with the KV cache and attention left to `attend`: logits [B, V] of the last
        position. `attend(layer index, attention module, q [B, Hq, L, D], k, v [B, Hkv, L, D])` stores the
        new keys/values wherever it keeps them and returns the attention output [B, Hq, L, D]. `rope`: cos, sin
        [B, L, D] when the caller has them (else computed from `position_ids`)."""
        batch, length = input_ids.shape
        hidden = self.text_model.embed_tokens(input_ids)  # [B, L, H]
        # M-RoPE or 1-D, as the model defines
        cos, sin = rope if rope is not None else self.text_model.rotary_emb(hidden, position_ids)
        for index, layer in enumerate(self.text_model.layers):
            attention = layer.self_attn
            x = _norm(layer.input_layernorm, hidden)
            q = attention.q_proj(x).view(batch, length, -1, attention.head_dim)  # [B, L, Hq, D]
            k = attention.k_proj(x).view(batch, length, -1, attention.head_dim)  # [B, L, Hkv, D]
            v = attention.v_proj(x).view(batch, length, -1, attention.head_dim).transpose(1, 2)  # [B, Hkv, L, D]
            if hasattr(attention, "q_norm"):  # Qwen3: per-head RMSNorm before rotary
                q, k = attention.q_norm(q), attention.k_norm(k)
            q, k = self.rotate(q.transpose(1, 2), k.transpose(1, 2), cos, sin)  # [B, H, L, D]
            out = attend(index, attention, q, k, v)  # [B, Hq, L, D]
            hidden = hidden + attention.o_proj(out.transpose(1, 2).reshape(batch, length, -1))  # [B, L, H]
            hidden = hidden + layer.mlp(_norm(layer.post_attention_layernorm, hidden))
        return self.lm_head(_norm(self.text_model.norm, hidden[:, -1:, :]))[:, -1, :]  # [B, V]


def _norm(module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """An HF RMSNorm (fp32 variance, `weight * normed.to(dtype)`) as torch's one-op `rms_norm` when everything
    is fp32 (the same arithmetic, bit for bit); otherwise the module itself."""
    weight, eps = getattr(module, "weight", None), getattr(module, "variance_epsilon", None)
    if eps is None or weight is None or x.dtype != torch.float32 or weight.dtype != torch.float32:
        return module(x)
    return F.rms_norm(x, weight.shape, weight, eps)


def matches_hf(run_hf: Callable[[], torch.Tensor], run_lean: Callable[[], torch.Tensor], dtype: torch.dtype,
               what: str, fallback: str = "the HF forward") -> bool:
    """Compare logits computed both ways on identical inputs; log (naming the path used instead) and
    refuse the lean step on a mismatch."""
    expected, actual = run_hf().float(), run_lean().float()
    tolerance = 1e-4 if dtype == torch.float32 else 5e-2
    error = (expected - actual).abs().max().item()
    if not error <= tolerance * max(1.0, expected.abs().max().item()):
        logger.warning("lean %s differs from the HF forward by %.3g; using %s", what, error, fallback)
        return False
    return True
