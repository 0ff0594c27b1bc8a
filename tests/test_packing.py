"""Packed (THD) micro-batches (`model_providers/packing.py`), CPU, fp32, sdpa spec.

* `PackedLayout`: pack/unpack round trip, the tail segment, boundaries, bad lengths;
* `SDPACoreAttention` on a packed sequence equals per-row causal attention (GQA), outputs and grads;
* a whole tiny Qwen2.5-VL (M-RoPE, images in two rows of different lengths) and InternVL (plain RoPE):
  packed logits equal the padded model's at every real token (and are zero at padding), and so do
  parameter gradients; the packed labels path equals the padded one; the local spec and CP refuse packing.
"""

from __future__ import annotations

import pytest
import torch

TOL = 2e-5


def test_layout_pack_unpack_round_trip():
    from model_providers.packing import PackedLayout, segment_bounds

    layout = PackedLayout.from_lengths(torch.tensor([4, 6, 2]), 6, pad_multiple=4)
    assert layout.total == 12 and layout.real_tokens == 12 and layout.max_seqlen == 6
    assert layout.cu_seqlens_cpu.tolist() == [0, 4, 10, 12]
    layout = PackedLayout.from_lengths(torch.tensor([3, 6, 2]), 6, pad_multiple=4)
    assert layout.total == 12 and layout.real_tokens == 11
    assert segment_bounds(layout.packed_seq_params()) == [0, 3, 9, 11, 12]  # the tail is its own segment
    x = torch.arange(3 * 6 * 2, dtype=torch.float32).view(3, 6, 2)
    packed = layout.pack(x)
    assert packed.shape == (12, 2) and packed[-1].eq(0).all()
    assert packed[:3].equal(x[0, :3]) and packed[3:9].equal(x[1]) and packed[9:11].equal(x[2, :2])
    back = layout.unpack(packed)
    mask = torch.arange(6)[None, :] < torch.tensor([3, 6, 2])[:, None]
    assert back[mask].equal(x[mask]) and back[~mask].eq(0).all()
    pos = torch.arange(3 * 3 * 6).view(3, 3, 6)  # [3, b, s] M-RoPE ids
    assert layout.pack(pos, batch_dim=1).shape == (3, 12)
    with pytest.raises(ValueError, match="seq_lengths"):
        PackedLayout.from_lengths(torch.tensor([3, 7]), 6)
    with pytest.raises(ValueError, match=r"\[b=3, s=6\]"):
        layout.pack(torch.zeros(3, 5))


def test_core_attention_packed_equals_per_row(megatron_world):
    from megatron.core.transformer.enums import AttnMaskType

    from model_providers.packing import PackedLayout
    from model_providers.sdpa_attention import SDPACoreAttention
    from tests.test_sdpa_spec import _attention_config

    heads, groups, dim, lengths, s = 4, 2, 8, [5, 9, 3], 9
    config = _attention_config(heads, groups, dim)
    attention = SDPACoreAttention(config, 1, AttnMaskType.causal, "self")
    layout = PackedLayout.from_lengths(torch.tensor(lengths), s, pad_multiple=4)
    gen = torch.Generator().manual_seed(0)
    q = (2 * torch.randn(layout.total, heads, dim, generator=gen)).requires_grad_()
    k = (2 * torch.randn(layout.total, groups, dim, generator=gen)).requires_grad_()
    v = torch.randn(layout.total, groups, dim, generator=gen).requires_grad_()
    upstream = torch.randn(layout.total, heads * dim, generator=gen)
    out = attention(q, k, v, None, packed_seq_params=layout.packed_seq_params())
    (out * upstream).sum().backward()
    bounds = layout.cu_seqlens_cpu.tolist()
    for a, b in zip(bounds[:-1], bounds[1:]):
        qi, ki, vi = (t.detach()[a:b, None].clone().requires_grad_() for t in (q, k, v))
        ref = attention(qi, ki, vi, None)[:, 0]  # one row, is_causal
        (ref * upstream[a:b]).sum().backward()
        assert (out[a:b] - ref).abs().max() <= 1e-5
        for packed_grad, row_grad in ((q.grad, qi.grad), (k.grad, ki.grad), (v.grad, vi.grad)):
            assert (packed_grad[a:b] - row_grad[:, 0]).abs().max() <= 1e-5
    with pytest.raises(NotImplementedError, match="explicit mask"):
        attention(q, k, v, torch.zeros(1, 1, 1, 1, dtype=torch.bool), packed_seq_params=layout.packed_seq_params())


# ---- whole models --------------------------------------------------------------------------------------


def _scaled_tensors(path):
    """The checkpoint's tensors with matrices x2.5 and norm scales jittered: the tiny init gives near-uniform
    attention, under which attending across rows would hardly show (as in test_sdpa_spec)."""
    from safetensors.torch import load_file

    tensors = load_file(str(path / "model.safetensors"))
    gen = torch.Generator().manual_seed(0)
    for name, t in tensors.items():
        tensors[name] = t + 0.1 * torch.randn(t.shape, generator=gen) if "norm" in name or "ln_q" in name else 2.5 * t
    return tensors


def _build(arch: str, path, spec: str = "sdpa"):
    from transformers import AutoConfig

    from model_providers.hf_mapping import Placement, get_mapping, load_hf_weights
    from model_providers.registry import build_model

    hf_config = AutoConfig.from_pretrained(path)
    model = build_model(hf_config, spec=spec, params_dtype=torch.float32)
    mapping = get_mapping(arch, hf_config, model.backend)
    load_hf_weights(model, iter(_scaled_tensors(path).items()), mapping, Placement.from_parallel_state(model.config))
    return hf_config, model


def _qwen_inputs(hf_config):
    """Three right-padded rows: 112x112 image (16 tokens) in row 0, a 56x84 one (6 tokens) in row 2."""
    from PIL import Image

    from model_providers.registry import position_ids
    from tests.workers.qwen_vl_parity_worker import image_processor

    gen = torch.Generator().manual_seed(1)

    def image(height, width):
        return Image.fromarray(torch.randint(0, 256, (height, width, 3), generator=gen, dtype=torch.uint8).numpy())

    def text(n):
        return torch.randint(0, 600, (n,), generator=gen).tolist()

    out = image_processor()(images=[image(112, 112), image(56, 84)], return_tensors="pt")
    grid = out["image_grid_thw"]
    counts = (grid.prod(-1) // hf_config.vision_config.spatial_merge_size**2).tolist()

    def vision(i):
        return [hf_config.vision_start_token_id, *[hf_config.image_token_id] * counts[i], hf_config.vision_end_token_id]

    rows = [text(3) + vision(0) + text(4), text(11), text(5) + vision(1) + text(2)]
    return rows, grid, out["pixel_values"], position_ids


def _padded(rows):
    lengths = torch.tensor([len(r) for r in rows])
    ids = torch.zeros(len(rows), int(lengths.max()), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row)
    return ids, lengths


def _forward_and_grads(model, ids, pos, extra, lengths, packed):
    model.zero_grad(set_to_none=True)
    logits = model(ids, pos, None, packed=packed, **extra)  # [b, s, V]
    mask = torch.arange(ids.shape[1])[None, :] < lengths[:, None]
    weights = torch.linspace(-1, 1, logits.shape[-1])
    (logits[mask] * weights).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return logits.detach(), mask, grads


@pytest.mark.parametrize("arch", ["qwen2_5_vl", "internvl"])
def test_packed_model_equals_padded(megatron_world, tiny_checkpoints, arch):
    from model_providers.packing import PackedLayout

    hf_config, model = _build(arch, tiny_checkpoints[arch])
    if arch == "qwen2_5_vl":
        rows, grid, pixels, position_ids = _qwen_inputs(hf_config)
        ids, lengths = _padded(rows)
        pos = position_ids(hf_config, ids, grid)
        extra = {"pixel_values": pixels, "image_grid_thw": grid}
    else:  # text rows: plain RoPE restarts at 0 in every segment
        gen = torch.Generator().manual_seed(2)
        ids, lengths = _padded([torch.randint(0, 600, (n,), generator=gen).tolist() for n in (7, 13, 5)])
        pos = torch.arange(ids.shape[1]).expand_as(ids)
        extra = {}
    layout = PackedLayout.from_lengths(lengths, ids.shape[1], pad_multiple=8)
    assert layout.total > layout.real_tokens  # a tail segment is exercised
    expected, mask, expected_grads = _forward_and_grads(model, ids, pos, extra, lengths, None)
    got, _, got_grads = _forward_and_grads(model, ids, pos, extra, lengths, layout)
    assert got.shape == expected.shape
    diff = (got[mask] - expected[mask]).abs().max().item()
    grad_err = max(
        ((got_grads[n] - g).norm() / g.norm().clamp_min(1e-12)).item() for n, g in expected_grads.items()
    )
    print(f"{arch} packed vs padded: max |dlogits| = {diff:.2e}, max grad rel err = {grad_err:.2e}")
    assert expected[mask].std() > 0.3
    assert diff <= TOL and grad_err <= 1e-4
    assert got[~mask].eq(0).all()
    assert expected_grads.keys() == got_grads.keys()

    if arch == "qwen2_5_vl":  # the labels (per-token cross-entropy) path
        labels = torch.roll(ids, -1, dims=1)
        with torch.no_grad():
            ref = model(ids, pos, None, labels=labels, **extra)
            packed = model(ids, pos, None, labels=labels, packed=layout, **extra)
        assert (packed[mask] - ref[mask]).abs().max() <= TOL


def test_packing_refused_where_unsupported(megatron_world, tiny_checkpoints):
    from model_providers.packing import PackedLayout

    _, model = _build("internvl", tiny_checkpoints["internvl"], spec="local")
    ids = torch.randint(0, 600, (2, 6))
    layout = PackedLayout.from_lengths(torch.tensor([6, 4]), 6)
    with pytest.raises(ValueError, match="packed sequences need the 'sdpa' or 'te' spec"):
        model(ids, torch.arange(6).expand_as(ids), None, packed=layout)
    # ... and already when the model is built for packed micro-batches (the trainer's model.packed_sequences)
    from transformers import AutoConfig

    from model_providers.registry import build_model

    with pytest.raises(ValueError, match="packed sequences need the 'sdpa' or 'te' spec"):
        build_model(AutoConfig.from_pretrained(tiny_checkpoints["internvl"]), spec="local", packed_sequences=True)
