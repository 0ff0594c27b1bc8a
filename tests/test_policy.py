"""MegatronPolicy (single process): activation recompute leaves loss and gradients unchanged."""

from __future__ import annotations

import pytest
import torch

from calibrl_mcore.algo.aggregation import compute_loss_normalizer
from calibrl_mcore.config import ModelConfig, OptimConfig
from calibrl_mcore.make_tiny_model import make_tiny_model
from calibrl_mcore.trainer.batch import Row, chunk_by_length, collate
from calibrl_mcore.trainer.objective import sft_loss_fn
from calibrl_mcore.trainer.policy import MegatronPolicy
from model_providers.registry import position_ids


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, megatron_world):
    return make_tiny_model("qwen2_5_vl", tmp_path_factory.mktemp("m") / "tiny", seed=0)


def loss_and_grads(model_dir, recompute: str):
    policy = MegatronPolicy(ModelConfig(hf_path=str(model_dir), spec="local", recompute=recompute), OptimConfig())
    expected = None if recompute == "none" else recompute
    assert policy.model.module.language_model.config.recompute_granularity == expected
    g = torch.Generator().manual_seed(0)
    rows = [Row(uid=str(i), group_id=i, is_expert=True, prompt_ids=torch.randint(0, 700, (12,), generator=g).tolist(),
                response_ids=torch.randint(0, 700, (6 + i,), generator=g).tolist()) for i in range(4)]
    pos = lambda ids, grid, attn: position_ids(policy.hf_config, ids, grid, attn)  # noqa: E731
    mbs = [collate(rows, c, pos) for c in chunk_by_length(range(4), rows, 2)]
    norm = compute_loss_normalizer([mb.loss_mask for mb in mbs], "token-mean")
    outs = policy.run(mbs, sft_loss_fn(norm), forward_only=False)
    loss = sum(float(o["metrics"]["nll"]) for o in outs)
    grads = {n: p.main_grad.clone() for n, p in policy.model.module.named_parameters()}
    return loss, grads


@pytest.mark.parametrize("recompute", ["selective", "full"])
def test_recompute_matches_no_recompute(tiny, recompute):
    ref_loss, ref_grads = loss_and_grads(tiny, "none")
    loss, grads = loss_and_grads(tiny, recompute)
    assert loss == pytest.approx(ref_loss, rel=1e-6)
    for name, g in ref_grads.items():
        torch.testing.assert_close(grads[name], g, rtol=1e-5, atol=1e-7, msg=name)


def test_policy_rejects_fp8_without_te(tiny):
    with pytest.raises(ValueError, match="needs Transformer Engine layers"):
        MegatronPolicy(ModelConfig(hf_path=str(tiny), spec="local", fp8="tensorwise"), OptimConfig())
