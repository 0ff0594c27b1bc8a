#!/usr/bin/env python
"""Write a *tiny random* Hugging Face checkpoint of a real multimodal architecture.

    python tools/make_tiny_model.py --arch qwen2_5_vl --out /tmp/tiny-qwen [--seed 0] [--layers 2]
    python tools/make_tiny_model.py --arch internvl   --out /tmp/tiny-internvl [--qk-norm]

The output directory is a complete checkpoint that loads with the Auto classes, offline:

    processor = AutoProcessor.from_pretrained(out)   # no torchvision? -> load_processor(out), see below
    model = AutoModelForImageTextToText.from_pretrained(out)
    model.generate(**processor(text=[prompt], images=[pil_image], return_tensors="pt"), max_new_tokens=5)

It contains fp32 ``model.safetensors`` + ``config.json`` + ``generation_config.json``, a real byte-level
BPE tokenizer (``Qwen2Tokenizer``, trained here on a small generated corpus, with the architecture's
special tokens appended after the BPE vocabulary, like the real Qwen vocabularies), the ChatML chat
template of the architecture and its image processor (``Qwen2VLImageProcessorPil`` /
``GotOcr2ImageProcessorPil``, sized so that small images give a handful of image tokens).

Everything is deterministic: the tokenizer does not depend on ``seed``; the weights depend only on
``seed`` (same seed -> byte-identical ``model.safetensors``).

Image tokens per image: Qwen2.5-VL 4 (<= 56x56 after resizing, e.g. 28x28 or 56x56), 8 (100x60),
16 (112x112 and anything larger: max_pixels = 112*112); InternVL 4 per 56x56 tile (+ <img></img>), so
4 for a 56x56 image and 20 for 112x112 (2x2 tiles + thumbnail; at most 6 tiles + thumbnail = 28).

Caveats (transformers 5.x):
* Without torchvision (the CPU CI) transformers cannot build any video processor, and
  ``AutoProcessor.from_pretrained`` of these two processors raises ImportError even for images;
  ``load_processor(out)`` / ``with video_processor_optional(): AutoProcessor.from_pretrained(out)``
  load the real processor class with ``video_processor=None``.
* Qwen2.5-VL computes its 3-D M-RoPE positions only when ``mm_token_type_ids`` (returned by the
  processor) is passed to forward/generate; without it, positions silently fall back to 1-D.

Python API: ``from tools.make_tiny_model import make_tiny_model``.

The code lives in ``tools/tiny_model/`` (sizes and chat templates, tokenizer, config, processor); this
module is the entry point and re-exports its public names.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script (python tools/make_tiny_model.py): make `tools` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tools.tiny_model.config import build_config
from tools.tiny_model.processor import (
    _accept_missing_video_processor,
    build_processor,
    load_processor,
    save_processor,
    video_processor_config,
    video_processor_optional,
)
from tools.tiny_model.sizes import (
    ARCHS,
    BPE_VOCAB_SIZE,
    INTERNVL_CHAT_TEMPLATE,
    INTERNVL_DOWNSAMPLE,
    INTERNVL_IMAGE_SIZE,
    INTERNVL_MAX_TILES,
    INTERNVL_SEQ_LEN,
    INTERNVL_SPECIALS,
    MAX_POSITIONS,
    MROPE_SECTION,
    PATCH,
    QWEN_CHAT_TEMPLATE,
    QWEN_FULLATT,
    QWEN_MAX_PIXELS,
    QWEN_MERGE,
    QWEN_MIN_PIXELS,
    QWEN_SPECIALS,
    QWEN_TEMPORAL_PATCH,
    QWEN_WINDOW,
    RMS_EPS,
    ROPE_THETA,
    TEXT_HEAD_DIM,
    TEXT_HEADS,
    TEXT_HIDDEN,
    TEXT_INTERMEDIATE,
    TEXT_KV_HEADS,
    VIS_DEPTH,
    VIS_HEADS,
    VIS_HIDDEN,
    VIS_INTERMEDIATE,
    VOCAB_SIZE,
)
from tools.tiny_model.tokenizer import build_tokenizer

__all__ = [  # the public names of this module before the split, for `from tools.make_tiny_model import X`
    "ARCHS",
    "BPE_VOCAB_SIZE",
    "INTERNVL_CHAT_TEMPLATE",
    "INTERNVL_DOWNSAMPLE",
    "INTERNVL_IMAGE_SIZE",
    "INTERNVL_MAX_TILES",
    "INTERNVL_SEQ_LEN",
    "INTERNVL_SPECIALS",
    "MAX_POSITIONS",
    "MROPE_SECTION",
    "PATCH",
    "QWEN_CHAT_TEMPLATE",
    "QWEN_FULLATT",
    "QWEN_MAX_PIXELS",
    "QWEN_MERGE",
    "QWEN_MIN_PIXELS",
    "QWEN_SPECIALS",
    "QWEN_TEMPORAL_PATCH",
    "QWEN_WINDOW",
    "RMS_EPS",
    "ROPE_THETA",
    "TEXT_HEAD_DIM",
    "TEXT_HEADS",
    "TEXT_HIDDEN",
    "TEXT_INTERMEDIATE",
    "TEXT_KV_HEADS",
    "VIS_DEPTH",
    "VIS_HEADS",
    "VIS_HIDDEN",
    "VIS_INTERMEDIATE",
    "VOCAB_SIZE",
    "add_v4_compat",
    "build_config",
    "build_processor",
    "build_tokenizer",
    "load_processor",
    "main",
    "make_tiny_model",
    "save_processor",
    "video_processor_config",
    "video_processor_optional",
]


# ---------------------------------------------------------------------------------------------------------
# Entry points
# ---------------------------------------------------------------------------------------------------------
def _prepare_out_dir(out_dir: Path, overwrite: bool) -> None:
    if out_dir.exists():
        if not out_dir.is_dir():
            raise FileExistsError(f"{out_dir} exists and is not a directory")
        entries = list(out_dir.iterdir())
        if entries:
            if not overwrite:
                raise FileExistsError(
                    f"output dir {out_dir} is not empty (pass --overwrite / overwrite=True)"
                )
            # A checkpoint dir is flat: refuse to wipe anything with sub-directories (e.g. `--out .`).
            if any(e.is_dir() and not e.is_symlink() for e in entries):
                raise FileExistsError(f"refusing to overwrite {out_dir}: it contains sub-directories")
            for e in entries:
                e.unlink()
    out_dir.mkdir(parents=True, exist_ok=True)


def _update_json(path: Path, fn) -> None:
    data = json.loads(path.read_text(encoding="utf-8"))
    fn(data)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def add_v4_compat(out_dir: Path, arch: str) -> None:
    """Also spell the files the way transformers 4.5x (what vLLM / SGLang images pin) reads them.

    transformers 5 reads both spellings, so loading with 5.x is unchanged:
    * config.json text_config: ``rope_theta`` (4.x ignores ``rope_parameters`` and would fall back to
      10000) and, for Qwen2.5-VL, ``rope_scaling = {"type": "mrope", "mrope_section": ...}`` (4.x reads
      mrope_section from there);
    * tokenizer_config.json: unnamed extra special tokens as the ``additional_special_tokens`` list and
      named ones (InternVL's ``start_image_token`` ...) in an ``extra_special_tokens`` dict (4.x crashes on
      v5's ``extra_special_tokens`` list).
    """

    def text_cfg(cfg: dict) -> None:
        text = cfg["text_config"]
        text["rope_theta"] = ROPE_THETA
        if arch == "qwen2_5_vl":
            text["rope_scaling"] = {"type": "mrope", "mrope_section": list(MROPE_SECTION)}

    def tok_cfg(cfg: dict) -> None:
        extra = cfg.pop("extra_special_tokens", None)
        if isinstance(extra, list):
            cfg["additional_special_tokens"] = extra
        named = {
            k: cfg.pop(k)
            for k in ("start_image_token", "end_image_token", "context_image_token", "video_token")
            if k in cfg
        }
        if named:
            cfg["extra_special_tokens"] = named

    _update_json(out_dir / "config.json", text_cfg)
    _update_json(out_dir / "tokenizer_config.json", tok_cfg)


def make_tiny_model(
    arch: str,
    out_dir: Path | str,
    seed: int = 0,
    num_layers: int = 2,
    *,
    use_qk_norm: bool = False,
    overwrite: bool = False,
) -> Path:
    """Write a tiny random ``arch`` checkpoint (model + tokenizer + processor) into ``out_dir``; return it."""
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; valid: {', '.join(ARCHS)}")
    if num_layers < 1:
        raise ValueError(f"num_layers must be >= 1, got {num_layers}")
    if use_qk_norm and arch != "internvl":
        raise ValueError("use_qk_norm is an InternViT option (arch='internvl')")

    import torch
    from transformers import AutoModelForImageTextToText, GenerationConfig

    out_dir = Path(out_dir)
    _prepare_out_dir(out_dir, overwrite)

    tok = build_tokenizer(arch)
    config = build_config(arch, tok, num_layers=num_layers, use_qk_norm=use_qk_norm)

    # Deterministic init: all weights come from torch's CPU generator, seeded here (caller's RNG state kept).
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForImageTextToText.from_config(config, dtype=torch.float32)
    model.eval()
    im_end, eot = tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<|endoftext|>")
    model.generation_config = GenerationConfig(bos_token_id=eot, eos_token_id=[im_end, eot], pad_token_id=eot)
    model.save_pretrained(out_dir, safe_serialization=True)

    # Built without a video processor (it needs torchvision); its config is written by hand below.
    with _accept_missing_video_processor():
        processor = build_processor(arch, tok)
    save_processor(processor, out_dir, video_processor_config(arch))
    add_v4_compat(out_dir, arch)
    return out_dir


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", required=True, choices=ARCHS, help="architecture to build")
    ap.add_argument("--out", required=True, type=Path, help="output directory (must be empty or absent)")
    ap.add_argument("--seed", type=int, default=0, help="weight-init seed (default 0)")
    ap.add_argument("--layers", type=int, default=2, help="text decoder layers (default 2)")
    ap.add_argument("--qk-norm", action="store_true", help="InternViT use_qk_norm (internvl only)")
    ap.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    args = ap.parse_args(argv)
    # Nothing here needs the network: never let a load fall through to the Hub.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a one-shard "Writing model shards" bar says nothing
    try:
        out = make_tiny_model(
            args.arch,
            args.out,
            seed=args.seed,
            num_layers=args.layers,
            use_qk_norm=args.qk_norm,
            overwrite=args.overwrite,
        )
    except (FileExistsError, ValueError) as e:
        ap.error(str(e))
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
