"""The verify command: HF logits vs the logits of Megatron loaded from the checkpoint, per input."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from tools.convert.commands import _hf_files_source
from tools.convert.stage import DTYPES, ConvertError, build_stage, pipeline_split, read_hf_config

# verify builds its prompts with the checkpoint's own processor: what that needs (any one file of a tuple).
PROCESSOR_FILES: dict[str, tuple[str, ...]] = {
    "image processor": ("preprocessor_config.json",),
    "tokenizer": ("tokenizer.json", "tokenizer_config.json"),
    "chat template": ("chat_template.jinja", "chat_template.json"),
}


def check_verify_inputs(hf_dir: Path) -> None:
    """One line naming what verify's prompts need and --hf-dir lacks (before any rank starts)."""
    has = {what: any((hf_dir / name).is_file() for name in names) for what, names in PROCESSOR_FILES.items()}
    tok_config = hf_dir / "tokenizer_config.json"
    if not has["chat template"] and tok_config.is_file():  # older checkpoints keep it in the tokenizer config
        has["chat template"] = "chat_template" in json.loads(tok_config.read_text())
    missing = [f"{what} ({' or '.join(PROCESSOR_FILES[what])})" for what, ok in has.items() if not ok]
    if missing:
        raise ConvertError(f"--hf-dir {hf_dir}: verify builds its text and image prompts with the checkpoint's "
                           f"processor, and these files are missing: {'; '.join(missing)}. Copy them from the "
                           "HF checkpoint the weights came from")


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
    check_verify_inputs(args.hf_dir)
    hf_config = read_hf_config(args.hf_dir, "--hf-dir")
    dtype = getattr(torch, DTYPES[args.dtype])
    stage = build_stage(hf_config, dtype, pipeline_split(args), meta=False)
    model = stage.model.eval()
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
        layers = stage.split.stage_layers(hf_config.text_config.num_hidden_layers, args.pp)
        for case, diff in diffs.items():
            print(f"verify {case}: max |dlogits| = {diff:.3e} (tol {args.tol:g}, TP={args.tp} PP={args.pp}, "
                  f"decoder layers per stage {'+'.join(map(str, layers))})")
        if args.report:
            report = {"tp": args.tp, "pp": args.pp, "stage_layers": layers, "max_abs_diff": diffs}
            args.report.write_text(json.dumps(report, indent=2))
    if not max(diffs.values()) <= args.tol:
        raise ConvertError(
            f"logits differ by {max(diffs.values()):.3e} > --tol {args.tol:g}: the checkpoint does "
            "not reproduce the HF model (wrong --hf-dir or --dtype, or a conversion bug)"
        )
