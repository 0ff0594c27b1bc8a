"""Final-answer extraction, normalisation and equivalence (the `acc` term of the CalibRL reward).

`extract_answer` takes the last `<answer>` block (unwrapping `\\boxed{}`); `normalize_answer` removes
presentation math-verify does not know about (`$…$`, `\\text{}`, units, degree marks, thousands
separators, "The answer is"); `is_equivalent` decides by letter for multiple-choice golds, otherwise
with math-verify (`parse` both sides as LaTeX, then `verify(gold, pred)`). The equivalence rules
(percent, units, multiple choice, timeout) are listed in the package docstring, `rewards/__init__.py`.
"""

from __future__ import annotations

import logging
import math
import re
import signal
import threading
from collections.abc import Callable
from typing import TypeVar

from calibrl_mcore.rewards.format import tag_regex

__all__ = [
    "MAX_ANSWER_CHARS", "extract_answer", "extract_choice_letter", "is_equivalent", "normalize_answer", "unwrap_boxed"
]

logger = logging.getLogger(__name__)

MAX_ANSWER_CHARS = 1000
"""Longer answers are judged wrong unparsed: a final answer is short, and sympy on kilobytes of text is
where pathological parse times come from."""

_T = TypeVar("_T")

# --- Extraction ------------------------------------------------------------------------------------

_ANSWER_OPEN_RE = re.compile(tag_regex("answer", closing=False), re.IGNORECASE)
_ANSWER_CLOSE_RE = re.compile(tag_regex("answer", closing=True), re.IGNORECASE)
_BOXED_RE = re.compile(r"\\(?:boxed|fbox)\s*\{")


def unwrap_boxed(text: str) -> str:
    """Content of the last balanced `\\boxed{…}` / `\\fbox{…}` in `text`, else `text` unchanged.

    Models trained on MATH-style data box their answer even inside `<answer>`; the box is presentation.
    Nested braces (`\\boxed{\\frac{1}{2}}`) need a brace stack, which a regex cannot do; one pass over
    the text keeps degenerate rollouts ("\\boxed{" repeated thousands of times) linear.
    """
    box_braces = {match.end() - 1 for match in _BOXED_RE.finditer(text)}  # index of each box's "{"
    if not box_braces:
        return text
    open_braces: list[int] = []
    last_box: tuple[int, int] | None = None  # (open, close) of the box that starts last
    for i, char in enumerate(text):
        if char not in "{}" or text[i - 1 : i] == "\\":  # skip escaped \{ and \}
            continue
        if char == "{":
            open_braces.append(i)
        elif open_braces:
            start = open_braces.pop()
            if start in box_braces and (last_box is None or start > last_box[0]):
                last_box = (start, i)
    return text if last_box is None else text[last_box[0] + 1 : last_box[1]].strip()


def extract_answer(text: str) -> str | None:
    """The stripped content of the LAST `<answer>…</answer>` block, `\\boxed{}` unwrapped.

    Last, because a rollout that revises itself ends with its final word: we take the last closing tag
    and the last opening tag before it (linear, unlike a lazy findall on "<answer>" × 4000). None when
    there is no closed block (a truncated rollout earns no accuracy) or it is empty. No fallback to a
    bare `\\boxed{}` outside the tags: accuracy stays tied to the answer protocol the prompt asks for.
    """
    if not isinstance(text, str):
        return None
    closings = list(_ANSWER_CLOSE_RE.finditer(text))
    openings = list(_ANSWER_OPEN_RE.finditer(text, 0, closings[-1].start())) if closings else []
    if not openings:
        return None
    return unwrap_boxed(text[openings[-1].end() : closings[-1].start()].strip()) or None


# --- Normalisation ---------------------------------------------------------------------------------

_TEXT_MACRO_RE = re.compile(r"\\(?:text|textrm|textbf|textit|mathrm|mathbf|mbox)\s*\{([^{}]*)\}")
_PREFIX_RE = re.compile(r"^(?:the\s+)?(?:final\s+)?answer\b(?:\s+is\b)?\s*[:=]?\s*", re.I)
_DEGREE_RE = re.compile(r"\^\s*\{?\s*\\circ\s*\}?|°|\\degree\b|\\deg\b|\s*(?<!\\)\bdeg(?:rees?)?\b\.?", re.I)
_PERCENT_RE = re.compile(r"\s*(?:\\%|%|\bpercent\b)", re.I)
_THIN_SPACE_RE = re.compile(r"\\[,;:! ]|~")
_UNIT_NAMES = (
    r"units?|cm|mm|km|in|inch(?:es)?|ft|feet|foot|yd|yards?|mi|miles?|m|meters?|metres?|"
    r"(?:centi|milli|kilo)met(?:er|re)s?|kg|g|grams?|mg|lbs?|pounds?|s|sec|seconds?|min|minutes?|h|hrs?|"
    r"hours?|days?|L|ml|mL|lit(?:er|re)s?|mph|km/h|m/s|rad|radians?|dollars?|cents?"
)
# A unit only counts after a quantity: a digit, a closing bracket or the `i` of `\pi`.
_TRAILING_UNIT_RE = re.compile(
    rf"(?<=[\d}})\]i])(?P<sep>\s*)(?:(?:square|sq\.?|cubic)\s+)?(?P<unit>{_UNIT_NAMES})"
    rf"\s*(?:\^\s*\{{?\s*[23]\s*\}}?|²|³)?\s*$"
)
_GROUPED_NUMBER_RE = re.compile(r"[+-]?\d{1,3}(?:,\d{3})+(?:\.\d+)?(?:\\%)?")


def _strip_trailing_unit(text: str) -> str:
    """Drop a trailing unit ("12 cm", "5 m^2", "12 square units", "4\\pi cm").

    Single-letter units (m, g, s, h, L) need a space before them, so we leave "2m" (maybe algebra)
    alone while "5 m" and "5 \\text{ m}^2" lose the unit; multi-letter units may be glued ("12cm").
    """
    match = _TRAILING_UNIT_RE.search(text)
    if match is None or (len(match["unit"]) == 1 and not match["sep"]):
        return text
    return text[: match.start()].rstrip()


def normalize_answer(text: str) -> str:
    """Canonical string form of an answer: presentation removed, mathematical content kept.

    Each step is something math-verify gets wrong or only gets right in some wrappers ("30°" inside
    `\\boxed{}`, "1{,}000" as plain text, "12." boxed); the mathematics itself is left to math-verify.
    """
    s = unwrap_boxed(text.strip())
    s = s.replace("\\$", " ").replace("$", " ")
    s = re.sub(r"^\\[(\[]|\\[)\]]$", "", s.strip())  # \( … \) and \[ … \] delimiters
    s = re.sub(r"\\(?:displaystyle|left|right)\b", "", s)
    s = s.replace("π", "\\pi ").replace("√", "\\sqrt").replace("−", "-").replace("×", "\\times ")
    for _ in range(3):  # a few rounds unwrap \text{\textbf{B}}
        s = _TEXT_MACRO_RE.sub(r" \1 ", s)  # spaces keep "12\text{m}" apart from "12m"
    s = _PREFIX_RE.sub("", s.strip()).strip().rstrip(".")
    s = _DEGREE_RE.sub("", s)
    s = _PERCENT_RE.sub(r"\\%", s)
    s = s.replace("{,}", ",")
    s = re.sub(r"(?<=\d)\\,(?=\d{3}\b)", ",", s)  # 1\,000: thin space as thousands separator
    s = _THIN_SPACE_RE.sub(" ", s)
    s = " ".join(_strip_trailing_unit(s).split())
    if _GROUPED_NUMBER_RE.fullmatch(s):  # a lone number only: "1,2" stays a set/tuple for math-verify
        s = s.replace(",", "")
    return s.rstrip(".").strip()


# --- Multiple choice -------------------------------------------------------------------------------

_CHOICE_PATTERNS = (
    r"\(([A-J])\)(?:\s.*)?",  # "(B)", "(b) 12"
    r"([A-J])(?:[.:)](?:\s.*)?)?",  # "B", "B.", "b) 12", "B: 12"
    r"(?i:option|choice)\s*\(?([A-J])\)?(?:[.:)]?(?:\s.*)?)?",  # "Option B", "choice (b)"
)
_CHOICE_RES = tuple(re.compile(p, re.S | re.I) for p in _CHOICE_PATTERNS)
_CHOICE_RES_UPPER = tuple(re.compile(p, re.S) for p in _CHOICE_PATTERNS)


def extract_choice_letter(text: str, *, ignore_case: bool = True) -> str | None:
    """The option letter (upper-case) if `text` names a multiple-choice option, else None.

    The letter must stand alone ("B", "(B)", "B.", "b) 12", "Option B"), so "A + b" or "Area 12" are
    never options. Golds are read with `ignore_case=False`: datasets write option letters upper-case,
    and a lower-case gold "e" or "i" is a constant that belongs to the symbolic verifier.
    """
    s = normalize_answer(text) if isinstance(text, str) else ""
    for pattern in _CHOICE_RES if ignore_case else _CHOICE_RES_UPPER:
        match = pattern.fullmatch(s)
        if match is not None:
            return match[1].upper()
    return None


# --- Deadline --------------------------------------------------------------------------------------


class _DeadlineExceeded(BaseException):
    """A BaseException so that sympy's and math-verify's `except Exception` blocks cannot swallow it
    and carry on unguarded."""


def _can_use_alarm() -> bool:
    """SIGALRM works only in the main thread, and we must not clobber a timer someone else armed."""
    return (
        hasattr(signal, "setitimer")
        and threading.current_thread() is threading.main_thread()
        and signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)
    )


def _call_with_alarm(fn: Callable[[], _T], timeout_s: float) -> _T:
    def on_alarm(signum: int, frame: object) -> None:
        raise _DeadlineExceeded

    previous = signal.signal(signal.SIGALRM, on_alarm)
    try:
        signal.setitimer(signal.ITIMER_REAL, timeout_s)
        return fn()
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0.0)
        signal.signal(signal.SIGALRM, previous)


def _call_with_watchdog(fn: Callable[[], _T], timeout_s: float) -> _T:
    """Run `fn` in a daemon thread and stop waiting after `timeout_s` (a thread cannot be killed)."""
    box: dict[str, object] = {}

    def target() -> None:
        try:
            box["value"] = fn()
        except BaseException as exc:  # handed back to the caller below
            box["error"] = exc

    worker = threading.Thread(target=target, name="calibrl-verify", daemon=True)
    worker.start()
    worker.join(timeout_s)
    if worker.is_alive():
        raise _DeadlineExceeded
    if "error" in box:
        raise box["error"]  # type: ignore[misc]
    return box["value"]  # type: ignore[return-value]


def _call_with_deadline(fn: Callable[[], _T], timeout_s: float | None) -> _T:
    if timeout_s is None or not math.isfinite(timeout_s) or timeout_s <= 0:
        return fn()
    if _can_use_alarm():
        return _call_with_alarm(fn, timeout_s)
    return _call_with_watchdog(fn, timeout_s)


# --- Equivalence -----------------------------------------------------------------------------------

_MAX_RESULT_DIGITS = 100_000
_VERIFIER_READY = threading.Event()


def _warm_up_verifier() -> None:
    """Import math-verify (sympy) and parse once, outside any deadline: the first call in a process
    costs about a second, which must not make the first rollout of a run time out."""
    if not _VERIFIER_READY.is_set():
        from math_verify import parse

        parse("$1$", parsing_timeout=None)
        _VERIFIER_READY.set()


def _too_big_to_evaluate(expr: object) -> bool:
    """True if verifying `expr` would build a gigantic integer (`10^{10^{10}}`, `100000000!`).

    math-verify evaluates such constants in CPython's big-int C loop, which holds the GIL: SIGALRM still
    interrupts it, the watchdog thread never would. We size every symbol-free power / factorial of the
    lazily parsed tree with evalf (mpmath: cheap even for towers, overflows to inf instead of hanging).
    """
    from sympy import Basic, Pow, factorial, preorder_traversal

    if not isinstance(expr, Basic):
        return False
    for node in preorder_traversal(expr):
        if node.free_symbols or not isinstance(node, Pow | factorial):
            continue
        try:
            if isinstance(node, factorial):  # n! has about n·log10(n) digits
                n = abs(complex(node.args[0].evalf(8)))
                digits = n * math.log10(n + 2)
            else:
                digits = abs(complex(node.exp.evalf(8))) * math.log10(abs(complex(node.base.evalf(8))) + 2)
        except (TypeError, ValueError, OverflowError):
            return True
        if not digits < _MAX_RESULT_DIGITS:  # also true for inf and nan
            return True
    return False


def _math_verify_equal(pred: str, gold: str) -> bool:
    """math-verify on normalised strings. `$…$` makes it read the whole string as one LaTeX expression
    (on bare text it picks numbers out of prose, and "12 or 13" must not match "13")."""
    from math_verify import parse, verify  # already imported by _warm_up_verifier

    gold_parsed = parse(f"${gold}$", parsing_timeout=None)
    pred_parsed = parse(f"${pred}$", parsing_timeout=None)
    if not gold_parsed or not pred_parsed:
        return False
    if any(_too_big_to_evaluate(expr) for expr in [*gold_parsed, *pred_parsed]):
        logger.debug("refusing to evaluate a huge constant (pred=%.80r gold=%.80r)", pred, gold)
        return False
    return bool(verify(gold_parsed, pred_parsed, timeout_seconds=None))


def is_equivalent(pred: str, gold: str, *, timeout_s: float = 2.0) -> bool:
    """True iff the predicted final answer means the same as the gold one (rules: module docstring).

    Safe from any thread. False, never an exception, on garbage, verifier errors, or when parse + verify
    take longer than `timeout_s` seconds (None or <= 0 disables the guard).
    """
    try:
        if not isinstance(pred, str) or not isinstance(gold, str):
            return False
        if len(pred) > MAX_ANSWER_CHARS or len(gold) > MAX_ANSWER_CHARS:
            return False
        gold_letter = extract_choice_letter(gold, ignore_case=False)
        if gold_letter is not None:
            return extract_choice_letter(pred) == gold_letter
        pred_norm, gold_norm = normalize_answer(pred), normalize_answer(gold)
        if not pred_norm or not gold_norm:
            return False
        if pred_norm == gold_norm:
            return True
        _warm_up_verifier()
        return _call_with_deadline(lambda: _math_verify_equal(pred_norm, gold_norm), timeout_s)
    except _DeadlineExceeded:
        logger.debug("answer verification timed out after %ss (pred=%.80r gold=%.80r)", timeout_s, pred, gold)
        return False
    except Exception:
        logger.debug("answer verification failed (pred=%.80r gold=%.80r)", pred, gold, exc_info=True)
        return False
