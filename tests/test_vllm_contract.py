"""The vLLM rollout path against vLLM 0.30.0's own code (the version the `gpu` extra pins).

vLLM's Python code is installed for the tests only (tests/contract/vllm_env.py) and runs in its own
process, tests/contract/vllm_front.py: vLLM's `CompletionRequest` / `CompletionResponse`, its dev-mode
rlhf and rpc routers and its exception handlers, in front of our embedded engine for the tokens.
Checked here: what rollout/vllm_adapter.py sends (generation with n, seeds, logprobs; the disk weight
reload) is accepted on the first try and vLLM-shaped answers map to the same Samples as SGLang's.
"""

from __future__ import annotations

import httpx
import pytest

from rollout.client import RolloutClient, RolloutRequestError
from tests.contract.launch import front
from tests.contract.vllm_env import ensure_installed


@pytest.fixture(scope="module")
def tiny(tiny_checkpoints):
    return tiny_checkpoints["qwen2_5_vl"]


@pytest.fixture(scope="module")
def vllm(tiny, tmp_path_factory):
    """vLLM's front (tests/contract/vllm_front.py) on a free loopback port."""
    ensure_installed()
    with front("tests.contract.vllm_front", tiny, tmp_path_factory.mktemp("vllm") / "front.log") as url:
        yield url


def test_client_drives_vllm_routes_on_first_try(vllm, tiny):
    seen = len(httpx.get(vllm + "/contract/requests").json())
    client = RolloutClient([vllm], batch_size=2, max_retries=0)
    try:
        client.check_servers()
        assert client.engine == "vllm"  # detected from /version (no /get_model_info)
        prompts = [{"input_ids": [5, 6, 7]}, {"input_ids": [8, 9]},
                   {"text": "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"}]
        params = {"max_new_tokens": 6, "temperature": 1.0, "top_p": 1.0, "top_k": -1, "n": 3,
                  "stop_token_ids": [2]}
        first = client.generate(prompts, params, seed=11)
        again = client.generate(prompts, params, seed=11)
        assert [(s.prompt_index, s.sample_index) for s in first] == [(p, j) for p in range(3) for j in range(3)]
        assert [s.output_ids for s in first] == [s.output_ids for s in again]  # reproducible per-request seeds
        assert len({tuple(s.output_ids) for s in first[:3]}) > 1  # yet the n samples differ
        assert all(len(s.logprobs) == len(s.output_ids) > 0 and s.finish_reason in ("stop", "length")
                   for s in first)
        assert all(s.weight_version is None and s.prompt_tokens > 0 for s in first)
        batched = client.generate(prompts[:2], {"max_new_tokens": 4, "n": 2})  # unseeded: one request, n=2
        assert [(s.prompt_index, s.sample_index) for s in batched] == [(0, 0), (0, 1), (1, 0), (1, 1)]
        assert client.update_weights_from_disk(str(tiny), weight_version=3)[0]["success"]
        assert httpx.get(vllm + "/weight_info").json() == {"weight_version": "3"}
        assert client.generate(prompts[:1], {"max_new_tokens": 2})[0].weight_version == 3
        with pytest.raises(ValueError, match="no images with token prompts"):
            client.generate([{"input_ids": [1], "image_data": ["x"]}], {"max_new_tokens": 2})
        with pytest.raises(ValueError, match=r"\['no_stop_trim'\] have no vLLM"):
            client.generate(prompts[:1], {"no_stop_trim": True})
    finally:
        client.close()
    routes = httpx.get(vllm + "/contract/requests").json()[seen:]
    assert {r["route"] for r in routes} >= {"/v1/completions", "/pause", "/collective_rpc",
                                             "/update_weight_version", "/resume"}
    assert not [r for r in routes if r["status"] != 200 and r["route"] != "/get_model_info"], routes
    # vLLM's own validation refuses, and our error names the route, the field and vLLM's message.
    bad = RolloutClient([vllm], max_retries=0)
    bad.engine = "vllm"
    try:
        with pytest.raises(RolloutRequestError, match=r"/v1/completions.*top_p"):
            bad.generate([{"input_ids": [1]}], {"top_p": 7.0})
    finally:
        bad.close()


def test_vllm_start_checks():
    from calibrl_mcore.trainer.weight_sync import sync_method
    from rollout.engines.vllm import check_vllm

    assert sync_method("auto", "vllm") == sync_method("disk", "vllm") == "disk"
    for method in ("tensor", "distributed"):
        with pytest.raises(ValueError, match="NCCL weight-transfer engine is not driven"):
            sync_method(method, "vllm")
    check_vllm("http://h:1", "0.30.0")
    check_vllm("http://h:1", "0.31.0+cu130")
    with pytest.raises(ValueError, match=r"vLLM 0\.10\.2.*need vllm>=0\.30\.0"):
        check_vllm("http://h:1", "0.10.2")
