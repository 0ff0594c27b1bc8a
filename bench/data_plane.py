"""Data-plane benchmark: what each rank receives per step and what rank 0 spends sending it, at DP = 1, 2, 4.

    python bench/data_plane.py [--prompts 16] [--samples 4] [--image 448] [--response 256] [--repeats 3]
                               [--out bench/results/data_plane.json]
    python bench/data_plane.py --estimate-only      # the paper-scale estimate alone (no processes launched)

Measured (4 torchrun ranks, gloo, CPU; layouts DP=1 x TP=4, DP=2 x TP=2, DP=4 of the same processes):
- "sharded" = the trainer's data plane (`calibrl_mcore/trainer/data_plane.py`): rank 0 plans the step and sends
  each replica its rows as token ids + image paths; each replica encodes its own images (HF processor path);
- "broadcast" = what the trainer did before: rank 0 encodes every image, builds rows holding `pixel_values`
  and `broadcast_object_list`s the whole list to every rank.
Both run in each repeat, alternating, on the same prompts (images of `--image` px as PNG files; a tiny
Qwen2.5-VL checkpoint whose processor has Qwen2.5-VL's real max_pixels, so a 448 px image is 1024 patches).

Estimated (no model, no processes): the paper's step (480 prompts x (10 + 1) rows, prompts of 20,480 tokens,
responses of 4,096, one 1024 x 1024 image per prompt) through the same `assign_rows` + `pack_shard` code at
DP = 8 ... 256: wire bytes per rank and rank 0's pack time measured here; the old path's bytes per rank are
the pixels (`plan_resize` of the image under Qwen2.5-VL's processor settings, fp32) plus the pickled rows.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

LAYOUTS = [("dp1", 4), ("dp2", 2), ("dp4", 1)]  # (name, TP) on 4 ranks
QWEN25_MAX_PIXELS = 12845056  # Qwen2.5-VL's preprocessor_config.json
PAPER = {"prompts": 480, "samples": 10, "experts": 1, "prompt_tokens": 20480, "response_tokens": 4096,
         "image_px": 1024, "mini_batches": 4}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--prompts", type=int, default=32)
    p.add_argument("--samples", type=int, default=4, help="rollouts per prompt (+ 1 expert row)")
    p.add_argument("--image", type=int, default=448, help="image side in pixels (one image per prompt)")
    p.add_argument("--response", type=int, default=512, help="response tokens per row (at most)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--paper-dp", default="8,16,32,64,128,256")
    p.add_argument("--paper-scale", type=float, default=1.0, help="fraction of the paper's prompts (tests)")
    p.add_argument("--estimate-only", action="store_true")
    p.add_argument("--out", default=str(REPO / "bench" / "results" / "data_plane.json"))
    p.add_argument("--model", default=None, help=argparse.SUPPRESS)
    p.add_argument("--images", default=None, help=argparse.SUPPRESS)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    return p.parse_args(argv)


# ------------------------------------------------------------------------------------------- measured


def make_inputs(tmp: Path, args: argparse.Namespace) -> tuple[Path, Path]:
    """A tiny Qwen2.5-VL checkpoint with the real max_pixels, and `--prompts` PNG images of photo-like noise."""
    import numpy as np
    from PIL import Image

    from calibrl_mcore.make_tiny_model import make_tiny_model

    model = Path(make_tiny_model("qwen2_5_vl", tmp / "tiny", seed=0))
    def real_max_pixels(node):  # every image-processor section's size.longest_edge (pixels per image)
        if isinstance(node, dict):
            if isinstance(node.get("size"), dict) and "longest_edge" in node["size"]:
                node["size"]["longest_edge"] = QWEN25_MAX_PIXELS
            for value in node.values():
                real_max_pixels(value)

    for name in ("preprocessor_config.json", "processor_config.json"):
        cfg = json.loads((model / name).read_text())
        real_max_pixels(cfg)
        (model / name).write_text(json.dumps(cfg, indent=2))
    images = tmp / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for k in range(args.prompts):
        base = rng.integers(0, 256, size=(args.image // 8, args.image // 8, 3), dtype=np.uint8)
        Image.fromarray(base).resize((args.image, args.image), Image.Resampling.BICUBIC).save(images / f"{k}.png")
    return model, images


def launch(args: argparse.Namespace) -> None:
    from rollout.launcher import free_port

    with tempfile.TemporaryDirectory() as tmp:
        model, images = make_inputs(Path(tmp), args)
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=f"{REPO}:{os.environ.get('PYTHONPATH', '')}")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=4", "--master_addr=127.0.0.1",
               f"--master_port={free_port()}", __file__, "--worker", "--model", str(model), "--images", str(images),
               *(f"--{k}={getattr(args, k)}" for k in ("prompts", "samples", "response", "repeats")),
               "--out", args.out]
        subprocess.run(cmd, env=env, cwd=REPO, check=True)
    result = json.loads(Path(args.out).read_text())
    result["paper_estimate"] = paper_estimate(args)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "layouts"}, indent=2))


def build_rows(enc, args: argparse.Namespace, *, with_pixels: bool) -> list:
    """The step's rows as the trainer builds them (token ids + image refs; + pixels for the old path)."""
    import random

    from calibrl_mcore.data.images import ImageRef
    from calibrl_mcore.data.schema import Example
    from calibrl_mcore.trainer.batch import Row

    rng = random.Random(0)
    rows, experts = [], []
    for k in range(args.prompts):
        ex = Example(uid=f"p{k}", question=f"<image> What is shown in picture {k}?", answer="1", experts=["x"],
                     images=[ImageRef(path=Path(args.images) / f"{k}.png")])
        inp = enc.prompt(ex) if with_pixels else enc.prompt_tokens(ex)
        common = dict(uid=ex.uid, group_id=k, prompt_ids=inp.prompt_ids, image_grid_thw=inp.image_grid_thw,
                      pixel_values=inp.pixel_values, images=inp.refs, prompt_text=inp.text)
        for _ in range(args.samples):
            n = rng.randrange(args.response // 2, args.response + 1)
            rows.append(Row(is_expert=False, response_ids=[rng.randrange(200, 900) for _ in range(n)],
                            rollout_logprobs=[-0.25] * n, reward=float(rng.random() > 0.5), **common))
        experts.append(Row(is_expert=True, response_ids=[rng.randrange(200, 900) for _ in range(args.response)],
                           reward=1.1, **common))
    return rows + experts


def worker(args: argparse.Namespace) -> None:
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state

    from calibrl_mcore.parallel import ParallelConfig, destroy_distributed, init_distributed
    from calibrl_mcore.trainer.data_plane import DataPlane
    from calibrl_mcore.trainer.rollout_stage import PromptEncoder
    from calibrl_mcore.trainer.row_plan import assign_rows

    enc, layouts = None, {}
    for name, tp in LAYOUTS:
        init_distributed(ParallelConfig(tensor_model_parallel_size=tp))
        enc = enc or PromptEncoder(args.model)
        plane = DataPlane(enc, torch.device("cpu"))
        rank0, dp = dist.get_rank() == 0, parallel_state.get_data_parallel_world_size()
        runs: dict[str, list[dict]] = {"sharded": [], "broadcast": []}
        for repeat in range(args.repeats + 1):  # the first repeat warms up (processor caches, gloo buffers)
            for path in ("sharded", "broadcast"):
                dist.barrier()
                t0 = time.perf_counter()
                if path == "sharded":
                    rows = build_rows(enc, args, with_pixels=False) if rank0 else None
                    t_prep = time.perf_counter() - t0
                    plan = assign_rows(rows, dp, 1, trains_expert=False) if rank0 else None
                    local, metrics = plane.exchange(rows, plan)
                    rec = {"bytes": local.wire_bytes, "encode_s": local.encode_s, "rows": len(local.rows),
                           "dispatch_s": metrics.get("data/dispatch_s", 0.0), "pack_s": metrics.get("data/pack_s", 0.0),
                           "send_wait_s": metrics.get("data/send_wait_s", 0.0)}
                else:
                    payload = [build_rows(enc, args, with_pixels=True) if rank0 else None]
                    t_prep = time.perf_counter() - t0
                    t_send = time.perf_counter()
                    dist.broadcast_object_list(payload, src=0)  # pickles on rank 0, unpickles everywhere
                    rec = {"encode_s": t_prep if rank0 else 0.0, "dispatch_s": time.perf_counter() - t_send,
                           "rows": len(payload[0]), "pack_s": 0.0, "send_wait_s": 0.0}
                rec["prepare_s"] = t_prep if rank0 else 0.0
                rec["wall_s"] = time.perf_counter() - t0
                if path == "broadcast":  # what broadcast_object_list moved to every rank (outside the timing)
                    rec["bytes"] = len(pickle.dumps(payload[0]))
                if repeat:
                    runs[path].append(rec)
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, runs)
        layouts[name] = {"dp": dp, "tp": tp, "per_rank": gathered}
        parallel_state.destroy_model_parallel()
    if dist.get_rank() == 0:
        write_measured(args, layouts)
    destroy_distributed()


def _median(recs: list[dict], key: str) -> float:
    return round(statistics.median(r[key] for r in recs), 5)


def write_measured(args: argparse.Namespace, layouts: dict) -> None:
    out: dict = {"machine": f"{platform.machine()}, {os.cpu_count()} CPUs, 4 ranks (gloo), other users' load",
                 "load_average_at_start": [round(x, 1) for x in os.getloadavg()],
                 "step": {"prompts": args.prompts, "rows_per_prompt": args.samples + 1, "image_px": args.image,
                          "response_tokens_max": args.response, "repeats": args.repeats}, "layouts": {}}
    for name, lay in layouts.items():
        summary = {}
        for path in ("sharded", "broadcast"):
            ranks = [g[path] for g in lay["per_rank"]]
            summary[path] = {
                "bytes_per_rank": [_median(r, "bytes") for r in ranks],
                "encode_s_per_rank": [_median(r, "encode_s") for r in ranks],
                "rank0_dispatch_s": _median(ranks[0], "dispatch_s"),
                "rank0_pack_s": _median(ranks[0], "pack_s"),
                "rank0_send_wait_s": _median(ranks[0], "send_wait_s"),
                "rank0_prepare_s": _median(ranks[0], "prepare_s"),
                "wall_s_per_rank": [_median(r, "wall_s") for r in ranks],
                "rows_per_rank": [r[0]["rows"] for r in ranks],
            }
        out["layouts"][name] = {"dp": lay["dp"], "tp": lay["tp"], **summary}
    s = {n: out["layouts"][n]["sharded"] for n in out["layouts"]}
    b = {n: out["layouts"][n]["broadcast"] for n in out["layouts"]}
    out["goals"] = {
        "bytes_per_rank_dp2_over_dp1": round(max(s["dp2"]["bytes_per_rank"]) / max(s["dp1"]["bytes_per_rank"]), 4),
        "bytes_per_rank_dp4_over_dp1": round(max(s["dp4"]["bytes_per_rank"]) / max(s["dp1"]["bytes_per_rank"]), 4),
        "dispatch_s_dp4_over_dp1": round(s["dp4"]["rank0_dispatch_s"] / max(s["dp1"]["rank0_dispatch_s"], 1e-9), 3),
        "pack_s_dp4_over_dp1": round(s["dp4"]["rank0_pack_s"] / max(s["dp1"]["rank0_pack_s"], 1e-9), 3),
        "broadcast_bytes_per_rank_over_sharded_dp4": round(max(b["dp4"]["bytes_per_rank"])
                                                           / max(s["dp4"]["bytes_per_rank"]), 1),
        "rank0_wall_broadcast_over_sharded_dp4": round(b["dp4"]["wall_s_per_rank"][0]
                                                       / s["dp4"]["wall_s_per_rank"][0], 2),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")


# ------------------------------------------------------------------------------------------- estimated


def paper_estimate(args: argparse.Namespace) -> dict:
    """The paper's step through `assign_rows` + `pack_shard` (sizes synthetic; see the module docstring)."""
    from calibrl_mcore.data.image_spec import ImageSpec, plan_resize
    from calibrl_mcore.trainer.batch import Row
    from calibrl_mcore.trainer.row_plan import assign_rows
    from calibrl_mcore.trainer.shard_codec import pack_shard, unpack_shard

    prompts = max(int(PAPER["prompts"] * args.paper_scale), 1)
    p_len, r_len, side = PAPER["prompt_tokens"], PAPER["response_tokens"], PAPER["image_px"]
    spec = ImageSpec(mode="smart_resize", image_mean=(0.0,) * 3, image_std=(1.0,) * 3, max_pixels=QWEN25_MAX_PIXELS)
    plan = plan_resize(side, side, spec)
    patches = (plan.height // spec.patch_size) * (plan.width // spec.patch_size)
    pixel_bytes = patches * 3 * spec.temporal_patch_size * spec.patch_size**2 * 4  # fp32 [patches, C·T·P·P]
    from calibrl_mcore.data.images import ImageRef

    ref = (ImageRef(path=Path("/data/calibrl/images/000000.png")),)
    response, logprobs = list(range(1000, 1000 + r_len)), [-0.25] * r_len  # shared lists: the codec copies values
    rows = []
    for g in range(prompts):
        prompt = list(range(2000, 2000 + p_len))
        rows += [Row(uid=f"p{g}", group_id=g, is_expert=j == PAPER["samples"], prompt_ids=prompt,
                     response_ids=response, rollout_logprobs=None if j == PAPER["samples"] else logprobs, images=ref)
                 for j in range(PAPER["samples"] + PAPER["experts"])]
    # the old path's bytes: one group pickled as the old rows were (distinct lists, shared prompt), x prompts
    group = [Row(uid="p", group_id=0, is_expert=False, prompt_ids=rows[0].prompt_ids, response_ids=list(response),
                 rollout_logprobs=list(logprobs)) for _ in range(PAPER["samples"] + PAPER["experts"])]
    old_tokens = len(pickle.dumps(group)) * prompts
    out = {"setting": PAPER | {"prompts": prompts}, "image_patches": patches, "pixel_bytes_per_prompt": pixel_bytes,
           "broadcast_bytes_per_rank": old_tokens + prompts * pixel_bytes, "by_dp": {}}
    for dp in (int(d) for d in args.paper_dp.split(",")):
        t0 = time.perf_counter()
        plan_dp = assign_rows(rows, dp, PAPER["mini_batches"], trains_expert=False)
        t_plan = time.perf_counter() - t0
        shards = [pack_shard(rows, plan_dp.rows_of(r), {}) for r in range(dp)]
        pack_s = time.perf_counter() - t0 - t_plan
        sizes = [len(b) for b in shards]
        t1 = time.perf_counter()
        unpack_shard(shards[0])
        unpack_s = time.perf_counter() - t1
        del shards
        out["by_dp"][dp] = {"bytes_per_rank_max": max(sizes), "bytes_per_rank_min": min(sizes),
                            "bytes_total": sum(sizes), "rank0_plan_s": round(t_plan, 3),
                            "rank0_pack_s": round(pack_s, 3), "pack_gbps": round(sum(sizes) / pack_s / 1e9, 4),
                            "unpack_s_rank0": round(unpack_s, 3), "unpack_gbps": round(sizes[0] / unpack_s / 1e9, 4),
                            "split_groups": plan_dp.split_groups}
    return out


if __name__ == "__main__":
    arguments = parse_args()
    if arguments.worker:
        worker(arguments)
    elif arguments.estimate_only:
        result = {"paper_estimate": paper_estimate(arguments)}
        Path(arguments.out).parent.mkdir(parents=True, exist_ok=True)
        Path(arguments.out).write_text(json.dumps(result, indent=2) + "\n")
        print(json.dumps(result, indent=2))
    else:
        launch(arguments)
