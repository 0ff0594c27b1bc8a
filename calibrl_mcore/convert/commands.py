"""The hf-to-mcore and mcore-to-hf commands (on every rank), and their staged, all-or-nothing output."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
from pathlib import Path

from calibrl_mcore.convert.dist_ckpt import CheckpointReader, merge_parts, save_part
from calibrl_mcore.convert.hf_reader import HFCheckpoint, check_hf_tensors, convert_param
from calibrl_mcore.convert.stage import (
    DTYPES,
    ConvertError,
    _is_tensor,
    build_stage,
    pipeline_split,
    plan_groups,
    read_hf_config,
)

COMPLETE = "COMPLETE"


def _staging(out_dir: Path, overwrite: bool) -> Path:
    """Collective: a fresh `<out>.tmp` (made by rank 0); `<out>` itself appears only when complete."""
    import torch.distributed as dist

    if out_dir.exists() and not overwrite:
        raise ConvertError(f"--out-dir {out_dir} exists: remove it or pass --overwrite")
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    if dist.get_rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    return tmp


def _copy_hf_files(src: Path, dst: Path) -> None:
    """Config, generation config, tokenizer, processor and chat template files (not the weight index)."""
    from calibrl_mcore.trainer.export import COPIED_FILES, SKIPPED

    dst.mkdir(parents=True, exist_ok=True)
    for f in (f for pattern in COPIED_FILES for f in src.glob(pattern) if f.name not in SKIPPED):
        shutil.copy2(f, dst / f.name)


def _publish(tmp: Path, out_dir: Path) -> None:
    """Rank 0: rename the finished `tmp` to `out_dir` (one rename: never a half-written `out_dir`)."""
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)


def _bar(total: int, desc: str):
    import torch.distributed as dist
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="group", disable=dist.get_rank() != 0)


def hf_to_mcore(args: argparse.Namespace) -> None:
    import torch
    import torch.distributed as dist

    hf_config = read_hf_config(args.hf_dir, "--hf-dir")
    stage = build_stage(hf_config, getattr(torch, DTYPES[args.dtype]), pipeline_split(args))
    ckpt = HFCheckpoint(args.hf_dir, stage.mapping)
    check_hf_tensors(ckpt, stage)
    tmp = _staging(args.out_dir, args.overwrite)
    groups = plan_groups(stage.items, int(args.buffer_mb * 2**20))
    count = torch.tensor([len(groups)])
    dist.all_reduce(count, op=dist.ReduceOp.MAX)  # every rank takes part in every (collective) save
    parts = [tmp / "parts" / f"{k:05d}" for k in range(int(count))]
    with _bar(len(parts), "hf-to-mcore") as bar:
        for k, part in enumerate(parts):
            items = [(n, dataclasses.replace(sh, data=convert_param(stage, ckpt, n, sh.data.dtype)) if _is_tensor(sh)
                      else sh) for n, sh in (groups[k] if k < len(groups) else [])]  # fmt: skip
            save_part(items, part)
            del items
            bar.update()
    dist.barrier()
    if dist.get_rank() == 0:
        merge_parts(parts, tmp / "megatron")
        shutil.rmtree(tmp / "parts")
        _copy_hf_files(args.hf_dir, tmp / "hf_config")
        meta = dict(source=str(args.hf_dir), arch=hf_config.model_type, dtype=args.dtype, spec="local",
                    tensor_model_parallel_size=args.tp, pipeline_model_parallel_size=args.pp,
                    **stage.split.config_kwargs())  # fmt: skip
        (tmp / "convert.json").write_text(json.dumps(meta, indent=2) + "\n")
        (tmp / COMPLETE).write_text("hf-to-mcore\n")
        _publish(tmp, args.out_dir)
    dist.barrier()


def _hf_files_source(args: argparse.Namespace) -> Path:
    """Where mcore-to-hf / verify take config and tokenizer files from; checks --mcore-dir is complete."""
    if not (args.mcore_dir / COMPLETE).is_file() or not (args.mcore_dir / "megatron" / ".metadata").is_file():
        raise ConvertError(
            f"--mcore-dir {args.mcore_dir}: not a complete checkpoint (needs megatron/ and {COMPLETE})"
        )
    src = getattr(args, "hf_config_from", None) or args.mcore_dir / "hf_config"
    if not (src / "config.json").is_file():
        raise ConvertError(f"{src} has no config.json: pass --hf-config-from <an HF dir of this model>")
    return src


def mcore_to_hf(args: argparse.Namespace) -> None:
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from safetensors.torch import save_file

    from model_providers.hf_mapping import gather_megatron_to_hf

    src = _hf_files_source(args)
    # dtypes: the checkpoint's; the split: any (the checkpoint's layers are global, resharded on read)
    stage = build_stage(read_hf_config(src, "--hf-config-from"), torch.float32, pipeline_split(args))
    reader = CheckpointReader(args.mcore_dir / "megatron")
    dtype = getattr(torch, DTYPES[args.dtype]) if args.dtype else reader.main_dtype()
    tmp = _staging(args.out_dir, args.overwrite)
    exported = [
        (n, sh) for n, sh in stage.items if _is_tensor(sh) and stage.mapping.match_megatron(n)[0].export
    ]
    groups = plan_groups(exported, int(args.buffer_mb * 2**20))
    files: list[tuple[str, list[str], int]] = []  # (file, HF names, bytes) written by this rank
    with _bar(len(groups), "mcore-to-hf") as bar:
        for k, group in enumerate(groups):
            local = reader.load(group)
            hf = {n: t.to(dtype) for n, t in gather_megatron_to_hf(local.items(), stage.mapping, stage.placement,
                                                                   ps.get_tensor_model_parallel_group(),
                                                                   checkpoint_names=True)}  # fmt: skip
            del local
            if ps.get_tensor_model_parallel_rank() == 0:
                name = f"part-pp{ps.get_pipeline_model_parallel_rank():03d}-{k:05d}.safetensors"
                save_file(hf, str(tmp / name), metadata={"format": "pt"})
                files.append((name, sorted(hf), sum(t.numel() * t.element_size() for t in hf.values())))
            del hf
            bar.update()
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, files)
    if dist.get_rank() == 0:
        ordered = [f for rank_files in gathered for f in rank_files]  # global ranks are PP-major: stage order
        weight_map = {}
        for i, (name, names, _) in enumerate(ordered):
            final = f"model-{i + 1:05d}-of-{len(ordered):05d}.safetensors"
            os.replace(tmp / name, tmp / final)
            weight_map.update(dict.fromkeys(names, final))
        index = {
            "metadata": {"total_size": sum(f[2] for f in ordered)},
            "weight_map": dict(sorted(weight_map.items())),
        }
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        _copy_hf_files(src, tmp)
        _publish(tmp, args.out_dir)
    dist.barrier()
