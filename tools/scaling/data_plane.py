"""The planner's model of the step's data plane (calibrl_mcore/trainer/data_plane.py): time and host memory.

What the trainer does each step, after the rollout:

    driver (rank 0)   packs one shard per DP replica (token ids + image refs, `shard_codec.pack_shard`) and
                      sends each to its replica's leader: it packs and sends every row once, whatever DP is
    replica leader    broadcasts its shard to the replica's TP x CP x PP ranks (NVLink inside a node, else IB)
    every rank        unpacks its shard (rows as Python lists: `host_bytes_per_token`)
    first PP stage    encodes the images of its prompts (decode + resize + normalise on the host, or DALI)

Wire bytes per prompt group = 4·prompt ids (sent once per group and replica) + images·`image_ref_bytes`
+ per row (`row_overhead_bytes` + 4·response ids + 4·rollout log-probs of on-policy rows). A replica gets
1/DP of the step plus at most two straddling prompts (one at each of its token-balanced cuts).

The rates are the CPU figures `bench/data_plane.py` measures (bench/results/data_plane.json: pack / unpack
throughput, PIL encode megapixels per second on one core); DALI on the GPU encodes far faster, so
`encode_mpix_per_s` is the conservative CPU path.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["DataPlaneAssumptions", "data_plane_cost", "step_bytes"]

GiB = 1024**3


@dataclass(frozen=True)
class DataPlaneAssumptions:
    pack_gbps: float = 0.05  # driver's pack_shard throughput, GB/s of wire bytes (bench: 0.02–0.07 on a loaded CPU)
    unpack_gbps: float = 0.03  # unpack_shard throughput (to Python lists), GB/s (bench: 0.02–0.2, same machine)
    encode_mpix_per_s: float = 10.0  # HF processor path (decode, resize, normalise, patchify) per rank; the bench
    # measured ~3 Mpx/s per rank with 4 ranks sharing 2 cores at load ~12, so one free core does several times that
    image_ref_bytes: float = 128.0  # one image on the wire: its path (parquet-embedded bytes: ~1e5)
    images_per_prompt: float = 1.0
    row_overhead_bytes: float = 96.0  # per row: group id, flags, scores, offsets, finish reason, extras
    host_bytes_per_token: float = 36.0  # decoded rows keep list[int]: an 8 B pointer + a 28 B int per token
    pixel_bytes_per_patch: float = 3 * 2 * 14 * 14 * 4  # fp32 pixel_values row: C·T·P·P (Qwen2.5-VL)
    pixels_per_patch: float = 14 * 14


def step_bytes(w, a: DataPlaneAssumptions = DataPlaneAssumptions()) -> tuple[float, float]:
    """(wire bytes of the whole step, of one prompt group). `w` is a planner `Workload`."""
    rows = w.samples + w.forward_extra + w.train_extra
    group = (4 * w.avg_prompt + a.images_per_prompt * a.image_ref_bytes
             + rows * (a.row_overhead_bytes + 4 * w.avg_response) + w.samples * 4 * w.avg_response)
    return w.prompts * group, group


def data_plane_cost(model, w, lay, hw, a: DataPlaneAssumptions = DataPlaneAssumptions()) -> dict[str, float]:
    """Seconds on the step's critical path and host GiB per rank for planner `model`, `Workload` `w`,
    `Layout` `lay`, `Hardware` `hw`: {"dispatch_s", "broadcast_s", "unpack_s", "encode_s", "time_s",
    "bytes_per_rank", "host_gib"}."""
    total, group = step_bytes(w, a)
    straddle = min(lay.dp - 1, 2) * (4 * w.avg_prompt + a.images_per_prompt * a.image_ref_bytes)
    per_rank = total / lay.dp + straddle
    latency = hw.collective_latency_us / 1e6
    sends = total - total / lay.dp  # the driver keeps its own shard
    dispatch = total / (a.pack_gbps * 1e9) + sends / (hw.ib_busbw_gbps * 1e9) + (lay.dp - 1) * 2 * latency
    replica = lay.tp * lay.cp * lay.pp
    bw = hw.nvlink_busbw_gbps if replica <= hw.gpus_per_node else hw.ib_busbw_gbps
    broadcast = 2 * latency + per_rank / (bw * 1e9) if replica > 1 else 0.0
    unpack = per_rank / (a.unpack_gbps * 1e9)
    prompts = w.prompts / lay.dp + min(lay.dp - 1, 2)  # prompts a replica encodes
    patches = w.avg_image_tokens * (model.vision.patches_per_token if model.vision else 0)
    encode = prompts * patches * a.pixels_per_patch / 1e6 / a.encode_mpix_per_s
    rows = per_rank / max(group, 1.0) * (w.samples + w.forward_extra + w.train_extra)  # rows a rank holds
    tokens = rows * w.avg_response + prompts * w.avg_prompt  # prompt lists are shared by a group's rows
    host = per_rank + tokens * a.host_bytes_per_token + prompts * patches * a.pixel_bytes_per_patch
    return {"dispatch_s": dispatch, "broadcast_s": broadcast, "unpack_s": unpack, "encode_s": encode,
            "time_s": dispatch + broadcast + unpack + encode, "bytes_per_rank": per_rank, "host_gib": host / GiB}
