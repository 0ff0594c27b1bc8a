"""One entry point for every architecture: HF config -> this rank's Megatron stage.

The trainer, conversion tools and benchmarks call `build_model(hf_config, ...)`; the architecture is
read from `hf_config.model_type`. Adding an architecture = one line in `_BUILDERS` + its hf_mapping table.
"""

from __future__ import annotations

import importlib
from typing import Any

_BUILDERS: dict[str, tuple[str, str]] = {
    "qwen2_5_vl": ("model_providers.qwen2_5_vl", "build_qwen2_5_vl"),
    "internvl": ("model_providers.internvl", "build_internvl"),
}


def supported_architectures() -> list[str]:
    return sorted(_BUILDERS)


def build_model(hf_config, **kwargs: Any):
    """Build this rank's stage for `hf_config.model_type` (kwargs go to the architecture's builder)."""
    arch = getattr(hf_config, "model_type", None)
    if arch not in _BUILDERS:
        raise ValueError(
            f"unsupported architecture {arch!r} (config.json 'model_type'); supported: {supported_architectures()}"
        )
    module, fn = _BUILDERS[arch]
    return getattr(importlib.import_module(module), fn)(hf_config, **kwargs)


def position_ids(hf_config, input_ids, image_grid_thw=None, attention_mask=None):
    """Decoder position ids for a right-padded batch: [3, b, s] M-RoPE for Qwen2.5-VL, [b, s] otherwise."""
    import torch

    if hf_config.model_type == "qwen2_5_vl":
        from model_providers.rope import get_rope_index

        pos, _ = get_rope_index(
            input_ids,
            image_grid_thw,
            attention_mask,
            spatial_merge_size=hf_config.vision_config.spatial_merge_size,
            image_token_id=hf_config.image_token_id,
            vision_start_token_id=hf_config.vision_start_token_id,
        )
        return pos
    batch, seq = input_ids.shape
    return torch.arange(seq, device=input_ids.device).unsqueeze(0).expand(batch, seq)
