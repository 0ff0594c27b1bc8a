"""The tiny checkpoints' HF configs (Qwen2_5_VLConfig / InternVLConfig) from the sizes in sizes.py."""

from __future__ import annotations

from typing import Any

from calibrl_mcore.tiny_model.sizes import (
    ARCHS,
    INTERNVL_DOWNSAMPLE,
    INTERNVL_IMAGE_SIZE,
    INTERNVL_SEQ_LEN,
    MAX_POSITIONS,
    MROPE_SECTION,
    PATCH,
    QWEN_FULLATT,
    QWEN_MERGE,
    QWEN_TEMPORAL_PATCH,
    QWEN_WINDOW,
    RMS_EPS,
    ROPE_THETA,
    TEXT_HEADS,
    TEXT_HIDDEN,
    TEXT_INTERMEDIATE,
    TEXT_KV_HEADS,
    VIS_DEPTH,
    VIS_HEADS,
    VIS_HIDDEN,
    VIS_INTERMEDIATE,
    VOCAB_SIZE,
)


# ---------------------------------------------------------------------------------------------------------
# Configs
# ---------------------------------------------------------------------------------------------------------
def _text_kwargs(num_layers: int, tok) -> dict[str, Any]:
    return dict(
        vocab_size=VOCAB_SIZE,
        hidden_size=TEXT_HIDDEN,
        intermediate_size=TEXT_INTERMEDIATE,
        num_hidden_layers=num_layers,
        num_attention_heads=TEXT_HEADS,
        num_key_value_heads=TEXT_KV_HEADS,
        hidden_act="silu",
        max_position_embeddings=MAX_POSITIONS,
        initializer_range=0.02,
        rms_norm_eps=RMS_EPS,
        use_cache=True,
        use_sliding_window=False,
        max_window_layers=num_layers,
        attention_dropout=0.0,
        bos_token_id=tok.convert_tokens_to_ids("<|endoftext|>"),
        eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=tok.convert_tokens_to_ids("<|endoftext|>"),
        tie_word_embeddings=False,
    )


def build_config(arch: str, tok, num_layers: int = 2, use_qk_norm: bool = False):
    if arch == "qwen2_5_vl":
        from transformers import Qwen2_5_VLConfig

        text = _text_kwargs(num_layers, tok)
        text["rope_parameters"] = {
            "rope_type": "default",
            "rope_theta": ROPE_THETA,
            "mrope_section": MROPE_SECTION,
        }
        vision = dict(
            depth=VIS_DEPTH,
            hidden_size=VIS_HIDDEN,
            hidden_act="silu",
            intermediate_size=VIS_INTERMEDIATE,
            num_heads=VIS_HEADS,
            in_channels=3,
            patch_size=PATCH,
            spatial_merge_size=QWEN_MERGE,
            temporal_patch_size=QWEN_TEMPORAL_PATCH,
            tokens_per_second=2,
            window_size=QWEN_WINDOW,
            out_hidden_size=TEXT_HIDDEN,
            fullatt_block_indexes=list(QWEN_FULLATT),
            initializer_range=0.02,
        )
        cfg = Qwen2_5_VLConfig(
            text_config=text,
            vision_config=vision,
            image_token_id=tok.convert_tokens_to_ids("<|image_pad|>"),
            video_token_id=tok.convert_tokens_to_ids("<|video_pad|>"),
            vision_start_token_id=tok.convert_tokens_to_ids("<|vision_start|>"),
            vision_end_token_id=tok.convert_tokens_to_ids("<|vision_end|>"),
            tie_word_embeddings=False,
        )
        cfg.architectures = ["Qwen2_5_VLForConditionalGeneration"]
        return cfg
    if arch == "internvl":
        from transformers import InternVLConfig, InternVLVisionConfig, Qwen2Config

        text = _text_kwargs(num_layers, tok)
        text["rope_parameters"] = {"rope_type": "default", "rope_theta": ROPE_THETA}
        vision = InternVLVisionConfig(
            hidden_size=VIS_HIDDEN,
            num_hidden_layers=VIS_DEPTH,
            num_attention_heads=VIS_HEADS,
            intermediate_size=VIS_INTERMEDIATE,
            attention_bias=True,
            use_qk_norm=use_qk_norm,
            hidden_act="gelu",
            norm_type="layer_norm",
            layer_norm_eps=1e-6,
            image_size=[INTERNVL_IMAGE_SIZE, INTERNVL_IMAGE_SIZE],
            patch_size=[PATCH, PATCH],
            num_channels=3,
            use_absolute_position_embeddings=True,
            layer_scale_init_value=0.1,
            use_mean_pooling=True,
            initializer_range=0.02,
        )
        cfg = InternVLConfig(
            text_config=Qwen2Config(**text),
            vision_config=vision,
            image_token_id=tok.convert_tokens_to_ids("<IMG_CONTEXT>"),
            image_seq_length=INTERNVL_SEQ_LEN,
            downsample_ratio=INTERNVL_DOWNSAMPLE,
            projector_hidden_act="gelu",
            vision_feature_layer=-1,
            vision_feature_select_strategy="default",
            tie_word_embeddings=False,
        )
        cfg.architectures = ["InternVLForConditionalGeneration"]
        return cfg
    raise ValueError(f"unknown arch {arch!r}; valid: {', '.join(ARCHS)}")
