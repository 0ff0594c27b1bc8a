"""FP8 rules without a GPU (`model_providers.fp8`): padding per CP/SP shard, recipe knobs reaching Megatron's
own TransformerConfig checks, and the config errors."""

from __future__ import annotations

import pytest
import torch

from calibrl_mcore.config import ConfigError, ModelConfig, load_config
from calibrl_mcore.trainer.batch import Row, collate
from model_providers.fp8 import FP8Settings, sequence_pad_multiple, te_config_kwargs
from model_providers.packing import PackedLayout

LAYOUTS = [(1, 1, False), (2, 1, False), (1, 2, True), (2, 2, True), (4, 2, True), (2, 4, False)]  # cp, tp, sp


@pytest.mark.parametrize("recipe,backend,multiple", [("tensorwise", "te", 16), ("delayed", "te", 16),
                                                     ("blockwise", "te", 128), ("rowwise", "torchao", 16)])
@pytest.mark.parametrize("cp,tp,sp", LAYOUTS)
def test_s1001_pads_so_every_shard_fits_fp8(recipe, backend, multiple, cp, tp, sp):
    fp8 = FP8Settings(recipe=recipe, backend=backend, bf16_layers=())
    m = sequence_pad_multiple(cp, tp, sp, fp8)
    s = -(-1001 // m) * m
    shards = cp * (tp if sp else 1)
    per_rank = s // shards
    assert s % shards == 0 and per_rank % multiple == 0, (s, shards)
    if cp > 1:  # load-balanced CP: 2·CP chunks, each still split by TP under SP
        assert s % (2 * cp * (tp if sp else 1)) == 0
    assert s - 1001 < m  # the smallest such length: no more padding than needed
    # without FP8 the rule is the one CP / SP had before
    assert sequence_pad_multiple(cp, tp, sp) == (2 * cp if cp > 1 else 1) * (tp if sp else 1)


def test_collate_and_packing_take_the_fp8_multiple():
    fp8 = FP8Settings(recipe="tensorwise", bf16_layers=())
    m = sequence_pad_multiple(2, 2, True, fp8)  # 64: each of 4 ranks keeps 16·k tokens
    rows = [Row(uid="a", group_id=0, is_expert=False, prompt_ids=list(range(1, 601)), response_ids=[5] * 401),
            Row(uid="b", group_id=1, is_expert=False, prompt_ids=[1, 2, 3], response_ids=[4])]
    mb = collate(rows, [0, 1], lambda ids, grid, attn: torch.arange(ids.shape[1]).expand_as(ids), pad_multiple=m)
    assert mb.input_ids.shape == (2, 1024)  # s = 1001 -> 1024
    layout = PackedLayout.from_lengths(torch.tensor([1001, 4]), 1024, pad_multiple=sequence_pad_multiple(
        1, 2, True, FP8Settings(recipe="blockwise", bf16_layers=())))
    assert layout.total == 1024 and layout.total // 2 % 128 == 0  # 1005 real tokens, T / TP multiple of 128


def test_te_recipe_knobs_go_through_megatrons_constructor():
    from megatron.core.transformer.transformer_config import TransformerConfig

    def build(**fp8):
        return TransformerConfig(num_layers=4, hidden_size=64, num_attention_heads=4,
                                 **te_config_kwargs(FP8Settings(**fp8)))

    c = build(recipe="tensorwise")
    assert (c.fp8, c.fp8_recipe, c.first_last_layers_bf16) == ("hybrid", "tensorwise", True)  # e5m2 grads
    assert (c.num_layers_at_start_in_bf16, c.num_layers_at_end_in_bf16) == (1, 1)
    c = build(recipe="delayed", bf16_layers=(), amax_history_len=512, amax_compute_algo="most_recent")
    assert (c.fp8, c.fp8_amax_history_len, c.fp8_amax_compute_algo) == ("hybrid", 512, "most_recent")
    assert c.tp_only_amax_red and not c.first_last_layers_bf16  # amax never reduced across DP (deadlock)
    assert build(recipe="delayed", bf16_layers=()).fp8_amax_history_len == 1024  # TE / NeMo default, not 1
    assert build(recipe="blockwise").fp8 == "e4m3"
    assert build(recipe="tensorwise", backend="torchao").fp8 is None  # torchao: Megatron's config untouched
    # Megatron's own __post_init__ check runs (our validate() is bypassed here on purpose)
    with pytest.raises(ValueError, match="Delayed scaling does not support first / last layer in BF16"):
        build(recipe="delayed", bf16_layers=("first",))


@pytest.mark.parametrize("override,match", [
    (["model.fp8=delayed"], "model.fp8=delayed cannot keep layers in bf16.*fp8_bf16_layers"),
    (["model.fp8=tensorwise", "model.fp8_bf16_layers=[first,vision]"], "vision towers always run in bf16"),
    (["model.fp8=rowwise"], "not a te recipe.*fp8_backend=torchao has it"),
    (["model.fp8=blockwise", "model.fp8_backend=torchao"], "not a torchao recipe.*fp8_backend=te has it"),
    (["model.fp8_amax_history_len=0"], "model.fp8_amax_history_len must be >= 1"),
])
def test_fp8_config_errors_name_the_key(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, override)


def test_spec_must_match_the_backend():
    with pytest.raises(ValueError, match="needs Transformer Engine layers.*fp8_backend=torchao"):
        FP8Settings(recipe="tensorwise").check_spec("sdpa")
    with pytest.raises(ValueError, match="with model.spec=te use fp8_backend=te"):
        FP8Settings(recipe="tensorwise", backend="torchao").check_spec("te")
    FP8Settings.from_model_config(ModelConfig()).check_spec("local")  # fp8 off: any spec


def test_cuda_device_max_connections_is_set_for_tp_or_cp_only():
    from calibrl_mcore.parallel import ParallelConfig
    from calibrl_mcore.parallel.init import set_device_max_connections

    for cfg, expected in [(ParallelConfig(tensor_model_parallel_size=2), "1"),
                          (ParallelConfig(context_parallel_size=2), "1"), (ParallelConfig(), None)]:
        env: dict[str, str] = {}
        set_device_max_connections(cfg, env)
        assert env.get("CUDA_DEVICE_MAX_CONNECTIONS") == expected
    env = {"CUDA_DEVICE_MAX_CONNECTIONS": "8"}
    set_device_max_connections(ParallelConfig(tensor_model_parallel_size=2), env)
    assert env["CUDA_DEVICE_MAX_CONNECTIONS"] == "8"  # the user's choice stays
