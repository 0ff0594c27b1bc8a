"""HF <-> Megatron distributed checkpoint conversion, streamed, for every architecture in the registry.

    calibrl convert hf-to-mcore --hf-dir D --out-dir O --tp 2 --pp 1 [--dtype fp32|bf16]
    calibrl convert mcore-to-hf --mcore-dir O --out-dir H [--hf-config-from D] [--tp N --pp M]
    calibrl convert verify      --hf-dir D --mcore-dir O --tp 1 --pp 2 [--tol 1e-4]
    (any command) --pp 2 --num-layers-in-first-pipeline-stage 1 [--num-layers-in-last-pipeline-stage N]

Uneven pipeline stages: the two flags are Megatron's `num_layers_in_{first,last}_pipeline_stage` (the
trainer's `parallel.*` keys). Without them a --pp that does not divide the decoder layers gets the most
balanced uneven split (e.g. 1+2 for --pp 2 on 3 layers); the checkpoint is the same whichever split wrote
it (global layer indices), so any command reads it at any TP / PP / split.

Launch: a command needs TP x PP processes. Run plainly, it starts `torchrun` itself (or runs in-process
when TP x PP = 1); run under your own `torchrun --nproc_per_node TPxPP -m tools.convert_checkpoint ...`
(multi-node: on a shared filesystem) and it uses that world. It always runs on the CPU (gloo, CUDA
hidden, Megatron's `local` layer spec): conversion is I/O-bound and needs no GPU.

hf-to-mcore writes `O/megatron` (the `{"model": sharded_state_dict}` dist checkpoint the trainer writes,
resharded by dist_checkpointing to any TP/PP on load), `O/hf_config/` (config, tokenizer, processor
files), `O/convert.json` and `O/COMPLETE`, all under `O.tmp`, renamed at the end (removed on error).

Memory: each rank builds its stage on the *meta* device (the checkpoint layout without weights), cuts it
into groups of `--buffer-mb`, converts a group from HF tensors read one at a time, and saves it as a
separate dist checkpoint ("part"); `merge_parts` then joins the parts' DCP metadata into one checkpoint.
Parts hold arbitrary layer subsets, which Megatron's saver rejects for its layer-stacked keys, so those are
saved under per-layer keys (`key@@stacked:i|L`) that the merge restacks (same bytes, same files).
mcore-to-hf reads groups back with DCP's resharding read planner and writes a safetensors file per group.
verify loads with Megatron's own `dist_checkpointing.load`. Design notes: model_providers/README.md.

The code lives in ``tools/convert/`` (stage and checks, HF reading, dist checkpoint parts and reading,
commands, verify); this module is the entry point (CLI, launching) and re-exports their public names.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script (python tools/convert_checkpoint.py): make `tools` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tools.convert.commands import COMPLETE, _hf_files_source, hf_to_mcore, mcore_to_hf
from tools.convert.dist_ckpt import OBJECT_TAG, STACK_SEP, CheckpointReader, merge_parts, save_part
from tools.convert.hf_reader import HFCheckpoint, check_hf_tensors, convert_param, expected_hf_tensors
from tools.convert.stage import (
    DTYPES,
    ConvertError,
    Stage,
    build_stage,
    check_layout,
    pipeline_split,
    plan_groups,
    read_hf_config,
)
from tools.convert.verify import check_verify_inputs, megatron_logits, verify, verify_inputs

__all__ = [  # the public names of this module before the split, for `from tools.convert_checkpoint import X`
    "COMPLETE",
    "DTYPES",
    "OBJECT_TAG",
    "REPO",
    "STACK_SEP",
    "CheckpointReader",
    "ConvertError",
    "HFCheckpoint",
    "Stage",
    "build_stage",
    "check_hf_tensors",
    "check_layout",
    "convert_param",
    "expected_hf_tensors",
    "hf_to_mcore",
    "main",
    "mcore_to_hf",
    "megatron_logits",
    "merge_parts",
    "parse_args",
    "pipeline_split",
    "plan_groups",
    "read_hf_config",
    "save_part",
    "verify",
    "verify_inputs",
]

REPO = Path(__file__).resolve().parents[1]


# ---- launching -------------------------------------------------------------------------------------------


def _launch_torchrun(argv: list[str], world: int) -> int:
    """Re-run this command under torchrun with `world` local processes (gloo, CPU)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(
        os.environ,
        CUDA_VISIBLE_DEVICES="",
        PYTHONPATH=f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
    )
    env.setdefault("OMP_NUM_THREADS", "1")
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={world}", "--master_addr=127.0.0.1",
           f"--master_port={port}", "-m", "tools.convert_checkpoint", *argv]  # fmt: skip
    return subprocess.call(cmd, env=env, cwd=REPO)


def _run_here(args: argparse.Namespace) -> None:
    """Run the command in this process: a torchrun rank, or the only rank."""
    os.environ["CUDA_VISIBLE_DEVICES"] = ""  # before torch initialises CUDA: a CPU job (module docstring)
    try:  # glibc keeps freed blocks under its dynamic (<= 32 MB) mmap threshold in the heap: RSS would
        ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 20)  # grow group after group. M_MMAP_THRESHOLD = 1 MB
    except (OSError, AttributeError):  # not glibc: only less tight
        pass
    from calibrl_mcore.parallel import ParallelConfig, destroy_distributed, init_distributed

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world != args.tp * args.pp:
        raise ConvertError(
            f"running on {world} processes, but --tp {args.tp} x --pp {args.pp} = {args.tp * args.pp}"
        )
    init_distributed(ParallelConfig(tensor_model_parallel_size=args.tp, pipeline_model_parallel_size=args.pp))
    try:
        {"hf-to-mcore": hf_to_mcore, "mcore-to-hf": mcore_to_hf, "verify": verify}[args.command](args)
    finally:
        destroy_distributed()


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="calibrl convert", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    to_mcore = sub.add_parser("hf-to-mcore", help="HF safetensors -> Megatron dist checkpoint")
    to_hf = sub.add_parser("mcore-to-hf", help="Megatron dist checkpoint -> HF safetensors")
    check = sub.add_parser("verify", help="HF vs Megatron-from-checkpoint logits")
    for p in (to_mcore, check):
        p.add_argument("--hf-dir", type=Path, required=True, help="HF checkpoint directory")
        p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="Megatron parameter dtype")
    for p in (to_hf, check):
        p.add_argument("--mcore-dir", type=Path, required=True, help="an hf-to-mcore output directory")
    for p in (to_mcore, to_hf):
        p.add_argument("--out-dir", type=Path, required=True, help="written as <out>.tmp, renamed when done")
        p.add_argument("--overwrite", action="store_true", help="replace an existing --out-dir")
        p.add_argument("--buffer-mb", type=float, default=256, help="tensor data held at a time, per rank")
    for p in (to_mcore, to_hf, check):
        p.add_argument("--tp", type=int, default=1, help="tensor-parallel size of the Megatron side")
        p.add_argument("--pp", type=int, default=1, help="pipeline-parallel size of the Megatron side")
        p.add_argument("--num-layers-in-first-pipeline-stage", type=int, metavar="N",
                       help="decoder layers on the first PP stage (default: even, or balanced when --pp does not "
                            "divide the layers)")  # fmt: skip
        p.add_argument("--num-layers-in-last-pipeline-stage", type=int, metavar="N",
                       help="decoder layers on the last PP stage")
    to_hf.add_argument(
        "--hf-config-from", type=Path, help="HF dir for config/tokenizer (default <mcore>/hf_config)"
    )
    to_hf.add_argument(
        "--dtype", choices=sorted(DTYPES), help="HF tensor dtype (default: the checkpoint's main one)"
    )
    check.add_argument("--tol", type=float, default=1e-4, help="max allowed |dlogits| (default 1e-4, fp32)")
    check.add_argument("--report", type=Path, help="write the per-input max |dlogits| as JSON")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Exit code: 0 done; 2 bad input (message on stderr); torchrun's code if a spawned rank failed."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    rank = int(os.environ.get("RANK", "0"))
    tmp = args.out_dir.with_name(args.out_dir.name + ".tmp") if hasattr(args, "out_dir") else None
    done = False
    try:
        if "RANK" not in os.environ:  # cheap checks before starting processes, then torchrun if needed
            flag = "--hf-dir" if hasattr(args, "hf_dir") else "--hf-config-from"
            check_layout(
                read_hf_config(getattr(args, "hf_dir", None) or _hf_files_source(args), flag),
                args.tp,
                args.pp,
                pipeline_split(args),
            )
            if args.command == "verify":
                check_verify_inputs(args.hf_dir)
            if tmp is not None and args.out_dir.exists() and not args.overwrite:
                raise ConvertError(f"--out-dir {args.out_dir} exists: remove it or pass --overwrite")
            if args.tp * args.pp > 1:
                rc = _launch_torchrun(argv, args.tp * args.pp)
                done = rc == 0
                return rc
        _run_here(args)
        done = True
    except ConvertError as err:  # torchrun stops the other ranks when one exits
        where = f" (rank {rank})" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""
        print(f"calibrl convert {args.command}{where}: error: {err}", file=sys.stderr)
        return 2
    finally:  # after any failure, nothing named like a result is left behind
        if not done and tmp is not None and rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
