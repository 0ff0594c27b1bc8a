"""HF <-> Megatron distributed checkpoint conversion, streamed, for every architecture in the registry.

    calibrl convert hf-to-mcore --hf-dir D --out-dir O --tp 2 --pp 1 [--dtype fp32|bf16]
    calibrl convert mcore-to-hf --mcore-dir O --out-dir H [--hf-config-from D] [--tp N --pp M]
    calibrl convert verify      --hf-dir D --mcore-dir O --tp 1 --pp 2 [--tol 1e-4]

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
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import json
import math
import os
import pickle
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DTYPES = {"fp32": "float32", "bf16": "bfloat16"}
STACK_SEP = "@@stacked:"
OBJECT_TAG = "@@object/shard_0_1"  # fqn suffix of a ShardedObject saved alone (key '<unique key>@@object')
COMPLETE = "COMPLETE"


class ConvertError(Exception):
    """Bad input or layout. Raised identically on every rank (no rank is left waiting in a collective)."""


# ---- checks that need no process group (before launching torchrun, and on every rank) -------------------


def read_hf_config(path: Path, flag: str):
    """AutoConfig of `path`, its architecture checked against the model providers' registry."""
    from transformers import AutoConfig

    from model_providers.registry import supported_architectures

    if not (path / "config.json").is_file():
        raise ConvertError(f"{flag} {path}: no config.json (point it at an HF checkpoint directory)")
    raw = json.loads((path / "config.json").read_text())
    if raw.get("model_type") not in supported_architectures():
        raise ConvertError(
            f"{path}/config.json: model_type={raw.get('model_type')!r} (architectures={raw.get('architectures')}) "
            f"is not supported; supported: {supported_architectures()} (a new architecture needs a builder in "
            "model_providers/registry.py and an hf_mapping rule table)"
        )
    return AutoConfig.from_pretrained(path)


def check_layout(hf_config, tp: int, pp: int) -> None:
    """TP must divide the attention heads and KV groups (text and vision), PP the decoder layers."""
    text, vision = hf_config.text_config, hf_config.vision_config
    fields = {
        "text_config.num_attention_heads": text.num_attention_heads,
        "text_config.num_key_value_heads": text.num_key_value_heads,
        "vision_config.num_heads": getattr(vision, "num_heads", None),
        "vision_config.num_attention_heads": getattr(vision, "num_attention_heads", None),
    }
    if tp < 1 or pp < 1:
        raise ConvertError(f"--tp and --pp must be >= 1, got --tp {tp} --pp {pp}")
    for field, value in fields.items():
        if value is not None and value % tp:
            raise ConvertError(f"--tp {tp} does not divide {field}={value}: pick a TP that divides it")
    if text.num_hidden_layers % pp:
        raise ConvertError(
            f"--pp {pp} does not divide text_config.num_hidden_layers={text.num_hidden_layers}: "
            "pick a PP that divides it (every stage holds the same number of decoder layers)"
        )


# ---- this rank's stage on the meta device, and its groups ------------------------------------------------


@dataclasses.dataclass
class Stage:
    """This rank's Megatron stage (meta tensors), its rule table, placement and checkpoint entries."""

    model: Any
    mapping: Any
    placement: Any
    items: list[tuple[str, Any]]  # (state-dict name, ShardedTensor | ShardedTensorFactory | ShardedObject)


def build_stage(hf_config, dtype, *, meta: bool = True) -> Stage:
    import torch
    from megatron.core import parallel_state as ps

    from model_providers.hf_mapping import Placement, get_mapping
    from model_providers.registry import build_model

    check_layout(
        hf_config, ps.get_tensor_model_parallel_world_size(), ps.get_pipeline_model_parallel_world_size()
    )
    with torch.device("meta" if meta else "cpu"):
        model = build_model(hf_config, params_dtype=dtype, pre_process=ps.is_pipeline_first_stage(),
                            post_process=ps.is_pipeline_last_stage(), spec="local")  # fmt: skip
    mapping = get_mapping(hf_config.model_type, hf_config, model.backend)  # the builder registered it
    return Stage(
        model, mapping, Placement.from_parallel_state(model.config), list(model.sharded_state_dict().items())
    )


def _is_tensor(sh) -> bool:
    """ShardedTensor / ShardedTensorFactory (they carry a tensor), not a ShardedObject."""
    return hasattr(getattr(sh, "data", None), "shape")


def plan_groups(items: list, budget_bytes: int) -> list[list]:
    """Consecutive items in groups of at most `budget_bytes` (a larger tensor gets a group of its own).
    Depends only on local shapes, so the ranks of a TP group get the same groups (their gathers line up)."""
    groups: list[list] = [[]]
    size = 0
    for name, sh in items:
        nbytes = sh.data.numel() * sh.data.element_size() if _is_tensor(sh) else 0
        if groups[-1] and size + nbytes > budget_bytes:
            groups.append([])
            size = 0
        groups[-1].append((name, sh))
        size += nbytes
    return [g for g in groups if g]


def _sharded_tensors(sh, data) -> list:
    """`sh` with `data` as ShardedTensors (a factory, e.g. SwiGLU fc1, is built: one view per half)."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensorFactory

    if isinstance(sh, ShardedTensorFactory):
        return list(nested_values(dataclasses.replace(sh, data=data).build()))
    return [dataclasses.replace(sh, data=data, dtype=data.dtype)]


# ---- HF side: headers first, then one tensor at a time -------------------------------------------------


class HFCheckpoint:
    """Names (canonical), shapes and files of an HF checkpoint's tensors, from the headers only."""

    def __init__(self, path: Path, mapping) -> None:
        from safetensors import safe_open

        self.path, self.where, self.shapes = path, {}, {}
        for file in sorted(path.glob("*.safetensors")):
            with safe_open(file, framework="pt") as f:
                for raw in f.keys():  # noqa: SIM118 (safe_open has no __iter__)
                    name = mapping.canonical_hf_name(raw)
                    if name in self.where:
                        raise ConvertError(
                            f"HF tensor {raw!r} is in {self.where[name][0].name} and {file.name}"
                        )
                    self.where[name], self.shapes[name] = (file, raw), tuple(f.get_slice(raw).get_shape())
        if not self.where:
            raise ConvertError(f"--hf-dir {path}: no *.safetensors files")

    def read(self, name: str):
        from safetensors import safe_open

        file, raw = self.where[name]
        with safe_open(file, framework="pt") as f:  # opened per tensor: no file mapping outlives its read
            return f.get_tensor(raw)


def expected_hf_tensors(stage: Stage) -> dict[str, tuple[tuple[int, ...] | None, str]]:
    """HF name -> (shape, Megatron name) that this stage reads: the inverse map run on meta tensors."""
    from model_providers.hf_mapping import megatron_to_hf

    expected: dict = {}
    for name, param in stage.model.named_parameters():
        rule, layer = stage.mapping.match_megatron(name)
        if not rule.export:  # a copy that is read but never written back (the tied output layer)
            expected.update(
                {h: (None, name) for h in stage.placement.hf_names(rule, layer) if h not in expected}
            )
            continue
        shards = [{name: param}] * stage.placement.tp_size  # meta tensors: only shapes flow through
        expected.update(
            {h: (tuple(t.shape), name) for h, t in megatron_to_hf(shards, stage.mapping, stage.placement)}
        )
    return expected


def check_hf_tensors(ckpt: HFCheckpoint, stage: Stage) -> None:
    """Missing / unexpected / wrongly shaped HF tensors over all stages (the same verdict on every rank)."""
    import torch.distributed as dist

    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, expected_hf_tensors(stage))
    expected = {n: v for part in gathered for n, v in part.items() if v[0] is not None}
    expected.update({n: v for part in gathered for n, v in part.items() if n not in expected})

    def ignored(name: str) -> bool:  # e.g. lm_head.weight of a tied model
        try:
            return not stage.mapping.match_hf(name)
        except KeyError:
            return False

    disk = {
        n: ckpt.where[n][1] if n in ckpt.where else stage.mapping.checkpoint_hf_name(n)
        for n in {*ckpt.where, *expected}
    }
    problems = [
        f"missing HF tensor {disk[n]!r} (for Megatron {m!r})"
        for n, (_, m) in sorted(expected.items())
        if n not in ckpt.shapes
    ]
    problems += [
        f"unexpected HF tensor {disk[n]!r} (no rule reads it, or config.json has fewer layers)"
        for n in sorted(ckpt.shapes)
        if n not in expected and not ignored(n)
    ]
    problems += [f"HF tensor {disk[n]!r} has shape {list(ckpt.shapes[n])}, but config.json implies {list(s)} "
                 f"(for Megatron {m!r})" for n, (s, m) in sorted(expected.items())
                 if n in ckpt.shapes and s is not None and ckpt.shapes[n] != s]  # fmt: skip
    if problems:
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise ConvertError(f"--hf-dir {ckpt.path} does not match its config.json:\n  " + "\n  ".join(problems[:20])
                           + f"{more}\nFix: use the config.json that belongs to these weights (sizes, layer "
                           "count, tie_word_embeddings), or re-download the checkpoint.")  # fmt: skip


def convert_param(stage: Stage, ckpt: HFCheckpoint, name: str, dtype):
    """One Megatron tensor (this rank's TP slice) from its HF tensor(s), read on demand."""
    from model_providers.hf_mapping import hf_to_megatron

    rule, layer = stage.mapping.match_megatron(name)
    hf_names = stage.placement.hf_names(rule, layer)
    plain_copy = rule.fusion.num_parts == rule.hf_chunks == 1
    if plain_copy and (rule.tp_axis is None or stage.placement.tp_size == 1):
        return ckpt.read(hf_names[0]).to(
            dtype
        )  # skip the converter's slice clone (2x the peak for this tensor)
    state = hf_to_megatron(((n, ckpt.read(n)) for n in hf_names), stage.mapping, stage.placement)
    return state[name].to(dtype)


# ---- parts: one dist checkpoint per group, merged into one ----------------------------------------------


def _standalone(sh):
    """A layer-stacked ShardedTensor ([layers, ...] at this layer's offset) or a ShardedObject (one of
    `layers`) as an entry of its own, so a part can hold any subset of layers; `merge_parts` undoes it."""
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    if isinstance(sh, ShardedObject):
        return dataclasses.replace(sh, key=sh.unique_key + OBJECT_TAG.split("/")[0], global_shape=(1,),
                                   global_offset=(0,))  # fmt: skip
    k = sh.prepend_axis_num
    if k == 0:
        return sh
    tag = ",".join(map(str, sh.global_offset[:k])) + "|" + ",".join(map(str, sh.global_shape[:k]))
    return dataclasses.replace(sh, key=f"{sh.key}{STACK_SEP}{tag}", global_shape=(1,) * k + sh.global_shape[k:],
                               global_offset=(0,) * k + sh.global_offset[k:],
                               axis_fragmentations=(1,) * k + sh.axis_fragmentations[k:])  # fmt: skip


def save_part(items: list[tuple[str, Any]], part_dir: Path) -> None:
    """Collective: save one group (possibly empty on this rank) as a standalone dist checkpoint."""
    import torch.distributed as dist
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.strategies.torch import TorchDistSaveShardedStrategy

    if dist.get_rank() == 0:
        part_dir.mkdir(parents=True)
    dist.barrier()
    flat = {f"{name}.{i}": _standalone(piece) for name, sh in items
            for i, piece in enumerate(_sharded_tensors(sh, sh.data) if _is_tensor(sh) else [sh])}  # fmt: skip
    strategy = TorchDistSaveShardedStrategy("torch_dist", 1, thread_count=1)
    dist_checkpointing.save({"model": flat}, str(part_dir), sharded_strategy=strategy)


def _parse_fqn(fqn: str) -> tuple[str, tuple[int, ...], tuple[int, ...]]:
    """'key@@stacked:3|28' -> ('key', (3,), (28,)); '<unique key>@@object/shard_0_1' -> ('<unique key>',
    (), ()); any other fqn -> (fqn, (), ())."""
    if fqn.endswith(OBJECT_TAG):
        return fqn[: -len(OBJECT_TAG)], (), ()
    if STACK_SEP not in fqn:
        return fqn, (), ()
    base, tag = fqn.split(STACK_SEP)
    index, sizes = (tuple(int(x) for x in s.split(",")) for s in tag.split("|"))
    return base, index, sizes


def merge_parts(parts: list[Path], out: Path) -> None:
    """The parts' DCP metadata -> one checkpoint in `out` (data files moved, per-layer keys restacked)."""
    import torch
    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata as Chunk
    from torch.distributed.checkpoint.metadata import Metadata, MetadataIndex, TensorStorageMetadata

    out.mkdir(parents=True)
    entries: dict[str, Any] = {}
    storage: dict = {}
    for k, part in enumerate(parts):
        md = pickle.loads((part / ".metadata").read_bytes())
        renamed = {f.name: f"p{k:05d}{f.name}" for f in part.glob("*.distcp")}
        for old, new in renamed.items():
            os.replace(part / old, out / new)
        for fqn, item in md.state_dict_metadata.items():
            base, index, stack = _parse_fqn(fqn)
            if not isinstance(item, TensorStorageMetadata):
                entries[base] = item  # bytes of a ShardedObject
                continue
            size = torch.Size(stack + tuple(item.size[len(stack) :]))
            entry = entries.setdefault(base, TensorStorageMetadata(item.properties, size, []))
            if entry.size != size:
                raise RuntimeError(f"{base}: global size {tuple(size)} in part {k} != {tuple(entry.size)}")
            entry.chunks += [
                Chunk(torch.Size(index + tuple(c.offsets[len(index) :])), c.sizes) for c in item.chunks
            ]
        for idx, info in md.storage_data.items():
            base, index, _ = _parse_fqn(idx.fqn)
            offset = None if idx.offset is None else torch.Size(index + tuple(idx.offset[len(index) :]))
            storage[MetadataIndex(base, offset)] = dataclasses.replace(
                info, relative_path=renamed[info.relative_path]
            )
    for key, entry in entries.items():  # every element of every tensor written exactly once
        if isinstance(entry, TensorStorageMetadata):
            covered = sum(math.prod(c.sizes) for c in entry.chunks)
            distinct = len({tuple(c.offsets) for c in entry.chunks}) == len(entry.chunks)
            if covered != math.prod(entry.size) or not distinct:
                raise RuntimeError(f"{key}: chunks cover {covered} of {math.prod(entry.size)} elements")
    first = pickle.loads((parts[0] / ".metadata").read_bytes())
    (out / ".metadata").write_bytes(pickle.dumps(Metadata(entries, first.planner_data, storage, first.storage_meta,
                                                          first.version)))  # fmt: skip
    for name in ("common.pt", "metadata.json"):
        shutil.copy2(parts[0] / name, out / name)


# ---- reading any local shards back (DCP's resharding planner; no collectives) ----------------------------


class _InPlace:
    """What FileSystemReader.read_data needs of a LoadPlanner: destinations for the read items."""

    def __init__(self, targets: dict) -> None:
        self.targets = targets  # MetadataIndex(fqn, local chunk offsets) -> destination view

    def resolve_tensor(self, item):
        view = self.targets[item.dest_index]
        for dim, (start, length) in enumerate(zip(item.dest_offsets, item.lengths)):
            view = view.narrow(dim, start, length)
        return view

    def commit_tensor(self, item, tensor) -> None:  # already written in place
        pass


class CheckpointReader:
    """This rank's local tensors for any group of entries of a torch_dist checkpoint (any saving layout)."""

    def __init__(self, ckpt_dir: Path) -> None:
        from torch.distributed.checkpoint import FileSystemReader

        self.dir, self.reader = ckpt_dir, FileSystemReader(str(ckpt_dir))
        self.metadata = self.reader.read_metadata()
        self.reader.set_up_storage_reader(self.metadata, is_coordinator=True)

    def main_dtype(self):
        """The dtype holding most of the checkpoint's bytes (local-spec norms stay fp32 in bf16 models)."""
        sizes: dict = {}
        for item in self.metadata.state_dict_metadata.values():
            if hasattr(item, "properties"):
                sizes[item.properties.dtype] = sizes.get(item.properties.dtype, 0) + math.prod(item.size)
        return max(sizes, key=sizes.get)

    def load(self, items: list[tuple[str, Any]]) -> dict[str, Any]:
        import torch
        from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex
        from torch.distributed.checkpoint.planner import LoadPlan
        from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

        out, targets, reads = {}, {}, []
        for name, sh in items:
            stored = self.metadata.state_dict_metadata.get(sh.key)
            if stored is None:
                raise ConvertError(
                    f"{self.dir} has no tensor {sh.key!r} (for {name}): another architecture/config?"
                )
            out[name] = torch.zeros(sh.data.shape, dtype=stored.properties.dtype)  # zeros: TP padding rows
            for piece in _sharded_tensors(sh, out[name]):
                if tuple(stored.size) != piece.global_shape and not piece.allow_shape_mismatch:
                    raise ConvertError(f"{piece.key}: checkpoint shape {list(stored.size)} != {list(piece.global_shape)}"
                                       " from the HF config (wrong --hf-config-from?)")  # fmt: skip
                view = piece.data.view((1,) * piece.prepend_axis_num + piece.local_shape)
                chunk = ChunkStorageMetadata(torch.Size(piece.global_offset), view.shape)
                targets[MetadataIndex(piece.key, chunk.offsets)] = view
                reads += create_read_items_for_chunk_list(piece.key, stored, [chunk])
        self.reader.read_data(LoadPlan(reads), _InPlace(targets)).wait()
        return out


# ---- the commands (on every rank) ------------------------------------------------------------------------


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
    stage = build_stage(hf_config, getattr(torch, DTYPES[args.dtype]))
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
                    tensor_model_parallel_size=args.tp, pipeline_model_parallel_size=args.pp)  # fmt: skip
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
    stage = build_stage(read_hf_config(src, "--hf-config-from"), torch.float32)  # dtypes: the checkpoint's
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


def verify_inputs(hf_dir: Path) -> dict[str, dict]:
    """Text-only, one-image and two-image prompts through the checkpoint's own chat template + processor."""
    import numpy as np
    from PIL import Image

    from tools.make_tiny_model import load_processor

    processor = load_processor(hf_dir)
    rng = np.random.RandomState(0)
    images = [
        Image.fromarray(rng.randint(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in ((112, 84), (56, 112))
    ]
    cases = {}
    for case, n in (("text", 0), ("one_image", 1), ("two_images", 2)):
        content = [{"type": "image"}] * n + [{"type": "text", "text": "What is 12 + 30? Think step by step."}]
        prompt = processor.apply_chat_template(
            [{"role": "user", "content": content}], add_generation_prompt=True
        )
        cases[case] = dict(processor(text=[prompt], images=images[:n] or None, return_tensors="pt"))
    return cases


def megatron_logits(model, hf_config, inputs: dict, dtype):
    """Gathered logits [b, s, V] on the last stage (None elsewhere): one forward through the PP schedule."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from model_providers.registry import position_ids

    ids, grid, pixels = inputs["input_ids"], inputs.get("image_grid_thw"), inputs.get("pixel_values")
    positions = position_ids(hf_config, ids, grid, inputs.get("attention_mask"))
    captured = {}

    def keep(logits):
        captured["logits"] = logits.detach().float()
        return logits.sum() * 0.0, {}

    def forward_step(data_iterator, chunk):
        next(data_iterator)
        return chunk(ids, positions, None, pixel_values=None if pixels is None else pixels.to(dtype),
                     image_grid_thw=grid, runtime_gather_output=True), keep  # fmt: skip

    get_forward_backward_func()(forward_step_func=forward_step, data_iterator=iter([None]), model=[model],
                                num_microbatches=1, seq_length=ids.shape[1], micro_batch_size=ids.shape[0],
                                forward_only=True)  # fmt: skip
    return captured.get("logits")


def verify(args: argparse.Namespace) -> None:
    """Max |logits(HF) - logits(Megatron loaded from the checkpoint at this layout)| per input, vs --tol."""
    import torch
    import torch.distributed as dist
    from megatron.core import dist_checkpointing
    from megatron.core import parallel_state as ps

    _hf_files_source(args)
    hf_config = read_hf_config(args.hf_dir, "--hf-dir")
    dtype = getattr(torch, DTYPES[args.dtype])
    model = build_stage(hf_config, dtype, meta=False).model.eval()
    state = dist_checkpointing.load({"model": model.sharded_state_dict()}, str(args.mcore_dir / "megatron"))
    model.load_state_dict(state["model"])  # Megatron's own loader: what the trainer does
    cases = verify_inputs(args.hf_dir)
    compare = ps.is_pipeline_last_stage() and ps.get_tensor_model_parallel_rank() == 0
    if compare:
        from transformers import AutoModelForImageTextToText

        hf_model = AutoModelForImageTextToText.from_pretrained(args.hf_dir, dtype=dtype).eval()
    diffs = {}
    with torch.no_grad():
        for case, inputs in cases.items():
            logits = megatron_logits(model, hf_config, inputs, dtype)
            if compare:
                real = inputs["attention_mask"].bool()  # [b, s]: real tokens only
                diffs[case] = (logits - hf_model(**inputs).logits.float())[real].abs().max().item()
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, diffs)
    diffs = next(d for d in gathered if d)
    if dist.get_rank() == 0:
        for case, diff in diffs.items():
            print(f"verify {case}: max |dlogits| = {diff:.3e} (tol {args.tol:g}, TP={args.tp} PP={args.pp})")
        if args.report:
            args.report.write_text(
                json.dumps({"tp": args.tp, "pp": args.pp, "max_abs_diff": diffs}, indent=2)
            )
    if not max(diffs.values()) <= args.tol:
        raise ConvertError(
            f"logits differ by {max(diffs.values()):.3e} > --tol {args.tol:g}: the checkpoint does "
            "not reproduce the HF model (wrong --hf-dir or --dtype, or a conversion bug)"
        )


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
            )
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
