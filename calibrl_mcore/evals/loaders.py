"""Loaders of the benchmarks' published file formats (local paths only; nothing is downloaded).

Each loader takes a file or a folder (the folder is searched for the benchmark's usual file names, in the
order listed) and returns `EvalItem`s in file order. Distributions read (kind of the items in brackets):

- mathvista [choice, numeric, text]: GitHub `data/testmini.json` (object keyed by pid, `image` =
  "images/N.jpg") or the HF AI4Math/MathVista parquet (`decoded_image` bytes). Prompt: the `query` field
  (hint + question + "Choices:\\n(A) ..."), rebuilt the MathVista way when absent.
- mathverse [choice, latex]: GitHub `testmini.json` (a list; `image` = "images_version_1-4/...") or the
  HF AI4Math/MathVerse parquet. Prompt: `question` (options inline), `query_cot` for Vision-Only rows.
- mathvision [choice, latex]: MATH-V `data/test.jsonl` (`image` = "images/N.jpg") or the HF
  MathLLMs/MathVision parquet (`decoded_image`). Options rendered "\\nChoices: A. x\\nB. y".
- wemath [choice]: We-Math `testmini.json` (`option` = "A. 1;B. 2;...", `image_path`). Prompt
  "{question}\\nOptions: {option}".
- logicvista [choice, letter sets]: LogicVista `data/dataset.json` (object keyed by id; `imagename` under
  `images/`); a gold may name several letters ("A, C").
- geometry3k [choice | latex]: InterGPS `geometry3k/test/<id>/data.json` + `img_diagram.png` (letter
  golds, "Choices:\\n(A) ..."), or the HF conversion (hiyouga/geometry3k: `problem`, `images`, `answer`).
- math500 [latex]: HuggingFaceH4/MATH-500 `test.jsonl`.
- amc [numeric]: AMC23-style jsonl (`problem` or `question`, numeric `answer`, `id`, `url`).

For the default split of a folder, see each loader's `_PATTERNS`; give a file path to pick another split.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from calibrl_mcore.data.template import count_image_placeholders
from calibrl_mcore.evals.items import (
    CHOICE_LETTERS,
    EvalItem,
    Kind,
    find_data_file,
    iter_sorted_dirs,
    parse_inline_choices,
    read_records,
    render_choices,
    resolve_images,
)
from calibrl_mcore.rewards.answer import extract_choice_letter

__all__ = ["BENCHMARKS", "Benchmark", "canonical_name", "load_benchmark"]

log = logging.getLogger(__name__)

Loader = Callable[[Path, int | None], list[EvalItem]]


# --- Helpers ---------------------------------------------------------------------------------------


def _first(row: Mapping[str, Any], keys: Sequence[str], default: Any = None) -> Any:
    """Value of the first key present with a non-null value."""
    for key in keys:
        if row.get(key) is not None:
            return row[key]
    return default


def _text(value: Any) -> str:
    """A gold / question value as text; whole floats (AMC's `27.0`) lose their `.0`."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return "" if value is None else str(value).strip()


def _image_value(row: Mapping[str, Any], keys: Sequence[str]) -> Any:
    """The first image field holding something: HF parquet exports keep the pixels in `decoded_image`
    (a {"bytes", "path"} struct) next to the original relative `image` path."""
    for key in keys:
        value = row.get(key)
        if isinstance(value, Mapping) and value.get("bytes") is None and not value.get("path"):
            continue
        if value not in (None, "", []):
            return value
    return None


def _roots(data_file: Path, bench_root: Path, *extra: str) -> list[Path]:
    """Folders that relative image paths are tried against: the data file's folder, its parent, the
    benchmark folder given by the user, and `extra` sub-folders (e.g. "images") of each."""
    bases = list(dict.fromkeys([data_file.parent, data_file.parent.parent, bench_root if bench_root.is_dir()
                                else bench_root.parent]))
    return bases + [base / sub for base in bases for sub in extra]


def _question_for_images(question: str, n_images: int) -> str:
    """Drop `<image>` placeholders that do not pair up with the images (the template would refuse them)."""
    if count_image_placeholders(question) in (0, n_images):
        return question
    return re.sub(r"\s*<image>\s*", " ", question, flags=re.IGNORECASE).strip()


def _item(uid: Any, question: str, images: list, gold: str, kind: Kind, choices: Sequence[str] = (),
          **meta: Any) -> EvalItem:
    """An `EvalItem` with unpaired `<image>` placeholders dropped and null metadata left out."""
    question = _question_for_images(question, len(images))
    return EvalItem(uid=str(uid), question=question, images=images, gold=gold, kind=kind,
                    choices=[str(c).strip() for c in choices], meta={k: v for k, v in meta.items() if v is not None})


def _gold_letter(answer: Any, uid: Any, bench: str) -> str:
    letter = extract_choice_letter(_text(answer), ignore_case=False)
    if letter is None:
        raise ValueError(f"{bench} item {uid!r}: multiple-choice answer {answer!r} is not an option letter")
    return letter


def _limited(rows: list[dict[str, Any]], limit: int | None) -> list[dict[str, Any]]:
    return rows if limit is None else rows[:limit]


# --- MathVista -------------------------------------------------------------------------------------

_MATHVISTA_PATTERNS = ("testmini.json", "data/testmini.json", "**/testmini-*.parquet", "**/testmini*.parquet",
                       "*.jsonl", "*.json", "**/*.parquet")
_FLOAT_HINTS = {  # decimal places -> (wording, examples), as in MathVista's build_query
    1: ("one decimal place", "1.2, 1.3, 1.4"),
    2: ("two decimal places", "1.23, 1.34, 1.45"),
    3: ("three decimal places", "1.234, 1.345, 1.456"),
}


def mathvista_query(row: Mapping[str, Any]) -> str:
    """MathVista's own prompt (its `query` field, rebuilt when absent): hint, question, unit, choices."""
    question, qtype, atype = row["question"], row.get("question_type"), row.get("answer_type")
    if qtype == "multi_choice":
        hint = "Please answer the question and provide the correct option letter, e.g., A, B, C, D, at the end."
    elif atype == "integer":
        hint = ("Please answer the question requiring an integer answer and provide the final value, "
                "e.g., 1, 2, 3, at the end.")
    elif atype == "float":
        places, examples = _FLOAT_HINTS.get(int(row.get("precision") or 2), _FLOAT_HINTS[2])
        hint = (f"Please answer the question requiring a floating-point number with {places} and provide "
                f"the final value, e.g., {examples}, at the end.")
    elif atype == "list":
        hint = ("Please answer the question requiring a Python list as an answer and provide the final list, "
                "e.g., [1, 2, 3], [1.2, 1.3, 1.4], at the end.")
    else:
        hint = "Please answer the question and provide the final answer at the end."
    text = f"Hint: {hint}\nQuestion: {question}"
    if row.get("unit"):
        text += f" (Unit: {row['unit']})"
    if row.get("choices"):
        text += "\nChoices:\n" + render_choices(row["choices"])
    return text


def load_mathvista(path: Path, limit: int | None = None) -> list[EvalItem]:
    """MathVista testmini: multi_choice golds (the option *text*) become letters; free-form golds are
    numeric (`answer_type` integer / float with `precision` / list) or text."""
    data_file = find_data_file(path, _MATHVISTA_PATTERNS, "mathvista")
    roots = _roots(data_file, path)
    items = []
    for row in _limited(read_records(data_file), limit):
        pid = _first(row, ("pid", "_key"))
        choices = list(row.get("choices") or [])
        answer = _text(row["answer"])
        meta = dict(pid=pid, question_type=row.get("question_type"), answer_type=row.get("answer_type"),
                    precision=row.get("precision"), unit=row.get("unit"), metadata=row.get("metadata"),
                    answer_text=answer)
        if row.get("question_type") == "multi_choice":
            stripped = [str(c).strip() for c in choices]
            if answer not in stripped:
                raise ValueError(f"mathvista item {pid!r}: answer {answer!r} is not one of the choices {choices}")
            gold, kind = CHOICE_LETTERS[stripped.index(answer)], "choice"
        else:
            gold, kind = answer, ("text" if row.get("answer_type") == "text" else "numeric")
        images = resolve_images(_image_value(row, ("decoded_image", "image")), roots, str(pid))
        query = row.get("query") or mathvista_query(row)
        items.append(_item(pid, query, images, gold, kind, choices, **meta))
    return items


# --- MathVerse -------------------------------------------------------------------------------------

_MATHVERSE_PATTERNS = ("testmini.json", "data/testmini.json", "**/testmini*.parquet", "*.json", "*.jsonl",
                       "**/*.parquet")


def load_mathverse(path: Path, limit: int | None = None) -> list[EvalItem]:
    """MathVerse testmini (all problem versions): options are written in the question ("Choices:\\nA:..")."""
    data_file = find_data_file(path, _MATHVERSE_PATTERNS, "mathverse")
    roots = _roots(data_file, path)
    items = []
    for row in _limited(read_records(data_file), limit):
        uid = _first(row, ("sample_index", "_key"))
        question = _text(row.get("question")) or _text(_first(row, ("query_cot", "query_wo")))
        multi = str(row.get("question_type", "")).replace("_", "-") == "multi-choice"
        gold = _gold_letter(row["answer"], uid, "mathverse") if multi else _text(row["answer"])
        images = resolve_images(_image_value(row, ("image", "decoded_image")), roots, str(uid))
        meta = dict(problem_index=row.get("problem_index"), problem_version=row.get("problem_version"),
                    question_type=row.get("question_type"), metadata=row.get("metadata"))
        choices = parse_inline_choices(question) if multi else []
        items.append(_item(uid, question, images, gold, "choice" if multi else "latex", choices, **meta))
    return items


# --- MathVision ------------------------------------------------------------------------------------

_MATHVISION_PATTERNS = ("data/test.jsonl", "test.jsonl", "**/test-*.parquet", "*.jsonl", "*.json",
                        "**/*.parquet")


def load_mathvision(path: Path, limit: int | None = None) -> list[EvalItem]:
    """MATH-Vision (test split by default): with `options` the gold is a letter and the options follow
    the question as "Choices: A. x\\nB. y" (the benchmark's prompt); otherwise a LaTeX answer."""
    data_file = find_data_file(path, _MATHVISION_PATTERNS, "mathvision")
    roots = _roots(data_file, path)
    items = []
    for row in _limited(read_records(data_file), limit):
        uid = _first(row, ("id", "_key"))
        options = [str(o) for o in row.get("options") or []]
        question = _text(row["question"])
        if options:
            question += "\nChoices: " + render_choices(options, style="dot")
            gold, kind = _gold_letter(row["answer"], uid, "mathvision"), "choice"
        else:
            gold, kind = _text(row["answer"]), "latex"
        images = resolve_images(_image_value(row, ("decoded_image", "image")), roots, str(uid))
        items.append(_item(uid, question, images, gold, kind, options, level=row.get("level"),
                           subject=row.get("subject")))
    return items


# --- WeMath ----------------------------------------------------------------------------------------

_WEMATH_PATTERNS = ("testmini.json", "*.json", "*.jsonl", "**/*.parquet")


def load_wemath(path: Path, limit: int | None = None) -> list[EvalItem]:
    """We-Math testmini: prompt "{question}\\nOptions: {option}" with the option string verbatim."""
    data_file = find_data_file(path, _WEMATH_PATTERNS, "wemath")
    roots = _roots(data_file, path, "image", "images")
    items = []
    for row in _limited(read_records(data_file), limit):
        uid = _first(row, ("ID", "id", "_key"))
        option = _text(row.get("option"))
        question = _text(row["question"]) + (f"\nOptions: {option}" if option else "")
        images = resolve_images(_image_value(row, ("image_path", "image")), roots, str(uid))
        items.append(_item(uid, question, images, _gold_letter(row["answer"], uid, "wemath"), "choice",
                           parse_inline_choices(option), key=row.get("key"),
                           knowledge_concept=row.get("knowledge concept"), split=row.get("split")))
    return items


# --- LogicVista ------------------------------------------------------------------------------------

_LOGICVISTA_PATTERNS = ("dataset.json", "data/dataset.json", "*.json", "*.jsonl", "**/*.parquet")
_GOLD_LETTERS_RE = re.compile(r"[\s,;&/\[\]()'\"]|and")


def logicvista_gold(answer: Any, uid: Any) -> str:
    """Gold letters of a LogicVista item as a canonical set string: "A", or "A, C" for several."""
    raw = " ".join(answer) if isinstance(answer, list | tuple) else _text(answer)
    letters = _GOLD_LETTERS_RE.sub("", raw)
    if not letters or any(ch not in CHOICE_LETTERS for ch in letters):
        raise ValueError(f"logicvista item {uid!r}: answer {answer!r} is not a set of option letters")
    return ", ".join(sorted(set(letters)))


def load_logicvista(path: Path, limit: int | None = None) -> list[EvalItem]:
    """LogicVista: options are in the question (or the image); golds may name several letters."""
    data_file = find_data_file(path, _LOGICVISTA_PATTERNS, "logicvista")
    roots = _roots(data_file, path, "images", "data/images")
    items = []
    for index, row in enumerate(_limited(read_records(data_file), limit)):
        uid = _first(row, ("_key", "id", "question_id"), index)
        question = _text(row["question"])
        image = _image_value(row, ("imagename", "image_path", "image", "img"))
        images = resolve_images(image, roots, str(uid))
        skill = _first(row, ("skill", "reasoning skill", "reasoning_skill", "category"))
        items.append(_item(uid, question, images, logicvista_gold(row["answer"], uid), "choice",
                           parse_inline_choices(question), skill=skill,
                           broad_capability=row.get("broad_capability")))
    return items


# --- Geometry3K ------------------------------------------------------------------------------------

_GEO3K_HF_PATTERNS = ("**/test-*.parquet", "**/*.parquet", "test.jsonl", "*.jsonl", "*.json")


def _geo3k_problem_dirs(path: Path) -> list[Path] | None:
    """InterGPS problem folders (`<split>/<id>/data.json`); None when `path` is not that layout."""
    if not path.is_dir():
        return None
    split_dir = path / "test" if (path / "test").is_dir() else path
    dirs = [d for d in iter_sorted_dirs(split_dir) if (d / "data.json").is_file()]
    return dirs or None


def load_geometry3k(path: Path, limit: int | None = None) -> list[EvalItem]:
    """Geometry3K test split: InterGPS folders (choices + letter golds, prompt "Choices:\\n(A) ...") or
    the HF conversion (`problem` with `<image>`, `images`, free-form `answer`: LaTeX matching)."""
    import json

    dirs = _geo3k_problem_dirs(path)
    if dirs is None:
        data_file = find_data_file(path, _GEO3K_HF_PATTERNS, "geometry3k")
        roots = _roots(data_file, path)
        items = []
        for index, row in enumerate(_limited(read_records(data_file), limit)):
            uid = _first(row, ("id", "_key"), index)
            images = resolve_images(_first(row, ("images", "image")), roots, str(uid))
            items.append(_item(uid, _text(row["problem"]), images, _text(row["answer"]), "latex"))
        return items
    items = []
    for problem_dir in dirs[:limit]:
        data = json.loads((problem_dir / "data.json").read_text(encoding="utf-8"))
        uid = data.get("id", problem_dir.name)
        choices = [str(c) for c in data["choices"]]
        question = f"{_text(data['problem_text'])}\nChoices:\n{render_choices(choices)}"
        images = resolve_images("img_diagram.png", [problem_dir], str(uid))
        items.append(_item(uid, question, images, _gold_letter(data["answer"], uid, "geometry3k"), "choice",
                           choices, problem_type_graph=data.get("problem_type_graph"),
                           problem_type_goal=data.get("problem_type_goal")))
    return items


# --- MATH-500 and AMC (text only) ------------------------------------------------------------------

_TEXT_PATTERNS = ("test.jsonl", "*.jsonl", "**/*.parquet", "*.json")


def load_math500(path: Path, limit: int | None = None) -> list[EvalItem]:
    """MATH-500 (`problem, solution, answer, subject, level, unique_id`): LaTeX golds."""
    data_file = find_data_file(path, _TEXT_PATTERNS, "math500")
    return [
        _item(_first(row, ("unique_id", "id"), index), _text(row["problem"]), [], _text(row["answer"]), "latex",
              subject=row.get("subject"), level=row.get("level"))
        for index, row in enumerate(_limited(read_records(data_file), limit))
    ]


def load_amc(path: Path, limit: int | None = None) -> list[EvalItem]:
    """AMC23-style jsonl (`problem` or `question`, numeric `answer`, `id`, `url`): numeric golds."""
    data_file = find_data_file(path, _TEXT_PATTERNS, "amc")
    return [
        _item(_first(row, ("id", "_key"), index), _text(_first(row, ("problem", "question"))), [],
              _text(row["answer"]), "numeric", url=row.get("url"))
        for index, row in enumerate(_limited(read_records(data_file), limit))
    ]


# --- Registry --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Benchmark:
    """A benchmark's loader and the scoring switches that differ between benchmarks."""

    name: str
    load: Loader
    nearest_choice: bool = False
    """MathVista's rule: a free-text answer that names no option counts as the most similar option."""


BENCHMARKS: dict[str, Benchmark] = {
    b.name: b
    for b in (
        Benchmark("mathvista", load_mathvista, nearest_choice=True),
        Benchmark("mathverse", load_mathverse),
        Benchmark("mathvision", load_mathvision),
        Benchmark("wemath", load_wemath),
        Benchmark("logicvista", load_logicvista),
        Benchmark("geometry3k", load_geometry3k),
        Benchmark("math500", load_math500),
        Benchmark("amc", load_amc),
    )
}
_ALIASES = {"mathv": "mathvision", "geo3k": "geometry3k", "amc23": "amc"}


def canonical_name(name: str) -> str:
    """Registry name of a benchmark ("MathVista", "math-500", "AMC23", "geo3k" are accepted)."""
    key = re.sub(r"[\s_\-]", "", name.lower())
    key = _ALIASES.get(key, key)
    if key not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {name!r}; valid names: {', '.join(BENCHMARKS)}")
    return key


def load_benchmark(name: str, path: str | Path, limit: int | None = None) -> list[EvalItem]:
    """Load the first `limit` items (all when None) of benchmark `name` from a local file or folder.

    Duplicate uids get a `#n` suffix so that every prediction line names one item.
    """
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1 or None, got {limit}")
    bench = BENCHMARKS[canonical_name(name)]
    items = bench.load(Path(path).expanduser(), limit)
    if not items:
        raise ValueError(f"{bench.name}: no items in {path}")
    seen: dict[str, int] = {}
    for item in items:
        count = seen.get(item.uid, 0)
        seen[item.uid] = count + 1
        if count:
            item.uid = f"{item.uid}#{count}"
    log.info("%s: %d items from %s", bench.name, len(items), path)
    return items
