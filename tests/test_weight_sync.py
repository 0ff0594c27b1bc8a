"""After a weight sync from a Megatron policy (TP=2, and PP=2; tensor buckets, and an HF checkpoint
reloaded from disk as for SGLang/vLLM), the rollout server's log-probs of its own samples equal the
policy's recomputed log-probs (≤1e-4), and responses carry the pushed version."""

from __future__ import annotations

import pytest

from tests.torchrun_utils import run_torchrun
from tools.make_tiny_model import make_tiny_model

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
