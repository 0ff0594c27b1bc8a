"""The 'sdpa' backend (Megatron's local spec with core attention through torch SDPA), CPU.

* `SDPACoreAttention` vs Megatron's `DotProductAttention` on random q/k/v, fp32: causal, block-diagonal
  `arbitrary` windows, padding, GQA (np=4, ng=2) with and without a mask, chunked causal (sq < sk),
  config.softmax_scale: outputs and q/k/v grads within 1e-5;
* dropout only in training; all-masked query rows give zeros, not NaN;
* specs: 'sdpa' has local's parameter names, `resolve_backend` choices;
* a tiny Qwen2.5-VL checkpoint (calibrl_mcore.make_tiny_model) built with spec="sdpa" gives the logits of the
  spec="local" model within 1e-4 (text-only and with images: window + full vision attention), and in bf16
  stays within bf16 tolerance of fp32.
"""

from __future__ import annotations

import warnings
from unittest import mock

import pytest
import torch

ATTN_TOL = 1e-5
LOGITS_TOL = 1e-4


# ---- core attention vs Megatron's DotProductAttention ----------------------------------------------------


def _attention_config(heads: int, groups: int, head_dim: int, **overrides):
    from megatron.core.transformer.transformer_config import TransformerConfig

    from model_providers.specs import backend_config_kwargs

    kwargs = backend_config_kwargs("local", torch.float32) | overrides
    return TransformerConfig(
        num_layers=1,
        hidden_size=heads * head_dim,
        num_attention_heads=heads,
        num_query_groups=groups,
        kv_channels=head_dim,
        **kwargs,
    )


def _pair(config, mask_type, softmax_scale=None):
    """(Megatron's local core attention, ours), built the way `Attention` builds its slot."""
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    from model_providers.sdpa_attention import SDPACoreAttention

    kwargs = dict(
        config=config, layer_number=1, attn_mask_type=mask_type, attention_type="self",
        cp_comm_type=None, softmax_scale=softmax_scale, pg_collection=None,
    )  # fmt: skip
    return DotProductAttention(**kwargs), SDPACoreAttention(**kwargs)


def _qkv(sq: int, sk: int, b: int, heads: int, groups: int, head_dim: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    # Scores of O(1-3): softmax far from uniform, so a wrong mask or scale shows.
    q = (2.0 * torch.randn(sq, b, heads, head_dim, generator=gen)).requires_grad_()  # [sq, b, np, hn]
    k = (2.0 * torch.randn(sk, b, groups, head_dim, generator=gen)).requires_grad_()  # [sk, b, ng, hn]
    v = torch.randn(sk, b, groups, head_dim, generator=gen).requires_grad_()  # [sk, b, ng, hn]
    return q, k, v


def _run(module, q, k, v, mask, upstream):
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out = module(q, k, v, mask)  # [sq, b, np * hn]
    (out * upstream).sum().backward()
    return out.detach(), q.grad, k.grad, v.grad


def _window_mask(s: int) -> torch.Tensor:
    from model_providers.qwen2_5_vl_vision import block_diagonal_mask

    return block_diagonal_mask(torch.tensor([5, 3, 8, s - 16]), torch.device("cpu"))  # [1, 1, s, s]


def _padding_mask(b: int, s: int) -> torch.Tensor:
    lengths = torch.tensor([s, s - 5, s - 9])[:b]
    return (torch.arange(s) >= lengths[:, None]).view(b, 1, 1, s)  # [b, 1, 1, sk], True = padding key


CASES = {
    # name: (mask type, np, ng, sq, sk, Megatron mask builder(b, sq, sk) or None)
    "causal": ("causal", 4, 4, 24, 24, None),
    "causal_gqa": ("causal", 4, 2, 24, 24, None),
    "arbitrary_windows": ("arbitrary", 4, 4, 24, 24, lambda b, sq, sk: _window_mask(sk)),
    "arbitrary_windows_gqa": ("arbitrary", 4, 2, 24, 24, lambda b, sq, sk: _window_mask(sk)),
    "padding_gqa": ("padding", 4, 2, 24, 24, lambda b, sq, sk: _padding_mask(b, sk)),
    "no_mask": ("no_mask", 4, 1, 24, 24, None),
}


@pytest.mark.parametrize("case", CASES)
def test_core_attention_matches_local(megatron_world, case):
    from megatron.core.transformer.enums import AttnMaskType

    mask_type, heads, groups, sq, sk, make_mask = CASES[case]
    b, head_dim = 3, 16
    local, sdpa = _pair(_attention_config(heads, groups, head_dim), AttnMaskType[mask_type])
    q, k, v = _qkv(sq, sk, b, heads, groups, head_dim)
    mask = make_mask(b, sq, sk) if make_mask else None
    upstream = torch.randn(sq, b, heads * head_dim, generator=torch.Generator().manual_seed(1))

    expected, got = _run(local, q, k, v, mask, upstream), _run(sdpa, q, k, v, mask, upstream)
    assert got[0].shape == (sq, b, heads * head_dim)
    diffs = [(g - e).abs().max().item() for g, e in zip(got, expected)]
    print(f"{case}: max |d out|, |d dq|, |d dk|, |d dv| = " + ", ".join(f"{d:.1e}" for d in diffs))
    assert max(diffs) <= ATTN_TOL, diffs


def test_chunked_causal_and_softmax_scale(megatron_world):
    """sq < sk with no mask (chunked prefill against a cache) is bottom-right causal; sq == 1 sees all keys;
    config.softmax_scale is honoured. The local spec needs an explicit mask for the former."""
    from megatron.core.transformer.enums import AttnMaskType

    heads, groups, head_dim, b, sk = 4, 2, 16, 2, 20
    local, sdpa = _pair(_attention_config(heads, groups, head_dim), AttnMaskType.causal, softmax_scale=0.2)
    upstream = torch.randn(sk, b, heads * head_dim, generator=torch.Generator().manual_seed(1))
    for sq in (7, 1):
        q, k, v = _qkv(sq, sk, b, heads, groups, head_dim, seed=sq)
        bottom_right = ~torch.ones(sq, sk, dtype=torch.bool).tril(diagonal=sk - sq)  # True = masked
        expected = _run(local, q, k, v, bottom_right.view(1, 1, sq, sk), upstream[:sq])
        got = _run(sdpa, q, k, v, None, upstream[:sq])
        diffs = [(g - e).abs().max().item() for g, e in zip(got, expected)]
        print(
            f"causal sq={sq} sk={sk}: max |d out|, |d dq|, |d dk|, |d dv| = "
            + ", ".join(f"{d:.1e}" for d in diffs)
        )
        assert max(diffs) <= ATTN_TOL, (sq, diffs)


def test_tensor_parallel_shard_equals_slice_of_full(megatron_world):
    """Under TP=2 a rank holds np/2 query heads and ng/2 groups (per-partition counts, as the local spec):
    its output equals the matching slice of the TP=1 output."""
    from types import SimpleNamespace

    from megatron.core.transformer.enums import AttnMaskType

    from model_providers.sdpa_attention import SDPACoreAttention

    heads, groups, head_dim, b, s, tp = 4, 2, 16, 2, 16, 2
    config = _attention_config(heads, groups, head_dim)
    full = _pair(config, AttnMaskType.causal)[1]
    shard = SDPACoreAttention(
        config=config, layer_number=1, attn_mask_type=AttnMaskType.causal, attention_type="self",
        pg_collection=SimpleNamespace(tp=SimpleNamespace(size=lambda: tp)),
    )  # fmt: skip
    assert (shard.num_heads, shard.num_groups) == (heads // tp, groups // tp)
    q, k, v = _qkv(s, s, b, heads, groups, head_dim)
    with torch.no_grad():
        expected = full(q, k, v, None).view(s, b, heads, head_dim)
        for rank in range(tp):
            hq, hk = slice(rank * heads // tp, (rank + 1) * heads // tp), slice(rank, rank + 1)
            got = shard(q[:, :, hq], k[:, :, hk], v[:, :, hk], None)  # [s, b, np/tp * hn]
            assert (got.view(s, b, -1, head_dim) - expected[:, :, hq]).abs().max() <= ATTN_TOL
        with pytest.raises(ValueError, match="query / 1 K/V heads per rank"):
            shard(q, k, v, None)


def test_dropout_in_training_only_and_fully_masked_rows(megatron_world):
    from megatron.core.transformer.enums import AttnMaskType

    heads, head_dim, b, s = 4, 16, 2, 12
    config = _attention_config(heads, heads, head_dim, attention_dropout=0.5)
    local, sdpa = _pair(config, AttnMaskType.causal)
    q, k, v = _qkv(s, s, b, heads, heads, head_dim)
    with torch.no_grad():
        reference = local.eval()(q, k, v, None)
        assert torch.allclose(sdpa.eval()(q, k, v, None), reference, atol=ATTN_TOL)  # eval: no dropout
        dropped = sdpa.train()(q, k, v, None)
        assert dropped.isfinite().all() and (dropped - reference).abs().max() > 0.1

        # A query row with every key masked: zeros from SDPA (the local spec gives the mean of V).
        mask = torch.zeros(1, 1, s, s, dtype=torch.bool)
        mask[..., 0, :] = True
        out = sdpa.eval()(q, k, v, mask)
        assert out.isfinite().all() and out[0].abs().max() == 0


def test_rejects_non_bool_mask(megatron_world):
    from megatron.core.transformer.enums import AttnMaskType

    _, sdpa = _pair(_attention_config(2, 2, 8), AttnMaskType.arbitrary)
    q, k, v = _qkv(4, 4, 1, 2, 2, 8)
    with pytest.raises(TypeError, match="must be bool"):
        sdpa(q, k, v, torch.zeros(1, 1, 4, 4))


# ---- specs ---------------------------------------------------------------------------------------------


def test_resolve_backend_and_names():
    from model_providers.specs import NORM_PARAM_NAMES, resolve_backend

    assert NORM_PARAM_NAMES["sdpa"] == NORM_PARAM_NAMES["local"]
    assert resolve_backend("sdpa") == "sdpa"
    assert resolve_backend("local") == "local"
    with mock.patch("torch.cuda.is_available", return_value=False):
        assert resolve_backend("auto") == "local"
    with (
        mock.patch("torch.cuda.is_available", return_value=True),
        mock.patch("model_providers.specs.te_available", return_value=False),
    ):
        assert resolve_backend("auto") == "sdpa"
    with pytest.raises(ValueError, match="'sdpa'"):
        resolve_backend("flash")


# ---- a full tiny Qwen2.5-VL: sdpa vs local -------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """(HF config, HF tensors) of a calibrl_mcore.make_tiny_model checkpoint. Its init (std 0.02, unit norms) gives
    near-uniform attention, under which a wrong mask hides: matrices are scaled x2.5 and norm scales
    jittered (deterministically), as in the transformers parity tests."""
    from safetensors.torch import load_file
    from transformers import AutoConfig

    from calibrl_mcore.make_tiny_model import make_tiny_model

    path = make_tiny_model("qwen2_5_vl", tmp_path_factory.mktemp("tiny_qwen_sdpa"))
    tensors = load_file(str(path / "model.safetensors"))
    gen = torch.Generator().manual_seed(0)
    for name, t in tensors.items():
        if "norm" in name or "ln_q" in name:
            tensors[name] = t + 0.1 * torch.randn(t.shape, generator=gen)
        else:
            tensors[name] = 2.5 * t
    return AutoConfig.from_pretrained(path), tensors


def _build(hf_config, tensors, spec: str, dtype: torch.dtype = torch.float32):
    from model_providers.hf_mapping import Placement, get_mapping, load_hf_weights
    from model_providers.registry import build_model

    model = build_model(hf_config, spec=spec, params_dtype=dtype)
    assert model.backend == spec
    mapping = get_mapping("qwen2_5_vl", hf_config, model.backend)
    load_hf_weights(model, iter(tensors.items()), mapping, Placement.from_parallel_state(model.config))
    return model.eval()


@pytest.fixture(scope="module")
def models(megatron_world, tiny_checkpoint):
    hf_config, tensors = tiny_checkpoint
    return {spec: _build(hf_config, tensors, spec) for spec in ("local", "sdpa")}


def _inputs(hf_config, with_images: bool, seed: int = 0) -> dict:
    """input_ids [2, s], position ids [3, 2, s] (M-RoPE) and, with images, pixel_values / image_grid_thw:
    a 112x112 image (16 tokens, 4 windows) in row 0 and a 56x84 one (6 tokens) in row 1."""
    from PIL import Image

    from model_providers.registry import position_ids
    from tests.workers.qwen_vl_parity_worker import image_processor

    gen = torch.Generator().manual_seed(seed)

    def image(height: int, width: int) -> Image.Image:
        pixels = torch.randint(0, 256, (height, width, 3), generator=gen, dtype=torch.uint8)
        return Image.fromarray(pixels.numpy())

    def text(n: int) -> list[int]:
        return torch.randint(0, 600, (n,), generator=gen).tolist()  # below the special tokens

    if not with_images:
        ids = torch.tensor([text(20), text(20)])
        return {"input_ids": ids, "position_ids": position_ids(hf_config, ids)}
    out = image_processor()(images=[image(112, 112), image(56, 84)], return_tensors="pt")
    grid = out["image_grid_thw"]
    tokens = (grid.prod(-1) // hf_config.vision_config.spatial_merge_size**2).tolist()

    def vision(i: int) -> list[int]:
        image = [hf_config.image_token_id] * tokens[i]
        return [hf_config.vision_start_token_id, *image, hf_config.vision_end_token_id]

    row0 = text(3) + vision(0) + text(4)
    row1 = text(5) + vision(1)
    ids = torch.tensor([row0, row1 + text(len(row0) - len(row1))])
    return {
        "input_ids": ids,
        "position_ids": position_ids(hf_config, ids, grid),
        "pixel_values": out["pixel_values"],
        "image_grid_thw": grid,
    }


def _logits(model, inputs: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(
            inputs["input_ids"],
            inputs["position_ids"],
            None,
            pixel_values=inputs.get("pixel_values"),
            image_grid_thw=inputs.get("image_grid_thw"),
        )  # [b, s, V]


@pytest.mark.parametrize("with_images", [False, True], ids=["text", "images"])
def test_qwen2_5_vl_sdpa_matches_local(tiny_checkpoint, models, with_images):
    hf_config, _ = tiny_checkpoint
    assert models["sdpa"].state_dict().keys() == models["local"].state_dict().keys()
    inputs = _inputs(hf_config, with_images)
    expected, got = _logits(models["local"], inputs), _logits(models["sdpa"], inputs)
    assert got.shape == expected.shape == (*inputs["input_ids"].shape, hf_config.text_config.vocab_size)
    assert expected.std() > 0.3  # logits are not vanishingly small: the tolerance means something
    diff = (got - expected).abs().max().item()
    print(f"sdpa vs local ({'images' if with_images else 'text'}): max |dlogits| = {diff:.2e}")
    assert diff <= LOGITS_TOL


def test_qwen2_5_vl_sdpa_bf16(tiny_checkpoint, models):
    """bf16 parameters and activations: finite, and within bf16 rounding of the fp32 logits."""
    hf_config, tensors = tiny_checkpoint
    model = _build(hf_config, tensors, "sdpa", torch.bfloat16)
    norms = {n: p.dtype for n, p in model.named_parameters() if "norm" in n or "ln_q" in n}
    assert norms and set(norms.values()) == {torch.bfloat16}, norms  # else torch's fused norm is skipped
    inputs = _inputs(hf_config, with_images=True)
    reference = _logits(models["sdpa"], inputs)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*Cannot dispatch to fused implementation")
        got = _logits(model, inputs)  # fp32 pixel_values, as the trainer passes them
    assert got.dtype == torch.bfloat16 and got.isfinite().all()
    diff = (got.float() - reference).abs()
    relative = (diff.norm() / reference.norm()).item()
    print(
        f"bf16 vs fp32: max |dlogits| = {diff.max():.2e} (|logits| max {reference.abs().max():.2f}), "
        f"relative L2 = {relative:.2e}"
    )
    assert relative <= 0.03
    # The predicted tokens agree wherever fp32's top-2 margin is clearly above bf16 noise.
    top2 = reference.topk(2, dim=-1).values
    confident = (top2[..., 0] - top2[..., 1]) > 0.1
    assert confident.any()
    assert torch.equal(got.float().argmax(-1)[confident], reference.argmax(-1)[confident])


def test_compiled_decoder_layers_equal_eager_without_graph_breaks(megatron_world, tiny_checkpoint, models):
    """model.compile: each decoder layer through torch.compile computes the eager logits and grads; the layers
    share one graph (no graph breaks, no per-layer recompiles), and a second sequence length compiles one
    dynamic graph that later lengths reuse."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    from model_providers.vlm_base import compile_decoder_layers

    hf_config, tensors = tiny_checkpoint
    compiled = _build(hf_config, tensors, "sdpa")
    compile_decoder_layers(compiled)
    assert compiled.state_dict().keys() == models["sdpa"].state_dict().keys()
    torch._dynamo.reset()
    counters.clear()
    for length in (20, 14, 9):
        inputs = {"input_ids": torch.randint(0, 600, (2, length), generator=torch.Generator().manual_seed(length))}
        inputs["position_ids"] = torch.arange(length).expand(3, 2, length)
        grads = []
        for model in (models["sdpa"], compiled):
            model.zero_grad(set_to_none=True)
            logits = model(inputs["input_ids"], inputs["position_ids"], None)
            logits.square().mean().backward()
            grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
            if model is compiled:
                got = logits.detach()
            else:
                expected = logits.detach()
        assert (got - expected).abs().max() <= LOGITS_TOL
        assert max((grads[1][n] - g).abs().max().item() for n, g in grads[0].items()) <= 1e-6
    print(f"compiled layers: {dict(counters['stats'])}")
    assert counters["stats"]["unique_graphs"] == 2  # one static graph for length 20, one dynamic for the rest
