"""One prompt of the RL data set (`Example`) and the parser from ViRL/CalibRL-style rows.

Accepted row schema (jsonl objects or parquet rows; the first present alias wins):
- question: `question` | `problem`                  (str; may contain `<image>` placeholders)
- images:   `images` | `image`                      (one value or a list; each a path relative to the data
                                                     file's folder, raw bytes, `{"bytes", "path"}`, data URI)
- answer:   `answer`                                (str or number; the verifier's gold)
- experts:  `solution` | `expert` | `experts`       (str or list of str; reference chains of thought)
- uid:      `uid` | `id`                            (optional; default `<file stem>-<row index>`)
- meta:     `meta` (dict, merged) + every other column, kept for logging and slicing metrics.

Images are kept as lazy `ImageRef`s (a resolved path or the encoded bytes) and decoded by the image
pipeline at rollout time; parsing only *verifies* that they decode, so a bad image is a skipped row at
load time rather than a crash in the middle of a training step.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from calibrl_mcore.data.images import ImageLoadError, ImagePipeline, ImageRef, PILImagePipeline
from calibrl_mcore.data.template import as_expert_response, count_image_placeholders

__all__ = ["Example", "RowError", "parse_row"]

QUESTION_KEYS = ("question", "problem")
IMAGE_KEYS = ("images", "image")
ANSWER_KEYS = ("answer",)
EXPERT_KEYS = ("solution", "expert", "experts")
UID_KEYS = ("uid", "id")
_CONSUMED = frozenset((*QUESTION_KEYS, *IMAGE_KEYS, *ANSWER_KEYS, *EXPERT_KEYS, *UID_KEYS, "meta"))


@dataclass
class Example:
    """One prompt: question + images, the verifier's gold answer and one or more expert responses."""

    uid: str
    question: str
    answer: str
    images: list[ImageRef]
    """Lazy references; decode with `load_images()` (or a batch `ImagePipeline`)."""
    experts: list[str]
    """Expert responses in the `<think>…</think><answer>…</answer>` format (bare prose is wrapped)."""
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def expert(self) -> str:
        """The first expert response (CalibRL uses one expert trajectory per prompt)."""
        if not self.experts:
            raise ValueError(f"example {self.uid!r} has no expert solution")
        return self.experts[0]

    def load_images(self, pipeline: ImagePipeline | None = None) -> list[Any]:
        """Decoded images, in order (default: RGB PIL images at their stored size)."""
        return (pipeline or PILImagePipeline())(self.images)


class RowError(ValueError):
    """A row that cannot become an `Example`; says which row, which uid and which field."""

    def __init__(self, index: int, uid: str | None, field_name: str, message: str) -> None:
        self.index, self.uid, self.field_name = index, uid, field_name
        where = f"row {index}" + (f" (uid {uid!r})" if uid is not None else "")
        super().__init__(f"{where}: field {field_name!r}: {message}")


def _first_present(row: Mapping[str, Any], keys: Sequence[str]) -> tuple[str | None, Any]:
    """(key, value) of the first alias with a non-null value; (None, None) when none has one."""
    for key in keys:
        if row.get(key) is not None:
            return key, row[key]
    return None, None


def _as_text(value: Any) -> str | None:
    """Strings as they are; numbers (parquet int/float answers) as their str(); anything else None."""
    if isinstance(value, str):
        return value
    if isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)
    return None


def _image_values(value: Any) -> list[Any]:
    """A row's image field as a list: None -> [], a single value -> [value], a list/tuple as is."""
    if value is None:
        return []
    if isinstance(value, list | tuple):
        return list(value)
    return [value]


def _parse_experts(
    index: int, uid: str, key: str | None, value: Any, answer: str, required: bool
) -> list[str]:
    if key is None:
        if required:
            raise RowError(index, uid, "/".join(EXPERT_KEYS), "missing (an expert solution is required)")
        return []
    raw = [value] if isinstance(value, str) else value
    if not isinstance(raw, list | tuple) or not all(isinstance(s, str) for s in raw):
        raise RowError(index, uid, key, f"expected a string or a list of strings, got {type(value).__name__}")
    experts = [as_expert_response(s, answer) for s in raw if s.strip()]
    if required and not experts:
        raise RowError(index, uid, key, "empty")
    return experts


def _parse_images(
    index: int, uid: str, key: str | None, value: Any, base_dir: Path | None, verify: bool
) -> list[ImageRef]:
    refs: list[ImageRef] = []
    for i, src in enumerate(_image_values(value)):
        try:
            ref = ImageRef.from_source(src, base_dir)
            if verify:
                ref.verify()
        except ImageLoadError as exc:
            raise RowError(index, uid, f"{key}[{i}]", str(exc)) from exc
        refs.append(ref)
    return refs


def parse_row(
    row: Any,
    index: int,
    *,
    base_dir: str | Path | None = None,
    uid_prefix: str = "row",
    max_images: int | None = None,
    require_expert: bool = True,
    verify_images: bool = True,
) -> Example:
    """Parse one ViRL-style row (see the module docstring) into an `Example`.

    `index` is the row's position in its file (0-based; for jsonl, line index+1) and only names the row in
    errors and in the default uid. Raises `RowError` (a ValueError) naming the row, uid and field.
    """
    if not isinstance(row, Mapping):
        raise RowError(index, None, "<row>", f"expected an object, got {type(row).__name__}")
    _, uid_value = _first_present(row, UID_KEYS)
    uid = str(uid_value) if uid_value is not None else f"{uid_prefix}-{index}"

    q_key, q_value = _first_present(row, QUESTION_KEYS)
    question = q_value if isinstance(q_value, str) else None  # a numeric "question" is a schema mix-up
    if question is None or not question.strip():
        field_name = q_key or "/".join(QUESTION_KEYS)
        raise RowError(
            index, uid, field_name, "missing or empty" if q_key is None else "not a non-empty string"
        )

    a_key, a_value = _first_present(row, ANSWER_KEYS)
    answer = _as_text(a_value)
    if answer is None or not answer.strip():
        raise RowError(
            index, uid, "answer", "missing or empty" if a_key is None else "not a non-empty string"
        )
    answer = answer.strip()

    e_key, e_value = _first_present(row, EXPERT_KEYS)
    experts = _parse_experts(index, uid, e_key, e_value, answer, require_expert)

    i_key, i_value = _first_present(row, IMAGE_KEYS)
    images = _parse_images(index, uid, i_key, i_value, Path(base_dir) if base_dir else None, verify_images)
    if max_images is not None and len(images) > max_images:
        raise RowError(index, uid, i_key or "images", f"{len(images)} images > max_images={max_images}")
    placeholders = count_image_placeholders(question)
    if placeholders not in (0, len(images)):
        raise RowError(
            index, uid, q_key or "question", f"{placeholders} <image> placeholders for {len(images)} images"
        )

    meta = {k: v for k, v in row.items() if k not in _CONSUMED}
    if isinstance(row.get("meta"), Mapping):
        meta.update(row["meta"])
    elif row.get("meta") is not None:
        meta["meta"] = row["meta"]
    return Example(uid=uid, question=question, answer=answer, images=images, experts=experts, meta=meta)
