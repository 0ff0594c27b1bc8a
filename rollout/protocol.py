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


class SamplingParamsIn(_Strict):
    """SGLang `sampling_params` (the keys the embedded engine implements)."""

    max_new_tokens: int = 128
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    n: int = 1
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    seed: int | None = None
    sampling_seed: int | None = None  # SGLang's name for the seed
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    no_stop_trim: bool = False

    def to_engine(self) -> SamplingParams:
        stop = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        return SamplingParams(
            max_new_tokens=self.max_new_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            n=self.n,
            stop=tuple(stop),
            stop_token_ids=tuple(self.stop_token_ids or ()),
            seed=self.seed if self.seed is not None else self.sampling_seed,
            ignore_eos=self.ignore_eos,
            skip_special_tokens=self.skip_special_tokens,
            no_stop_trim=self.no_stop_trim,
        )


class GenerateIn(_Strict):
    """`POST /generate`: one prompt or a batch (lists), SGLang's field names."""

    text: str | list[str] | None = None
    input_ids: list[int] | list[list[int]] | None = None
    # Single prompt: one base64 image or a list of them; batch: one entry (str | list | None) per prompt.
    image_data: str | list[str | list[str] | None] | None = None
    sampling_params: SamplingParamsIn | list[SamplingParamsIn] | None = None
    return_logprob: bool | list[bool] = False
    # Accepted for SGLang compatibility; they cannot change what we return.
    rid: str | list[str] | None = None
    stream: Literal[False] = False
    return_text_in_logprobs: bool = False
    logprob_start_len: int | list[int] | None = None
    top_logprobs_num: Literal[0] | None = None

    @model_validator(mode="after")
    def _one_prompt_kind(self) -> GenerateIn:
        if (self.text is None) == (self.input_ids is None):
            raise ValueError("give exactly one of text / input_ids")
        return self

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
        """(field path for errors, base64 strings) of prompt i."""
        data = self.image_data
        if data is None:
            return "image_data", []
        if not self.is_batch:
            return "image_data", [data] if isinstance(data, str) else [d for d in data if isinstance(d, str)]
        if not isinstance(data, list) or len(data) != self.batch_size:
            raise EngineInputError("image_data", "a batch needs one image_data entry per prompt")
        entry = data[i]
        return f"image_data[{i}]", [] if entry is None else ([entry] if isinstance(entry, str) else entry)

    def sampling(self, i: int) -> SamplingParamsIn:
        params = self.sampling_params
        if isinstance(params, list):
            if len(params) != self.batch_size:
                raise EngineInputError("sampling_params", "a list needs one entry per prompt")
            return params[i]
        return params or SamplingParamsIn()

    def logprob(self, i: int) -> bool:
        return self.return_logprob[i] if isinstance(self.return_logprob, list) else self.return_logprob


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


def generate_item(sample: SampleOutput, return_logprob: bool, rid: str) -> dict[str, Any]:
    """One element of the `/generate` response, as SGLang shapes it."""
    meta: dict[str, Any] = {
        "id": rid,
        "finish_reason": sample.finish_reason,
        "prompt_tokens": sample.prompt_tokens,
        "completion_tokens": sample.completion_tokens,
        "cached_tokens": 0,
        "weight_version": sample.weight_version,
    }
    if return_logprob:
        # SGLang's triples: [logprob, token_id, token_text or None (return_text_in_logprobs=false)].
        meta["output_token_logprobs"] = [
            [lp, token, None] for lp, token in zip(sample.output_logprobs, sample.output_ids)
        ]
    return {"text": sample.text, "output_ids": sample.output_ids, "meta_info": meta}


class UpdateWeightsFromDiskIn(_Strict):
    model_path: str
    load_format: str | None = None
    weight_version: int | None = None
    abort_all_requests: bool = False  # accepted for SGLang compatibility; in-flight requests continue


class UpdateWeightsFromTensorIn(_Strict):
    """JSON form of `POST /update_weights_from_tensor` (the raw-bytes form takes the same query params).

    `serialized_named_tensors`: base64 strings, each a complete safetensors file of (HF name -> tensor).
    SGLang's default (pickled tensors) is refused: unpickling a request body runs arbitrary code.
    """

    serialized_named_tensors: list[str]
    load_format: Literal["safetensors"] | None = "safetensors"
    flush_cache: bool = True
    weight_version: int | None = None
    abort_all_requests: bool = False


class InitWeightsUpdateGroupIn(_Strict):
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


class DestroyWeightsUpdateGroupIn(_Strict):
    group_name: str = "weight_update_group"


class UpdateWeightsFromDistributedIn(_Strict):
    """`POST /update_weights_from_distributed` (SGLang's fields): after this request, rank 0 of
    `group_name` broadcasts one tensor per name, in order, with the given dtypes and shapes."""

    names: list[str] = Field(min_length=1)
    dtypes: list[str]
    shapes: list[list[int]]
    group_name: str = "weight_update_group"
    flush_cache: bool = True
    weight_version: int | None = None  # SGLang sends a string; numeric strings are accepted
    # Accepted for SGLang compatibility; in-flight requests continue either way.
    abort_all_requests: bool = False
    load_format: str | None = None
    torch_empty_cache: bool = False

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
            seed=self.seed,
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
