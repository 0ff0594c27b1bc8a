"""One DP replica's rows on the wire: token ids and image references in flat columns, no pixel tensor.

    prompts (once per group in the shard)   uid, chat text, image refs (path or encoded bytes), image grid,
                                            prompt ids (int32, flat + offsets)
    rows                                    prompt index, group id, is_expert, reward / acc / fmt (float64),
                                            response ids (int32) and rollout log-probs (float32 when that is
                                            exact, else float64), finish reason, extras, global row index

The G + 1 rows of a prompt share one prompt entry (their prompt ids, ~20k tokens at the paper's setting,
are sent once) and, after `unpack_shard`, one `prompt_ids` list. The pixel values are not here: each
replica's first pipeline stage encodes the refs itself (`calibrl_mcore.trainer.data_plane`). The payload
is a pickle of plain containers and numpy arrays; a torch tensor anywhere in it is refused (`pack_shard`),
so no pixel tensor can travel by accident.
"""

from __future__ import annotations

import io
import pickle
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from calibrl_mcore.trainer.batch import Row

__all__ = ["WIRE_VERSION", "pack_shard", "unpack_shard"]

WIRE_VERSION = 1


class _NoTensorPickler(pickle.Pickler):
    def reducer_override(self, obj: Any) -> Any:
        if isinstance(obj, torch.Tensor):
            raise TypeError(f"a torch tensor {tuple(obj.shape)} in a data-plane shard: shards carry token ids "
                            "and image references only (pixels are encoded by each replica)")
        return NotImplemented


def _flat(seqs: Sequence[Sequence[int | float]], dtype: Any) -> tuple[np.ndarray, np.ndarray]:
    """[n] sequences -> (values [sum len], offsets [n + 1])."""
    offsets = np.zeros(len(seqs) + 1, dtype=np.int64)
    np.cumsum([len(s) for s in seqs], out=offsets[1:])
    values = np.concatenate([np.asarray(s, dtype=dtype) for s in seqs]) if seqs else np.zeros(0, dtype)
    return values, offsets


def _float_column(seqs: Sequence[Sequence[float]]) -> tuple[np.ndarray, np.ndarray]:
    """Log-probs as float32 when every value survives the round trip (fp32 engines), else float64."""
    values, offsets = _flat(seqs, np.float64)
    narrow = values.astype(np.float32)
    return (narrow if np.array_equal(narrow.astype(np.float64), values) else values), offsets


def pack_shard(rows: Sequence[Row], indices: Sequence[int], header: dict[str, Any]) -> bytes:
    """Serialise rows[i] for i in `indices` (global row indices, kept for ordering and errors) plus a small
    `header` (plain values) into one byte string."""
    prompt_of: dict[int, int] = {}  # group id -> prompt entry
    prompts: list[Row] = []
    for i in indices:
        if rows[i].group_id not in prompt_of:
            prompt_of[rows[i].group_id] = len(prompts)
            prompts.append(rows[i])
    sel = [rows[i] for i in indices]
    for r in sel:
        first = prompts[prompt_of[r.group_id]]
        if r.prompt_ids is not first.prompt_ids and r.prompt_ids != first.prompt_ids:
            raise ValueError(f"rows of group {r.group_id} ({r.uid!r}) have different prompts: a group is one prompt")
    prompt_ids, prompt_offsets = _flat([p.prompt_ids for p in prompts], np.int32)
    response_ids, response_offsets = _flat([r.response_ids for r in sel], np.int32)
    logprobs, logprob_offsets = _float_column([r.rollout_logprobs or [] for r in sel])
    payload = {
        "version": WIRE_VERSION,
        "header": header,
        "prompt": {
            "uid": [p.uid for p in prompts],
            "text": [p.prompt_text for p in prompts],
            "images": [tuple(p.images) for p in prompts],
            "grid": [None if p.image_grid_thw is None else p.image_grid_thw.tolist() for p in prompts],
            "ids": prompt_ids, "offsets": prompt_offsets,
        },
        "row": {
            "index": np.asarray(indices, dtype=np.int64),
            "prompt": np.asarray([prompt_of[r.group_id] for r in sel], dtype=np.int32),
            "group_id": np.asarray([r.group_id for r in sel], dtype=np.int64),
            "is_expert": np.asarray([r.is_expert for r in sel], dtype=bool),
            "scores": np.asarray([(r.reward, r.acc, r.fmt) for r in sel], dtype=np.float64).reshape(-1, 3),
            "has_logprobs": np.asarray([r.rollout_logprobs is not None for r in sel], dtype=bool),
            "finish_reason": [r.finish_reason for r in sel],
            "extras": [r.extras for r in sel],
            "response_ids": response_ids, "response_offsets": response_offsets,
            "logprobs": logprobs, "logprob_offsets": logprob_offsets,
        },
    }
    buf = io.BytesIO()
    _NoTensorPickler(buf, protocol=pickle.HIGHEST_PROTOCOL).dump(payload)
    return buf.getvalue()


def unpack_shard(data: bytes | bytearray | memoryview) -> tuple[list[Row], list[int], dict[str, Any]]:
    """(rows, their global indices, header) of a `pack_shard` payload. Rows of one prompt share one
    `prompt_ids` list and one `image_grid_thw` tensor; `pixel_values` is None (the replica encodes)."""
    payload = pickle.loads(data)
    if payload.get("version") != WIRE_VERSION:
        raise ValueError(f"data-plane shard version {payload.get('version')!r}, this trainer reads {WIRE_VERSION}: "
                         "every rank must run the same code")
    p, r = payload["prompt"], payload["row"]
    po = p["offsets"]
    prompt_ids = [p["ids"][po[k] : po[k + 1]].tolist() for k in range(len(p["uid"]))]
    grids = [None if g is None else torch.tensor(g, dtype=torch.int64) for g in p["grid"]]
    ro, lo = r["response_offsets"], r["logprob_offsets"]
    rows = []
    for j, k in enumerate(r["prompt"].tolist()):
        reward, acc, fmt = r["scores"][j].tolist()
        rows.append(Row(
            uid=p["uid"][k], group_id=int(r["group_id"][j]), is_expert=bool(r["is_expert"][j]),
            prompt_ids=prompt_ids[k], response_ids=r["response_ids"][ro[j] : ro[j + 1]].tolist(),
            image_grid_thw=grids[k], images=tuple(p["images"][k]), prompt_text=p["text"][k],
            rollout_logprobs=r["logprobs"][lo[j] : lo[j + 1]].tolist() if r["has_logprobs"][j] else None,
            reward=reward, acc=acc, fmt=fmt, finish_reason=r["finish_reason"][j], extras=r["extras"][j],
        ))
    return rows, r["index"].tolist(), payload["header"]
