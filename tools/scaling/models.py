"""Model shapes for the scaling planner: parameter counts, FLOPs and KV-cache bytes from a few numbers.

Shapes are the published HF `config.json` values (Qwen2.5-VL 3B/7B/32B, InternVL3-8B) plus the text
decoders behind our performance anchors (Qwen2.5-3B from docs/gpu.md, Qwen3-32B and Llama-3.1-8B from
NeMo-RL's published GRPO runs). `ModelShape.from_hf_config(dir)` reads any checkpoint (the sweep uses it
for the tiny test model). Parameter counts are checked against the published totals in
tests/test_scaling.py (Qwen2.5-VL-7B 8.29 B, Qwen2.5-VL-32B 33.5 B, InternVL3-8B 7.94 B).

Counting conventions (per decoder layer, hidden h, FFN f, q heads × head_dim = d_q, kv heads × head_dim = d_kv):
    attention  = h·d_q (q) + 2·h·d_kv (k, v) + d_q·h (o)  [+ d_q + 2·d_kv biases when qkv_bias]
    MLP        = 3·h·f (SwiGLU gate, up, down)
    norms      = 2·h
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

__all__ = ["MODELS", "ModelShape", "VisionShape", "get_model"]


@dataclass(frozen=True)
class VisionShape:
    """A ViT tower + projector. `patches_per_token`: ViT patches per LLM image token (2×2 merge -> 4)."""

    layers: int
    hidden: int
    ffn: int
    heads: int
    gated_mlp: bool  # SwiGLU (Qwen2.5-VL) vs GELU fc1/fc2 (InternViT)
    projector_in: int  # input width of the projector MLP (hidden · patches_per_token)
    projector_hidden: int  # width of the projector's hidden layer
    patch_params: int  # patch embedding (+ position embedding) parameters
    patches_per_token: int = 4

    @property
    def layer_params(self) -> int:
        h, f = self.hidden, self.ffn
        attn = 4 * h * h + 4 * h  # qkv + proj with biases
        if self.gated_mlp:  # Qwen2.5-VL: SwiGLU with biases, two RMSNorms
            return attn + 3 * h * f + 2 * f + h + 2 * h
        return attn + 2 * h * f + f + h + 4 * h + 2 * h  # InternViT: two LayerNorms + layer scales

    def projector_params(self, out_hidden: int) -> int:
        i, m = self.projector_in, self.projector_hidden
        norm = self.hidden if self.gated_mlp else 2 * i  # Qwen: RMSNorm before merging; InternVL: LN after
        return norm + i * m + m + m * out_hidden + out_hidden

    def params(self, out_hidden: int) -> int:
        return self.patch_params + self.layers * self.layer_params + self.projector_params(out_hidden)


@dataclass(frozen=True)
class ModelShape:
    name: str
    layers: int
    hidden: int
    ffn: int
    heads: int
    kv_heads: int
    vocab: int
    head_dim: int = 0  # 0 = hidden // heads
    tied_embeddings: bool = False
    qkv_bias: bool = True
    vision: VisionShape | None = None

    @property
    def hd(self) -> int:
        return self.head_dim or self.hidden // self.heads

    @property
    def q_dim(self) -> int:
        return self.heads * self.hd

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.hd

    # -- parameters ------------------------------------------------------------------------------------

    @property
    def layer_params(self) -> int:
        h, dq, dkv = self.hidden, self.q_dim, self.kv_dim
        attn = h * dq + 2 * h * dkv + dq * h + ((dq + 2 * dkv) if self.qkv_bias else 0)
        return attn + 3 * h * self.ffn + 2 * h

    @property
    def embedding_params(self) -> int:
        return self.vocab * self.hidden

    @property
    def lm_head_params(self) -> int:
        """Separate output layer (0 when tied to the embedding)."""
        return 0 if self.tied_embeddings else self.vocab * self.hidden

    @property
    def decoder_params(self) -> int:
        return self.layers * self.layer_params + self.embedding_params + self.lm_head_params + self.hidden

    @property
    def vision_params(self) -> int:
        return self.vision.params(self.hidden) if self.vision else 0

    @property
    def total_params(self) -> int:
        return self.decoder_params + self.vision_params

    # -- FLOPs and KV cache ----------------------------------------------------------------------------

    @property
    def matmul_params(self) -> int:
        """Parameters that take part in a matmul per text token: layers + LM head (embeddings are lookups)."""
        return self.layers * self.layer_params + self.vocab * self.hidden

    def train_flops_per_token(self, seq: float) -> float:
        """Forward + backward FLOPs per text token: 6·N_matmul + 12·L·d_q·s (PaLM's MFU convention:
        the attention term counts the full s×s score matrix, as docs/gpu.md's MFU column does)."""
        return self.layers * self.layer_train_flops_per_token(seq) + self.head_train_flops_per_token

    def layer_train_flops_per_token(self, seq: float) -> float:
        """One decoder layer's share of `train_flops_per_token` (what a pipeline stage computes per layer)."""
        return 6.0 * self.layer_params + 12.0 * self.q_dim * seq

    @property
    def head_train_flops_per_token(self) -> float:
        """The LM head's share (the last pipeline stage's)."""
        return 6.0 * self.vocab * self.hidden

    def vision_train_flops_per_patch(self, patches: float) -> float:
        """Forward + backward FLOPs per ViT patch (attention over `patches`; windowed layers count less
        in reality, so this is an upper bound on the attention part)."""
        if self.vision is None:
            return 0.0
        v = self.vision
        return 6.0 * v.layers * v.layer_params + 12.0 * v.layers * v.hidden * min(patches, 4096.0)

    def kv_bytes_per_token(self, bytes_per_elem: int = 2) -> int:
        """KV-cache bytes per token over all layers: L · 2 (k and v) · kv_heads · head_dim · bytes."""
        return self.layers * 2 * self.kv_heads * self.hd * bytes_per_elem

    # -- construction ----------------------------------------------------------------------------------

    @classmethod
    def from_hf_config(cls, path: str | Path, name: str | None = None) -> ModelShape:
        """Shape of an HF checkpoint directory (Qwen2.5-VL or InternVL layouts, nested or flat text config)."""
        path = Path(path)
        cfg = json.loads((path / "config.json" if path.is_dir() else path).read_text())
        text = cfg.get("text_config") or cfg.get("llm_config") or cfg
        vis = cfg.get("vision_config")
        vision = None
        if vis:
            hidden = vis["hidden_size"]
            if "depth" in vis:  # Qwen2.5-VL tower: SwiGLU, 2×2 merger MLP
                merge = vis.get("spatial_merge_size", 2)
                per = merge * merge
                patch = vis.get("in_channels", 3) * vis.get("temporal_patch_size", 2) * vis["patch_size"] ** 2
                vision = VisionShape(vis["depth"], hidden, vis["intermediate_size"], vis["num_heads"], True,
                                     hidden * per, hidden * per, patch * hidden, per)
            else:  # InternViT: GELU MLP, pixel shuffle 0.5 -> 4 patches per token, LN + 2-layer projector
                image, patch_size = _side(vis.get("image_size", 448)), _side(vis["patch_size"])
                n_pos = (image // patch_size) ** 2 + 1  # + the class token
                embed = 3 * patch_size**2 * hidden + hidden + n_pos * hidden + hidden  # conv + bias, pos, cls
                vision = VisionShape(vis["num_hidden_layers"], hidden, vis["intermediate_size"],
                                     vis["num_attention_heads"], False, hidden * 4, text["hidden_size"], embed, 4)
        return cls(
            name=name or path.name,
            layers=text["num_hidden_layers"],
            hidden=text["hidden_size"],
            ffn=text["intermediate_size"],
            heads=text["num_attention_heads"],
            kv_heads=text.get("num_key_value_heads", text["num_attention_heads"]),
            vocab=text["vocab_size"],
            head_dim=text.get("head_dim") or 0,
            tied_embeddings=bool(cfg.get("tie_word_embeddings", text.get("tie_word_embeddings", False))),
            vision=vision,
        )


def _side(value: int | list[int]) -> int:
    """HF writes InternVL's image/patch sizes as [h, w]; square ones only here."""
    return int(value[0]) if isinstance(value, list) else int(value)


# Qwen2.5-VL vision tower (identical in 3B/7B/32B/72B apart from the merger's output width).
QWEN25_VL_VISION = VisionShape(layers=32, hidden=1280, ffn=3420, heads=16, gated_mlp=True,
                               projector_in=5120, projector_hidden=5120, patch_params=1176 * 1280)
# InternViT-300M-448px-V2.5 (InternVL3-1B..14B): 448 px tiles, patch 14, pixel shuffle 0.5.
INTERNVIT_300M = VisionShape(layers=24, hidden=1024, ffn=4096, heads=16, gated_mlp=False,
                             projector_in=4096, projector_hidden=3584,
                             patch_params=588 * 1024 + 1024 + 1025 * 1024 + 1024)

MODELS: dict[str, ModelShape] = {
    "qwen2_5_vl_3b": ModelShape("qwen2_5_vl_3b", 36, 2048, 11008, 16, 2, 151936, tied_embeddings=True,
                                vision=QWEN25_VL_VISION),
    "qwen2_5_vl_7b": ModelShape("qwen2_5_vl_7b", 28, 3584, 18944, 28, 4, 152064, vision=QWEN25_VL_VISION),
    "qwen2_5_vl_32b": ModelShape("qwen2_5_vl_32b", 64, 5120, 27648, 40, 8, 152064, vision=QWEN25_VL_VISION),
    "internvl3_8b": ModelShape("internvl3_8b", 28, 3584, 18944, 28, 4, 151674, vision=INTERNVIT_300M),
    # text decoders of the anchors
    "qwen2_5_3b": ModelShape("qwen2_5_3b", 36, 2048, 11008, 16, 2, 151936, tied_embeddings=True),
    "qwen3_32b": ModelShape("qwen3_32b", 64, 5120, 25600, 64, 8, 151936, head_dim=128, qkv_bias=False),
    "llama3_1_8b": ModelShape("llama3_1_8b", 32, 4096, 14336, 32, 8, 128256, qkv_bias=False),
}


def get_model(name_or_path: str) -> ModelShape:
    """A table entry by name, or the shape of an HF checkpoint directory."""
    if name_or_path in MODELS:
        return MODELS[name_or_path]
    if Path(name_or_path).exists():
        return ModelShape.from_hf_config(name_or_path)
    raise KeyError(f"unknown model {name_or_path!r}: one of {sorted(MODELS)} or an HF checkpoint directory")
