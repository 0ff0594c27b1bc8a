"""The rollout HTTP server: SGLang-native routes plus OpenAI-compatible chat, in front of an engine.

    python -m rollout.server --model HF_DIR [--host 127.0.0.1] [--port 30000] [--api-key K]
                             [--engine embedded|sglang|vllm] [--device cpu] [--dtype float32]

With `--engine embedded` this process serves the API itself (rollout/engines/embedded.py). With
`sglang` / `vllm` it launches and supervises the real server, which speaks the API natively.

Routes (SGLang field names; see rollout/protocol.py for the exact request models):
  POST /generate                     text | input_ids (single or batch), image_data (base64),
                                     sampling_params, return_logprob -> dict, or a list for a batch
                                     or n > 1 (prompt-major: prompt 0's n samples first)
  POST /update_weights_from_disk     {model_path, weight_version?}
  POST /update_weights_from_tensor   application/octet-stream body = one safetensors file
                                     (?weight_version=V), or JSON {serialized_named_tensors:
                                     [base64 safetensors, ...], load_format: "safetensors", weight_version?}
  POST /init_weights_update_group    {master_address, master_port, rank_offset, world_size, group_name,
                                     backend: gloo|nccl}: join the trainer's broadcast group (returns
                                     once the trainer joined too; rollout/weight_group.py)
  POST /update_weights_from_distributed  {names, dtypes, shapes, group_name, flush_cache?, weight_version?}:
                                     receive one broadcast per name from rank 0, in order, then load
  POST /destroy_weights_update_group {group_name}
  GET|POST /flush_cache, GET /health, GET /get_model_info
  POST /v1/chat/completions, GET /v1/models   (OpenAI-compatible; images as base64 data URLs)
Auth: with --api-key, every route except GET /health needs `Authorization: Bearer K`.
Errors: 4xx JSON {"error": {"message", "field", "type"}}; the server keeps serving.
"""

from __future__ import annotations

import argparse
import asyncio
import hmac
import logging
import sys
import time
import uuid
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError

from rollout.engines.base import EngineInputError, GenerateRequest, RolloutEngine, SampleOutput
from rollout.protocol import (
    ChatCompletionIn,
    DestroyWeightsUpdateGroupIn,
    GenerateIn,
    InitWeightsUpdateGroupIn,
    UpdateWeightsFromDiskIn,
    UpdateWeightsFromDistributedIn,
    UpdateWeightsFromTensorIn,
    decode_image,
    generate_item,
)
from rollout.weight_group import WeightUpdateGroups

logger = logging.getLogger(__name__)

CHAT_DEFAULT_MAX_TOKENS = 512  # OpenAI's "until the context is full" is impractical for rollouts


class WeightVersions:
    """SGLang's `weight_version`: a free-form string that a weight update may set ("default" until one
    does; an update without one keeps it). The engine numbers its updates; this maps each number to the
    label current after it, so every sample reports the label of the weights it finished with."""

    def __init__(self, engine_version: int) -> None:
        self.current = "default"
        self._labels = {engine_version: self.current}

    def updated(self, engine_version: int, label: str | None) -> str:
        if label is not None:
            self.current = label
        self._labels[engine_version] = self.current
        return self.current

    def of(self, engine_version: int) -> str:
        return self._labels.get(engine_version, self.current)


class HTTPInputError(Exception):
    def __init__(self, status: int, field: str, message: str) -> None:
        super().__init__(message)
        self.status, self.field, self.message = status, field, message


def _error(status: int, field: str, message: str) -> JSONResponse:
    kind = "authentication_error" if status == 401 else "invalid_request_error"
    return JSONResponse(status_code=status, content={"error": {"message": f"{field}: {message}", "field": field,
                                                                "type": kind}})


def _field_path(loc: tuple[Any, ...]) -> str:
    """('body', 'sampling_params', 'SamplingParamsIn', 'max_new_tokens') -> 'sampling_params.max_new_tokens'.
    Pydantic puts union-member names ('SamplingParamsIn', 'list[int]', 'str') in locations; drop them."""
    path = ""
    for part in loc[1:] if loc and loc[0] == "body" else loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif part[:1].isupper() or "[" in part or part in {"str", "int", "float", "bool", "none"}:
            continue
        else:
            path += f".{part}" if path else part
    return path or "body"


def create_app(engine: RolloutEngine, api_key: str | None = None) -> FastAPI:
    app = FastAPI(title="calibrl rollout server")

    async def require_key(request: Request) -> None:
        if api_key is None:
            return
        header = request.headers.get("authorization", "")
        if not hmac.compare_digest(header.encode(), f"Bearer {api_key}".encode()):
            raise HTTPInputError(401, "Authorization", "missing or wrong API key")

    @app.exception_handler(HTTPInputError)
    async def _on_http_error(_: Request, exc: HTTPInputError) -> JSONResponse:
        return _error(exc.status, exc.field, exc.message)

    @app.exception_handler(EngineInputError)
    async def _on_input_error(_: Request, exc: EngineInputError) -> JSONResponse:
        return _error(400, exc.field, exc.message)

    @app.exception_handler(RequestValidationError)
    async def _on_validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0]
        if first.get("type") == "json_invalid":
            return _error(400, "body", "invalid JSON")
        return _error(400, _field_path(tuple(first.get("loc", ()))), first.get("msg", "invalid"))

    @app.exception_handler(Exception)
    async def _on_internal(_: Request, exc: Exception) -> JSONResponse:
        logger.exception("internal error")
        return JSONResponse(status_code=500, content={"error": {"message": repr(exc), "type": "internal_error"}})

    auth = [Depends(require_key)]
    versions = WeightVersions(engine.weight_version)

    @app.get("/health")
    async def health() -> JSONResponse:
        alive = getattr(engine, "is_alive", lambda: True)()
        return JSONResponse(status_code=200 if alive else 503, content={"status": "ok" if alive else "dead"})

    @app.get("/get_model_info", dependencies=auth)
    async def get_model_info() -> dict[str, Any]:
        return {**engine.model_info(), "weight_version": versions.current}

    @app.api_route("/flush_cache", methods=["GET", "POST"], dependencies=auth)
    async def flush_cache() -> dict[str, Any]:
        await run_in_threadpool(engine.flush_cache)
        return {"success": True, "message": "Cache flushed."}

    @app.get("/get_weight_version", dependencies=auth)
    async def get_weight_version() -> dict[str, Any]:
        return {"weight_version": versions.current}

    @app.get("/get_server_info", dependencies=auth)
    async def get_server_info() -> dict[str, Any]:
        return {**engine.model_info(), "weight_version": versions.current, "tp_size": 1, "version": "embedded"}

    @app.post("/generate", dependencies=auth)
    async def generate(body: GenerateIn) -> Any:
        body.check()
        requests = []
        for i in range(body.batch_size):
            text, input_ids = body.prompt(i)
            field, encoded = body.images(i)
            images = await run_in_threadpool(_decode_images, [
                (f"{field}[{j}]" if len(encoded) > 1 else field, data) for j, data in enumerate(encoded)])
            requests.append(GenerateRequest(text=text, input_ids=input_ids, images=images,
                                            sampling=body.sampling(i), return_logprob=body.logprob(i)))
        per_prompt = await _run(engine, requests)
        items = []
        for i, samples in enumerate(per_prompt):
            rid = (body.rid[i] if isinstance(body.rid, list) else body.rid) or uuid.uuid4().hex
            items += [generate_item(s, body.logprob(i), rid, versions.of(s.weight_version)) for s in samples]
        return items if body.is_batch or len(items) != 1 else items[0]

    @app.post("/update_weights_from_disk", dependencies=auth)
    async def update_weights_from_disk(body: UpdateWeightsFromDiskIn) -> dict[str, Any]:
        try:
            engine_version = await run_in_threadpool(engine.update_weights_from_disk, body.model_path, None)
        except (OSError, ValueError) as exc:
            if isinstance(exc, EngineInputError):
                raise
            raise EngineInputError("model_path", f"cannot load weights: {exc}") from exc
        return {"success": True, "message": "Succeeded to update model weights.",
                "weight_version": versions.updated(engine_version, body.weight_version), "num_paused_requests": 0}

    @app.post("/update_weights_from_tensor", dependencies=auth)
    async def update_weights_from_tensor(request: Request) -> dict[str, Any]:
        payloads, version = await _read_tensor_payloads(request)
        named = await run_in_threadpool(_load_safetensors, payloads)
        engine_version = await run_in_threadpool(engine.update_weights_from_tensors, named, None)
        return {"success": True, "message": f"Updated {len(named)} tensors.",
                "weight_version": versions.updated(engine_version, version)}

    groups = WeightUpdateGroups(getattr(engine, "device", "cpu"))

    @app.post("/init_weights_update_group", dependencies=auth)
    async def init_weights_update_group(body: InitWeightsUpdateGroupIn) -> dict[str, Any]:
        body.check_rank()
        # Blocks (in a worker thread) until the trainer joined the group too; the trainer sends this
        # request from a thread and joins at the same time.
        await run_in_threadpool(groups.init, body.master_address, body.master_port, body.rank_offset,
                                body.world_size, body.group_name, body.backend)
        return {"success": True, "message": "Succeeded to initialize custom process group."}

    @app.post("/update_weights_from_distributed", dependencies=auth)
    async def update_weights_from_distributed(body: UpdateWeightsFromDistributedIn) -> dict[str, Any]:
        # Everything is checked before the transfer: a refused request never consumes a broadcast.
        specs = body.tensor_specs()
        groups.get(body.group_name)
        check = getattr(engine, "weight_targets", None)
        if check is not None:
            await run_in_threadpool(check, [(name, shape) for name, _, shape in specs], "names[{i}]", "shapes[{i}]")
        named = await run_in_threadpool(groups.receive, body.group_name, specs)
        engine_version = await run_in_threadpool(engine.update_weights_from_tensors, named, None)
        if body.flush_cache:
            await run_in_threadpool(engine.flush_cache)
        return {"success": True, "message": f"Updated {len(named)} tensors.",
                "weight_version": versions.updated(engine_version, body.weight_version)}

    @app.post("/destroy_weights_update_group", dependencies=auth)
    async def destroy_weights_update_group(body: DestroyWeightsUpdateGroupIn) -> dict[str, Any]:
        await run_in_threadpool(groups.destroy, body.group_name)
        return {"success": True, "message": "Succeeded to destroy custom process group."}

    @app.get("/v1/models", dependencies=auth)
    async def list_models() -> dict[str, Any]:
        info = engine.model_info()
        return {"object": "list", "data": [{"id": info["model_path"], "object": "model", "created": 0,
                                             "owned_by": "calibrl", "root": info["model_path"],
                                             "max_model_len": info.get("max_context_len")}]}

    @app.post("/v1/chat/completions", dependencies=auth)
    async def chat_completions(body: ChatCompletionIn) -> dict[str, Any]:
        messages, image_refs = body.template_messages()
        images = await run_in_threadpool(_decode_images, image_refs)
        text = await run_in_threadpool(engine.apply_chat_template, messages)
        request = GenerateRequest(text=text, images=images, sampling=body.sampling(CHAT_DEFAULT_MAX_TOKENS),
                                  return_logprob=body.logprobs)
        samples = (await _run(engine, [request]))[0]
        return _chat_response(engine, body, samples)

    return app


async def _run(engine: RolloutEngine, requests: list[GenerateRequest]) -> list[list[SampleOutput]]:
    """Submit all requests as one unit (so they batch in the engine, the same way every time), then await
    them; a bad one fails the call naming it (`submit_batch`)."""
    futures = await run_in_threadpool(engine.submit_batch, requests)
    return list(await asyncio.gather(*(asyncio.wrap_future(f) for f in futures)))


def _decode_images(refs: list[tuple[str, str]]) -> list[Any]:
    """(field path, base64 data) pairs -> PIL images; runs in a worker thread (decoding is CPU work)."""
    return [decode_image(data, path) for path, data in refs]


async def _read_tensor_payloads(request: Request) -> tuple[list[bytes], str | None]:
    import base64
    import binascii

    if request.headers.get("content-type", "").startswith("application/json"):
        try:
            body = UpdateWeightsFromTensorIn.model_validate_json(await request.body())
        except ValidationError as exc:
            first = exc.errors()[0]
            if first.get("type") == "json_invalid":
                raise EngineInputError("body", "invalid JSON") from exc
            raise EngineInputError(_field_path(tuple(first["loc"])), first["msg"]) from exc
        try:
            return [base64.b64decode(s, validate=True) for s in body.serialized_named_tensors], body.weight_version
        except (binascii.Error, ValueError) as exc:
            raise EngineInputError("serialized_named_tensors", f"not valid base64: {exc}") from exc
    return [await request.body()], request.query_params.get("weight_version")


def _load_safetensors(payloads: list[bytes]) -> list[tuple[str, Any]]:
    from safetensors.torch import load

    named = []
    for index, payload in enumerate(payloads):
        try:
            named += list(load(payload).items())
        except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types
            raise EngineInputError(f"serialized_named_tensors[{index}]", f"not a safetensors file: {exc}") from exc
    return named


def _chat_response(engine: RolloutEngine, body: ChatCompletionIn, samples: list[SampleOutput]) -> dict[str, Any]:
    tokenizer = getattr(engine, "tokenizer", None)
    choices = []
    for index, sample in enumerate(samples):
        logprobs = None
        if body.logprobs:
            tokens = [tokenizer.decode([t]) if tokenizer else str(t) for t in sample.output_ids]
            logprobs = {"content": [{"token": tok, "logprob": lp, "bytes": list(tok.encode()), "top_logprobs": []}
                                    for tok, lp in zip(tokens, sample.output_logprobs)]}
        choices.append({
            "index": index,
            "message": {"role": "assistant", "content": sample.text},
            "finish_reason": "stop" if sample.finish_reason["type"] == "stop" else "length",
            "logprobs": logprobs,
        })
    completion = sum(s.completion_tokens for s in samples)
    prompt = samples[0].prompt_tokens if samples else 0
    return {
        "id": "chatcmpl-" + uuid.uuid4().hex,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": body.model or engine.model_path,
        "choices": choices,
        "usage": {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion},
        "metadata": {"weight_version": max((s.weight_version for s in samples), default=engine.weight_version)},
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="calibrl serve", description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="HF checkpoint directory")
    parser.add_argument("--host", default="127.0.0.1", help="bind address (loopback by default)")
    parser.add_argument("--port", type=int, default=30000)
    parser.add_argument("--api-key", default=None, help="require `Authorization: Bearer KEY`")
    parser.add_argument("--engine", choices=["embedded", "sglang", "vllm"], default="embedded")
    parser.add_argument("--device", default="cpu", help="embedded engine device (cpu, cuda, cuda:1, ...)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    parser.add_argument("--max-batch-size", type=int, default=256, help="embedded: max decoding rows")
    parser.add_argument("--context-length", type=int, default=None)
    parser.add_argument("--decode-graphs", choices=["auto", "on", "off"], default="auto",
                        help="embedded: decode on a static KV pool with CUDA graphs (auto = on CUDA devices)")
    parser.add_argument("--tp-size", type=int, default=1, help="sglang/vllm tensor parallel size")
    parser.add_argument("--mem-fraction-static", type=float, default=None, help="sglang/vllm GPU memory fraction")
    parser.add_argument("--log-level", default="warning")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper())
    if args.engine != "embedded":
        from rollout.engines.sglang import SGLangServer
        from rollout.engines.vllm import VLLMServer

        server_class = SGLangServer if args.engine == "sglang" else VLLMServer
        server = server_class(model_path=args.model, host=args.host, port=args.port, api_key=args.api_key,
                              tp_size=args.tp_size, mem_fraction_static=args.mem_fraction_static,
                              context_length=args.context_length)
        return server.run_forever()

    import torch
    import uvicorn

    from rollout.engines.embedded import EmbeddedEngine

    engine = EmbeddedEngine(args.model, device=args.device, dtype=getattr(torch, args.dtype),
                            max_batch_size=args.max_batch_size, max_context_len=args.context_length,
                            decode_graphs=args.decode_graphs)
    app = create_app(engine, api_key=args.api_key)
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    finally:
        engine.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
