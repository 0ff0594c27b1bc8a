"""Checks that need no process group, and this rank's Megatron stage on the meta device cut into groups."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

DTYPES = {"fp32": "float32", "bf16": "bfloat16"}
SPLIT_FLAGS = ("--num-layers-in-first-pipeline-stage", "--num-layers-in-last-pipeline-stage", "--pp")
"""The uneven-pipeline flags and the PP flag, as `PipelineSplit` errors name them."""


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


def pipeline_split(args: Any):
    """The uneven-pipeline flags of a command (`PipelineSplit`; both unset = even or, see `check_layout`, chosen)."""
    from model_providers.pipeline_split import PipelineSplit

    return PipelineSplit(args.num_layers_in_first_pipeline_stage, args.num_layers_in_last_pipeline_stage)


def check_layout(hf_config, tp: int, pp: int, split=None):
    """TP must divide the attention heads and KV groups (text and vision); returns the pipeline split to use.

    `split` (a `PipelineSplit`, default even) must fit the decoder layers. Without one, when PP does not divide
    the layers, the most balanced uneven split is used (`balanced_split`): the split only decides which rank
    converts which layers; the checkpoint indexes layers globally and reloads at any split.
    """
    from model_providers.pipeline_split import EVEN, PipelineSplitError, balanced_split

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
    layers = text.num_hidden_layers
    split = split or EVEN
    if not split.uneven and layers % pp and pp <= layers:
        split = balanced_split(layers, pp)
    try:
        split.stage_layers(layers, pp, SPLIT_FLAGS)
    except PipelineSplitError as err:
        raise ConvertError(f"{err} (text_config.num_hidden_layers={layers})") from None
    return split


# ---- this rank's stage on the meta device, and its groups ------------------------------------------------


@dataclasses.dataclass
class Stage:
    """This rank's Megatron stage (meta tensors), its rule table, placement and checkpoint entries."""

    model: Any
    mapping: Any
    placement: Any
    items: list[tuple[str, Any]]  # (state-dict name, ShardedTensor | ShardedTensorFactory | ShardedObject)
    split: Any  # the PipelineSplit the stages were built with (check_layout)


def build_stage(hf_config, dtype, split=None, *, meta: bool = True) -> Stage:
    """This rank's stage; `split`: the command's uneven-pipeline flags (`pipeline_split(args)`)."""
    import torch
    from megatron.core import parallel_state as ps

    from model_providers.hf_mapping import Placement, get_mapping
    from model_providers.registry import build_model

    tp, pp = ps.get_tensor_model_parallel_world_size(), ps.get_pipeline_model_parallel_world_size()
    split = check_layout(hf_config, tp, pp, split)
    with torch.device("meta" if meta else "cpu"):
        model = build_model(hf_config, params_dtype=dtype, pre_process=ps.is_pipeline_first_stage(),
                            post_process=ps.is_pipeline_last_stage(), spec="local", pipeline_split=split)  # fmt: skip
    mapping = get_mapping(hf_config.model_type, hf_config, model.backend)  # the builder registered it
    placement = Placement.from_parallel_state(model.config)
    return Stage(model, mapping, placement, list(model.sharded_state_dict().items()), split)


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
