"""Wire format of the rollout server: SGLang-native and OpenAI-compatible request/response models.

Strictness: unknown fields are rejected (400 naming the field) rather than silently ignored, because a
misspelled sampling key (`max_tokens` in `/generate`, `topp`) would otherwise change an RL run's
samples without anyone noticing. SGLang fields we accept but that cannot change our results
(`rid`, `stream=false`, ...) are listed explicitly.
"""

from __future__ import annotations

import base64
import binascii
import io
from typing import Any, Literal

from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, model_validator

from rollout.engines.base import EngineInputError, SampleOutput, SamplingParams

MAX_IMAGE_BYTES = 32 * 1024 * 1024  # decoded size of one image
MAX_IMAGE_PIXELS = 40_000_000  # guards against decompression bombs


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


INT32 = (-(2**31), 2**31)  # SGLang stacks sampling_seed into an int32 tensor (sampling_batch_info.py)


class SamplingParamsIn(_Strict):
    """SGLang's `sampling_params`: exactly the keyword arguments of its `SamplingParams.__init__`
    (sglang 0.5.4.post3, srt/sampling/sampling_params.py), checked by its `verify()` rules.

    The embedded engine implements the first group; the second is accepted at SGLang's defaults only
    (a non-default value is refused naming the field: the engine cannot honour it). An unknown key,
    e.g. `seed`, is refused as SGLang refuses it (`SamplingParams(**kwargs)` raises TypeError).
    """

    max_new_tokens: int = 128
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    n: int = 1
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    no_stop_trim: bool = False
    # SGLang's default is 42, acting only under --enable-deterministic-inference; unset here = fresh
    # randomness, set = the sample is a function of (seed, token index), in any batch.
    sampling_seed: int | None = None
    # Accepted at these (SGLang's default) values only.
    stop_regex: str | list[str] | None = None
    min_p: float = 0.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    repetition_penalty: float = 1.0
    min_new_tokens: int = 0
    json_schema: str | None = None
    regex: str | None = None
    ebnf: str | None = None
    structural_tag: str | None = None
    spaces_between_special_tokens: bool = True
    custom_params: dict[str, Any] | None = None
    stream_interval: int | None = None
    logit_bias: dict[str, float] | None = None

    def to_engine(self, prefix: str = "sampling_params") -> SamplingParams:
        """SGLang's `verify()` rules, then the engine's params; errors name `prefix.field`."""
        self._verify(prefix)
        stop = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        return SamplingParams(
            max_new_tokens=self.max_new_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            n=self.n,
            stop=tuple(stop),
            stop_token_ids=tuple(self.stop_token_ids or ()),
            seed=self.sampling_seed,
            ignore_eos=self.ignore_eos,
            skip_special_tokens=self.skip_special_tokens,
            no_stop_trim=self.no_stop_trim,
        )

    def _verify(self, prefix: str) -> None:
        def fail(name: str, message: str) -> None:
            raise EngineInputError(f"{prefix}.{name}", message)

        # SGLang first maps temperature < 1e-6 to greedy (top_k = 1), so top_k is free there.
        if self.temperature >= 1e-6 and (self.top_k == 0 or self.top_k < -1):
            fail("top_k", f"must be -1 (disable) or at least 1, got {self.top_k}")
        if "sampling_seed" in self.model_fields_set and self.sampling_seed is None:
            fail("sampling_seed", "should not be None")
        if self.sampling_seed is not None and not INT32[0] <= self.sampling_seed < INT32[1]:
            fail("sampling_seed", f"{self.sampling_seed} does not fit SGLang's int32 seed tensor")
        for name in _DEFAULT_ONLY:
            if getattr(self, name) != type(self).model_fields[name].default:
                fail(name, f"{getattr(self, name)!r} is not supported by the embedded engine (SGLang only)")


_DEFAULT_ONLY = ("stop_regex", "min_p", "frequency_penalty", "presence_penalty", "repetition_penalty",
                 "min_new_tokens", "json_schema", "regex", "ebnf", "structural_tag",
                 "spaces_between_special_tokens", "custom_params", "stream_interval", "logit_bias")


class GenerateIn(_Strict):
    """`POST /generate`: one prompt or a batch (lists), SGLang's field names and its batch rules
    (`GenerateReqInput.normalize_batch_and_arguments`, sglang 0.5.4.post3 io_struct.py)."""

    text: str | list[str] | None = None
    input_ids: list[int] | list[list[int]] | None = None
    # Single prompt: one base64 image or a list of them. Batch: one entry per prompt, and SGLang reads
    # the nesting from entry 0 only: a list there means "a list of images per prompt" ([] = none),
    # anything else means "one image (or None) per prompt".
    image_data: str | list[str | list[str] | None] | None = None
    sampling_params: SamplingParamsIn | list[SamplingParamsIn] | None = None
    return_logprob: bool | list[bool] | None = None
    logprob_start_len: int | list[int] | None = None
    top_logprobs_num: Literal[0] | list[Literal[0]] | None = None
    return_text_in_logprobs: bool = False
    # Accepted for SGLang compatibility; they cannot change what we return.
    rid: str | list[str] | None = None
    stream: Literal[False] = False
    log_metrics: bool = True
    priority: int | None = None
    no_logs: bool = False
    custom_labels: dict[str, str] | None = None
    http_worker_ipc: str | None = None

    @model_validator(mode="after")
    def _one_prompt_kind(self) -> GenerateIn:
        if (self.text is None) == (self.input_ids is None):
            raise ValueError("give exactly one of text / input_ids")
        return self

    def check(self) -> None:
        """SGLang's batch rules (raised as EngineInputError naming the field, before any work)."""
        if self.input_ids is not None and len(self.input_ids) == 0:
            raise EngineInputError("input_ids", "input_ids cannot be empty")
        params = self.sampling_params
        n = (params[0].n if params else 1) if isinstance(params, list) else (params.n if params else 1)
        if isinstance(params, list) and any(p.n != n for p in params):
            raise EngineInputError("sampling_params", "every entry needs the same n (SGLang's parallel_sample_num)")
        for name in ("return_logprob", "logprob_start_len", "top_logprobs_num"):
            if n > 1 and isinstance(getattr(self, name), list):
                raise EngineInputError(name, "a per-prompt list cannot be used with n > 1 (SGLang)")
        data = self.image_data
        if not isinstance(data, list) or not data or (not self.is_batch and n == 1):
            return
        if len(data) != self.batch_size:
            raise EngineInputError("image_data", f"has {len(data)} entries for {self.batch_size} prompts")
        if not isinstance(data[0], list):
            for i, entry in enumerate(data):
                if isinstance(entry, list):
                    raise EngineInputError(f"image_data[{i}]", "image_data[0] is not a list, so SGLang reads every "
                                           "entry as one image; send a list per prompt ([] for none)")

    @property
    def is_batch(self) -> bool:
        if self.text is not None:
            return isinstance(self.text, list)
        return bool(self.input_ids) and isinstance(self.input_ids[0], list)

    @property
    def batch_size(self) -> int:
        if not self.is_batch:
            return 1
        return len(self.text if self.text is not None else self.input_ids)  # type: ignore[arg-type]

    def prompt(self, i: int) -> tuple[str | None, list[int] | None]:
        if self.text is not None:
            return (self.text[i] if self.is_batch else self.text), None  # type: ignore[return-value]
        return None, (self.input_ids[i] if self.is_batch else self.input_ids)  # type: ignore[index,return-value]

    def images(self, i: int) -> tuple[str, list[str]]:
        """(field path for errors, base64 strings) of prompt i (after `check`)."""
        data = self.image_data
        if data is None or isinstance(data, str):
            return "image_data", [] if data is None else [data]
        if not self.is_batch:  # [a, b] = several images; [[a, b]] = SGLang's batch-of-one form
            inner = data[0] if len(data) == 1 and isinstance(data[0], list) else data
            return "image_data", [d for d in inner if isinstance(d, str)]
        if not data:
            return "image_data", []
        entry = data[i]
        return f"image_data[{i}]", [] if entry is None else ([entry] if isinstance(entry, str) else entry)

    def sampling(self, i: int) -> SamplingParams:
        params = self.sampling_params
        if isinstance(params, list):
            if len(params) != self.batch_size:
                raise EngineInputError("sampling_params", "a list needs one entry per prompt")
            return params[i].to_engine(f"sampling_params[{i}]")
        return (params or SamplingParamsIn()).to_engine()

    def logprob(self, i: int) -> bool:
        return bool(self.return_logprob[i] if isinstance(self.return_logprob, list) else self.return_logprob)


def decode_image(data: str, field: str) -> Image.Image:
    """A base64 (or `data:image/...;base64,`) string -> RGB PIL image. URLs and paths are refused:
    a rollout server must not fetch from the network or read files on a client's say-so."""
    if data.startswith(("http://", "https://", "file:", "/", "./")):
        raise EngineInputError(field, "only base64-encoded images (or data: URLs) are accepted")
    if data.startswith("data:"):
        header, _, data = data.partition(",")
        if ";base64" not in header:
            raise EngineInputError(field, "data URLs must be base64-encoded")
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise EngineInputError(field, f"not valid base64: {exc}") from exc
    if len(raw) > MAX_IMAGE_BYTES:
        raise EngineInputError(field, f"image is {len(raw)} bytes; the limit is {MAX_IMAGE_BYTES}")
    try:
        image = Image.open(io.BytesIO(raw))
        if image.width * image.height > MAX_IMAGE_PIXELS:
            raise EngineInputError(field, f"image is {image.width}x{image.height}; too many pixels")
        image.load()
        return image.convert("RGB")
    except EngineInputError:
        raise
    except Exception as exc:  # noqa: BLE001 - PIL raises many types for corrupt data
        raise EngineInputError(field, f"cannot decode image: {exc}") from exc


def generate_item(sample: SampleOutput, return_logprob: bool, rid: str, weight_version: str) -> dict[str, Any]:
    """One element of the `/generate` response, as SGLang shapes it (tokenizer_manager._handle_batch_output)."""
    meta: dict[str, Any] = {
        "id": rid,
        "finish_reason": sample.finish_reason,
        "prompt_tokens": sample.prompt_tokens,
        "completion_tokens": sample.completion_tokens,
        "cached_tokens": 0,
        "weight_version": weight_version,
    }
    if return_logprob:
        # SGLang's triples: [logprob, token_id, token_text or None (return_text_in_logprobs=false)].
        meta["output_token_logprobs"] = [
            [lp, token, None] for lp, token in zip(sample.output_logprobs, sample.output_ids)
        ]
    return {"text": sample.text, "output_ids": sample.output_ids, "meta_info": meta}


class _SGLangReq(_Strict):
    """Fields every SGLang request dataclass has (io_struct.BaseReq)."""

    rid: str | list[str] | None = None
    http_worker_ipc: str | None = None


class UpdateWeightsFromDiskIn(_SGLangReq):
    """SGLang's UpdateWeightFromDiskReqInput (0.5.4.post3): `weight_version` is a string there (an int
    is refused, as pydantic refuses it for SGLang); the other flags are accepted and change nothing
    for an engine without a scheduler to pause or CUDA graphs to recapture."""

    model_path: str
    load_format: str | None = None
    abort_all_requests: bool = False
    weight_version: str | None = None
    is_async: bool = False
    torch_empty_cache: bool = False
    keep_pause: bool = False
    recapture_cuda_graph: bool = False
    token_step: int = 0


class UpdateWeightsFromTensorIn(_SGLangReq):
    """JSON form of `POST /update_weights_from_tensor` (SGLang's UpdateWeightsFromTensorReqInput fields).

    `serialized_named_tensors`: base64 strings, each a complete safetensors file of (HF name -> tensor),
    with `load_format="safetensors"`. SGLang's own default (its pickling serializer, CUDA IPC handles)
    is refused: unpickling a request body runs arbitrary code. So this route is the embedded engine's:
    SGLang passes the body's schema but cannot load the payload (weight_sync refuses method tensor there).
    """

    serialized_named_tensors: list[str]
    load_format: Literal["safetensors"] | None = "safetensors"
    flush_cache: bool = True
    abort_all_requests: bool = False
    weight_version: str | None = None


class InitWeightsUpdateGroupIn(_SGLangReq):
    """`POST /init_weights_update_group` (SGLang's fields): join the trainer's broadcast group as rank
    `rank_offset` of `world_size` (the trainer is rank 0 and hosts the store at master_address:port)."""

    master_address: str = Field(min_length=1)
    master_port: int = Field(gt=0, lt=65536)
    rank_offset: int = Field(ge=1)
    world_size: int = Field(ge=2)
    group_name: str = Field("weight_update_group", min_length=1)
    backend: Literal["gloo", "nccl"] = "nccl"

    def check_rank(self) -> None:
        """(Not a validator: pydantic would turn the error into a 'body' error without the field.)"""
        if self.rank_offset >= self.world_size:
            raise EngineInputError("rank_offset", f"{self.rank_offset} is not below world_size={self.world_size}")


class DestroyWeightsUpdateGroupIn(_SGLangReq):
    group_name: str = "weight_update_group"


class UpdateWeightsFromDistributedIn(_SGLangReq):
    """`POST /update_weights_from_distributed` (SGLang's fields): after this request, rank 0 of
    `group_name` broadcasts one tensor per name, in order, with the given dtypes and shapes."""

    names: list[str] = Field(min_length=1)
    dtypes: list[str]
    shapes: list[list[int]]
    group_name: str = "weight_update_group"
    flush_cache: bool = True
    abort_all_requests: bool = False  # accepted; in-flight requests continue either way
    weight_version: str | None = None

    def tensor_specs(self) -> list[tuple[str, Any, tuple[int, ...]]]:
        """(name, torch dtype, shape) per tensor; a bad entry raises naming its field."""
        from rollout.weight_group import parse_dtype

        for field_name in ("dtypes", "shapes"):
            if len(getattr(self, field_name)) != len(self.names):
                raise EngineInputError(field_name, f"has {len(getattr(self, field_name))} entries; names has "
                                       f"{len(self.names)}")
        specs = []
        for i, (name, dtype_name, shape) in enumerate(zip(self.names, self.dtypes, self.shapes)):
            dtype = parse_dtype(dtype_name)
            if dtype is None:
                raise EngineInputError(f"dtypes[{i}]", f"{dtype_name!r} is not a torch dtype")
            if any(d < 0 for d in shape):
                raise EngineInputError(f"shapes[{i}]", f"{shape} has a negative dimension")
            specs.append((name, dtype, tuple(shape)))
        if len(set(self.names)) != len(self.names):
            raise EngineInputError("names", "names repeat")
        return specs


# --------------------------------------------------------------------------------------------------
# OpenAI-compatible chat completions
# --------------------------------------------------------------------------------------------------
class ImageURL(_Strict):
    url: str
    detail: str | None = None


class ContentPart(_Strict):
    type: Literal["text", "image_url"]
    text: str | None = None
    image_url: ImageURL | None = None


class ChatMessage(_Strict):
    role: Literal["system", "user", "assistant"]
    content: str | list[ContentPart]
    name: str | None = None


class ChatCompletionIn(_Strict):
    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    n: int = 1
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1  # extension (as in SGLang)
    stop: str | list[str] | None = None
    seed: int | None = None
    logprobs: bool = False
    top_logprobs: Literal[0] | None = None
    stream: Literal[False] = False
    user: str | None = None
    frequency_penalty: Literal[0] = 0
    presence_penalty: Literal[0] = 0

    def sampling(self, default_max_tokens: int) -> SamplingParams:
        max_tokens = self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
        return SamplingParamsIn(
            max_new_tokens=default_max_tokens if max_tokens is None else max_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            n=self.n,
            stop=self.stop,
            **({} if self.seed is None else {"sampling_seed": self.seed}),
        ).to_engine()

    def template_messages(self) -> tuple[list[dict[str, Any]], list[tuple[str, str]]]:
        """Messages for the processor's chat template, and (field path, image data URL) in order."""
        messages, images = [], []
        for m_index, message in enumerate(self.messages):
            if isinstance(message.content, str):
                messages.append({"role": message.role, "content": message.content})
                continue
            parts = []
            for p_index, part in enumerate(message.content):
                path = f"messages[{m_index}].content[{p_index}]"
                if part.type == "text":
                    parts.append({"type": "text", "text": part.text or ""})
                elif part.image_url is None:
                    raise EngineInputError(path + ".image_url", "missing")
                else:
                    parts.append({"type": "image"})
                    images.append((path + ".image_url.url", part.image_url.url))
            messages.append({"role": message.role, "content": parts})
        return messages, images
