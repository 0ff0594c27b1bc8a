"""One prompt's model inputs with the image work done by `calibrl_mcore.data.dali`, not by the HF processor.

`processor(text=[text], images=images)` does two things: it preprocesses the images (CPU, PIL) and it
expands each image placeholder in the chat text into the image's token segment before tokenising:

    Qwen2-VL / Qwen2.5-VL   <|image_pad|>  ->  <|image_pad|> x (grid_t * grid_h * grid_w // merge_size**2)
    InternVL                <IMG_CONTEXT>  ->  <img> <IMG_CONTEXT> x (image_seq_length * n_tiles) </img>

`VisionPromptEncoder` does the same with `preprocess_images` (DALI on the GPU, or the PIL path, which is
bit-identical to the processor) + `to_model_inputs`, then expands the placeholders from the resulting
`image_grid_thw` / `num_patches` and calls the tokenizer itself. With the PIL backend its output equals the
processor's (tests/test_vision_inputs.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

from calibrl_mcore.data.dali import (
    ImageBackend,
    ImageSpec,
    plan_resize,
    preprocess_images,
    resolve_image_backend,
    to_model_inputs,
)
from calibrl_mcore.data.images import ImageSource

__all__ = [
    "ImagePlaceholders",
    "PromptTokenizer",
    "VisionPromptEncoder",
    "expand_image_placeholders",
    "image_token_counts",
    "planned_image_inputs",
]


@dataclass(frozen=True)
class ImagePlaceholders:
    """How a processor expands one image placeholder of the chat text. Build it with `from_processor`."""

    image_token: str
    """the placeholder the chat template writes once per image, repeated in the expansion
    (Qwen `<|image_pad|>`, InternVL `<IMG_CONTEXT>`)."""
    start_token: str = ""
    """written before the repeated tokens (InternVL `<img>`; Qwen's template writes its own vision_start)."""
    end_token: str = ""
    """written after them (InternVL `</img>`)."""
    tokens_per_tile: int = 0
    """tiles mode: image tokens per tile (InternVL `image_seq_length`); unused for smart_resize."""

    @classmethod
    def from_processor(cls, processor: Any, spec: ImageSpec) -> ImagePlaceholders:
        """Read the tokens off a Qwen2(.5)-VL or InternVL processor (`spec` says which kind it is)."""
        image_token = getattr(processor, "image_token", None)
        if not isinstance(image_token, str) or not image_token:
            raise ValueError(f"{type(processor).__name__} has no image_token: it does not take images")
        if spec.mode == "smart_resize":
            return cls(image_token=image_token)
        return cls(
            image_token=image_token,
            start_token=processor.start_image_token,
            end_token=processor.end_image_token,
            tokens_per_tile=int(processor.image_seq_length),
        )


def image_token_counts(
    inputs: dict[str, torch.Tensor], spec: ImageSpec, placeholders: ImagePlaceholders
) -> list[int]:
    """Image tokens per image of a `to_model_inputs` output (the repeated placeholder, not start/end)."""
    if spec.mode == "tiles":
        return [placeholders.tokens_per_tile * int(n) for n in inputs["num_patches"]]
    merge = spec.merge_size**2
    return [int(thw.prod()) // merge for thw in inputs["image_grid_thw"]]  # [n_images, 3] -> t * h * w / m²


def expand_image_placeholders(text: str, counts: Sequence[int], placeholders: ImagePlaceholders) -> str:
    """Replace the i-th image placeholder of `text` by image i's token segment (left to right, as the
    processors do); the number of placeholders must equal the number of images."""
    pieces = text.split(placeholders.image_token)  # n placeholders -> n + 1 pieces
    if len(pieces) - 1 != len(counts):
        raise ValueError(
            f"{len(pieces) - 1} {placeholders.image_token!r} placeholders in the prompt but "
            f"{len(counts)} images"
        )
    out = [pieces[0]]
    for count, piece in zip(counts, pieces[1:]):
        out += [placeholders.start_token, placeholders.image_token * count, placeholders.end_token, piece]
    return "".join(out)


def planned_image_inputs(sizes: Sequence[tuple[int, int]], spec: ImageSpec) -> dict[str, torch.Tensor]:
    """What `to_model_inputs` will report for images of these (height, width) sizes, from the sizes alone
    (`plan_resize`, the function both backends resize by): Qwen `image_grid_thw` [n_images, 3] (a still image
    is one temporal patch), InternVL `num_patches` [n_images] (tiles + thumbnail)."""
    plans = [plan_resize(h, w, spec) for h, w in sizes]
    if spec.mode == "tiles":
        tiles = [p.rows * p.cols + (p.thumbnail is not None) for p in plans]
        return {"num_patches": torch.tensor(tiles, dtype=torch.int64)}
    grids = [[1, p.height // spec.patch_size, p.width // spec.patch_size] for p in plans]
    return {"image_grid_thw": torch.tensor(grids, dtype=torch.int64).reshape(-1, 3)}


class PromptTokenizer:
    """The processor's prompt token ids from the chat text and the images' sizes, without touching pixels:
    what the data-plane driver needs to plan and ship a step (the replicas encode the pixels). The image
    spec is read on the first prompt with images, so text-only processors work too."""

    def __init__(self, processor: Any) -> None:
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self._spec: tuple[ImageSpec, ImagePlaceholders] | None = None

    @property
    def spec(self) -> tuple[ImageSpec, ImagePlaceholders]:
        if self._spec is None:
            spec = ImageSpec.from_processor(self.processor)
            self._spec = spec, ImagePlaceholders.from_processor(self.processor, spec)
        return self._spec

    def tokenize(self, text: str, inputs: dict[str, torch.Tensor]) -> list[int]:
        """Token ids of `text` with its image placeholders expanded for `inputs` (`to_model_inputs` or
        `planned_image_inputs` of its images; {} for none), as the processor tokenises."""
        if inputs:
            spec, placeholders = self.spec
            text = expand_image_placeholders(text, image_token_counts(inputs, spec, placeholders), placeholders)
        elif (token := getattr(self.processor, "image_token", None)) and token in text:
            raise ValueError(f"{token!r} placeholders in the prompt but no images")
        # The processor tokenises the expanded text with the tokenizer's defaults (special tokens added).
        return self.tokenizer(text)["input_ids"]

    def __call__(self, text: str, sizes: Sequence[tuple[int, int]]) -> tuple[list[int], dict[str, torch.Tensor]]:
        """(prompt ids, planned image inputs) for images of (height, width) `sizes`."""
        inputs = planned_image_inputs(sizes, self.spec[0]) if sizes else {}
        return self.tokenize(text, inputs), inputs


class VisionPromptEncoder:
    """`processor(text=[text], images=images)` for one prompt, with `preprocess_images` doing the pixels.

    `backend` is resolved once here ("auto": DALI when CUDA and nvidia.dali are there, else PIL with one
    warning per process). Outputs: `input_ids` (list[int]), `pixel_values` and `image_grid_thw` (Qwen) or
    `num_patches` (InternVL), on the GPU with DALI, on the CPU with PIL; no pixel keys without images."""

    def __init__(
        self, processor: Any, backend: ImageBackend = "auto", device: torch.device | int | None = None
    ) -> None:
        self.prompts = PromptTokenizer(processor)
        self.spec, self.placeholders = self.prompts.spec
        self.backend: Literal["dali", "pil"] = resolve_image_backend(backend)
        self.device = device

    def __call__(self, text: str, images: Sequence[ImageSource]) -> dict[str, Any]:
        inputs: dict[str, Any] = {}
        if images:
            views = preprocess_images(images, self.spec, self.backend, self.device)  # [n_views, 3, H, W] each
            inputs = to_model_inputs(views, self.spec)
        inputs["input_ids"] = self.prompts.tokenize(text, inputs)
        return inputs
