"""ServerPool + RolloutClient against two real embedded servers on 127.0.0.1, one SIGKILLed and restarted.

One module-scoped pair of servers runs the whole story in order (each test leaves the state the next
one starts from): a stale answer is refused, a killed server is failed over, the probe makes the
restarted one suspect (it gets no /generate then), a push brings it back, the fleet below
min_live_servers stops with a message naming the servers.
"""

from __future__ import annotations

import os
import signal
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import torch

from rollout.client import RolloutClient, tensor_update_body
from rollout.launcher import EmbeddedServerProcess
from rollout.pool import LIVE, OUT, SUSPECT, PoolExhausted, ServerPool
from tests.test_rollout_engine import tiny_model_dir

PROMPTS = [{"text": f"count to {k}:"} for k in range(4)]
PARAMS = {"max_new_tokens": 4, "temperature": 1.0, "n": 2}


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    model = tiny_model_dir(tmp_path_factory.getbasetemp(), "qwen2_5_vl", 0)
    servers = [EmbeddedServerProcess(model, health_timeout=120, log_path=tmp_path_factory.mktemp("pool") / f"{i}.log")
               for i in range(2)]
    try:
        with ThreadPoolExecutor(2) as starting:  # both load the model at once
            list(starting.map(EmbeddedServerProcess.start, servers))
        pool = ServerPool([s.url for s in servers], probe_interval_s=0.2)
        client = RolloutClient(pool.urls, pool=pool, batch_size=1, max_retries=2, backoff=0.05)
        yield servers, pool, client
        client.close()
        pool.close()
    finally:
        for s in servers:
            s.stop()


def _weights(model_dir) -> list[tuple[str, torch.Tensor]]:
    from safetensors.torch import load_file

    return sorted(load_file(str(next(model_dir.glob("*.safetensors")))).items())


def _push(client: RolloutClient, urls: list[str], model_dir, version: int) -> dict:
    return client.post_each("/update_weights_from_tensor", tensor_update_body(_weights(model_dir), version), urls)


def _reported(url: str) -> str:
    return httpx.get(url + "/get_model_info", timeout=10).json()["weight_version"]


def test_stale_answer_is_refused_and_never_returned(fleet):
    (a, b), pool, client = fleet
    reference = client.generate(PROMPTS, PARAMS, seed=5)  # both servers, same weights ("default")
    assert pool.live() == [a.url, b.url] and {s.weight_version for s in reference} == {None}
    # the checkpoint's own weights, labelled version 1, pushed to A only: B's answers are now stale
    assert all(not isinstance(r, Exception) for r in _push(client, [a.url], Path(a.model_path), 1).values())
    pool.version = "1"
    samples = client.generate(PROMPTS, PARAMS, seed=5)
    assert pool.state(b.url) == OUT and "stale weight_version default" in pool.describe()
    assert {s.weight_version for s in samples} == {1}
    # the same request seed gives the same samples whichever server made them (same weights)
    assert [s.output_ids for s in samples] == [s.output_ids for s in reference]


def test_killed_server_fails_over_restart_is_suspect_until_resynced(fleet):
    (a, b), pool, client = fleet
    assert pool.wait_for(2, 10) == SUSPECT and pool.suspects() == [b.url]  # B answers /health: suspect
    assert _push(client, [b.url], Path(b.model_path), 1)[b.url]["success"]
    assert pool.resynced(b.url, _reported(b.url)) and pool.live() == [a.url, b.url] and pool.resyncs == 1
    failures = pool.failures
    os.killpg(b.process.pid, signal.SIGKILL)
    b.process.wait()
    samples = client.generate(PROMPTS, PARAMS, seed=6)
    assert len(samples) == 8 and {s.weight_version for s in samples} == {1}
    assert pool.state(b.url) == OUT and pool.failures == failures + 1 and "ConnectError" in pool.describe()
    b.start()  # its supervisor restarts it: the checkpoint's weights, version "default"
    assert pool.wait_for(2, 30) == SUSPECT
    client.generate(PROMPTS, PARAMS, seed=7)  # a suspect gets no /generate: its "default" answer would mark it out
    assert pool.state(b.url) == SUSPECT and _reported(b.url) == "default"
    assert not pool.resynced(b.url, _reported(b.url))  # not yet pushed: it must not come back
    assert pool.state(b.url) == OUT and "after the push of '1'" in pool.describe()


def test_below_min_live_stops_naming_servers(fleet):
    (a, b), pool, client = fleet
    pool.mark_out(a.url, "ReadTimeout('simulated')")
    os.killpg(b.process.pid, signal.SIGKILL)
    b.process.wait()
    pool.mark_out(b.url, "ConnectError('refused')")
    with pytest.raises(PoolExhausted, match=r"0 of 2 .*min_live_servers=1, .*recovery_timeout_s=0.5") as info:
        pool.wait_for(1, 0.5, until_suspect=False)
    assert a.url in str(info.value) and "ConnectError('refused')" in str(info.value)
    assert pool.metrics()["rollout/live_servers"] == 0.0
    assert pool.state(a.url) in (OUT, SUSPECT) and pool.state(a.url) != LIVE
