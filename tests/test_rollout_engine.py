"""Embedded rollout engine, in-process, on tiny random Qwen2.5-VL / InternVL checkpoints."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from rollout.engines.base import EngineInputError, GenerateRequest, SamplingParams
from rollout.engines.embedded import EmbeddedEngine
from rollout.engines.sampling import SamplingTensors, sample_next_tokens

PROMPTS = ["the quick brown fox", "1+2=3 and x", "what is the answer? " * 5]


def tiny_model_dir(base: Path, arch: str, seed: int) -> Path:
    """Build (once per pytest session, shared by the rollout test modules) a tiny random checkpoint."""
    from tools.make_tiny_model import make_tiny_model

    out = base / f"rollout-tiny-{arch}-seed{seed}"
    if not (out / "config.json").exists():
        make_tiny_model(arch, out, seed=seed)
    return out


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_model_dir(tmp_path_factory.getbasetemp(), "qwen2_5_vl", 0)


@pytest.fixture(scope="module")
def engine(model_dir: Path):
    eng = EmbeddedEngine(model_dir, max_batch_size=64)
    yield eng
    eng.shutdown()


@pytest.fixture(scope="module")
def hf_model(model_dir: Path):
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText.from_pretrained(model_dir).eval()


def random_image(seed: int, size: tuple[int, int] = (90, 60)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((size[1], size[0], 3)) * 255).astype("uint8"))


def greedy(max_new_tokens: int, **kw) -> SamplingParams:
    return SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0, ignore_eos=True, **kw)


def teacher_forced_logprobs(model, prompt_ids: list[int], output_ids: list[int], **mm) -> torch.Tensor:
    ids = torch.tensor([prompt_ids + output_ids])
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), **mm).logits[0].float()  # [L, V]
    logprobs = torch.log_softmax(logits, dim=-1)[len(prompt_ids) - 1 : -1]  # predictions of the outputs
    return logprobs.gather(1, torch.tensor(output_ids)[:, None]).squeeze(1)


def test_greedy_matches_hf_generate_and_logprobs_match_teacher_forcing(engine, hf_model):
    # All prompts submitted together: they decode in one batch of different lengths (left padding).
    results = engine.generate([GenerateRequest(text=p, sampling=greedy(24)) for p in PROMPTS])
    for prompt, (sample,) in zip(PROMPTS, results):
        ids = engine.tokenizer(prompt)["input_ids"]
        ref = hf_model.generate(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                max_new_tokens=24, do_sample=False, eos_token_id=None)
        expected = ref[0, len(ids):].tolist()
        assert len(expected) >= 20 and sample.output_ids[: len(expected)] == expected
        assert sample.finish_reason == {"type": "length", "length": 24}
        forced = teacher_forced_logprobs(hf_model, ids, sample.output_ids)
        assert torch.allclose(torch.tensor(sample.output_logprobs), forced, atol=1e-5, rtol=0)


def test_lean_decode_step_is_used_and_equals_the_hf_forward(engine, model_dir):
    assert engine._lean_step is not None, "the lean decode step should accept the Qwen2.5-VL decoder"
    hf_path = EmbeddedEngine(model_dir, max_batch_size=8, lean_decode=False)
    try:
        requests = [GenerateRequest(text=p, sampling=greedy(16), return_logprob=True) for p in PROMPTS]
        lean_out, hf_out = engine.generate(requests), hf_path.generate(requests)
        for (lean,), (hf,) in zip(lean_out, hf_out):
            assert lean.output_ids == hf.output_ids
            assert torch.allclose(torch.tensor(lean.output_logprobs), torch.tensor(hf.output_logprobs), atol=1e-6)
    finally:
        hf_path.shutdown()


def test_greedy_with_image_matches_hf_for_text_and_input_ids(engine, hf_model):
    image = random_image(1)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is shown?"}]}]
    text = engine.apply_chat_template(messages)
    inputs = engine.processor(text=[text], images=[image], return_tensors="pt")
    ref = hf_model.generate(**inputs, max_new_tokens=12, do_sample=False, eos_token_id=None)
    expected = ref[0, inputs["input_ids"].shape[1]:].tolist()
    # The same prompt as text (placeholder expanded by the processor) and as unexpanded token ids.
    unexpanded_ids = engine.tokenizer(text)["input_ids"]
    by_text, by_ids = engine.generate([
        GenerateRequest(text=text, images=[image], sampling=greedy(12)),
        GenerateRequest(input_ids=unexpanded_ids, images=[image], sampling=greedy(12)),
    ])
    assert by_text[0].output_ids == expected
    assert by_ids[0].output_ids == expected
    assert by_text[0].prompt_tokens == inputs["input_ids"].shape[1]


def test_seeded_sampling_is_deterministic_whatever_the_batch(engine):
    params = SamplingParams(max_new_tokens=16, temperature=1.0, top_p=0.9, top_k=50, n=3, seed=1234)
    alone = engine.generate([GenerateRequest(text=PROMPTS[0], sampling=params)])[0]
    # Same request again, now batched with unrelated requests.
    crowd = [GenerateRequest(text=p, sampling=SamplingParams(max_new_tokens=20, n=2)) for p in PROMPTS]
    together = engine.generate([*crowd, GenerateRequest(text=PROMPTS[0], sampling=params)])[-1]
    assert [s.output_ids for s in alone] == [s.output_ids for s in together]
    assert len({tuple(s.output_ids) for s in alone}) == 3, "the n samples must differ from each other"
    other = engine.generate([GenerateRequest(text=PROMPTS[0], sampling=SamplingParams(
        max_new_tokens=16, temperature=1.0, top_p=0.9, top_k=50, n=3, seed=99))])[0]
    assert [s.output_ids for s in other] != [s.output_ids for s in alone]


def test_n_samples_share_one_prefill(engine, monkeypatch):
    prefill_lengths: list[int] = []
    decode_rows: list[int] = []
    prefill, decode = engine._prefill_forward, engine._decode_logits

    def spy_prefill(prompt, *args, **kwargs):
        prefill_lengths.append(prompt.length)
        return prefill(prompt, *args, **kwargs)

    def spy_decode(batch, *args, **kwargs):
        logits = decode(batch, *args, **kwargs)
        decode_rows.append(logits.shape[0])
        return logits

    monkeypatch.setattr(engine, "_prefill_forward", spy_prefill)
    monkeypatch.setattr(engine, "_decode_logits", spy_decode)
    sampling = SamplingParams(max_new_tokens=5, n=8, ignore_eos=True)  # no sample may leave the batch early
    samples = engine.generate([GenerateRequest(text=PROMPTS[2], sampling=sampling)])[0]
    prompt_len = samples[0].prompt_tokens
    assert prefill_lengths == [prompt_len], "the prompt is prefilled once, not once per sample"
    assert decode_rows and all(rows == 8 for rows in decode_rows), "the 8 samples decode as one batch"
    assert len(samples) == 8 and all(s.prompt_tokens == prompt_len for s in samples)


def test_a_batch_is_admitted_as_one_unit(engine, monkeypatch):
    """`submit_batch` (one HTTP call's prompts) queues its requests together, so the first decode step always
    holds all their rows: the batch composition, and with it the logits' rounding, does not depend on how fast
    the prompts were tokenized (which made reruns sample differently now and then)."""
    decode_rows: list[int] = []
    decode, build = engine._decode_logits, engine.prompts.build

    def spy_decode(batch, *args, **kwargs):
        logits = decode(batch, *args, **kwargs)
        decode_rows.append(logits.shape[0])
        return logits

    def slow_build(request):  # a slow tokenizer: the scheduler would start on the first prompt alone
        time.sleep(0.2)
        return build(request)

    monkeypatch.setattr(engine, "_decode_logits", spy_decode)
    monkeypatch.setattr(engine.prompts, "build", slow_build)
    sampling = SamplingParams(max_new_tokens=4, n=2, ignore_eos=True, seed=1)
    futures = engine.submit_batch([GenerateRequest(text=p, sampling=sampling) for p in PROMPTS])
    assert all(len(f.result()) == 2 for f in futures)
    assert decode_rows[0] == 2 * len(PROMPTS), decode_rows


def test_stop_strings_eos_and_length(engine):
    base = engine.generate([GenerateRequest(text=PROMPTS[1], sampling=greedy(30))])[0][0]
    # Pick a stop string from the middle of the greedy text, so greedy decoding must hit it.
    stop = base.text[10:13]
    cut = engine.generate([GenerateRequest(text=PROMPTS[1], sampling=greedy(30, stop=(stop,)))])[0][0]
    assert cut.finish_reason == {"type": "stop", "matched": stop}
    assert cut.text == base.text[: base.text.index(stop)]
    assert cut.output_ids == base.output_ids[: len(cut.output_ids)] and len(cut.output_ids) < 30
    assert len(cut.output_logprobs) == len(cut.output_ids)
    kept = engine.generate([GenerateRequest(text=PROMPTS[1], sampling=greedy(30, stop=(stop,), no_stop_trim=True))])
    assert kept[0][0].text.endswith(stop)
    # A stop token id ends the sample right after that token (it stays in output_ids, like eos).
    token = base.output_ids[5]
    by_id = engine.generate([GenerateRequest(text=PROMPTS[1], sampling=greedy(30, stop_token_ids=(token,)))])[0][0]
    first = base.output_ids.index(token)
    assert by_id.output_ids == base.output_ids[: first + 1]
    assert by_id.finish_reason == {"type": "stop", "matched": token}
    empty = engine.generate([GenerateRequest(text=PROMPTS[1], sampling=SamplingParams(max_new_tokens=0, n=2))])[0]
    assert [s.output_ids for s in empty] == [[], []]


def test_context_length_and_input_validation(model_dir):
    small = EmbeddedEngine(model_dir, max_context_len=32, max_batch_size=4)
    try:
        with pytest.raises(EngineInputError) as err:
            small.submit(GenerateRequest(text="the quick brown fox " * 20))
        assert err.value.field == "text"
        # A prompt that fits is cut at the context length: finish_reason "length".
        sample = small.generate([GenerateRequest(input_ids=list(range(20)), sampling=greedy(100))])[0][0]
        assert len(sample.output_ids) == 32 - 20 and sample.finish_reason["type"] == "length"
        for bad, field in [(SamplingParams(max_new_tokens=-1), "sampling_params.max_new_tokens"),
                           (SamplingParams(top_p=0.0), "sampling_params.top_p"),
                           (SamplingParams(n=5), "sampling_params.n")]:
            with pytest.raises(EngineInputError) as err:
                small.submit(GenerateRequest(text="hi", sampling=bad))
            assert err.value.field == field
        with pytest.raises(EngineInputError, match="image_data"):
            small.submit(GenerateRequest(text="no placeholder", images=[random_image(0)]))
    finally:
        small.shutdown()


def test_requests_join_the_running_batch(engine):
    """Continuous batching: a short request submitted mid-way finishes long before a long one."""
    long_future = engine.submit(GenerateRequest(text=PROMPTS[0], sampling=greedy(3000)))
    time.sleep(0.2)  # the long request is decoding by now (3000 steps take seconds)
    finished: dict[str, float] = {}
    short_future = engine.submit(GenerateRequest(text=PROMPTS[1], sampling=greedy(4)))
    short_future.add_done_callback(lambda _: finished.setdefault("short", time.perf_counter()))
    long_future.add_done_callback(lambda _: finished.setdefault("long", time.perf_counter()))
    long_future.result(timeout=120)
    short_future.result(timeout=120)
    assert finished["short"] < finished["long"]


def test_update_weights_from_tensors_validates_and_changes_outputs(engine):
    request = GenerateRequest(text=PROMPTS[0], sampling=greedy(8), return_logprob=True)
    before = engine.generate([request])[0][0]
    name = "lm_head.weight"
    original = dict(engine.model.named_parameters())[name].detach().clone()
    with pytest.raises(EngineInputError, match="no.such.weight"):
        engine.update_weights_from_tensors([("no.such.weight", torch.zeros(1))])
    with pytest.raises(EngineInputError, match=r"lm_head\.weight.*shape"):
        engine.update_weights_from_tensors([(name, torch.zeros(3, 3))])
    version = engine.weight_version
    try:
        new_version = engine.update_weights_from_tensors([(name, torch.randn_like(original))])
        assert new_version == version + 1
        after = engine.generate([request])[0][0]
        assert after.weight_version == new_version
        assert after.output_logprobs != before.output_logprobs
    finally:
        engine.update_weights_from_tensors([(name, original)], weight_version=version + 2)
    assert engine.generate([request])[0][0].output_ids == before.output_ids
    # Pre-transformers-5 checkpoint names (what older exporters write) map onto the module names.
    legacy = "model.layers.0.mlp.up_proj.weight"
    current = dict(engine.model.named_parameters())["model.language_model.layers.0.mlp.up_proj.weight"]
    assert engine.update_weights_from_tensors([(legacy, current.detach().clone())]) == version + 3


def test_concurrent_submitters(engine):
    errors: list[BaseException] = []
    results: list[int] = []

    def worker(i: int) -> None:
        try:
            out = engine.generate([GenerateRequest(text=PROMPTS[i % 3], sampling=SamplingParams(max_new_tokens=6, n=2))])
            results.append(len(out[0]))
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors and results == [2] * 8


def test_sampler_filters_and_distribution():
    torch.manual_seed(0)
    logits = torch.randn(4, 50)
    uniforms = torch.rand(4)
    def run(temperature, top_p, top_k):
        return sample_next_tokens(logits, SamplingTensors(
            temperature=torch.full((4,), temperature), top_p=torch.full((4,), top_p),
            top_k=torch.full((4,), top_k, dtype=torch.int64), uniforms=uniforms))
    greedy_tokens, greedy_lp = run(0.0, 1.0, -1)
    assert torch.equal(greedy_tokens, logits.argmax(-1))
    assert torch.allclose(greedy_lp, torch.log_softmax(logits, -1).max(-1).values)
    assert torch.equal(run(1.0, 1.0, 1)[0], greedy_tokens)  # top-k 1 is greedy
    assert torch.equal(run(1.0, 1e-6, -1)[0], greedy_tokens)  # a tiny top-p keeps only the best token
    # top-k 5: samples stay within the 5 best tokens of each row.
    top5 = logits.topk(5, dim=-1).indices
    for u in torch.linspace(0, 0.999, 7):
        tokens, _ = sample_next_tokens(logits, SamplingTensors(torch.ones(4), torch.ones(4), torch.full((4,), 5),
                                                               torch.full((4,), float(u))))
        assert all(tokens[i] in top5[i] for i in range(4))
    # Top-p applies to the top-k-renormalised distribution (HF / SGLang order): with probabilities
    # [.4, .3, .2, .1], top-k 2 leaves [.57, .43], and top-p .5 then keeps the best token only.
    row = torch.tensor([[0.4, 0.3, 0.2, 0.1]]).log().expand(16, -1)
    tokens, _ = sample_next_tokens(row, SamplingTensors(torch.ones(16), torch.full((16,), 0.5),
                                                        torch.full((16,), 2), torch.linspace(0, 0.999, 16)))
    assert tokens.tolist() == [0] * 16
    # Frequencies follow softmax(logits / T) on one row.
    row = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    draws = 20000
    uniforms = torch.rand(draws)
    tokens, _ = sample_next_tokens(row.expand(draws, -1), SamplingTensors(
        torch.full((draws,), 0.7), torch.ones(draws), torch.full((draws,), -1), uniforms))
    freq = torch.bincount(tokens, minlength=4).float() / draws
    assert torch.allclose(freq, torch.softmax(row[0] / 0.7, -1), atol=0.015)


def test_sampled_token_does_not_depend_on_batch_neighbours():
    """An unfiltered row draws the same token for its uniform alone and beside a top-p / top-k row (the
    filtering row sorts the vocabulary; the unfiltered one must not follow it)."""
    torch.manual_seed(1)
    logits = torch.randn(2, 64)
    uniforms = torch.rand(2)
    for u in torch.linspace(0.01, 0.99, 25):
        uniforms[0] = u
        alone, _ = sample_next_tokens(logits[:1], SamplingTensors(torch.ones(1), torch.ones(1),
                                                                   torch.full((1,), -1), uniforms[:1]))
        mixed, _ = sample_next_tokens(logits, SamplingTensors(torch.ones(2), torch.tensor([1.0, 0.9]),
                                                              torch.tensor([-1, 8]), uniforms))
        filtered_alone, _ = sample_next_tokens(logits[1:], SamplingTensors(torch.ones(1), torch.tensor([0.9]),
                                                                            torch.tensor([8]), uniforms[1:]))
        assert mixed[0] == alone[0] and mixed[1] == filtered_alone[0]


def test_internvl_greedy_matches_hf(tmp_path_factory):
    from transformers import AutoModelForImageTextToText

    path = tiny_model_dir(tmp_path_factory.getbasetemp(), "internvl", 0)
    eng = EmbeddedEngine(path, max_batch_size=8)
    try:
        assert eng._lean_step is not None
        model = AutoModelForImageTextToText.from_pretrained(path).eval()
        image = random_image(3)
        text = eng.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "hi"}]}])
        inputs = eng.processor(text=[text], images=[image], return_tensors="pt")
        ref = model.generate(**inputs, max_new_tokens=10, do_sample=False, eos_token_id=None)
        out = eng.generate([GenerateRequest(text=text, images=[image], sampling=greedy(10), return_logprob=True)])
        assert out[0][0].output_ids == ref[0, inputs["input_ids"].shape[1]:].tolist()
    finally:
        eng.shutdown()


# --------------------------------------------------------------------------------------------------
# External servers (SGLang / vLLM): command lines, the missing-package error, the supervisor.
# --------------------------------------------------------------------------------------------------
FAKE_SERVER = """
import http.server, sys
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200 if self.path == "/health" else 404); self.end_headers()
    def log_message(self, *a): pass
http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
"""


def test_external_server_commands_and_missing_package_error():
    import importlib.util
    import sys

    from rollout.engines.sglang import SGLangServer
    from rollout.engines.vllm import VLLMServer
    from rollout.server import main

    for cls, package in ((SGLangServer, "sglang"), (VLLMServer, "vllm")):
        if importlib.util.find_spec(package) is None:
            with pytest.raises(RuntimeError, match=rf"{package} is not installed: pip install calibrl-mcore\[gpu\]"):
                cls("/models/qwen")
    if importlib.util.find_spec("sglang") is None:  # `calibrl serve --engine sglang` on a CPU machine
        with pytest.raises(RuntimeError, match="sglang is not installed"):
            main(["--model", "/models/qwen", "--engine", "sglang"])
    sglang = SGLangServer("/models/qwen", port=31000, api_key="k", tp_size=2, mem_fraction_static=0.7,
                          context_length=4096, extra_args=("--enable-metrics",), require_installed=False)
    assert sglang.command() == [sys.executable, "-m", "sglang.launch_server", "--model-path", "/models/qwen",
                                "--host", "127.0.0.1", "--port", "31000", "--tp-size", "2",
                                "--base-gpu-id", "0", "--enable-deterministic-inference",
                                "--mem-fraction-static", "0.7", "--context-length", "4096", "--api-key", "k",
                                "--enable-metrics"]
    vllm = VLLMServer("/models/qwen", port=31001, tp_size=4, context_length=8192, require_installed=False)
    cmd = vllm.command()
    assert "/models/qwen" in cmd and cmd[cmd.index("--tensor-parallel-size") + 1] == "4"
    assert cmd[cmd.index("--max-model-len") + 1] == "8192" and "--api-key" not in cmd
    vllm.base_gpu_id = 2  # no --base-gpu-id in vLLM: its GPUs come from CUDA_VISIBLE_DEVICES
    assert vllm.env()["CUDA_VISIBLE_DEVICES"] == "2,3,4,5"


def test_external_server_supervisor_restarts_boundedly_and_stops():
    import socket
    import sys

    from rollout.engines.base import ExternalServer

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]

    class FakeServer(ExternalServer):
        package = "fake"

        def command(self) -> list[str]:
            return [sys.executable, "-c", FAKE_SERVER, str(self.port)]

    server = FakeServer("unused", port=port, max_restarts=1, health_timeout=30, require_installed=False)
    server.start()
    try:
        first = server.process
        first.kill()
        first.wait()
        server.ensure_running()  # died -> restarted once, healthy again
        assert server.restarts == 1 and server.process is not first and server.process.poll() is None
        server.process.kill()
        server.process.wait()
        with pytest.raises(RuntimeError, match="not restarting again"):
            server.ensure_running()
    finally:
        server.stop()
    assert server.process.poll() is not None
