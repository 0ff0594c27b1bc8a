"""torchrun worker: tiny InternVL3 on Megatron at a TP x PP layout vs. the transformers model.

Given the tiny checkpoints (`--ckpt plain=DIR --ckpt qk_norm=DIR`, written by calibrl_mcore.make_tiny_model),
for each model variant every rank loads the same seeded HF model, converts it through the "internvl" map
into its own Megatron stage/shard, then:
  1. logits: for each input case (text-only, one image, two images over a batch of 2) one forward pass
     through Megatron's pipeline schedule; the last stage compares TP-gathered logits with HF's;
  2. grads: one forward/backward of mean token cross-entropy (over real tokens) on the two-image case;
     every rank gathers its parameters' grads over TP, maps them to HF names and compares with HF's;
  3. export: gathers its parameters to HF names (the weight-sync path) and checks them bit-for-bit;
  4. first stage: the distributed-checkpoint state dict splits every vision weight over TP as the map does;
then the text and one-image logits of a tied-embedding model with an odd vocab (767, padded at TP=2).
Writes rank{RANK}.json. Run: torchrun ... internvl_parity_worker.py --out DIR --tp N --pp M --ckpt ...

The builders at the top (HF model, inputs, references) are shared with tests/test_internvl_provider.py.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

CHECKPOINTS = ("plain", "qk_norm")  # make_tiny_model("internvl", dir, use_qk_norm=name == "qk_norm")
# name -> (checkpoint, config overrides, weight seed); overrides rebuild the model from the edited config.
VARIANTS: dict[str, tuple[str, dict[str, Any], int]] = {
    "plain": ("plain", {}, 0),  # InternViT-300M style: LayerNorm, QKV bias (InternVL3-1B..14B)
    "qk_norm": ("qk_norm", {}, 0),
    # InternViT-6B style (InternVL3-38B/78B): RMSNorm, QK-norm, no QKV bias
    "vit6b_style": (
        "qk_norm",
        {"vision_config.norm_type": "rms_norm", "vision_config.attention_bias": False},
        0,
    ),
}
TIED = ("plain", {"tie_word_embeddings": True, "text_config.vocab_size": 767}, 1)  # 767: TP pads the vocab
CASES = ("text", "one_image", "two_images")
IMAGE_SIZES = {
    "a": (56, 56),
    "b": (112, 84),
    "c": (60, 120),
}  # (height, width): 1, 5 (4 + thumbnail), 3 tiles
PROMPTS = {
    "text": (["a short question about two cats", "and another prompt"], []),
    "one_image": (["Describe <IMG_CONTEXT> briefly please."], ["b"]),
    # sample 0: two images; sample 1: one image, right-padded to the same length
    "two_images": (
        ["first <IMG_CONTEXT> then <IMG_CONTEXT> end", "only <IMG_CONTEXT> here"],
        ["a", "b", "c"],
    ),
}


def load_hf_model(path: str | Path, *, seed: int = 0, overrides: dict[str, Any] | None = None):
    """The checkpoint's HF model (fp32, eval) with seeded random weights: N(0, 0.05) for linears, N(0, 0.5)
    for the class/position embeddings, 1 + N(0, 0.1) for norm scales and layer scales, so that a swapped
    or mis-fused tensor cannot hide behind the default init (zero embeddings, unit norms, lambda = 0.1).
    `overrides` ({"vision_config.norm_type": "rms_norm", ...}) build a fresh model from the edited config."""
    from transformers import AutoConfig, InternVLForConditionalGeneration

    if overrides:
        config = AutoConfig.from_pretrained(path)
        for dotted, value in overrides.items():
            *parents, leaf = dotted.split(".")
            target = config
            for parent in parents:
                target = getattr(target, parent)
            setattr(target, leaf, value)
        model = InternVLForConditionalGeneration(config)
    else:
        model = InternVLForConditionalGeneration.from_pretrained(path)
    model = model.float().eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=gen)
            if "lambda_" in name or ("norm" in name and name.endswith("weight")):
                param.copy_(1.0 + 0.1 * noise)
            elif name.endswith(("cls_token", "position_embeddings")):
                param.copy_(0.5 * noise)
            else:
                param.copy_(0.05 * noise)
    return model


def load_variant(checkpoints: dict[str, Path], name: str):
    """HF model of a VARIANTS (or "tied") entry, given the checkpoint directories by name."""
    checkpoint, overrides, seed = TIED if name == "tied" else VARIANTS[name]
    return load_hf_model(checkpoints[checkpoint], seed=seed, overrides=overrides)


def _image(size: tuple[int, int], seed: int):
    from PIL import Image

    return Image.fromarray(np.random.RandomState(seed).randint(0, 256, (*size, 3), dtype=np.uint8))


def make_case(processor, name: str, multiple: int = 1) -> dict[str, torch.Tensor | None]:
    """input_ids [b, s] (right-padded, s a multiple of `multiple`: context parallelism), labels [b, s] (next
    token), loss_mask [b, s] (real tokens), pixel_values [n_tiles, 3, 56, 56]."""
    texts, images = PROMPTS[name]
    kwargs = {"images": [_image(IMAGE_SIZES[k], i) for i, k in enumerate(images)]} if images else {}
    out = processor(text=texts, return_tensors="pt", padding=True, padding_side="right", **kwargs)
    input_ids, loss_mask = out["input_ids"], out["attention_mask"].bool()
    extra = -input_ids.shape[1] % multiple
    if extra:
        pad = torch.full((input_ids.shape[0], extra), processor.tokenizer.pad_token_id)
        input_ids = torch.cat([input_ids, pad], dim=1)
        loss_mask = torch.cat([loss_mask, torch.zeros_like(pad, dtype=torch.bool)], dim=1)
    labels = torch.cat([input_ids[:, 1:], input_ids[:, :1]], dim=1)  # last label is arbitrary but shared
    return {
        "input_ids": input_ids,
        "labels": labels,
        "loss_mask": loss_mask,
        "pixel_values": out.get("pixel_values"),
    }


def position_ids_for(case: dict) -> torch.Tensor:
    b, s = case["input_ids"].shape
    return torch.arange(s).expand(b, s)  # what registry.position_ids gives InternVL


def hf_forward(hf_model, case: dict, with_images: bool = True) -> torch.Tensor:
    """HF logits [b, s, V] (no attention mask: pads are ordinary tokens under the causal mask, as in Megatron)."""
    pixel_values = case["pixel_values"] if with_images else None
    return hf_model(input_ids=case["input_ids"], pixel_values=pixel_values).logits


def masked_mean(per_token: torch.Tensor, case: dict) -> torch.Tensor:
    """Mean over real tokens. Pads are left out like in training, and because HF's `embed_tokens` has
    `padding_idx=pad_token_id`: it never gives the pad row a grad, Megatron's embedding would."""
    mask = case["loss_mask"].to(per_token.dtype)
    return (per_token * mask).sum() / mask.sum()


def hf_grads(hf_model, case: dict) -> dict[str, torch.Tensor]:
    """Grads of the masked mean token cross-entropy, by HF parameter name."""
    hf_model.zero_grad(set_to_none=True)
    logits = hf_forward(hf_model, case)
    per_token = F.cross_entropy(logits.flatten(0, 1), case["labels"].flatten(), reduction="none")
    masked_mean(per_token.view_as(case["labels"]), case).backward()
    return {n: p.grad.detach().clone() for n, p in hf_model.named_parameters() if p.grad is not None}


def grad_rel_err(got: torch.Tensor, reference: torch.Tensor) -> float:
    """||got - ref|| / ||ref||, with ||ref|| floored at 1e-5: the key bias of softmax attention has an exactly
    zero grad (it shifts all scores of a query equally), so HF's is rounding noise (~1e-10), not a scale."""
    return ((got - reference).norm() / reference.norm().clamp_min(1e-5)).item()


# ---- the distributed run -----------------------------------------------------------------------------------


def te_class_names(model) -> list[str]:
    """Megatron's TE wrappers in the built model (they subclass transformer_engine's classes, real or stand-in)."""
    return sorted({type(m).__name__ for m in model.modules() if type(m).__module__.endswith("extensions.transformer_engine")})


def _build_megatron(hf_model, info, spec: str = "local"):
    from model_providers.hf_mapping import Placement, get_mapping, load_hf_weights
    from model_providers.internvl import build_internvl

    if spec == "te":
        from tests.te_standin_env import prepare_megatron

        prepare_megatron()
    model = build_internvl(
        hf_model.config, pre_process=info.is_first_stage, post_process=info.is_last_stage, spec=spec
    )
    mapping = get_mapping("internvl", hf_model.config, model.backend)
    placement = Placement.from_parallel_state(model.config)
    load_hf_weights(model, hf_model.state_dict().items(), mapping, placement)
    return model.eval(), mapping, placement


def _run_schedule(model, case: dict, *, forward_only: bool) -> torch.Tensor | None:
    """`megatron_schedule.run_schedule` of a case: logits [b, s, V] (forward_only) or the grads of masked
    mean cross-entropy (`masked_mean`)."""
    from tests.workers.megatron_schedule import run_schedule

    inputs = {k: case[k] for k in ("input_ids", "labels", "pixel_values")}
    inputs["position_ids"] = position_ids_for(case)
    mask = case["loss_mask"].to(torch.float32)
    return run_schedule(model, inputs, mask / mask.sum(), forward_only=forward_only)


def _logit_diffs(model, hf_model, processor, cases, info, tag: str) -> dict[str, float]:
    from model_providers.context_parallel import cp_pad_multiple

    diffs = {}
    for name in cases:
        case = make_case(processor, name, cp_pad_multiple())
        with torch.no_grad():
            logits = _run_schedule(model, case, forward_only=True)
            if info.is_last_stage:
                diffs[f"{tag}/{name}"] = (logits - hf_forward(hf_model, case)).abs().max().item()
    return diffs


def _checkpoint_sharding_errors(model, mapping) -> tuple[int, list[str]]:
    """Vision-side parameters whose TP split in the distributed-checkpoint state dict, or whose
    `tensor_model_parallel` attribute, disagrees with the map's rule (e.g. a TP-sharded weight saved as
    replicated). Returns (entries checked, errors)."""
    from megatron.core import parallel_state

    tp = parallel_state.get_tensor_model_parallel_world_size()
    params = dict(model.named_parameters())
    errors, checked = [], 0
    for key, sharded in model.sharded_state_dict().items():
        if key not in params or not key.startswith(("vision_model.", "vision_projection.")):
            continue
        axis = mapping.match_megatron(key)[0].tp_axis
        expected = tuple(tp if i == axis else 1 for i in range(params[key].dim()))
        checked += 1
        if tuple(sharded.axis_fragmentations) != expected:
            errors.append(f"{key}: split {tuple(sharded.axis_fragmentations)}, expected {expected}")
        if getattr(params[key], "tensor_model_parallel", False) != (axis is not None):  # read by grad norms
            errors.append(f"{key}: tensor_model_parallel attribute disagrees with TP axis {axis}")
    return checked, errors


def run(out: Path, tp: int, pp: int, checkpoints: dict[str, Path], cp: int = 1, spec: str = "local") -> None:
    from megatron.core import parallel_state

    from calibrl_mcore.make_tiny_model import load_processor
    from calibrl_mcore.parallel import ParallelConfig, destroy_distributed, init_distributed
    from model_providers.context_parallel import cp_pad_multiple
    from model_providers.hf_mapping import gather_megatron_to_hf
    from tests.workers.megatron_schedule import reduce_partial_grads

    info = init_distributed(
        ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, context_parallel_size=cp)
    )
    tp_group = parallel_state.get_tensor_model_parallel_group()
    result: dict = {"rank": info.rank, "tp_rank": info.tp_rank, "pp_rank": info.pp_rank}
    result.update(
        logits_max_abs_diff={}, grad_rel_err={}, exported={}, export_mismatch=[], checkpoint_sharding={}
    )
    processor = load_processor(checkpoints["plain"])

    for tag in VARIANTS:
        hf_model = load_variant(checkpoints, tag)
        model, mapping, placement = _build_megatron(hf_model, info, spec)
        result["backend"] = model.backend
        result["te_classes"] = te_class_names(model)
        # 1. logits
        result["logits_max_abs_diff"].update(_logit_diffs(model, hf_model, processor, CASES, info, tag))
        # 2. grads
        case = make_case(processor, "two_images", cp_pad_multiple())
        reference = hf_grads(hf_model, case)
        model.zero_grad(set_to_none=True)
        _run_schedule(model, case, forward_only=False)
        reduce_partial_grads(model)
        grads = ((n, p.grad) for n, p in model.named_parameters())
        result["grad_rel_err"][tag] = {
            hf_name: grad_rel_err(g, reference[hf_name])
            for hf_name, g in gather_megatron_to_hf(grads, mapping, placement, tp_group)
        }
        # 3. export (weight sync path): bit-identical to the HF weights
        hf_state = hf_model.state_dict()
        exported = dict(gather_megatron_to_hf(model.named_parameters(), mapping, placement, tp_group))
        result["exported"][tag] = sorted(exported)
        result["export_mismatch"] += [n for n, t in exported.items() if not torch.equal(t, hf_state[n])]
        # 4. distributed checkpoints split the vision weights over TP like the map does
        if info.is_first_stage:
            result["checkpoint_sharding"][tag] = _checkpoint_sharding_errors(model, mapping)

    # 5. tied embeddings + vocab padding
    tied_hf = load_variant(checkpoints, "tied")
    tied_model, _, _ = _build_megatron(tied_hf, info, spec)
    result["logits_max_abs_diff"].update(
        _logit_diffs(tied_model, tied_hf, processor, ("text", "one_image"), info, "tied")
    )

    (out / f"rank{info.rank}.json").write_text(json.dumps(result, indent=1))
    destroy_distributed()


def _named_path(text: str) -> tuple[str, Path]:
    name, _, path = text.partition("=")
    return name, Path(path)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--cp", type=int, default=1)
    parser.add_argument("--spec", default="local", choices=["local", "sdpa", "te"])
    parser.add_argument("--ckpt", type=_named_path, action="append", required=True, help="NAME=DIR")
    args = parser.parse_args()
    torch.set_num_threads(1)
    run(args.out, args.tp, args.pp, dict(args.ckpt), args.cp, args.spec)
