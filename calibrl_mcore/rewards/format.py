"""Format reward: did the rollout follow the `<think>…</think><answer>…</answer>` protocol?

The format term is small (0.1 in the CalibRL reward) but it is what teaches the policy to put its final
answer where `extract_answer` looks for it, so it must be strict about the *structure* (one think block,
then one answer block, nothing after) while forgiving cosmetic noise (whitespace, tag case, the chat
template's end-of-turn token when the rollout engine did not strip special tokens).
"""

from __future__ import annotations

import re

__all__ = ["format_reward", "tag_regex"]


def tag_regex(name: str, *, closing: bool) -> str:
    """Regex source matching `<name>` (or `</name>` when `closing`), any case, spaces inside the brackets.

    Shared with `answer.extract_answer` so that whatever the format reward accepts as a tag, the
    extractor accepts too (otherwise a format-valid rollout could still score acc=0 for a tag typo).
    """
    slash = r"/\s*" if closing else ""
    return rf"<\s*{slash}{name}\s*>"


_THINK_OPEN = tag_regex("think", closing=False)
_THINK_CLOSE = tag_regex("think", closing=True)
_ANSWER_OPEN = tag_regex("answer", closing=False)
_ANSWER_CLOSE = tag_regex("answer", closing=True)

# End-of-turn markers a rollout may carry when decoded with special tokens kept: `<|im_end|>`,
# `<|endoftext|>`, `</s>`. They are not "substantive" text, so they may trail the answer block.
_TRAILING_SPECIAL_TOKENS = r"(?:\s*(?:<\|[^|<>]{1,40}\|>|</s>))*"

_FORMAT_RE = re.compile(
    rf"\s*{_THINK_OPEN}(?P<think>.*?){_THINK_CLOSE}"
    rf"\s*{_ANSWER_OPEN}(?P<answer>.*?){_ANSWER_CLOSE}"
    rf"{_TRAILING_SPECIAL_TOKENS}\s*",
    re.DOTALL | re.IGNORECASE,
)
_EACH_TAG_RE = [re.compile(p, re.IGNORECASE) for p in (_THINK_OPEN, _THINK_CLOSE, _ANSWER_OPEN, _ANSWER_CLOSE)]


def format_reward(text: str) -> float:
    """1.0 iff `text` is exactly one non-empty think block followed by one non-empty answer block.

    Rules (why):
    - only whitespace before `<think>` and between the blocks: anything else is prose outside the
      protocol, which the grader would have to guess about;
    - nothing but whitespace / end-of-turn special tokens after `</answer>`: text after the answer
      (a second guess, a "wait, actually…") makes the extracted answer ambiguous;
    - exactly one of each tag: the lazy groups of the regex could otherwise swallow a second block;
    - both blocks non-empty: an empty `<think></think>` would let the policy collect the format bonus
      while skipping the reasoning the bonus is meant to encourage.
    Non-string input scores 0.0 rather than raising, so a bad rollout never crashes a reward batch.
    """
    if not isinstance(text, str):
        return 0.0
    match = _FORMAT_RE.fullmatch(text)
    if match is None:
        return 0.0
    if any(len(tag.findall(text)) != 1 for tag in _EACH_TAG_RE):
        return 0.0
    if not match["think"].strip() or not match["answer"].strip():
        return 0.0
    return 1.0
