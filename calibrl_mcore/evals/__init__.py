"""Benchmark evaluation: the published formats of the paper's benchmarks, their answer matching, a harness.

    calibrl eval --model ckpt/hf --suite mathvista,mathverse --suite-dir data/bench --out runs/eval
    calibrl eval --model ckpt/hf --suite math500 --bench math500=data/MATH-500/test.jsonl --limit 50

- `items`: `EvalItem` (uid, rendered question, images, gold, kind, choices, meta) and file helpers.
- `loaders`: one loader per benchmark (`BENCHMARKS`, `load_benchmark`); formats and distributions are
  listed in the `loaders` module docstring.
- `scoring`: extraction chain (`<answer>` → `\\boxed{}` → "answer is" → last letter / number) and the
  matchers per kind (choice letters and letter sets, numeric with precision / tolerance, LaTeX via
  math-verify, text); rules in the `scoring` module docstring.
- `harness`: `run_suite` (greedy, through the rollout client; an embedded server when no URLs are
  given) writing per-item predictions JSONL and a summary in markdown and JSON.
"""

from calibrl_mcore.evals.harness import BenchmarkReport, render_summary_markdown, run_suite
from calibrl_mcore.evals.items import EvalItem, Kind, parse_inline_choices, render_choices
from calibrl_mcore.evals.loaders import BENCHMARKS, Benchmark, canonical_name, load_benchmark
from calibrl_mcore.evals.scoring import (
    Extraction,
    ItemScore,
    extract_prediction,
    is_correct,
    match_choice,
    match_numeric,
    match_text,
    parse_number,
    score_response,
)

__all__ = [
    "BENCHMARKS",
    "Benchmark",
    "BenchmarkReport",
    "EvalItem",
    "Extraction",
    "ItemScore",
    "Kind",
    "canonical_name",
    "extract_prediction",
    "is_correct",
    "load_benchmark",
    "match_choice",
    "match_numeric",
    "match_text",
    "parse_inline_choices",
    "parse_number",
    "render_choices",
    "render_summary_markdown",
    "run_suite",
    "score_response",
]
