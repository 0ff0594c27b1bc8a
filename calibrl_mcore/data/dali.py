"""Image preprocessing up to the processor's patchify step, on the GPU with NVIDIA DALI or on the CPU with PIL.

What the vision-language processors do to an RGB image before they cut it into patches:

    Qwen2-VL / Qwen2.5-VL   smart-resize (both sides multiples of patch_size * merge_size, pixel count in
                            [min_pixels, max_pixels]), bicubic; x / 255; (x - mean) / std
    InternVL (GOT-OCR2)     pick a cols x rows grid of tile_size squares closest to the aspect ratio, bicubic
                            resize to that canvas, cut it into tiles (+ a tile_size thumbnail of the whole image
                            when there is more than one tile); x / 255; (x - mean) / std

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
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image

from calibrl_mcore.data.images import ImageRef, ImageSource, load_image

__all__ = [
    "DALI_PIL_ATOL",
    "BackendDiff",
    "ImageSpec",
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


@dataclass(frozen=True)
class ImageSpec:
    """What the model's image processor does before patchify. Build it with `from_processor`."""

    mode: Literal["smart_resize", "tiles"]
    """smart_resize: Qwen2-VL / Qwen2.5-VL; tiles: InternVL (GOT-OCR2 image processor)."""
    image_mean: tuple[float, float, float]
    image_std: tuple[float, float, float]
    rescale_factor: float = 1 / 255
    patch_size: int = 14
    """smart_resize: spatial patch side of the vision tower."""
    merge_size: int = 2
    """smart_resize: patches merged per side into one LLM token; sides are multiples of patch*merge."""
    temporal_patch_size: int = 2
    """smart_resize: frames per patch; a still image is repeated this many times by patchify."""
    min_pixels: int = 56 * 56
    max_pixels: int = 28 * 28 * 1280
    tile_height: int = 448
    """tiles: side of one tile (and of the thumbnail)."""
    tile_width: int = 448
    crop_to_tiles: bool = True
    """tiles: False -> one resize to tile_height x tile_width, no tiling."""
    min_tiles: int = 1
    max_tiles: int = 12

    @classmethod
    def from_processor(cls, processor: Any) -> ImageSpec:
        """Read the spec off an HF processor or image processor (Qwen2VLImageProcessor[Pil] /
        GotOcr2ImageProcessor[Pil]); raises on settings this module does not reproduce.

        A processor's own per-call image kwargs win over its image processor's attributes, as in the
        processor's `__call__` (InternVLProcessor passes crop_to_patches=True; GOT-OCR2's default and
        InternVL's released preprocessor configs say False)."""
        ip = getattr(processor, "image_processor", processor)
        overrides = _processor_images_kwargs(processor) if ip is not processor else {}

        def setting(name: str, default: Any = None) -> Any:
            return overrides.get(name, getattr(ip, name, default))

        for flag in ("do_resize", "do_rescale", "do_normalize"):
            if setting(flag, True) is False:
                raise ValueError(
                    f"{type(ip).__name__}.{flag}=False is not supported by calibrl_mcore.data.dali"
                )
        resample = setting("resample", Image.Resampling.BICUBIC)
        if int(resample) != int(Image.Resampling.BICUBIC):
            raise ValueError(f"{type(ip).__name__} resamples with {resample!r}; only bicubic is supported")
        common = {
            "image_mean": tuple(float(v) for v in setting("image_mean")),
            "image_std": tuple(float(v) for v in setting("image_std")),
            "rescale_factor": float(setting("rescale_factor")),
        }
        size = dict(setting("size"))
        if hasattr(ip, "merge_size"):
            return cls(
                mode="smart_resize",
                patch_size=int(setting("patch_size")),
                merge_size=int(setting("merge_size")),
                temporal_patch_size=int(setting("temporal_patch_size")),
                min_pixels=int(size["shortest_edge"]),
                max_pixels=int(size["longest_edge"]),
                **common,
            )
        if hasattr(ip, "crop_to_patches"):
            return cls(
                mode="tiles",
                tile_height=int(size["height"]),
                tile_width=int(size["width"]),
                crop_to_tiles=bool(setting("crop_to_patches")) and int(setting("max_patches")) > 1,
                min_tiles=int(setting("min_patches")),
                max_tiles=int(setting("max_patches")),
                **common,
            )
        raise ValueError(
            f"no ImageSpec for image processor {type(ip).__name__} (expected Qwen2-VL or GOT-OCR2)"
        )


def _processor_images_kwargs(processor: Any) -> dict[str, Any]:
    """Image-processor kwargs a multimodal processor passes on every call (transformers' `_merge_kwargs`:
    the class attribute `images_kwargs`, overridden by the older `<Model>ProcessorKwargs._defaults`)."""
    out = dict(getattr(processor, "images_kwargs", None) or {})
    kwargs_cls = getattr(processor, "valid_processor_kwargs", None)
    out.update(getattr(kwargs_cls, "_defaults", {}).get("images_kwargs", {}))
    return out


# ---------------------------------------------------------------------------------------------------------
# Target sizes (host side, shared by both backends).
# ---------------------------------------------------------------------------------------------------------


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """Qwen2-VL's target (height, width): multiples of `factor`, area in [min_pixels, max_pixels], aspect kept.

    Round each side to the nearest multiple; if the area is then too large, shrink by sqrt(area / max) and
    round down; if too small, grow by sqrt(min / area) and round up (the processors' exact arithmetic)."""
    if max(height, width) / min(height, width) > 200:
        raise ValueError(
            f"aspect ratio {max(height, width) / min(height, width):.1f} > 200 ({height}x{width})"
        )
    out_h, out_w = round(height / factor) * factor, round(width / factor) * factor
    if out_h * out_w > max_pixels:
        shrink = math.sqrt(height * width / max_pixels)
        out_h = max(factor, math.floor(height / shrink / factor) * factor)
        out_w = max(factor, math.floor(width / shrink / factor) * factor)
    elif out_h * out_w < min_pixels:
        grow = math.sqrt(min_pixels / (height * width))
        out_h = math.ceil(height * grow / factor) * factor
        out_w = math.ceil(width * grow / factor) * factor
    return out_h, out_w


@lru_cache(maxsize=64)
def _tile_grid(
    height: int, width: int, tile_h: int, tile_w: int, min_tiles: int, max_tiles: int
) -> tuple[int, int]:
    """(cols, rows) whose aspect ratio is closest to the image's; on ties the later (more tiles) grid wins
    while the image covers more than half of its canvas (GOT-OCR2 / InternVL's rule)."""
    grids = sorted(
        (
            (c, r)
            for c in range(1, max_tiles + 1)
            for r in range(1, max_tiles + 1)
            if min_tiles <= c * r <= max_tiles
        ),
        key=lambda g: g[0] * g[1],
    )
    aspect, area = width / height, width * height
    best, best_diff = (1, 1), float("inf")
    for cols, rows in grids:
        diff = abs(aspect - cols / rows)
        if diff < best_diff:
            best, best_diff = (cols, rows), diff
        elif diff == best_diff and area > 0.5 * tile_h * tile_w * cols * rows:
            best = (cols, rows)
    return best


@dataclass(frozen=True)
class ResizePlan:
    """Where one image goes: resized to (height, width), then cut into rows x cols tiles (+ a thumbnail)."""

    height: int
    width: int
    rows: int = 1
    cols: int = 1
    thumbnail: tuple[int, int] | None = None


def plan_resize(height: int, width: int, spec: ImageSpec) -> ResizePlan:
    """The resize (and tiling) of a `height` x `width` image under `spec`."""
    if spec.mode == "smart_resize":
        factor = spec.patch_size * spec.merge_size
        return ResizePlan(*smart_resize(height, width, factor, spec.min_pixels, spec.max_pixels))
    th, tw = spec.tile_height, spec.tile_width
    if not spec.crop_to_tiles:
        return ResizePlan(th, tw)
    cols, rows = _tile_grid(height, width, th, tw, spec.min_tiles, spec.max_tiles)
    thumbnail = (th, tw) if cols * rows > 1 else None
    return ResizePlan(rows * th, cols * tw, rows=rows, cols=cols, thumbnail=thumbnail)


def _split_tiles(image: torch.Tensor, plan: ResizePlan) -> torch.Tensor:
    """[3, rows*th, cols*tw] -> [rows*cols, 3, th, tw], row-major (tile i = row i // cols, column i % cols)."""
    c, h, w = image.shape
    th, tw = h // plan.rows, w // plan.cols
    tiles = image.reshape(c, plan.rows, th, plan.cols, tw).permute(1, 3, 0, 2, 4)  # [rows, cols, 3, th, tw]
    return tiles.reshape(plan.rows * plan.cols, c, th, tw)


def _assemble_views(main: torch.Tensor, thumb: torch.Tensor | None, plan: ResizePlan) -> torch.Tensor:
    """Resized image(s) -> the `[n_views, 3, H, W]` the processor patchifies."""
    views = _split_tiles(main, plan)
    if plan.thumbnail is not None:
        assert thumb is not None, "plan asks for a thumbnail but none was resized"
        views = torch.cat([views, thumb[None]])
    return views


# ---------------------------------------------------------------------------------------------------------
# PIL reference path (CPU): the HF slow image processors' arithmetic, step for step.
# ---------------------------------------------------------------------------------------------------------


def _normalise_pil(img: Image.Image, size: tuple[int, int], spec: ImageSpec) -> torch.Tensor:
    """Bicubic resize of an RGB image to `size` = (h, w) in uint8 (as PIL does), then
    float64 * rescale -> float32, then (x - mean) / std in float32; returns [3, h, w]."""
    h, w = size
    resized = img.resize((w, h), resample=Image.Resampling.BICUBIC)  # identity copy when the size matches
    pixels = np.moveaxis(np.asarray(resized), -1, 0)  # [h, w, 3] -> [3, h, w]
    pixels = (pixels.astype(np.float64) * spec.rescale_factor).astype(np.float32)
    mean = np.asarray(spec.image_mean, dtype=np.float32)[:, None, None]
    std = np.asarray(spec.image_std, dtype=np.float32)[:, None, None]
    return torch.from_numpy(np.ascontiguousarray((pixels - mean) / std))


def preprocess_images_pil(images: Sequence[ImageSource], spec: ImageSpec) -> list[torch.Tensor]:
    """CPU path: decode with PIL (RGB, transparent pixels white; `load_image`), resize, rescale, normalise.

    Returns one float32 `[n_views, 3, H, W]` tensor per image, equal to what the HF slow image processor
    feeds its patchify step for the same RGB image."""
    out = []
    for src in images:
        img = load_image(src)
        plan = plan_resize(img.height, img.width, spec)
        main = _normalise_pil(img, (plan.height, plan.width), spec)
        thumb = _normalise_pil(img, plan.thumbnail, spec) if plan.thumbnail is not None else None
        out.append(_assemble_views(main, thumb, plan))
    return out


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
            results[i] = _assemble_views(main, thumb, plan)
    return [r for r in results if r is not None]


# ---------------------------------------------------------------------------------------------------------
# Entry point, model inputs, backend comparison.
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


def to_model_inputs(views: Sequence[torch.Tensor], spec: ImageSpec) -> dict[str, torch.Tensor]:
    """The processor's outputs from `preprocess_images`: Qwen `pixel_values` [n_patches, 3*T*P*P] +
    `image_grid_thw` [n_images, 3]; InternVL `pixel_values` [n_tiles, 3, S, S] + `num_patches` [n_images]."""
    if spec.mode == "tiles":
        counts = torch.tensor([v.shape[0] for v in views], dtype=torch.int64)
        return {"pixel_values": torch.cat(list(views)), "num_patches": counts}
    p, m, t = spec.patch_size, spec.merge_size, spec.temporal_patch_size
    patches, grids = [], []
    for v in views:
        (c, h, w) = v.shape[1:]
        gh, gw = h // p, w // p
        # [1, c, h, w] -> [c, gh/m, m, p, gw/m, m, p] -> [gh/m, gw/m, m, m, c, p, p]: merge groups stay adjacent
        x = v.reshape(c, gh // m, m, p, gw // m, m, p).permute(1, 4, 2, 5, 0, 3, 6)
        x = x[:, :, :, :, :, None].expand(*x.shape[:5], t, p, p)  # a still image repeated over T frames
        patches.append(x.reshape(gh * gw, c * t * p * p))  # [gh*gw, c*T*p*p]
        grids.append([1, gh, gw])
    return {"pixel_values": torch.cat(patches), "image_grid_thw": torch.tensor(grids, dtype=torch.int64)}


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
