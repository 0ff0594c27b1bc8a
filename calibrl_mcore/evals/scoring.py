"""Answer extraction and the benchmarks' answer-matching rules.

Extraction (`extract_prediction`), the same chain for every benchmark, first hit wins:
1. `answer_tag`: the last `<answer>…</answer>` block (`\\boxed{}` inside it unwrapped): our protocol.
2. `boxed`: the last `\\boxed{}` anywhere (MathVision's and MATH-500's own protocol, AMC, Geometry3K).
3. `phrase`: the rest of the line after the last "answer is" / "Answer:" (MathVista's quick extraction,
   We-Math's "<Answer>: B", LogicVista).
4. `last_letter` (choice items: the last stand-alone option letter of the item) or `last_number`
   (numeric / latex items: the last number in the response). Text items have no last resort.

Matching (`is_correct`), by the item's kind:
- choice: the prediction names a set of letters: an option's exact text first ("AB" is the option "AB"),
  then one letter ("B", "(b)", "Option B", "B. 12"), several ("A, C", "A and C", "AC"; LogicVista), or
  an option's text read loosely ("145" → the option "145°"; numbers, units and degree marks compared
  after normalisation, math via math-verify). It must equal the gold set exactly. With
  `nearest_choice` (MathVista's rule) a text that matches no option picks the most similar one.
- numeric: MathVista `answer_type` integer → both truncated with int() (MathVista's `int(float(x))`);
  float with `precision` p → equal after rounding to p places; list → element-wise; otherwise
  |pred - gold| within a relative tolerance of 1e-6 (math-verify's 6 significant digits). Units, %,
  thousands separators, "x = " and simple fractions (1/2, \\frac{1}{2}) are read; anything else
  falls back to math-verify (`rewards.is_equivalent`).
- latex: `rewards.is_equivalent` (math-verify + our normalisation, see `calibrl_mcore/rewards`).
- text: case-, space- and trailing-punctuation-insensitive string equality (numbers compared as numbers).

Besides `correct` (with the fallbacks), every item gets `strict` = correct from the answer tag with the
whole response in format: the paper's acc × fmt validation number.
"""

from __future__ import annotations

import difflib
import math
import re
from dataclasses import dataclass
from typing import Literal

from calibrl_mcore.evals.items import CHOICE_LETTERS, EvalItem, Kind, letters_for
from calibrl_mcore.rewards import extract_answer, format_reward, is_equivalent, normalize_answer
from calibrl_mcore.rewards.answer import MAX_ANSWER_CHARS, extract_choice_letter, unwrap_boxed

__all__ = [
    "NUMERIC_REL_TOL",
    "Extraction",
    "ItemScore",
    "extract_prediction",
    "is_correct",
    "match_choice",
    "match_numeric",
    "match_text",
    "parse_number",
    "predicted_letters",
    "score_response",
]

NUMERIC_REL_TOL = 1e-6
"""Relative tolerance of numeric answers without a stated precision."""

Source = Literal["answer_tag", "boxed", "phrase", "last_letter", "last_number"]


@dataclass(frozen=True)
class Extraction:
    """The final answer read from a response, and which rule of the chain found it."""

    text: str | None
    source: Source | None


@dataclass(frozen=True)
class ItemScore:
    """Score of one response to one item."""

    extracted: str | None
    source: Source | None
    correct: bool
    """The benchmark's accuracy (extraction fallbacks allowed)."""
    strict: bool
    """acc × fmt: correct from the `<answer>` block of a well-formatted response."""
    fmt: float
    """`rewards.format_reward` of the response."""


# --- Extraction ------------------------------------------------------------------------------------

_PHRASE_RE = re.compile(r"(?:final\s+answer|answer)\s*>?\s*(?:is\b\s*:?|:|=)\s*(?:\*\*)?([^\n]+)", re.IGNORECASE)
_NUMBER_RE = re.compile(r"-?\d+(?:,\d{3})*(?:\.\d+)?|-?\.\d+")


def _clean_phrase(text: str) -> str:
    """Trim the decoration around a phrase answer: "**B**.", "<<B>>", "$12$"."""
    return text.strip().strip("*<>$ ").rstrip(".").strip("*<>$ ")


def _last_letter(response: str, letters: str) -> str | None:
    """The last stand-alone option letter; an upper-case letter opening a word group ("A triangle") and
    letters outside the item's options are not answers."""
    pattern = rf"(?<![A-Za-z\\])\(?([{letters}])\)?(?![A-Za-z])(?!\s+[a-z])"
    found = re.findall(pattern, response)
    return found[-1] if found else None


def extract_prediction(response: str, kind: Kind, letters: str = CHOICE_LETTERS, *,
                       fallbacks: bool = True) -> Extraction:
    """The final answer of `response` by the chain in the module docstring (`fallbacks=False`: step 1 only)."""
    if not isinstance(response, str) or not response.strip():
        return Extraction(None, None)
    tagged = extract_answer(response)
    if tagged is not None or not fallbacks:
        return Extraction(tagged, "answer_tag" if tagged is not None else None)
    boxed = unwrap_boxed(response)
    if boxed != response and boxed.strip():
        return Extraction(boxed.strip(), "boxed")
    phrases = [_clean_phrase(m[1]) for m in _PHRASE_RE.finditer(response)]
    if phrases and phrases[-1]:
        return Extraction(phrases[-1], "phrase")
    if kind == "choice":
        letter = _last_letter(response, letters)
        return Extraction(letter, "last_letter" if letter else None)
    if kind in ("numeric", "latex"):
        numbers = _NUMBER_RE.findall(response)
        return Extraction(numbers[-1].replace(",", ""), "last_number") if numbers else Extraction(None, None)
    return Extraction(None, None)


# --- Numbers ---------------------------------------------------------------------------------------

_PLAIN_NUMBER_RE = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?")
_SLASH_FRACTION_RE = re.compile(r"([+-]?\d+(?:\.\d+)?)\s*/\s*(\d+(?:\.\d+)?)")
_LATEX_FRACTION_RE = re.compile(r"([+-]?)\\[dt]?frac\s*\{\s*(-?\d+(?:\.\d+)?)\s*\}\s*\{\s*(\d+(?:\.\d+)?)\s*\}")
_LHS_RE = re.compile(r"^[A-Za-z](?:_\{?\w+\}?)?\s*=\s*")


def parse_number(text: str) -> float | None:
    """A number written as "1,234.5", "12 cm", "25%", "x = 3", "-1/2" or "\\frac{1}{2}"; else None."""
    if not isinstance(text, str) or len(text) > MAX_ANSWER_CHARS:
        return None
    s = normalize_answer(text)
    s = _LHS_RE.sub("", s).replace("\\%", "").replace("%", "").replace(" ", "")
    s = s.replace(",", "") if re.fullmatch(r"[+-]?\d{1,3}(?:,\d{3})+(?:\.\d+)?", s) else s
    try:
        if _PLAIN_NUMBER_RE.fullmatch(s):
            return float(s)
        if match := _SLASH_FRACTION_RE.fullmatch(s):
            return float(match[1]) / float(match[2])
        if match := _LATEX_FRACTION_RE.fullmatch(s):
            value = float(match[2]) / float(match[3])
            return -value if match[1] == "-" else value
    except (ValueError, ZeroDivisionError, OverflowError):
        return None
    return None


def _number_list(text: str) -> list[float] | None:
    """"[1, 2.5]" / "(1, 2.5)" / "1, 2.5" → [1.0, 2.5]; None unless every element is a number."""
    body = normalize_answer(text).strip().strip("[]()")
    parts = [p for p in re.split(r"\s*,\s*", body) if p]
    values = [parse_number(p) for p in parts]
    return None if not values or any(v is None for v in values) else values  # type: ignore[return-value]


def _same_number(pred: float, gold: float, answer_type: str | None, precision: int | None) -> bool:
    if not (math.isfinite(pred) and math.isfinite(gold)):
        return False
    if answer_type == "integer":
        return int(pred) == int(gold)
    if precision is not None:
        return math.isclose(round(pred, precision), round(gold, precision), rel_tol=0, abs_tol=10 ** -(precision + 6))
    return math.isclose(pred, gold, rel_tol=NUMERIC_REL_TOL, abs_tol=1e-9)


def match_numeric(pred: str, gold: str, *, answer_type: str | None = None, precision: int | None = None) -> bool:
    """Numeric equality by the rules in the module docstring."""
    if answer_type == "list" or gold.strip().startswith("["):
        pred_list, gold_list = _number_list(pred), _number_list(gold)
        if pred_list is None or gold_list is None or len(pred_list) != len(gold_list):
            return False
        return all(_same_number(p, g, None, precision) for p, g in zip(pred_list, gold_list))
    pred_value, gold_value = parse_number(pred), parse_number(gold)
    if pred_value is None or gold_value is None:
        return is_equivalent(pred, gold)
    return _same_number(pred_value, gold_value, answer_type, precision)


# --- Text ------------------------------------------------------------------------------------------


def _norm_text(text: str) -> str:
    return " ".join(normalize_answer(text).lower().strip(" .'\"").split())


def match_text(pred: str, gold: str) -> bool:
    """Short-text equality ignoring case, spacing, quotes and a trailing period; numbers as numbers."""
    if _norm_text(pred) == _norm_text(gold):
        return True
    pred_value, gold_value = parse_number(pred), parse_number(gold)
    return pred_value is not None and gold_value is not None and _same_number(pred_value, gold_value, None, None)


# --- Choices ---------------------------------------------------------------------------------------

_SEPARATED_LETTERS_RE = re.compile(r"\(?[A-J]\)?(?:\s*(?:,|;|&|\band\b|\s)\s*\(?[A-J]\)?)+", re.IGNORECASE)


def _same_option(pred: str, option: str) -> bool:
    """Does a free-text prediction say this option's text? (text first, then as numbers / math)."""
    if _norm_text(pred) == _norm_text(option):
        return True
    pred_value, option_value = parse_number(pred), parse_number(option)
    if pred_value is not None and option_value is not None:
        return _same_number(pred_value, option_value, None, None)
    return bool(re.search(r"[\d\\^]", option)) and is_equivalent(pred, option)


def predicted_letters(pred: str, choices: list[str], *, nearest_choice: bool = False) -> frozenset[str] | None:
    """The set of option letters `pred` names (see the module docstring), or None when it names none."""
    letters = letters_for(choices)
    norm = normalize_answer(pred)
    # an option's exact text first: "AB" is the option "AB" (a segment), not the letters A and B
    exact = [letter for letter, option in zip(letters, choices) if _norm_text(option) == _norm_text(pred)]
    if len(exact) == 1:
        return frozenset(exact)
    found: frozenset[str] | None = None
    if re.fullmatch(r"[A-J]{2,}", norm):  # "BC": upper case only, "ab" may be a product
        found = frozenset(norm)
    elif _SEPARATED_LETTERS_RE.fullmatch(norm):  # "B, C", "b and c" (not the a, d of "and")
        found = frozenset(m.upper() for m in re.findall(r"(?<![A-Za-z])[A-Ja-j](?![A-Za-z])", norm))
    if found is not None:
        return found if found <= set(letters) else None
    single = extract_choice_letter(pred)
    if single is not None:
        return frozenset(single) if single in letters else None
    if not choices or not norm:
        return None
    named = [letter for letter, option in zip(letters, choices) if _same_option(pred, option)]
    if len(named) == 1:
        return frozenset(named)
    if nearest_choice and not named:
        ratios = [difflib.SequenceMatcher(None, norm.lower(), option.lower()).ratio() for option in choices]
        return frozenset(letters[ratios.index(max(ratios))])
    return None


def match_choice(pred: str, gold: str, choices: list[str], *, nearest_choice: bool = False) -> bool:
    """True iff `pred` names exactly the gold letter set (`gold`: "B" or "A, C")."""
    gold_letters = frozenset(re.findall(r"[A-J]", gold))
    return bool(gold_letters) and predicted_letters(pred, choices, nearest_choice=nearest_choice) == gold_letters


# --- Items -----------------------------------------------------------------------------------------


def is_correct(item: EvalItem, pred: str | None, *, nearest_choice: bool = False) -> bool:
    """Does the extracted prediction `pred` answer `item` (rules by `item.kind`)? Never raises."""
    if pred is None or not pred.strip() or len(pred) > MAX_ANSWER_CHARS:
        return False
    if item.kind == "choice":
        return match_choice(pred, item.gold, item.choices, nearest_choice=nearest_choice)
    if item.kind == "numeric":
        precision = item.meta.get("precision")
        return match_numeric(pred, item.gold, answer_type=item.meta.get("answer_type"),
                             precision=None if precision is None else int(precision))
    if item.kind == "latex":
        return is_equivalent(pred, item.gold)
    return match_text(pred, item.gold)


def score_response(item: EvalItem, response: str, *, nearest_choice: bool = False) -> ItemScore:
    """Extract, match and format-check one response (see the module docstring)."""
    extraction = extract_prediction(response, item.kind, item.letters)
    correct = is_correct(item, extraction.text, nearest_choice=nearest_choice)
    fmt = format_reward(response) if isinstance(response, str) else 0.0
    strict = correct and extraction.source == "answer_tag" and fmt == 1.0
    return ItemScore(extracted=extraction.text, source=extraction.source, correct=correct, strict=strict, fmt=fmt)
