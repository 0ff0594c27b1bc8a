"""torchrun worker for tests/test_data_plane.py: the data plane at three layouts of one 4-process world.

Rank 0 builds a step of image prompts (real processor, planned token ids, random responses), plans it and
exchanges it; every rank records what it received and the digests of the pixels it encoded."""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import random

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state
from PIL import Image

from calibrl_mcore.data.images import ImageRef
from calibrl_mcore.data.schema import Example
from calibrl_mcore.parallel import ParallelConfig, destroy_distributed, init_distributed
from calibrl_mcore.trainer.batch import Row
from calibrl_mcore.trainer.data_plane import DataPlane
from calibrl_mcore.trainer.rollout_stage import PromptEncoder
from calibrl_mcore.trainer.row_plan import assign_rows
from calibrl_mcore.trainer.shard_codec import pack_shard

LAYOUTS = [("dp4", 1, 1), ("dp2_pp2", 1, 2), ("dp1_tp2_pp2", 2, 2)]  # (name, TP, PP)
PROMPTS, SAMPLES = 8, 3


def _png(height: int, width: int, seed: int) -> bytes:  # as tests/test_data_plane.py
    pixels = np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def build_rows(enc: PromptEncoder) -> tuple[list[Row], dict[str, list[int]]]:
    rng = random.Random(0)
    rows, experts, sizes = [], [], {}
    for k in range(PROMPTS):
        uid = f"p{k}"
        sizes[uid] = [rng.randrange(40, 150), rng.randrange(40, 150)]
        ex = Example(uid=uid, question="<image> " + uid, answer="1", experts=["x"],
                     images=[ImageRef(data=_png(*sizes[uid], k))])
        inp = enc.prompt_tokens(ex)
        common = dict(uid=uid, group_id=7 + k, prompt_ids=inp.prompt_ids, image_grid_thw=inp.image_grid_thw,
                      images=inp.refs, prompt_text=inp.text)
        for _ in range(SAMPLES):
            ids = [rng.randrange(100, 200) for _ in range(rng.randrange(2, 30))]
            rows.append(Row(is_expert=False, response_ids=ids, rollout_logprobs=[-0.5] * len(ids),
                            reward=float(rng.random() > 0.5), **common))
        experts.append(Row(is_expert=True, response_ids=[5, 6, 7], reward=1.1, **common))
    return rows + experts, sizes


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--model", required=True)
    a = ap.parse_args()
    out = []
    for name, tp, pp in LAYOUTS:
        init_distributed(ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp))
        first = parallel_state.is_pipeline_first_stage()
        enc = PromptEncoder(a.model) if first else None
        plane = DataPlane(enc, torch.device("cpu"))
        dp = parallel_state.get_data_parallel_world_size()
        rows = plan = None
        record = {"name": name, "dp": dp, "dp_rank": parallel_state.get_data_parallel_rank(), "first_stage": first}
        if dist.get_rank() == 0:
            rows, sizes = build_rows(enc)
            plan = assign_rows(rows, dp, 1, trains_expert=False)
            groups = {r.group_id for r in rows}
            one_prompt = max(len(pack_shard(rows, [i for i, r in enumerate(rows) if r.group_id == g], {}))
                             for g in groups)
            record.update(rows_of=[plan.rows_of(r) for r in range(dp)],
                          trained_of=[plan.trained(r) for r in range(dp)], sizes=sizes, one_prompt=one_prompt)
        local, metrics = plane.exchange(rows, plan)
        pixels = {r.uid: hashlib.sha256(r.pixel_values.numpy().tobytes()).hexdigest()
                  for r in local.rows if r.pixel_values is not None}
        record.update(global_index=local.global_index, bytes=local.wire_bytes, encode_s=local.encode_s,
                      pixels=pixels, metrics=metrics)
        out.append(record)
        parallel_state.destroy_model_parallel()
    with open(os.path.join(a.out, f"rank{dist.get_rank()}.json"), "w") as f:
        json.dump({"layouts": out}, f)
    destroy_distributed()


if __name__ == "__main__":
    main()
