"""vLLM 0.30.0's HTTP front, from vLLM's own code, in front of our embedded engine: the contract stand-in.

    python -m tests.contract.vllm_front --model TINY_HF_DIR --port P

A real vLLM server needs a GPU (its wheel is CUDA-only); its HTTP layer does not. This process mounts
vLLM's own dev-mode routers (vllm/entrypoints/serve/dev/rlhf/api_router.py: /pause, /resume,
/update_weight_version, ...; serve/dev/rpc/api_router.py: /collective_rpc) and its exception handlers
(serve/exception_handling/register.py: 400 for validation errors, ErrorResponse bodies), over an engine
client that implements vllm/engine/protocol.py's methods on the embedded engine. `/v1/completions` is
declared with vLLM's `CompletionRequest` (pydantic validates bodies as the real route does), turned into
vLLM's `SamplingParams` with `to_sampling_params` (which verifies them), answered as a
`CompletionResponse` built from vLLM's classes. `collective_rpc("reload_weights", weights_path=...)`
loads the checkpoint as gpu_model_runner.reload_weights does. `/version` reports vLLM's own version.
Test route: GET /contract/requests (every request's route and status).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
import uuid
from typing import Any

from tests.contract.launch import serve
from tests.contract.vllm_env import TARGET

sys.path.append(str(TARGET))  # after the venv: our torch / transformers win

from fastapi import FastAPI, Request  # noqa: E402
from vllm import version as vllm_version  # noqa: E402
from vllm.entrypoints.openai.completion.protocol import (  # noqa: E402
    CompletionLogProbs,
    CompletionRequest,
    CompletionResponse,
    CompletionResponseChoice,
)
from vllm.entrypoints.serve.dev.rlhf.api_router import router as rlhf_router  # noqa: E402
from vllm.entrypoints.serve.dev.rpc.api_router import router as rpc_router  # noqa: E402
from vllm.entrypoints.serve.engine.protocol import UsageInfo  # noqa: E402
from vllm.entrypoints.serve.exception_handling.register import init_exception_handler  # noqa: E402

from rollout.engines.base import GenerateRequest  # noqa: E402
from rollout.engines.base import SamplingParams as EngineSampling

DEFAULT_MAX_TOKENS = 16  # OpenAI's and vLLM's default for /v1/completions


class EngineClient:
    """The methods of vllm/engine/protocol.py's EngineClient that the dev routers call."""

    def __init__(self, engine: Any) -> None:
        self.engine, self.version, self.paused = engine, "0", False

    async def pause_generation(self, *, mode: str = "abort", wait_for_inflight_requests: bool = False,
                               clear_cache: bool = True) -> None:
        self.paused = True

    async def resume_generation(self) -> None:
        self.paused = False

    async def is_paused(self) -> bool:
        return self.paused

    async def collective_rpc(self, method: str, timeout: float | None = None, args: tuple = (),
                             kwargs: dict | None = None) -> list[Any]:
        if method != "reload_weights":
            raise NotImplementedError(f"collective_rpc {method!r} is not served by the contract front")
        # gpu_model_runner.reload_weights(weights_iterator=None, weights_path=..., is_checkpoint_format=True)
        path = (kwargs or {}).get("weights_path") or (args[1] if len(args) > 1 else None)
        await asyncio.to_thread(self.engine.update_weights_from_disk, path or self.engine.model_path)
        return [None]  # one result per worker; reload_weights returns None

    async def update_weight_version(self, new_version: str) -> None:
        self.version = new_version

    async def get_weight_version(self) -> str:
        return self.version


def create_app(engine: Any) -> FastAPI:
    app = FastAPI()
    app.state.engine_client = client = EngineClient(engine)
    app.state.args = argparse.Namespace(log_error_stack=False)  # `vllm serve`'s CLI args; the handlers read it
    init_exception_handler(app)
    app.include_router(rlhf_router)
    app.include_router(rpc_router)
    log: list[dict[str, Any]] = []

    @app.middleware("http")
    async def record(request: Request, call_next):
        response = await call_next(request)
        if not request.url.path.startswith("/contract"):
            log.append({"route": request.url.path, "status": response.status_code})
        return response

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {}

    @app.get("/version")
    async def version() -> dict[str, str]:
        return {"version": vllm_version.__version__}

    @app.post("/v1/completions")
    async def completions(request: CompletionRequest) -> Any:
        if client.paused:
            raise ValueError("engine is paused")  # the real engine holds or aborts; our client never races it
        params = request.to_sampling_params(request.max_tokens or DEFAULT_MAX_TOKENS)  # verifies the fields
        prompts = request.prompt if isinstance(request.prompt, list) and request.prompt and isinstance(
            request.prompt[0], (list, str)) else [request.prompt]
        jobs = [engine.submit(_engine_request(p, params, j, request.logprobs is not None))
                for p in prompts for j in range(params.n)]
        outs = [o[0] for o in await asyncio.gather(*(asyncio.wrap_future(f) for f in jobs))]
        choices = [_choice(i, out, request) for i, out in enumerate(outs)]
        prompt_tokens = sum(o.prompt_tokens for o in outs[::params.n])
        completion_tokens = sum(o.completion_tokens for o in outs)
        return CompletionResponse(
            id=f"cmpl-{uuid.uuid4().hex}", created=int(time.time()), model=request.model or engine.model_path,
            choices=choices, usage=UsageInfo(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                                             total_tokens=prompt_tokens + completion_tokens))

    @app.get("/contract/requests")
    async def requests_seen() -> list[dict[str, Any]]:
        return log

    return app


def _engine_request(prompt: Any, params: Any, sample: int, logprobs: bool) -> GenerateRequest:
    # vLLM's per-request seed drives the n samples from one generator; the engine draws sample `sample`
    # of a seeded request from hash((seed, sample)), so the n samples differ as they do in vLLM.
    sampling = EngineSampling(max_new_tokens=params.max_tokens, temperature=params.temperature, top_p=params.top_p,
                              top_k=params.top_k if params.top_k > 0 else -1,
                              stop_token_ids=tuple(params.stop_token_ids or ()),
                              seed=None if params.seed is None else params.seed + sample,
                              ignore_eos=params.ignore_eos, skip_special_tokens=params.skip_special_tokens)
    text, ids = (prompt, None) if isinstance(prompt, str) else (None, list(prompt))
    return GenerateRequest(text=text, input_ids=ids, sampling=sampling, return_logprob=logprobs)


def _choice(index: int, out: Any, request: CompletionRequest) -> CompletionResponseChoice:
    finish = out.finish_reason.get("type")
    logprobs = None
    if request.logprobs is not None:
        tokens = [f"token_id:{t}" for t in out.output_ids]
        logprobs = CompletionLogProbs(text_offset=list(range(len(tokens))), token_logprobs=out.output_logprobs,
                                      tokens=tokens, top_logprobs=[{} for _ in tokens])
    matched = out.finish_reason.get("matched")
    return CompletionResponseChoice(index=index, text=out.text, logprobs=logprobs,
                                    finish_reason="length" if finish == "length" else "stop",
                                    stop_reason=matched if isinstance(matched, (int, str)) else None,
                                    token_ids=out.output_ids if request.return_token_ids else None)


if __name__ == "__main__":
    sys.exit(serve(create_app))
