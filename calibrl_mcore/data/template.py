"""The CalibRL prompt template: `<image>` + question + an instruction to answer in the reward's format.

The instruction must describe exactly the protocol that `rewards.format_reward` checks (one `<think>`
block, then one `<answer>` block) and put the final answer where `rewards.extract_answer` looks for it;
otherwise the 0.1 format bonus rewards something the prompt never asked for.

Messages are built in the Hugging Face chat format with `{"type": "image"}` content parts, so each
model's own processor (`processor.apply_chat_template`) inserts its image tokens
(Qwen2.5-VL: `<|vision_start|><|image_pad|><|vision_end|>`, InternVL: `<IMG_CONTEXT>`).
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from calibrl_mcore.data.schema import Example

__all__ = [
    "IMAGE_PLACEHOLDER",
    "INSTRUCTION",
    "as_expert_response",
    "build_messages",
    "count_image_placeholders",
    "render_prompt_text",
]

IMAGE_PLACEHOLDER = "<image>"
"""Where a ViRL-style question puts its images; also what `render_prompt_text` emits per image."""

INSTRUCTION = (
    "First think step by step inside <think> </think>, "
    "then give only the final answer inside <answer> </answer>."
)
"""Appended to every question (user turn). No custom system prompt: each model keeps its default one."""

_PLACEHOLDER_RE = re.compile(r"\s*<image>\s*", re.IGNORECASE)
_TAG_RE = re.compile(r"<\s*/?\s*(?:think|answer)\s*>", re.IGNORECASE)


def count_image_placeholders(question: str) -> int:
    """Number of `<image>` placeholders already written into a question."""
    return len(_PLACEHOLDER_RE.findall(question))


def _segments(question: str, num_images: int) -> list[str | None]:
    """The question as text segments and image slots (None), in reading order.

    A question without placeholders gets all its images first (the CalibRL template); one with exactly one
    placeholder per image keeps them where the author put them (interleaved multi-image questions).
    """
    placeholders = count_image_placeholders(question)
    if placeholders == 0:
        return [None] * num_images + [question.strip()]
    if placeholders != num_images:
        raise ValueError(
            f"question has {placeholders} {IMAGE_PLACEHOLDER} placeholders but the example has "
            f"{num_images} images: {question[:80]!r}"
        )
    out: list[str | None] = []
    for i, text in enumerate(_PLACEHOLDER_RE.split(question)):
        if i > 0:
            out.append(None)
        if text.strip():
            out.append(text.strip())
    return out


def _with_instruction(segments: list[str | None], instruction: str) -> list[str | None]:
    """Attach the instruction to the last text segment (or add one after a trailing image)."""
    if instruction and segments and isinstance(segments[-1], str):
        return [*segments[:-1], f"{segments[-1]}\n{instruction}"]
    return [*segments, instruction] if instruction else segments


def build_messages(
    example: Example,
    *,
    images: list[Any] | None = None,
    system_prompt: str | None = None,
    instruction: str = INSTRUCTION,
) -> list[dict[str, Any]]:
    """HF chat messages for one prompt: `[{"role": "user", "content": [image parts..., text part]}]`.

    `images`: optional decoded images to embed in the image parts (`{"type": "image", "image": img}`), for
    processors that tokenize from the messages directly; without them the parts are bare placeholders
    and the caller passes the images to the processor. `system_prompt`: None keeps the model's default.
    """
    n = len(example.images)
    if images is not None and len(images) != n:
        raise ValueError(f"example {example.uid!r} has {n} images, got {len(images)} decoded images")
    content: list[dict[str, Any]] = []
    image_iter = iter(images or [])
    for seg in _with_instruction(_segments(example.question, n), instruction):
        if seg is None:
            part: dict[str, Any] = {"type": "image"}
            if images is not None:
                part["image"] = next(image_iter)
            content.append(part)
        else:
            content.append({"type": "text", "text": seg})
    messages: list[dict[str, Any]] = []
    if system_prompt is not None:
        messages.append({"role": "system", "content": [{"type": "text", "text": system_prompt}]})
    messages.append({"role": "user", "content": content})
    return messages


def render_prompt_text(example: Example, *, instruction: str = INSTRUCTION) -> str:
    """Model-agnostic plain text of the user turn, one `<image>` per image (logs, length estimates)."""
    segments = _with_instruction(_segments(example.question, len(example.images)), instruction)
    return "".join(IMAGE_PLACEHOLDER if seg is None else seg for seg in segments)


def as_expert_response(solution: str, answer: str) -> str:
    """An expert solution as a response in the reward's format.

    Data sets store the reference chain of thought either already tagged (`<think>…</think><answer>…
    </answer>`) or as bare prose. Bare prose is wrapped (`<think>prose</think><answer>gold</answer>`) so the
    expert row teaches the same format the rollouts are rewarded for; a solution with any think/answer tag
    is kept verbatim (re-tagging a partly tagged text would hide a data problem rather than fix it).
    """
    text = solution.strip()
    if _TAG_RE.search(text):
        return text
    return f"<think>{text}</think><answer>{answer.strip()}</answer>"
