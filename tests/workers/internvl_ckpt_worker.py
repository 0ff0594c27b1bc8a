"""torchrun worker: Megatron distributed checkpoint (dist_checkpointing) of a tiny InternVL3, save/reload.

  --mode save: build the model at --tp, load the tiny HF checkpoint with seeded noise added to every tensor
      (so that default inits - zero class/position embeddings, unit norms - cannot hide a missed load), record
      each sharded-state-dict entry's replica id and offsets, then `dist_checkpointing.save` into --ckpt-dir
      exactly as the trainer does (`{"model": model.sharded_state_dict()}`).
  --mode load: build the model at --tp, overwrite every parameter with NaN, `dist_checkpointing.load` the
      --ckpt-dir, `model.load_state_dict`, then gather the parameters to HF names over TP and compare them
      bit-for-bit with the (noised) HF weights.
Writes rank{RANK}.json. Run: torchrun ... internvl_ckpt_worker.py --out DIR --tiny DIR --ckpt-dir DIR
--mode save|load --tp N
"""

from __future__ import annotations

import argparse
import json
import zlib
from pathlib import Path

import torch


def reference_weights(tiny: Path) -> dict[str, torch.Tensor]:
    """The tiny checkpoint's tensors (on-disk names) plus noise seeded by name, identical on every rank."""
    from calibrl_mcore.trainer.policy import iter_safetensors

    out = {}
    for name, tensor in iter_safetensors(tiny):
        gen = torch.Generator().manual_seed(zlib.crc32(name.encode()))
        out[name] = tensor + 0.1 * torch.randn(tensor.shape, generator=gen, dtype=tensor.dtype)
    return out


def _build(tiny: Path):
    from megatron.core import parallel_state
    from transformers import AutoConfig

    from model_providers.hf_mapping import Placement, get_mapping
    from model_providers.registry import build_model

    hf_config = AutoConfig.from_pretrained(tiny)
    model = build_model(hf_config, spec="local")
    mapping = get_mapping("internvl", hf_config, model.backend)
    placement = Placement.from_parallel_state(model.config)
    return model, mapping, placement, parallel_state.get_tensor_model_parallel_group()


def _replica_info(sharded_state_dict: dict) -> dict[str, list]:
    """key -> [replica_id, global_offset] of every ShardedTensor / ShardedObject (nested dicts flattened;
    factories, e.g. the decoder's SwiGLU fc1, build their shards later and are skipped)."""
    from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor

    info = {}
    for value in sharded_state_dict.values():
        if isinstance(value, dict):
            info.update(_replica_info(value))
        elif isinstance(value, (ShardedTensor, ShardedObject)):
            replica = value.replica_id if isinstance(value.replica_id, tuple) else (value.replica_id,)
            info[value.key] = [list(replica), list(value.global_offset)]
    return info


def run(out: Path, tiny: Path, ckpt_dir: Path, mode: str, tp: int) -> None:
    from megatron.core import dist_checkpointing

    from calibrl_mcore.parallel import ParallelConfig, destroy_distributed, init_distributed
    from model_providers.hf_mapping import gather_megatron_to_hf, load_hf_weights

    info = init_distributed(ParallelConfig(tensor_model_parallel_size=tp))
    result: dict = {"rank": info.rank, "tp_rank": info.tp_rank, "tp_size": info.tp_size, "mode": mode}
    reference = reference_weights(tiny)
    model, mapping, placement, tp_group = _build(tiny)

    if mode == "save":
        load_hf_weights(model, reference.items(), mapping, placement)
        sharded = model.sharded_state_dict()
        result["replicas"] = _replica_info(sharded)
        dist_checkpointing.save({"model": sharded}, str(ckpt_dir))
    else:
        with torch.no_grad():
            for param in model.parameters():
                param.fill_(float("nan"))
        loaded = dist_checkpointing.load({"model": model.sharded_state_dict()}, str(ckpt_dir))
        incompatible = model.load_state_dict(loaded["model"], strict=False)
        result["missing_keys"] = list(incompatible.missing_keys)
        result["unexpected_keys"] = list(incompatible.unexpected_keys)
        exported = dict(
            gather_megatron_to_hf(
                model.named_parameters(), mapping, placement, tp_group, checkpoint_names=True
            )
        )
        result["exported"] = sorted(exported)
        result["expected"] = sorted(reference)  # untied tiny model: every on-disk tensor is exported
        result["mismatch"] = sorted(
            n for n, t in exported.items() if n not in reference or not torch.equal(t, reference[n])
        )
        result["nonfinite"] = sorted(n for n, p in model.named_parameters() if not torch.isfinite(p).all())

    (out / f"rank{info.rank}.json").write_text(json.dumps(result, indent=1))
    destroy_distributed()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--tiny", type=Path, required=True)
    parser.add_argument("--ckpt-dir", type=Path, required=True)
    parser.add_argument("--mode", choices=("save", "load"), required=True)
    parser.add_argument("--tp", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(1)
    run(args.out, args.tiny, args.ckpt_dir, args.mode, args.tp)
