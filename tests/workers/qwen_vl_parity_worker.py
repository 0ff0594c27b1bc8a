"""torchrun worker: tiny Qwen2.5-VL on Megatron at a TP x PP layout vs. the transformers model.

Every rank builds the same seeded HF model (random weights, random norm scales), converts it through
`hf_mapping` into its own Megatron stage/shard, and then:
  1. logits: for each input case (text-only, one image, two images over a batch of 2) one forward pass
     through Megatron's pipeline schedule; the last stage compares TP-gathered logits with HF's;
  2. grads: one forward/backward of mean token cross-entropy on the two-image case; every rank gathers
     its parameters' grads over TP, maps them to HF names and compares with HF's grads (relative error);
  3. export: gathers its parameters to HF names (the weight-sync path) and checks them bit-for-bit;
  4. tied embeddings: the text case again with `tie_word_embeddings=True` (at PP > 1 the output layer is
     a separate copy of the embedding on the last stage).
Under context parallelism (--cp C, needs --spec sdpa) inputs are right-padded with text to a multiple of
2·C; each CP rank's logits are gathered back to full length before the comparison, and each rank's grads
(its tokens' share) are summed over the CP group before the TP gather.
Writes rank{RANK}.json. Run: torchrun ... qwen_vl_parity_worker.py --out DIR --tp N --pp M [--cp C --spec sdpa]

The builders at the top (config, HF model, inputs) are shared with tests/test_qwen2_5_vl_provider.py.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

IMAGE, VIDEO, VISION_START, VISION_END = 500, 501, 498, 499
TEXT_VOCAB_LIMIT = 490  # random text tokens stay below the special ids
CASES = ("text", "one_image", "two_images")
IMAGE_SIZES = {"a": (84, 112), "b": (112, 56), "c": (56, 56)}  # (height, width) in pixels


def tiny_qwen_config(tie_word_embeddings: bool = False, vocab_size: int = 511):
    """A tiny Qwen2.5-VL: text 64 wide / 2 layers / GQA 4:2 / head_dim 16; vision 32 wide / 2 blocks with
    window attention in block 0 and full attention in block 1. Odd vocab and vision MLP sizes exercise
    Megatron's TP padding."""
    from transformers import Qwen2_5_VLConfig

    return Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=vocab_size,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            rms_norm_eps=1e-6,
            max_position_embeddings=4096,
            bos_token_id=0,
            eos_token_id=1,
            rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, 3]},
        ),
        vision_config=dict(
            depth=2,
            hidden_size=32,
            intermediate_size=45,
            num_heads=4,
            out_hidden_size=64,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
            window_size=56,  # 2x2 merged tokens per window
            fullatt_block_indexes=[1],
        ),
        image_token_id=IMAGE,
        video_token_id=VIDEO,
        vision_start_token_id=VISION_START,
        vision_end_token_id=VISION_END,
        tie_word_embeddings=tie_word_embeddings,
    )


def make_hf_model(config, seed: int = 0):
    """Seeded random HF model in fp32/eval. Weights ~ N(0, 0.05), norm scales ~ 1 + N(0, 0.1), so that a
    swapped or mis-fused tensor cannot hide behind the default init (norms all ones, tiny logits)."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(config).float().eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=gen)
            is_norm = "norm" in name or "ln_q" in name
            param.copy_(1.0 + 0.1 * noise if is_norm else 0.05 * noise)
    return model


def _image(size: tuple[int, int], seed: int):
    from PIL import Image

    pixels = np.random.RandomState(seed).randint(0, 256, (*size, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def image_processor():
    """The PIL Qwen2-VL image processor, sized like the real one (patch 14, merge 2, 2 frames)."""
    from transformers import Qwen2VLImageProcessorPil

    return Qwen2VLImageProcessorPil(
        min_pixels=56 * 56, max_pixels=112 * 112, patch_size=14, merge_size=2, temporal_patch_size=2
    )


def make_case(name: str, seed: int = 0) -> dict[str, torch.Tensor | None]:
    """input_ids [b, s], labels [b, s] (next token), and pixel_values / image_grid_thw from the processor."""
    gen = torch.Generator().manual_seed(seed + CASES.index(name))

    def text(n: int) -> list[int]:
        return torch.randint(2, TEXT_VOCAB_LIMIT, (n,), generator=gen).tolist()

    images = {"text": [], "one_image": ["a"], "two_images": ["a", "b", "c"]}[name]
    pixel_values = grid = None
    tokens_per_image = []
    if images:
        out = image_processor()(
            images=[_image(IMAGE_SIZES[k], i) for i, k in enumerate(images)], return_tensors="pt"
        )
        pixel_values, grid = out["pixel_values"], out["image_grid_thw"]
        tokens_per_image = (grid.prod(-1) // 4).tolist()

    def vision(i: int) -> list[int]:
        return [VISION_START] + [IMAGE] * tokens_per_image[i] + [VISION_END]

    if name == "text":
        rows = [text(12), text(12)]
    elif name == "one_image":
        rows = [text(3) + vision(0) + text(5)]  # even length: sequence parallelism splits s over TP
    else:  # sample 0: two images; sample 1: one image, then text up to the same length
        row0 = text(2) + vision(0) + text(3) + vision(1) + text(2)
        row1 = text(3) + vision(2)
        rows = [row0, row1 + text(len(row0) - len(row1))]
    input_ids = torch.tensor(rows)
    labels = torch.cat([input_ids[:, 1:], input_ids[:, :1]], dim=1)  # last label is arbitrary but shared
    return {"input_ids": input_ids, "labels": labels, "pixel_values": pixel_values, "image_grid_thw": grid}


def pad_case(case: dict, multiple: int, seed: int = 0) -> dict:
    """Append random text tokens so the sequence length is a multiple of `multiple` (context parallelism)."""
    b, s = case["input_ids"].shape
    extra = -s % multiple
    if extra == 0:
        return case
    gen = torch.Generator().manual_seed(seed)
    tail = torch.randint(2, TEXT_VOCAB_LIMIT, (b, extra), generator=gen)
    input_ids = torch.cat([case["input_ids"], tail], dim=1)
    labels = torch.cat([input_ids[:, 1:], input_ids[:, :1]], dim=1)
    return dict(case, input_ids=input_ids, labels=labels)


def position_ids_for(case: dict, config) -> torch.Tensor:
    from model_providers.rope import get_rope_index

    pos, _ = get_rope_index(
        case["input_ids"],
        case["image_grid_thw"],
        spatial_merge_size=config.vision_config.spatial_merge_size,
        image_token_id=config.image_token_id,
        vision_start_token_id=config.vision_start_token_id,
    )
    return pos  # [3, b, s]


def hf_forward(hf_model, case: dict) -> torch.Tensor:
    """HF logits [b, s, V]."""
    kwargs = {}
    if case["pixel_values"] is not None:
        kwargs = dict(
            pixel_values=case["pixel_values"],
            image_grid_thw=case["image_grid_thw"],
            mm_token_type_ids=(case["input_ids"] == IMAGE).int(),
        )
    return hf_model(input_ids=case["input_ids"], **kwargs).logits


def hf_grads(hf_model, case: dict) -> dict[str, torch.Tensor]:
    """Grads of mean token cross-entropy, by HF parameter name."""
    hf_model.zero_grad(set_to_none=True)
    logits = hf_forward(hf_model, case)
    F.cross_entropy(logits.flatten(0, 1), case["labels"].flatten()).backward()
    return {n: p.grad.detach().clone() for n, p in hf_model.named_parameters() if p.grad is not None}


# ---- the distributed run -----------------------------------------------------------------------------------


def te_class_names(model) -> list[str]:
    """Megatron's TE wrappers in the built model (they subclass transformer_engine's classes, real or stand-in)."""
    return sorted({type(m).__name__ for m in model.modules() if type(m).__module__.endswith("extensions.transformer_engine")})


def _build_megatron(hf_config, hf_model, info, spec: str = "local", sequence_parallel: bool = False):
    from model_providers.hf_mapping import Placement, get_mapping, load_hf_weights
    from model_providers.qwen2_5_vl import build_qwen2_5_vl

    if spec == "te":
        from tests.te_standin_env import prepare_megatron

        prepare_megatron()
    model = build_qwen2_5_vl(
        hf_config,
        pre_process=info.is_first_stage,
        post_process=info.is_last_stage,
        spec=spec,
        sequence_parallel=sequence_parallel,
    )
    mapping = get_mapping("qwen2_5_vl", hf_config, model.backend)
    placement = Placement.from_parallel_state(model.config)
    load_hf_weights(model, hf_model.state_dict().items(), mapping, placement)
    return model, mapping, placement


def _run_schedule(model, case: dict, config, *, forward_only: bool) -> torch.Tensor | None:
    """`megatron_schedule.run_schedule` of a case: logits [b, s, V] (forward_only) or the grads of mean
    cross-entropy."""
    from tests.workers.megatron_schedule import run_schedule

    inputs = {k: case[k] for k in ("input_ids", "labels", "pixel_values", "image_grid_thw")}
    inputs["position_ids"] = position_ids_for(case, config)
    weights = torch.full(case["labels"].shape, 1.0 / case["labels"].numel())  # mean over all tokens
    return run_schedule(model, inputs, weights, forward_only=forward_only)


def run(out: Path, tp: int, pp: int, cp: int = 1, spec: str = "local", sp: bool = False) -> None:
    from megatron.core import parallel_state

    from calibrl_mcore.parallel import ParallelConfig, destroy_distributed, init_distributed
    from model_providers.context_parallel import cp_pad_multiple
    from model_providers.hf_mapping import gather_megatron_to_hf
    from tests.workers.megatron_schedule import reduce_partial_grads

    info = init_distributed(
        ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, context_parallel_size=cp)
    )
    tp_group = parallel_state.get_tensor_model_parallel_group()
    hf_config = tiny_qwen_config()
    hf_model = make_hf_model(hf_config)
    model, mapping, placement = _build_megatron(hf_config, hf_model, info, spec, sp)
    model.eval()  # no dropout anyway; eval keeps HF and Megatron on the same path
    result: dict = {"rank": info.rank, "tp_rank": info.tp_rank, "pp_rank": info.pp_rank, "cp_rank": info.cp_rank,
                    "backend": model.backend, "te_classes": te_class_names(model)}

    def make(name: str) -> dict:
        return pad_case(make_case(name), cp_pad_multiple() * (tp if sp else 1))

    # 1. logits
    result["logits_max_abs_diff"] = {}
    for name in CASES:
        case = make(name)
        with torch.no_grad():
            logits = _run_schedule(model, case, hf_config, forward_only=True)
            if info.is_last_stage:
                ref = hf_forward(hf_model, case)
                result["logits_max_abs_diff"][name] = (logits - ref).abs().max().item()

    # 2. grads
    case = make("two_images")
    reference = hf_grads(hf_model, case)
    model.zero_grad(set_to_none=True)
    _run_schedule(model, case, hf_config, forward_only=False)
    reduce_partial_grads(model)
    grads = ((n, p.grad) for n, p in model.named_parameters())
    result["grad_rel_err"] = {
        hf_name: ((g - reference[hf_name]).norm() / reference[hf_name].norm().clamp_min(1e-30)).item()
        for hf_name, g in gather_megatron_to_hf(grads, mapping, placement, tp_group)
    }

    # 3. export (weight sync path): bit-identical to the HF weights
    hf_state = hf_model.state_dict()
    exported = dict(gather_megatron_to_hf(model.named_parameters(), mapping, placement, tp_group))
    result["exported"] = sorted(exported)
    result["export_mismatch"] = [n for n, t in exported.items() if not torch.equal(t, hf_state[n])]

    # 4. tied embeddings
    tied_config = tiny_qwen_config(tie_word_embeddings=True)
    tied_hf = make_hf_model(tied_config, seed=1)
    tied_model, _, _ = _build_megatron(tied_config, tied_hf, info, spec, sp)
    with torch.no_grad():
        logits = _run_schedule(tied_model.eval(), make("text"), tied_config, forward_only=True)
        if info.is_last_stage:
            ref = hf_forward(tied_hf, make("text"))
            result["logits_max_abs_diff"]["text_tied"] = (logits - ref).abs().max().item()

    (out / f"rank{info.rank}.json").write_text(json.dumps(result, indent=1))
    destroy_distributed()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--cp", type=int, default=1)
    parser.add_argument("--spec", default="local", choices=["local", "sdpa", "te"])
    parser.add_argument("--sp", action="store_true", help="sequence parallelism (TP > 1, sdpa spec)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    run(args.out, args.tp, args.pp, args.cp, args.spec, args.sp)
