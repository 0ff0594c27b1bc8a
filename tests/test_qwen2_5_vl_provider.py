"""Qwen2.5-VL on Megatron-Core vs. transformers (CPU, fp32, tiny random model).

  * `get_rope_index` equals transformers' (images, video, padding left/right, text-only);
  * logits (text-only, one image, two images over a batch of 2) within 1e-4, grads within 1e-4 relative;
  * the declarative HF<->Megatron map: bit-exact round trips (TP=1, and offline TP=2 x PP=2 shards with
    vocab / vision-MLP padding), streaming input in any order, hub checkpoint names, TE-spec names;
  * torchrun layouts TP=2, PP=2, TP=2 x PP=2: logits, grads and the gathered export (weight-sync path).
The tiny config, HF model and inputs come from tests/workers/qwen_vl_parity_worker.py (shared with the
torchrun worker).
"""

from __future__ import annotations

import random

import pytest
import torch

from tests.te_standin_env import te_env
from tests.torchrun_utils import run_torchrun
from tests.workers.qwen_vl_parity_worker import (
    CASES,
    IMAGE,
    VIDEO,
    VISION_START,
    hf_forward,
    hf_grads,
    make_case,
    make_hf_model,
    position_ids_for,
    tiny_qwen_config,
)

TOL = 1e-4


@pytest.fixture(scope="module")
def hf_config():
    return tiny_qwen_config()


@pytest.fixture(scope="module")
def hf_model(hf_config):
    return make_hf_model(hf_config)


@pytest.fixture(scope="module")
def megatron_model(megatron_world, hf_config, hf_model):
    from model_providers import Placement, build_qwen2_5_vl, get_mapping, load_hf_weights

    model = build_qwen2_5_vl(hf_config, spec="local")
    mapping = get_mapping("qwen2_5_vl", hf_config, model.backend)
    load_hf_weights(
        model, hf_model.state_dict().items(), mapping, Placement.from_parallel_state(model.config)
    )
    return model.eval()


@pytest.fixture(scope="module")
def mapping(hf_config):
    from model_providers import get_mapping

    return get_mapping("qwen2_5_vl", hf_config, "local")


# ---- M-RoPE index ----------------------------------------------------------------------------------------


def _vision(n: int, token: int = IMAGE) -> list[int]:
    return [VISION_START] + [token] * n + [VISION_START + 1]


@pytest.mark.parametrize("padding", ["none", "right", "left", "text_only", "video"])
def test_get_rope_index_matches_transformers(hf_config, hf_model, padding):
    from model_providers.rope import get_rope_index

    grids = torch.tensor([[1, 6, 8], [1, 2, 2], [1, 8, 4]])  # 12, 1, 8 merged tokens
    rows = [[5, 6] + _vision(12) + [7, 8, 9] + _vision(1) + [4], [3] + _vision(8) + [9] * 6]
    video_grid, seconds = None, None
    if padding == "text_only":
        rows, grids = [[5] * 9, [6] * 9], None
    if padding == "video":
        rows = [[5, 6] + _vision(8, VIDEO) + [7, 8] + _vision(1) + [4]]
        grids, video_grid, seconds = torch.tensor([[1, 2, 2]]), torch.tensor([[2, 4, 4]]), torch.tensor([0.5])
    length = max(map(len, rows))
    pad = [length - len(r) for r in rows]
    if padding == "left":
        ids = [[0] * p + r for p, r in zip(pad, rows)]
        mask = [[0] * p + [1] * len(r) for p, r in zip(pad, rows)]
    else:
        ids = [r + [0] * p for p, r in zip(pad, rows)]
        mask = [[1] * len(r) + [0] * p for p, r in zip(pad, rows)]
    ids, mask = torch.tensor(ids), torch.tensor(mask)
    mask = None if padding in ("none", "text_only", "video") else mask

    types = (ids == IMAGE).int() + 2 * (ids == VIDEO).int()
    expected = hf_model.model.get_rope_index(
        ids, mm_token_type_ids=types, image_grid_thw=grids, video_grid_thw=video_grid,
        second_per_grid_ts=seconds, attention_mask=mask,
    )  # fmt: skip
    got = get_rope_index(
        ids, grids, mask,
        spatial_merge_size=2, image_token_id=IMAGE, vision_start_token_id=VISION_START,
        video_grid_thw=video_grid, video_token_id=VIDEO, second_per_grid_ts=seconds,
        tokens_per_second=hf_config.vision_config.tokens_per_second,
    )  # fmt: skip
    assert torch.equal(got[0], expected[0])
    assert torch.equal(got[1], expected[1])


def test_get_rope_index_rejects_mismatched_grids():
    from model_providers.rope import get_rope_index

    ids = torch.tensor([[1] + _vision(4) + [2]])
    with pytest.raises(ValueError, match="does not match grid"):
        get_rope_index(ids, torch.tensor([[1, 2, 2]]), spatial_merge_size=2, image_token_id=IMAGE)
    with pytest.raises(ValueError, match="no placeholder"):
        get_rope_index(ids, torch.tensor([[1, 4, 4], [1, 2, 2]]), spatial_merge_size=2, image_token_id=IMAGE)


# ---- parity with transformers (TP = PP = 1) --------------------------------------------------------------


@pytest.mark.parametrize("case_name", CASES)
def test_logits_match_transformers(hf_config, hf_model, megatron_model, case_name):
    case = make_case(case_name)
    with torch.no_grad():
        expected = hf_forward(hf_model, case)
        got = megatron_model(
            case["input_ids"],
            position_ids_for(case, hf_config),
            None,
            pixel_values=case["pixel_values"],
            image_grid_thw=case["image_grid_thw"],
        )
    assert got.shape == expected.shape
    assert expected.std() > 0.1  # logits are not vanishingly small: the tolerance means something
    diff = (got - expected).abs().max().item()
    print(f"TP1 {case_name}: max |dlogits| = {diff:.2e}")
    assert diff <= TOL


def test_grads_match_transformers(hf_config, hf_model, megatron_model, mapping):
    """Mean token cross-entropy: same loss, and every parameter's grad (mapped to Megatron layout by the
    same rules as the weights) within 1e-4 relative."""
    from model_providers import hf_to_megatron

    case = make_case("two_images")
    expected = hf_grads(hf_model, case)
    with torch.no_grad():
        hf_loss = torch.nn.functional.cross_entropy(
            hf_forward(hf_model, case).flatten(0, 1), case["labels"].flatten(), reduction="none"
        ).view_as(case["labels"])
    megatron_model.zero_grad(set_to_none=True)
    loss = megatron_model(
        case["input_ids"],
        position_ids_for(case, hf_config),
        None,
        pixel_values=case["pixel_values"],
        image_grid_thw=case["image_grid_thw"],
        labels=case["labels"],
    )  # [b, s]
    assert (loss.detach() - hf_loss).abs().max() <= TOL
    loss.mean().backward()

    expected_megatron = hf_to_megatron(expected.items(), mapping)
    params = dict(megatron_model.named_parameters())
    assert expected_megatron.keys() == params.keys()
    errors = {
        name: ((params[name].grad - g).norm() / g.norm()).item() for name, g in expected_megatron.items()
    }
    print(f"TP1 grads: max relative error = {max(errors.values()):.2e} over {len(errors)} parameters")
    assert max(errors.values()) <= TOL, {k: v for k, v in errors.items() if v > TOL}
    megatron_model.zero_grad(set_to_none=True)


# ---- the HF <-> Megatron map -----------------------------------------------------------------------------


def _assert_bit_identical(exported: dict, hf_state: dict) -> None:
    assert exported.keys() == hf_state.keys()
    for name, tensor in exported.items():
        assert tensor.dtype == hf_state[name].dtype and torch.equal(tensor, hf_state[name]), name


def test_round_trip_is_bit_identical(hf_model, mapping):
    from model_providers import hf_to_megatron, megatron_to_hf

    hf_state = hf_model.state_dict()
    megatron = hf_to_megatron(hf_state.items(), mapping)
    _assert_bit_identical(dict(megatron_to_hf([megatron], mapping)), hf_state)

    # Hub checkpoints use older names (model.layers.*, visual.*): both directions understand them.
    on_disk = dict(megatron_to_hf([megatron], mapping, checkpoint_names=True))
    assert "visual.blocks.0.attn.qkv.weight" in on_disk and "model.layers.0.mlp.up_proj.weight" in on_disk
    again = hf_to_megatron(on_disk.items(), mapping)
    assert again.keys() == megatron.keys() and all(torch.equal(again[k], megatron[k]) for k in megatron)


def _sharded_round_trip(hf_config, hf_state: dict, tp: int, pp: int) -> tuple[dict, list]:
    """Offline conversion into every (PP stage, TP rank) shard and back; returns (HF state, shards)."""
    from model_providers import Placement, get_mapping, hf_to_megatron, megatron_to_hf

    mapping = get_mapping("qwen2_5_vl", hf_config)
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


def test_sharded_round_trip_tp2_pp2(hf_config, hf_model):
    hf_state = hf_model.state_dict()
    exported, shards = _sharded_round_trip(hf_config, hf_state, tp=2, pp=2)
    _assert_bit_identical(exported, hf_state)

    first, last = shards[0][1], shards[1][1]  # TP rank 1 of each stage
    # Vocab 511 is padded to 512: rank 1 holds rows 256..510 plus one zero row.
    emb = first["language_model.embedding.word_embeddings.weight"]
    assert emb.shape == (256, 64) and torch.equal(emb[-1], torch.zeros(64))
    assert last["language_model.output_layer.weight"].shape == (256, 64)
    # Vision MLP 45 -> 46: fc1 = [gate_r; up_r] with 23 rows each, fc2 split on its input axis.
    assert first["vision_model.decoder.layers.0.mlp.linear_fc1.weight"].shape == (46, 32)
    assert first["vision_model.decoder.layers.0.mlp.linear_fc2.weight"].shape == (32, 23)
    # Decoder layers are stage-local in Megatron names; the vision tower is on the first stage only.
    assert "language_model.decoder.layers.0.self_attention.linear_qkv.weight" in last
    assert not any(k.startswith("vision_model.") for k in last)
    # GQA interleave: per query group [2 q heads; k; v] x head_dim 16; one group per TP rank.
    q = hf_state["model.language_model.layers.1.self_attn.q_proj.weight"]
    k = hf_state["model.language_model.layers.1.self_attn.k_proj.weight"]
    qkv = last["language_model.decoder.layers.0.self_attention.linear_qkv.weight"]
    assert torch.equal(qkv, torch.cat([q[32:64], k[16:32], hf_state[
        "model.language_model.layers.1.self_attn.v_proj.weight"][16:32]]))  # fmt: skip


def test_tied_embeddings_round_trip():
    """Tied: the last stage's output layer is loaded from embed_tokens and not exported twice."""
    config = tiny_qwen_config(tie_word_embeddings=True)
    hf_state = make_hf_model(config, seed=1).state_dict()
    hf_state.pop("lm_head.weight", None)  # safetensors of tied models omit it; an extra copy is ignored
    exported, shards = _sharded_round_trip(config, hf_state, tp=2, pp=2)
    _assert_bit_identical(exported, hf_state)
    assert torch.equal(
        torch.cat([s["language_model.output_layer.weight"] for s in shards[1]])[:511],
        hf_state["model.language_model.embed_tokens.weight"],
    )
    single_stage, _ = _sharded_round_trip(config, hf_state, tp=1, pp=1)
    _assert_bit_identical(single_stage, hf_state)


def test_streaming_any_order_and_errors(hf_model, mapping):
    from model_providers import hf_to_megatron

    hf_state = hf_model.state_dict()
    reference = hf_to_megatron(hf_state.items(), mapping)
    items = list(hf_state.items())
    random.Random(0).shuffle(items)
    streamed = hf_to_megatron((pair for pair in items), mapping)  # a one-pass generator
    assert streamed.keys() == reference.keys() and all(
        torch.equal(streamed[k], reference[k]) for k in reference
    )

    with pytest.raises(KeyError, match="no rule"):
        hf_to_megatron([("model.language_model.layers.0.self_attn.rotary.weight", torch.zeros(1))], mapping)
    partial = [(k, v) for k, v in hf_state.items() if not k.endswith("k_proj.weight")]
    with pytest.raises(ValueError, match="incomplete fused"):
        hf_to_megatron(partial, mapping)


def test_backend_choice_and_te_names(hf_config):
    from model_providers import get_mapping
    from model_providers.specs import resolve_backend

    assert resolve_backend("local") == "local"
    if not torch.cuda.is_available():
        assert resolve_backend("auto") == "local"
        with pytest.raises(RuntimeError, match="CUDA|Transformer Engine"):
            resolve_backend("te")
    te_names = {r.megatron for r in get_mapping("qwen2_5_vl", hf_config, "te").rules}
    assert "language_model.decoder.layers.{layer}.self_attention.linear_qkv.layer_norm_weight" in te_names
    assert "vision_model.decoder.layers.{layer}.mlp.linear_fc1.layer_norm_weight" in te_names
    assert not any("input_layernorm" in n or "pre_mlp_layernorm" in n for n in te_names)
    with pytest.raises(KeyError, match="no HF<->Megatron mapping"):
        get_mapping("not_an_arch", hf_config)


def test_sequence_and_context_parallel_need_te_or_sdpa(megatron_world, hf_config):
    from model_providers import build_qwen2_5_vl
    from model_providers.vlm_base import qwen2_language_config

    with pytest.raises(ValueError, match="sequence_parallel needs the 'te' or 'sdpa' spec"):
        build_qwen2_5_vl(hf_config, spec="local", sequence_parallel=True)
    with pytest.raises(ValueError, match="context_parallel_size=2 needs the 'sdpa' or 'te' spec"):
        qwen2_language_config(hf_config.text_config, rope="mrope", name="Qwen2.5-VL", tp_size=1, pp_size=1,
                              params_dtype=torch.float32, backend="local", cp_size=2)


# ---- torchrun layouts ------------------------------------------------------------------------------------


@pytest.mark.distributed
@pytest.mark.parametrize(
    "tp,pp,cp,sp",
    [(2, 1, 1, False), (1, 2, 1, False), (2, 2, 1, False), (1, 1, 2, False), (2, 1, 1, True), (2, 1, 2, True),
     (1, 2, 2, False)],
    ids=["tp2", "pp2", "tp2xpp2", "cp2", "tp2_sp", "tp2xcp2_sp_te", "pp2xcp2"],
)
def test_parallel_layouts_match_transformers(tmp_path, hf_model, tp, pp, cp, sp):
    """Context and sequence parallelism run on the sdpa spec (Megatron's local attention has no CP, its
    torch norms refuse SP); TP x CP x SP runs Megatron's TE spec (TE stand-ins on CPU, tests/te_standin:
    TELayerNormColumnParallelLinear, TEDotProductAttention with CP, ...), so the HF<->TE mapping, TE's SP
    and CP wiring are checked against transformers too."""
    spec = "te" if (cp > 1 and sp) else "sdpa" if cp > 1 or sp else "local"
    results = run_torchrun(
        "qwen_vl_parity_worker.py", tp * pp * cp, tmp_path,
        "--tp", str(tp), "--pp", str(pp), "--cp", str(cp), "--spec", spec, *(["--sp"] if sp else []),
        extra_env=te_env() if spec == "te" else None,
    )  # fmt: skip
    assert len(results) == tp * pp * cp
    assert {r["backend"] for r in results} == {spec}
    if spec == "te":  # Megatron's own TE wrappers were built, not a fallback
        assert {"TELayerNormColumnParallelLinear", "TERowParallelLinear", "TEDotProductAttention"} <= set(
            results[0]["te_classes"])
    last = [r for r in results if r["pp_rank"] == pp - 1]
    for r in last:
        assert set(r["logits_max_abs_diff"]) == {*CASES, "text_tied"}
        assert max(r["logits_max_abs_diff"].values()) <= TOL, r["logits_max_abs_diff"]
    grad_errors = {name: err for r in results for name, err in r["grad_rel_err"].items()}
    exported = {name for r in results for name in r["exported"]}
    assert exported == set(hf_model.state_dict()) == grad_errors.keys()
    assert max(grad_errors.values()) <= TOL
    assert not any(r["export_mismatch"] for r in results)
    print(
        f"TP{tp} PP{pp} CP{cp} SP={sp}: max |dlogits| {last[0]['logits_max_abs_diff']}, "
        f"max grad rel err {max(grad_errors.values()):.2e}"
    )
