"""InternVL3 policy on Megatron-Core: HF `InternVLConfig` -> InternViT + projector + Megatron GPTModel (Qwen2).

    model = build_internvl(hf_config, pre_process=..., post_process=..., spec="auto")
    load_hf_weights(model, hf_tensors, get_mapping("internvl", hf_config, model.backend),
                    Placement.from_parallel_state(model.config))
    logits = model(input_ids, position_ids, None, pixel_values=pixel_values)

Layout (Megatron conventions):
  * `language_model`: a stock `GPTModel` configured as Qwen2 (QKV bias only, GQA, RMSNorm, SwiGLU,
    untied or tied output layer) with plain 1-D RoPE (`position_embedding_type="rope"`).
  * `vision_model` + `vision_projection` (first pipeline stage only): `internvl_vision.InternVisionModel`
    (InternViT, tensor-parallel; see that module for why) and `InternVLProjector`. Each 448px tile gives
    (448/14)^2 = 1024 patches -> pixel shuffle (downsample_ratio 0.5) -> 256 tokens; the tokens of all
    tiles, in order, replace the embeddings at `image_token_id` positions exactly like HF's
    `masked_scatter` (batch-major order).
  * positions: Megatron's RoPE ("rope") always uses positions 0..s-1 and ignores `position_ids`; that is
    exactly `registry.position_ids` for the right-padded batches the trainer builds. Other positions
    (left padding, packed rows) are rejected rather than silently mis-rotated.
  * vocab: padded to a multiple of TP when needed; gathered logits are cut back to the HF vocab, sharded
    ones get the padded columns masked, so softmax, log-probs and cross-entropy never see them.
  * attention: causal; `attention_mask` may carry a full Megatron mask ([b, 1, s, s] bool, True = masked)
    for the local spec.

The HF<->Megatron rule table (`_internvl_mapping`) is registered here under "internvl"; importing this
module (as `registry.build_model` does) makes `hf_mapping.get_mapping("internvl", ...)` find it.
"""

from __future__ import annotations

import torch
from megatron.core.transformer.transformer_config import TransformerConfig
from torch import Tensor

from .hf_mapping import IDENTITY, ArchMapping, QKVFusion, Rule, qwen2_text_rules, register_mapping
from .internvl_vision import InternVisionModel, InternVLProjector, vision_configs
from .internvl_vision import image_features as tile_features
from .specs import Backend
from .vlm_base import VisionLanguageModel, build_stage, qwen2_language_config


def language_config(hf_text, **options) -> TransformerConfig:
    """The decoder's TransformerConfig from HF's `Qwen2Config` (InternVL3's language model; plain RoPE).

    options (keyword-only): tp_size, pp_size, params_dtype, backend, sequence_parallel=False, pipeline_split; see
    `vlm_base.qwen2_language_config`.
    """
    if hf_text.model_type != "qwen2":
        raise NotImplementedError(f"InternVL text model {hf_text.model_type!r}: only 'qwen2' (InternVL3)")
    return qwen2_language_config(hf_text, rope="rope", name="InternVL text model", **options)


class InternVLModel(VisionLanguageModel):
    """One pipeline stage of InternVL3 (see module docstring). `config` is the decoder's config."""

    position_embedding_type = "rope"

    def _build_vision(self, hf_config) -> None:
        self.downsample_ratio = hf_config.downsample_ratio
        self.vision_model = self.vision_projection = None
        if self.pre_process:
            tower, projector = vision_configs(
                hf_config,
                tp_size=self.config.tensor_model_parallel_size,
                params_dtype=self.config.params_dtype,
                backend=self.backend,
            )
            shuffled_width = hf_config.vision_config.hidden_size * round(1 / self.downsample_ratio) ** 2
            self.vision_model = InternVisionModel(hf_config, tower, self.backend)
            self.vision_projection = InternVLProjector(projector, shuffled_width, self.backend)

    def image_features(self, pixel_values: Tensor, image_grid_thw: Tensor | None = None) -> Tensor:
        """pixel_values [n_tiles, 3, H, W] as the HF processor returns them -> [n_image_tokens, h], tile by
        tile. `image_grid_thw` is unused (kept for a uniform model signature)."""
        features = tile_features(
            self.vision_model, self.vision_projection, pixel_values, self.downsample_ratio
        )
        return features.flatten(0, 1)  # [n_tiles, tokens per tile, h] -> [n_image_tokens, h]

    def _describe_images(self, pixel_values: Tensor, image_grid_thw: Tensor | None) -> str:
        return f"{pixel_values.shape[0]} tiles"

    def rope_positions(self, position_ids: Tensor, input_ids: Tensor) -> Tensor:
        """position_ids [b, s], 0..s-1 per row (a [3, b, s] M-RoPE-style tensor is accepted and its first
        row used): Megatron's RoPE ignores them, so anything else is rejected (see `_check_positions`)."""
        return _check_positions(position_ids, input_ids.shape)


def _check_positions(position_ids: Tensor, shape: torch.Size) -> Tensor:
    """[b, s] (or [3, b, s] -> row 0) positions; they must be 0..s-1 per row, what Megatron's RoPE applies."""
    if position_ids.dim() == 3:
        position_ids = position_ids[0]
    if position_ids.shape != shape:
        raise ValueError(f"position_ids {tuple(position_ids.shape)} do not match input_ids {tuple(shape)}")
    expected = torch.arange(shape[1], device=position_ids.device)
    if not bool((position_ids == expected).all()):
        raise ValueError(
            "InternVL on Megatron applies RoPE at positions 0..s-1 (right-padded rows); got position_ids "
            f"{position_ids.tolist() if position_ids.numel() <= 64 else '(non-default)'}"
        )
    return position_ids


def build_internvl(hf_config, **options) -> InternVLModel:
    """Build this rank's stage of InternVL3. Needs Megatron's parallel_state (`init_distributed`).

    options (keyword-only, see `vlm_base.build_stage`): params_dtype=torch.float32, pre_process=True,
    post_process=True, spec="auto" ('local': Megatron's PyTorch modules, CPU; 'te': Transformer Engine,
    GPU), parallel_output=True, sequence_parallel=False, recompute='none'|'selective'|'full', pipeline_split
    (decoder layers of the first / last PP stage). Weights are randomly initialised; load HF weights
    with `hf_mapping.load_hf_weights` and `get_mapping("internvl", ...)`. On a CUDA machine the model is
    moved to the current device.
    """
    return build_stage(InternVLModel, language_config, hf_config, **options)


# ---- HF <-> Megatron map -------------------------------------------------------------------------------------


def _vision_rules(hf_config) -> list[Rule]:
    """InternViT + projector (first stage). TP: QKV/fc1/linear_1 and the QK-norm weights split on rows,
    projection/fc2/linear_2 on columns, everything else replicated."""
    vision = hf_config.vision_config
    heads, hidden = vision.num_attention_heads, vision.hidden_size
    vm, hv = "vision_model", "model.vision_tower"
    m, h = f"{vm}.layers.{{layer}}", f"{hv}.encoder.layer.{{layer}}"
    qkv, mlp = QKVFusion(heads, heads, hidden // heads), vision.intermediate_size
    norm_leaves = ("weight", "bias") if vision.norm_type == "layer_norm" else ("weight",)
    # (Megatron name, HF names, TP axis, fusion, true HF size of the TP axis when Megatron pads it)
    table = [
        (f"{vm}.embeddings.class_embedding",        (f"{hv}.embeddings.cls_token",),                         None, IDENTITY, None),
        (f"{vm}.embeddings.patch_embedding.weight", (f"{hv}.embeddings.patch_embeddings.projection.weight",), None, IDENTITY, None),
        (f"{vm}.embeddings.patch_embedding.bias",   (f"{hv}.embeddings.patch_embeddings.projection.bias",),   None, IDENTITY, None),
        (f"{m}.self_attention.linear_qkv.weight",   tuple(f"{h}.attention.{x}_proj.weight" for x in "qkv"),  0,    qkv,      None),
        (f"{m}.self_attention.linear_proj.weight",  (f"{h}.attention.projection_layer.weight",),             1,    IDENTITY, None),
        (f"{m}.self_attention.linear_proj.bias",    (f"{h}.attention.projection_layer.bias",),               None, IDENTITY, None),
        (f"{m}.lambda_1",                           (f"{h}.lambda_1",),                                      None, IDENTITY, None),
        (f"{m}.mlp.linear_fc1.weight",              (f"{h}.mlp.fc1.weight",),                                0,    IDENTITY, mlp),
        (f"{m}.mlp.linear_fc1.bias",                (f"{h}.mlp.fc1.bias",),                                  0,    IDENTITY, mlp),
        (f"{m}.mlp.linear_fc2.weight",              (f"{h}.mlp.fc2.weight",),                                1,    IDENTITY, mlp),
        (f"{m}.mlp.linear_fc2.bias",                (f"{h}.mlp.fc2.bias",),                                  None, IDENTITY, None),
        (f"{m}.lambda_2",                           (f"{h}.lambda_2",),                                      None, IDENTITY, None),
    ]  # fmt: skip
    table += [
        (f"{m}.{megatron}.{leaf}", (f"{h}.{hf}.{leaf}",), None, IDENTITY, None)
        for megatron, hf in (
            ("input_layernorm", "layernorm_before"),
            ("pre_mlp_layernorm", "layernorm_after"),
        )
        for leaf in norm_leaves
    ]
    if vision.use_absolute_position_embeddings:
        table.append((f"{vm}.embeddings.position_embedding", (f"{hv}.embeddings.position_embeddings",), None, IDENTITY, None))  # fmt: skip
    if vision.attention_bias:
        table.append((f"{m}.self_attention.linear_qkv.bias", tuple(f"{h}.attention.{x}_proj.bias" for x in "qkv"), 0, qkv, None))  # fmt: skip
    if vision.use_qk_norm:  # sharded with the heads (see internvl_vision.HeadShardedRMSNorm)
        table += [
            (
                f"{m}.self_attention.{x}_layernorm.weight",
                (f"{h}.attention.{x}_norm.weight",),
                0,
                IDENTITY,
                None,
            )
            for x in "qk"
        ]
    vp, hp = "vision_projection", "model.multi_modal_projector"
    table += [
        (f"{vp}.layer_norm.weight",     (f"{hp}.layer_norm.weight",), None, IDENTITY, None),
        (f"{vp}.layer_norm.bias",       (f"{hp}.layer_norm.bias",),   None, IDENTITY, None),
        (f"{vp}.mlp.linear_fc1.weight", (f"{hp}.linear_1.weight",),   0,    IDENTITY, None),
        (f"{vp}.mlp.linear_fc1.bias",   (f"{hp}.linear_1.bias",),     0,    IDENTITY, None),
        (f"{vp}.mlp.linear_fc2.weight", (f"{hp}.linear_2.weight",),   1,    IDENTITY, None),
        (f"{vp}.mlp.linear_fc2.bias",   (f"{hp}.linear_2.bias",),     None, IDENTITY, None),
    ]  # fmt: skip
    return [
        Rule(name, hf, "first", tp_axis=axis, fusion=fusion, hf_size=size)
        for name, hf, axis, fusion, size in table
    ]


@register_mapping("internvl")
def _internvl_mapping(hf_config, backend: Backend = "local") -> ArchMapping:
    tied = bool(hf_config.tie_word_embeddings)
    return ArchMapping(
        arch="internvl",
        rules=qwen2_text_rules(hf_config, backend) + _vision_rules(hf_config),
        ignore=(r"lm_head\.weight",) if tied else (),
        # On-disk -hf checkpoints keep the LLaVA-style names (transformers 5 renames them on load).
        checkpoint_prefixes=(
            ("model.language_model.", "language_model.model."),
            ("lm_head.", "language_model.lm_head."),
            ("model.vision_tower.", "vision_tower."),
            ("model.multi_modal_projector.", "multi_modal_projector."),
        ),
    )
