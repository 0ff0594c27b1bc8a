"""Megatron dist checkpoints: groups saved as standalone parts, parts merged into one, local shards read back."""

from __future__ import annotations

import dataclasses
import math
import os
import pickle
import shutil
from pathlib import Path
from typing import Any

from calibrl_mcore.convert.stage import ConvertError, _is_tensor, _sharded_tensors

STACK_SEP = "@@stacked:"
OBJECT_TAG = "@@object/shard_0_1"  # fqn suffix of a ShardedObject saved alone (key '<unique key>@@object')


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
