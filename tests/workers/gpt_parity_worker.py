"""torchrun worker: one forward/backward of a tiny Megatron GPTModel at a given TP x PP layout.

Every layout starts from the same weights: a full-size reference tensor per *global* parameter name
(seeded by the name), of which each rank keeps its TP shard (Megatron's `partition_dim`) and its PP
stage's layers (global layer index = local index + stage offset). The batch (4 sequences, 2 micro-batches)
goes through `get_forward_backward_func()` (1F1B when PP > 1); loss = mean token cross-entropy.

Writes `rank{RANK}.json` with the loss and per-parameter squared grad norms (last / every stage), the
model-parallel grad norm, and on the last stage `logits_rank{RANK}.pt`: micro-batch 0's logits
gathered over TP, [b=2, s=32, vocab=512]. Run: torchrun ... gpt_parity_worker.py --out DIR --tp N --pp M
"""

from __future__ import annotations

import argparse
import functools
import json
import re
import zlib
from pathlib import Path

import torch

HIDDEN, LAYERS, HEADS, VOCAB, SEQ = 64, 4, 4, 512, 32
BATCH, MICRO_BATCH = 4, 2
NUM_MICRO_BATCHES = BATCH // MICRO_BATCH
DATA_SEED = 7


def padded_vocab_size(vocab: int, tp: int, multiple: int = 128) -> int:
    """Megatron-LM's padding: a multiple of `multiple` x TP, so every TP shard is equal."""
    step = multiple * tp
    return -(-vocab // step) * step


def reference_tensor(global_name: str, shape: tuple[int, ...]) -> torch.Tensor:
    """Deterministic full-size initial value of one global parameter, independent of the layout."""
    gen = torch.Generator().manual_seed(zlib.crc32(global_name.encode()))
    noise = torch.randn(shape, generator=gen)
    if "layernorm.weight" in global_name:
        return 1.0 + 0.1 * noise
    return (0.02 if global_name.endswith("bias") else 0.05) * noise


def build_model(tp: int, pp: int, pre_process: bool, post_process: bool):
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer import TransformerConfig

    config = TransformerConfig(
        num_layers=LAYERS,
        hidden_size=HIDDEN,
        num_attention_heads=HEADS,
        ffn_hidden_size=4 * HIDDEN,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        pipeline_dtype=torch.float32,
        params_dtype=torch.float32,
        hidden_dropout=0.0,
        attention_dropout=0.0,
    )
    return GPTModel(
        config=config,
        transformer_layer_spec=get_gpt_layer_local_spec(),
        vocab_size=padded_vocab_size(VOCAB, tp),
        max_sequence_length=SEQ,
        pre_process=pre_process,
        post_process=post_process,
        share_embeddings_and_output_weights=False,
        position_embedding_type="rope",
    )


def global_param_name(local_name: str, layer_offset: int) -> str:
    """decoder.layers.<local i>.* -> decoder.layers.<i + stage offset>.*"""
    return re.sub(
        r"^decoder\.layers\.(\d+)\.", lambda m: f"decoder.layers.{int(m[1]) + layer_offset}.", local_name
    )


def load_reference_weights(model: torch.nn.Module, tp_size: int, tp_rank: int, layer_offset: int) -> None:
    for local_name, param in model.named_parameters():
        name = global_param_name(local_name, layer_offset)
        if getattr(param, "tensor_model_parallel", False):
            dim = param.partition_dim
            global_shape = list(param.shape)
            global_shape[dim] *= tp_size
            shard = reference_tensor(name, tuple(global_shape)).chunk(tp_size, dim=dim)[tp_rank]
        else:
            shard = reference_tensor(name, tuple(param.shape))
        with torch.no_grad():
            param.copy_(shard)


def make_micro_batches() -> list[dict[str, torch.Tensor]]:
    """The fixed batch, split into micro-batches of next-token prediction inputs/labels."""
    tokens = torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=torch.Generator().manual_seed(DATA_SEED))
    causal = torch.triu(torch.ones(SEQ, SEQ, dtype=torch.bool), diagonal=1)[None, None]  # [1, 1, s, s]
    batches = []
    for i in range(NUM_MICRO_BATCHES):
        rows = tokens[i * MICRO_BATCH : (i + 1) * MICRO_BATCH]  # [b, s + 1]
        batches.append(
            {
                "index": i,
                "tokens": rows[:, :-1],
                "labels": rows[:, 1:],
                "position_ids": torch.arange(SEQ).expand(MICRO_BATCH, SEQ),
                "attention_mask": causal,
            }
        )
    return batches


def run(out: Path, tp: int, pp: int) -> None:
    from megatron.core import tensor_parallel
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    from calibrl_mcore.parallel import ParallelConfig, destroy_distributed, init_distributed
    from calibrl_mcore.parallel.collectives import global_grad_norm
    from calibrl_mcore.parallel.cpu_shim import is_cpu_shim_applied

    info = init_distributed(ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp))
    # Megatron builds TP layers on the current device but local norms on CPU (Megatron-LM moves the model)
    model = build_model(tp, pp, info.is_first_stage, info.is_last_stage).to(info.device)
    layer_offset = get_transformer_layer_offset(model.config)
    load_reference_weights(model, info.tp_size, info.tp_rank, layer_offset)
    model.zero_grad(set_to_none=True)

    batches = [
        {k: v.to(info.device) if torch.is_tensor(v) else v for k, v in mb.items()}
        for mb in make_micro_batches()
    ]
    captured: dict[str, torch.Tensor] = {}

    def loss_func(mb: dict, logits: torch.Tensor):
        # logits: [b, s, vocab / tp]
        if mb["index"] == 0:  # copy before the CE: vocab_parallel_cross_entropy edits logits in place
            full = tensor_parallel.gather_from_tensor_model_parallel_region(logits.detach().clone())
            captured["logits"] = full  # [b, s, vocab]
        per_token = tensor_parallel.vocab_parallel_cross_entropy(logits.float(), mb["labels"])  # [b, s]
        loss = per_token.mean()
        # clone: the schedule divides the returned loss in place by the number of micro-batches
        return loss, {"loss": loss.detach().clone()}

    def forward_step(data_iterator, chunk):
        mb = next(data_iterator)
        output = chunk(mb["tokens"], mb["position_ids"], mb["attention_mask"])
        return output, functools.partial(loss_func, mb)

    losses = get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=iter(batches),
        model=[model],
        num_microbatches=NUM_MICRO_BATCHES,
        seq_length=SEQ,
        micro_batch_size=MICRO_BATCH,
        forward_only=False,
    )

    result = {
        "rank": info.rank,
        "tp_rank": info.tp_rank,
        "pp_rank": info.pp_rank,
        "is_last_stage": info.is_last_stage,
        "device": str(info.device),
        "cpu_shim_applied": is_cpu_shim_applied(),
        "grad_norm": global_grad_norm(model.parameters()),
        # global name -> sum of squared grads of this rank's shard (TP duplicates counted on TP rank 0 only)
        "grad_sq": {
            global_param_name(n, layer_offset): p.grad.double().pow(2).sum().item()
            for n, p in model.named_parameters()
            if p.grad is not None and (getattr(p, "tensor_model_parallel", False) or info.tp_rank == 0)
        },
        "loss": None,
    }
    if info.is_last_stage:
        result["loss"] = torch.stack([d["loss"] for d in losses]).mean().item()
        logits = captured["logits"].cpu()  # [b, s, vocab]
        torch.save(logits, out / f"logits_rank{info.rank}.pt")
        result["logits_shape"] = list(logits.shape)
        result["logits_abs_mean"] = logits.abs().mean().item()
    (out / f"rank{info.rank}.json").write_text(json.dumps(result, indent=1))
    destroy_distributed()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    run(args.out, args.tp, args.pp)
