"""HTTP client of the rollout API (embedded engine or a real SGLang server: same routes).

    client = RolloutClient(["http://127.0.0.1:30000"], api_key="K")
    samples = client.generate([{"text": prompt, "image_data": [b64_png]}], {"max_new_tokens": 256, "n": 8})

Prompts are sent as batched `/generate` requests of up to `batch_size` prompts, up to `max_concurrency`
at once, round-robin over the servers, so each engine sees many rows to batch. Connection errors,
timeouts and 5xx answers are retried with exponential backoff on the next server; 4xx answers are the
caller's mistake and raise at once, naming the route, the field and the server's message.

Every request is shaped as SGLang (the pinned version, see tests/contract/) accepts it:
- always the batch form; `image_data` is a list of image lists, `[]` for a prompt without images
  (SGLang infers the nesting from entry 0 alone, so a `None` first entry would break the rest);
- reproducible sampling without SGLang's missing `seed`: `generate(..., seed=S)` sends each of the n
  samples of a prompt as its own entry with n = 1 and `sampling_seed = sample_seed(S, prompt, j)`
  (SGLang applies one `sampling_seed` to all n samples of an entry, and only with
  `--enable-deterministic-inference`; the embedded engine always honours it);
- `weight_version` is a string on the wire and comes back as one.

With a `ServerPool` (rollout/pool.py) generation goes to live servers only: a server whose request fails
(after its connection or 5xx) or whose answer carries another `weight_version` than the pool's current
one is marked out and the chunk goes to the next live server; the stale answer is dropped, never returned.
"""

from __future__ import annotations

import base64
import io
import itertools
import threading
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import httpx

from rollout.pool import ServerPool

_RETRYABLE = (httpx.TransportError,)  # connect/read/write errors and timeouts


class RolloutRequestError(RuntimeError):
    """The server refused a request (4xx), or all retries failed."""

    def __init__(self, message: str, status: int | None = None, body: Any = None, field: str | None = None) -> None:
        super().__init__(message)
        self.status, self.body, self.field = status, body, field


def server_error(url: str, route: str, response: httpx.Response) -> RolloutRequestError:
    """One line naming the route, the field (where the server names one) and the server's message, from
    any of the error shapes in use: ours {"error": {"field", "message"}}, OpenAI/vLLM {"error": {"message",
    "param"}}, SGLang's ErrorResponse {"message"} and {"success": false, "message"}, FastAPI {"detail"}."""
    body = _json_or_text(response)
    field, message = None, body if isinstance(body, str) else None
    if isinstance(body, dict):
        error = body.get("error") if isinstance(body.get("error"), dict) else body
        field = error.get("field") or error.get("param")
        message = error.get("message") or body.get("detail") or str(body)
        if isinstance(message, list) and message and isinstance(message[0], dict):  # FastAPI's detail list
            field = field or ".".join(str(x) for x in message[0].get("loc", [])[1:])
            message = message[0].get("msg")
    if field and isinstance(message, str):
        message = message.removeprefix(f"{field}: ")
    where = f" field {field!r}:" if field else ""
    return RolloutRequestError(f"{url}{route}: HTTP {response.status_code}:{where} {message}",
                               response.status_code, body, field)


_MASK31 = (1 << 31) - 1


def sample_seed(seed: int, prompt_index: int, sample_index: int) -> int:
    """The `sampling_seed` of sample j of prompt p under request seed S: a 31-bit mix (SGLang keeps
    seeds in an int32 tensor), so samples and prompts get unrelated streams on any server."""
    x = (seed * 0x9E3779B97F4A7C15 + prompt_index * 0xBF58476D1CE4E5B9 + sample_index * 0x94D049BB133111EB) % 2**64
    x = ((x ^ (x >> 31)) * 0xD6E8FEB86659FD93) % 2**64
    return (x ^ (x >> 32)) & _MASK31


@dataclass
class Sample:
    """One completion of one prompt."""

    prompt_index: int
    sample_index: int
    output_ids: list[int]
    text: str
    logprobs: list[float]  # log p of each output id under the raw distribution (empty without logprobs)
    finish_reason: str  # "stop" | "length" | "abort"
    weight_version: int | None
    prompt_tokens: int
    finish_detail: dict[str, Any] = field(default_factory=dict)  # SGLang's full finish_reason object


def encode_image(image: Any) -> str:
    """PIL image or raw bytes -> base64 string for `image_data`."""
    if isinstance(image, bytes):
        return base64.b64encode(image).decode()
    if isinstance(image, str):
        return image
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


class RolloutClient:
    def __init__(
        self,
        urls: list[str],
        api_key: str | None = None,
        timeout: float = 600.0,
        max_retries: int = 4,
        backoff: float = 0.5,
        batch_size: int = 8,
        max_concurrency: int = 16,
        pool: ServerPool | None = None,
    ) -> None:
        if not urls:
            raise ValueError("urls: need at least one server")
        self.urls = [u.rstrip("/") for u in urls]
        self.pool = pool
        self.max_retries, self.backoff, self.batch_size = max_retries, backoff, batch_size
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        limits = httpx.Limits(max_connections=max_concurrency * 2, max_keepalive_connections=max_concurrency)
        self._http = httpx.Client(headers=headers, timeout=timeout, limits=limits)
        self._pool = ThreadPoolExecutor(max_workers=max_concurrency, thread_name_prefix="rollout-client")
        self._cycle = itertools.cycle(range(len(self.urls)))
        self._cycle_lock = threading.Lock()
        self.engine = "sglang"  # check_servers() switches to "vllm" when the servers answer like vLLM
        self.weight_version: int | None = None  # last version pushed: vLLM's completions do not report it

    # ----------------------------------------------------------------------------------------------
    def generate(
        self, prompts: list[dict[str, Any]], sampling_params: dict[str, Any], return_logprob: bool = True,
        seed: int | None = None,
    ) -> list[Sample]:
        """Sample `sampling_params["n"]` completions per prompt; results in prompt order, then sample order.

        Each prompt is {"text": str} or {"input_ids": [int]}, optionally with "image_data": a list of
        base64 strings / PIL images / bytes. `seed` makes the samples reproducible (see the module doc).
        """
        if "seed" in sampling_params or "sampling_seed" in sampling_params:
            raise ValueError("sampling_params: pass the seed as generate(seed=...); SGLang has no 'seed' and "
                             "its 'sampling_seed' applies to all n samples of a prompt")
        chunks = list(self._chunks(prompts))
        futures = [self._pool.submit(self._generate_chunk, start, batch, sampling_params, return_logprob, seed)
                   for start, batch in chunks]
        samples = [s for f in futures for s in f.result()]
        return samples

    def _chunks(self, prompts: list[dict[str, Any]]) -> Iterable[tuple[int, list[dict[str, Any]]]]:
        """Consecutive prompts of one kind (text / input_ids), at most batch_size each."""
        start = 0
        while start < len(prompts):
            kind = "text" if "text" in prompts[start] else "input_ids"
            end = start + 1
            while end < len(prompts) and end - start < self.batch_size and (kind in prompts[end]):
                end += 1
            yield start, prompts[start:end]
            start = end

    def _generate_chunk(
        self, start: int, prompts: list[dict[str, Any]], sampling_params: dict[str, Any], return_logprob: bool,
        seed: int | None,
    ) -> list[Sample]:
        if self.engine == "vllm":
            from rollout import vllm_adapter

            bodies = vllm_adapter.completion_bodies(start, prompts, sampling_params, return_logprob, seed)
            return [s for plan, body in bodies
                    for s in vllm_adapter.to_samples(plan, self._post("/v1/completions", body), self.weight_version)]
        payload = generate_payload(start, prompts, sampling_params, return_logprob, seed)
        items = self._post("/generate", payload, accept=self._stale)
        n = int(sampling_params.get("n", 1))
        if not isinstance(items, list) or len(items) != len(prompts) * n:
            raise RolloutRequestError(f"/generate: expected a list of {len(prompts) * n} samples, got "
                                      f"{len(items) if isinstance(items, list) else type(items).__name__}")
        return [_to_sample(start + k // n, k % n, item) for k, item in enumerate(items)]

    # ----------------------------------------------------------------------------------------------
    def update_weights_from_disk(self, model_path: str, weight_version: int | None = None) -> list[dict[str, Any]]:
        """Tell every server to load weights from `model_path` (a path on the servers' machines)."""
        if self.engine == "vllm":
            return [self._vllm_reload(url, model_path, weight_version) for url in self.urls]
        body = disk_update_body(model_path, weight_version)
        return [self._post("/update_weights_from_disk", body, url=url) for url in self.urls]

    def update_weights_from_tensors(
        self, named_tensors: Iterable[tuple[str, Any]], weight_version: int | None = None
    ) -> list[dict[str, Any]]:
        """Push (HF name, tensor) pairs to every embedded server as one safetensors payload (base64 in
        SGLang's UpdateWeightsFromTensorReqInput fields, load_format "safetensors": embedded servers only)."""
        body = tensor_update_body(named_tensors, weight_version)
        return [self._post("/update_weights_from_tensor", body, url=url) for url in self.urls]

    def _vllm_reload(self, url: str, model_path: str, weight_version: int | None) -> dict[str, Any]:
        """vLLM's dev-mode disk reload on one server (rollout/vllm_adapter.py: pause, reload, version, resume)."""
        from rollout.vllm_adapter import disk_reload_steps

        replies = [self._post(route, body, url=url) for route, body in disk_reload_steps(model_path, weight_version)]
        self.weight_version = weight_version
        return {"success": True, "message": str(replies)}

    def push_disk_each(self, model_path: str, weight_version: int, urls: list[str]) -> dict[str, Any]:
        """`update_weights_from_disk` on each of `urls` at once: url -> its reply, or the exception that ended
        its retries (as `post_each`; vLLM servers through their own reload routes)."""
        if self.engine != "vllm":
            return self.post_each("/update_weights_from_disk", disk_update_body(model_path, weight_version), urls)
        futures = {url: self._pool.submit(self._vllm_reload, url, model_path, weight_version) for url in urls}
        return {url: _result_or_error(future) for url, future in futures.items()}

    def post_each(self, route: str, body: dict[str, Any], urls: list[str]) -> dict[str, Any]:
        """POST one body to each of `urls` at once (each retried on itself): url -> its reply, or the
        exception that ended its retries (a fleet's push goes on past a dead server)."""
        futures = {url: self._pool.submit(self._post, route, body, url) for url in urls}
        return {url: _result_or_error(future) for url, future in futures.items()}

    # Weight sync over a collective (SGLang's routes; rollout/weight_group.py). The caller is rank 0
    # of the group and must join it while these requests are in flight: call them from a thread.
    # `urls`: the servers of the group (default: all), e.g. a fleet's live ones.
    def server_ranks(self, urls: list[str] | None = None) -> list[int]:
        """Ranks each server contributes to a weight-update group: SGLang's `tp_size` from
        `/get_server_info` (its workers join as rank_offset + tp_rank); 1 where the route is missing
        (the embedded server)."""
        ranks = []
        for url in urls or self.urls:
            try:
                response = self._http.get(url + "/get_server_info", timeout=30.0)
                info = response.json() if response.status_code == 200 else {}
            except (httpx.HTTPError, ValueError):
                info = {}
            ranks.append(int(info.get("tp_size", 1)) if isinstance(info, dict) else 1)
        return ranks

    def init_weights_update_group(
        self, master_address: str, master_port: int, rank_offsets: list[int], world_size: int,
        group_name: str = "weight_update_group", backend: str = "nccl", urls: list[str] | None = None,
    ) -> list[dict[str, Any]]:
        """Every server joins the group as ranks rank_offsets[i]...; all requests go out at once
        (the rendezvous needs every rank), and this returns when all servers answered."""
        urls = urls or self.urls
        if len(rank_offsets) != len(urls):
            raise ValueError(f"rank_offsets: {len(rank_offsets)} entries for {len(urls)} servers")
        return self._post_all("/init_weights_update_group", [
            {"master_address": master_address, "master_port": master_port, "rank_offset": offset,
             "world_size": world_size, "group_name": group_name, "backend": backend} for offset in rank_offsets],
            urls)

    def update_weights_from_distributed(
        self, names: list[str], dtypes: list[str], shapes: list[list[int]], group_name: str = "weight_update_group",
        flush_cache: bool = True, weight_version: int | None = None, urls: list[str] | None = None,
    ) -> list[dict[str, Any]]:
        """Announce a bucket to every server; rank 0 then broadcasts one tensor per name, in order."""
        body: dict[str, Any] = {"names": names, "dtypes": dtypes, "shapes": shapes, "group_name": group_name,
                                "flush_cache": flush_cache}
        if weight_version is not None:
            body["weight_version"] = str(weight_version)  # SGLang keeps versions as strings
        urls = urls or self.urls
        return self._post_all("/update_weights_from_distributed", [body] * len(urls), urls)

    def destroy_weights_update_group(self, group_name: str = "weight_update_group",
                                     urls: list[str] | None = None) -> list[dict[str, Any]]:
        urls = urls or self.urls
        return self._post_all("/destroy_weights_update_group", [{"group_name": group_name}] * len(urls), urls)

    def _post_all(self, route: str, bodies: list[dict[str, Any]], urls: list[str]) -> list[dict[str, Any]]:
        """POST bodies[i] to urls[i], all at once (no retries: a half-joined collective cannot be redone)."""
        futures = [self._pool.submit(self._post, route, body, url, 0) for url, body in zip(urls, bodies)]
        return [f.result() for f in futures]

    def get_model_info(self) -> list[dict[str, Any]]:
        """`GET /get_model_info` of every server (the embedded one reports its `device`)."""
        infos = []
        for url in self.urls:
            response = self._http.get(url + "/get_model_info", timeout=30.0)
            if response.status_code >= 400:
                raise server_error(url, "/get_model_info", response)
            infos.append(response.json())
        return infos

    def check_servers(self) -> None:
        """Before the first request: every server speaks the rollout API (SGLang's routes) or, all of
        them, vLLM's (it answers /version but has no /get_model_info; rollout/vllm_adapter.py drives it)."""
        kinds, sglang = set(), set()
        for url in self.urls:
            try:
                if self._http.get(url + "/get_model_info", timeout=30.0).status_code != 404:
                    sglang.add(url)
                    continue
                is_vllm = self._http.get(url + "/version", timeout=30.0).status_code == 200
            except httpx.HTTPError:
                continue  # unreachable now: the retries and the server pool deal with it
            if is_vllm:
                from rollout.engines.vllm import check_vllm

                check_vllm(url, self._http.get(url + "/version", timeout=30.0).json().get("version", ""))
                kinds.add(url)
                continue
            raise RolloutRequestError(f"{url}: no /get_model_info: not an SGLang-API rollout server")
        if kinds and sglang:  # servers unreachable now count as neither
            raise RolloutRequestError(f"rollout.urls: {sorted(kinds)} are vLLM, the others SGLang-API; use one kind")
        if kinds:
            self.engine = "vllm"

    def health(self, urls: list[str] | None = None) -> dict[str, bool]:
        result = {}
        for url in urls or self.urls:
            try:
                result[url] = self._http.get(url + "/health", timeout=5.0).status_code == 200
            except httpx.HTTPError:
                result[url] = False
        return result

    def reported_weight_version(self, url: str) -> str | None:
        """The `weight_version` the server at `url` reports now (None: unreachable or not reported): SGLang's
        `/get_model_info`, vLLM's dev-mode `/weight_info`."""
        try:
            response = self._http.get(url + ("/weight_info" if self.engine == "vllm" else "/get_model_info"),
                                      timeout=30.0)
            return response.json().get("weight_version") if response.status_code == 200 else None
        except (httpx.HTTPError, ValueError, AttributeError):
            return None

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        self._http.close()

    def __enter__(self) -> RolloutClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ----------------------------------------------------------------------------------------------
    def _next_url(self) -> str:
        if self.pool is not None:
            url = self.pool.pick()
            if url is None:
                raise RolloutRequestError(f"no live rollout server: {self.pool.describe()}")
            return url
        with self._cycle_lock:
            return self.urls[next(self._cycle)]

    def _stale(self, items: Any) -> str | None:
        """Why a /generate answer must be dropped: a sample made with other weights than the current ones."""
        if self.pool is None or not isinstance(items, list):
            return None
        versions = {(item.get("meta_info") or {}).get("weight_version") for item in items if isinstance(item, dict)}
        stale = sorted(str(v) for v in versions if not self.pool.is_current(v))
        return f"stale weight_version {', '.join(stale)} (current {self.pool.version or 'default'!r})" if stale else None

    def _post(self, route: str, body: Any, url: str | None = None, max_retries: int | None = None,
              accept: Any = None) -> Any:
        """POST with retries; a pinned `url` is retried on itself, otherwise on the next server (with a pool:
        the next live one, and the failed one is marked out). `accept(reply)` -> a reason to refuse it."""
        last_error: Exception | None = None
        max_retries = self.max_retries if max_retries is None else max_retries
        for attempt in range(max_retries + 1):
            target = url or self._next_url()
            try:
                response = self._http.post(target + route, json=body)
            except _RETRYABLE as exc:
                last_error = exc
            else:
                reply = _json_or_text(response) if response.status_code < 400 else None
                if isinstance(reply, dict) and reply.get("success") is False:  # SGLang's refusal shape
                    raise RolloutRequestError(f"{target}{route}: {reply.get('message')}", response.status_code, reply)
                refused = accept(reply) if accept is not None and response.status_code < 400 else None
                if response.status_code < 400 and refused is None:
                    return reply
                if response.status_code < 500 and refused is None:
                    raise server_error(target, route, response)
                last_error = RolloutRequestError(f"{target}{route}: {refused}") if refused else \
                    server_error(target, route, response)
            if url is None and self.pool is not None:
                self.pool.mark_out(target, f"{route}: {last_error!r}")
                continue  # the next live server right away: this one is out until it is re-synced
            if attempt < max_retries:
                time.sleep(self.backoff * (2**attempt))
        raise RolloutRequestError(f"{route}: gave up after {max_retries + 1} attempts: {last_error!r}")


def _result_or_error(future: Any) -> Any:
    try:
        return future.result()
    except (RolloutRequestError, httpx.HTTPError) as exc:
        return exc


def disk_update_body(model_path: str, weight_version: int | None) -> dict[str, Any]:
    body: dict[str, Any] = {"model_path": model_path}
    if weight_version is not None:
        body["weight_version"] = str(weight_version)  # SGLang: Optional[str]; an int is a 400
    return body


def tensor_update_body(named_tensors: Iterable[tuple[str, Any]], weight_version: int | None) -> dict[str, Any]:
    """One `/update_weights_from_tensor` body: the tensors as one base64 safetensors payload."""
    from safetensors.torch import save

    tensors, seen = {}, set()
    for name, tensor in named_tensors:
        tensor = tensor.detach().cpu().contiguous()
        if tensor.untyped_storage().data_ptr() in seen:  # tied weights: safetensors refuses shared storage
            tensor = tensor.clone()
        seen.add(tensor.untyped_storage().data_ptr())
        tensors[name] = tensor
    body: dict[str, Any] = {"serialized_named_tensors": [base64.b64encode(save(tensors)).decode()],
                            "load_format": "safetensors", "flush_cache": True}
    if weight_version is not None:
        body["weight_version"] = str(weight_version)
    return body


def _json_or_text(response: httpx.Response) -> Any:
    try:
        return response.json()
    except ValueError:
        return response.text


def generate_payload(start: int, prompts: list[dict[str, Any]], sampling_params: dict[str, Any],
                     return_logprob: bool, seed: int | None) -> dict[str, Any]:
    """The `/generate` body of one chunk (prompts start..start+len-1 of the call), see the module doc."""
    kind = "text" if "text" in prompts[0] else "input_ids"
    n = int(sampling_params.get("n", 1))
    entries = [(k, None) for k in range(len(prompts))]
    params: dict[str, Any] | list[dict[str, Any]] = dict(sampling_params)
    if seed is not None:  # n entries per prompt (prompt-major, as SGLang orders n > 1), each with its seed
        entries = [(k, j) for k in range(len(prompts)) for j in range(n)]
        params = [{**sampling_params, "n": 1, "sampling_seed": sample_seed(seed, start + k, j)} for k, j in entries]
    payload: dict[str, Any] = {kind: [prompts[k][kind] for k, _ in entries], "sampling_params": params,
                               "return_logprob": return_logprob}
    if any(p.get("image_data") for p in prompts):
        images = [[encode_image(i) for i in p.get("image_data") or []] for p in prompts]
        payload["image_data"] = [images[k] for k, _ in entries]
    return payload


def _to_sample(prompt_index: int, sample_index: int, item: dict[str, Any]) -> Sample:
    meta = item.get("meta_info", {})
    finish = meta.get("finish_reason") or {}
    triples = meta.get("output_token_logprobs") or []
    return Sample(
        prompt_index=prompt_index,
        sample_index=sample_index,
        output_ids=list(item.get("output_ids", [])),
        text=item.get("text", ""),
        logprobs=[float(t[0]) for t in triples],
        finish_reason=finish.get("type", "abort") if isinstance(finish, dict) else str(finish),
        weight_version=_as_int(meta.get("weight_version")),  # our pushes label versions "1", "2", ...
        prompt_tokens=int(meta.get("prompt_tokens", 0)),
        finish_detail=finish if isinstance(finish, dict) else {},
    )


def _as_int(value: Any) -> int | None:
    try:
        return None if value is None else int(value)
    except (TypeError, ValueError):
        return None  # SGLang reports weight_version as a free-form string
