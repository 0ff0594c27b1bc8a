"""PromptEncoder's image backends (calibrl_mcore/data/vision_inputs.py): with image_backend="pil" (and "auto"
on a CPU machine) the prompt token ids and pixel inputs equal the HF processor's ("processor") exactly, for
tiny Qwen2.5-VL and InternVL checkpoints and 0, 1 or 2 images of different sizes."""

from __future__ import annotations

import io
import json
import shutil
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from calibrl_mcore.data import dali
from calibrl_mcore.data.images import ImageRef
from calibrl_mcore.data.schema import Example
from calibrl_mcore.data.vision_inputs import ImagePlaceholders, expand_image_placeholders
from calibrl_mcore.trainer.rollout_stage import PromptEncoder, PromptInputs

ARCHS = ["qwen2_5_vl", "internvl"]


def _png(height: int, width: int, seed: int, mode: str = "RGB", fmt: str = "PNG") -> bytes:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).convert(mode).save(buf, format=fmt)
    return buf.getvalue()


# (height, width) per image: sizes that give different grids (Qwen) and tile counts (InternVL), an RGBA
# image (composited on white by the loader) and a JPEG.
EXAMPLES = {
    "0-images": ("What is 2 + 3?", []),
    "1-image": ("How many sides does the shape have?", [_png(90, 50, 0)]),
    "2-images": ("Which image is larger?", [_png(60, 100, 1, "RGBA"), _png(150, 40, 2, fmt="JPEG")]),
    "2-images-interleaved": ("Left: <image> right: <image> same?", [_png(37, 201, 3), _png(120, 120, 4)]),
}


def _example(name: str) -> Example:
    question, images = EXAMPLES[name]
    return Example(uid=name, question=question, answer="5", images=[ImageRef(data=b) for b in images],
                   experts=["<think>2+3=5</think><answer>5</answer>"])


@pytest.fixture(scope="module")
def built(tiny_checkpoints):
    return {arch: tiny_checkpoints[arch] for arch in ARCHS}


@pytest.fixture(scope="module")
def reference(built):
    """The processor path's outputs, per arch and example."""
    out = {}
    for arch, path in built.items():
        enc = PromptEncoder(str(path))
        out[arch] = {name: enc.prompt(_example(name)) for name in EXAMPLES}
    return out


def _assert_same(got: PromptInputs, want: PromptInputs) -> None:
    assert got.text == want.text
    assert got.prompt_ids == want.prompt_ids
    for key in ("pixel_values", "image_grid_thw"):
        a, b = getattr(got, key), getattr(want, key)
        assert (a is None) == (b is None), key
        if a is not None:
            assert a.device.type == "cpu" and a.dtype == b.dtype and a.shape == b.shape, key
            assert torch.equal(a, b), key


@pytest.mark.parametrize("arch", ARCHS)
def test_pil_backend_equals_processor(built, reference, arch):
    enc = PromptEncoder(str(built[arch]), image_backend="pil")
    for name in EXAMPLES:
        got, want = enc.prompt(_example(name)), reference[arch][name]
        _assert_same(got, want)
        if EXAMPLES[name][1]:
            assert got.pixel_values is not None
            assert len(got.prompt_ids) > 20 + len(EXAMPLES[name][1])  # the placeholders were expanded
        else:
            assert got.pixel_values is None and got.image_grid_thw is None
    if arch == "qwen2_5_vl":  # the two images of each 2-image example really differ in size
        for name in ("2-images", "2-images-interleaved"):
            grid = reference[arch][name].image_grid_thw
            assert grid.shape == (2, 3) and not torch.equal(grid[0], grid[1])
    else:
        image_token = enc.processor.image_token_id
        counts = [reference[arch][n].prompt_ids.count(image_token) for n in ("1-image", "2-images")]
        assert counts[0] > 0 and counts[1] > counts[0]


@pytest.mark.parametrize("arch", ARCHS)
def test_auto_falls_back_to_pil_with_one_warning(built, reference, arch, monkeypatch):
    if dali.dali_available():
        pytest.skip("CUDA and DALI are here: auto picks DALI")
    monkeypatch.setattr(dali, "_fallback_warned", False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        enc = PromptEncoder(str(built[arch]), image_backend="auto")
        results = {name: enc.prompt(_example(name)) for name in EXAMPLES}
        PromptEncoder(str(built[arch]), image_backend="auto")  # a second encoder warns no more
    fallback = [w for w in caught if "falls back to PIL" in str(w.message)]
    assert len(fallback) == 1, [str(w.message) for w in caught]
    assert enc.vision is not None and enc.vision.backend == "pil"
    for name, got in results.items():
        _assert_same(got, reference[arch][name])


def test_internvl_tiles_follow_the_processor_not_its_image_processor(built, tmp_path):
    """InternVLProcessor tiles (crop_to_patches=True per call) even when its image processor's config says
    False, as InternVL's released preprocessor configs do; the spec must follow the processor."""
    path = tmp_path / "internvl"
    shutil.copytree(built["internvl"], path)
    for name, key in (("preprocessor_config.json", None), ("processor_config.json", "image_processor")):
        cfg = json.loads((path / name).read_text())
        (cfg[key] if key else cfg)["crop_to_patches"] = False
        (path / name).write_text(json.dumps(cfg))
    want = PromptEncoder(str(path)).prompt(_example("2-images"))
    got = PromptEncoder(str(path), image_backend="pil").prompt(_example("2-images"))
    assert want.pixel_values.shape[0] > 2  # tiled: more views than images
    _assert_same(got, want)


def test_expand_image_placeholders():
    qwen = ImagePlaceholders(image_token="<P>")
    assert expand_image_placeholders("a<P>b<P>c", [2, 1], qwen) == "a<P><P>b<P>c"
    intern = ImagePlaceholders(image_token="<C>", start_token="<img>", end_token="</img>", tokens_per_tile=2)
    assert expand_image_placeholders("<C>x", [3], intern) == "<img><C><C><C></img>x"
    with pytest.raises(ValueError, match="2 '<P>' placeholders in the prompt but 1 images"):
        expand_image_placeholders("<P><P>", [4], qwen)


@pytest.mark.skipif(not dali.dali_available(), reason="needs CUDA and nvidia.dali")
@pytest.mark.parametrize("arch", ARCHS)
def test_dali_backend_matches_processor_shapes_and_tokens(built, reference, arch):
    enc = PromptEncoder(str(built[arch]), image_backend="dali")
    for name in EXAMPLES:
        got, want = enc.prompt(_example(name)), reference[arch][name]
        assert got.prompt_ids == want.prompt_ids
        if want.pixel_values is not None:
            assert got.pixel_values.device.type == "cpu" and got.pixel_values.shape == want.pixel_values.shape
            assert (got.pixel_values - want.pixel_values).abs().mean() <= dali.DALI_PIL_MAX_MEAN * 5


def test_config_image_backend_choices():
    from calibrl_mcore.config import ConfigError, load_config

    assert load_config().data.image_backend == "processor"
    assert load_config(overrides=["data.image_backend=auto"]).data.image_backend == "auto"
    with pytest.raises(ConfigError, match="data.image_backend='gpu' is not one of"):
        load_config(overrides=["data.image_backend=gpu"])
