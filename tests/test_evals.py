"""calibrl_mcore.evals: benchmark loaders on hand-written fixtures, the scorers, the harness and the CLI route.

Fixtures: tests/fixtures/evals/<bench>/ (written by tests/fixtures/evals/make_fixtures.py); HF parquet
variants are written at test time. Expected values are written out by hand, never computed by the code
under test.
"""

from __future__ import annotations

import io
import json
import sys
import types
from pathlib import Path

import psutil
import pytest
from PIL import Image

from calibrl_mcore.evals import (
    BENCHMARKS,
    EvalItem,
    Extraction,
    canonical_name,
    extract_prediction,
    is_correct,
    load_benchmark,
    parse_inline_choices,
    parse_number,
    run_suite,
    score_response,
)
from calibrl_mcore.evals.harness import benchmark_paths

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "evals"


def png_bytes(color: tuple[int, int, int] = (200, 0, 0)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), color).save(buffer, format="PNG")
    return buffer.getvalue()


def write_parquet(path: Path, rows: list[dict]) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


# --- Loaders ---------------------------------------------------------------------------------------


def test_mathvista_github_json() -> None:
    items = load_benchmark("mathvista", FIXTURES / "mathvista")
    assert [i.uid for i in items] == ["1", "2", "3", "4"]
    mc, integer, flt, yes_no = items
    assert (mc.kind, mc.gold, mc.choices) == ("choice", "C", ["125°", "135°", "145°", "155°"])
    assert mc.question.startswith("Hint: Please answer the question and provide the correct option letter")
    assert mc.question.endswith("Choices:\n(A) 125°\n(B) 135°\n(C) 145°\n(D) 155°")
    assert mc.meta["answer_text"] == "145°" and mc.meta["metadata"]["source"] == "fixture"
    assert (integer.kind, integer.gold, integer.meta["answer_type"]) == ("numeric", "4", "integer")
    # pid 3 has no `query`: rebuilt the MathVista way
    assert flt.question == ("Hint: Please answer the question requiring a floating-point number with one decimal "
                            "place and provide the final value, e.g., 1.2, 1.3, 1.4, at the end.\n"
                            "Question: What is the slope of the line?")
    assert (flt.kind, flt.gold, flt.meta["precision"]) == ("numeric", "1.2", 1.0)
    assert (yes_no.gold, yes_no.choices) == ("A", ["Yes", "No"])
    assert all(len(i.images) == 1 and i.images[0].path.is_file() for i in items)
    assert items[0].images[0].path == (FIXTURES / "mathvista/data/images/1.png").resolve()


def test_mathvista_hf_parquet_with_embedded_images(tmp_path: Path) -> None:
    row = {"pid": "7", "question": "Which is larger?", "image": "images/7.jpg",  # stale path: bytes win
           "decoded_image": {"bytes": png_bytes(), "path": "7.jpg"}, "choices": ["left", "right"],
           "unit": None, "precision": None, "answer": "right", "question_type": "multi_choice",
           "answer_type": "text", "query": "Hint: ...\nQuestion: Which is larger?\nChoices:\n(A) left\n(B) right",
           "metadata": {"split": "testmini"}}
    write_parquet(tmp_path / "data" / "testmini-00000-of-00001.parquet", [row])
    (item,) = load_benchmark("MathVista", tmp_path)
    assert (item.uid, item.gold, item.kind) == ("7", "B", "choice")
    assert item.images[0].data == png_bytes() and item.images[0].path is None
    assert item.question.endswith("(B) right")


def test_mathvista_answer_outside_choices_is_an_error(tmp_path: Path) -> None:
    row = {"pid": "1", "question": "q", "image": None, "choices": ["1", "2"], "answer": "3",
           "question_type": "multi_choice", "answer_type": "integer", "precision": None}
    (tmp_path / "testmini.json").write_text(json.dumps({"1": row}))
    with pytest.raises(ValueError, match="not one of the choices"):
        load_benchmark("mathvista", tmp_path)


def test_mathverse_testmini_json() -> None:
    mc, free, vision_only = load_benchmark("mathverse", FIXTURES / "mathverse")
    assert (mc.uid, mc.kind, mc.gold) == ("1", "choice", "B")
    assert mc.choices == ["50°", "40°", "80°", "100°"]
    assert mc.question.endswith("Choices:\nA:50°\nB:40°\nC:80°\nD:100°")
    assert mc.meta["problem_version"] == "Text Dominant"
    assert (free.kind, free.gold, free.choices) == ("latex", "5", [])
    assert vision_only.question.startswith("According to the question shown in the image")
    assert vision_only.images[0].path.name == "image_3.png"


def test_mathvision_jsonl() -> None:
    counting, fraction, pictures = load_benchmark("mathvision", FIXTURES / "mathvision")
    assert counting.question == ("<image1>\nHow many triangles are in the picture?\n"
                                 "Choices: A. 1\nB. 2\nC. 3\nD. 4\nE. 5")
    assert (counting.kind, counting.gold, counting.choices) == ("choice", "C", ["1", "2", "3", "4", "5"])
    assert (fraction.kind, fraction.gold) == ("latex", "\\frac{1}{2}")
    assert fraction.meta == {"level": 2, "subject": "metric geometry - area"}
    assert (pictures.gold, pictures.letters) == ("E", "ABCDE")


def test_wemath_testmini_json() -> None:
    first, second = load_benchmark("we-math", FIXTURES / "wemath")
    assert first.uid == "1steps_1" and first.gold == "B"
    assert first.question.endswith("\nOptions: A. 6.28;B. 12.56;C. 3.14;D. 25.12;E. No correct answer")
    assert first.choices == ["6.28", "12.56", "3.14", "25.12", "No correct answer"]
    assert first.meta["knowledge_concept"] == "Area of a circle" and second.meta["key"] == "2steps_1"
    assert second.images[0].path.name == "1-1.png"


def test_logicvista_dataset_json() -> None:
    single, double, in_image = load_benchmark("logicvista", FIXTURES / "logicvista")
    assert (single.gold, single.choices) == ("C", ["circle", "square", "triangle", "star"])
    assert double.gold == "B, C" and double.choices[1] == "Some dogs bark"
    assert (in_image.gold, in_image.choices, in_image.letters) == ("A, E", [], "ABCDEFGHIJ")
    assert single.meta["skill"] == ["inductive"]
    assert single.images[0].path == (FIXTURES / "logicvista/data/images/1.png").resolve()


def test_geometry3k_intergps_folders() -> None:
    first, second = load_benchmark("geometry3k", FIXTURES / "geometry3k")
    assert (first.uid, first.gold, first.choices) == ("2401", "C", ["5.8", "6.5", "14.2", "44.3"])
    assert first.question == ("Find x. Round to the nearest tenth.\nChoices:\n(A) 5.8\n(B) 6.5\n(C) 14.2\n"
                              "(D) 44.3")
    assert first.images[0].path.name == "img_diagram.png" and second.meta["problem_type_goal"] == ["Angle"]


def test_geometry3k_hf_conversion(tmp_path: Path) -> None:
    rows = [{"images": [{"bytes": png_bytes(), "path": None}], "problem": "<image>Find x.", "answer": "2\\sqrt{3}"},
            {"images": [], "problem": "<image>Find y.", "answer": "7"}]  # placeholder without image: dropped
    write_parquet(tmp_path / "data" / "test-00000-of-00001.parquet", rows)
    first, second = load_benchmark("geo3k", tmp_path)
    assert (first.uid, first.kind, first.gold, first.question) == ("0", "latex", "2\\sqrt{3}", "<image>Find x.")
    assert len(first.images) == 1 and second.question == "Find y." and second.images == []


def test_math500_and_amc_jsonl() -> None:
    math500 = load_benchmark("MATH-500", FIXTURES / "math500")
    assert [i.uid for i in math500] == ["test/prealgebra/1.json", "test/algebra/2.json", "test/algebra/3.json"]
    assert (math500[1].kind, math500[1].gold, math500[1].images) == ("latex", "5\\sqrt{2}", [])
    assert math500[1].meta == {"subject": "Algebra", "level": 2}
    amc = load_benchmark("amc23", FIXTURES / "amc" / "test.jsonl")
    assert [(i.uid, i.gold, i.kind) for i in amc] == [("0", "14", "numeric"), ("1", "3.5", "numeric"),
                                                     ("2", "4", "numeric")]
    assert amc[2].question == "How many primes are below 10?"  # `question` alias of `problem`


def test_load_benchmark_limit_names_and_errors(tmp_path: Path) -> None:
    assert [i.uid for i in load_benchmark("mathvista", FIXTURES / "mathvista", limit=2)] == ["1", "2"]
    assert {canonical_name(n) for n in ("MathVista", "math_vision", "MathV", "AMC23", "Geometry3K")} == {
        "mathvista", "mathvision", "amc", "geometry3k"}
    assert set(BENCHMARKS) == {"mathvista", "mathverse", "mathvision", "wemath", "logicvista", "geometry3k",
                               "math500", "amc"}
    with pytest.raises(ValueError, match="unknown benchmark 'mmmu'"):
        load_benchmark("mmmu", FIXTURES)
    with pytest.raises(ValueError, match="limit"):
        load_benchmark("amc", FIXTURES / "amc", limit=0)
    with pytest.raises(FileNotFoundError, match="no data file"):
        load_benchmark("math500", tmp_path)
    (tmp_path / "test.jsonl").write_text(json.dumps({"id": "9", "question": "q", "options": [], "image": "gone.png",
                                                     "answer": "1"}) + "\n")
    with pytest.raises(FileNotFoundError, match="item '9': image 'gone.png' not found"):
        load_benchmark("mathvision", tmp_path)


@pytest.mark.parametrize(("text", "expected"), [
    ("Choices:\nA:50°\nB:40°\nC:80°", ["50°", "40°", "80°"]),
    ("A. 1;B. 2; C. 3", ["1", "2", "3"]),
    ("Pick one. (A) red (B) blue", ["red", "blue"]),
    ("Points B. and C. lie on a line", []),  # no run starting at A
    ("Is the angle at vertex A. acute?", []),  # a single "option" is no list
])
def test_parse_inline_choices(text: str, expected: list[str]) -> None:
    assert parse_inline_choices(text) == expected


# --- Scoring ---------------------------------------------------------------------------------------


def _item(kind: str, gold: str, choices: list[str] | None = None, **meta: object) -> EvalItem:
    return EvalItem(uid="t", question="q", images=[], gold=gold, kind=kind, choices=choices or [], meta=meta)  # type: ignore[arg-type]


ANGLES = ["125°", "135°", "145°", "155°"]
# (pred, gold, choices, nearest_choice, expected)
CHOICE_CASES = [
    ("C", "C", ANGLES, False, True),
    ("(c)", "C", ANGLES, False, True),
    ("Option C", "C", ANGLES, False, True),
    ("C. 145°", "C", ANGLES, False, True),
    ("145", "C", ANGLES, False, True),  # option text, degree mark dropped
    ("145°", "C", ANGLES, False, True),
    ("B", "C", ANGLES, False, False),
    ("135", "C", ANGLES, False, False),
    ("E", "E", ANGLES, False, False),  # not an option of a four-option item
    ("one hundred forty-five", "C", ANGLES, False, False),
    ("145 degrees", "C", ANGLES, True, True),  # MathVista: nearest option
    ("larger than", "A", ["larger than", "equal to", "smaller than"], False, True),
    ("Larger Than.", "A", ["larger than", "equal to", "smaller than"], False, True),
    ("smaller", "C", ["larger than", "equal to", "smaller than"], True, True),
    ("smaller", "C", ["larger than", "equal to", "smaller than"], False, False),
    # LogicVista letter sets
    ("B, C", "B, C", [], False, True),
    ("C and B", "B, C", [], False, True),
    ("BC", "B, C", [], False, True),
    ("(B) (C)", "B, C", [], False, True),
    ("B", "B, C", [], False, False),
    ("B, C, D", "B, C", [], False, False),
    ("A, C", "C", ANGLES, False, False),
    ("AB", "A", ["AB", "BC", "CA"], False, True),  # a segment named like two letters is an option text
    ("BC", "A", ["AB", "BC", "CA"], False, False),
]


@pytest.mark.parametrize(("pred", "gold", "choices", "nearest", "expected"), CHOICE_CASES)
def test_choice_matching(pred: str, gold: str, choices: list[str], nearest: bool, expected: bool) -> None:
    assert is_correct(_item("choice", gold, choices), pred, nearest_choice=nearest) is expected


# (pred, gold, meta, expected)
NUMERIC_CASES = [
    ("4", "4", {}, True),
    ("4.0", "4", {}, True),
    ("1,000", "1000", {}, True),
    ("12 cm", "12", {}, True),
    ("25%", "25", {}, True),
    ("x = 3", "3", {}, True),
    ("7/2", "3.5", {}, True),
    ("\\frac{7}{2}", "3.5", {}, True),
    ("\\sqrt{4}", "2", {}, True),  # not a plain number: math-verify
    ("3.5001", "3.5", {}, False),  # beyond the 1e-6 relative tolerance
    ("5", "4", {}, False),
    ("4.7", "4", {"answer_type": "integer"}, True),  # MathVista truncates with int()
    ("3.9", "4", {"answer_type": "integer"}, False),
    ("1.24", "1.2", {"answer_type": "float", "precision": 1.0}, True),
    ("1.26", "1.2", {"answer_type": "float", "precision": 1.0}, False),
    ("0.5", "0.50", {"answer_type": "float", "precision": 2}, True),
    ("[1, 2.5]", "[1, 2.5]", {"answer_type": "list"}, True),
    ("[1, 3]", "[1, 2]", {"answer_type": "list"}, False),
    ("[1]", "[1, 2]", {"answer_type": "list"}, False),
    ("four", "4", {}, False),
]


@pytest.mark.parametrize(("pred", "gold", "meta", "expected"), NUMERIC_CASES)
def test_numeric_matching(pred: str, gold: str, meta: dict, expected: bool) -> None:
    assert is_correct(_item("numeric", gold, **meta), pred) is expected


LATEX_CASES = [
    ("\\frac{1}{2}", "\\frac{1}{2}", True),
    ("0.5", "\\frac{1}{2}", True),
    ("\\sqrt{50}", "5\\sqrt{2}", True),
    ("(-2,2)", "(-2, 2)", True),
    ("2\\pi", "2π", True),
    ("\\frac{2}{3}", "\\frac{3}{2}", False),
    ("3\\sqrt{2}", "2\\sqrt{3}", False),
    ("[-2, 2]", "(-2, 2)", False),
    ("", "1", False),
    ("x + 1", "x - 1", False),
]


@pytest.mark.parametrize(("pred", "gold", "expected"), LATEX_CASES)
def test_latex_matching(pred: str, gold: str, expected: bool) -> None:
    assert is_correct(_item("latex", gold), pred) is expected


TEXT_CASES = [
    ("Yes", "yes", True),
    ("yes.", "Yes", True),
    ("  The  Cat ", "the cat", True),
    ('"blue"', "blue", True),
    ("2.0", "2", True),
    ("no", "yes", False),
    ("the dog", "the cat", False),
    ("blue sky", "blue", False),
    ("3", "2", False),
    ("", "yes", False),
]


@pytest.mark.parametrize(("pred", "gold", "expected"), TEXT_CASES)
def test_text_matching(pred: str, gold: str, expected: bool) -> None:
    assert is_correct(_item("text", gold), pred) is expected


@pytest.mark.parametrize(("response", "kind", "text", "source"), [
    ("<think>so B</think><answer>C</answer>", "choice", "C", "answer_tag"),
    ("<think>x</think><answer>\\boxed{\\frac{1}{2}}</answer>", "latex", "\\frac{1}{2}", "answer_tag"),
    ("The area is \\boxed{12} square units.", "numeric", "12", "boxed"),
    ("Reasoning... The answer is (B) because it fits.", "choice", "(B) because it fits", "phrase"),
    ("<Thought process>: ... <Answer>: <<C>>", "choice", "C", "phrase"),
    ("Final answer: **42**.", "numeric", "42", "phrase"),
    ("I would pick D.", "choice", "D", "last_letter"),
    ("A triangle has three sides.", "choice", None, None),  # "A" opening a sentence is no answer
    ("values 3, 4 and 1,250.5 in total", "numeric", "1250.5", "last_number"),
    ("no answer here", "text", None, None),
    ("", "numeric", None, None),
])
def test_extraction_chain(response: str, kind: str, text: str | None, source: str | None) -> None:
    assert extract_prediction(response, kind, "ABCD") == Extraction(text, source)


def test_extraction_without_fallbacks_and_number_parsing() -> None:
    assert extract_prediction("The answer is 5", "numeric", fallbacks=False).text is None
    assert parse_number("-\\frac{1}{4}") == -0.25 and parse_number("1,234.5 m") == 1234.5
    assert parse_number("2x") is None and parse_number("1/0") is None


def test_score_response_lenient_and_strict() -> None:
    item = _item("choice", "C", ANGLES)
    tagged = score_response(item, "<think>measure it</think><answer>C</answer>")
    assert (tagged.correct, tagged.strict, tagged.fmt, tagged.source) == (True, True, 1.0, "answer_tag")
    loose = score_response(item, "It is 145°, so the answer is C.")
    assert (loose.correct, loose.strict, loose.fmt, loose.extracted) == (True, False, 0.0, "C")
    wrong = score_response(item, "<think>x</think><answer>A</answer>")
    assert (wrong.correct, wrong.strict, wrong.fmt) == (False, False, 1.0)
    nearest = score_response(item, "<think>x</think><answer>about 145 degrees</answer>", nearest_choice=True)
    assert nearest.correct and nearest.strict


# --- Harness and CLI -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # shared with the rollout tests: one tiny checkpoint per pytest session
    from tests.test_rollout_engine import tiny_model_dir

    return tiny_model_dir(tmp_path_factory.getbasetemp(), "qwen2_5_vl", 0)


def test_run_suite_end_to_end(tiny_model: Path, tmp_path: Path) -> None:
    out = tmp_path / "eval"
    paths = {"mathvista": FIXTURES / "mathvista", "math-500": FIXTURES / "math500"}
    reports = run_suite(["MathVista", "math500"], paths, tiny_model, None, 2, out, 8)
    assert list(reports) == ["mathvista", "math500"]
    for name, report in reports.items():
        assert report.n == 2 and 0.0 <= report.accuracy <= 1.0 and 0.0 <= report.acc_x_fmt <= report.accuracy
        assert sum(report.sources.values()) == 2
        lines = [json.loads(x) for x in Path(report.predictions).read_text().splitlines()]
        assert [x["benchmark"] for x in lines] == [name, name]
        assert {"uid", "gold", "kind", "question", "response", "extracted", "source", "correct", "strict", "fmt",
                "finish_reason", "meta"} <= set(lines[0])
    vista = [json.loads(x) for x in (out / "predictions" / "mathvista.jsonl").read_text().splitlines()]
    assert [(x["uid"], x["gold"], x["num_images"]) for x in vista] == [("1", "C", 1), ("2", "4", 1)]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["run"]["suite"] == ["mathvista", "math500"] and summary["run"]["max_new_tokens"] == 8
    assert summary["run"]["limit"] == 2 and set(summary["benchmarks"]) == {"mathvista", "math500"}
    assert summary["benchmarks"]["math500"]["n"] == 2 and "average_accuracy" in summary
    table = (out / "summary.md").read_text()
    assert "| benchmark | n | accuracy | acc×fmt | format | extracted | truncated |" in table
    assert "| mathvista | 2 |" in table and "| math500 | 2 |" in table and "| **average** | 4 |" in table
    assert (out / "server.log").exists()
    leftovers = [p for p in psutil.Process().children(recursive=True) if "rollout.server" in " ".join(p.cmdline())]
    assert leftovers == []  # the embedded server was stopped


def test_run_suite_rejects_bad_suites_before_starting_a_server(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no data path for benchmark"):
        run_suite(["mathvista", "amc"], {"mathvista": FIXTURES / "mathvista"}, tmp_path, None, 1, tmp_path, 8)
    with pytest.raises(ValueError, match="empty suite"):
        run_suite([], {}, tmp_path, None, 1, tmp_path, 8)


def test_benchmark_paths_from_suite_dir_and_pairs(tmp_path: Path) -> None:
    (tmp_path / "MathVista").mkdir()
    (tmp_path / "MATH-500").mkdir()
    (tmp_path / "notes").mkdir()  # not a benchmark: ignored
    paths = benchmark_paths(["mathvista", "math500", "amc"], suite_dir=tmp_path,
                            explicit={"AMC23": "/data/amc.jsonl"})
    assert paths == {"mathvista": tmp_path / "MathVista", "math500": tmp_path / "MATH-500",
                     "amc": Path("/data/amc.jsonl")}
    with pytest.raises(ValueError, match="benchmark wemath: no --bench wemath=PATH"):
        benchmark_paths(["wemath"], suite_dir=tmp_path)


def test_cli_eval_routes_to_the_harness(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys) -> None:
    import calibrl_mcore.evals.harness as harness
    from calibrl_mcore.cli import main

    calls: list[dict] = []

    def fake_run_suite(suite, paths, model_path, urls=None, limit=None, out_dir="x", max_new_tokens=1, **kw):
        calls.append(dict(suite=suite, paths=paths, model_path=model_path, urls=urls, limit=limit,
                          out_dir=out_dir, max_new_tokens=max_new_tokens, **kw))
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        (Path(out_dir) / "summary.md").write_text("| benchmark |\n")
        return {name: None for name in paths}

    monkeypatch.setattr(harness, "run_suite", fake_run_suite)
    out = tmp_path / "out"
    m500 = tmp_path / "m500.jsonl"
    m500.write_text("")
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    # the CLI checks that --model looks like an HF checkpoint before any work (calibrl_mcore/inputs.py)
    for name in ("config.json", "model.safetensors", "tokenizer.json", "preprocessor_config.json"):
        (ckpt / name).write_text("{}")
    rc = main(["eval", "--model", str(ckpt), "--suite", "mathvista,math500", "--suite-dir", str(FIXTURES),
               "--bench", f"math500={m500}", "--limit", "2", "--out", str(out), "rollout.max_new_tokens=8"])
    assert rc == 0
    (call,) = calls
    assert call["suite"] == ["mathvista", "math500"] and call["model_path"] == str(ckpt)
    assert call["paths"] == {"mathvista": FIXTURES / "mathvista", "math500": m500}
    assert (call["limit"], call["out_dir"], call["max_new_tokens"], call["urls"]) == (2, str(out), 8, None)
    assert "summary in" in capsys.readouterr().out

    capsys.readouterr()
    assert main(["eval", "--suite", "amc", "--bench", "amc"]) == 2  # one line, exit code 2 (calibrl_mcore/cli.py)
    assert "--bench expects NAME=PATH, got 'amc'" in capsys.readouterr().err

    # without --suite: the held-out set, as before (a stand-in module spares the Megatron imports)
    seen: list[tuple] = []
    evaluate = types.ModuleType("calibrl_mcore.trainer.evaluate")
    evaluate.evaluate_checkpoint = lambda cfg, model_path=None, limit=None: seen.append((model_path, limit)) or {}
    monkeypatch.setitem(sys.modules, "calibrl_mcore.trainer.evaluate", evaluate)
    heldout = tmp_path / "eval.jsonl"
    heldout.write_text("{}\n")
    assert main(["eval", "--model", str(ckpt), f"data.eval_path={heldout}"]) == 0
    assert seen == [(str(ckpt), None)]
