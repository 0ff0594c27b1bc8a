"""The static-pool decode step (rollout/engines/graph_decode.py), run eagerly on the CPU: the same function
a CUDA graph captures. It must equal the slab step, and an engine on it must equal one on the slab."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from rollout.engines import graph_decode
from rollout.engines.base import GenerateRequest, SamplingParams
from rollout.engines.decode_step import LeanDecodeStep
from rollout.engines.embedded import EmbeddedEngine
from rollout.engines.graph_decode import CudaGraphDecoder, batch_bucket, column_bucket
from rollout.engines.kv_batch import DecodeBatch
from rollout.engines.prompts import PromptBuilder, load_processor
from tests.test_rollout_engine import random_image, tiny_model_dir

MAX_ROWS = 12  # not a power of two: the largest batch bucket is 12 itself


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_model_dir(tmp_path_factory.getbasetemp(), "qwen2_5_vl", 0)


@pytest.fixture(scope="module")
def engines(model_dir: Path):
    slab = EmbeddedEngine(model_dir, max_batch_size=MAX_ROWS, decode_graphs="off")
    static = EmbeddedEngine(model_dir, max_batch_size=MAX_ROWS, decode_graphs="on")
    yield slab, static
    slab.shutdown()
    static.shutdown()


class HostReads(TorchDispatchMode):
    """Records the aten ops that run under it."""

    SYNCING = {"aten::item", "aten::is_nonzero", "aten::_local_scalar_dense", "aten::equal", "aten::nonzero",
               "aten::masked_select", "aten::unique_dim", "aten::_unique2", "aten::repeat_interleave"}

    def __init__(self) -> None:
        super().__init__()
        self.ops: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.add(func._schema.name)
        return func(*args, **(kwargs or {}))


def assert_same_samples(expected, actual) -> None:
    for want, got in zip(expected, actual, strict=True):
        for a, b in zip(want, got, strict=True):
            assert b.output_ids == a.output_ids
            assert b.finish_reason == a.finish_reason
            assert torch.allclose(torch.tensor(b.output_logprobs), torch.tensor(a.output_logprobs), atol=1e-5, rtol=0)


def test_buckets():
    assert [batch_bucket(n, 256) for n in (1, 2, 3, 5, 64, 65, 256)] == [1, 2, 4, 8, 64, 128, 256]
    assert [batch_bucket(n, 12) for n in (7, 8, 9, 12)] == [8, 8, 12, 12]
    # Multiples of 256; above 1024 of a quarter of the power of two below, so <= 4 buckets per doubling.
    assert [column_bucket(n, 32768) for n in (1, 256, 257, 1024, 1025, 2049, 5000)] == [
        256, 256, 512, 1024, 1280, 2560, 5120]
    assert column_bucket(20, 32) == 256  # capped at the context length rounded up to 256
    assert all(column_bucket(column_bucket(n, 32768), 32768) == column_bucket(n, 32768) for n in range(1, 9000, 7))
    with pytest.raises(ValueError, match="rows=13"):
        batch_bucket(13, 12)
    with pytest.raises(ValueError, match="columns=300"):
        column_bucket(300, 32)


def test_static_step_equals_the_lean_slab_step(model_dir: Path):
    from transformers import AutoModelForImageTextToText, DynamicCache

    model = AutoModelForImageTextToText.from_pretrained(model_dir, attn_implementation="sdpa").eval()
    lean = LeanDecodeStep.for_model(model)
    prompts = PromptBuilder(load_processor(model_dir), model, torch.device("cpu"), torch.float32)
    lengths_and_n = [(3, 1), (8, 2), (250, 1)]  # the last row crosses column 256 while decoding
    prefills = []
    with torch.inference_mode():
        for length, n in lengths_and_n:
            prompt = prompts.build(GenerateRequest(input_ids=[(7 * i) % 500 + 10 for i in range(length)]))
            cache = DynamicCache()
            lean(prompt.input_ids[None, :], None, prompt.position_ids, cache)
            prefills.append((cache, prompt, n))
        slab = DecodeBatch.from_prefills(prefills, "past_key_values")
        decoder = CudaGraphDecoder(lean, model, max_slots=8, max_columns=1024, graphs=False)
        static = decoder.new_batch()
        static.append_prefills(prefills, longest=251)  # too small on purpose: the pool grows mid-way
        assert decoder.pool.capacity == 256 and decoder.pool.slots == 4
        generator = torch.Generator().manual_seed(0)
        for step in range(8):
            if step == 4:  # row 1 leaves: row 2 and 3 move down one slot
                slab, static = slab.select([0, 2, 3]), static.select([0, 2, 3])
            tokens = torch.randint(10, 700, (slab.size,), generator=generator).tolist()
            slab.set_last_tokens(tokens, 0)
            static.set_last_tokens(tokens, 0)
            input_ids, inputs = slab.step_inputs()
            expected = lean(input_ids, inputs["attention_mask"], inputs["position_ids"], slab.cache)
            actual = static.decode()
            assert actual.shape == expected.shape
            assert (actual - expected).abs().max().item() <= 1e-5, f"step {step}"
        assert decoder.pool.capacity >= 512 and static.lengths == [3 + 8, 8 + 8, 250 + 8]
        # What a CUDA graph captures must never read a tensor's value on the host (.item(), bool(t),
        # data-dependent shapes): that would sync during capture, and replays would keep the value seen then.
        with HostReads() as reads:
            decoder.decode(4, 512)
        assert reads.ops and not reads.ops & HostReads.SYNCING, reads.ops & HostReads.SYNCING


def test_engine_on_static_pool_equals_the_slab_engine(engines):
    slab, static = engines
    assert slab._graph_decoder is None and static._graph_decoder is not None
    assert not static._graph_decoder.use_graphs  # CPU: the captured function, run eagerly
    image = random_image(2)
    text = static.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "hi"}]}])
    # Every sampled row filters (top-k/top-p): sampling.py draws a row without filters differently when a
    # filtering row shares its batch, and the two engines' batches need not be composed alike (timing).
    requests = [
        # n > 1, seeded sampling with filters; stop ids and lengths make rows finish at different steps.
        GenerateRequest(text="the quick brown fox", sampling=SamplingParams(
            max_new_tokens=30, temperature=1.0, top_p=0.9, top_k=40, n=3, seed=7, stop_token_ids=(100, 101, 102)),
            return_logprob=True),
        GenerateRequest(input_ids=list(range(20, 61)), sampling=SamplingParams(max_new_tokens=12, temperature=0.0,
                                                                               ignore_eos=True, n=2)),
        GenerateRequest(text="1+2=3 and x", sampling=SamplingParams(max_new_tokens=40, temperature=0.8, top_k=100,
                                                                     n=4, seed=3)),
        GenerateRequest(text=text, images=[image], sampling=SamplingParams(max_new_tokens=9, temperature=0.0,
                                                                           ignore_eos=True)),  # M-RoPE positions
    ]
    assert_same_samples(slab.generate(requests), static.generate(requests))


def test_requests_admitted_mid_decode_match(engines, monkeypatch):
    slab, static = engines
    long = GenerateRequest(text="what is the answer? " * 3, sampling=SamplingParams(
        max_new_tokens=400, temperature=1.0, seed=11, ignore_eos=True))
    late = [GenerateRequest(input_ids=list(range(30, 30 + k)), sampling=SamplingParams(
        max_new_tokens=5 + k, temperature=1.0, n=2, seed=k)) for k in (4, 17)]
    outputs = []
    for engine in (slab, static):
        running_at_prefill: list[int] = []
        prefill = engine._prefill

        def spy(pending, engine=engine, prefill=prefill, seen=running_at_prefill):
            seen.append(len(engine._rows))
            return prefill(pending)

        monkeypatch.setattr(engine, "_prefill", spy)
        first = engine.submit(long)
        deadline = time.monotonic() + 30
        while not engine._rows and time.monotonic() < deadline:  # until the long request decodes
            time.sleep(0.005)
        futures = [first] + [engine.submit(r) for r in late]
        outputs.append([f.result(timeout=60) for f in futures])
        monkeypatch.undo()
        assert running_at_prefill[0] == 0 and max(running_at_prefill[1:]) > 0, "the late requests joined mid-decode"
    assert_same_samples(*outputs)


def test_weight_update_between_requests(engines):
    slab, static = engines
    decoder = static._graph_decoder
    request = GenerateRequest(text="the quick brown fox", sampling=SamplingParams(max_new_tokens=10, temperature=1.0,
                                                                                  seed=5, n=2), return_logprob=True)
    before = static.generate([request])
    name = "model.language_model.layers.1.mlp.down_proj.weight"
    original = dict(static.model.named_parameters())[name].detach().clone()
    new = torch.randn_like(original, generator=torch.Generator().manual_seed(1))
    try:
        for engine in (slab, static):
            engine.update_weights_from_tensors([(name, new)])
        assert not decoder.sync_weights(), "copy_ updates keep every address: captured graphs stay valid"
        after_slab, after_static = slab.generate([request]), static.generate([request])
        assert_same_samples(after_slab, after_static)
        assert after_static[0][0].output_logprobs != before[0][0].output_logprobs
    finally:
        for engine in (slab, static):
            engine.update_weights_from_tensors([(name, original)])
    assert_same_samples(before, static.generate([request]))
    # A parameter replaced (not updated in place) moves: the decoder notices and drops its graphs.
    param = dict(static.model.named_parameters())[name]
    param.data = param.data.clone()
    assert decoder.sync_weights() and not decoder.sync_weights()


def test_internvl_static_pool_matches_the_slab(tmp_path_factory: pytest.TempPathFactory):
    path = tiny_model_dir(tmp_path_factory.getbasetemp(), "internvl", 0)  # 1-D rotary positions
    requests = [GenerateRequest(input_ids=list(range(10, 10 + k)), sampling=SamplingParams(
        max_new_tokens=8 + k, temperature=1.0, n=2, seed=k)) for k in (3, 14)]
    outputs = []
    for mode in ("off", "on"):
        engine = EmbeddedEngine(path, max_batch_size=8, decode_graphs=mode)
        try:
            assert (engine._graph_decoder is not None) == (mode == "on")
            outputs.append(engine.generate(requests))
        finally:
            engine.shutdown()
    assert_same_samples(*outputs)


def test_decode_graphs_argument(model_dir: Path, monkeypatch, caplog):
    with pytest.raises(ValueError, match=r"decode_graphs='yes' is not one of \['auto', 'on', 'off'\]"):
        EmbeddedEngine(model_dir, decode_graphs="yes")
    auto = EmbeddedEngine(model_dir, max_batch_size=4)  # auto: the static pool is for CUDA only
    auto.shutdown()
    assert auto._graph_decoder is None and auto.model_info()["decode_graphs"] is False
    # A static step that disagrees with the HF forward is refused at start: one warning, slab decoding.
    step = graph_decode.StaticDecodeStep.__call__

    def broken(self, pool, rows, columns):
        step(self, pool, rows, columns)
        pool.logits.add_(1.0)

    monkeypatch.setattr(graph_decode.StaticDecodeStep, "__call__", broken)
    with caplog.at_level(logging.WARNING, logger="rollout.engines.decode_step"):
        refused = EmbeddedEngine(model_dir, max_batch_size=4, decode_graphs="on")
    try:
        assert refused._graph_decoder is None
        assert [r.getMessage() for r in caplog.records if "static-pool" in r.getMessage()] == [
            "lean static-pool decode step differs from the HF forward by 1; using the slab"]
        sample = refused.generate([GenerateRequest(input_ids=[5, 6, 7], sampling=SamplingParams(max_new_tokens=3))])
        assert len(sample[0][0].output_ids) == 3
    finally:
        refused.shutdown()


def test_server_flag_and_config_pass_through(monkeypatch, tmp_path):
    from calibrl_mcore.config import RolloutConfig
    from rollout import launcher
    from rollout.server import parse_args

    assert parse_args(["--model", "m"]).decode_graphs == "auto"
    assert parse_args(["--model", "m", "--decode-graphs", "off"]).decode_graphs == "off"
    monkeypatch.setattr(launcher.EmbeddedServerProcess, "start", lambda self: self)
    server = launcher.start_rollout_server(RolloutConfig(decode_graphs="on"), "m", tmp_path)
    assert server.command()[-2:] == ["--decode-graphs", "on"]
    from calibrl_mcore.config import ConfigError, load_config

    # YAML reads on/off as booleans: the config maps them back (overrides and files alike)
    assert load_config(None, ["rollout.decode_graphs=on"]).rollout.decode_graphs == "on"
    assert load_config(None, ["rollout.decode_graphs=off"]).rollout.decode_graphs == "off"
    (tmp_path / "c.yaml").write_text("rollout:\n  decode_graphs: off\n")
    assert load_config(tmp_path / "c.yaml").rollout.decode_graphs == "off"
    with pytest.raises(ConfigError, match="rollout.decode_graphs='slow' is not one of"):
        load_config(None, ["rollout.decode_graphs=slow"])
