"""`model_providers.pipeline_split` against megatron-core 0.16.1's own rule (no process group needed).

Checked against `megatron/core/transformer/transformer_config.py` (`TransformerConfig.__post_init__`, "Uneven
PP"), `transformer_block.get_num_layers_to_build` and `transformer_layer.get_transformer_layer_offset` of the
pinned megatron-core 0.16.1, called with an explicit `pp_rank`: for every split of 1..7 layers over PP 1..4,
either both accept it with the same per-stage counts and offsets, or ours refuses it with a message naming
the setting (ours is stricter: Megatron accepts a middle stage with <= 0 layers, a set split at PP = 1, and
leaves PP not dividing the layers to an assert at build time).
"""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from model_providers.pipeline_split import (
    CONFIG_KEYS,
    PipelineSplit,
    PipelineSplitError,
    balanced_split,
    candidate_splits,
)


def _megatron_layers(num_layers: int, pp: int, split: PipelineSplit) -> tuple[list[int], list[int]] | None:
    """(layers per stage, first global layer per stage) as Megatron computes them; None if it refuses."""
    from megatron.core.transformer.transformer_block import get_num_layers_to_build
    from megatron.core.transformer.transformer_config import TransformerConfig
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    try:
        config = TransformerConfig(num_layers=num_layers, hidden_size=64, num_attention_heads=4,
                                   activation_func=F.silu, pipeline_model_parallel_size=pp,
                                   pipeline_dtype=torch.float32, **split.config_kwargs())  # fmt: skip
        counts = [get_num_layers_to_build(config, pp_rank=r) for r in range(pp)]
    except (ValueError, AssertionError):
        return None
    return counts, [get_transformer_layer_offset(config, pp_rank=r) for r in range(pp)]


def test_stage_layers_match_megatron() -> None:
    checked = refused_by_both = stricter = 0
    for num_layers, pp in itertools.product(range(1, 8), range(1, 5)):
        for first, last in itertools.product([None, *range(1, num_layers + 2)], repeat=2):
            split = PipelineSplit(first, last)
            theirs = _megatron_layers(num_layers, pp, split)
            try:
                ours = split.stage_layers(num_layers, pp)
            except PipelineSplitError as err:
                assert "parallel.num_layers_in_" in str(err) or "parallel.pipeline_model_parallel_size" in str(err)
                valid = theirs is not None and sum(theirs[0]) == num_layers and min(theirs[0]) > 0 and pp > 1
                assert not valid, (num_layers, pp, split, theirs, str(err))
                refused_by_both += theirs is None
                stricter += theirs is not None
                continue
            assert theirs is not None, (num_layers, pp, split, ours)
            assert ours == theirs[0], (num_layers, pp, split)
            assert [start for start, _ in split.stage_ranges(num_layers, pp)] == theirs[1], (num_layers, pp, split)
            checked += 1
    assert checked > 100 and refused_by_both > 100 and stricter > 10, (checked, refused_by_both, stricter)


def test_candidates_are_every_distinct_valid_layout() -> None:
    splits = candidate_splits(28, 8)
    layouts = [tuple(s.stage_layers(28, 8)) for s in splits]
    assert len(set(layouts)) == len(layouts) and all(sum(lay) == 28 and min(lay) >= 1 for lay in layouts)
    assert (2, 4, 4, 4, 4, 4, 4, 2) in layouts and (1, 4, 4, 4, 4, 4, 4, 3) in layouts
    assert balanced_split(28, 8) == PipelineSplit(2, 2)  # fullest stage 4, emptiest 2
    assert candidate_splits(64, 8)[0] == PipelineSplit() == balanced_split(64, 8)  # even first when it exists
    assert balanced_split(3, 2) == PipelineSplit(first=1)
    assert candidate_splits(2, 3) == []
    for layers in ([1, 2], [2, 1], [3, 5, 5, 5], [5, 5, 5, 2], [2, 6, 6, 1], [4, 4]):
        assert PipelineSplit.from_stage_layers(layers).stage_layers(sum(layers), len(layers)) == layers


@pytest.mark.parametrize(
    ("split", "num_layers", "pp", "message"),
    [
        (PipelineSplit(), 3, 2, "parallel.pipeline_model_parallel_size=2 does not divide the 3 decoder layers: set "
                                "parallel.num_layers_in_first_pipeline_stage / parallel.num_layers_in_last_pipeline_stage"
                                " for uneven stages, e.g. parallel.num_layers_in_first_pipeline_stage=1 (1+2 layers)"),
        (PipelineSplit(2, 2), 3, 2, "sum to 4, but the model has 3 decoder layers"),
        (PipelineSplit(1), 28, 8, "leave 27 of the 28 decoder layers to the other 7 of "
                                  "parallel.pipeline_model_parallel_size=8 stages, which need the same number >= 1 "
                                  "each; use e.g. parallel.num_layers_in_first_pipeline_stage=2 "
                                  "parallel.num_layers_in_last_pipeline_stage=2 (2+4+4+4+4+4+4+2 layers)"),
        (PipelineSplit(1), 3, 1, "parallel.num_layers_in_first_pipeline_stage=1: uneven stages need "
                                 "parallel.pipeline_model_parallel_size > 1"),
        (PipelineSplit(last=0), 3, 2, "parallel.num_layers_in_last_pipeline_stage=0: must be an int >= 1"),
        (PipelineSplit(), 2, 3, "parallel.pipeline_model_parallel_size=3 is more stages than the 2 decoder layers"),
    ],
)
def test_errors_name_the_setting_and_a_fix(split, num_layers, pp, message) -> None:
    with pytest.raises(PipelineSplitError) as err:
        split.stage_layers(num_layers, pp)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_errors_name_the_callers_settings() -> None:
    """`calibrl convert` names its flags instead of the config keys."""
    flags = ("--num-layers-in-first-pipeline-stage", "--num-layers-in-last-pipeline-stage", "--pp")
    with pytest.raises(PipelineSplitError, match="^--pp=2 does not divide the 3 decoder layers: set --num-layers-in-"):
        PipelineSplit().stage_layers(3, 2, flags)
    assert "parallel." not in str(pytest.raises(PipelineSplitError, PipelineSplit(3).stage_layers, 3, 2, flags).value)
    assert CONFIG_KEYS[2] == "parallel.pipeline_model_parallel_size"


def test_config_keys() -> None:
    """parallel.num_layers_in_{first,last}_pipeline_stage: typed, null by default, checked where no model is
    needed (the fit to the decoder is checked when the model is built)."""
    from calibrl_mcore.config import ConfigError, load_config

    pp2 = "parallel.pipeline_model_parallel_size=2"
    cfg = load_config(overrides=[pp2, "parallel.num_layers_in_first_pipeline_stage=1"])
    assert PipelineSplit.from_section(cfg.parallel) == PipelineSplit(first=1)
    assert PipelineSplit.from_section(load_config().parallel) == PipelineSplit()
    with pytest.raises(ConfigError, match="parallel.num_layers_in_last_pipeline_stage must be >= 1"):
        load_config(overrides=[pp2, "parallel.num_layers_in_last_pipeline_stage=0"])
    with pytest.raises(ConfigError, match="parallel.num_layers_in_first_pipeline_stage is set but "
                                          "parallel.pipeline_model_parallel_size=1"):
        load_config(overrides=["parallel.num_layers_in_first_pipeline_stage=2"])


def test_decoder_config_carries_the_split() -> None:
    """The VL providers' decoder TransformerConfig gets Megatron's two fields, after a check that names the
    config keys (before Megatron's own asserts, which accept a middle stage without layers)."""
    from transformers import Qwen2Config

    from model_providers.vlm_base import qwen2_language_config

    text = Qwen2Config(num_hidden_layers=3, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=256)  # fmt: skip
    build = lambda split, pp=2: qwen2_language_config(  # noqa: E731
        text, rope="rope", name="test", tp_size=1, pp_size=pp, params_dtype=torch.float32, backend="local",
        pipeline_split=split)  # fmt: skip
    config = build(PipelineSplit(first=1))
    assert (config.num_layers_in_first_pipeline_stage, config.num_layers_in_last_pipeline_stage) == (1, None)
    assert build(PipelineSplit(), pp=3).num_layers_in_first_pipeline_stage is None  # 1+1+1
    with pytest.raises(PipelineSplitError, match="parallel.pipeline_model_parallel_size=2 does not divide the 3"):
        build(PipelineSplit())
    with pytest.raises(PipelineSplitError, match="parallel.num_layers_in_first_pipeline_stage=2, "
                                                 "parallel.num_layers_in_last_pipeline_stage=2 sum to 4"):
        build(PipelineSplit(2, 2))


# ---- the scaling planner's choice (tools/scaling/pipeline_stages.py) --------------------------------------


def test_pipelined_time_by_hand() -> None:
    from tools.scaling.pipeline_stages import StageCost, pipelined_s

    cost = StageCost(per_layer=1.0, first=3.0, last=2.0)
    assert cost.stages([4, 5, 5, 4]) == [7.0, 5.0, 5.0, 6.0] and cost.stages([3]) == [8.0]
    # 1F1B over m micro-batches: (sum + (m - 1) * max) / m; equal stages: (m + p - 1) / m of one stage
    assert pipelined_s([7.0, 5.0, 5.0, 6.0], 10) == pytest.approx((23 + 9 * 7) / 10)
    assert pipelined_s([2.0] * 4, 8) == pytest.approx(2.0 * (8 + 4 - 1) / 8)


def test_planner_moves_layers_off_the_vision_stage() -> None:
    """Qwen2.5-VL-7B (28 layers) at TP4 x PP4 x DP4: stage 0 also runs the ViT, so the planner gives it fewer
    decoder layers; its slowest stage and its training step get faster, its worst-stage memory no larger."""
    from dataclasses import replace

    from calibrl_mcore.config import load_config
    from tools.scaling import planner as P
    from tools.scaling.models import MODELS

    model, hw, a = MODELS["qwen2_5_vl_7b"], P.HARDWARE["h100-80gb"], P.Assumptions()
    w = P.Workload.from_config(load_config("configs/qwen2_5_vl_7b.yaml"))
    even = P.Layout(tp=4, pp=4, dp=4, distributed_optimizer=True, sequence_parallel=True)
    split = P.split_for(model, w, even, hw, a)
    layers = split.stage_layers(28, 4)
    assert layers[0] < 7 and layers[1] == layers[2] > 7, layers
    uneven = replace(even, split=split)
    cost, _ = P.stage_compute(model, w, even, hw, a, backward=True)
    assert max(cost.stages(layers)) < max(cost.stages([7] * 4))
    assert P.pass_s(model, w, uneven, hw, a, backward=True) < P.pass_s(model, w, even, hw, a, backward=True)
    assert sum(P.training_memory(model, w, uneven, a).values()) <= sum(P.training_memory(model, w, even, a).values())
    # a text-only decoder: only the LM head tilts the compute balance, towards fewer layers on the last stage;
    # stage 0's two in-flight micro-batches (1F1B) make that cost memory, which the planner does not spend
    from tools.scaling.pipeline_stages import choose_split

    llama, pp2 = MODELS["llama3_1_8b"], replace(even, pp=2)
    cost, _ = P.stage_compute(llama, w, pp2, hw, a, backward=True)
    assert choose_split(32, 2, cost, lambda split: 0.0).stage_layers(32, 2)[0] > 16
    assert P.split_for(llama, w, pp2, hw, a) == PipelineSplit()


def test_planner_says_what_uneven_stages_gained(capsys) -> None:
    from calibrl_mcore.config import load_config
    from tools.scaling import planner as P
    from tools.scaling.models import MODELS

    model, hw = MODELS["qwen2_5_vl_7b"], P.HARDWARE["h100-80gb"]
    w = P.Workload.from_config(load_config("configs/qwen2_5_vl_7b.yaml"))
    best, even = P.rank_layouts(model, 16, hw, w)[0][0], P.rank_layouts(model, 16, hw, w, uneven=False)[0]
    assert all(not p.layout.split.uneven and 28 % p.layout.pp == 0 for p in even)
    assert best.layout.split.uneven and best.step_s < even[0].step_s
    assert best.layout_name.endswith(f"[{'+'.join(map(str, best.stages))}]")
    assert P.main(["--model", "qwen2_5_vl_7b", "--gpus", "16", "--top", "1"]) == 0
    out = capsys.readouterr().out
    gain = even[0].step_s - best.step_s
    assert f"uneven stages: {best.layout_name} {best.step_s:.0f} s vs {even[0].step_s:.0f} s" in out
    assert f"-{gain:.1f} s per step (-{100 * gain / even[0].step_s:.1f} %)" in out
