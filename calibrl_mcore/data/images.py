"""Image references, decoding and the CPU (PIL) image pipeline.

Rows name their images in several ways (ViRL/CalibRL jsonl: file paths relative to the data file;
HF-datasets parquet: `{"bytes": ..., "path": ...}` structs; raw bytes; `data:` URIs). They are normalised
once, at parse time, into an `ImageRef` (an absolute path or the encoded bytes), and decoded only when a
prompt is actually rolled out: a 40k-prompt data set of decoded images would not fit in host memory.

`ImagePipeline` is the seam between the data set and the rollout engine: it takes the `ImageRef`s of one
batch and returns images the model's HF processor accepts. `PILImagePipeline` is the CPU implementation
(decode + RGB + bounded resize). A GPU pipeline (NVIDIA DALI: nvjpeg decode and resize on the device,
returning CHW uint8 tensors) will implement the same protocol in a separate adapter module, so that the
trainer picks one from the config and never imports DALI on CPU machines.
"""

from __future__ import annotations

import base64
import binascii
import io
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeAlias, runtime_checkable

from PIL import Image, UnidentifiedImageError

__all__ = [
    "ImageLoadError",
    "ImagePipeline",
    "ImageRef",
    "ImageSource",
    "PILImagePipeline",
    "load_image",
    "resize_to_bounds",
]

_DATA_URI_PREFIX = "data:image/"


class ImageLoadError(ValueError):
    """An image source that cannot be resolved or decoded; the message names the source."""


@dataclass(frozen=True)
class ImageRef:
    """A lazily decoded image: exactly one of an absolute `path` or encoded `data` bytes.

    Frozen and cheap to hold, so a data set of refs costs the size of its paths (or, for parquet with
    embedded images, of the encoded bytes, which are what the file holds anyway).
    """

    path: Path | None = None
    data: bytes | None = None

    def __post_init__(self) -> None:
        if (self.path is None) == (self.data is None):
            raise ValueError(
                f"ImageRef needs exactly one of path / data, got path={self.path!r} and "
                f"{'no' if self.data is None else len(self.data)} data bytes"
            )

    @classmethod
    def from_source(cls, src: object, base_dir: str | os.PathLike[str] | None = None) -> ImageRef:
        """Normalise a row's image value; relative paths are resolved against `base_dir` (the data file's
        folder), because data sets are moved around as folders and store paths relative to themselves."""
        if isinstance(src, ImageRef):
            return src
        if isinstance(src, bytes | bytearray | memoryview):
            if len(src) == 0:
                raise ImageLoadError("empty image bytes")
            return cls(data=bytes(src))
        if isinstance(src, Image.Image):
            buf = io.BytesIO()
            src.save(buf, format="PNG")  # lossless; the pixels are what the row meant
            return cls(data=buf.getvalue())
        if isinstance(src, Mapping):
            # HF datasets' Image feature: bytes win (the path is often a stale name from the export machine).
            if src.get("bytes") is not None:
                return cls.from_source(src["bytes"], base_dir)
            if src.get("path"):
                return cls.from_source(src["path"], base_dir)
            raise ImageLoadError(f"image dict has neither 'bytes' nor 'path': keys {sorted(src)}")
        if isinstance(src, str) and src.startswith(_DATA_URI_PREFIX):
            _, _, payload = src.partition(",")
            try:
                return cls(data=base64.b64decode(payload, validate=True))
            except (binascii.Error, ValueError) as exc:
                raise ImageLoadError(f"bad base64 in data URI {src[:40]!r}...: {exc}") from exc
        if isinstance(src, str | os.PathLike):
            if not str(src):
                raise ImageLoadError("empty image path")
            path = Path(src).expanduser()
            if not path.is_absolute() and base_dir is not None:
                path = Path(base_dir) / path
            return cls(path=path.resolve())
        raise ImageLoadError(f"unsupported image value of type {type(src).__name__}")

    def __repr__(self) -> str:  # never dump kilobytes of image bytes into logs
        return f"ImageRef({self.describe()})"

    def describe(self) -> str:
        """Short name for error messages."""
        return str(self.path) if self.path is not None else f"<{len(self.data or b'')} image bytes>"

    def _open(self) -> Image.Image:
        try:
            if self.path is not None:
                return Image.open(self.path)
            return Image.open(io.BytesIO(self.data or b""))
        except FileNotFoundError as exc:
            raise ImageLoadError(f"image file not found: {self.path}") from exc
        except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as exc:
            raise ImageLoadError(f"cannot decode image {self.describe()}: {exc}") from exc

    def verify(self) -> None:
        """Check the image decodes without keeping its pixels (PIL's `verify` + a full `load`).

        `verify()` alone only checks PNG chunk CRCs and JPEG headers, so truncated pixel data would slip
        through; a full decode is the only honest check and costs little for the small images we train on.
        """
        img = self._open()
        try:
            img.load()
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
            raise ImageLoadError(f"cannot decode image {self.describe()}: {exc}") from exc
        finally:
            img.close()

    def load(self) -> Image.Image:
        """Decode to an RGB PIL image (fully loaded; the file handle is closed)."""
        img = self._open()
        try:
            img.load()
            return _to_rgb(img)
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
            raise ImageLoadError(f"cannot decode image {self.describe()}: {exc}") from exc
        finally:
            img.close()


# Anything `load_image` understands: a path (str / PathLike), encoded bytes, an HF-datasets image struct
# {"bytes": ..., "path": ...}, a `data:image/...;base64,` URI, an already decoded PIL image, or an ImageRef.
ImageSource: TypeAlias = (
    str | os.PathLike[str] | bytes | bytearray | Mapping[str, Any] | Image.Image | ImageRef
)


def _to_rgb(img: Image.Image) -> Image.Image:
    """RGB copy; transparent pixels become white (the usual paper background of charts and diagrams)
    instead of the black that a plain `convert("RGB")` of an RGBA/LA/P image would produce."""
    if img.mode == "RGB":
        return img.copy()
    if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return img.convert("RGB")


def load_image(src: ImageSource, base_dir: str | os.PathLike[str] | None = None) -> Image.Image:
    """Decode any supported image source (see `ImageSource`) to an RGB PIL image.

    Raises `ImageLoadError` (a ValueError) naming the path / byte count and the decoder's complaint.
    """
    if isinstance(src, Image.Image):
        return _to_rgb(src)
    return ImageRef.from_source(src, base_dir).load()


def resize_to_bounds(
    img: Image.Image,
    *,
    max_side: int | None = None,
    min_pixels: int | None = None,
    max_pixels: int | None = None,
    resample: Image.Resampling = Image.Resampling.BICUBIC,
) -> Image.Image:
    """Rescale `img` (aspect ratio kept) so that its longer side <= max_side and min_pixels <= w*h <= max_pixels.

    Why here and not only in the HF processor: the processor resizes too, but bounding the size first keeps
    huge scans from being shipped to the rollout server and decoded there at full resolution. The upper
    bounds win when they conflict with `min_pixels`.
    """
    w, h = img.size
    scale = 1.0
    if min_pixels is not None and w * h < min_pixels:
        scale = math.sqrt(min_pixels / (w * h))
    if max_pixels is not None and w * h * scale * scale > max_pixels:
        scale = math.sqrt(max_pixels / (w * h))
    if max_side is not None and max(w, h) * scale > max_side:
        scale = max_side / max(w, h)
    if abs(scale - 1.0) < 1e-9:
        return img
    new_size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return img.resize(new_size, resample=resample)


@runtime_checkable
class ImagePipeline(Protocol):
    """Turns the image refs of a batch of prompts into inputs for the model's HF processor.

    Batch-in, batch-out, and fed with *undecoded* refs, so that a GPU implementation (DALI, later, in its
    own adapter module) can decode and resize the whole batch on the device. Implementations return one
    image per ref, in order: PIL images (CPU) or CHW uint8 tensors (GPU).
    """

    def __call__(self, refs: Sequence[ImageRef]) -> list[Any]: ...


@dataclass(frozen=True)
class PILImagePipeline:
    """CPU image pipeline: decode with PIL, convert to RGB, bound the size (see `resize_to_bounds`)."""

    max_side: int | None = None
    """Longer side limit in pixels (None: unbounded)."""
    min_pixels: int | None = None
    """Upscale smaller images to at least this many pixels (tiny crops give the vision tower no patches)."""
    max_pixels: int | None = None
    """Downscale larger images to at most this many pixels (bounds image tokens per prompt)."""

    def __post_init__(self) -> None:
        for name in ("max_side", "min_pixels", "max_pixels"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"PILImagePipeline.{name} must be positive or None, got {value}")
        if self.min_pixels and self.max_pixels and self.min_pixels > self.max_pixels:
            raise ValueError(f"min_pixels {self.min_pixels} > max_pixels {self.max_pixels}")

    def process(self, ref: ImageSource) -> Image.Image:
        """One image: any `load_image` source -> bounded RGB PIL image."""
        img = load_image(ref)
        return resize_to_bounds(
            img, max_side=self.max_side, min_pixels=self.min_pixels, max_pixels=self.max_pixels
        )

    def __call__(self, refs: Sequence[ImageRef]) -> list[Image.Image]:
        return [self.process(ref) for ref in refs]
