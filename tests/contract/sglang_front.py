"""SGLang's HTTP front, from SGLang's own code, in front of our embedded engine: the contract stand-in.

    python -m tests.contract.sglang_front --model TINY_HF_DIR --port P

A real SGLang server needs a GPU; its request handling does not. This process serves the routes the
trainer, weight sync and eval use, each declared with SGLang 0.5.4.post3's own request dataclass
(`sglang.srt.managers.io_struct`), so FastAPI/pydantic validate bodies exactly as `http_server.py` does
(and its 400 for validation errors, `validation_exception_handler`). Then, as SGLang's tokenizer manager
and scheduler would:
- /generate: `obj.normalize_batch_and_arguments()`, one expanded request per (prompt, sample) in
  SGLang's order (tokenizer_manager._handle_batch_request: prompt-major), `SamplingParams(**sp)`,
  `.normalize(None)`, `.verify(vocab_size)`, and the int32 `sampling_seed` tensor of
  `--enable-deterministic-inference` (sampling_batch_info.py). Tokens come from the embedded engine, one
  sample per expanded request, seeded with its `sampling_seed` (so the n samples of one entry are
  identical, as under SGLang's deterministic inference). Responses have tokenizer_manager's shape, with
  `weight_version` the server's string.
- /init_weights_update_group: SGLang's own `init_custom_process_group` (gloo), inside a process that has a
  default group, as SGLang's TP workers do; /update_weights_from_distributed: model_runner's receive (one
  async `torch.distributed.broadcast(src=0)` per name, in order), then the engine loads them.
- /update_weights_from_tensor: SGLang's `MultiprocessingSerializer.deserialize` on the payload.
Test routes: GET /contract/requests (every request's route and status), POST /contract/received
{"path"} (the tensors the last distributed update received, as a safetensors file).
"""

from __future__ import annotations

import asyncio
import sys
import uuid
from typing import Any

from tests.contract.launch import serve
from tests.contract.sglang_env import TARGET

sys.path.append(str(TARGET))  # after the venv: our torch / transformers win

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from fastapi import FastAPI, Request  # noqa: E402
from fastapi.exceptions import RequestValidationError  # noqa: E402
from fastapi.responses import JSONResponse  # noqa: E402
from sglang.srt.managers.io_struct import (  # noqa: E402
    DestroyWeightsUpdateGroupReqInput,
    GenerateReqInput,
    InitWeightsUpdateGroupReqInput,
    UpdateWeightFromDiskReqInput,
    UpdateWeightsFromDistributedReqInput,
    UpdateWeightsFromTensorReqInput,
)
from sglang.srt.sampling.sampling_params import SamplingParams  # noqa: E402
from sglang.srt.utils.common import MultiprocessingSerializer, init_custom_process_group  # noqa: E402
from sglang.version import __version__ as SGLANG_VERSION  # noqa: E402

from rollout.engines.base import GenerateRequest  # noqa: E402
from rollout.engines.base import SamplingParams as EngineSampling
from rollout.protocol import decode_image  # noqa: E402

SGLANG_TORCH = "2.8.0"  # sglang 0.5.4.post3's torch pin


def create_app(engine: Any) -> FastAPI:
    app = FastAPI()
    state = {"version": "default", "groups": {}, "received": {}, "log": []}
    lock = asyncio.Lock()  # tokenizer_manager.model_update_lock: one weight update at a time

    @app.middleware("http")
    async def record(request: Request, call_next):
        response = await call_next(request)
        if not request.url.path.startswith("/contract"):
            state["log"].append({"route": request.url.path, "status": response.status_code})
        return response

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        # http_server.validation_exception_handler: 400 and an ErrorResponse body
        return JSONResponse(status_code=400, content={"object": "error", "message": f"{exc} {exc.errors()}",
                                                      "type": "Bad Request", "param": None, "code": 400})

    def refused(message: str, status: int = 400) -> JSONResponse:
        return JSONResponse(status_code=status, content={"error": {"message": message}})

    def outcome(success: bool, message: str, **extra: Any) -> JSONResponse:
        return JSONResponse(status_code=200 if success else 400, content={"success": success, "message": message,
                                                                          **extra})

    @app.get("/health")
    async def health() -> JSONResponse:
        return JSONResponse(status_code=200, content={})

    @app.get("/get_model_info")
    async def get_model_info() -> dict[str, Any]:
        return {"model_path": engine.model_path, "tokenizer_path": engine.model_path, "is_generation": True,
                "preferred_sampling_params": None, "weight_version": state["version"]}

    @app.get("/get_server_info")
    async def get_server_info() -> dict[str, Any]:
        return {"tp_size": 1, "weight_version": state["version"], "version": SGLANG_VERSION}

    @app.api_route("/flush_cache", methods=["GET", "POST"])
    async def flush_cache() -> JSONResponse:
        return JSONResponse(status_code=200, content="Cache flushed.")

    @app.post("/generate")
    async def generate(obj: GenerateReqInput) -> Any:
        try:
            obj.normalize_batch_and_arguments()
            expanded = _expand(obj)
            vocab = engine.model.config.get_text_config().vocab_size
            for one in expanded:
                params = SamplingParams(**one.sampling_params)
                params.normalize(None)
                params.verify(vocab)
                torch.tensor([params.sampling_seed], dtype=torch.int32)  # deterministic inference's seed tensor
        except ValueError as exc:  # http_server.generate_request -> _create_error_response
            return refused(str(exc))
        except (TypeError, RuntimeError) as exc:  # uncaught in SGLang: an internal server error
            return refused(f"{type(exc).__name__}: {exc}", status=500)
        outputs = await asyncio.gather(*(asyncio.wrap_future(engine.submit(_engine_request(one)))
                                         for one in expanded))
        items = [_item(one, out[0], state["version"]) for one, out in zip(expanded, outputs)]
        return items[0] if obj.is_single else items

    @app.post("/update_weights_from_disk")
    async def update_weights_from_disk(obj: UpdateWeightFromDiskReqInput) -> JSONResponse:
        try:
            await asyncio.to_thread(engine.update_weights_from_disk, obj.model_path)
        except Exception as exc:  # noqa: BLE001 - SGLang answers success=False
            return outcome(False, f"Failed to update weights: {exc}", num_paused_requests=0)
        if obj.weight_version is not None:
            state["version"] = obj.weight_version
        return outcome(True, "Succeeded to update model weights.", num_paused_requests=0)

    @app.post("/update_weights_from_tensor")
    async def update_weights_from_tensor(obj: UpdateWeightsFromTensorReqInput) -> JSONResponse:
        try:  # tp_worker.update_weights_from_tensor, TP rank 0
            named = MultiprocessingSerializer.deserialize(obj.serialized_named_tensors[0])
            await asyncio.to_thread(engine.update_weights_from_tensors, named)
        except Exception as exc:  # noqa: BLE001
            return outcome(False, f"{type(exc).__name__}: {exc}")
        return outcome(True, "Succeeded to update model weights.")

    @app.post("/init_weights_update_group")
    async def init_weights_update_group(obj: InitWeightsUpdateGroupReqInput) -> JSONResponse:
        def join() -> Any:  # model_runner.init_weights_update_group, TP rank 0
            # SGLang picks the keyword by `str(torch.__version__) >= "2.6"`, a string comparison that
            # is False for "2.13.0": it would pass the pre-2.6 `pg_options`. Under its own pin (torch
            # 2.8.0) it passes `backend_options`; show it that version, as its image would.
            torch.__version__ = SGLANG_TORCH
            return init_custom_process_group(backend=obj.backend, init_method=f"tcp://{obj.master_address}:"
                                             f"{obj.master_port}", world_size=obj.world_size,
                                             rank=obj.rank_offset, group_name=obj.group_name)
        try:
            state["groups"][obj.group_name] = await asyncio.to_thread(join)
        except Exception as exc:  # noqa: BLE001
            return outcome(False, f"Failed to initialize custom process group: {exc}.")
        return outcome(True, "Succeeded to initialize custom process group.")

    @app.post("/update_weights_from_distributed")
    async def update_weights_from_distributed(obj: UpdateWeightsFromDistributedReqInput) -> JSONResponse:
        group = state["groups"].get(obj.group_name)
        if group is None:
            return outcome(False, f"Group {obj.group_name} not in {list(state['groups'])}.")

        def receive() -> list[tuple[str, torch.Tensor]]:  # model_runner.update_weights_from_distributed
            weights, handles = [], []
            for name, dtype, shape in zip(obj.names, obj.dtypes, obj.shapes):
                weight = torch.empty(shape, dtype=getattr(torch, dtype))
                handles.append(dist.broadcast(weight, src=0, group=group, async_op=True))
                weights.append((name, weight))
            for handle in handles:
                handle.wait()
            return weights

        async with lock:
            weights = await asyncio.to_thread(receive)
            state["received"].update((name, w.clone()) for name, w in weights)
            await asyncio.to_thread(engine.update_weights_from_tensors, weights)
        if obj.weight_version is not None:
            state["version"] = obj.weight_version
        return outcome(True, "Succeeded to update parameter online.")

    @app.post("/destroy_weights_update_group")
    async def destroy_weights_update_group(obj: DestroyWeightsUpdateGroupReqInput) -> JSONResponse:
        group = state["groups"].pop(obj.group_name, None)
        if group is None:
            return outcome(False, "The group to be destroyed does not exist.")
        dist.destroy_process_group(group)
        return outcome(True, "Succeeded to destroy custom process group.")

    @app.get("/contract/requests")
    async def requests_seen() -> list[dict[str, Any]]:
        return state["log"]

    @app.post("/contract/received")
    async def received(request: Request) -> dict[str, Any]:
        from safetensors.torch import save_file

        path = (await request.json())["path"]
        save_file({k: v.contiguous() for k, v in state["received"].items()}, path)
        names = sorted(state["received"])
        state["received"] = {}
        return {"names": names}

    return app


def _expand(obj: GenerateReqInput) -> list[GenerateReqInput]:
    """The requests SGLang schedules, in its order: one per prompt, or n per prompt (prompt-major)."""
    if obj.is_single:
        return [obj]
    n = obj.parallel_sample_num
    singles = [obj[i] for i in range(obj.batch_size)]
    return singles if n == 1 else [one for one in singles for _ in range(n)]


def _engine_request(one: GenerateReqInput) -> GenerateRequest:
    sp = SamplingParams(**one.sampling_params)
    images = one.image_data if isinstance(one.image_data, list) else [one.image_data]
    return GenerateRequest(
        text=one.text, input_ids=one.input_ids,
        images=[decode_image(i, "image_data") for i in images if i is not None],
        sampling=EngineSampling(max_new_tokens=sp.max_new_tokens, temperature=sp.temperature, top_p=sp.top_p,
                                top_k=sp.top_k if sp.top_k < (1 << 30) else -1,
                                stop=tuple([sp.stop_strs] if isinstance(sp.stop_strs, str) else sp.stop_strs or ()),
                                seed=sp.sampling_seed, ignore_eos=sp.ignore_eos,
                                skip_special_tokens=sp.skip_special_tokens, no_stop_trim=sp.no_stop_trim),
        return_logprob=bool(one.return_logprob))


def _item(one: GenerateReqInput, sample: Any, version: str) -> dict[str, Any]:
    """tokenizer_manager._handle_batch_output's dict for one finished request."""
    meta = {"id": one.rid or uuid.uuid4().hex, "finish_reason": sample.finish_reason,
            "prompt_tokens": sample.prompt_tokens, "weight_version": version, "total_retractions": 0,
            "completion_tokens": sample.completion_tokens, "cached_tokens": 0, "e2e_latency": 0.0}
    if one.return_logprob:
        meta["input_token_logprobs"] = []
        meta["output_token_logprobs"] = [[lp, t, None] for lp, t in zip(sample.output_logprobs, sample.output_ids)]
    return {"text": sample.text, "output_ids": sample.output_ids, "meta_info": meta}


def main() -> int:
    from rollout.launcher import free_port

    # SGLang's workers live in a torch.distributed world of their own (TP); its weight-update groups
    # are created beside that default group.
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    return serve(create_app)


if __name__ == "__main__":
    sys.exit(main())
