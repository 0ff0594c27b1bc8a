"""The embedded rollout engine: a HF image-text-to-text model with a batched, KV-cached decode loop.

One scheduler thread owns the model. Between decode steps it admits queued requests: each prompt is
prefilled once (batch 1, so its logits equal a plain forward pass) and its KV cache is copied into `n`
rows of the running batch, where the n samples then decode together with every other running row
(continuous batching). Rows of different lengths share one left-padded KV slab; each row carries its
own position ids, so padding never shifts a row's rotary positions. A finished sample completes at
once (stop checks and outputs: sample_rows.py); its row leaves the slab at the next compaction (see
`_compact`). Decode steps, and the prefill of text-only prompts, run through `LeanDecodeStep` when the
model's decoder is a supported one.

`decode_graphs` ("auto": on for CUDA) moves decoding from the slab to graph_decode.py: a static KV
pool (row i in slot i, left-aligned) and a static-shape step captured as one CUDA graph per
(rows, columns) bucket, since the slab's changing shapes and addresses cannot be captured. Prefill
and sampling are the same on both paths; the graph step is checked against the HF forward at start
and the slab path is kept if it differs.

Weight updates and generation serialize on one lock, so an update lands between two decode steps.
Samples still in flight keep their KV cache from the old weights (as in SGLang without a pause); each
sample reports the `weight_version` current when it finished.
"""

from __future__ import annotations

import concurrent.futures
import importlib.metadata
import inspect
import logging
import queue
import random
import threading
from collections import deque
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from rollout.engines.base import (
    EngineInputError,
    GenerateRequest,
    RolloutEngine,
    SampleOutput,
)
from rollout.engines.decode_step import LeanDecodeStep, matches_hf
from rollout.engines.graph_decode import CudaGraphDecoder, SlotBatch
from rollout.engines.kv_batch import DecodeBatch, PromptState
from rollout.engines.prompts import PromptBuilder, load_processor
from rollout.engines.sample_rows import (
    PendingRequest,
    SampleRow,
    collect_eos_ids,
    empty_output,
    finish_reason,
    finish_row,
)
from rollout.engines.sampling import SamplingTensors, counter_uniforms, row_key, sample_next_tokens

logger = logging.getLogger(__name__)


def _package_version() -> str:
    """calibrl-mcore's version: what `calibrl env` reports for an embedded server (SGLang and vLLM report theirs)."""
    try:
        return importlib.metadata.version("calibrl-mcore")
    except importlib.metadata.PackageNotFoundError:
        return "unknown (not installed)"

DECODE_GRAPHS = ("auto", "on", "off")


class EmbeddedEngine(RolloutEngine):
    """HF model + processor behind the rollout API; works on CPU (fp32) and GPU (`device="cuda"`)."""

    def __init__(
        self,
        model_path: str | Path,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        max_batch_size: int = 256,
        max_context_len: int | None = None,
        lean_decode: bool = True,
        decode_graphs: str = "auto",
    ) -> None:
        """`decode_graphs`: "auto" decodes on the static pool with CUDA graphs when the device is CUDA and
        the lean step supports the model; "on" forces the static pool (run eagerly off CUDA: tests);
        "off" keeps the left-padded slab (module docstring)."""
        from transformers import AutoModelForImageTextToText

        if decode_graphs not in DECODE_GRAPHS:
            raise ValueError(f"decode_graphs={decode_graphs!r} is not one of {list(DECODE_GRAPHS)}")
        self.model_path = str(model_path)
        self.device = torch.device(device)
        self.dtype = dtype
        self.max_batch_size = max_batch_size
        self.weight_version = 0
        self.model = AutoModelForImageTextToText.from_pretrained(
            self.model_path, dtype=dtype, attn_implementation="sdpa"
        ).to(self.device)
        self.model.eval()
        self.processor = load_processor(self.model_path)
        self.tokenizer = self.processor.tokenizer
        text_config = self.model.config.get_text_config()
        config_limit = int(getattr(text_config, "max_position_embeddings", 32768))
        self.max_context_len = min(max_context_len or config_limit, config_limit)
        self.prompts = PromptBuilder(self.processor, self.model, self.device, self.dtype)
        self._eos_ids = collect_eos_ids(self.model, self.tokenizer)
        # transformers 5 renamed `past_key_values` to `cache`; accept both generations of the API.
        forward_params = inspect.signature(self.model.forward).parameters
        self._cache_kwarg = "cache" if "cache" in forward_params else "past_key_values"
        self._lean_step = self._checked_lean_step() if lean_decode else None
        self._graph_decoder = self._checked_graph_decoder(decode_graphs)

        self._model_lock = threading.Lock()
        self._queue: queue.Queue[list[PendingRequest]] = queue.Queue()  # one item per submit / submit_batch
        self._waiting: deque[PendingRequest] = deque()
        self._batch: DecodeBatch | SlotBatch | None = None
        self._rows: list[SampleRow] = []
        self._row_tensors: tuple[Any, ...] | None = None  # per-row sampling settings of _rows
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._scheduler_loop, name="embedded-engine", daemon=True)
        self._thread.start()

    # ----------------------------------------------------------------------------------------------
    # Public API
    # ----------------------------------------------------------------------------------------------
    def submit(self, request: GenerateRequest) -> concurrent.futures.Future[list[SampleOutput]]:
        return self.submit_batch([request])[0]

    def submit_batch(self, requests: list[GenerateRequest]) -> list[concurrent.futures.Future[list[SampleOutput]]]:
        """Queue the requests as one unit: the scheduler admits them together, so which rows share a decode
        batch (and with it the rounding of every row's logits) depends on the requests, not on how fast they
        were tokenized. With each step's prompts in one call, a rerun samples the same tokens."""
        pending = []
        for i, request in enumerate(requests):
            try:
                pending.append(self._pending(request))
            except EngineInputError as exc:
                if len(requests) > 1:
                    raise EngineInputError(exc.field, f"{exc.message} (prompt {i})") from exc
                raise
        queued = [p for p in pending if not p.future.done()]  # max_new_tokens = 0 completes at once
        if queued:
            self._queue.put(queued)
        return [p.future for p in pending]

    def _pending(self, request: GenerateRequest) -> PendingRequest:
        if self._stopping.is_set():
            raise RuntimeError("engine is shut down")
        request.sampling.validate()
        if request.sampling.n > self.max_batch_size:
            raise EngineInputError(
                "sampling_params.n", f"{request.sampling.n} exceeds max_batch_size={self.max_batch_size}"
            )
        # Tokenizing and image preprocessing run in the caller's thread, in parallel with decoding.
        prompt = self.prompts.build(request)
        if prompt.length >= self.max_context_len:
            field_name = "input_ids" if request.input_ids is not None else "text"
            raise EngineInputError(
                field_name, f"prompt has {prompt.length} tokens; context length is {self.max_context_len}"
            )
        future: concurrent.futures.Future[list[SampleOutput]] = concurrent.futures.Future()
        pending = PendingRequest(request, prompt, future, [None] * request.sampling.n, request.sampling.n)
        if request.sampling.max_new_tokens == 0:
            n = request.sampling.n
            future.set_result([empty_output(pending, self.tokenizer, self.weight_version) for _ in range(n)])
        return pending

    def apply_chat_template(self, messages: list[dict[str, Any]]) -> str:
        return self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    def update_weights_from_disk(self, model_path: str, weight_version: int | None = None) -> int:
        from transformers import AutoModelForImageTextToText

        if not Path(model_path).is_dir():
            raise EngineInputError("model_path", f"{model_path!r} is not a directory")
        # Load on the CPU in the serving dtype, then copy in place: the running model keeps its
        # identity (and its KV-cache layout), and names/shapes are checked like any tensor update.
        source = AutoModelForImageTextToText.from_pretrained(model_path, dtype=self.dtype)
        version = self.update_weights_from_tensors(source.state_dict().items(), weight_version)
        self.model_path = str(model_path)
        return version

    def update_weights_from_tensors(
        self, named_tensors: Iterable[tuple[str, torch.Tensor]], weight_version: int | None = None
    ) -> int:
        # Check everything before copying anything, so a bad payload leaves the model untouched.
        named = list(named_tensors)
        targets = self.weight_targets([(name, tuple(t.shape)) for name, t in named])
        staged = [(target, tensor) for target, (_, tensor) in zip(targets, named)]
        if not staged:
            raise EngineInputError("named_tensors", "no tensors given")
        with self._model_lock, torch.no_grad():
            for target, tensor in staged:
                target.copy_(tensor.to(device=target.device, dtype=target.dtype))
            if self._graph_decoder is not None:  # copy_ keeps the addresses captured graphs read
                self._graph_decoder.sync_weights()
            self.weight_version = self.weight_version + 1 if weight_version is None else int(weight_version)
            return self.weight_version

    def weight_targets(
        self, specs: list[tuple[str, tuple[int, ...]]], name_field: str = "named_tensors", shape_field: str = ""
    ) -> list[torch.Tensor]:
        """The model tensor of each (HF name, shape); an unknown name or a wrong shape raises naming
        `name_field` / `shape_field` (with `{i}` filled in, e.g. "shapes[{i}]")."""
        # remove_duplicate=False: a tied lm_head.weight is addressable under its own name too.
        params = dict(self.model.named_parameters(remove_duplicate=False))
        params.update(dict(self.model.named_buffers(remove_duplicate=False)))
        targets = []
        for i, (name, shape) in enumerate(specs):
            target = params.get(name)
            if target is None:
                target = params.get(_legacy_hf_name(name, params))
            if target is None:
                raise EngineInputError(name_field.format(i=i), f"unknown parameter {name!r}")
            if tuple(shape) != tuple(target.shape):
                raise EngineInputError((shape_field or name_field).format(i=i),
                                       f"{name!r} has shape {tuple(shape)}, the model expects {tuple(target.shape)}")
            targets.append(target)
        return targets

    def model_info(self) -> dict[str, Any]:
        return {
            "model_path": self.model_path,
            "tokenizer_path": self.model_path,
            "is_generation": True,
            "weight_version": self.weight_version,
            "engine": "embedded",
            "version": _package_version(),
            "device": str(self.device),
            "dtype": str(self.dtype).removeprefix("torch."),
            "max_context_len": self.max_context_len,
            "max_batch_size": self.max_batch_size,
            "model_type": self.model.config.model_type,
            "decode_graphs": self._graph_decoder is not None,
        }

    def is_alive(self) -> bool:
        return self._thread.is_alive() and not self._stopping.is_set()

    def shutdown(self) -> None:
        self._stopping.set()
        self._thread.join(timeout=30)
        error = RuntimeError("engine shut down")
        for pending in self._drain_all():
            if not pending.future.done():
                pending.future.set_exception(error)

    # ----------------------------------------------------------------------------------------------
    # Scheduler thread
    # ----------------------------------------------------------------------------------------------
    def _scheduler_loop(self) -> None:
        with torch.inference_mode():
            while not self._stopping.is_set():
                try:
                    self._admit(block=not self._rows)
                    if self._rows:
                        with self._model_lock:
                            self._decode_step()
                except Exception as exc:  # noqa: BLE001 - one bad step must not kill the server
                    logger.exception("decode step failed; failing the requests in flight")
                    self._fail_running(exc)

    def _admit(self, block: bool) -> None:
        """Move queued requests into the batch while their rows fit: prefill each, then merge once."""
        try:
            while True:
                self._waiting.extend(self._queue.get(block=block and not self._waiting, timeout=0.05))
                block = False
        except queue.Empty:
            pass
        if not self._waiting:
            return
        self._compact(force=True)  # dead rows would otherwise be copied into the merged slab
        admitted, free = [], self.max_batch_size - len(self._rows)
        while self._waiting and self._waiting[0].request.sampling.n <= free:
            pending = self._waiting.popleft()
            if pending.future.cancelled():
                continue
            try:
                with self._model_lock:
                    admitted.append(self._prefill(pending))
                free -= pending.request.sampling.n
            except Exception as exc:  # noqa: BLE001 - fail this request only
                logger.exception("prefill failed")
                pending.future.set_exception(exc)
        if not admitted:
            return
        # One merge for everything admitted: rebuilding the slab per request would be O(requests^2).
        prefills = [(cache, pending.prompt, len(rows)) for cache, pending, rows, _ in admitted]
        if self._graph_decoder is not None:
            # The static pool is sized for the longest these rows can get (prompt + budget), once.
            longest = max(pending.prompt.length + rows[0].max_new_tokens for _, pending, rows, _ in admitted)
            if self._batch is None:
                self._batch = self._graph_decoder.new_batch()
            self._batch.append_prefills(prefills, longest)
        elif self._batch is None:
            self._batch = DecodeBatch.from_prefills(prefills, self._cache_kwarg)
        else:
            self._batch.append_prefills(prefills)
        self._row_tensors = None
        for _, _, rows, first_tokens in admitted:
            start = len(self._rows)
            self._rows.extend(rows)
            self._record_tokens(first_tokens, start_row=start)
        self._compact()

    def _prefill_forward(self, prompt: PromptState, lean: bool = True) -> tuple[Any, torch.Tensor]:
        """Forward of one prompt (batch 1, so its logits equal a plain forward): (cache, logits [1, V])."""
        from transformers import DynamicCache

        cache = DynamicCache()
        if lean and self._lean_step is not None and not prompt.model_kwargs:
            return cache, self._lean_step(prompt.input_ids[None, :], None, prompt.position_ids, cache)
        outputs = self.model(
            input_ids=prompt.input_ids[None, :],  # [1, L]
            attention_mask=torch.ones_like(prompt.input_ids)[None, :],
            position_ids=prompt.position_ids,  # [3, 1, L] (M-RoPE) or [1, L]
            use_cache=True,
            logits_to_keep=1,
            **{self._cache_kwarg: cache},
            **prompt.model_kwargs,
        )
        return cache, outputs.logits[:, -1, :]

    def _decode_logits(self, batch: DecodeBatch | SlotBatch, lean: bool) -> torch.Tensor:
        """One decode step of every row: logits [B, V]."""
        if isinstance(batch, SlotBatch):
            return batch.decode()
        input_ids, model_inputs = batch.step_inputs()  # input_ids [B, 1]
        if lean and self._lean_step is not None:
            return self._lean_step(input_ids, model_inputs["attention_mask"], model_inputs["position_ids"],
                                   batch.cache)
        return self.model(input_ids=input_ids, use_cache=True, **model_inputs).logits[:, -1, :]

    def _checked_lean_step(self) -> LeanDecodeStep | None:
        """The lean decode step if this model has a supported decoder and it matches the HF forward."""
        step = LeanDecodeStep.for_model(self.model)
        if step is None:
            return None
        self._lean_step = step
        prompt = self.prompts.build(GenerateRequest(input_ids=list(range(1, 6))))
        logits, batches = [], []
        with torch.inference_mode():
            for lean in (False, True):  # the same prompt through each path: prefill, then one decode step
                cache, prefill_logits = self._prefill_forward(prompt, lean=lean)
                batch = DecodeBatch.from_prefills([(cache, prompt, 2)], self._cache_kwarg)
                batch.set_last_tokens([6, 7], 0)
                logits.append(prefill_logits)
                batches.append(batch)
            ok = matches_hf(lambda: logits[0], lambda: logits[1], self.dtype, "prefill") and matches_hf(
                lambda: self._decode_logits(batches[0], lean=False),
                lambda: self._decode_logits(batches[1], lean=True), self.dtype, "decode step")
        return step if ok else None

    def _checked_graph_decoder(self, mode: str) -> CudaGraphDecoder | None:
        """The static-pool decoder if `mode` asks for it and its step matches the HF forward; else None
        (the slab path), with one warning when it was asked for but cannot be used."""
        if mode == "off" or (mode == "auto" and self.device.type != "cuda"):
            return None
        if self._lean_step is None:
            logger.log(logging.WARNING if mode == "on" else logging.INFO, "decode_graphs=%s: the static decode "
                       "step needs the lean decode step, which this engine does not use; decoding on the slab", mode)
            return None
        prompt = self.prompts.build(GenerateRequest(input_ids=list(range(1, 6))))
        try:
            decoder = CudaGraphDecoder(self._lean_step, self.model, self.max_batch_size, self.max_context_len,
                                       graphs=self.device.type == "cuda")
            with torch.inference_mode():  # the same prompt both ways: prefill once, one decode step each
                cache, _ = self._prefill_forward(prompt)
                reference = DecodeBatch.from_prefills([(cache, prompt, 2)], self._cache_kwarg)
                slots = decoder.new_batch()
                slots.append_prefills([(cache, prompt, 2)], prompt.length + 2)
                for batch in (reference, slots):
                    batch.set_last_tokens([6, 7], 0)
                ok = matches_hf(lambda: self._decode_logits(reference, lean=False), slots.decode, self.dtype,
                                "static-pool decode step", fallback="the slab")
        except Exception:  # noqa: BLE001 - an unsupported setup must not stop the engine
            logger.warning("decode_graphs=%s: the static decode step failed; decoding on the slab", mode,
                           exc_info=True)
            return None
        return decoder if ok else None

    def _prefill(
        self, pending: PendingRequest
    ) -> tuple[Any, PendingRequest, list[SampleRow], tuple[list[int], list[float]]]:
        """Run the prompt once (batch 1) and sample the first token of each of its n samples."""
        prompt, sampling = pending.prompt, pending.request.sampling
        cache, last_logits = self._prefill_forward(prompt)
        seed = sampling.seed if sampling.seed is not None else random.SystemRandom().getrandbits(62)
        budget = min(sampling.max_new_tokens, self.max_context_len - prompt.length)
        stop_ids = frozenset(sampling.stop_token_ids) | (frozenset() if sampling.ignore_eos else self._eos_ids)
        rows = [SampleRow(pending, i, row_key(seed, i), budget, stop_ids) for i in range(sampling.n)]
        logits = last_logits.expand(sampling.n, -1)  # [n, V]: all samples share the prefix
        return cache, pending, rows, self._sample(logits, rows)

    def _decode_step(self) -> None:
        assert self._batch is not None
        tokens = self._sample(self._decode_logits(self._batch, lean=True), self._rows)
        self._record_tokens(tokens, start_row=0)
        self._compact()

    def _sample(self, logits: torch.Tensor, rows: list[SampleRow]) -> tuple[list[int], list[float]]:
        # Per-row settings change only when the batch's rows do: cache them for the decode steps.
        if rows is not self._rows or self._row_tensors is None:
            sampling = [row.pending.request.sampling for row in rows]
            device = logits.device
            row_tensors = (
                torch.tensor([s.temperature for s in sampling], dtype=torch.float32, device=device),
                torch.tensor([s.top_p for s in sampling], dtype=torch.float32, device=device),
                torch.tensor([s.top_k for s in sampling], dtype=torch.int64, device=device),
                torch.tensor([row.key for row in rows], dtype=torch.int64, device=device),
                all(s.temperature == 0 for s in sampling),
                any(s.top_p < 1 or s.top_k > 0 for s in sampling),
            )
            if rows is self._rows:
                self._row_tensors = row_tensors
        else:
            row_tensors = self._row_tensors
        temperature, top_p, top_k, keys, all_greedy, needs_filter = row_tensors
        if all_greedy:  # argmax: no random draw to make
            uniforms = temperature
        else:  # the uniform of token j of a sample is hash(key, j): independent of batch and timing
            steps = torch.tensor([len(row.output_ids) for row in rows], dtype=torch.int64).to(logits.device)
            uniforms = counter_uniforms(keys, steps)
        params = SamplingTensors(temperature, top_p, top_k, uniforms, all_greedy, needs_filter)
        tokens, logprobs = sample_next_tokens(logits, params)
        # One device->host copy for both (float64 holds every token id exactly).
        tokens_and_logprobs = torch.stack([tokens.double(), logprobs.double()]).tolist()
        return [int(t) for t in tokens_and_logprobs[0]], tokens_and_logprobs[1]

    def _record_tokens(self, sampled: tuple[list[int], list[float]], start_row: int) -> None:
        """Append this step's tokens to their live rows and finish rows that hit a stop."""
        tokens, logprobs = sampled
        finished = []
        for offset, (token, logprob) in enumerate(zip(tokens, logprobs)):
            row = self._rows[start_row + offset]
            if row.finished:
                continue
            row.output_ids.append(token)
            row.logprobs.append(logprob)
            reason = finish_reason(row, token, self.tokenizer)
            if reason is not None:
                finish_row(row, reason, self.tokenizer, self.weight_version)
                finished.append(start_row + offset)
        assert self._batch is not None
        self._batch.set_last_tokens(tokens, start_row)
        if finished and isinstance(self._batch, SlotBatch):
            self._batch.release_rows(finished)  # static slots stop advancing (a slab row just rides along)

    def _compact(self, force: bool = False) -> None:
        """Drop finished rows from the slab once they are >= 1/8 of it (or all of it, or when forced).

        Finished rows stay in the batch as masked-out passengers until then: rebuilding the slab
        copies the whole KV cache, which at one finished row per step would cost more than the
        wasted compute of carrying a few dead rows.
        """
        dead = sum(row.finished for row in self._rows)
        if dead == 0 or not (force or dead == len(self._rows) or dead * 8 >= len(self._rows)):
            return
        keep = [i for i, row in enumerate(self._rows) if not row.finished]
        self._rows = [self._rows[i] for i in keep]
        self._row_tensors = None
        assert self._batch is not None
        self._batch = self._batch.select(keep) if keep else None

    def _fail_running(self, exc: Exception) -> None:
        for row in self._rows:
            if not row.pending.future.done():
                row.pending.future.set_exception(exc)
        self._rows = []
        self._row_tensors = None
        self._batch = None

    def _drain_all(self) -> list[PendingRequest]:
        drained = list(self._waiting) + [row.pending for row in self._rows]
        while True:
            try:
                drained.extend(self._queue.get_nowait())
            except queue.Empty:
                return drained


def _legacy_hf_name(name: str, params: dict[str, torch.Tensor]) -> str:
    """Map pre-transformers-5 checkpoint names (`model.layers.*`, `visual.*`) to the module names."""
    for old, new in (("model.", "model.language_model."), ("visual.", "model.visual."),
                     ("language_model.model.", "model.language_model."),
                     ("language_model.lm_head.", "lm_head."), ("vision_tower.", "model.vision_tower."),
                     ("multi_modal_projector.", "model.multi_modal_projector.")):
        if name.startswith(old) and new + name[len(old):] in params:
            return new + name[len(old):]
    return name
