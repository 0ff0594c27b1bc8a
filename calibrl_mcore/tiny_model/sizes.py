"""Sizes, special tokens and chat templates of the tiny checkpoints (one place: tests and reports read them)."""

from __future__ import annotations

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
