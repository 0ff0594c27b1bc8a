"""InternVL3 on Megatron-Core vs. transformers (CPU, fp32, tiny random checkpoints from calibrl_mcore.make_tiny_model).

  * logits (text-only, one image, two images over a batch of 2) within 1e-4 and grads within 1e-4
    relative, with and without InternViT's QK-norm, and with an earlier `vision_feature_layer`;
  * pixel shuffle equals transformers';
  * the declarative HF<->Megatron map: bit-exact round trips (TP=1, offline TP=2 x PP=2 shards with tied
    embeddings and vocab padding), the on-disk (LLaVA-style) checkpoint names;
  * clear errors for bad inputs (TP not dividing heads, positions, placeholders, tile size, options);
  * torchrun layouts TP=2, PP=2, TP=2 x PP=2: logits, grads and the gathered export (weight-sync path).
The HF model builder and inputs come from tests/workers/internvl_parity_worker.py (shared with the
torchrun worker).
"""

from __future__ import annotations

import pytest
import torch

from tests.te_standin_env import te_env
from tests.torchrun_utils import run_torchrun
from tests.workers.internvl_parity_worker import (
    CASES,
    CHECKPOINTS,
    VARIANTS,
    grad_rel_err,
    hf_forward,
    hf_grads,
    load_hf_model,
    load_variant,
    make_case,
    masked_mean,
    position_ids_for,
)

TOL = 1e-4


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, object]:
    from calibrl_mcore.make_tiny_model import make_tiny_model

    root = tmp_path_factory.mktemp("internvl")
    return {
        variant: make_tiny_model("internvl", root / variant, seed=0, use_qk_norm=variant == "qk_norm")
        for variant in CHECKPOINTS
    }


@pytest.fixture(scope="module")
def processor(checkpoints):
    from calibrl_mcore.make_tiny_model import load_processor

    return load_processor(checkpoints["plain"])


@pytest.fixture(scope="module")
def hf_models(checkpoints):
    return {variant: load_variant(checkpoints, variant) for variant in VARIANTS}


def _megatron(hf_model):
    from model_providers import Placement, get_mapping, load_hf_weights
    from model_providers.internvl import build_internvl

    model = build_internvl(hf_model.config, spec="local")
    mapping = get_mapping("internvl", hf_model.config, model.backend)
    load_hf_weights(
        model, hf_model.state_dict().items(), mapping, Placement.from_parallel_state(model.config)
    )
    return model.eval()


@pytest.fixture(scope="module")
def megatron_models(megatron_world, hf_models):
    return {variant: _megatron(hf) for variant, hf in hf_models.items()}


def _mapping(hf_config):
    from model_providers import get_mapping
    from model_providers.internvl import build_internvl  # noqa: F401  (registers the "internvl" map)

    return get_mapping("internvl", hf_config, "local")


def _max_diff(model, hf_model, case) -> tuple[float, torch.Tensor]:
    with torch.no_grad():
        expected = hf_forward(hf_model, case)
        got = model(case["input_ids"], position_ids_for(case), None, pixel_values=case["pixel_values"])
    assert got.shape == expected.shape
    assert expected.std() > 0.1  # logits are not vanishingly small: the tolerance means something
    return (got - expected).abs().max().item(), expected


# ---- parity with transformers (TP = PP = 1) --------------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("case_name", CASES)
def test_logits_match_transformers(processor, hf_models, megatron_models, variant, case_name):
    case = make_case(processor, case_name)
    diff, expected = _max_diff(megatron_models[variant], hf_models[variant], case)
    print(f"TP1 {variant} {case_name}: max |dlogits| = {diff:.2e}")
    assert diff <= TOL
    if case["pixel_values"] is not None:  # the images really matter: the test would see them misplaced
        with torch.no_grad():
            text_only = hf_forward(hf_models[variant], case, with_images=False)
        assert (expected - text_only).abs().max() > 0.1


def test_positions_as_mrope_rows_and_feature_layer(megatron_world, checkpoints, processor, megatron_models):
    """[3, b, s] positions are read from row 0; vision_feature_layer=-2 stops the tower one layer early."""
    case = make_case(processor, "one_image")
    model = megatron_models["plain"]
    with torch.no_grad():
        flat = model(case["input_ids"], position_ids_for(case), None, pixel_values=case["pixel_values"])
        rows = position_ids_for(case).unsqueeze(0).expand(3, -1, -1)
        assert torch.equal(model(case["input_ids"], rows, None, pixel_values=case["pixel_values"]), flat)

    hf_model = load_hf_model(checkpoints["qk_norm"], seed=2, overrides={"vision_feature_layer": -2})
    diff, _ = _max_diff(_megatron(hf_model), hf_model, case)
    print(f"TP1 vision_feature_layer=-2: max |dlogits| = {diff:.2e}")
    assert diff <= TOL


@pytest.mark.parametrize("variant", VARIANTS)
def test_grads_match_transformers(processor, hf_models, megatron_models, variant):
    """Mean token cross-entropy over real tokens: same per-token loss, and every parameter's grad (mapped to Megatron layout by the
    same rules as the weights) within 1e-4 relative."""
    from model_providers import hf_to_megatron

    hf_model, model = hf_models[variant], megatron_models[variant]
    case = make_case(processor, "two_images")
    expected = hf_grads(hf_model, case)
    with torch.no_grad():
        hf_loss = torch.nn.functional.cross_entropy(
            hf_forward(hf_model, case).flatten(0, 1), case["labels"].flatten(), reduction="none"
        ).view_as(case["labels"])
    model.zero_grad(set_to_none=True)
    loss = model(
        case["input_ids"],
        position_ids_for(case),
        None,
        pixel_values=case["pixel_values"],
        labels=case["labels"],
    )  # [b, s]
    assert (loss.detach() - hf_loss).abs().max() <= TOL
    masked_mean(loss, case).backward()

    expected_megatron = hf_to_megatron(expected.items(), _mapping(hf_model.config))
    params = dict(model.named_parameters())
    assert expected_megatron.keys() == params.keys()
    errors = {name: grad_rel_err(params[name].grad, g) for name, g in expected_megatron.items()}
    print(
        f"TP1 {variant} grads: max relative error = {max(errors.values()):.2e} over {len(errors)} parameters"
    )
    assert max(errors.values()) <= TOL, {k: v for k, v in errors.items() if v > TOL}
    model.zero_grad(set_to_none=True)


def test_pixel_shuffle_matches_transformers():
    from transformers.models.internvl.modeling_internvl import InternVLModel

    from model_providers.internvl_vision import pixel_shuffle

    features = torch.randn(3, 4, 6, 8)  # [n, a, b, c]; a != b catches swapped axes
    expected = InternVLModel.pixel_shuffle(None, features, scale_factor=0.5)
    got = pixel_shuffle(features, 0.5)
    assert got.shape == (3, 2, 3, 32) and torch.equal(got, expected)


# ---- the HF <-> Megatron map -----------------------------------------------------------------------------


def _assert_bit_identical(exported: dict, hf_state: dict) -> None:
    assert exported.keys() == hf_state.keys()
    for name, tensor in exported.items():
        assert tensor.dtype == hf_state[name].dtype and torch.equal(tensor, hf_state[name]), name


@pytest.mark.parametrize("variant", VARIANTS)
def test_round_trip_is_bit_identical(hf_models, variant):
    from model_providers import hf_to_megatron, megatron_to_hf

    hf_state = hf_models[variant].state_dict()
    mapping = _mapping(hf_models[variant].config)
    megatron = hf_to_megatron(hf_state.items(), mapping)
    _assert_bit_identical(dict(megatron_to_hf([megatron], mapping)), hf_state)


@pytest.mark.parametrize("name", CHECKPOINTS)
def test_checkpoint_files_round_trip(checkpoints, hf_models, name):
    """The files on disk use LLaVA-style names (language_model.model.*, vision_tower.*): read and written."""
    from safetensors.torch import load_file

    from model_providers import hf_to_megatron, megatron_to_hf

    mapping = _mapping(hf_models[name].config)
    on_disk = load_file(checkpoints[name] / "model.safetensors")
    assert "language_model.lm_head.weight" in on_disk and "vision_tower.encoder.layer.0.lambda_1" in on_disk
    from_disk = hf_to_megatron(on_disk.items(), mapping)
    _assert_bit_identical(dict(megatron_to_hf([from_disk], mapping, checkpoint_names=True)), on_disk)


def _sharded_round_trip(hf_config, hf_state: dict, tp: int, pp: int) -> tuple[dict, list]:
    """Offline conversion into every (PP stage, TP rank) shard and back; returns (HF state, shards)."""
    from model_providers import Placement, hf_to_megatron, megatron_to_hf

    mapping = _mapping(hf_config)
    per_stage = hf_config.text_config.num_hidden_layers // pp
    exported, shards = {}, []
    for stage in range(pp):
        placements = [
            Placement(r, tp, stage * per_stage, (stage + 1) * per_stage, stage == 0, stage == pp - 1)
            for r in range(tp)
        ]
        stage_shards = [hf_to_megatron(hf_state.items(), mapping, p) for p in placements]
        shards.append(stage_shards)
        for name, tensor in megatron_to_hf(stage_shards, mapping, placements[0]):
            assert name not in exported, f"{name} exported by two stages"
            exported[name] = tensor
    return exported, shards


def test_sharded_round_trip_tp2_pp2(hf_models):
    hf_state = hf_models["qk_norm"].state_dict()
    exported, shards = _sharded_round_trip(hf_models["qk_norm"].config, hf_state, tp=2, pp=2)
    _assert_bit_identical(exported, hf_state)

    first, last = shards[0][1], shards[1][1]  # TP rank 1 of each stage
    assert not any(k.startswith(("vision_model.", "vision_projection.")) for k in last)
    # Vision QKV: 2 heads of 16, one per TP rank -> [q_1; k_1; v_1]; QK-norm weights split with the heads.
    tower = "model.vision_tower.encoder.layer.0.attention"
    qkv = first["vision_model.layers.0.self_attention.linear_qkv.weight"]
    assert torch.equal(qkv, torch.cat([hf_state[f"{tower}.{x}_proj.weight"][16:] for x in "qkv"]))
    assert torch.equal(
        first["vision_model.layers.0.self_attention.q_layernorm.weight"],
        hf_state[f"{tower}.q_norm.weight"][16:],
    )
    # Projector: linear_1 split on rows, linear_2 on columns, the 4*32-wide LayerNorm replicated.
    assert first["vision_projection.mlp.linear_fc1.weight"].shape == (32, 128)
    assert first["vision_projection.mlp.linear_fc2.weight"].shape == (64, 32)
    assert first["vision_projection.layer_norm.weight"].shape == (128,)
    # Decoder layers are stage-local in Megatron names.
    assert "language_model.decoder.layers.0.self_attention.linear_qkv.weight" in last


def test_tied_embeddings_and_vocab_padding_round_trip(checkpoints):
    """Tied, odd vocab (767 -> 768 at TP=2): the last stage's output layer is loaded from embed_tokens and
    not exported twice; the padded row is zero."""
    hf_model = load_variant(checkpoints, "tied")
    hf_state = hf_model.state_dict()
    hf_state.pop("lm_head.weight", None)  # safetensors of tied models omit it; an extra copy is ignored
    exported, shards = _sharded_round_trip(hf_model.config, hf_state, tp=2, pp=2)
    _assert_bit_identical(exported, hf_state)
    embed = hf_state["model.language_model.embed_tokens.weight"]
    output = torch.cat([s["language_model.output_layer.weight"] for s in shards[1]])
    assert output.shape == (768, 64) and torch.equal(output[:767], embed) and not output[767].any()
    single_stage, _ = _sharded_round_trip(hf_model.config, hf_state, tp=1, pp=1)
    _assert_bit_identical(single_stage, hf_state)


# ---- bad input ---------------------------------------------------------------------------------------------


def test_tp_not_dividing_heads_is_a_clear_error(hf_models):
    from model_providers.internvl import language_config
    from model_providers.internvl_vision import vision_configs

    config = hf_models["plain"].config  # vision: 2 heads; text: 4 heads, 2 KV heads
    with pytest.raises(
        ValueError, match=r"InternViT num_attention_heads=2 is not divisible by tensor parallel size 4"
    ):
        vision_configs(config, tp_size=4, params_dtype=torch.float32, backend="local")
    with pytest.raises(
        ValueError, match=r"num_attention_heads=4 / num_key_value_heads=2 not divisible by TP=3"
    ):
        language_config(config.text_config, tp_size=3, pp_size=1, params_dtype=torch.float32, backend="local")


def test_bad_inputs_are_clear_errors(processor, hf_models, megatron_models):
    from transformers import AutoConfig

    from model_providers.internvl_vision import check_supported

    model = megatron_models["plain"]
    case = make_case(processor, "one_image")
    ids, pixels, pos = case["input_ids"], case["pixel_values"], position_ids_for(case)
    with torch.no_grad():
        with pytest.raises(ValueError, match="positions 0..s-1"):
            model(ids, pos + 1, None, pixel_values=pixels)  # e.g. left padding
        with pytest.raises(ValueError, match="image placeholder tokens but"):
            model(ids, pos, None, pixel_values=pixels[:-1])  # one tile short
        with pytest.raises(ValueError, match="tiles are 28x28"):
            model(ids, pos, None, pixel_values=pixels[:, :, :28, :28])

    config = AutoConfig.for_model(
        "internvl", vision_feature_layer=[-1, -2], vision_feature_select_strategy="full"
    )
    with pytest.raises(NotImplementedError, match="vision_feature_select_strategy='full'"):
        check_supported(config)


def test_registry_builds_internvl(megatron_world, hf_models):
    from model_providers.internvl import InternVLModel
    from model_providers.registry import build_model, position_ids

    model = build_model(hf_models["plain"].config, spec="local")
    assert isinstance(model, InternVLModel) and model.vision_model is not None
    assert _mapping(hf_models["plain"].config).arch == "internvl"
    ids = torch.zeros(2, 5, dtype=torch.long)
    assert torch.equal(position_ids(hf_models["plain"].config, ids), torch.arange(5).expand(2, 5))


# ---- torchrun layouts ------------------------------------------------------------------------------------


@pytest.mark.distributed
@pytest.mark.parametrize(
    "tp,pp,cp", [(2, 1, 1), (1, 2, 1), (2, 2, 1), (2, 1, 2)], ids=["tp2_te", "pp2", "tp2xpp2", "tp2xcp2"]
)
def test_parallel_layouts_match_transformers(tmp_path, checkpoints, hf_models, tp, pp, cp):
    """Context parallelism (plain RoPE here, M-RoPE in the Qwen tests) runs on the sdpa spec; TP=2 alone runs
    Megatron's TE spec on the TE stand-ins (tests/te_standin): the InternVL HF<->TE mapping end to end."""
    ckpt_args = [arg for name, path in checkpoints.items() for arg in ("--ckpt", f"{name}={path}")]
    spec = "sdpa" if cp > 1 else "te" if (tp, pp) == (2, 1) else "local"
    results = run_torchrun(
        "internvl_parity_worker.py", tp * pp * cp, tmp_path,
        "--tp", str(tp), "--pp", str(pp), "--cp", str(cp), "--spec", spec, *ckpt_args,
        extra_env=te_env() if spec == "te" else None,
    )  # fmt: skip
    assert {r["backend"] for r in results} == {spec}
    if spec == "te":
        assert {"TELayerNormColumnParallelLinear", "TERowParallelLinear", "TEDotProductAttention"} <= set(
            results[0]["te_classes"])
    assert len(results) == tp * pp * cp
    last = [r for r in results if r["pp_rank"] == pp - 1]
    expected_keys = {f"{v}/{c}" for v in VARIANTS for c in CASES} | {"tied/text", "tied/one_image"}
    for r in last:
        assert set(r["logits_max_abs_diff"]) == expected_keys
        assert max(r["logits_max_abs_diff"].values()) <= TOL, r["logits_max_abs_diff"]
    for variant in VARIANTS:
        grad_errors = {name: err for r in results for name, err in r["grad_rel_err"][variant].items()}
        exported = {name for r in results for name in r["exported"][variant]}
        assert exported == set(hf_models[variant].state_dict()) == grad_errors.keys()
        assert max(grad_errors.values()) <= TOL, {k: v for k, v in grad_errors.items() if v > TOL}
        print(f"TP{tp} PP{pp} CP{cp} {variant}: max grad rel err {max(grad_errors.values()):.2e}")
    assert not any(r["export_mismatch"] for r in results)
    for r in results:
        if r["pp_rank"] == 0:  # the tower's stage: distributed checkpoints split it over TP like the map
            for variant in VARIANTS:
                checked, errors = r["checkpoint_sharding"][variant]
                assert checked >= 30 and not errors, errors
    print(f"TP{tp} PP{pp} CP{cp}: max |dlogits| {last[0]['logits_max_abs_diff']}")
