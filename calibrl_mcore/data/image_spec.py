"""What the HF vision-language image processors do to an RGB image before patchify, reproduced on the host.

    Qwen2-VL / Qwen2.5-VL   smart-resize (both sides multiples of patch_size * merge_size, pixel count in
                            [min_pixels, max_pixels]), bicubic; x / 255; (x - mean) / std
    InternVL (GOT-OCR2)     pick a cols x rows grid of tile_size squares closest to the aspect ratio, bicubic
                            resize to that canvas, cut it into tiles (+ a tile_size thumbnail of the whole image
                            when there is more than one tile); x / 255; (x - mean) / std

`ImageSpec.from_processor` reads those settings off a processor; `plan_resize` computes each image's target
sizes from its header (shared by both backends of `calibrl_mcore.data.dali`, so they agree on shapes and on
the number of image tokens); `preprocess_images_pil` is the CPU reference path, bit for bit the HF slow image
processors (tests/test_dali.py); `to_model_inputs` turns the `[n_views, 3, H, W]` views into the processor's
own `pixel_values` (+ `image_grid_thw` or `num_patches`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image

from calibrl_mcore.data.images import ImageSource, load_image

__all__ = [
    "ImageSpec",
    "ResizePlan",
    "assemble_views",
    "plan_resize",
    "preprocess_images_pil",
    "smart_resize",
    "to_model_inputs",
]


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


def assemble_views(main: torch.Tensor, thumb: torch.Tensor | None, plan: ResizePlan) -> torch.Tensor:
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
        out.append(assemble_views(main, thumb, plan))
    return out


# ---------------------------------------------------------------------------------------------------------
# Model inputs.
# ---------------------------------------------------------------------------------------------------------


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
