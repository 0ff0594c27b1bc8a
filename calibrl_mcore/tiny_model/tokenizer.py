"""The tiny checkpoints' tokenizer: a Qwen2-style byte-level BPE trained on a generated corpus + specials."""

from __future__ import annotations

import functools
import json
import random
from typing import Any

from calibrl_mcore.tiny_model.sizes import (
    BPE_VOCAB_SIZE,
    INTERNVL_CHAT_TEMPLATE,
    INTERNVL_SPECIALS,
    MAX_POSITIONS,
    QWEN_CHAT_TEMPLATE,
    QWEN_SPECIALS,
    VOCAB_SIZE,
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
