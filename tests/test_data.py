"""Tests of calibrl_mcore.data: synthetic tasks, loading (jsonl / parquet), corrupt rows, sampler, template."""

from __future__ import annotations

import base64
import io
import json
import logging
from pathlib import Path

import pytest
from PIL import Image

from calibrl_mcore.data import (
    TASK_KINDS,
    Example,
    ImageLoadError,
    ImageRef,
    PILImagePipeline,
    PromptDataset,
    PromptSampler,
    RowError,
    as_expert_response,
    build_messages,
    count_prompt_tokens,
    generate_synthetic,
    load_image,
    parse_row,
    render_prompt_text,
    split,
)
from calibrl_mcore.data.synth import main as synth_main
from calibrl_mcore.rewards import compute_reward

REPO = Path(__file__).resolve().parents[1]


def _png_bytes(
    size: tuple[int, int] = (8, 6), color: tuple[int, ...] = (200, 10, 10), mode: str = "RGB"
) -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, color).save(buf, format="PNG")
    return buf.getvalue()


def _write_jsonl(path: Path, rows: list) -> Path:
    lines = [r if isinstance(r, str) else json.dumps(r) for r in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _row(i: int, **extra) -> dict:
    return {
        "uid": f"u{i}",
        "question": f"What is {i}+1?",
        "answer": str(i + 1),
        "solution": f"<think>{i}+1={i + 1}</think><answer>{i + 1}</answer>",
        **extra,
    }


# ---------------------------------------------------------------------------------------------------------
# Synthetic tasks
# ---------------------------------------------------------------------------------------------------------


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_synth_is_deterministic(tmp_path: Path) -> None:
    a = generate_synthetic(tmp_path / "a", 12, seed=7, expert_noise=0.25, heldout=4)
    generate_synthetic(tmp_path / "b", 12, seed=7, expert_noise=0.25, heldout=4)
    generate_synthetic(tmp_path / "c", 12, seed=8, expert_noise=0.25, heldout=4)
    tree_a = _tree(tmp_path / "a")
    assert tree_a == _tree(tmp_path / "b")
    assert tree_a != _tree(tmp_path / "c")
    assert len([k for k in tree_a if k.startswith("images/")]) == 16
    assert a["splits"]["train"]["counts"] == {k: 3 for k in TASK_KINDS}
    assert a["splits"]["train"]["expert_corrupted"] == 3
    assert json.loads((tmp_path / "a" / "README.json").read_text()) == a


def test_synth_cli_and_image_size(tmp_path: Path) -> None:
    rc = synth_main(
        ["--out", str(tmp_path), "--n", "4", "--seed", "1", "--heldout", "2", "--image-size", "64"]
    )
    assert rc == 0
    rows = [json.loads(line) for line in (tmp_path / "train.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and len((tmp_path / "eval.jsonl").read_text().splitlines()) == 2
    with Image.open(tmp_path / rows[0]["images"][0]) as img:
        assert img.size == (64, 64) and img.mode == "RGB"


def test_synth_experts_pass_the_reward_and_corrupted_ones_fail(tmp_path: Path) -> None:
    generate_synthetic(tmp_path, 48, seed=3, expert_noise=0.5, heldout=8)
    ds = PromptDataset.from_path(tmp_path / "train.jsonl")
    assert len(ds) == 48 and ds.num_skipped == 0
    seen: set[tuple[str, bool]] = set()
    for ex in ds:
        corrupted = ex.meta["expert_corrupted"]
        result = compute_reward(ex.expert, ex.answer)
        assert result.fmt == 1.0, ex.expert
        assert result.acc == (0.0 if corrupted else 1.0), (ex.meta["kind"], ex.question, ex.answer, ex.expert)
        seen.add((ex.meta["kind"], corrupted))
    assert seen == {(k, c) for k in TASK_KINDS for c in (False, True)}
    assert sum(ex.meta["expert_corrupted"] for ex in ds) == 24
    eval_ds = PromptDataset.from_path(tmp_path / "eval.jsonl")
    assert not any(ex.meta["expert_corrupted"] for ex in eval_ds)
    assert all(compute_reward(ex.expert, ex.answer).acc == 1.0 for ex in eval_ds)


def test_synth_answers_match_kinds(tmp_path: Path) -> None:
    generate_synthetic(tmp_path, 40, seed=5, heldout=1)
    for ex in PromptDataset.from_path(tmp_path / "train.jsonl"):
        kind = ex.meta["kind"]
        if kind == "bars":
            assert ex.answer in "ABCD" and "Answer with the letter" in ex.question
        elif kind == "count":
            assert 1 <= int(ex.answer) <= 4
        elif kind == "clock":
            assert 1 <= int(ex.answer) <= 12
        else:
            assert int(ex.answer) % 10 == 0 and 30 <= int(ex.answer) <= 120
        assert len(ex.images) == 1 and ex.load_images()[0].size == (56, 56)


# ---------------------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------------------


def test_jsonl_aliases_relative_images_and_meta(tmp_path: Path) -> None:
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "a.png").write_bytes(_png_bytes())
    uri = "data:image/png;base64," + base64.b64encode(_png_bytes((5, 5))).decode()
    path = _write_jsonl(
        tmp_path / "d.jsonl",
        [
            {
                "id": 7,
                "problem": "<image> Find x.",
                "image": "imgs/a.png",
                "answer": 3,
                "experts": ["x is 3", "<think>so 3</think><answer>3</answer>"],
                "source": "geo",
                "meta": {"k": 1},
            },
            {
                "question": "Q2",
                "images": [uri, {"bytes": None, "path": "imgs/a.png"}],
                "answer": "B",
                "solution": "B",
            },
        ],
    )
    ds = PromptDataset.from_path(path)
    a, b = ds
    assert (a.uid, a.question, a.answer) == ("7", "<image> Find x.", "3")
    assert a.experts == ["<think>x is 3</think><answer>3</answer>", "<think>so 3</think><answer>3</answer>"]
    assert a.meta == {"source": "geo", "k": 1}
    assert a.images[0].path == (tmp_path / "imgs" / "a.png").resolve()
    assert b.uid == "d-1" and len(b.images) == 2
    assert [im.size for im in b.load_images()] == [(5, 5), (8, 6)]


def test_parquet_with_image_bytes(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table(
        {
            "problem": ["How many?", "Which?"],
            "images": [
                [{"bytes": _png_bytes(), "path": "lost.png"}],
                [{"bytes": _png_bytes((4, 4)), "path": None}],
            ],
            "answer": ["2", "A"],
            "solution": ["<think>two</think><answer>2</answer>", "<think>a</think><answer>A</answer>"],
        }
    )
    pq.write_table(table, tmp_path / "d.parquet")
    ds = PromptDataset.from_path(tmp_path / "d.parquet")
    assert [ex.answer for ex in ds] == ["2", "A"] and ds.num_skipped == 0
    assert ds[0].images[0].data is not None
    assert ds[0].load_images()[0].getpixel((0, 0)) == (200, 10, 10)


def test_corrupt_rows_are_skipped_counted_and_warned_once(tmp_path: Path, caplog) -> None:
    garbage = "data:image/png;base64," + base64.b64encode(b"not an image at all").decode()
    path = _write_jsonl(
        tmp_path / "d.jsonl",
        [
            _row(0),
            '{"question": "broken json',
            {k: v for k, v in _row(2).items() if k != "answer"},
            _row(3, images=[garbage]),
            _row(4, images=["missing.png"]),
            {k: v for k, v in _row(5).items() if k != "solution"},
            _row(6, images=["ok.png"]),
            _row(7),
        ],
    )
    with path.open("ab") as f:
        f.write(b'{"question": "caf\xe9", "answer": "1", "solution": "s"}\n')  # latin-1 byte, not UTF-8
    (tmp_path / "ok.png").write_bytes(_png_bytes())
    with caplog.at_level(logging.WARNING, logger="calibrl_mcore.data.dataset"):
        ds = PromptDataset.from_path(path)
    assert [ex.uid for ex in ds] == ["u0", "u6", "u7"]
    assert ds.num_skipped == 6
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "skipped 6 of 9 rows" in warnings[0].getMessage()
    reasons = " | ".join(ds.skip_reasons)
    assert "row 1" in reasons and "invalid JSON" in reasons
    assert "row 2 (uid 'u2'): field 'answer'" in reasons
    assert "row 3 (uid 'u3'): field 'images[0]'" in reasons and "cannot decode" in reasons
    assert "image file not found" in reasons


def test_undecodable_parquet_bytes_and_image_count_limit(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    png = _png_bytes()
    truncated = png[: len(png) // 2]
    rows = [_row(0, images=[png]), _row(1, images=[truncated]), _row(2, images=[png] * 3)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    ds = PromptDataset.from_path(tmp_path / "d.parquet", max_images=2)
    assert [ex.uid for ex in ds] == ["u0"] and ds.num_skipped == 2
    assert "max_images=2" in ds.skip_reasons[1]


@pytest.mark.parametrize("content", ["", "\n\n", "not json\n[1, 2]\n"])
def test_empty_or_all_invalid_file_raises_naming_it(tmp_path: Path, content: str) -> None:
    path = tmp_path / "nothing_here.jsonl"
    path.write_text(content)
    with pytest.raises(ValueError, match="nothing_here.jsonl"):
        PromptDataset.from_path(path)


def test_bad_paths_raise_naming_the_file(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="absent.jsonl"):
        PromptDataset.from_path(tmp_path / "absent.jsonl")
    (tmp_path / "d.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match=r"d\.csv"):
        PromptDataset.from_path(tmp_path / "d.csv")
    (tmp_path / "fake.parquet").write_text("no")
    with pytest.raises(ValueError, match="fake.parquet"):
        PromptDataset.from_path(tmp_path / "fake.parquet")


def test_parse_row_errors_name_row_uid_and_field() -> None:
    with pytest.raises(RowError, match=r"row 4 \(uid 'x'\): field 'question'"):
        parse_row({"uid": "x", "question": 5, "answer": "1", "solution": "s"}, 4)
    with pytest.raises(RowError, match=r"field 'solution/expert/experts'"):
        parse_row({"question": "q", "answer": "1"}, 0)
    assert parse_row({"question": "q", "answer": "1"}, 0, require_expert=False).experts == []
    with pytest.raises(RowError, match="placeholders"):
        parse_row(
            {"question": "<image><image> q", "answer": "1", "solution": "s", "images": [_png_bytes()]}, 0
        )


class _WhitespaceTokenizer:
    """Minimal tokenizer stand-in: one token per whitespace-separated word, no chat template."""

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict:
        return {"input_ids": text.split()}


def test_length_filter(tmp_path: Path) -> None:
    path = _write_jsonl(tmp_path / "d.jsonl", [_row(0), _row(1, question="word " * 50)])
    tok = _WhitespaceTokenizer()
    ds = PromptDataset.from_path(path, tokenizer=tok, max_prompt_tokens=30)
    assert [ex.uid for ex in ds] == ["u0"] and ds.num_filtered == 1 and ds.num_skipped == 0
    assert count_prompt_tokens(ds[0], tok) < 30
    with pytest.raises(ValueError, match="tokenizer"):
        PromptDataset.from_path(path, max_prompt_tokens=30)


# ---------------------------------------------------------------------------------------------------------
# Sampler and split
# ---------------------------------------------------------------------------------------------------------


def test_sampler_epochs_are_permutations_and_deterministic() -> None:
    s = PromptSampler(10, seed=3)
    first, second = s.next_batch(10), s.next_batch(10)
    assert sorted(first) == sorted(second) == list(range(10)) and first != second
    assert PromptSampler(10, seed=3).next_batch(20) == first + second
    assert PromptSampler(10, seed=4).next_batch(10) != first


def test_sampler_resume_mid_epoch_gives_identical_batches() -> None:
    ref = PromptSampler(10, seed=1)
    ref.next_batch(3)
    ref.next_batch(4)
    state = json.loads(json.dumps(ref.state_dict()))  # survives a checkpoint round trip
    assert state["epoch"] == 0 and state["position"] == 7
    expected = [ref.next_batch(4) for _ in range(6)]  # crosses several epoch boundaries
    resumed = PromptSampler(10, seed=1)
    resumed.load_state_dict(state)
    assert [resumed.next_batch(4) for _ in range(6)] == expected
    with pytest.raises(ValueError, match="dataset_len"):
        PromptSampler(11, seed=1).load_state_dict(state)
    with pytest.raises(ValueError, match="seed"):
        PromptSampler(10, seed=2).load_state_dict(state)


def test_split_is_deterministic_and_disjoint(tmp_path: Path) -> None:
    ds = PromptDataset.from_path(_write_jsonl(tmp_path / "d.jsonl", [_row(i) for i in range(20)]), seed=5)
    train, heldout = split(ds, 0.25)
    assert (len(train), len(heldout)) == (15, 5)
    assert {e.uid for e in train} | {e.uid for e in heldout} == {e.uid for e in ds}
    assert not {e.uid for e in train} & {e.uid for e in heldout}
    assert [e.uid for e in split(ds, 0.25)[1]] == [e.uid for e in heldout]
    assert [e.uid for e in split(ds, 0.25, seed=6)[1]] != [e.uid for e in heldout]
    with pytest.raises(ValueError):
        split(ds, 1.0)


# ---------------------------------------------------------------------------------------------------------
# Template and images
# ---------------------------------------------------------------------------------------------------------


def _example(question: str, n_images: int) -> Example:
    refs = [ImageRef(data=_png_bytes()) for _ in range(n_images)]
    return Example(
        uid="e", question=question, answer="1", images=refs, experts=["<think>a</think><answer>1</answer>"]
    )


def test_build_messages_places_images() -> None:
    msgs = build_messages(_example("How many?", 2))
    assert msgs[0]["role"] == "user"
    parts = msgs[0]["content"]
    assert [p["type"] for p in parts] == ["image", "image", "text"]
    assert parts[-1]["text"].startswith("How many?\n") and "<think>" in parts[-1]["text"]
    assert "<answer>" in parts[-1]["text"]
    inter = build_messages(_example("Left: <image> right: <image> same?", 2), system_prompt="S")
    assert inter[0]["role"] == "system"
    assert [p["type"] for p in inter[1]["content"]] == ["text", "image", "text", "image", "text"]
    embedded = build_messages(_example("q", 1), images=["IMG"])
    assert embedded[0]["content"][0] == {"type": "image", "image": "IMG"}
    assert render_prompt_text(_example("q", 1)).startswith("<image>q\n")


def test_as_expert_response() -> None:
    assert as_expert_response(" x=2 so 4 ", "4") == "<think>x=2 so 4</think><answer>4</answer>"
    tagged = "<think>t</think><answer>4</answer>"
    assert as_expert_response(tagged, "4") == tagged
    assert compute_reward(as_expert_response("because", "4"), "4").reward == pytest.approx(1.1)


def test_load_image_sources_and_errors(tmp_path: Path) -> None:
    rgba = _png_bytes((4, 4), (0, 0, 0, 0), mode="RGBA")
    img = load_image(rgba)
    assert img.mode == "RGB" and img.getpixel((0, 0)) == (255, 255, 255)  # transparent -> white
    (tmp_path / "a.png").write_bytes(_png_bytes())
    assert load_image("a.png", base_dir=tmp_path).size == (8, 6)
    assert load_image({"bytes": _png_bytes(), "path": "ignored"}).size == (8, 6)
    with pytest.raises(ImageLoadError, match="not found"):
        load_image(tmp_path / "missing.png")
    with pytest.raises(ImageLoadError, match="cannot decode image <5 image bytes>"):
        load_image(b"hello")
    with pytest.raises(ImageLoadError, match="neither 'bytes' nor 'path'"):
        load_image({"x": 1})
    with pytest.raises(ImageLoadError, match="unsupported"):
        load_image(3.5)  # type: ignore[arg-type]


def test_pil_pipeline_bounds() -> None:
    refs = [ImageRef(data=_png_bytes((400, 100))), ImageRef(data=_png_bytes((10, 10)))]
    big, small = PILImagePipeline(max_side=200, min_pixels=40 * 40)(refs)
    assert big.size == (200, 50)
    assert small.size == (40, 40)
    (capped,) = PILImagePipeline(max_pixels=100 * 100)(refs[:1])
    assert capped.size[0] * capped.size[1] <= 100 * 100 and capped.size[0] == 4 * capped.size[1]
    with pytest.raises(ValueError, match="min_pixels"):
        PILImagePipeline(min_pixels=100, max_pixels=10)


# ---------------------------------------------------------------------------------------------------------
# Rendering through a real (tiny) processor
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_qwen_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not (REPO / "tools" / "make_tiny_model.py").exists():
        pytest.skip("tools/make_tiny_model.py is not in this checkout")
    from calibrl_mcore.make_tiny_model import make_tiny_model

    return make_tiny_model("qwen2_5_vl", tmp_path_factory.mktemp("tiny_qwen"))


def test_template_renders_through_tiny_processor(tiny_qwen_dir: Path, tmp_path: Path) -> None:
    from calibrl_mcore.make_tiny_model import load_processor

    processor = load_processor(tiny_qwen_dir)
    generate_synthetic(tmp_path, 4, seed=0, heldout=1)
    ds = PromptDataset.from_path(tmp_path / "train.jsonl", tokenizer=processor, max_prompt_tokens=4096)
    ex = ds[0]
    text = processor.apply_chat_template(build_messages(ex), tokenize=False, add_generation_prompt=True)
    assert text.count("<|vision_start|><|image_pad|><|vision_end|>") == 1
    assert ex.question in text and text.endswith("<|im_start|>assistant\n")
    out = processor(text=[text], images=ex.load_images(), return_tensors="pt")
    n_image_tokens = int((out["input_ids"] == processor.image_token_id).sum())
    assert n_image_tokens == int(out["image_grid_thw"].prod()) // 4  # 2x2 spatial merge
    # Text-only count (one placeholder per image) + the expanded image tokens = the processor's length.
    assert count_prompt_tokens(ex, processor) + n_image_tokens - 1 == out["input_ids"].shape[1]
