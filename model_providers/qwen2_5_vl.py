"""Qwen2.5-VL policy on Megatron-Core: HF config -> vision tower + Megatron GPTModel decoder with M-RoPE.

    model = build_qwen2_5_vl(hf_config, pre_process=..., post_process=..., spec="auto")
    load_hf_weights(model, hf_tensors, get_mapping("qwen2_5_vl", hf_config, model.backend),
                    Placement.from_parallel_state(model.config))
    logits = model(input_ids, position_ids, None, pixel_values=..., image_grid_thw=...)

Layout (Megatron conventions):
  * `language_model`: a stock `GPTModel` configured as Qwen2 (QKV bias only, GQA, RMSNorm, SwiGLU,
    untied or tied output layer) with `position_embedding_type="mrope"`: `position_ids [3, b, s]` from
    `model_providers.rope.get_rope_index` drive Megatron's `MultimodalRotaryEmbedding` on every stage.
  * `vision_model` (first pipeline stage only): `qwen2_5_vl_vision.Qwen2_5_VisionModel`. Its outputs
    replace the embeddings at `image_token_id` positions before the decoder, exactly like HF's
    `masked_scatter` (batch-major order).
  * vocab: padded to a multiple of TP when needed; gathered logits are cut back to the HF vocab, sharded
    ones get the padded columns masked, so softmax, log-probs and cross-entropy never see them.
  * attention: causal. Batches are expected right-padded (pads after the real tokens), where the causal
    mask alone gives exact results for every real token; `attention_mask` may instead carry a full
    Megatron mask ([b, 1, s, s] bool, True = masked) for the local spec.
"""

from __future__ import annotations

from megatron.core.transformer.transformer_config import TransformerConfig
from torch import Tensor

from .qwen2_5_vl_vision import Qwen2_5_VisionModel, vision_configs
from .vlm_base import DEFAULT_MROPE_SECTION, VisionLanguageModel, build_stage, qwen2_language_config

__all__ = ["DEFAULT_MROPE_SECTION", "Qwen2_5_VLModel", "build_qwen2_5_vl", "language_config"]


def language_config(hf_text, **options) -> TransformerConfig:
    """The decoder's TransformerConfig from HF's `Qwen2_5_VLTextConfig` (Qwen2 block + M-RoPE).

    options (keyword-only): tp_size, pp_size, params_dtype, backend, sequence_parallel=False, pipeline_split; see
    `vlm_base.qwen2_language_config`.
    """
    return qwen2_language_config(hf_text, rope="mrope", name="Qwen2.5-VL", **options)


class Qwen2_5_VLModel(VisionLanguageModel):
    """One pipeline stage of Qwen2.5-VL (see module docstring). `config` is the decoder's config."""

    position_embedding_type = "mrope"

    def _build_vision(self, hf_config) -> None:
        self.vision_model = None
        if self.pre_process:
            tower, merger = vision_configs(
                hf_config.vision_config,
                tp_size=self.config.tensor_model_parallel_size,
                params_dtype=self.config.params_dtype,
                backend=self.backend,
            )
            self.vision_model = Qwen2_5_VisionModel(hf_config.vision_config, tower, merger, self.backend)

    def image_features(self, pixel_values: Tensor, image_grid_thw: Tensor | None) -> Tensor:
        """pixel_values [n_patches, C*T*P*P] and image_grid_thw [n_images, 3] as the HF processor returns
        them -> the tower's merged patch features [n_image_tokens, h]."""
        if image_grid_thw is None:
            raise ValueError("pixel_values given without image_grid_thw")
        return self.vision_model(pixel_values, image_grid_thw)

    def _describe_images(self, pixel_values: Tensor, image_grid_thw: Tensor | None) -> str:
        return f"grid_thw={image_grid_thw.tolist()}"

    def rope_positions(self, position_ids: Tensor, input_ids: Tensor) -> Tensor:
        """[3, b, s] M-RoPE positions (`model_providers.rope.get_rope_index`), or [b, s] for text-only."""
        if position_ids.dim() == 2:
            position_ids = position_ids.unsqueeze(0).expand(3, -1, -1)  # text-only: t = h = w
        return position_ids


def build_qwen2_5_vl(hf_config, **options) -> Qwen2_5_VLModel:
    """Build this rank's stage of Qwen2.5-VL. Needs Megatron's parallel_state (`init_distributed`).

    options (keyword-only, see `vlm_base.build_stage`): params_dtype=torch.float32, pre_process=True,
    post_process=True, spec="auto" ('local': Megatron's PyTorch modules, CPU; 'te': Transformer Engine,
    GPU), parallel_output=True, sequence_parallel=False, recompute='none'|'selective'|'full', pipeline_split
    (decoder layers of the first / last PP stage). Weights are randomly initialised; load HF weights
    with `hf_mapping.load_hf_weights`. On a CUDA machine the model is moved to the current device.
    """
    return build_stage(Qwen2_5_VLModel, language_config, hf_config, **options)
