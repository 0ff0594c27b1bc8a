"""Prompt data sets (jsonl / parquet), length filtering, a resumable shuffling sampler, train/eval split.

Loading is forgiving row by row and strict about the whole: one corrupt row in 40k (a bad JSON line, a
missing answer, an image that does not decode) is skipped and counted, because aborting a multi-day run
for it helps nobody; a file that yields no example at all is an error, because that is a wrong path or a
wrong schema, not noise.
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, overload

from calibrl_mcore.data.schema import Example, RowError, parse_row
from calibrl_mcore.data.template import build_messages, render_prompt_text

__all__ = ["PromptDataset", "PromptSampler", "count_prompt_tokens", "split"]

logger = logging.getLogger(__name__)

MAX_REPORTED_REASONS = 5
"""How many skip reasons the load warning quotes (the count is always complete)."""


def _read_jsonl(path: Path) -> Iterator[tuple[int, Any]]:
    """(row index, parsed object or the error) per non-blank line; row index = line number - 1.

    Lines are decoded one by one so that a stray non-UTF-8 byte costs one row, not the whole file.
    """
    with path.open("rb") as f:
        for index, raw in enumerate(f):
            if not raw.strip():
                continue
            try:
                yield index, json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError as exc:
                yield index, RowError(index, None, "<line>", f"not UTF-8: {exc}")
            except json.JSONDecodeError as exc:
                yield index, RowError(index, None, "<json>", f"invalid JSON: {exc}")


def _read_parquet(path: Path) -> Iterator[tuple[int, Any]]:
    """(row index, row dict) per parquet row, streamed in record batches to bound memory."""
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except Exception as exc:  # pyarrow raises ArrowInvalid / OSError subclasses for non-parquet files
        raise ValueError(f"cannot read parquet file {path}: {exc}") from exc
    index = 0
    for batch in parquet.iter_batches(batch_size=1024):
        for row in batch.to_pylist():
            yield index, row
            index += 1


_READERS = {".jsonl": _read_jsonl, ".parquet": _read_parquet}


def count_prompt_tokens(example: Example, tokenizer: Any) -> int:
    """Text tokens of the rendered prompt (chat template + generation prompt), one token per image slot.

    `tokenizer` may be an HF tokenizer or processor (processors wrap their tokenizer). Image tokens are
    *not* expanded here, because their number depends on each image's resolution and on the processor's
    resize policy; the rollout engine still enforces the true context length.
    """
    tok = getattr(tokenizer, "tokenizer", tokenizer)
    if getattr(tokenizer, "chat_template", None) or getattr(tok, "chat_template", None):
        renderer = tokenizer if getattr(tokenizer, "chat_template", None) else tok
        text = renderer.apply_chat_template(
            build_messages(example), tokenize=False, add_generation_prompt=True
        )
    else:
        text = render_prompt_text(example)
    return len(tok(text, add_special_tokens=False)["input_ids"])


class PromptDataset(Sequence[Example]):
    """An in-memory list of `Example`s plus the bookkeeping of how it was loaded."""

    def __init__(
        self,
        examples: Sequence[Example],
        *,
        source: str | None = None,
        num_skipped: int = 0,
        skip_reasons: Sequence[str] = (),
        num_filtered: int = 0,
        seed: int = 0,
    ) -> None:
        self.examples = list(examples)
        self.source = source
        self.num_skipped = num_skipped
        """Corrupt rows dropped at load time (bad JSON, missing fields, undecodable images)."""
        self.skip_reasons = list(skip_reasons)
        """The first `MAX_REPORTED_REASONS` skip messages."""
        self.num_filtered = num_filtered
        """Valid rows dropped by the prompt-length filter."""
        self.seed = seed
        """Default seed of `sampler()` and `split()`."""

    @classmethod
    def from_path(
        cls,
        path: str | Path,
        *,
        max_prompt_tokens: int | None = None,
        tokenizer: Any = None,
        max_images: int | None = 10,
        seed: int = 0,
        require_expert: bool = True,
        verify_images: bool = True,
    ) -> PromptDataset:
        """Load a `.jsonl` or `.parquet` file of ViRL-style rows (schema: `calibrl_mcore.data.schema`).

        Relative image paths resolve against the file's folder. Rows longer than `max_prompt_tokens`
        (counted with `tokenizer`, see `count_prompt_tokens`) are filtered out; rows with more than
        `max_images` images are skipped. `require_expert=False` for eval sets without solutions.
        Raises ValueError naming the file when it is missing, of an unknown type, or yields no example.
        """
        path = Path(path)
        if max_prompt_tokens is not None and tokenizer is None:
            raise ValueError(f"max_prompt_tokens={max_prompt_tokens} needs a tokenizer to count tokens")
        reader = _READERS.get(path.suffix.lower())
        if reader is None:
            raise ValueError(f"unsupported data file {path}: expected one of {sorted(_READERS)}")
        if not path.is_file():
            raise ValueError(f"data file {path} does not exist")

        examples: list[Example] = []
        reasons: list[str] = []
        num_rows = num_skipped = num_filtered = 0
        for index, row in reader(path):
            num_rows += 1
            try:
                if isinstance(row, RowError):
                    raise row
                example = parse_row(
                    row,
                    index,
                    base_dir=path.parent,
                    uid_prefix=path.stem,
                    max_images=max_images,
                    require_expert=require_expert,
                    verify_images=verify_images,
                )
            except RowError as exc:
                num_skipped += 1
                if len(reasons) < MAX_REPORTED_REASONS:
                    reasons.append(str(exc))
                continue
            if max_prompt_tokens is not None and count_prompt_tokens(example, tokenizer) > max_prompt_tokens:
                num_filtered += 1
                continue
            examples.append(example)

        if num_skipped:
            logger.warning(
                "%s: skipped %d of %d rows as corrupt; first reasons: %s",
                path,
                num_skipped,
                num_rows,
                "; ".join(reasons),
            )
        if not examples:
            detail = f"{num_rows} rows, {num_skipped} corrupt, {num_filtered} over max_prompt_tokens"
            hint = f"; first reasons: {'; '.join(reasons)}" if reasons else ""
            raise ValueError(f"no usable example in data file {path} ({detail}){hint}")
        if num_filtered:
            logger.info(
                "%s: %d rows over max_prompt_tokens=%s filtered out", path, num_filtered, max_prompt_tokens
            )
        return cls(
            examples,
            source=str(path),
            num_skipped=num_skipped,
            skip_reasons=reasons,
            num_filtered=num_filtered,
            seed=seed,
        )

    def __len__(self) -> int:
        return len(self.examples)

    @overload
    def __getitem__(self, index: int) -> Example: ...
    @overload
    def __getitem__(self, index: slice) -> list[Example]: ...
    def __getitem__(self, index: int | slice) -> Example | list[Example]:
        return self.examples[index]

    def subset(self, indices: Sequence[int]) -> PromptDataset:
        """A data set of the given examples (shared, not copied), keeping the source and seed."""
        return PromptDataset([self.examples[i] for i in indices], source=self.source, seed=self.seed)

    def sampler(self, seed: int | None = None) -> PromptSampler:
        """A `PromptSampler` over this data set (seed defaults to the one given at load time)."""
        return PromptSampler(len(self), self.seed if seed is None else seed)

    def __repr__(self) -> str:
        return f"PromptDataset({len(self)} examples from {self.source}, {self.num_skipped} skipped)"


def _epoch_permutation(n: int, seed: int, epoch: int) -> list[int]:
    """The visiting order of one epoch: a pure function of (n, seed, epoch).

    `random.Random` seeded with a string is hashed with SHA-512 and its shuffle is stable across Python
    versions and platforms, so a resumed run on another machine replays exactly the same order.
    """
    order = list(range(n))
    random.Random(f"calibrl-sampler/{seed}/{epoch}").shuffle(order)
    return order


@dataclass
class PromptSampler:
    """Endless, epoch-wise shuffled stream of data set indices with a resumable cursor.

    The state is just (epoch, position): the permutation of an epoch is recomputed from (seed, epoch), so
    checkpoints stay tiny and `load_state_dict` of a mid-epoch state yields exactly the batches the
    original run would have drawn next. Batches run across epoch boundaries (the tail of one epoch, then
    the head of the next), so no prompt is dropped or repeated within an epoch.
    """

    dataset_len: int
    seed: int = 0
    epoch: int = 0
    position: int = 0

    def __post_init__(self) -> None:
        if self.dataset_len <= 0:
            raise ValueError(f"PromptSampler needs a non-empty data set, got dataset_len={self.dataset_len}")
        self._order: list[int] | None = None
        self._order_epoch = -1

    def _current_order(self) -> list[int]:
        if self._order is None or self._order_epoch != self.epoch:
            self._order = _epoch_permutation(self.dataset_len, self.seed, self.epoch)
            self._order_epoch = self.epoch
        return self._order

    def next_batch(self, n: int) -> list[int]:
        """The next `n` indices (advances the cursor)."""
        if n <= 0:
            raise ValueError(f"batch size must be positive, got {n}")
        out: list[int] = []
        while len(out) < n:
            order = self._current_order()
            take = min(n - len(out), self.dataset_len - self.position)
            out.extend(order[self.position : self.position + take])
            self.position += take
            if self.position == self.dataset_len:
                self.epoch, self.position = self.epoch + 1, 0
        return out

    def state_dict(self) -> dict[str, int]:
        """Everything needed to resume; `dataset_len` and `seed` are saved to catch a changed data set."""
        return {
            "epoch": self.epoch,
            "position": self.position,
            "seed": self.seed,
            "dataset_len": self.dataset_len,
        }

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Resume from `state_dict()`; refuses a state taken over a different data set length or seed,
        since the cursor would then silently point into a different order."""
        for key in ("seed", "dataset_len"):
            if key in state and state[key] != getattr(self, key):
                raise ValueError(
                    f"sampler state has {key}={state[key]}, this sampler has {getattr(self, key)}"
                )
        epoch, position = int(state["epoch"]), int(state["position"])
        if epoch < 0 or not 0 <= position < self.dataset_len:
            raise ValueError(
                f"bad sampler state epoch={epoch} position={position} (dataset_len={self.dataset_len})"
            )
        self.epoch, self.position = epoch, position


def split(
    dataset: PromptDataset, heldout_fraction: float, seed: int | None = None
) -> tuple[PromptDataset, PromptDataset]:
    """Deterministic (train, eval) split; eval gets round(fraction * len) examples, at least one.

    Both sides keep the original file order (only membership is random), so eval reports list prompts in
    a stable, readable order.
    """
    n = len(dataset)
    if not 0.0 < heldout_fraction < 1.0:
        raise ValueError(f"heldout_fraction must be in (0, 1), got {heldout_fraction}")
    n_eval = max(1, round(heldout_fraction * n))
    if n_eval >= n:
        raise ValueError(f"cannot hold out {n_eval} of {n} examples and keep a training set")
    seed = dataset.seed if seed is None else seed
    order = list(range(n))
    random.Random(f"calibrl-split/{seed}").shuffle(order)
    eval_idx = sorted(order[:n_eval])
    train_idx = sorted(order[n_eval:])
    return dataset.subset(train_idx), dataset.subset(eval_idx)
