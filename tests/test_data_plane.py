"""The DP-sharded data plane (calibrl_mcore/trainer/{row_plan,shard_codec,data_plane}.py).

    1. `assign_rows`: every trained row has exactly one DP rank, cuts are contiguous and token-balanced,
       mini-batches follow the old group split, a rank receives its groups' expert rows and nothing else
    2. `pack_shard` / `unpack_shard`: exact round trip, prompts sent once per group, no tensor on the wire
    3. the driver's token ids (planned from image sizes) equal the processor's, for Qwen2.5-VL and InternVL
    4. torchrun, 4 processes, layouts DP=4 / DP=2 x PP=2 / DP=1 x TP=2 x PP=2: each rank receives only its
       replica's rows, first-stage ranks hold pixels equal to one process's encode, bytes per rank ~ 1/DP
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import random

import numpy as np
import pytest
import torch
from PIL import Image

from calibrl_mcore.data.images import ImageRef
from calibrl_mcore.trainer.batch import Row
from calibrl_mcore.trainer.row_plan import assign_rows, group_mini_batches
from calibrl_mcore.trainer.shard_codec import pack_shard, unpack_shard
from tests.torchrun_utils import run_torchrun


def _png(height: int, width: int, seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def _rows(groups: int, samples: int, seed: int = 0, experts: int = 1) -> list[Row]:
    """Rollout-ordered rows: the samples of every group, then the expert rows (as RolloutStage.collect)."""
    rng = random.Random(seed)
    prompts = {g: [rng.randrange(1000) for _ in range(rng.randrange(5, 40))] for g in range(groups)}
    rows = [Row(uid=f"u{g}", group_id=100 + g, is_expert=False, prompt_ids=prompts[g],
                response_ids=[rng.randrange(1000) for _ in range(rng.randrange(1, 60))],
                rollout_logprobs=[-rng.random() for _ in range(3)], reward=float(rng.random() > 0.5))
            for g in range(groups) for _ in range(samples)]
    for r in rows:
        r.rollout_logprobs = [-rng.random() for _ in r.response_ids]
    rows += [Row(uid=f"u{g}", group_id=100 + g, is_expert=True, prompt_ids=prompts[g],
                 response_ids=[rng.randrange(1000) for _ in range(rng.randrange(10, 50))], reward=1.1, acc=1.0,
                 fmt=1.0, extras={"expert_index": j})
             for g in range(groups) for j in range(experts)]
    return rows


# ------------------------------------------------------------------------------------------ 1. the plan


@pytest.mark.parametrize("trains_expert", [False, True])
@pytest.mark.parametrize(("groups", "samples", "dp", "k"), [(8, 4, 1, 1), (8, 4, 2, 1), (8, 4, 4, 2), (5, 3, 4, 1),
                                                            (16, 10, 8, 4), (3, 2, 8, 1)])
def test_plan_assigns_each_trained_row_once_and_balances_tokens(groups, samples, dp, k, trains_expert):
    rows = _rows(groups, samples, seed=groups * dp + k)
    plan = assign_rows(rows, dp, k, trains_expert=trains_expert)
    trained = [i for i, r in enumerate(rows) if trains_expert or not r.is_expert]
    assert sorted(i for r in range(dp) for i in plan.trained(r)) == trained  # each exactly once
    assert all(plan.owner[i] == -1 for i in range(len(rows)) if i not in trained)
    # mini-batches: the old split of sorted group ids into k runs
    which = group_mini_batches([r.group_id for r in rows], k)
    assert plan.mini_batch == tuple(which[r.group_id] for r in rows)
    assert max(which.values()) < k
    for m in range(k):
        run = [i for i in trained if which[rows[i].group_id] == m]
        owners = [plan.owner[i] for i in sorted(run, key=lambda i: (rows[i].group_id, i))]
        assert owners == sorted(owners), "cuts must be contiguous in group order"
        per_rank = [sum(rows[i].length for i in run if plan.owner[i] == r) for r in range(dp)]
        if len(run) >= dp:  # non-empty and within one row's length of the mean
            longest = max(rows[i].length for i in run)
            assert min(per_rank) > 0 and max(per_rank) - sum(per_rank) / dp <= longest, per_rank
            assert plan.runnable[m]
        else:
            assert not plan.runnable[m]
    # a group straddles ranks only at a cut: at most dp - 1 per mini-batch
    assert plan.split_groups <= (dp - 1) * k
    for r in range(dp):
        got = plan.rows_of(r)
        groups_r = {rows[i].group_id for i in plan.trained(r)}
        want = set(plan.trained(r)) | {i for i, row in enumerate(rows) if row.is_expert and row.group_id in groups_r}
        assert got == sorted(want)
    assert plan.complete == (len(trained) >= dp)


def test_plan_splits_groups_at_token_boundaries():
    """Four equal groups of 4 rows over 8 ranks: every rank gets 2 rows, no group is split across more than 2."""
    rows = [Row(uid=str(g), group_id=g, is_expert=False, prompt_ids=[1] * 10, response_ids=[2] * 10)
            for g in range(4) for _ in range(4)]
    plan = assign_rows(rows, 8, 1, trains_expert=False)
    assert [len(plan.trained(r)) for r in range(8)] == [2] * 8
    assert plan.split_groups == 4 and plan.token_imbalance == 1.0
    # uneven lengths (210 + 15 x 20 tokens): the cut nearest the half
    rows[0].response_ids = [2] * 200
    plan = assign_rows(rows, 2, 1, trains_expert=False)
    assert plan.trained(0) == [0, 1, 2] and plan.tokens == (250, 260)


# ------------------------------------------------------------------------------------------ 2. the codec


def test_shard_round_trip_is_exact_and_sends_each_prompt_once():
    rows = _rows(6, 4, seed=1, experts=2)
    refs = (ImageRef(data=_png(20, 30, 0)), ImageRef(path=__import__("pathlib").Path("/data/img.png")))
    for r in rows:
        r.images, r.prompt_text = refs, f"<prompt of {r.uid}>"
        r.image_grid_thw = torch.tensor([[1, 2, 4], [1, 6, 2]])
    rows[3].rollout_logprobs = [-0.1, -1 / 3]  # not exactly float32: the column stays float64
    rows[3].response_ids = rows[3].response_ids[:2]
    indices = [0, 3, 5, 7, 20, 24, 25]
    data = pack_shard(rows, indices, {"note": [1, 2]})
    got, index, header = unpack_shard(data)
    assert index == indices and header == {"note": [1, 2]}
    for g, i in zip(got, indices):
        want = rows[i]
        for name in ("uid", "group_id", "is_expert", "prompt_ids", "response_ids", "rollout_logprobs", "reward",
                     "acc", "fmt", "finish_reason", "extras", "images", "prompt_text"):
            assert getattr(g, name) == getattr(want, name), name
        assert torch.equal(g.image_grid_thw, want.image_grid_thw) and g.pixel_values is None
    by_group = {}
    for g in got:  # rows of one prompt share one list after decoding
        assert by_group.setdefault(g.group_id, g.prompt_ids) is g.prompt_ids
    # each prompt's ids are on the wire once: a 5000-token prompt costs 20 kB in a shard of 1 row or of 4
    long_prompt = list(range(5000))
    for r in rows[:4]:
        r.prompt_ids = long_prompt
    one, four = len(pack_shard(rows, [0], {})), len(pack_shard(rows, [0, 1, 2, 3], {}))
    assert one > 5000 * 4 and four - one < 5000 * 4 / 4, (one, four)


def test_shard_refuses_tensors():
    rows = _rows(1, 2)
    rows[0].extras["pixels"] = torch.zeros(4, 4)
    with pytest.raises(TypeError, match=r"torch tensor \(4, 4\) in a data-plane shard"):
        pack_shard(rows, [0, 1], {})
    with pytest.raises(ValueError, match="different prompts"):
        rows = _rows(1, 2)
        rows[1].prompt_ids = [7]
        pack_shard(rows, [0, 1], {})


# ------------------------------------------------------------------------------------------ 3. driver's tokens


@pytest.mark.parametrize("arch", ["qwen2_5_vl", "internvl"])
def test_planned_prompt_tokens_equal_the_processor(tiny_checkpoints, arch):
    """The driver plans token ids from the image sizes (no pixels); the replica's full encode must agree."""
    from calibrl_mcore.data.schema import Example
    from calibrl_mcore.trainer.rollout_stage import PromptEncoder

    enc = PromptEncoder(str(tiny_checkpoints[arch]))
    for question, sizes in [("2+3?", []), ("Sides?", [(90, 50)]), ("A <image> or B <image>?", [(37, 201), (150, 40)])]:
        ex = Example(uid=question, question=question, answer="5", experts=["x"],
                     images=[ImageRef(data=_png(h, w, i)) for i, (h, w) in enumerate(sizes)])
        planned, full = enc.prompt_tokens(ex), enc.prompt(ex)
        assert planned.pixel_values is None and planned.refs == tuple(ex.images)
        assert planned.prompt_ids == full.prompt_ids
        if full.image_grid_thw is not None:
            assert torch.equal(planned.image_grid_thw, full.image_grid_thw)
        else:
            assert planned.image_grid_thw is None
    # a replica whose processor disagrees with the driver's plan stops with a one-line error naming the prompt
    from calibrl_mcore.trainer.data_plane import encode_prompt_images

    rows = [Row(uid=ex.uid, group_id=3, is_expert=False, prompt_ids=planned.prompt_ids[:-1], response_ids=[1],
                images=planned.refs, prompt_text=planned.text)]
    with pytest.raises(RuntimeError, match=r"prompt of 'A <image> or B <image>\?' \(group 3\): .* every rank must load"):
        encode_prompt_images(rows, enc)
    rows[0].prompt_ids = planned.prompt_ids
    assert encode_prompt_images(rows + [dataclasses.replace(rows[0])], enc) == 1  # once per prompt
    assert torch.equal(rows[0].pixel_values, full.pixel_values)


# ------------------------------------------------------------------------------------------ 4. torchrun


@pytest.mark.distributed
def test_each_rank_receives_and_encodes_only_its_rows(tiny_checkpoints, tmp_path):
    from calibrl_mcore.data.schema import Example
    from calibrl_mcore.trainer.rollout_stage import PromptEncoder

    model = tiny_checkpoints["qwen2_5_vl"]
    results = run_torchrun("data_plane_worker.py", 4, tmp_path, "--model", str(model), timeout=300)
    assert len(results) == 4
    enc = PromptEncoder(str(model))
    layouts = results[0]["layouts"]
    assert [lay["name"] for lay in layouts] == ["dp4", "dp2_pp2", "dp1_tp2_pp2"]
    bytes_by_dp = {}
    for k, lay in enumerate(layouts):
        plan_rows = lay["rows_of"]  # driver's plan: DP rank -> global row indices
        trained = sorted(i for r in lay["trained_of"] for i in r)
        assert trained == sorted(set(trained)), "a row trained twice"
        per_rank = [res["layouts"][k] for res in results]
        for got in per_rank:
            assert got["global_index"] == plan_rows[got["dp_rank"]], "a rank holds rows of another replica"
            if got["first_stage"]:
                for uid, digest in got["pixels"].items():  # equal to one process's encode of the prompt
                    ex = Example(uid=uid, question="<image> " + uid, answer="1", experts=["x"],
                                 images=[ImageRef(data=_png(*lay["sizes"][uid], int(uid[1:])))])
                    want = enc.prompt(ex).pixel_values
                    assert digest == hashlib.sha256(want.numpy().tobytes()).hexdigest(), uid
            else:
                assert got["pixels"] == {} and got["encode_s"] == 0.0
        dp = lay["dp"]
        bytes_by_dp[dp] = max(got["bytes"] for got in per_rank)
        assert lay["metrics"]["data/bytes_received"] == bytes_by_dp[dp]
    print(f"\n[data plane] max bytes per rank by DP: {bytes_by_dp}")
    # 1/DP of the step, plus at most one straddling prompt (its ids and image bytes go to both sides of a cut)
    one_prompt = layouts[0]["one_prompt"]
    for dp in (2, 4):
        assert bytes_by_dp[dp] <= bytes_by_dp[1] / dp + min(dp - 1, 2) * one_prompt, (bytes_by_dp, one_prompt)
