"""Client side of a vLLM 0.30.0 server: SGLang-style calls mapped onto the routes vLLM really serves.

    bodies = completion_bodies(start, prompts, {"max_new_tokens": 64, "n": 4}, return_logprob=True, seed=7)
    samples = [s for plan, body in bodies for s in to_samples(plan, post("/v1/completions", body), version)]

Generation goes through OpenAI `/v1/completions` (vllm/entrypoints/openai/completion/protocol.py,
CompletionRequest / CompletionResponse of 0.30.0): prompts as token ids (or text), `logprobs=0` returns
the sampled tokens' log-probs per token, `return_token_ids=True` the sampled ids. Reproducible sampling:
with a seed, each (prompt, sample) is its own request with n = 1 and vLLM's per-request `seed =
sample_seed(S, prompt, j)`, the same seeds the SGLang path uses. `/v1/completions` takes no images with
token prompts (only `prompt_embeds`), so VL prompts are refused here rather than sent without images.

Weights from disk (dev mode, VLLM_SERVER_DEV_MODE=1): `/pause` → `/collective_rpc` with
`reload_weights(weights_path=...)` (gpu_model_runner.py: reloads every parameter from that checkpoint)
→ `/update_weight_version` → `/resume`. The response of a completion carries no weight version, so
samples are labelled with the version this client last pushed (None before the first push).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# SGLang sampling_params key -> vLLM CompletionRequest field; anything else is refused (never dropped).
SAMPLING_FIELDS = {
    "max_new_tokens": "max_tokens",
    "min_new_tokens": "min_tokens",
    "temperature": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",
    "min_p": "min_p",
    "stop_token_ids": "stop_token_ids",
    "ignore_eos": "ignore_eos",
    "skip_special_tokens": "skip_special_tokens",
    "repetition_penalty": "repetition_penalty",
    "n": "n",
}
# vLLM finish reasons -> the SGLang `finish_reason.type` our trainer reads.
FINISH = {"stop": "stop", "length": "length", "abort": "abort", "error": "abort"}


@dataclass(frozen=True)
class Plan:
    """Which samples one request's choices are: choice c is prompt prompts[c // n], sample first + c % n."""

    prompts: tuple[int, ...]
    n: int
    first_sample: int = 0


def sampling_fields(sampling_params: dict[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(sampling_params) - set(SAMPLING_FIELDS))
    if unknown:
        raise ValueError(f"sampling_params: {unknown} have no vLLM /v1/completions field "
                         f"(supported: {sorted(SAMPLING_FIELDS)})")
    return {SAMPLING_FIELDS[k]: v for k, v in sampling_params.items()}


def completion_bodies(start: int, prompts: list[dict[str, Any]], sampling_params: dict[str, Any],
                      return_logprob: bool, seed: int | None) -> list[tuple[Plan, dict[str, Any]]]:
    """The `/v1/completions` bodies for prompts start..start+len-1 of a generate() call."""
    from rollout.client import sample_seed

    if any(p.get("image_data") for p in prompts):
        raise ValueError("rollout.engine=vllm: vLLM 0.30.0's /v1/completions takes no images with token "
                         "prompts; use rollout.engine=sglang for VL policies")
    fields = sampling_fields(sampling_params)
    n = int(fields.pop("n", 1))
    common = {**fields, "return_token_ids": True}
    if return_logprob:
        common["logprobs"] = 0  # 0 = only the sampled token's log-prob, per token
    kind = "text" if "text" in prompts[0] else "input_ids"
    if seed is None:  # one batched request: choices come prompt-major, n per prompt
        plan = Plan(tuple(start + k for k in range(len(prompts))), n)
        return [(plan, {**common, "prompt": [p[kind] for p in prompts], "n": n})]
    return [(Plan((start + k,), 1, j), {**common, "prompt": p[kind], "n": 1, "seed": sample_seed(seed, start + k, j)})
            for k, p in enumerate(prompts) for j in range(n)]


def to_samples(plan: Plan, response: Any, weight_version: int | None) -> list[Any]:
    """Map a CompletionResponse (JSON) to Samples in prompt-then-sample order."""
    from rollout.client import RolloutRequestError, Sample

    choices = response.get("choices") if isinstance(response, dict) else None
    if not isinstance(choices, list) or len(choices) != len(plan.prompts) * plan.n:
        raise RolloutRequestError(f"/v1/completions: expected {len(plan.prompts) * plan.n} choices, got "
                                  f"{len(choices) if isinstance(choices, list) else type(response).__name__}")
    usage = response.get("usage") or {}
    samples = []
    for choice in sorted(choices, key=lambda c: c["index"]):
        c = choice["index"]
        logprobs = (choice.get("logprobs") or {}).get("token_logprobs") or []
        reason = choice.get("finish_reason")
        samples.append(Sample(
            prompt_index=plan.prompts[c // plan.n],
            sample_index=plan.first_sample + c % plan.n,
            output_ids=list(choice.get("token_ids") or []),
            text=choice.get("text", ""),
            logprobs=[float(x) for x in logprobs],
            finish_reason=FINISH.get(reason, "abort"),
            weight_version=weight_version,
            prompt_tokens=len(choice.get("prompt_token_ids") or []) or int(usage.get("prompt_tokens", 0)),
            finish_detail={"type": FINISH.get(reason, "abort"), "vllm": reason, "stop_reason": choice.get("stop_reason")},
        ))
    return samples


def disk_reload_steps(model_path: str, weight_version: int | None) -> list[tuple[str, dict[str, Any]]]:
    """The dev-mode routes, in order, that load `model_path` into a running vLLM 0.30.0 server."""
    steps: list[tuple[str, dict[str, Any]]] = [
        ("/pause?mode=wait", {}),
        ("/collective_rpc", {"method": "reload_weights", "kwargs": {"weights_path": model_path}}),
    ]
    if weight_version is not None:
        steps.append(("/update_weight_version", {"new_version": str(weight_version)}))
    return steps + [("/resume", {})]
