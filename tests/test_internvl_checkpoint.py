"""InternVL3 distributed checkpoints (Megatron `dist_checkpointing`, the trainer's checkpoint format).

Saved at TP=2 (tiny random checkpoints from calibrl_mcore.make_tiny_model, plus seeded noise so that default inits
cannot hide a missed tensor), reloaded at TP=1 and TP=2: every parameter, gathered over TP to HF names,
must equal the saved weights bit for bit. At save time every TP-replicated tensor (InternViT's class and
position embeddings, patch-embedding conv, norms, layer scales, ...) must carry a replica id that differs
per TP rank (Megatron's (0, tp_rank, dp_rank)); identical ids on every TP rank are rejected by
`dist_checkpointing.save`. Worker: tests/workers/internvl_ckpt_worker.py.
"""

from __future__ import annotations

import pytest

from tests.torchrun_utils import run_torchrun

WORKER = "internvl_ckpt_worker.py"
EMBEDDINGS = ("class_embedding", "position_embedding", "patch_embedding.weight", "patch_embedding.bias")


@pytest.mark.distributed
@pytest.mark.parametrize("variant", ["plain", "qk_norm"])
def test_dist_checkpoint_tp2_reloads_at_tp1_and_tp2(tmp_path, variant):
    from calibrl_mcore.make_tiny_model import make_tiny_model

    tiny = make_tiny_model("internvl", tmp_path / "tiny", seed=0, use_qk_norm=variant == "qk_norm")
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    common = ("--tiny", str(tiny), "--ckpt-dir", str(ckpt))

    saved = run_torchrun(WORKER, 2, tmp_path / "save", *common, "--mode", "save", "--tp", "2")
    assert [r["tp_rank"] for r in saved] == [0, 1]
    replicas = [r["replicas"] for r in saved]
    assert replicas[0].keys() == replicas[1].keys()
    # no two TP ranks write the same (replica, offset): a replicated tensor is the main copy on one rank only
    clashes = [key for key in replicas[0] if replicas[0][key] == replicas[1][key]]
    assert not clashes, clashes
    for name in EMBEDDINGS:
        key = f"vision_model.embeddings.{name}"
        assert [replicas[rank][key][0] for rank in (0, 1)] == [[0, 0, 0], [0, 1, 0]], key
    for key in replicas[0]:  # layer scales and norms of the tower: replicated over TP
        if key.startswith("vision_model.layers.") and key.endswith(("lambda_1", "layernorm.weight")):
            if "self_attention" not in key:  # q/k norms are TP-split with the heads
                assert [replicas[rank][key][0][1] for rank in (0, 1)] == [0, 1], key

    for tp in (1, 2):
        loaded = run_torchrun(
            WORKER, tp, tmp_path / f"load_tp{tp}", *common, "--mode", "load", "--tp", str(tp)
        )
        assert len(loaded) == tp
        for r in loaded:
            assert not r["missing_keys"] and not r["unexpected_keys"], (
                r["missing_keys"],
                r["unexpected_keys"],
            )
            assert r["exported"] == r["expected"], set(r["exported"]) ^ set(r["expected"])
            assert not r["mismatch"], f"TP={tp} rank {r['rank']}: {r['mismatch']}"
            assert not r["nonfinite"], r["nonfinite"]
