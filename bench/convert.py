"""Conversion benchmark: wall time and peak memory of `calibrl convert` on a ~2.3 GB checkpoint.

    python bench/convert.py [--work /tmp/convert-bench] [--keep] [--tp2]

The checkpoint has the real Qwen2.5-VL architecture (tensor names, fusions, M-RoPE config) with random
bf16 weights: the 3B/7B vision tower's widths (1280 wide, 3420 MLP, 16 heads) with 8 of its 32 blocks, and
a text decoder widened to Qwen2.5-1.5B's widths (1536 wide, 8960 MLP, 12:2 GQA, head_dim 128) with 16
layers, the real 151936 vocabulary and tied embeddings (as in Qwen2.5-VL-3B). It is written directly with
safetensors, one shard at a time (names and shapes from a meta-device transformers model), in 1 GB shards.

Measured: hf-to-mcore (TP=1: one process; and with --tp2 two torchrun ranks), mcore-to-hf back, a
tensor-by-tensor bit comparison of the round trip, and peak memory of the whole process tree (sampled
every 50 ms with psutil). Both the summed RSS and the summed PSS are reported: the checkpoint writer
forks helper processes that share the parent's pages copy-on-write, which RSS counts once per process
and PSS splits between them, so PSS is the tree's real footprint. mbridge 0.15.1 is tried on the same
checkpoint (in a subprocess) and its outcome recorded. Results: bench/results/convert.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import psutil
import torch

REPO = Path(__file__).resolve().parents[1]
SHARD_BYTES = 1_000_000_000


def bench_config():
    from transformers import Qwen2_5_VLConfig

    text = dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=16,
                num_attention_heads=12, num_key_value_heads=2, rms_norm_eps=1e-6, max_position_embeddings=32768,
                rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]},
                bos_token_id=151643, eos_token_id=151645, tie_word_embeddings=True)  # fmt: skip
    vision = dict(depth=8, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=1536,
                  patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                  fullatt_block_indexes=[3, 7], hidden_act="silu")  # fmt: skip
    cfg = Qwen2_5_VLConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=151655,
        video_token_id=151656,
        vision_start_token_id=151652,
        vision_end_token_id=151653,
        tie_word_embeddings=True,
    )
    cfg.architectures = ["Qwen2_5_VLForConditionalGeneration"]
    return cfg


def write_checkpoint(out: Path, seed: int = 0) -> list[int]:
    """Random bf16 weights, in hub names, sharded greedily at SHARD_BYTES; returns the shard sizes."""
    from safetensors.torch import save_file
    from transformers import Qwen2_5_VLForConditionalGeneration

    from model_providers.hf_mapping import get_mapping

    cfg = bench_config()
    with torch.device("meta"):
        model = Qwen2_5_VLForConditionalGeneration(cfg)
    mapping = get_mapping("qwen2_5_vl", cfg)
    shapes = {mapping.checkpoint_hf_name(n): tuple(p.shape) for n, p in model.named_parameters()}
    shapes.pop("lm_head.weight", None)  # tied: hub checkpoints of tied models do not store it
    shards, size = [[]], 0
    for name in sorted(shapes):
        nbytes = 2 * torch.Size(shapes[name]).numel()
        if shards[-1] and size + nbytes > SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    out.mkdir(parents=True)
    gen = torch.Generator().manual_seed(seed)
    weight_map, sizes = {}, []
    for i, names in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {n: (0.02 * torch.randn(shapes[n], generator=gen)).to(torch.bfloat16) for n in names}
        save_file(tensors, str(out / file), metadata={"format": "pt"})
        sizes.append((out / file).stat().st_size)
        weight_map.update(dict.fromkeys(names, file))
        del tensors
    index = {"metadata": {"total_size": sum(sizes)}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    cfg.save_pretrained(out)
    return sizes


def run_measured(cmd: list[str], interval: float = 0.05) -> dict:
    """Run `cmd`; peak summed RSS / PSS over its process tree (MB) and wall time."""
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    start = time.perf_counter()
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    root = psutil.Process(proc.pid)
    peak_rss = peak_pss = 0
    while proc.poll() is None:
        rss = pss = 0
        try:
            tree = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            break
        for p in tree:
            try:
                info = p.memory_full_info()
                rss, pss = rss + info.rss, pss + info.pss
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                pass
        peak_rss, peak_pss = max(peak_rss, rss), max(peak_pss, pss)
        time.sleep(interval)
    output = proc.stdout.read()
    wall = time.perf_counter() - start
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{output[-4000:]}")
    return {
        "wall_s": round(wall, 1),
        "peak_rss_tree_mb": round(peak_rss / 2**20),
        "peak_pss_tree_mb": round(peak_pss / 2**20),
    }


def bit_identical(a: Path, b: Path) -> bool:
    """Every tensor of `a` equals (bits and dtype) the one of the same name in `b`, read one at a time."""
    from safetensors import safe_open

    def where(path: Path) -> dict[str, Path]:
        return {k: f for f in sorted(path.glob("*.safetensors")) for k in safe_open(f, "pt").keys()}  # noqa: SIM118

    wa, wb = where(a), where(b)
    if set(wa) != set(wb):
        return False
    for name in wa:
        with safe_open(wa[name], "pt") as fa, safe_open(wb[name], "pt") as fb:
            x, y = fa.get_tensor(name), fb.get_tensor(name)
            if x.dtype != y.dtype or not torch.equal(x, y):
                return False
    return True


MBRIDGE_PROBE = """
import sys, time
from calibrl_mcore.parallel import ParallelConfig, init_distributed
init_distributed(ParallelConfig())
from transformers import AutoConfig
from mbridge import AutoBridge
config = AutoConfig.from_pretrained(sys.argv[1])
if sys.argv[2] == "adapted":  # text fields where mbridge 0.15.1 reads them (the transformers 4.x layout)
    for key, value in config.text_config.to_dict().items():
        if not hasattr(config, key):
            setattr(config, key, value)
    config.rope_parameters = dict(config.text_config.rope_parameters)
    config.rope_theta = config.text_config.rope_parameters["rope_theta"]
steps, start = [], time.time()
try:
    bridge = AutoBridge.from_config(config); steps.append("config")
    model = bridge.get_model(); steps.append("get_model")
    bridge.load_weights(model, sys.argv[1]); steps.append("load_weights")
    print("MBRIDGE_OK", round(time.time() - start, 1))
except Exception as e:
    print("MBRIDGE_FAIL after", steps, type(e).__name__, str(e).splitlines()[0][:300])
"""


def try_mbridge(hf_dir: Path) -> dict:
    """mbridge on the same checkpoint: as is, and with the config fields it reads copied to where it looks."""
    try:
        import mbridge  # noqa: F401
    except ImportError:
        return {"ran": False, "why": "mbridge not installed (pip install mbridge==0.15.1)"}
    from importlib.metadata import version

    env = dict(os.environ, PYTHONPATH=str(REPO))
    result: dict = {"version": version("mbridge")}
    for mode in ("as_is", "adapted"):
        out = subprocess.run([sys.executable, "-c", MBRIDGE_PROBE, str(hf_dir), mode], cwd=REPO, env=env,
                             capture_output=True, text=True, timeout=900).stdout  # fmt: skip
        result[mode] = next(
            (x for x in out.splitlines() if x.startswith("MBRIDGE_")), "MBRIDGE_FAIL no result"
        )
    result["ran"] = any(v.startswith("MBRIDGE_OK") for v in result.values() if isinstance(v, str))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/convert-bench"))
    parser.add_argument("--keep", action="store_true", help="keep the generated checkpoints")
    parser.add_argument("--tp2", action="store_true", help="also time hf-to-mcore at TP=2 (two ranks)")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "convert.json")
    args = parser.parse_args()
    shutil.rmtree(args.work, ignore_errors=True)
    hf, mcore, back = args.work / "hf", args.work / "mcore", args.work / "hf_back"
    start = time.perf_counter()
    sizes = write_checkpoint(hf)
    result: dict = {
        "machine": f"{platform.machine()}, {psutil.cpu_count()} CPUs, {psutil.virtual_memory().total >> 30} GB",
        "load_average_at_start": [round(x, 1) for x in os.getloadavg()],
        "buffer_mb": 256,
        "checkpoint": {
            "arch": "qwen2_5_vl",
            "dtype": "bf16",
            "total_mb": round(sum(sizes) / 2**20),
            "shards_mb": [round(s / 2**20) for s in sizes],
            "generate_s": round(time.perf_counter() - start, 1),
        },  # fmt: skip
    }
    tool = [sys.executable, "-m", "calibrl_mcore.convert_checkpoint"]
    largest = max(sizes) / 2**20
    runs = {"hf_to_mcore_tp1": [*tool, "hf-to-mcore", "--hf-dir", str(hf), "--out-dir", str(mcore), "--dtype", "bf16"],
            "mcore_to_hf_tp1": [*tool, "mcore-to-hf", "--mcore-dir", str(mcore), "--out-dir", str(back)]}  # fmt: skip
    if args.tp2:
        runs["hf_to_mcore_tp2"] = [*tool, "hf-to-mcore", "--hf-dir", str(hf), "--out-dir", str(mcore) + "_tp2",
                                   "--dtype", "bf16", "--tp", "2"]  # fmt: skip
    for name, cmd in runs.items():
        stats = run_measured(cmd)
        stats["peak_pss_over_largest_shard"] = round(stats["peak_pss_tree_mb"] / largest, 2)
        result[name] = stats
        print(name, stats, flush=True)
    result["load_average_at_end"] = [round(x, 1) for x in os.getloadavg()]
    result["round_trip_bit_identical"] = bit_identical(hf, back)
    result["mbridge"] = try_mbridge(hf)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    if not args.keep:
        shutil.rmtree(args.work, ignore_errors=True)


if __name__ == "__main__":
    main()
