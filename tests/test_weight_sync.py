"""After a weight sync from a Megatron policy (TP=2, and PP=2; tensor buckets, an HF checkpoint reloaded
from disk as for SGLang/vLLM, and broadcasts over a weight-update group as SGLang's "distributed" routes),
the rollout server's log-probs of its own samples equal the policy's recomputed log-probs (≤1e-4), and
responses carry the pushed version. The collective routes also refuse bad requests naming the field,
and a group can be destroyed and joined again."""

from __future__ import annotations

import math
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from calibrl_mcore.make_tiny_model import make_tiny_model
from rollout.client import RolloutClient, RolloutRequestError
from rollout.launcher import EmbeddedServerProcess, free_port
from rollout.weight_group import broadcast_async, close_group, create_group, dtype_name
from tests.torchrun_utils import run_torchrun

pytestmark = pytest.mark.distributed


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_model("qwen2_5_vl", tmp_path_factory.mktemp("m") / "tiny", seed=0)


@pytest.mark.parametrize("tp,pp,method", [(2, 1, "tensor"), (1, 2, "tensor"), (1, 2, "disk")])
def test_server_logprobs_match_megatron_after_sync(tiny, tmp_path, tp, pp, method):
    results = run_torchrun("weight_sync_worker.py", tp * pp, tmp_path, "--model", str(tiny), "--tp", str(tp),
                           "--pp", str(pp), "--method", method, timeout=400)
    last = [r for r in results if r["last_stage"]]
    assert last, results
    for r in last:
        assert r["versions"] == [7, 7, 7]
        assert r["max_abs_diff"] <= 1e-4, r


# --------------------------------------------------------------------------------------------------
# The embedded server's collective routes, driven by hand from this process (rank 0 of the group).
# --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def server(tiny):
    with EmbeddedServerProcess(tiny) as proc:
        yield proc


def _join(client: RolloutClient, group_name: str):
    """Host `group_name` as rank 0 while the server joins it (the request runs in a thread)."""
    port = free_port()
    with ThreadPoolExecutor(1) as pool:
        answer = pool.submit(client.init_weights_update_group, "127.0.0.1", port, [1], 2, group_name, "gloo")
        group = create_group("127.0.0.1", port, 0, 2, group_name, "gloo", timeout_s=60)
        assert answer.result(timeout=60)[0]["success"]
    return group


def _send(client: RolloutClient, group, group_name: str, named: dict[str, torch.Tensor], version: int) -> dict:
    names, tensors = list(named), list(named.values())
    with ThreadPoolExecutor(1) as pool:
        answer = pool.submit(client.update_weights_from_distributed, names, [dtype_name(t.dtype) for t in tensors],
                             [list(t.shape) for t in tensors], group_name, weight_version=version)
        for work in broadcast_async(group, tensors):
            work.wait()
        return answer.result(timeout=60)[0]


def _refused(call, *args, **kwargs) -> dict:
    with pytest.raises(RolloutRequestError) as info:
        call(*args, **kwargs)
    assert 400 <= info.value.status < 500, info.value
    return info.value.body["error"]


def _greedy_logprobs(client: RolloutClient) -> list[float]:
    samples = client.generate([{"text": "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"}],
                              {"max_new_tokens": 4, "temperature": 0.0})
    return samples[0].logprobs


def test_distributed_routes_validate_and_reinit(server, tiny):
    client = RolloutClient([server.url], max_retries=0)
    weights = load_file(str(Path(tiny) / "model.safetensors"))
    vocab = weights["lm_head.weight"].shape[0]
    try:
        # Refused before any collective: each 4xx names the field.
        assert _refused(client.update_weights_from_distributed, ["lm_head.weight"], ["float32"],
                        [list(weights["lm_head.weight"].shape)], "nope")["field"] == "group_name"
        assert _refused(client.init_weights_update_group, "127.0.0.1", free_port(), [2], 2, "g",
                        "gloo")["field"] == "rank_offset"
        assert _refused(client.init_weights_update_group, "127.0.0.1", free_port(), [1], 2, "g",
                        "nccl")["field"] == "backend"  # the engine runs on the CPU

        group = _join(client, "g")
        shape = list(weights["lm_head.weight"].shape)
        bad = [(["lm_head.weight"], ["float33"], [shape], "dtypes[0]"),
               (["lm_head.weight"], ["float32"], [[shape[0] + 1, shape[1]]], "shapes[0]"),
               (["lm_head.nope"], ["float32"], [shape], "names[0]"),
               (["lm_head.weight"], ["float32", "float32"], [shape], "dtypes")]
        for names, dtypes, shapes, field in bad:
            assert _refused(client.update_weights_from_distributed, names, dtypes, shapes, "g")["field"] == field
        assert _refused(client.init_weights_update_group, "127.0.0.1", free_port(), [1], 2, "g",
                        "gloo")["field"] == "group_name"  # exists already

        # A refused request consumed no broadcast: the group still works. A zero lm_head makes every
        # token equally likely, so the server's log-probs become exactly -log(vocab).
        t0 = time.perf_counter()
        answer = _send(client, group, "g", {"lm_head.weight": torch.zeros(shape, dtype=torch.bfloat16)}, 11)
        assert answer["weight_version"] == "11" and answer["success"]
        assert client.get_model_info()[0]["weight_version"] == "11"
        assert max(abs(lp + math.log(vocab)) for lp in _greedy_logprobs(client)) < 1e-4

        # Destroy, then the name is unknown; re-initialise on a fresh port and push the whole model.
        assert client.destroy_weights_update_group("g")[0]["success"]
        close_group(group)
        assert _refused(client.destroy_weights_update_group, "g")["field"] == "group_name"
        assert _refused(client.update_weights_from_distributed, ["lm_head.weight"], ["float32"], [shape],
                        "g")["field"] == "group_name"
        group = _join(client, "g")
        t1 = time.perf_counter()
        answer = _send(client, group, "g", weights, 12)
        full_s = time.perf_counter() - t1
        assert answer["weight_version"] == "12"
        assert max(abs(lp + math.log(vocab)) for lp in _greedy_logprobs(client)) > 1e-3  # lm_head is back
        mb = sum(t.numel() * t.element_size() for t in weights.values()) / 2**20
        print(f"\ndistributed sync (gloo, loopback): {len(weights)} tensors, {mb:.2f} MB in {full_s * 1e3:.1f} ms; "
              f"first join + 1-tensor push {(t1 - t0) * 1e3:.0f} ms")
        client.destroy_weights_update_group("g")
        close_group(group)
    finally:
        client.close()


def test_refused_bucket_fails_fast_instead_of_hanging_in_the_broadcast(server):
    """The trainer broadcasts while its request is in flight; a refused request means no server will
    ever receive, so the sender must give up on the HTTP error rather than wait for the group timeout."""
    from calibrl_mcore.trainer.weight_sync import _together

    client = RolloutClient([server.url], max_retries=0)
    group = _join(client, "h")
    try:
        tensor = torch.zeros(3, 5)
        t0 = time.perf_counter()
        with pytest.raises(RolloutRequestError) as info:
            _together(lambda: client.update_weights_from_distributed(["nope.weight"], ["float32"], [[3, 5]], "h"),
                      lambda: [w.wait() for w in broadcast_async(group, [tensor])], timeout_s=120, what="test")
        assert info.value.body["error"]["field"] == "names[0]"
        assert time.perf_counter() - t0 < 30
    finally:
        client.destroy_weights_update_group("h")
        close_group(group)
        client.close()
