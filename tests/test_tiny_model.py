"""tools/make_tiny_model.py: tiny random Qwen2.5-VL / InternVL checkpoints that load with the Auto classes."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor, AutoTokenizer

from calibrl_mcore.make_tiny_model import (
    INTERNVL_SPECIALS,
    QWEN_SPECIALS,
    VOCAB_SIZE,
    main,
    make_tiny_model,
    video_processor_optional,
)

ARCHS = ["qwen2_5_vl", "internvl"]
PROCESSOR_CLS = {"qwen2_5_vl": "Qwen2_5_VLProcessor", "internvl": "InternVLProcessor"}
MODEL_CLS = {
    "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
    "internvl": "InternVLForConditionalGeneration",
}
# image size -> number of image-context tokens (<|image_pad|> / <IMG_CONTEXT>) in the processed prompt
IMAGE_TOKENS = {
    "qwen2_5_vl": {(56, 56): 4, (112, 112): 16, (28, 28): 4, (224, 224): 16},
    "internvl": {(56, 56): 4, (112, 112): 20, (28, 28): 4, (224, 224): 20},
}


def _image(w: int, h: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8))


def _messages(text: str = "What is the area of the triangle?"):
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]


def _load_processor(path):
    # AutoProcessor itself; the context only lets transformers 5 skip the video processor where
    # torchvision is missing (see calibrl_mcore.make_tiny_model.video_processor_optional).
    with video_processor_optional():
        return AutoProcessor.from_pretrained(path)


@pytest.fixture(scope="module")
def built(tiny_checkpoints):
    return {arch: tiny_checkpoints[arch] for arch in ARCHS}


@pytest.fixture(scope="module")
def loaded(built):
    out = {}
    for arch, path in built.items():
        model = AutoModelForImageTextToText.from_pretrained(path)
        model.eval()
        out[arch] = (_load_processor(path), model)
    return out


@pytest.mark.parametrize("arch", ARCHS)
def test_files_and_config(built, arch):
    path = built[arch]
    for name in (
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_template.jinja",
        "processor_config.json",
        "preprocessor_config.json",
    ):
        assert (path / name).is_file(), name
    cfg = json.loads((path / "config.json").read_text())
    text = cfg["text_config"]
    assert cfg["architectures"] == [MODEL_CLS[arch]]
    assert (text["hidden_size"], text["num_hidden_layers"], text["num_attention_heads"]) == (64, 2, 4)
    assert (text["num_key_value_heads"], text["intermediate_size"], text["vocab_size"]) == (
        2,
        128,
        VOCAB_SIZE,
    )
    assert text["rope_theta"] == 1e6
    if arch == "qwen2_5_vl":
        head_dim = text["hidden_size"] // text["num_attention_heads"]
        assert sum(text["rope_parameters"]["mrope_section"]) * 2 == head_dim
        assert text["rope_scaling"]["mrope_section"] == text["rope_parameters"]["mrope_section"]
        vis = cfg["vision_config"]
        assert vis["out_hidden_size"] == text["hidden_size"]
        assert all(i < vis["depth"] for i in vis["fullatt_block_indexes"])
    else:
        vis = cfg["vision_config"]
        assert vis["image_size"] == [56, 56] and cfg["image_seq_length"] == 4
        proc_cfg = json.loads((path / "processor_config.json").read_text())
        assert proc_cfg["image_seq_length"] == cfg["image_seq_length"]
    gen = json.loads((path / "generation_config.json").read_text())
    tok = AutoTokenizer.from_pretrained(path)
    assert gen["eos_token_id"] == [
        tok.convert_tokens_to_ids("<|im_end|>"),
        tok.convert_tokens_to_ids("<|endoftext|>"),
    ]


@pytest.mark.parametrize("arch", ARCHS)
def test_tokenizer(built, arch):
    tok = AutoTokenizer.from_pretrained(built[arch])
    assert type(tok).__name__ == "Qwen2Tokenizer"
    assert len(tok) == VOCAB_SIZE
    s = "<think>2+3=5</think><answer>5</answer>"
    ids = tok.encode(s, add_special_tokens=False)
    assert tok.decode(ids) == s
    specials = QWEN_SPECIALS if arch == "qwen2_5_vl" else INTERNVL_SPECIALS
    for i, sp in enumerate(specials):
        ids = tok.encode(sp, add_special_tokens=False)
        assert ids == [VOCAB_SIZE - len(specials) + i], sp
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    chat = tok.encode("<|im_start|>user\nHello world<|im_end|>", add_special_tokens=False)
    assert tok.decode(chat, skip_special_tokens=True) == "user\nHello world"
    text = "A triangle with sides 3, 4 and 5 has area 6 cm^2."
    assert tok.decode(tok.encode(text, add_special_tokens=False)) == text
    assert len(tok.encode(text, add_special_tokens=False)) < len(text.encode())  # BPE merges something


@pytest.mark.parametrize("arch", ARCHS)
def test_processor_and_generate(loaded, arch):
    processor, model = loaded[arch]
    assert type(processor).__name__ == PROCESSOR_CLS[arch]
    assert type(model).__name__ == MODEL_CLS[arch]
    assert model.dtype == torch.float32
    tok = processor.tokenizer
    image_token_id = model.config.image_token_id

    prompt = processor.apply_chat_template(_messages(), add_generation_prompt=True, tokenize=False)
    assert prompt.startswith("<|im_start|>") and prompt.endswith("<|im_start|>assistant\n")
    placeholder = "<|vision_start|><|image_pad|><|vision_end|>" if arch == "qwen2_5_vl" else "<IMG_CONTEXT>\n"
    assert prompt.count(placeholder) == 1

    for size, n_tokens in IMAGE_TOKENS[arch].items():
        enc = processor(text=[prompt], images=[_image(*size)], return_tensors="pt")
        assert int((enc["input_ids"] == image_token_id).sum()) == n_tokens, size
    if arch == "qwen2_5_vl":
        assert image_token_id == tok.convert_tokens_to_ids("<|image_pad|>")
        assert model.config.vision_start_token_id == tok.convert_tokens_to_ids("<|vision_start|>")
        assert model.config.video_token_id == tok.convert_tokens_to_ids("<|video_pad|>")
    else:
        assert image_token_id == tok.convert_tokens_to_ids("<IMG_CONTEXT>")
        ids = processor(text=[prompt], images=[_image(56, 56)])["input_ids"][0]
        start = tok.convert_tokens_to_ids("<img>")
        end = tok.convert_tokens_to_ids("</img>")
        i = ids.index(start)
        assert ids[i + 1 : i + 5] == [image_token_id] * 4 and ids[i + 5] == end

    enc = processor(text=[prompt], images=[_image(56, 56)], return_tensors="pt")
    with torch.no_grad():
        out = model(**enc)
    assert out.logits.shape == (1, enc["input_ids"].shape[1], VOCAB_SIZE)
    assert torch.isfinite(out.logits).all()

    gen = model.generate(**enc, max_new_tokens=5, do_sample=False)
    n_in = enc["input_ids"].shape[1]
    assert n_in < gen.shape[1] <= n_in + 5
    assert (gen[0, :n_in] == enc["input_ids"][0]).all()
    assert isinstance(processor.decode(gen[0, n_in:], skip_special_tokens=True), str)


@pytest.mark.parametrize("arch", ARCHS)
def test_batched_generate_left_padding(loaded, arch):
    processor, model = loaded[arch]
    prompts = [
        processor.apply_chat_template(_messages(q), add_generation_prompt=True, tokenize=False)
        for q in ("Find x.", "What is the perimeter of the square with side 7?")
    ]
    enc = processor(
        text=prompts,
        images=[_image(56, 56, 1), _image(112, 84, 2)],
        padding=True,
        padding_side="left",
        return_tensors="pt",
    )
    assert enc["attention_mask"][0, 0] == 0  # first prompt is shorter -> left-padded
    gen = model.generate(**enc, max_new_tokens=3, do_sample=False)
    assert gen.shape[0] == 2 and gen.shape[1] <= enc["input_ids"].shape[1] + 3


@pytest.mark.parametrize("arch", ARCHS)
def test_deterministic_weights(tmp_path, built, arch):
    again = make_tiny_model(arch, tmp_path / "again", seed=0)
    other = make_tiny_model(arch, tmp_path / "other", seed=1)
    ref = (built[arch] / "model.safetensors").read_bytes()
    assert (again / "model.safetensors").read_bytes() == ref
    assert (other / "model.safetensors").read_bytes() != ref
    for name in ("tokenizer.json", "config.json", "processor_config.json"):
        assert (again / name).read_bytes() == (built[arch] / name).read_bytes(), name


def test_internvl_qk_norm_and_layers(tmp_path):
    path = make_tiny_model("internvl", tmp_path / "m", seed=2, num_layers=3, use_qk_norm=True)
    model = AutoModelForImageTextToText.from_pretrained(path)
    assert model.config.vision_config.use_qk_norm is True
    assert model.config.text_config.num_hidden_layers == 3
    processor = _load_processor(path)
    prompt = processor.apply_chat_template(_messages(), add_generation_prompt=True, tokenize=False)
    enc = processor(text=[prompt], images=[_image(56, 56)], return_tensors="pt")
    with torch.no_grad():
        assert torch.isfinite(model(**enc).logits).all()


def test_cli_errors(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["--arch", "llava", "--out", str(tmp_path / "x")])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "qwen2_5_vl" in err and "internvl" in err

    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("x")
    with pytest.raises(SystemExit) as e:
        main(["--arch", "internvl", "--out", str(busy)])
    assert e.value.code == 2
    assert "not empty" in capsys.readouterr().err
    assert (busy / "keep.txt").exists()

    (busy / "sub").mkdir()
    with pytest.raises(SystemExit):
        main(["--arch", "internvl", "--out", str(busy), "--overwrite"])
    assert (busy / "keep.txt").exists()

    (busy / "sub").rmdir()
    assert main(["--arch", "internvl", "--out", str(busy), "--overwrite", "--layers", "1"]) == 0
    assert not (busy / "keep.txt").exists() and (busy / "model.safetensors").is_file()

    with pytest.raises(SystemExit):
        main(["--arch", "qwen2_5_vl", "--out", str(tmp_path / "q"), "--qk-norm"])
