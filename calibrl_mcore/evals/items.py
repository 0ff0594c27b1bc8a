"""`EvalItem` (one benchmark question, normalised) and the file / choice helpers the loaders share.

Every loader turns its benchmark's published rows into `EvalItem`s, so that the harness and the scorer
never see a benchmark-specific field name. Files are read from local paths only (json / jsonl / parquet);
images stay lazy `ImageRef`s (a path or the encoded bytes of an HF `Image` struct) until rollout time.
"""

from __future__ import annotations

import json
import re
import string
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from calibrl_mcore.data.images import ImageLoadError, ImageRef

__all__ = [
    "CHOICE_LETTERS",
    "EvalItem",
    "Kind",
    "find_data_file",
    "letters_for",
    "parse_inline_choices",
    "read_records",
    "render_choices",
    "resolve_images",
]

Kind = Literal["choice", "numeric", "latex", "text"]
"""How the gold answer is matched: an option letter (or a set of letters), a number (precision /
tolerance), a LaTeX expression (math-verify) or a short text (normalised string equality)."""

KINDS: tuple[str, ...] = ("choice", "numeric", "latex", "text")
CHOICE_LETTERS = string.ascii_uppercase[:10]  # A-J, the letters `rewards.extract_choice_letter` knows


@dataclass
class EvalItem:
    """One benchmark question, independent of the benchmark's file format."""

    uid: str
    """Benchmark-native id (MathVista `pid`, MathVerse `sample_index`, MATH-500 `unique_id`, ...)."""
    question: str
    """User-turn text, with the options rendered the way the benchmark renders them."""
    images: list[ImageRef]
    """Lazy image references, in order (empty for text-only benchmarks)."""
    gold: str
    """Gold answer: option letter(s) for `choice` ("B", or "A, C" for a multi-answer LogicVista item),
    otherwise the benchmark's answer string."""
    kind: Kind
    """Which matcher scores this item (see `evals.scoring`)."""
    choices: list[str] = field(default_factory=list)
    """Option texts in letter order (A, B, ...) for `choice` items; empty when the options are unknown."""
    meta: dict[str, Any] = field(default_factory=dict)
    """Benchmark fields kept for slicing and scoring hints: `answer_type` ("integer" | "float" | "list"
    | "text", MathVista) and `precision` (decimal places of a float answer, MathVista)."""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"item {self.uid!r}: kind must be one of {KINDS}, got {self.kind!r}")
        if not self.gold.strip():
            raise ValueError(f"item {self.uid!r}: empty gold answer")
        if len(self.choices) > len(CHOICE_LETTERS):
            raise ValueError(f"item {self.uid!r}: {len(self.choices)} choices > {len(CHOICE_LETTERS)} letters")

    @property
    def letters(self) -> str:
        """The option letters this item offers ("ABCD" for four choices; A-J when the options are unknown)."""
        return letters_for(self.choices)


def letters_for(choices: Sequence[str]) -> str:
    """Option letters of `choices` (all of A-J when the options are not known)."""
    return CHOICE_LETTERS[: len(choices)] if choices else CHOICE_LETTERS


# --- Files -----------------------------------------------------------------------------------------


def _read_json(path: Path) -> list[dict[str, Any]]:
    """A `.json` file: a list of rows, or an object of rows keyed by id (the key is kept as `_key`)."""
    data = json.loads(path.read_text(encoding="utf-8"))
    if isinstance(data, list):
        rows = data
    elif isinstance(data, Mapping) and data and all(isinstance(v, Mapping) for v in data.values()):
        rows = [{"_key": key, **value} for key, value in data.items()]
    else:
        raise ValueError(f"{path}: expected a list of objects or an object of objects keyed by id")
    if not all(isinstance(row, Mapping) for row in rows):
        raise ValueError(f"{path}: every row must be a JSON object")
    return [dict(row) for row in rows]


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    rows = []
    with path.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{line_no}: invalid JSON: {exc}") from exc
            if not isinstance(row, Mapping):
                raise ValueError(f"{path}:{line_no}: expected a JSON object, got {type(row).__name__}")
            rows.append(dict(row))
    return rows


def _read_parquet(path: Path) -> list[dict[str, Any]]:
    import pyarrow.parquet as pq

    return pq.read_table(path).to_pylist()


_READERS = {".json": _read_json, ".jsonl": _read_jsonl, ".parquet": _read_parquet}


def read_records(path: Path) -> list[dict[str, Any]]:
    """All rows of a `.json` / `.jsonl` / `.parquet` file (HF parquet `Image` columns stay dicts)."""
    reader = _READERS.get(path.suffix.lower())
    if reader is None:
        raise ValueError(f"unsupported benchmark file {path}: expected one of {sorted(_READERS)}")
    return reader(path)


def find_data_file(path: Path, patterns: Iterable[str], bench: str) -> Path:
    """`path` itself if it is a file, else the first file under the folder matching one of `patterns`
    (glob patterns, tried in order; matches of one pattern are taken in sorted order)."""
    if path.is_file():
        return path
    if not path.is_dir():
        raise FileNotFoundError(f"{bench}: {path} is neither a file nor a folder")
    tried = list(patterns)
    for pattern in tried:
        matches = sorted(p for p in path.glob(pattern) if p.is_file())
        if matches:
            return matches[0]
    raise FileNotFoundError(f"{bench}: no data file in {path} (looked for {', '.join(tried)})")


def resolve_images(value: Any, roots: Sequence[Path], uid: str) -> list[ImageRef]:
    """A row's image value(s) as `ImageRef`s. Relative paths are tried against each of `roots` in turn
    (benchmarks store them relative to the json file, to an `images/` folder or to the release root).

    Raises FileNotFoundError naming the item when a path exists under none of the roots: a missing image
    folder must stop the run before any generation, not score every item 0.
    """
    values = value if isinstance(value, list | tuple) else [value]
    refs: list[ImageRef] = []
    for src in values:
        if src is None or (isinstance(src, str) and not src.strip()):
            continue
        if isinstance(src, str) and not src.startswith("data:"):
            candidates = [Path(src)] if Path(src).is_absolute() else [root / src for root in roots]
            found = next((c for c in candidates if c.is_file()), None)
            if found is None:
                where = ", ".join(str(c) for c in candidates)
                raise FileNotFoundError(f"item {uid!r}: image {src!r} not found (tried {where})")
            src = found
        try:
            refs.append(ImageRef.from_source(src))
        except ImageLoadError as exc:
            raise ValueError(f"item {uid!r}: {exc}") from exc
    return refs


# --- Choices ---------------------------------------------------------------------------------------


def render_choices(choices: Sequence[str], style: Literal["paren", "dot"] = "paren") -> str:
    """Options one per line: "(A) 12" (MathVista style, `paren`) or "A. 12" (MathVision style, `dot`)."""
    fmt = "({letter}) {text}" if style == "paren" else "{letter}. {text}"
    return "\n".join(fmt.format(letter=letter, text=str(text).strip()) for letter, text in zip(CHOICE_LETTERS, choices))


# "Choices:" / "Options:" header, then options such as "A:50°", "A. 12", "(A) 12", one per line or
# separated by ";" (WeMath) / spaces (LogicVista).
_CHOICE_HEADER_RE = re.compile(r"(?:choices|options?)\s*:?\s*", re.IGNORECASE)
_OPTION_RE = re.compile(r"(?:^|(?<=[\s;]))\(?([A-J])\s*[).:：]\s*")


def parse_inline_choices(text: str) -> list[str]:
    """Option texts written into a question ("Choices:\\nA:50°\\nB:40°" → ["50°", "40°"]).

    Reads after the last "Choices:" / "Options:" header when there is one, else the whole text; the
    options must be consecutive letters from A. Returns [] when fewer than two options are found, so a
    question that merely mentions "point A." is not mistaken for a list of options.
    """
    headers = list(_CHOICE_HEADER_RE.finditer(text))
    body = text[headers[-1].end() :] if headers else text
    marks = list(_OPTION_RE.finditer(body))
    # keep the longest run A, B, C, ... that starts at an "A" (questions may name points before the list)
    best: list[re.Match[str]] = []
    for start, mark in enumerate(marks):
        if mark[1] != "A":
            continue
        run = [mark]
        for nxt in marks[start + 1 :]:
            if nxt[1] == CHOICE_LETTERS[len(run)]:
                run.append(nxt)
        if len(run) > len(best):
            best = run
    if len(best) < 2:
        return []
    ends = [m.start() for m in best[1:]] + [len(body)]
    return [body[m.end() : end].strip().rstrip(";").strip() for m, end in zip(best, ends)]


def iter_sorted_dirs(root: Path) -> Iterator[Path]:
    """Sub-folders of `root`, numeric names in numeric order (Geometry3K problem folders "2401", ...)."""
    dirs = [p for p in root.iterdir() if p.is_dir()]
    yield from sorted(dirs, key=lambda p: (0, int(p.name), "") if p.name.isdigit() else (1, 0, p.name))
