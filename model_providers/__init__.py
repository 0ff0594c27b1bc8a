"""HF config -> Megatron-Core models (one module per architecture), layer-spec choice, HF<->Megatron maps.

Names are resolved lazily so that light users (e.g. the data path importing `model_providers.rope`) do
not pay for importing Megatron.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "ArchMapping": "hf_mapping",
    "Placement": "hf_mapping",
    "Rule": "hf_mapping",
    "gather_megatron_to_hf": "hf_mapping",
    "get_mapping": "hf_mapping",
    "hf_to_megatron": "hf_mapping",
    "load_hf_weights": "hf_mapping",
    "megatron_to_hf": "hf_mapping",
    "register_mapping": "hf_mapping",
    "Qwen2_5_VLModel": "qwen2_5_vl",
    "build_qwen2_5_vl": "qwen2_5_vl",
    "get_rope_index": "rope",
    "resolve_backend": "specs",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'model_providers' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
