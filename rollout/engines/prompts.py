"""Turning a request (text or token ids, plus images) into model inputs for the embedded engine.

Images always go through the model's own HF processor, so the number of image tokens, the pixel
layout and the rotary positions are exactly what the model was trained with.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Any

import torch

from rollout.engines.base import EngineInputError, GenerateRequest
from rollout.engines.kv_batch import PromptState

# Processor outputs that are not forward() inputs of the prefill, or that we pass ourselves.
_NOT_MODEL_KWARGS = {"input_ids", "attention_mask"}


def load_processor(model_path: str) -> Any:
    """AutoProcessor, or the same processor class without its video processor.

    transformers 5 refuses to build Qwen2.5-VL / InternVL processors when torchvision is missing (their
    *video* processors need it), although images work through the PIL image processors. We do not
    serve video, so on that ImportError we assemble the processor from its tokenizer and image
    processor and skip the class check that insists on a video processor.
    """
    import transformers
    from transformers import AutoConfig, AutoImageProcessor, AutoProcessor, AutoTokenizer

    try:
        return AutoProcessor.from_pretrained(model_path)
    except ImportError as exc:
        if "orchvision" not in str(exc):
            raise
    from transformers.models.auto.processing_auto import PROCESSOR_MAPPING_NAMES

    config = AutoConfig.from_pretrained(model_path)
    processor_class = getattr(transformers, PROCESSOR_MAPPING_NAMES[config.model_type])

    class _ImageOnlyProcessor(processor_class):  # type: ignore[misc, valid-type]
        def check_argument_for_proper_class(self, argument_name: str, argument: Any) -> None:
            return None

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    extra: dict[str, Any] = {}
    config_file = Path(model_path) / "processor_config.json"
    if config_file.exists():
        # Keep scalar settings such as InternVL's image_seq_length; sub-processor configs are loaded below.
        accepted = set(inspect.signature(processor_class.__init__).parameters) - set(processor_class.get_attributes())
        extra = {k: v for k, v in json.loads(config_file.read_text()).items() if k in accepted}
    return _ImageOnlyProcessor(
        image_processor=AutoImageProcessor.from_pretrained(model_path),
        tokenizer=tokenizer,
        video_processor=None,
        chat_template=tokenizer.chat_template,
        **extra,
    )


class PromptBuilder:
    """Tokenizes prompts, preprocesses images and computes the prefill's position ids."""

    def __init__(self, processor: Any, model: Any, device: torch.device, dtype: torch.dtype) -> None:
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.device, self.dtype = device, dtype
        self.image_token: str | None = getattr(processor, "image_token", None)
        self.image_token_id: int | None = getattr(processor, "image_token_id", None)
        self._forward_params = set(inspect.signature(model.forward).parameters)
        # M-RoPE models (Qwen2-VL family) expose get_rope_index: image tokens get 3-D positions, and the
        # text after an image continues from max(position) + 1 rather than from the token count.
        inner = getattr(model, "model", None)
        self._get_rope_index = getattr(inner, "get_rope_index", None)
        self._rope_index_params = (
            set(inspect.signature(self._get_rope_index).parameters) if self._get_rope_index else set()
        )

    def build(self, request: GenerateRequest) -> PromptState:
        if (request.text is None) == (request.input_ids is None):
            raise EngineInputError("text", "give exactly one of text / input_ids")
        if request.images and self.image_token is None:
            raise EngineInputError("image_data", "this model's processor takes no images")
        if request.text is not None:
            ids, extras = self._from_text(request.text, request.images)
        else:
            ids, extras = self._from_ids(request.input_ids or [], request.images)
        if ids.numel() == 0:
            raise EngineInputError("input_ids" if request.input_ids is not None else "text", "empty prompt")
        vocab = self.tokenizer.__len__()
        if request.input_ids is not None and (int(ids.min()) < 0 or int(ids.max()) >= vocab):
            raise EngineInputError("input_ids", f"token ids must be in [0, {vocab})")
        return self._state(ids, extras)

    def _from_text(self, text: str, images: list[Any]) -> tuple[torch.Tensor, dict[str, Any]]:
        if not images:
            return torch.tensor(self.tokenizer(text)["input_ids"], dtype=torch.int64), {}
        placeholders = text.count(self.image_token or "")
        if placeholders != len(images):
            raise EngineInputError(
                "image_data", f"{len(images)} images but the text has {placeholders} {self.image_token!r} placeholders"
            )
        out = self._process(text=[text], images=images)
        return out.pop("input_ids")[0], out

    def _from_ids(self, ids: list[int], images: list[Any]) -> tuple[torch.Tensor, dict[str, Any]]:
        tensor = torch.tensor(ids, dtype=torch.int64)
        if not images:
            return tensor, {}
        # Expand each image placeholder into the processor's token segment for that image
        # (Qwen: N x <|image_pad|>; InternVL: <img> N x <IMG_CONTEXT> </img>).
        segments, pixel_parts = [], []
        for image in images:
            out = self._process(text=[self.image_token], images=[image])
            segments.append(out.pop("input_ids")[0])
            out.pop("mm_token_type_ids", None)
            out.pop("attention_mask", None)
            pixel_parts.append(out)
        extras = {key: torch.cat([part[key] for part in pixel_parts]) for key in pixel_parts[0]}
        is_image = tensor == self.image_token_id
        expanded_count = sum(int((s == self.image_token_id).sum()) for s in segments)
        if int(is_image.sum()) == expanded_count:
            expanded = tensor  # the caller already expanded the placeholders
        elif int(is_image.sum()) == len(images):
            pieces, start = [], 0
            for position, segment in zip(is_image.nonzero().flatten().tolist(), segments):
                pieces += [tensor[start:position], segment]
                start = position + 1
            expanded = torch.cat(pieces + [tensor[start:]])
        else:
            raise EngineInputError(
                "image_data",
                f"{len(images)} images but input_ids hold {int(is_image.sum())} image tokens "
                f"(expected {len(images)} placeholders or {expanded_count} expanded tokens)",
            )
        if "mm_token_type_ids" in self._forward_params:
            extras["mm_token_type_ids"] = (expanded == self.image_token_id).to(torch.int32)[None, :]
        return expanded, extras

    def _process(self, **inputs: Any) -> dict[str, Any]:
        try:
            out = self.processor(**inputs, return_tensors="pt")
        except (ValueError, TypeError, OSError) as exc:
            raise EngineInputError("image_data", f"the processor rejected the image: {exc}") from exc
        return dict(out)

    def _state(self, ids: torch.Tensor, extras: dict[str, Any]) -> PromptState:
        length = int(ids.shape[0])
        positions = torch.arange(length, dtype=torch.int64)[None, :]  # [1, L]
        next_position = length
        if self._get_rope_index is not None:
            positions = positions[None].expand(3, -1, -1)  # [3, 1, L]
            if "image_grid_thw" in extras:
                kwargs = {"attention_mask": torch.ones(1, length, dtype=torch.int64), **extras}
                kwargs = {k: v for k, v in kwargs.items() if k in self._rope_index_params}
                positions, deltas = self._get_rope_index(ids[None, :], **kwargs)  # [3, 1, L], [1, 1]
                next_position = length + int(deltas.flatten()[0])
        model_kwargs = {}
        for key, value in extras.items():
            if key in _NOT_MODEL_KWARGS or key not in self._forward_params:
                continue
            if torch.is_tensor(value):
                value = value.to(self.device, dtype=self.dtype if value.is_floating_point() else value.dtype)
            model_kwargs[key] = value
        return PromptState(ids.to(self.device), positions.to(self.device), next_position, model_kwargs)
