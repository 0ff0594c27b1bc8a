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
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import random
import sys
from pathlib import Path
from typing import Any

ARCHS = ("qwen2_5_vl", "internvl")

# ---------------------------------------------------------------------------------------------------------
# Sizes (kept in one place so that the report / other code can read them).
# ---------------------------------------------------------------------------------------------------------
VOCAB_SIZE = 768  # total, special tokens included (multiple of 128 -> no padding needed by Megatron TP<=8)
TEXT_HIDDEN = 64
TEXT_INTERMEDIATE = 128
TEXT_HEADS = 4
TEXT_KV_HEADS = 2
TEXT_HEAD_DIM = TEXT_HIDDEN // TEXT_HEADS  # 16
MROPE_SECTION = [2, 3, 3]  # sum(mrope_section) * 2 == head_dim (t, h, w sections of the rotary half)
ROPE_THETA = 1_000_000.0
MAX_POSITIONS = 8192
RMS_EPS = 1e-6

VIS_HIDDEN = 32
VIS_INTERMEDIATE = 64
VIS_HEADS = 2
VIS_DEPTH = 2
PATCH = 14

# Qwen2.5-VL vision tower / image processor
QWEN_MERGE = 2
QWEN_TEMPORAL_PATCH = 2
QWEN_WINDOW = 56  # -> window of (56 // 2 // 14) = 2x2 merged tokens, so a 112x112 image has 4 windows
QWEN_FULLATT = [1]
QWEN_MIN_PIXELS = 56 * 56  # 4 image tokens (the real default min_pixels)
QWEN_MAX_PIXELS = 112 * 112  # 16 image tokens

# InternVL vision tower / image processor
INTERNVL_IMAGE_SIZE = 56  # 4x4 patches of 14 -> pixel-shuffle(0.5) -> 4 tokens per tile
INTERNVL_DOWNSAMPLE = 0.5
INTERNVL_SEQ_LEN = int((INTERNVL_IMAGE_SIZE // PATCH) ** 2 * INTERNVL_DOWNSAMPLE**2)  # 4
INTERNVL_MAX_TILES = 6

# Special tokens, appended (in this order) after the BPE vocabulary.
QWEN_SPECIALS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
]
INTERNVL_SPECIALS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<img>",
    "</img>",
    "<IMG_CONTEXT>",
    "<video>",
]
assert len(QWEN_SPECIALS) == len(INTERNVL_SPECIALS)
BPE_VOCAB_SIZE = VOCAB_SIZE - len(QWEN_SPECIALS)

# Chat templates. Qwen2.5-VL: the template shipped with Qwen/Qwen2.5-VL-*-Instruct (default system prompt,
# <|vision_start|><|image_pad|><|vision_end|> per image; Qwen2_5_VLProcessor expands <|image_pad|>).
QWEN_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}"
    "{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}"
    "{% endif %}"
    "{% endfor %}<|im_end|>\n"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# InternVL-hf: ChatML without default system prompt; one <IMG_CONTEXT> per image, which InternVLProcessor
# expands to <img><IMG_CONTEXT>*image_seq_length*num_tiles</img>.
INTERNVL_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}"
    "{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}{{ '<IMG_CONTEXT>\n' }}"
    "{% elif content['type'] == 'video' %}{{ '<video>\n' }}"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}"
    "{% endif %}"
    "{% endfor %}"
    "{% endif %}"
    "{{ '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


# ---------------------------------------------------------------------------------------------------------
# Corpus + BPE
# ---------------------------------------------------------------------------------------------------------
_WORDS = """
the a an of to in on at by for with from and or not is are was be it this that these those there here
what which who how why when where find compute calculate determine show prove solve simplify evaluate
give answer question problem solution step first second third next then finally therefore thus hence so
because since if else let suppose assume given we have get know need use using each every all some any
number numbers integer integers digit digits value values sum total product difference quotient remainder
ratio fraction fractions decimal percent half quarter third double triple twice square squares root roots
cube power powers exponent base log logarithm equation equations expression variable variables unknown
equal equals greater less than more fewer at least most minimum maximum positive negative zero one two
three four five six seven eight nine ten hundred thousand million odd even prime factor factors multiple
divisible plus minus times divided over add subtract multiply divide increase decrease average mean median
mode range probability chance random event outcome count ways choose combination permutation sequence
series term terms function functions graph slope intercept linear quadratic polynomial coefficient
geometry triangle triangles right isosceles equilateral scalene angle angles degree degrees acute obtuse
circle circles radius radii diameter circumference arc chord tangent sector center centre point points
line lines segment segments ray parallel perpendicular intersect intersection midpoint bisector vertex
vertices edge edges side sides face faces polygon square rectangle rhombus parallelogram trapezoid
pentagon hexagon octagon quadrilateral cube cuboid prism pyramid cone cylinder sphere solid area areas
perimeter volume surface height width length depth base diagonal hypotenuse leg legs similar congruent
Pythagorean theorem sine cosine tangent coordinate coordinates axis axes plane distance figure diagram
image picture shown below above left right top bottom label labeled shaded region inside outside around
measure measured unit units cm mm km meter meters inch inches foot feet second seconds minute minutes hour
hours day days week year years price cost dollars cents money buy sell pay each apples oranges books
students class school boxes cars speed rate time work water tank fill full empty rectangle chart table
bar pie data red blue green yellow black white large small big long short new old same different true false
You are a helpful assistant user system assistant Please reason step by step and put your final answer
within think answer boxed Let me check again wait correct wrong option options A B C D E choice
""".split()

_TEMPLATES = (
    "What is {a} {op} {b}?",
    "Compute {a} {op} {b}.",
    "Find the {w1} of the {w2} if the {w3} is {a} cm.",
    "A {w2} has {w1} {a} and {w3} {b}. What is its {w4}?",
    "In the figure, angle {L}{M}{N} is {a} degrees. Find angle {M}{N}{L}.",
    "The {w1} of a circle with radius {a} is {b}.",
    "Let x = {a}. Then {a} {op} {b} = {c}, so the answer is {c}.",
    "<think>{s}. {a} {op} {b} = {c}.</think><answer>{c}</answer>",
    "<think>\n{s}.\nSo {a}{op}{b}={c}.\n</think>\n<answer>{c}</answer>",
    "<think>{a}+{b}={c}</think><answer>{c}</answer>",
    "Therefore the final answer is \\boxed{{{c}}}.",
    "$\\frac{{{a}}}{{{b}}}$ and $\\sqrt{{{a}}}$ and $x^{{2}} + {a}x - {b} = 0$",
    "Options: (A) {a} (B) {b} (C) {c} (D) {d}. Answer: {L}",
    "{s}, {s2}; {a}% of {b} is {c}.",
    "Picture 1: {s} {a}x{b} pixels.",
)


def _corpus_lines() -> list[str]:
    """Deterministic synthetic corpus: math / geometry word problems, digits, LaTeX, reasoning tags."""
    lines: list[str] = []
    rng = random.Random(20240611)
    ops = ["+", "-", "*", "/", "^", "=", "<", ">", "\\times", "\\div", "\\cdot"]
    letters = "ABCDEFGHPQRSXYZ"
    for _ in range(4000):
        a, b = rng.randint(0, 999), rng.randint(0, 99)
        sent = " ".join(rng.choice(_WORDS) for _ in range(rng.randint(3, 10)))
        sent2 = " ".join(rng.choice(_WORDS) for _ in range(rng.randint(2, 6)))
        lines.append(
            rng.choice(_TEMPLATES).format(
                a=a,
                b=b,
                c=a + b,
                d=rng.randint(0, 9999),
                op=rng.choice(ops),
                w1=rng.choice(_WORDS),
                w2=rng.choice(_WORDS),
                w3=rng.choice(_WORDS),
                w4=rng.choice(_WORDS),
                L=rng.choice(letters),
                M=rng.choice(letters),
                N=rng.choice(letters),
                s=sent.capitalize(),
                s2=sent2,
            )
        )
    lines.append(" ".join(_WORDS))
    return lines


@functools.lru_cache(maxsize=1)
def _train_bpe() -> tuple[tuple[tuple[str, int], ...], tuple[tuple[str, str], ...]]:
    """Train a Qwen2-style byte-level BPE (same normalizer / pre-tokenizer as Qwen2Tokenizer).

    Returns (vocab items, merges) as tuples (hashable, cached per process)."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=BPE_VOCAB_SIZE,
        min_frequency=2,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
    )
    tok.train_from_iterator(_corpus_lines(), trainer=trainer)
    model = json.loads(tok.to_str())["model"]
    vocab = sorted(model["vocab"].items(), key=lambda kv: kv[1])
    if len(vocab) != BPE_VOCAB_SIZE:
        raise RuntimeError(
            f"BPE training produced {len(vocab)} tokens, expected {BPE_VOCAB_SIZE}; enlarge the corpus"
        )
    merges = tuple(tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model["merges"])
    return tuple(vocab), merges


def build_tokenizer(arch: str):
    """The arch's tokenizer (``Qwen2Tokenizer``): trained BPE + special tokens + ChatML chat template."""
    from transformers import AddedToken
    from transformers.models.qwen2.tokenization_qwen2 import Qwen2Tokenizer

    vocab_items, merges = _train_bpe()
    vocab = dict(vocab_items)
    specials = QWEN_SPECIALS if arch == "qwen2_5_vl" else INTERNVL_SPECIALS
    for tok in specials:
        vocab[tok] = len(vocab)
    common: dict[str, Any] = dict(
        vocab=vocab,
        merges=list(merges),
        unk_token=None,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        errors="replace",
        model_max_length=MAX_POSITIONS,
        clean_up_tokenization_spaces=False,
        split_special_tokens=False,
        add_prefix_space=False,
    )
    if arch == "qwen2_5_vl":
        tokenizer = Qwen2Tokenizer(**common, chat_template=QWEN_CHAT_TEMPLATE)
        extra = [t for t in specials if t not in ("<|endoftext|>", "<|im_end|>")]
    else:
        tokenizer = Qwen2Tokenizer(
            **common,
            chat_template=INTERNVL_CHAT_TEMPLATE,
            extra_special_tokens={
                "start_image_token": "<img>",
                "end_image_token": "</img>",
                "context_image_token": "<IMG_CONTEXT>",
                "video_token": "<video>",
            },
        )
        extra = ["<|im_start|>"]
    tokenizer.add_special_tokens(
        {"extra_special_tokens": [AddedToken(t, special=True, normalized=False) for t in extra]},
        replace_extra_special_tokens=False,
    )
    # Every special token must be a single, fixed id (the ones appended after the BPE vocabulary).
    for i, tok in enumerate(specials):
        got = tokenizer.convert_tokens_to_ids(tok)
        if got != BPE_VOCAB_SIZE + i or tokenizer.encode(tok, add_special_tokens=False) != [got]:
            raise RuntimeError(f"special token {tok!r} is not the single id {BPE_VOCAB_SIZE + i} (got {got})")
    if len(tokenizer) != VOCAB_SIZE:
        raise RuntimeError(f"tokenizer has {len(tokenizer)} tokens, expected {VOCAB_SIZE}")
    return tokenizer


# ---------------------------------------------------------------------------------------------------------
# Configs
# ---------------------------------------------------------------------------------------------------------
def _text_kwargs(num_layers: int, tok) -> dict[str, Any]:
    return dict(
        vocab_size=VOCAB_SIZE,
        hidden_size=TEXT_HIDDEN,
        intermediate_size=TEXT_INTERMEDIATE,
        num_hidden_layers=num_layers,
        num_attention_heads=TEXT_HEADS,
        num_key_value_heads=TEXT_KV_HEADS,
        hidden_act="silu",
        max_position_embeddings=MAX_POSITIONS,
        initializer_range=0.02,
        rms_norm_eps=RMS_EPS,
        use_cache=True,
        use_sliding_window=False,
        max_window_layers=num_layers,
        attention_dropout=0.0,
        bos_token_id=tok.convert_tokens_to_ids("<|endoftext|>"),
        eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=tok.convert_tokens_to_ids("<|endoftext|>"),
        tie_word_embeddings=False,
    )


def build_config(arch: str, tok, num_layers: int = 2, use_qk_norm: bool = False):
    if arch == "qwen2_5_vl":
        from transformers import Qwen2_5_VLConfig

        text = _text_kwargs(num_layers, tok)
        text["rope_parameters"] = {
            "rope_type": "default",
            "rope_theta": ROPE_THETA,
            "mrope_section": MROPE_SECTION,
        }
        vision = dict(
            depth=VIS_DEPTH,
            hidden_size=VIS_HIDDEN,
            hidden_act="silu",
            intermediate_size=VIS_INTERMEDIATE,
            num_heads=VIS_HEADS,
            in_channels=3,
            patch_size=PATCH,
            spatial_merge_size=QWEN_MERGE,
            temporal_patch_size=QWEN_TEMPORAL_PATCH,
            tokens_per_second=2,
            window_size=QWEN_WINDOW,
            out_hidden_size=TEXT_HIDDEN,
            fullatt_block_indexes=list(QWEN_FULLATT),
            initializer_range=0.02,
        )
        cfg = Qwen2_5_VLConfig(
            text_config=text,
            vision_config=vision,
            image_token_id=tok.convert_tokens_to_ids("<|image_pad|>"),
            video_token_id=tok.convert_tokens_to_ids("<|video_pad|>"),
            vision_start_token_id=tok.convert_tokens_to_ids("<|vision_start|>"),
            vision_end_token_id=tok.convert_tokens_to_ids("<|vision_end|>"),
            tie_word_embeddings=False,
        )
        cfg.architectures = ["Qwen2_5_VLForConditionalGeneration"]
        return cfg
    if arch == "internvl":
        from transformers import InternVLConfig, InternVLVisionConfig, Qwen2Config

        text = _text_kwargs(num_layers, tok)
        text["rope_parameters"] = {"rope_type": "default", "rope_theta": ROPE_THETA}
        vision = InternVLVisionConfig(
            hidden_size=VIS_HIDDEN,
            num_hidden_layers=VIS_DEPTH,
            num_attention_heads=VIS_HEADS,
            intermediate_size=VIS_INTERMEDIATE,
            attention_bias=True,
            use_qk_norm=use_qk_norm,
            hidden_act="gelu",
            norm_type="layer_norm",
            layer_norm_eps=1e-6,
            image_size=[INTERNVL_IMAGE_SIZE, INTERNVL_IMAGE_SIZE],
            patch_size=[PATCH, PATCH],
            num_channels=3,
            use_absolute_position_embeddings=True,
            layer_scale_init_value=0.1,
            use_mean_pooling=True,
            initializer_range=0.02,
        )
        cfg = InternVLConfig(
            text_config=Qwen2Config(**text),
            vision_config=vision,
            image_token_id=tok.convert_tokens_to_ids("<IMG_CONTEXT>"),
            image_seq_length=INTERNVL_SEQ_LEN,
            downsample_ratio=INTERNVL_DOWNSAMPLE,
            projector_hidden_act="gelu",
            vision_feature_layer=-1,
            vision_feature_select_strategy="default",
            tie_word_embeddings=False,
        )
        cfg.architectures = ["InternVLForConditionalGeneration"]
        return cfg
    raise ValueError(f"unknown arch {arch!r}; valid: {', '.join(ARCHS)}")


@contextlib.contextmanager
def _accept_missing_video_processor():
    """Let a processor be constructed with ``video_processor=None`` (ProcessorMixin type-checks it)."""
    from unittest import mock

    from transformers.processing_utils import ProcessorMixin

    orig_check = ProcessorMixin.check_argument_for_proper_class

    def check(self, argument_name, argument):
        if argument is None and argument_name == "video_processor":
            return None
        return orig_check(self, argument_name, argument)

    with mock.patch.object(ProcessorMixin, "check_argument_for_proper_class", check):
        yield


@contextlib.contextmanager
def video_processor_optional():
    """Let Qwen2_5_VLProcessor / InternVLProcessor be loaded where torchvision is missing.

    transformers 5.x makes every video processor (and ``VideoProcessorMixin`` itself) a torchvision-only
    dummy, yet ``ProcessorMixin`` always loads / type-checks the ``video_processor`` attribute of these
    processors, so without torchvision ``AutoProcessor.from_pretrained`` raises ImportError even for
    image-only use. Inside this context (and only where torchvision is unavailable) the video processor
    is simply ``None``; images and text work as usual. With torchvision installed this is a no-op.
    """
    from transformers.utils import is_torchvision_available

    if is_torchvision_available():
        yield
        return
    from unittest import mock

    from transformers.models.auto.video_processing_auto import AutoVideoProcessor

    with (
        _accept_missing_video_processor(),
        mock.patch.object(AutoVideoProcessor, "from_pretrained", classmethod(lambda cls, *a, **k: None)),
    ):
        yield


def load_processor(path: Path | str, **kwargs):
    """``AutoProcessor.from_pretrained(path)``, also on machines without torchvision (see above)."""
    from transformers import AutoProcessor

    with video_processor_optional():
        return AutoProcessor.from_pretrained(path, **kwargs)


def build_processor(arch: str, tok):
    if arch == "qwen2_5_vl":
        from transformers import Qwen2_5_VLProcessor, Qwen2VLImageProcessorPil

        image_processor = Qwen2VLImageProcessorPil(
            min_pixels=QWEN_MIN_PIXELS,
            max_pixels=QWEN_MAX_PIXELS,
            patch_size=PATCH,
            temporal_patch_size=QWEN_TEMPORAL_PATCH,
            merge_size=QWEN_MERGE,
        )
        return Qwen2_5_VLProcessor(
            image_processor=image_processor, tokenizer=tok, chat_template=QWEN_CHAT_TEMPLATE
        )
    from transformers import GotOcr2ImageProcessorPil, InternVLProcessor

    image_processor = GotOcr2ImageProcessorPil(
        size={"height": INTERNVL_IMAGE_SIZE, "width": INTERNVL_IMAGE_SIZE},
        crop_to_patches=True,
        min_patches=1,
        max_patches=INTERNVL_MAX_TILES,
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=[0.485, 0.456, 0.406],
        image_std=[0.229, 0.224, 0.225],
        do_convert_rgb=True,
    )
    return InternVLProcessor(
        image_processor=image_processor,
        tokenizer=tok,
        image_seq_length=INTERNVL_SEQ_LEN,
        chat_template=INTERNVL_CHAT_TEMPLATE,
    )


def video_processor_config(arch: str) -> dict[str, Any]:
    """The ``video_processor`` entry of processor_config.json (written by hand: video processors need torchvision).

    Only used where torchvision is installed (transformers then always loads a video processor and fails
    without a config for it); sizes match the image side so a frame gives as few tokens as an image."""
    if arch == "qwen2_5_vl":
        return {
            "video_processor_type": "Qwen2VLVideoProcessor",
            "size": {"shortest_edge": QWEN_MIN_PIXELS, "longest_edge": QWEN_MAX_PIXELS},
            "patch_size": PATCH,
            "temporal_patch_size": QWEN_TEMPORAL_PATCH,
            "merge_size": QWEN_MERGE,
            "min_frames": 2,
            "max_frames": 8,
            "do_sample_frames": False,
            "cap_pixels_per_frame": True,
            "image_mean": [0.48145466, 0.4578275, 0.40821073],
            "image_std": [0.26862954, 0.26130258, 0.27577711],
        }
    return {
        "video_processor_type": "InternVLVideoProcessor",
        "size": {"height": INTERNVL_IMAGE_SIZE, "width": INTERNVL_IMAGE_SIZE},
        "initial_shift": True,
        "do_sample_frames": False,
        "image_mean": [0.485, 0.456, 0.406],
        "image_std": [0.229, 0.224, 0.225],
    }


def save_processor(processor, out_dir: Path, video_config: dict[str, Any] | None = None) -> None:
    """``processor.save_pretrained(out_dir)`` for a processor whose ``video_processor`` is None.

    Same files as transformers 5.x writes (tokenizer files, ``chat_template.jinja`` and a nested
    ``processor_config.json`` holding the image processor), plus ``video_config`` as its video entry."""
    out_dir = Path(out_dir)
    tok = processor.tokenizer
    if hasattr(tok, "_set_processor_class"):
        tok._set_processor_class(type(processor).__name__)
    tok.save_pretrained(out_dir)
    # Legacy standalone preprocessor_config.json too (what transformers 4.x and inference engines read).
    processor.image_processor.save_pretrained(out_dir)
    (out_dir / "chat_template.jinja").write_text(processor.chat_template, encoding="utf-8")
    cfg = processor.to_dict()
    cfg.pop("video_processor", None)
    if video_config is not None:
        cfg["video_processor"] = video_config
    (out_dir / "processor_config.json").write_text(
        json.dumps(cfg, indent=2, sort_keys=True) + "\n", encoding="utf-8"
    )


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
