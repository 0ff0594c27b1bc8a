"""What a user sees in the terminal: quiet logging by default, one progress line per command, a summary.

    configure_logging("info")                    # cli.main, again once the config names train.log_level
    line = ProgressLine("train calibrl", total=30, fields=TRAIN_FIELDS)
    line.update(step, metrics)                   # rewrites one line on a TTY; a few plain lines in a log
    line.close()
    print(summary_block("train calibrl", ...))   # final metrics, wall time split, paths written

Log levels (`train.log_level`; `--verbose` means `verbose`):
  warning  warnings and errors only (the progress line and the summary still print)
  info     our own INFO lines (rank 0); third-party loggers (Megatron, httpx, math-verify, transformers, ...)
           at WARNING; the libraries' known fallback warnings (`KNOWN_FALLBACKS`) are counted instead of
           shown, because the start-up line (`parallel/fused.py`) says which kernels run and why
  verbose  everything the libraries log and warn, with timestamps (the output before this module existed)
  debug    verbose, at DEBUG
Unknown warnings and all errors show at every level.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TextIO

from calibrl_mcore.config import CHOICES

LOG_LEVELS = CHOICES["train.log_level"]
OUR_LOGGERS = ("calibrl_mcore", "rollout", "model_providers", "tools", "__main__")
# Loggers of libraries that speak at INFO about things a user did not ask about (one httpx line per request,
# Megatron's gradient-bucket parameter lists and config dumps).
THIRD_PARTY_LOGGERS = ("megatron", "httpx", "httpcore", "math_verify", "transformers", "torch", "urllib3",
                       "uvicorn", "filelock", "PIL", "matplotlib", "asyncio", "wandb", "huggingface_hub")

# Warnings a library emits about a fallback we already know of and report ourselves (start-up line) -> what it
# means. Checked against megatron-core 0.16.1 (the TE/apex lines: distributed/fsdp/.../mixed_precision.py:114,
# optimizer/__init__.py:24, optimizer/optimizer.py:28, optimizer/clip_grads.py:29, models/backends.py:21) and
# math-verify 0.8 (parser.py:695, grader.py:821: we turn its SIGALRM timeout off and guard the call ourselves,
# see rewards/__init__.py).
KNOWN_FALLBACKS: dict[str, str] = {
    r"Transformer Engine and Apex are not installed": "Megatron without TE/apex (torch Adam, local multi-tensor)",
    r"Apex is not installed\. Falling back to Torch Norm": "Megatron without apex (torch norms)",
    r"Timeout is disabled as (parsing_timeout|timeout_seconds) is None": "math-verify timeout (ours guards it)",
}
_KNOWN = [(re.compile(pattern), what) for pattern, what in KNOWN_FALLBACKS.items()]
COMMAND_STARTED = time.perf_counter()  # the CLI imports this module first: the wall time of a summary starts here
_hidden: Counter[str] = Counter()


def hidden_fallbacks() -> Counter[str]:
    """How many known fallback warnings were held back in this process, by meaning."""
    return Counter(_hidden)


def hidden_note() -> str:
    """'' or a short clause for the start-up line: how many library warnings it stands for."""
    n = sum(_hidden.values())
    return f"; {n} library warnings about these fallbacks hidden (--verbose shows them)" if n else ""


def process_rank() -> int:
    """The global rank torchrun gave this process (0 when not launched by torchrun)."""
    return int(os.environ.get("RANK", "0") or 0)


class _KnownFallbackFilter(logging.Filter):
    """Drops (and counts) records that are one of `KNOWN_FALLBACKS`."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR:
            return True
        message = record.getMessage()
        for pattern, what in _KNOWN:
            if pattern.search(message):
                _hidden[what] += 1
                return False
        return True


class _ShortFormatter(logging.Formatter):
    """INFO as the bare message; warnings and errors name their level and logger (and a rank other than 0)."""

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        if record.name == "py.warnings":  # "file:line: Category: text\n  warnings.warn(" -> its first line
            message = message.strip().splitlines()[0]
        if record.exc_info:
            message += "\n" + self.formatException(record.exc_info)
        if record.levelno == logging.INFO:
            return message
        rank = process_rank()
        where = f"[rank {rank}] " if rank else ""
        return f"{where}{record.levelname} {record.name}: {message}"


class _ProgressAwareHandler(logging.StreamHandler):
    """Clears an active progress line before a log line and redraws it after (as tqdm.write does)."""

    def emit(self, record: logging.LogRecord) -> None:
        live = ProgressLine.active if ProgressLine.active is not None and ProgressLine.active.tty else None
        if live is not None and live.stream is self.stream:
            live.clear()
        super().emit(record)
        if live is not None and live.stream is self.stream:
            live.redraw()


def configure_logging(level: str = "info", stream: TextIO | None = None) -> None:
    """Set up the root handler and per-library levels for `level` (one of `LOG_LEVELS`); idempotent."""
    if level not in LOG_LEVELS:
        raise ValueError(f"train.log_level={level!r} is not one of {list(LOG_LEVELS)}")
    root = logging.getLogger()
    for handler in [h for h in root.handlers if getattr(h, "_calibrl", False)]:
        root.removeHandler(handler)
    handler = _ProgressAwareHandler(stream or sys.stderr)
    handler._calibrl = True  # type: ignore[attr-defined]
    loud = level in ("verbose", "debug")
    if loud:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    else:
        handler.setFormatter(_ShortFormatter())
        handler.addFilter(_KnownFallbackFilter())
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if level == "debug" else logging.INFO if loud else logging.WARNING)
    # warnings.warn -> the "py.warnings" logger -> the filter above. Re-armed every time: captureWarnings(True)
    # is a no-op while logging still holds a saved hook, even after a warnings.catch_warnings() block (pytest
    # runs each test in one) put another showwarning back.
    logging.captureWarnings(False)
    logging.captureWarnings(True)
    ours = {"warning": logging.WARNING, "info": logging.INFO, "verbose": logging.INFO, "debug": logging.DEBUG}[level]
    if process_rank() != 0 and not loud:
        ours = logging.WARNING  # rank 0 speaks for the job
    for name in OUR_LOGGERS:
        logging.getLogger(name).setLevel(ours)
    for name in THIRD_PARTY_LOGGERS:
        logging.getLogger(name).setLevel(root.level if loud else logging.WARNING)
    if not loud:
        # transformers' "Loading weights" / "Writing model shards" bars, here and in child processes
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        if "transformers" in sys.modules:
            import transformers.utils.logging as hf_logging

            hf_logging.disable_progress_bar()


# ------------------------------------------------------------------------------------------ progress


# (metric key, short name) shown on the progress line and in the summary, by command.
TRAIN_FIELDS = (("reward/mean", "reward"), ("reward/pass_rate", "pass"), ("train/entropy", "entropy"),
                ("train/loss", "loss"), ("eval/accuracy", "eval acc"))
SFT_FIELDS = (("sft/nll", "loss"), ("grad_norm", "grad norm"), ("lr", "lr"))
EVAL_FIELDS = (("eval/accuracy", "acc×fmt"), ("eval/acc", "acc"), ("eval/format", "format"))


def format_fields(metrics: Mapping[str, float], fields: Sequence[tuple[str, str]]) -> str:
    """'reward 0.412  pass 0.375 ...' for the fields present in `metrics`."""
    return "  ".join(f"{short} {metrics[key]:.4g}" for key, short in fields if key in metrics)


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(round(seconds)), 60)
    return f"{minutes}m{secs:02d}s" if minutes < 60 else f"{minutes // 60}h{minutes % 60:02d}m"


class ProgressLine:
    """One line per command: `label  step k/N  <metrics>  <s/step>  eta`.

    On a terminal the line is rewritten in place. Written to a file or pipe, a line is printed for the first
    step, then at most every `interval_s` seconds, and for the last step: a log keeps a handful of lines
    per command, one per step only when steps are slower than `interval_s`.
    """

    active: ProgressLine | None = None

    def __init__(self, label: str, total: int, fields: Sequence[tuple[str, str]] = (), *,
                 stream: TextIO | None = None, interval_s: float = 30.0, unit: str = "step") -> None:
        self.label, self.total, self.fields, self.unit = label, total, fields, unit
        self.stream = stream or sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.interval_s = interval_s
        self.started = time.perf_counter()
        self._last_print = float("-inf")
        self._last_step: int | None = None
        self._text = ""
        self._first_step: int | None = None
        ProgressLine.active = self

    def render(self, step: int, metrics: Mapping[str, float], now: float | None = None) -> str:
        now = time.perf_counter() if now is None else now
        if self._first_step is None:
            self._first_step = step - 1
        done = max(step - self._first_step, 1)
        per = (now - self.started) / done
        parts = [self.label, f"{self.unit} {step}/{self.total}", format_fields(metrics, self.fields),
                 f"{per:.2f} s/{self.unit}"]
        if step < self.total:
            parts.append(f"eta {_duration(per * (self.total - step))}")
        return "  ".join(p for p in parts if p)

    def update(self, step: int, metrics: Mapping[str, float]) -> None:
        now = time.perf_counter()
        self._text = self.render(step, metrics, now)
        if self.tty:
            self.redraw()
        elif step != self._last_step and (self._first_step == step - 1 or step >= self.total
                                          or now - self._last_print >= self.interval_s):
            self.stream.write(self._text + "\n")
            self.stream.flush()
            self._last_print, self._last_step = now, step

    def clear(self) -> None:
        if self.tty and self._text:
            self.stream.write("\r\x1b[K")

    def redraw(self) -> None:
        if self.tty and self._text:
            self.stream.write("\r\x1b[K" + self._text)
            self.stream.flush()

    def close(self) -> None:
        if self.tty and self._text:
            self.stream.write("\n")
            self.stream.flush()
        if ProgressLine.active is self:
            ProgressLine.active = None


# ------------------------------------------------------------------------------------------ summary


def summary_block(title: str, metrics: Mapping[str, float], fields: Sequence[tuple[str, str]], *,
                  wall_s: float, split: Mapping[str, float] | None = None,
                  written: Mapping[str, str | Path] | None = None) -> str:
    """The block a command ends with:

        train calibrl: done in 27.1s (rollout 9.2s, train 14.0s, weight sync 0.4s, other 3.5s)
          final      reward 0.412  pass 0.375  entropy 6.59  loss 0.0123
          checkpoint runs/default/checkpoints/step_3
          metrics    runs/default/metrics.jsonl
    """
    times = ""
    if split:
        shown = {k: v for k, v in split.items() if v > 0}
        shown["other"] = max(wall_s - sum(shown.values()), 0.0)
        times = " (" + ", ".join(f"{k} {_duration(v)}" for k, v in shown.items()) + ")"
    rows = [("final", format_fields(metrics, fields))]
    rows += [(name, str(path)) for name, path in (written or {}).items()]
    width = max(len(name) for name, _ in rows)
    lines = [f"{title}: done in {_duration(wall_s)}{times}"]
    lines += [f"  {name.ljust(width)}  {text}" for name, text in rows if text]
    return "\n".join(lines)


__all__ = [
    "EVAL_FIELDS",
    "KNOWN_FALLBACKS",
    "LOG_LEVELS",
    "SFT_FIELDS",
    "TRAIN_FIELDS",
    "ProgressLine",
    "configure_logging",
    "format_fields",
    "hidden_fallbacks",
    "hidden_note",
    "process_rank",
    "summary_block",
]
