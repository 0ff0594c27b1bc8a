"""Checks that need no process group, and this rank's Megatron stage on the meta device cut into groups."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

DTYPES = {"fp32": "float32", "bf16": "bfloat16"}


class ConvertError(Exception):
    """Bad input or layout. Raised identically on every rank (no rank is left waiting in a collective)."""


# ---- checks that need no process group (before launching torchrun, and on every rank) -------------------


def read_hf_config(path: Path, flag: str):
    """AutoConfig of `path`, its architecture checked against the model providers' registry."""
    from transformers import AutoConfig

    from model_providers.registry import supported_architectures

    if not (path / "config.json").is_file():
        raise ConvertError(f"{flag} {path}: no config.json (point it at an HF checkpoint directory)")
    raw = json.loads((path / "config.json").read_text())
    if raw.get("model_type") not in supported_architectures():
        raise ConvertError(
            f"{path}/config.json: model_type={raw.get('model_type')!r} (architectures={raw.get('architectures')}) "
            f"is not supported; supported: {supported_architectures()} (a new architecture needs a builder in "
            "model_providers/registry.py and an hf_mapping rule table)"
        )
    return AutoConfig.from_pretrained(path)


def check_layout(hf_config, tp: int, pp: int) -> None:
    """TP must divide the attention heads and KV groups (text and vision), PP the decoder layers."""
    text, vision = hf_config.text_config, hf_config.vision_config
    fields = {
        "text_config.num_attention_heads": text.num_attention_heads,
        "text_config.num_key_value_heads": text.num_key_value_heads,
        "vision_config.num_heads": getattr(vision, "num_heads", None),
        "vision_config.num_attention_heads": getattr(vision, "num_attention_heads", None),
    }
    if tp < 1 or pp < 1:
        raise ConvertError(f"--tp and --pp must be >= 1, got --tp {tp} --pp {pp}")
    for field, value in fields.items():
        if value is not None and value % tp:
            raise ConvertError(f"--tp {tp} does not divide {field}={value}: pick a TP that divides it")
    if text.num_hidden_layers % pp:
        raise ConvertError(
            f"--pp {pp} does not divide text_config.num_hidden_layers={text.num_hidden_layers}: "
            "pick a PP that divides it (every stage holds the same number of decoder layers)"
        )


# ---- this rank's stage on the meta device, and its groups ------------------------------------------------


@dataclasses.dataclass
class Stage:
    """This rank's Megatron stage (meta tensors), its rule table, placement and checkpoint entries."""

    model: Any
    mapping: Any
    placement: Any
    items: list[tuple[str, Any]]  # (state-dict name, ShardedTensor | ShardedTensorFactory | ShardedObject)


def build_stage(hf_config, dtype, *, meta: bool = True) -> Stage:
    import torch
    from megatron.core import parallel_state as ps

    from model_providers.hf_mapping import Placement, get_mapping
    from model_providers.registry import build_model

    check_layout(
        hf_config, ps.get_tensor_model_parallel_world_size(), ps.get_pipeline_model_parallel_world_size()
    )
    with torch.device("meta" if meta else "cpu"):
        model = build_model(hf_config, params_dtype=dtype, pre_process=ps.is_pipeline_first_stage(),
                            post_process=ps.is_pipeline_last_stage(), spec="local")  # fmt: skip
    mapping = get_mapping(hf_config.model_type, hf_config, model.backend)  # the builder registered it
    return Stage(
        model, mapping, Placement.from_parallel_state(model.config), list(model.sharded_state_dict().items())
    )


def _is_tensor(sh) -> bool:
    """ShardedTensor / ShardedTensorFactory (they carry a tensor), not a ShardedObject."""
    return hasattr(getattr(sh, "data", None), "shape")


def plan_groups(items: list, budget_bytes: int) -> list[list]:
    """Consecutive items in groups of at most `budget_bytes` (a larger tensor gets a group of its own).
    Depends only on local shapes, so the ranks of a TP group get the same groups (their gathers line up)."""
    groups: list[list] = [[]]
    size = 0
    for name, sh in items:
        nbytes = sh.data.numel() * sh.data.element_size() if _is_tensor(sh) else 0
        if groups[-1] and size + nbytes > budget_bytes:
            groups.append([])
            size = 0
        groups[-1].append((name, sh))
        size += nbytes
    return [g for g in groups if g]


def _sharded_tensors(sh, data) -> list:
    """`sh` with `data` as ShardedTensors (a factory, e.g. SwiGLU fc1, is built: one view per half)."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensorFactory

    if isinstance(sh, ShardedTensorFactory):
        return list(nested_values(dataclasses.replace(sh, data=data).build()))
    return [dataclasses.replace(sh, data=data, dtype=data.dtype)]
