"""Benchmark: the trainer's update (collation, loss normaliser, CalibRL loss with vocab-parallel log-probs
and entropy, metric reductions) vs a bare Megatron forward/backward (mean token cross-entropy) on the same
model, micro-batches and tokens. Also reads the rollout vs train time split of a real run if given.

    python bench/trainer.py [--layers 4] [--rows 64] [--run-dir runs/demo/calibrl]

Goal (issue "End-to-end trainer"): ours / bare ≤ 1.15. Writes bench/results/trainer.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `tools` lives at the repo root

from calibrl_mcore.algo.aggregation import compute_loss_normalizer
from calibrl_mcore.config import AlgoConfig, ModelConfig, OptimConfig
from calibrl_mcore.parallel import ParallelConfig, destroy_distributed, init_distributed
from calibrl_mcore.trainer.batch import Row, chunk_by_length, collate
from calibrl_mcore.trainer.objective import rl_loss_fn, token_logprobs
from calibrl_mcore.trainer.policy import MegatronPolicy
from model_providers.registry import position_ids


def make_rows(n: int, vocab: int, prompt_len: int, max_resp: int, seed: int = 0) -> list[Row]:
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        resp = int(torch.randint(max_resp // 2, max_resp + 1, (1,), generator=g))
        rows.append(Row(
            uid=str(i), group_id=i // 8, is_expert=False,
            prompt_ids=torch.randint(0, vocab - 16, (prompt_len,), generator=g).tolist(),
            response_ids=torch.randint(0, vocab - 16, (resp,), generator=g).tolist(),
            reward=float(torch.rand((), generator=g) > 0.5),
        ))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256, help="decoder width (FFN = 4x)")
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--prompt-len", type=int, default=96)
    parser.add_argument("--max-response", type=int, default=128)
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--run-dir", type=Path, default=None, help="a finished run: report its time split")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "trainer.json")
    args = parser.parse_args()

    from gpu_train import vl_config  # bench/ is the script's folder
    from transformers import Qwen2_5_VLForConditionalGeneration

    init_distributed(ParallelConfig())
    model_dir = Path(tempfile.mkdtemp()) / "m"
    shape = dict(hidden_size=args.hidden, intermediate_size=4 * args.hidden, num_hidden_layers=args.layers,
                 num_attention_heads=args.hidden // 32, num_key_value_heads=2, vocab_size=768)
    torch.manual_seed(0)
    Qwen2_5_VLForConditionalGeneration(vl_config(shape)).save_pretrained(model_dir)
    policy = MegatronPolicy(ModelConfig(hf_path=str(model_dir), spec="local"), OptimConfig(lr=1e-5))
    vocab = policy.hf_config.text_config.vocab_size
    rows = make_rows(args.rows, vocab, args.prompt_len, args.max_response)
    pos = lambda ids, grid, attn: position_ids(policy.hf_config, ids, grid, attn)  # noqa: E731
    chunks = chunk_by_length(range(len(rows)), rows, args.micro_batch)
    g = torch.Generator().manual_seed(1)
    old = {i: -torch.rand(len(r.response_ids), generator=g) * 5 for i, r in enumerate(rows)}
    adv = {i: float(torch.randn((), generator=g)) for i in range(len(rows))}
    algo = AlgoConfig(name="calibrl")

    def ours() -> None:
        mbs = [collate(rows, c, pos,
                       {"old_logp": lambda i: old[i].tolist(), "expert_logp": lambda i: (old[i] - 0.1).tolist(),
                        "expert_valid": lambda i: [1.0] * len(rows[i].response_ids)},
                       {"advantages": lambda i: adv[i], "passed": lambda i: adv[i] > 0,
                        "is_expert": lambda i: False}) for c in chunks]
        norm = compute_loss_normalizer([mb.loss_mask for mb in mbs], algo.agg)
        policy.run(mbs, rl_loss_fn(algo, norm), forward_only=False)

    bare_mbs = [collate(rows, c, pos) for c in chunks]

    def bare() -> None:
        def ce(mb, logits):
            return -(token_logprobs(logits, mb.labels) * mb.loss_mask).sum() / mb.loss_mask.sum(), {}
        policy.run(bare_mbs, ce, forward_only=False)

    ours(), bare()  # warm-up
    times: dict[str, list[float]] = {"ours": [], "bare": []}
    for _ in range(args.repeats):
        for name, fn in (("ours", ours), ("bare", bare)):
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    tokens = sum(r.length for r in rows)
    result = {
        "benchmark": "trainer update vs bare Megatron fwd/bwd (same model, micro-batches, tokens)",
        "model": {"layers": args.layers, "hidden": policy.hf_config.text_config.hidden_size, "vocab": vocab},
        "rows": args.rows, "tokens": tokens, "micro_batch": args.micro_batch,
        "median_s": med, "all_s": times,
        "ours_over_bare": med["ours"] / med["bare"], "goal": "<= 1.15",
        "torch_threads": torch.get_num_threads(),
    }
    if args.run_dir is not None:
        lines = [json.loads(x) for x in (args.run_dir / "metrics.jsonl").read_text().splitlines()]
        steps = [x for x in lines if "time/step_s" in x]
        result["run_time_split"] = {
            "run_dir": str(args.run_dir),
            "rollout_s_mean": statistics.mean(x["rollout/time_s"] for x in steps),
            "train_s_mean": statistics.mean(x["time/train_s"] for x in steps),
            "weight_sync_s_mean": statistics.mean(x["time/weight_sync_s"] for x in steps),
            "step_s_mean": statistics.mean(x["time/step_s"] for x in steps),
        }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("median_s", "ours_over_bare")} | ({"split": result.get("run_time_split")}
                                                                            if args.run_dir else {}), indent=2))
    destroy_distributed()


if __name__ == "__main__":
    main()
