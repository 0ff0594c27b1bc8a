"""Prompt data: ViRL-style rows -> `Example`s, the CalibRL prompt template, image pipelines, samplers and a
synthetic visual task generator for tiny-model runs.

    ds = PromptDataset.from_path("data/train.jsonl", tokenizer=processor, max_prompt_tokens=2048)
    sampler = ds.sampler()                       # resumable: sampler.state_dict() goes into checkpoints
    batch = [ds[i] for i in sampler.next_batch(8)]
    messages = build_messages(batch[0])          # -> processor.apply_chat_template(messages, ...)
    images = PILImagePipeline(max_pixels=112 * 112)(batch[0].images)
"""

from calibrl_mcore.data.dataset import PromptDataset, PromptSampler, count_prompt_tokens, split
from calibrl_mcore.data.images import (
    ImageLoadError,
    ImagePipeline,
    ImageRef,
    ImageSource,
    PILImagePipeline,
    load_image,
    resize_to_bounds,
)
from calibrl_mcore.data.schema import Example, RowError, parse_row
from calibrl_mcore.data.synth import TASK_KINDS, generate_synthetic
from calibrl_mcore.data.template import (
    IMAGE_PLACEHOLDER,
    INSTRUCTION,
    as_expert_response,
    build_messages,
    render_prompt_text,
)

__all__ = [
    "IMAGE_PLACEHOLDER",
    "INSTRUCTION",
    "TASK_KINDS",
    "Example",
    "ImageLoadError",
    "ImagePipeline",
    "ImageRef",
    "ImageSource",
    "PILImagePipeline",
    "PromptDataset",
    "PromptSampler",
    "RowError",
    "as_expert_response",
    "build_messages",
    "count_prompt_tokens",
    "generate_synthetic",
    "load_image",
    "parse_row",
    "render_prompt_text",
    "resize_to_bounds",
    "split",
]
