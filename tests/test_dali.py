"""Image preprocessing backends (calibrl_mcore/data/dali.py, image_spec.py): the PIL path against the HF
slow image processors (Qwen2-VL smart-resize + patchify, GOT-OCR2/InternVL tiles), the one-time fallback
warning, the error for an explicit DALI request without DALI, and (GPU + DALI only) DALI against PIL."""

from __future__ import annotations

import io
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from calibrl_mcore.data import dali
from calibrl_mcore.data.dali import ImageSpec, compare_dali_pil, preprocess_images, to_model_inputs
from calibrl_mcore.data.images import load_image
from tools import make_tiny_model as tiny


def _image(height: int, width: int, seed: int, fmt: str = "PNG", mode: str = "RGB") -> bytes:
    """A smooth image (gradients + low-frequency waves + noise) encoded as `fmt`."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    channels = [
        128 + 100 * np.sin(x / (7 + 3 * c) + y / (11 + c)) + rng.normal(0, 6, (height, width))
        for c in range(3)
    ]
    pixels = np.clip(np.stack(channels, -1), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).convert(mode).save(buf, format=fmt)
    return buf.getvalue()


def _qwen_processors():
    from transformers import Qwen2VLImageProcessorPil

    yield (
        "tiny",
        Qwen2VLImageProcessorPil(
            min_pixels=tiny.QWEN_MIN_PIXELS,
            max_pixels=tiny.QWEN_MAX_PIXELS,
            patch_size=tiny.PATCH,
            temporal_patch_size=tiny.QWEN_TEMPORAL_PATCH,
            merge_size=tiny.QWEN_MERGE,
        ),
    )
    # Qwen2.5-VL's released preprocessor_config (max_pixels = 12845056), i.e. the class defaults but min/max.
    yield "released", Qwen2VLImageProcessorPil(min_pixels=3136, max_pixels=12845056)


def _internvl_processors():
    from transformers import GotOcr2ImageProcessorPil

    imagenet = {"image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225]}
    yield (
        "tiny",
        GotOcr2ImageProcessorPil(
            size={"height": tiny.INTERNVL_IMAGE_SIZE, "width": tiny.INTERNVL_IMAGE_SIZE},
            crop_to_patches=True,
            min_patches=1,
            max_patches=tiny.INTERNVL_MAX_TILES,
            **imagenet,
        ),
    )
    yield (
        "no-tiles",
        GotOcr2ImageProcessorPil(size={"height": 56, "width": 56}, crop_to_patches=False, **imagenet),
    )


SIZES = [(28, 28), (56, 56), (60, 100), (37, 201), (300, 170), (512, 384)]


PROCESSORS = [("qwen", name, proc) for name, proc in _qwen_processors()] + [
    ("internvl", name, proc) for name, proc in _internvl_processors()
]


@pytest.mark.parametrize(
    "family,name,processor", PROCESSORS, ids=[f"{family}-{name}" for family, name, _ in PROCESSORS]
)
def test_pil_path_equals_processor(family, name, processor):
    """Qwen2-VL (smart-resize + patchify) and GOT-OCR2/InternVL (tiles): the processor's own outputs."""
    spec = ImageSpec.from_processor(processor)
    assert spec.mode == {"qwen": "smart_resize", "internvl": "tiles"}[family]
    sources = [_image(h, w, seed=i) for i, (h, w) in enumerate(SIZES)]
    ours = to_model_inputs(preprocess_images(sources, spec, backend="pil"), spec)
    theirs = processor(images=[load_image(s) for s in sources], return_tensors="pt")
    if family == "qwen":
        assert torch.equal(ours["image_grid_thw"], theirs["image_grid_thw"])
    else:
        assert ours["num_patches"].tolist() == list(theirs["num_patches"])
        if name == "tiny":
            assert max(ours["num_patches"].tolist()) > 1, (
                "no image was tiled: the test sizes miss the tiling path"
            )
    assert ours["pixel_values"].shape == theirs["pixel_values"].shape
    assert torch.equal(ours["pixel_values"], theirs["pixel_values"])  # bit for bit


def test_pil_path_decodes_like_load_image():
    """Paths, bytes, palette / grayscale / transparent PNGs and JPEGs go through `load_image` first."""
    spec = ImageSpec.from_processor(next(_qwen_processors())[1])
    sources = [_image(40, 70, 0, "JPEG"), _image(33, 33, 1, mode="L"), _image(50, 20, 2, mode="P")]
    sources.append(_image(64, 64, 3, mode="RGBA"))
    out = preprocess_images(sources, spec, backend="pil")
    for src, views in zip(sources, out):
        expected = preprocess_images([load_image(src)], spec, backend="pil")[0]
        assert views.dtype == torch.float32 and views.ndim == 4 and views.shape[:2] == (1, 3)
        assert torch.equal(views, expected)


def test_auto_fallback_warns_once(monkeypatch):
    monkeypatch.setattr(dali, "dali_available", lambda: False)
    monkeypatch.setattr(dali, "_fallback_warned", False)
    spec = ImageSpec.from_processor(next(_qwen_processors())[1])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            preprocess_images([_image(28, 28, 0)], spec)
            assert dali.resolve_image_backend("auto") == "pil"
    fallback = [w for w in caught if "falls back to PIL" in str(w.message)]
    assert len(fallback) == 1, [str(w.message) for w in caught]
    assert issubclass(fallback[0].category, RuntimeWarning)


def test_explicit_dali_without_dali_raises(monkeypatch):
    real_import = dali.importlib.import_module

    def no_dali(name, *args):
        if name.startswith("nvidia.dali"):
            raise ModuleNotFoundError("No module named 'nvidia.dali'")
        return real_import(name, *args)

    monkeypatch.setattr(dali.importlib, "import_module", no_dali)
    spec = ImageSpec.from_processor(next(_qwen_processors())[1])
    with pytest.raises(ImportError, match="nvidia-dali") as info:
        preprocess_images([_image(28, 28, 0)], spec, backend="dali")
    assert "gpu" in str(info.value) and "Dockerfile" in str(info.value)
    with pytest.raises(ValueError, match="'auto', 'dali' or 'pil'"):
        preprocess_images([_image(28, 28, 0)], spec, backend="cuda")  # type: ignore[arg-type]


def test_plan_shapes_match_processor_token_counts():
    """plan_resize (shared by both backends) gives the processor's own patch / tile counts."""
    for _, proc in [*_qwen_processors(), *_internvl_processors()]:
        spec = ImageSpec.from_processor(proc)
        for h, w in SIZES:
            plan = dali.plan_resize(h, w, spec)
            if spec.mode == "smart_resize":
                assert (plan.height // spec.patch_size) * (plan.width // spec.patch_size) == (
                    proc.get_number_of_image_patches(h, w)
                )
            else:
                n_views = plan.rows * plan.cols + (plan.thumbnail is not None)
                assert n_views == proc.get_number_of_image_patches(h, w)


HAVE_DALI_GPU = dali.dali_available()  # CUDA first: on CPU machines nvidia.dali is never imported


@pytest.mark.skipif(
    not HAVE_DALI_GPU, reason="needs a CUDA GPU and nvidia.dali (pip install nvidia-dali-cuda120)"
)
@pytest.mark.parametrize("which", ["qwen", "internvl"])
def test_dali_matches_pil_within_tolerance(which):
    processors = _qwen_processors() if which == "qwen" else _internvl_processors()
    spec = ImageSpec.from_processor(next(processors)[1])
    sources = [_image(h, w, seed=i) for i, (h, w) in enumerate(SIZES)]
    sources.append(_image(64, 64, 9, mode="RGBA"))  # routed to PIL inside the DALI backend
    out = preprocess_images(sources, spec, backend="dali")
    assert all(v.is_cuda and v.dtype == torch.float32 for v in out)
    pil = preprocess_images(sources, spec, backend="pil")
    assert [tuple(v.shape) for v in out] == [tuple(v.shape) for v in pil]
    diff = compare_dali_pil(sources, spec)
    assert diff.within_tolerance, diff
