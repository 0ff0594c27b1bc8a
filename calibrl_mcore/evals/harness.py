"""`run_suite`: greedy decoding of benchmark suites through the rollout client, scored per benchmark.

    reports = run_suite(["mathvista", "math500"], {"mathvista": "data/MathVista", "math500": "data/MATH-500"},
                        model_path="ckpt/hf", urls=None, limit=None, out_dir="runs/eval", max_new_tokens=2048)

Protocol: the CalibRL prompt (`data.build_messages`: images, the benchmark's rendered question, then the
`<think>`/`<answer>` instruction) in the checkpoint's own chat template; temperature 0, n = 1. Without
`urls` an embedded rollout server is started on loopback for the run and stopped at the end.

Written to `out_dir`:
- `predictions/<bench>.jsonl`: one line per item (question, gold, response, extracted answer and the rule
  that found it, correct / strict / fmt, the benchmark's metadata);
- `summary.json`: the run's settings and per-benchmark numbers; `summary.md`: the same as a table;
- `server.log`: the embedded server's log (when one was started).
All benchmarks are loaded (and their image paths checked) before any generation starts.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TextIO

from calibrl_mcore.data.images import PILImagePipeline
from calibrl_mcore.data.schema import Example
from calibrl_mcore.data.template import build_messages
from calibrl_mcore.evals.items import EvalItem
from calibrl_mcore.evals.loaders import BENCHMARKS, canonical_name, load_benchmark
from calibrl_mcore.evals.scoring import score_response
from calibrl_mcore.terminal import ProgressLine

__all__ = ["BenchmarkReport", "benchmark_paths", "render_summary_markdown", "run_suite"]



@dataclass
class BenchmarkReport:
    """Numbers of one benchmark (fractions in [0, 1])."""

    name: str
    n: int
    accuracy: float
    """Benchmark accuracy: answer found by the extraction chain and matched by the benchmark's rule."""
    acc_x_fmt: float
    """Correct from the `<answer>` block of a well-formatted response (the paper's validation number)."""
    format_rate: float
    """Mean `format_reward`."""
    extracted_rate: float
    """Share of responses from which any answer was extracted."""
    sources: dict[str, int]
    """How many answers each extraction rule found ("none" for no answer)."""
    truncated_rate: float
    """Share of responses cut by `max_new_tokens`."""
    seconds: float
    predictions: str
    """Path of the per-item predictions JSONL."""


def _json_safe(value: Any) -> Any:
    """Benchmark metadata as JSON: bytes (embedded images) become a size note, unknown types a string."""
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    if isinstance(value, bytes | bytearray):
        return f"<{len(value)} bytes>"
    if value is None or isinstance(value, str | int | float | bool):
        return value
    return str(value)


def _prompt(item: EvalItem, processor: Any, pipeline: PILImagePipeline) -> dict[str, Any]:
    """Chat-templated text + decoded images of one item, in the rollout client's prompt format."""
    example = Example(uid=item.uid, question=item.question, answer=item.gold, images=item.images, experts=[])
    text = processor.apply_chat_template(build_messages(example), add_generation_prompt=True, tokenize=False)
    try:
        images = pipeline(item.images)
    except ValueError as exc:  # ImageLoadError: name the item
        raise ValueError(f"item {item.uid!r}: {exc}") from exc
    prompt: dict[str, Any] = {"text": text}
    if images:
        prompt["image_data"] = images
    return prompt


def _evaluate_benchmark(name: str, items: list[EvalItem], client: Any, processor: Any, *, out: TextIO,
                        max_new_tokens: int, batch_size: int, pipeline: PILImagePipeline) -> dict[str, Any]:
    """Generate and score every item of one benchmark, writing prediction lines to `out`; raw counts."""
    nearest = BENCHMARKS[name].nearest_choice
    params = {"max_new_tokens": max_new_tokens, "temperature": 0.0, "n": 1}
    totals: dict[str, Any] = {"correct": 0, "strict": 0, "fmt": 0.0, "extracted": 0, "truncated": 0,
                              "sources": Counter()}
    line = ProgressLine(f"eval {name}", len(items), (("accuracy", "accuracy"), ("format", "format")), unit="item")
    for start in range(0, len(items), batch_size):
        chunk = items[start : start + batch_size]  # bounds the decoded images held at once
        samples = client.generate([_prompt(item, processor, pipeline) for item in chunk], params,
                                  return_logprob=False)
        for sample in samples:
            item = chunk[sample.prompt_index]
            score = score_response(item, sample.text, nearest_choice=nearest)
            totals["correct"] += score.correct
            totals["strict"] += score.strict
            totals["fmt"] += score.fmt
            totals["extracted"] += score.extracted is not None
            totals["truncated"] += sample.finish_reason == "length"
            totals["sources"][score.source or "none"] += 1
            record = {
                "benchmark": name, "uid": item.uid, "kind": item.kind, "gold": item.gold,
                "choices": item.choices, "question": item.question, "num_images": len(item.images),
                "response": sample.text, "finish_reason": sample.finish_reason,
                "extracted": score.extracted, "source": score.source, "correct": score.correct,
                "strict": score.strict, "fmt": score.fmt, "meta": _json_safe(item.meta),
            }
            out.write(json.dumps(record, ensure_ascii=False) + "\n")
        out.flush()
        done = min(start + batch_size, len(items))
        line.update(done, {"accuracy": totals["correct"] / done, "format": totals["fmt"] / done})
    line.close()
    return totals


def render_summary_markdown(reports: Sequence[BenchmarkReport], run: Mapping[str, Any]) -> str:
    """The summary table (percentages, one decimal) with a macro-average row."""
    lines = [
        f"# Evaluation of `{run['model_path']}`",
        "",
        f"Greedy decoding, max_new_tokens={run['max_new_tokens']}, limit={run['limit']}.",
        "",
        "| benchmark | n | accuracy | acc×fmt | format | extracted | truncated |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in reports:
        lines.append(f"| {r.name} | {r.n} | {100 * r.accuracy:.1f} | {100 * r.acc_x_fmt:.1f} | "
                     f"{100 * r.format_rate:.1f} | {100 * r.extracted_rate:.1f} | {100 * r.truncated_rate:.1f} |")
    if reports:
        def mean(attr: str) -> float:
            return 100 * sum(getattr(r, attr) for r in reports) / len(reports)

        lines.append(f"| **average** | {sum(r.n for r in reports)} | {mean('accuracy'):.1f} | "
                     f"{mean('acc_x_fmt'):.1f} | {mean('format_rate'):.1f} | {mean('extracted_rate'):.1f} | "
                     f"{mean('truncated_rate'):.1f} |")
    lines += ["", "accuracy: the benchmark's answer matching with extraction fallbacks (`evals.scoring`); "
              "acc×fmt: from the `<answer>` block of a well-formatted response only; average: macro mean.", ""]
    return "\n".join(lines)


def benchmark_paths(suite: Sequence[str], *, suite_dir: str | Path | None = None,
                    explicit: Mapping[str, str | Path] | None = None) -> dict[str, Path]:
    """Data path of each benchmark of `suite`: `explicit[name]` if given, else the folder of `suite_dir`
    whose name is the benchmark's (any case / dashes: "MathVista", "MATH-500", "geo3k")."""
    chosen = {canonical_name(k): Path(v) for k, v in (explicit or {}).items()}
    folders: dict[str, Path] = {}
    if suite_dir is not None:
        root = Path(suite_dir)
        if not root.is_dir():
            raise FileNotFoundError(f"--suite-dir {root} is not a folder")
        for sub in sorted(root.iterdir()):
            try:
                folders.setdefault(canonical_name(sub.name), sub)
            except ValueError:
                continue  # not a benchmark folder
    paths = {}
    for name in (canonical_name(n) for n in suite):
        path = chosen.get(name) or folders.get(name)
        if path is None:
            where = f"no folder for it in {suite_dir}" if suite_dir is not None else "no --suite-dir"
            raise ValueError(f"benchmark {name}: no --bench {name}=PATH and {where}")
        paths[name] = path
    return paths


def _resolve_paths(suite: Sequence[str], paths: Mapping[str, str | Path]) -> dict[str, Path]:
    """Canonical benchmark names (suite order, no duplicates) -> their data paths; errors name the gap."""
    by_name = {canonical_name(key): Path(value) for key, value in paths.items()}
    names = list(dict.fromkeys(canonical_name(n) for n in suite))
    if not names:
        raise ValueError("empty suite: name at least one benchmark")
    missing = [n for n in names if n not in by_name]
    if missing:
        raise ValueError(f"no data path for benchmark(s) {', '.join(missing)}")
    return {n: by_name[n] for n in names}


def run_suite(
    suite: Sequence[str],
    paths: Mapping[str, str | Path],
    model_path: str | Path,
    urls: Sequence[str] | None = None,
    limit: int | None = None,
    out_dir: str | Path = "runs/eval",
    max_new_tokens: int = 2048,
    *,
    api_key: str = "",
    timeout_s: float = 600.0,
    batch_size: int = 32,
    max_pixels: int | None = None,
) -> dict[str, BenchmarkReport]:
    """Evaluate `model_path` on each benchmark of `suite` (data read from `paths[name]`); see the module
    docstring for the protocol and the files written. Returns the reports by canonical benchmark name."""
    if max_new_tokens < 1 or batch_size < 1:
        raise ValueError(f"max_new_tokens and batch_size must be >= 1, got {max_new_tokens}, {batch_size}")
    resolved = _resolve_paths(suite, paths)
    datasets = {name: load_benchmark(name, path, limit) for name, path in resolved.items()}
    # imported only now: torch / transformers take seconds, and a bad suite should fail at once
    from rollout.client import RolloutClient
    from rollout.engines.prompts import load_processor
    from rollout.launcher import EmbeddedServerProcess

    out = Path(out_dir)
    (out / "predictions").mkdir(parents=True, exist_ok=True)
    run = {"model_path": str(model_path), "suite": list(resolved), "paths": {k: str(v) for k, v in resolved.items()},
           "urls": list(urls or []), "limit": limit, "max_new_tokens": max_new_tokens, "temperature": 0.0,
           "max_pixels": max_pixels}

    server = None if urls else EmbeddedServerProcess(model_path, api_key=api_key, log_path=out / "server.log")
    server_urls = list(urls) if urls else [server.url]  # type: ignore[union-attr]
    reports: dict[str, BenchmarkReport] = {}
    try:
        # the server loads the model while we load the processor (minutes, on a GPU machine)
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="eval-server-start") as pool:
            started = pool.submit(server.start) if server is not None else None
            processor = load_processor(str(model_path))
            if started is not None:
                started.result()
        pipeline = PILImagePipeline(max_pixels=max_pixels)
        with RolloutClient(server_urls, api_key=api_key or None, timeout=timeout_s) as client:
            client.check_servers()
            for name, items in datasets.items():
                t0 = time.perf_counter()
                pred_path = out / "predictions" / f"{name}.jsonl"
                with pred_path.open("w", encoding="utf-8") as f:
                    totals = _evaluate_benchmark(name, items, client, processor, out=f, max_new_tokens=max_new_tokens,
                                                 batch_size=batch_size, pipeline=pipeline)
                n = len(items)
                reports[name] = BenchmarkReport(
                    name=name, n=n, accuracy=totals["correct"] / n, acc_x_fmt=totals["strict"] / n,
                    format_rate=totals["fmt"] / n, extracted_rate=totals["extracted"] / n,
                    sources=dict(totals["sources"]), truncated_rate=totals["truncated"] / n,
                    seconds=round(time.perf_counter() - t0, 3), predictions=str(pred_path),
                )
    finally:
        if server is not None:
            server.stop()

    summary = {"run": run, "benchmarks": {name: asdict(r) for name, r in reports.items()},
               "average_accuracy": sum(r.accuracy for r in reports.values()) / len(reports)}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    (out / "summary.md").write_text(render_summary_markdown(list(reports.values()), run), encoding="utf-8")
    return reports
