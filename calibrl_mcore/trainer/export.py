"""Write the policy as an HF checkpoint (safetensors shard per pipeline stage + index + the source
checkpoint's config / tokenizer / processor files), loadable by transformers and the rollout server.

Collective: every rank calls `export_hf`. Each stage's (DP 0, TP 0) rank writes its own shard, so no rank
holds more than its stage; the directory is written under a temporary name and renamed when complete.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch.distributed as dist
from megatron.core import parallel_state
from safetensors.torch import save_file

COPIED_FILES = ("*.json", "*.jinja", "*.txt", "*.model", "*.tiktoken")
SKIPPED = {"model.safetensors.index.json"}


def export_hf(policy, src_dir: str | Path, out_dir: str | Path) -> Path:
    out, src = Path(out_dir), Path(src_dir)
    tmp = out.with_name(out.name + ".tmp")
    rank = dist.get_rank()
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        for pattern in COPIED_FILES:  # config, generation config, tokenizer, processor, chat template
            for f in src.glob(pattern):
                if f.name not in SKIPPED:
                    shutil.copy2(f, tmp / f.name)
    dist.barrier()
    names: list[str] = []
    shard = f"model-pp{parallel_state.get_pipeline_model_parallel_rank():03d}.safetensors"
    if parallel_state.get_data_parallel_rank(with_context_parallel=True) == 0:  # DP 0 and CP 0
        tensors = {name: t.contiguous().cpu() for name, t in policy.iter_hf_weights()}
        if parallel_state.get_tensor_model_parallel_rank() == 0:
            save_file(tensors, str(tmp / shard), metadata={"format": "pt"})
            names = sorted(tensors)
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, (shard, names))
    if rank == 0:
        weight_map = {name: s for s, ns in gathered for name in ns}
        index = {"metadata": {}, "weight_map": dict(sorted(weight_map.items()))}
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    dist.barrier()
    return out
