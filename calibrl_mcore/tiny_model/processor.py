"""The tiny checkpoints' processors: building, saving and loading them (also without torchvision)."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

from calibrl_mcore.tiny_model.sizes import (
    INTERNVL_CHAT_TEMPLATE,
    INTERNVL_IMAGE_SIZE,
    INTERNVL_MAX_TILES,
    INTERNVL_SEQ_LEN,
    PATCH,
    QWEN_CHAT_TEMPLATE,
    QWEN_MAX_PIXELS,
    QWEN_MERGE,
    QWEN_MIN_PIXELS,
    QWEN_TEMPORAL_PATCH,
)


@contextlib.contextmanager
def _accept_missing_video_processor():
    """Let a processor be constructed with ``video_processor=None`` (ProcessorMixin type-checks it)."""
    from unittest import mock

    from transformers.processing_utils import ProcessorMixin

    orig_check = ProcessorMixin.check_argument_for_proper_class

    def check(self, argument_name, argument):
        if argument is None and argument_name == "video_processor":
            return None
        return orig_check(self, argument_name, argument)

    with mock.patch.object(ProcessorMixin, "check_argument_for_proper_class", check):
        yield


@contextlib.contextmanager
def video_processor_optional():
    """Let Qwen2_5_VLProcessor / InternVLProcessor be loaded where torchvision is missing.

    transformers 5.x makes every video processor (and ``VideoProcessorMixin`` itself) a torchvision-only
    dummy, yet ``ProcessorMixin`` always loads / type-checks the ``video_processor`` attribute of these
    processors, so without torchvision ``AutoProcessor.from_pretrained`` raises ImportError even for
    image-only use. Inside this context (and only where torchvision is unavailable) the video processor
    is simply ``None``; images and text work as usual. With torchvision installed this is a no-op.
    """
    from transformers.utils import is_torchvision_available

    if is_torchvision_available():
        yield
        return
    from unittest import mock

    from transformers.models.auto.video_processing_auto import AutoVideoProcessor

    with (
        _accept_missing_video_processor(),
        mock.patch.object(AutoVideoProcessor, "from_pretrained", classmethod(lambda cls, *a, **k: None)),
    ):
        yield


def load_processor(path: Path | str, **kwargs):
    """``AutoProcessor.from_pretrained(path)``, also on machines without torchvision (see above)."""
    from transformers import AutoProcessor

    with video_processor_optional():
        return AutoProcessor.from_pretrained(path, **kwargs)


def build_processor(arch: str, tok):
    if arch == "qwen2_5_vl":
        from transformers import Qwen2_5_VLProcessor, Qwen2VLImageProcessorPil

        image_processor = Qwen2VLImageProcessorPil(
            min_pixels=QWEN_MIN_PIXELS,
            max_pixels=QWEN_MAX_PIXELS,
            patch_size=PATCH,
            temporal_patch_size=QWEN_TEMPORAL_PATCH,
            merge_size=QWEN_MERGE,
        )
        return Qwen2_5_VLProcessor(
            image_processor=image_processor, tokenizer=tok, chat_template=QWEN_CHAT_TEMPLATE
        )
    from transformers import GotOcr2ImageProcessorPil, InternVLProcessor

    image_processor = GotOcr2ImageProcessorPil(
        size={"height": INTERNVL_IMAGE_SIZE, "width": INTERNVL_IMAGE_SIZE},
        crop_to_patches=True,
        min_patches=1,
        max_patches=INTERNVL_MAX_TILES,
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=[0.485, 0.456, 0.406],
        image_std=[0.229, 0.224, 0.225],
        do_convert_rgb=True,
    )
    return InternVLProcessor(
        image_processor=image_processor,
        tokenizer=tok,
        image_seq_length=INTERNVL_SEQ_LEN,
        chat_template=INTERNVL_CHAT_TEMPLATE,
    )


def video_processor_config(arch: str) -> dict[str, Any]:
    """The ``video_processor`` entry of processor_config.json (written by hand: video processors need torchvision).

    Only used where torchvision is installed (transformers then always loads a video processor and fails
    without a config for it); sizes match the image side so a frame gives as few tokens as an image."""
    if arch == "qwen2_5_vl":
        return {
            "video_processor_type": "Qwen2VLVideoProcessor",
            "size": {"shortest_edge": QWEN_MIN_PIXELS, "longest_edge": QWEN_MAX_PIXELS},
            "patch_size": PATCH,
            "temporal_patch_size": QWEN_TEMPORAL_PATCH,
            "merge_size": QWEN_MERGE,
            "min_frames": 2,
            "max_frames": 8,
            "do_sample_frames": False,
            "cap_pixels_per_frame": True,
            "image_mean": [0.48145466, 0.4578275, 0.40821073],
            "image_std": [0.26862954, 0.26130258, 0.27577711],
        }
    return {
        "video_processor_type": "InternVLVideoProcessor",
        "size": {"height": INTERNVL_IMAGE_SIZE, "width": INTERNVL_IMAGE_SIZE},
        "initial_shift": True,
        "do_sample_frames": False,
        "image_mean": [0.485, 0.456, 0.406],
        "image_std": [0.229, 0.224, 0.225],
    }


def save_processor(processor, out_dir: Path, video_config: dict[str, Any] | None = None) -> None:
    """``processor.save_pretrained(out_dir)`` for a processor whose ``video_processor`` is None.

    Same files as transformers 5.x writes (tokenizer files, ``chat_template.jinja`` and a nested
    ``processor_config.json`` holding the image processor), plus ``video_config`` as its video entry."""
    out_dir = Path(out_dir)
    tok = processor.tokenizer
    if hasattr(tok, "_set_processor_class"):
        tok._set_processor_class(type(processor).__name__)
    tok.save_pretrained(out_dir)
    # Legacy standalone preprocessor_config.json too (what transformers 4.x and inference engines read).
    processor.image_processor.save_pretrained(out_dir)
    (out_dir / "chat_template.jinja").write_text(processor.chat_template, encoding="utf-8")
    cfg = processor.to_dict()
    cfg.pop("video_processor", None)
    if video_config is not None:
        cfg["video_processor"] = video_config
    (out_dir / "processor_config.json").write_text(
        json.dumps(cfg, indent=2, sort_keys=True) + "\n", encoding="utf-8"
    )
