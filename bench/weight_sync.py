"""Weight-sync benchmark: trainer -> embedded rollout server by "tensor" (HTTP safetensors buckets),
"disk" (HF checkpoint export + `/update_weights_from_disk`) and "distributed" (broadcast over a gloo
weight-update group after `/update_weights_from_distributed`), on the same tiny Qwen2.5-VL, CPU, loopback.

    python bench/weight_sync.py [--tp 1] [--layers 2] [--repeats 5] [--bucket-mb 64] [--out bench/results/weight_sync.json]

The script launches itself under torchrun (`--tp` ranks); rank 0 also starts the server. Every push is
a full `WeightSync.push` (TP gathers, bucketing, transfer, server-side load, the final barrier); the
methods take turns within each repeat so that machine noise hits them alike. The first push of each
method is reported apart (for "distributed" it includes joining the group).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

METHODS = ("tensor", "disk", "distributed")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tp", type=int, default=1, help="trainer tensor parallel size (= torchrun ranks)")
    p.add_argument("--layers", type=int, default=2, help="decoder layers of the tiny model")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--bucket-mb", type=int, default=64)
    p.add_argument("--out", default=str(REPO / "bench" / "results" / "weight_sync.json"))
    p.add_argument("--model", default=None, help="(worker) HF dir; the launcher makes a tiny one")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def launch(args: argparse.Namespace) -> None:
    from calibrl_mcore.make_tiny_model import make_tiny_model
    from rollout.launcher import free_port

    with tempfile.TemporaryDirectory() as tmp:
        model = make_tiny_model("qwen2_5_vl", Path(tmp) / "tiny", seed=0, num_layers=args.layers)
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=f"{REPO}:{os.environ.get('PYTHONPATH', '')}")
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            f"--nproc_per_node={args.tp}",
            "--master_addr=127.0.0.1",
            f"--master_port={free_port()}",
            __file__,
            "--worker",
            "--model",
            str(model),
            "--tp",
            str(args.tp),
            "--layers",
            str(args.layers),
            "--repeats",
            str(args.repeats),
            "--bucket-mb",
            str(args.bucket_mb),
            "--out",
            args.out,
        ]
        subprocess.run(cmd, env=env, cwd=REPO, check=True)
    print(Path(args.out).read_text())


def worker(args: argparse.Namespace) -> None:
    import torch.distributed as dist

    from calibrl_mcore.config import ModelConfig, OptimConfig
    from calibrl_mcore.parallel import ParallelConfig, destroy_distributed, init_distributed
    from calibrl_mcore.trainer.policy import MegatronPolicy
    from calibrl_mcore.trainer.weight_sync import WeightSync
    from rollout.launcher import EmbeddedServerProcess

    info = init_distributed(ParallelConfig(tensor_model_parallel_size=args.tp))
    policy = MegatronPolicy(ModelConfig(hf_path=args.model, spec="local"), OptimConfig())
    server, urls = None, [None]
    if info.rank == 0:
        server = EmbeddedServerProcess(args.model).start()
        urls = [server.url]
    dist.broadcast_object_list(urls, src=0)
    hf_bytes = sum(t.numel() * t.element_size() for _, t in policy.iter_hf_weights())
    stage = Path(tempfile.mkdtemp(prefix="weight_sync_bench_"))
    syncs = {
        m: WeightSync(policy, urls, bucket_mb=args.bucket_mb, method=m, src_dir=args.model, stage_dir=stage)
        for m in METHODS
    }
    first, times = {}, {m: [] for m in METHODS}
    version = 0
    for repeat in range(args.repeats + 1):
        for method, sync in syncs.items():  # interleaved: drift hits every method alike
            version += 1
            dist.barrier()
            t0 = time.perf_counter()
            sync.push(version)
            elapsed = time.perf_counter() - t0
            if repeat:
                times[method].append(elapsed)
            else:
                first[method] = elapsed
    for sync in syncs.values():
        sync.close()
    if info.rank == 0:
        result = {
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
            "load_average_at_start": [round(x, 1) for x in os.getloadavg()],
            "model": {
                "arch": "qwen2_5_vl (tiny)",
                "layers": args.layers,
                "hf_mb": round(hf_bytes / 2**20, 2),
            },
            "trainer_tp": args.tp,
            "bucket_mb": args.bucket_mb,
            "repeats": args.repeats,
            "server": "embedded, cpu, float32, loopback",
            "first_push_s": {m: round(first[m], 4) for m in METHODS},
            "push_s_median": {m: round(statistics.median(times[m]), 4) for m in METHODS},
            "push_s_min": {m: round(min(times[m]), 4) for m in METHODS},
            "distributed_over_tensor": round(
                statistics.median(times["distributed"]) / statistics.median(times["tensor"]), 3
            ),
            "distributed_over_disk": round(
                statistics.median(times["distributed"]) / statistics.median(times["disk"]), 3
            ),
        }
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
        server.stop()
    destroy_distributed()


if __name__ == "__main__":
    arguments = parse_args()
    if arguments.worker:
        worker(arguments)
    else:
        launch(arguments)
