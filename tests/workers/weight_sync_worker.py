"""torchrun worker: Megatron policy (perturbed) -> WeightSync -> embedded server; the server's log-probs of
its own samples must equal the Megatron policy's recomputed log-probs.

Rank 0 starts the server (original tiny weights) unless `--url` names a running one, every rank perturbs
its shard identically-seeded, all push; rank 0 samples with logprobs; all ranks recompute with the policy
(forward-only schedule). `--dump`: each stage's pusher also writes the HF tensors it sent.
"""

from __future__ import annotations

import argparse
import json
import os
import zlib

import torch
import torch.distributed as dist

from calibrl_mcore.config import ModelConfig, OptimConfig
from calibrl_mcore.parallel import ParallelConfig, destroy_distributed, init_distributed
from calibrl_mcore.trainer.batch import Row, chunk_by_length, collate
from calibrl_mcore.trainer.objective import logprob_fn
from calibrl_mcore.trainer.policy import MegatronPolicy
from calibrl_mcore.trainer.rollout_stage import PromptEncoder
from calibrl_mcore.trainer.weight_sync import WeightSync
from model_providers.registry import position_ids
from rollout.client import RolloutClient
from rollout.launcher import EmbeddedServerProcess


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--method", default="tensor")
    p.add_argument("--url", default=None)
    p.add_argument("--dump", action="store_true")
    a = p.parse_args()
    info = init_distributed(ParallelConfig(tensor_model_parallel_size=a.tp, pipeline_model_parallel_size=a.pp))
    policy = MegatronPolicy(ModelConfig(hf_path=a.model, spec="local"), OptimConfig())
    with torch.no_grad():  # move away from the checkpoint so that a missing sync would show
        for name, prm in policy.model.module.named_parameters():
            # Seeded by name: TP-replicated parameters (norms, biases) stay identical across TP ranks.
            g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
            prm.add_(0.02 * torch.randn(prm.shape, generator=g))
    server, urls = None, [a.url]
    if info.rank == 0 and a.url is None:
        server = EmbeddedServerProcess(a.model).start()
        urls = [server.url]
    dist.broadcast_object_list(urls, src=0)
    sync = WeightSync(policy, urls, bucket_mb=1, method=a.method, src_dir=a.model,  # small buckets
                      stage_dir=os.path.join(a.out, "weight_sync"))
    sync.push(version=7)
    if a.dump:  # what this stage's pusher sent (the gathers are collective over TP: every rank iterates)
        from safetensors.torch import save_file

        sent = {name: t.contiguous() for name, t in policy.iter_hf_weights()}
        if sync.client is not None:
            save_file(sent, os.path.join(a.out, f"sent_rank{info.rank}.safetensors"))
    payload: list = [None]
    if info.rank == 0:
        enc = PromptEncoder(a.model)
        client = RolloutClient(urls)
        samples = client.generate([{"text": "<|im_start|>user\nwhat is 2+3?<|im_end|>\n<|im_start|>assistant\n"}],
                                  {"max_new_tokens": 12, "n": 3, "temperature": 1.0}, seed=3)
        prompt = enc.tokenizer("<|im_start|>user\nwhat is 2+3?<|im_end|>\n<|im_start|>assistant\n",
                               add_special_tokens=False)["input_ids"]
        rows = [Row(uid="q", group_id=0, is_expert=False, prompt_ids=prompt, response_ids=s.output_ids,
                    rollout_logprobs=s.logprobs) for s in samples]
        payload = [(rows, [s.weight_version for s in samples])]
        client.close()
    dist.broadcast_object_list(payload, src=0)
    rows, versions = payload[0]
    pos = lambda ids, grid, attn: position_ids(policy.hf_config, ids, grid, attn)  # noqa: E731
    mbs = [collate(rows, c, pos) for c in chunk_by_length(range(len(rows)), rows, 4)]
    outs = policy.run(mbs, logprob_fn(), forward_only=True)
    diffs = []
    for out in outs:
        for k, i in enumerate(out["row_index"].tolist()):
            n, pl = len(rows[i].response_ids), len(rows[i].prompt_ids)
            mine = out["logp"][k, pl - 1 : pl - 1 + n]
            diffs.append((mine - torch.tensor(rows[i].rollout_logprobs)).abs().max().item())
    with open(os.path.join(a.out, f"rank{info.rank}.json"), "w") as f:
        json.dump({"max_abs_diff": max(diffs) if diffs else None, "versions": versions,
                   "last_stage": bool(outs)}, f)
    sync.close()
    if server is not None:
        server.stop()
    destroy_distributed()


if __name__ == "__main__":
    main()
