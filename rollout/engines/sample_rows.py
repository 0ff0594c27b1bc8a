"""Per-sample bookkeeping of the embedded engine: a request waiting for the decode batch, one sample being
decoded (a row), when a sample finishes (stop token, stop string, length) and the `SampleOutput` it reports.

Host-side logic on token ids and the tokenizer only (no model, no KV cache): `EmbeddedEngine`
(embedded.py) calls it for every sampled token, whichever decode path (slab or static pool) produced it.
"""

from __future__ import annotations

import concurrent.futures
from dataclasses import dataclass, field
from typing import Any

from rollout.engines.base import GenerateRequest, SampleOutput, SamplingParams
from rollout.engines.kv_batch import PromptState
from rollout.engines.sampling import find_stop_string


@dataclass
class PendingRequest:
    """A validated request waiting for (or in) the decode batch."""

    request: GenerateRequest
    prompt: PromptState
    future: concurrent.futures.Future[list[SampleOutput]]
    outputs: list[SampleOutput | None] = field(default_factory=list)
    rows_left: int = 0


@dataclass
class SampleRow:
    """One sample being decoded: which request it belongs to and what it produced so far."""

    pending: PendingRequest
    sample_index: int
    key: int  # random stream of this sample: uniforms are hash(key, token index)
    max_new_tokens: int  # already clipped by the context length
    stop_ids: frozenset[int]  # token ids that end this sample (eos unless ignore_eos, stop_token_ids)
    output_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    finished: bool = False  # done, but still occupying a slab row until the next compaction


def collect_eos_ids(model: Any, tokenizer: Any) -> frozenset[int]:
    """Every eos token id the model's generation config, text config, config and tokenizer name."""
    ids: set[int] = set()
    for source in (model.generation_config, model.config.get_text_config(), model.config):
        eos = getattr(source, "eos_token_id", None)
        ids.update([eos] if isinstance(eos, int) else (eos or []))
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return frozenset(ids)


def decode_text(tokenizer: Any, ids: list[int], sampling: SamplingParams) -> str:
    return tokenizer.decode(ids, skip_special_tokens=sampling.skip_special_tokens)


def finish_reason(row: SampleRow, token: int, tokenizer: Any) -> dict[str, Any] | None:
    """Why `row` ends after its newest `token` (a stop token, a stop string, its length), or None."""
    if token in row.stop_ids:
        return {"type": "stop", "matched": token}
    sampling = row.pending.request.sampling
    if sampling.stop:
        # Decode only a tail window each step; confirm a hit on the full text (tails can split bytes).
        window = max(len(s) for s in sampling.stop) + 2
        tail = tokenizer.decode(row.output_ids[-window:], skip_special_tokens=sampling.skip_special_tokens)
        if any(stop in tail for stop in sampling.stop):
            text = decode_text(tokenizer, row.output_ids, sampling)
            hit = find_stop_string(text, sampling.stop, 0)
            if hit is not None:
                return {"type": "stop", "matched": hit[1]}
    if len(row.output_ids) >= row.max_new_tokens:
        return {"type": "length", "length": len(row.output_ids)}
    return None


def finish_row(row: SampleRow, reason: dict[str, Any], tokenizer: Any, weight_version: int) -> None:
    """Mark `row` finished, store its output, and resolve its request once all of its samples are done."""
    row.finished = True
    pending = row.pending
    pending.outputs[row.sample_index] = finished_output(
        pending, row.output_ids, row.logprobs, reason, tokenizer, weight_version
    )
    pending.rows_left -= 1
    if pending.rows_left == 0 and not pending.future.done():
        pending.future.set_result(list(pending.outputs))  # type: ignore[arg-type]


def finished_output(
    pending: PendingRequest,
    output_ids: list[int],
    logprobs: list[float],
    reason: dict[str, Any],
    tokenizer: Any,
    weight_version: int,
) -> SampleOutput:
    """The `SampleOutput` of a finished sample: its text is cut before a matched stop string (unless
    `no_stop_trim`)."""
    sampling = pending.request.sampling
    text = decode_text(tokenizer, output_ids, sampling)
    matched = reason.get("matched")
    if isinstance(matched, str):
        hit = find_stop_string(text, (matched,), 0)
        if hit is not None:
            text = text[: hit[0] + (len(matched) if sampling.no_stop_trim else 0)]
    return SampleOutput(
        text=text,
        output_ids=list(output_ids),
        output_logprobs=list(logprobs),
        finish_reason=reason,
        prompt_tokens=pending.prompt.length,
        weight_version=weight_version,
    )


def empty_output(pending: PendingRequest, tokenizer: Any, weight_version: int) -> SampleOutput:
    """The output of a sample asked for no new tokens (max_new_tokens=0)."""
    return finished_output(pending, [], [], {"type": "length", "length": 0}, tokenizer, weight_version)
