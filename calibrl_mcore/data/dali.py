"""Image preprocessing up to the processor's patchify step, on the GPU with NVIDIA DALI or on the CPU with PIL.

What each vision-language processor does to an RGB image (Qwen2-VL smart-resize, InternVL tiles), the
host-side target sizes, the PIL reference path and `to_model_inputs` live in `calibrl_mcore.data.image_spec`
and are re-exported here; this module adds the DALI path, the backend choice and the backend comparison.

Both backends return, per image, a float32 tensor `[n_views, 3, H, W]` (n_views = 1 for Qwen, the tiles for
InternVL); `to_model_inputs` turns a batch of them into the processor's own `pixel_values` (+ `image_grid_thw`
or `num_patches`). The PIL path reproduces the HF slow image processors bit for bit (tests/test_dali.py); the
DALI path decodes with nvImageCodec/nvJPEG and resizes on the device, so its pixels differ slightly (see
`compare_dali_pil`). Target sizes are computed on the host from the image headers, by the same function for
both backends, so the two always agree on shapes and on the number of image tokens.

`preprocess_images(images, spec, backend="auto")` picks DALI when `nvidia.dali` imports and CUDA is up, else
PIL (with one warning per process). DALI is imported lazily, inside functions: CPU machines never need it.
"""

from __future__ import annotations

import importlib
import io
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image

from calibrl_mcore.data.image_spec import (
    ImageSpec,
    ResizePlan,
    assemble_views,
    plan_resize,
    preprocess_images_pil,
    smart_resize,
    to_model_inputs,
)
from calibrl_mcore.data.images import ImageRef, ImageSource

__all__ = [
    "DALI_PIL_ATOL",
    "BackendDiff",
    "ImageSpec",
    "ResizePlan",
    "compare_dali_pil",
    "dali_available",
    "plan_resize",
    "preprocess_images",
    "preprocess_images_dali",
    "preprocess_images_pil",
    "resolve_image_backend",
    "smart_resize",
    "to_model_inputs",
]

ImageBackend = Literal["auto", "dali", "pil"]

DALI_PIL_ATOL = 0.05
"""Per-element tolerance between the DALI and PIL outputs, in normalised units (see `compare_dali_pil`)."""
DALI_PIL_MIN_FRACTION = 0.99
"""Fraction of elements that must lie within `DALI_PIL_ATOL` (lossless inputs)."""
DALI_PIL_MAX_MEAN = 0.01
"""Bound on the mean absolute difference (lossless inputs)."""

_DALI_MAX_BATCH = 64  # images per pipeline run; larger batches are split
_DALI_MODES = {"RGB", "L", "P"}  # decoded identically by DALI and PIL (P: palette without transparency)
_DALI_FORMATS = {"JPEG", "PNG", "BMP", "TIFF", "PPM", "WEBP", "JPEG2000"}
_fallback_warned = False  # one warning per process when "auto" falls back to PIL


# ---------------------------------------------------------------------------------------------------------
# DALI path (GPU).
# ---------------------------------------------------------------------------------------------------------


def _dali_missing_message(err: BaseException) -> str:
    return (
        "backend='dali' needs NVIDIA DALI: pip install nvidia-dali-cuda120 (it is in the `gpu` extra, "
        "pip install 'calibrl-mcore[gpu]', and installed in the Dockerfile's image), or use backend='pil' / "
        f"'auto' (import nvidia.dali failed: {err})"
    )


def dali_available() -> bool:
    """True when CUDA is up and `nvidia.dali` imports (checked in that order: the import is not free)."""
    if not torch.cuda.is_available():
        return False
    try:
        importlib.import_module("nvidia.dali")
    except ImportError:
        return False
    return True


def resolve_image_backend(backend: ImageBackend = "auto") -> Literal["dali", "pil"]:
    """Backend to run: auto -> dali when usable, else pil (warns once per process); dali fails when unusable."""
    global _fallback_warned
    if backend == "pil":
        return "pil"
    if backend == "dali":
        try:
            importlib.import_module("nvidia.dali")
        except ImportError as err:
            raise ImportError(_dali_missing_message(err)) from err
        if not torch.cuda.is_available():
            raise RuntimeError("backend='dali' needs a CUDA GPU (torch.cuda.is_available() is False)")
        return "dali"
    if backend != "auto":
        raise ValueError(f"image backend must be 'auto', 'dali' or 'pil', got {backend!r}")
    if dali_available():
        return "dali"
    if not _fallback_warned:
        _fallback_warned = True
        why = "no CUDA device" if not torch.cuda.is_available() else "nvidia.dali is not installed"
        warnings.warn(
            f"image preprocessing falls back to PIL on the CPU ({why}); install nvidia-dali-cuda120 "
            "(`gpu` extra) on GPU machines to decode and resize on the device",
            RuntimeWarning,
            stacklevel=3,
        )
    return "pil"


@dataclass(frozen=True)
class _Encoded:
    """An image's encoded bytes and what its header says (read without decoding the pixels)."""

    data: bytes
    height: int
    width: int
    dali_safe: bool  # DALI and PIL decode it to the same RGB pixels


def _peek(src: ImageSource) -> _Encoded:
    """Header of an image source. Not DALI-safe: alpha / transparency (PIL composites it on white, DALI drops
    it), an EXIF rotation (PIL, like the HF processors, ignores it; DALI may apply it), modes such as CMYK
    or 16-bit, and formats DALI does not decode (GIF, ...). Those images take the PIL path."""
    ref = ImageRef.from_source(src)
    data = ref.data if ref.data is not None else ref.path.read_bytes()  # type: ignore[union-attr]
    with Image.open(io.BytesIO(data)) as img:
        orientation = img.getexif().get(0x0112, 1)
        safe = (
            img.format in _DALI_FORMATS
            and img.mode in _DALI_MODES
            and "transparency" not in img.info
            and orientation == 1
        )
        return _Encoded(data, img.height, img.width, safe)


@lru_cache(maxsize=8)
def _dali_pipeline(
    device_id: int, mean: tuple[float, ...], std: tuple[float, ...], with_thumbnail: bool
) -> Any:
    """A built DALI pipeline: encoded bytes + per-sample target sizes -> normalised CHW float32 on the GPU.

    Resizing stays in uint8 (rounded, like PIL's), and normalisation folds the 1/255 rescale into the
    mean and std: (x/255 - m) / s == (x - 255 m) / (255 s)."""
    from nvidia.dali import fn, pipeline_def, types

    mean255 = [255.0 * m for m in mean]
    std255 = [255.0 * s for s in std]

    def resize_normalise(decoded: Any, height: Any, width: Any) -> Any:
        resized = fn.resize(
            decoded, resize_y=height, resize_x=width, interp_type=types.INTERP_CUBIC, antialias=True
        )
        return fn.crop_mirror_normalize(
            resized, dtype=types.FLOAT, output_layout="CHW", mean=mean255, std=std255
        )

    @pipeline_def(
        batch_size=_DALI_MAX_BATCH,
        num_threads=4,
        device_id=device_id,
        prefetch_queue_depth=1,
        exec_async=False,  # fed with feed_input and run once per call: no pipelining to wait on
        exec_pipelined=False,
    )
    def pipeline() -> Any:
        encoded = fn.external_source(name="encoded", dtype=types.UINT8, ndim=1)
        height = fn.external_source(name="height", dtype=types.FLOAT, ndim=0)
        width = fn.external_source(name="width", dtype=types.FLOAT, ndim=0)
        decoded = fn.decoders.image(encoded, device="mixed", output_type=types.RGB)  # [h, w, 3] uint8, GPU
        main = resize_normalise(decoded, height, width)
        if not with_thumbnail:
            return main
        thumb_h = fn.external_source(name="thumb_height", dtype=types.FLOAT, ndim=0)
        thumb_w = fn.external_source(name="thumb_width", dtype=types.FLOAT, ndim=0)
        return main, resize_normalise(decoded, thumb_h, thumb_w)

    pipe = pipeline()
    pipe.build()
    return pipe


def _dali_to_torch(batch: Any, device: torch.device) -> list[torch.Tensor]:
    """A DALI TensorListGPU (ragged shapes) -> one torch tensor per sample (copies: DALI reuses its buffers)."""
    from nvidia.dali.plugin.pytorch import feed_ndarray

    stream = torch.cuda.current_stream(device)
    out = []
    for i in range(len(batch)):
        sample = batch[i]
        dst = torch.empty(tuple(sample.shape()), dtype=torch.float32, device=device)
        feed_ndarray(sample, dst, cuda_stream=stream)
        out.append(dst)
    return out


def _cuda_index(device: torch.device | int | None) -> int:
    """CUDA device index of `device` (None / "cuda" without an index: the current device)."""
    if isinstance(device, int):
        return device
    if device is not None and device.type != "cuda":
        raise ValueError(f"DALI runs on a CUDA device, got {device}")
    return torch.cuda.current_device() if device is None or device.index is None else device.index


def preprocess_images_dali(
    images: Sequence[ImageSource], spec: ImageSpec, device: torch.device | int | None = None
) -> list[torch.Tensor]:
    """GPU path: decode (nvImageCodec / nvJPEG), cubic resize and normalise with DALI on `device`.

    Same contract as `preprocess_images_pil` (one `[n_views, 3, H, W]` float32 tensor per image, same
    shapes), on the GPU. Images DALI would decode differently (see `_peek`) go through the PIL path and are
    copied to the device."""
    resolve_image_backend("dali")
    device_id = _cuda_index(device)
    device = torch.device("cuda", device_id)
    headers = [_peek(src) for src in images]
    plans = [plan_resize(h.height, h.width, spec) for h in headers]
    results: list[torch.Tensor | None] = [None] * len(images)
    on_gpu = [i for i, h in enumerate(headers) if h.dali_safe]
    for i in (i for i, h in enumerate(headers) if not h.dali_safe):
        results[i] = preprocess_images_pil([images[i]], spec)[0].to(device)

    with_thumbnail = spec.mode == "tiles" and spec.crop_to_tiles
    pipe = _dali_pipeline(device_id, spec.image_mean, spec.image_std, with_thumbnail) if on_gpu else None
    for start in range(0, len(on_gpu), _DALI_MAX_BATCH):
        chunk = on_gpu[start : start + _DALI_MAX_BATCH]
        pipe.feed_input("encoded", [np.frombuffer(headers[i].data, dtype=np.uint8) for i in chunk])
        pipe.feed_input("height", [np.array(plans[i].height, dtype=np.float32) for i in chunk])
        pipe.feed_input("width", [np.array(plans[i].width, dtype=np.float32) for i in chunk])
        if with_thumbnail:
            thumbs = [plans[i].thumbnail or (spec.tile_height, spec.tile_width) for i in chunk]
            pipe.feed_input("thumb_height", [np.array(t[0], dtype=np.float32) for t in thumbs])
            pipe.feed_input("thumb_width", [np.array(t[1], dtype=np.float32) for t in thumbs])
        outputs = pipe.run()
        mains = _dali_to_torch(outputs[0], device)
        thumbs_out = _dali_to_torch(outputs[1], device) if with_thumbnail else [None] * len(chunk)
        for i, main, thumb in zip(chunk, mains, thumbs_out):
            plan = plans[i]
            assert tuple(main.shape) == (3, plan.height, plan.width), (
                f"DALI resized image {i} to {tuple(main.shape)}, planned (3, {plan.height}, {plan.width})"
            )
            results[i] = assemble_views(main, thumb, plan)
    return [r for r in results if r is not None]


# ---------------------------------------------------------------------------------------------------------
# Entry point, backend comparison.
# ---------------------------------------------------------------------------------------------------------


def preprocess_images(
    images: Sequence[ImageSource],
    spec: ImageSpec,
    backend: ImageBackend = "auto",
    device: torch.device | int | None = None,
) -> list[torch.Tensor]:
    """Decode + resize + normalise a batch: DALI on the GPU when available ("auto"), else PIL on the CPU.

    Returns one float32 `[n_views, 3, H, W]` tensor per image (CUDA tensors from DALI, CPU from PIL);
    feed them to `to_model_inputs` for the processor's `pixel_values`."""
    if resolve_image_backend(backend) == "dali":
        return preprocess_images_dali(images, spec, device)
    return preprocess_images_pil(images, spec)


@dataclass(frozen=True)
class BackendDiff:
    """Element-wise |DALI - PIL| over a batch, in normalised units."""

    max_abs_diff: float
    mean_abs_diff: float
    fraction_within_atol: float
    atol: float

    @property
    def within_tolerance(self) -> bool:
        """The documented bound: see `compare_dali_pil`."""
        return self.fraction_within_atol >= DALI_PIL_MIN_FRACTION and self.mean_abs_diff <= DALI_PIL_MAX_MEAN


def compare_dali_pil(
    images: Sequence[ImageSource],
    spec: ImageSpec,
    device: torch.device | int | None = None,
    atol: float = DALI_PIL_ATOL,
) -> BackendDiff:
    """Run both backends on `images` and measure how far DALI's output is from the PIL reference.

    Shapes always agree (one `plan_resize` for both). Pixels do not: PIL resizes in two separable passes with
    fixed-point weights and a rounded, clipped uint8 intermediate; DALI resizes in float on the GPU and
    rounds once. One uint8 level is 1/255/std ~= 0.015-0.017 after normalisation (CLIP / ImageNet std), so
    the stated tolerance, for lossless inputs (PNG) with natural or smooth content, is:
    at least 99% of elements within `atol` = 0.05 (about 3 levels) and a mean |diff| <= 0.01; see
    `BackendDiff.within_tolerance`. The maximum is reported, not bounded: at hard edges the cubic overshoot
    is clipped after the first pass by PIL but only at the end by DALI, which can move single pixels by
    tens of levels. JPEG adds decoder differences (nvJPEG vs libjpeg-turbo IDCT and chroma upsampling,
    typically 1-2 levels)."""
    dali = preprocess_images_dali(images, spec, device)
    pil = preprocess_images_pil(images, spec)
    diffs = []
    for i, (a, b) in enumerate(zip(dali, pil)):
        if a.shape != b.shape:
            raise AssertionError(f"image {i}: DALI shape {tuple(a.shape)} != PIL shape {tuple(b.shape)}")
        diffs.append((a.float().cpu() - b).abs().flatten())
    d = torch.cat(diffs)
    return BackendDiff(
        max_abs_diff=float(d.max()),
        mean_abs_diff=float(d.mean()),
        fraction_within_atol=float((d <= atol).float().mean()),
        atol=atol,
    )
