"""The rollout contract against SGLang's own code (the version the Dockerfile pins, 0.5.4.post3).

SGLang is installed for the tests only (tests/contract/sglang_env.py) and runs in its own process,
tests/contract/sglang_front.py: SGLang's request dataclasses on every route, its normalisation and
`SamplingParams.verify`, its weight-group join (`init_custom_process_group`) and receive, in front of
our embedded engine for the tokens. Checked here:
1. what the client, the trainer's rollout stage (train and eval requests) and the disk / distributed
   weight syncs send is accepted on the first try, and SGLang-shaped answers parse;
2. one corpus of requests gets the same verdict (accepted or refused) from SGLang and the embedded server;
3. SGLang's own `init_custom_process_group` joins the trainer's weight-update group and receives a TP=2
   and a PP=2 trainer's weights bit for bit.
"""

from __future__ import annotations

import base64
import io
from pathlib import Path

import httpx
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from rollout.client import RolloutClient, RolloutRequestError
from rollout.launcher import EmbeddedServerProcess
from tests.contract.launch import front
from tests.contract.sglang_env import ensure_installed
from tests.torchrun_utils import REPO, run_torchrun

pytestmark = pytest.mark.distributed


def _png(seed: int) -> str:
    g = torch.Generator().manual_seed(seed)
    pixels = (torch.rand(24, 24, 3, generator=g) * 255).to(torch.uint8).numpy()
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


@pytest.fixture(scope="module")
def tiny(tiny_checkpoints):
    return tiny_checkpoints["qwen2_5_vl"]


@pytest.fixture(scope="module")
def sglang(tiny, tmp_path_factory):
    """SGLang's front (tests/contract/sglang_front.py) on a free loopback port."""
    ensure_installed()
    with front("tests.contract.sglang_front", tiny, tmp_path_factory.mktemp("sglang") / "front.log") as url:
        yield url


@pytest.fixture(scope="module")
def embedded(tiny):
    with EmbeddedServerProcess(tiny) as server:
        yield server.url


def _statuses(url: str) -> list[dict]:
    return httpx.get(url + "/contract/requests").json()


def test_client_trainer_and_eval_requests_pass_sglang_on_first_try(sglang, tiny, tmp_path):
    from calibrl_mcore.config import load_config
    from calibrl_mcore.data.dataset import PromptDataset
    from calibrl_mcore.data.synth import main as synth_main
    from calibrl_mcore.trainer.rollout_stage import RolloutStage

    seen = len(_statuses(sglang))
    client = RolloutClient([sglang], batch_size=2, max_retries=0)
    try:
        # Mixed chunk: the first prompt has no image (SGLang reads image_data's nesting from entry 0).
        prompts = [{"text": "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"},
                   {"text": "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>what?<|im_end|>\n"
                            "<|im_start|>assistant\n", "image_data": [_png(1)]},
                   {"input_ids": [5, 6, 7]}]
        params = {"max_new_tokens": 6, "temperature": 1.0, "top_p": 1.0, "top_k": -1, "n": 3}
        first = client.generate(prompts, params, seed=11)
        again = client.generate(prompts, params, seed=11)
        assert [(s.prompt_index, s.sample_index) for s in first] == [(p, j) for p in range(3) for j in range(3)]
        assert [s.output_ids for s in first] == [s.output_ids for s in again]  # reproducible
        assert len({tuple(s.output_ids) for s in first[:3]}) > 1  # yet the n samples differ
        assert all(len(s.logprobs) == len(s.output_ids) and s.weight_version is None for s in first)  # "default"
        # The trainer's and eval's requests, through the real rollout stage.
        assert synth_main(["--out", str(tmp_path / "d"), "--n", "4", "--heldout", "2"]) == 0
        cfg = load_config(REPO / "configs" / "tiny_cpu.yaml", ["rollout.n_samples=2", "rollout.max_new_tokens=6"])
        examples = [PromptDataset.from_path(tmp_path / "d" / "train.jsonl")[i] for i in range(2)]
        stage = RolloutStage(cfg.rollout, cfg.algo, str(tiny), client)
        rows, _ = stage.collect(step=3, examples=examples, first_group_id=0)
        assert sum(not r.is_expert for r in rows) == 4
        assert stage.evaluate(examples)["eval/n"] == 2.0
        # Disk sync: the version travels as SGLang's string and comes back with every sample.
        assert client.update_weights_from_disk(str(tiny), weight_version=3)[0]["success"]
        assert client.generate(prompts[:1], {"max_new_tokens": 2})[0].weight_version == 3
    finally:
        client.close()
    bad = [r for r in _statuses(sglang)[seen:] if r["status"] != 200]
    assert not bad, bad
    # The shapes the client used to send, refused by SGLang (so the client must never send them again).
    old = {"text": ["a"], "sampling_params": {"max_new_tokens": 2, "seed": 1}}
    assert httpx.post(sglang + "/generate", json=old).status_code == 500  # SamplingParams(**sp): TypeError
    assert httpx.post(sglang + "/update_weights_from_disk", json={"model_path": str(tiny),
                                                                   "weight_version": 3}).status_code == 400


def _corpus(tiny: Path) -> list[tuple[str, str, dict]]:
    """(name, route, body): what our client sends, and its near misses."""
    img, text = _png(2), "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>x<|im_end|>\n"
    sp = {"max_new_tokens": 2}
    gen = [
        ("single text", {"text": "hi", "sampling_params": sp}),
        ("batch ids, logprobs", {"input_ids": [[5, 6], [7]], "sampling_params": sp, "return_logprob": True}),
        ("n>1 single", {"text": "hi", "sampling_params": {**sp, "n": 2}}),
        ("seeded list", {"text": ["a", "b"], "sampling_params": [{**sp, "sampling_seed": 1}, {**sp, "sampling_seed": 2}]}),
        ("images list of lists", {"text": ["hi", text], "image_data": [[], [img]], "sampling_params": sp}),
        ("one image per prompt", {"text": [text, "hi"], "image_data": [img, None], "sampling_params": sp}),
        ("greedy top_k 0", {"text": "hi", "sampling_params": {**sp, "temperature": 0.0, "top_k": 0}}),
        ("return_logprob list", {"text": ["a", "b"], "return_logprob": [True, False], "sampling_params": sp}),
        ("stop strings", {"text": "hi", "sampling_params": {**sp, "stop": ["\n"], "stop_token_ids": [3]}}),
        ("rid", {"text": ["a"], "rid": ["r1"], "sampling_params": sp}),
        # refused by both
        ("seed", {"text": "hi", "sampling_params": {**sp, "seed": 3}}),
        ("top_k 0 sampled", {"text": "hi", "sampling_params": {**sp, "top_k": 0}}),
        ("top_p 0", {"text": "hi", "sampling_params": {**sp, "top_p": 0.0}}),
        ("sampling_seed null", {"text": "hi", "sampling_params": {**sp, "sampling_seed": None}}),
        ("sampling_seed > int32", {"text": "hi", "sampling_params": {**sp, "sampling_seed": 2**31}}),
        ("mixed image nesting", {"text": ["hi", text], "image_data": [None, [img]], "sampling_params": sp}),
        ("image_data length", {"text": ["a", "b"], "image_data": [[img]], "sampling_params": sp}),
        ("empty input_ids", {"input_ids": [], "sampling_params": sp}),
        ("n differs", {"text": ["a", "b"], "sampling_params": [{**sp, "n": 2}, {**sp, "n": 1}]}),
        ("list logprob with n", {"text": ["a"], "return_logprob": [True], "sampling_params": {**sp, "n": 2}}),
        ("no prompt", {"sampling_params": sp}),
    ]
    disk = [
        ("disk, string version", {"model_path": str(tiny), "weight_version": "4"}),
        ("disk, SGLang flags", {"model_path": str(tiny), "is_async": False, "torch_empty_cache": True,
                                "abort_all_requests": True, "keep_pause": False, "token_step": 2}),
        ("disk, int version", {"model_path": str(tiny), "weight_version": 4}),
        ("disk, no path", {"weight_version": "4"}),
        ("disk, missing dir", {"model_path": "/no/such/dir"}),
    ]
    other = [
        ("/update_weights_from_distributed", "distributed, int version",
         {"names": ["lm_head.weight"], "dtypes": ["float32"], "shapes": [[2, 2]], "weight_version": 1}),
        ("/update_weights_from_distributed", "distributed, unknown group",
         {"names": ["lm_head.weight"], "dtypes": ["float32"], "shapes": [[2, 2]], "group_name": "nope"}),
        ("/destroy_weights_update_group", "destroy unknown group", {"group_name": "nope"}),
        ("/init_weights_update_group", "init, no port", {"master_address": "127.0.0.1", "rank_offset": 1,
                                                          "world_size": 2}),
    ]
    return ([(name, "/generate", body) for name, body in gen] + [(n, "/update_weights_from_disk", b) for n, b in disk]
            + [(name, route, body) for route, name, body in other])


def test_one_corpus_same_verdicts_from_sglang_and_embedded(sglang, embedded, tiny):
    verdicts = []
    for name, route, body in _corpus(Path(tiny)):
        got = {}
        for server, url in (("sglang", sglang), ("embedded", embedded)):
            response = httpx.post(url + route, json=body, timeout=120)
            got[server] = response.status_code < 400
            if server == "embedded" and not got[server]:  # our refusals name the field and say why
                assert response.json()["error"]["message"], response.text
        verdicts.append((name, got["sglang"], got["embedded"]))
    print("\n" + "\n".join(f"  {'accept' if s else 'refuse':6s} {'==' if s == e else '!='} {name}"
                           for name, s, e in verdicts))
    assert [v for v in verdicts if v[1] != v[2]] == []
    assert sum(v[1] for v in verdicts) >= 12  # both kinds are in the corpus


def test_refusals_name_route_field_and_message(embedded, sglang):
    for url in (embedded, sglang):
        with RolloutClient([url], max_retries=0) as client:
            with pytest.raises(RolloutRequestError) as info:
                client.update_weights_from_disk("/no/such/dir")
            assert "/update_weights_from_disk" in str(info.value) and "/no/such/dir" in str(info.value)
    with RolloutClient([embedded], max_retries=0) as client, pytest.raises(RolloutRequestError) as info:
        client.generate([{"text": "hi"}], {"max_new_tokens": 2, "top_k": 0})
    assert str(info.value).endswith("/generate: HTTP 400: field 'sampling_params.top_k': must be -1 (disable) "
                                    "or at least 1, got 0")


@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2)])
def test_sglang_joins_the_weight_group_and_receives_bit_exact(sglang, tiny, tmp_path, tp, pp):
    """SGLang's own init_custom_process_group (gloo) joins the group each stage's pusher hosts; the tensors
    it receives through model_runner's broadcast receive equal what the trainer sent, bit for bit."""
    results = run_torchrun("weight_sync_worker.py", tp * pp, tmp_path, "--model", str(tiny), "--tp", str(tp),
                           "--pp", str(pp), "--method", "distributed", "--url", sglang, "--dump", timeout=400)
    received_path = tmp_path / "received.safetensors"
    names = httpx.post(sglang + "/contract/received", json={"path": str(received_path)}).json()["names"]
    received = load_file(str(received_path))
    sent: dict[str, torch.Tensor] = {}
    for path in sorted(tmp_path.glob("sent_rank*.safetensors")):
        sent.update(load_file(str(path)))
    assert len(list(tmp_path.glob("sent_rank*.safetensors"))) == pp and sorted(sent) == names
    mismatched = [n for n in names if not torch.equal(received[n], sent[n]) or received[n].dtype != sent[n].dtype]
    print(f"\n[sglang group, tp={tp} pp={pp}] {len(names)} tensors received bit-exact: {not mismatched}")
    assert not mismatched
    for r in (r for r in results if r["last_stage"]):  # and the served weights are the trainer's
        assert r["versions"] == [7, 7, 7] and r["max_abs_diff"] <= 1e-4, r


def test_pins_agree_and_payload_shapes():
    """One SGLang version (Dockerfile, gpu extra, contract install) and one vLLM version; the client's
    request shapes that SGLang needs: list-of-lists image_data, per-sample 31-bit seeds, string versions."""
    import tomllib

    from rollout.client import generate_payload, sample_seed
    from rollout.engines.vllm import VLLM_VERSION
    from tests.contract.sglang_env import SGLANG_VERSION

    assert f"ARG SGLANG_VERSION={SGLANG_VERSION}\n" in (REPO / "Dockerfile").read_text()
    extra = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]["gpu"]
    assert f"sglang=={SGLANG_VERSION}" in extra and f"vllm=={VLLM_VERSION}" in extra
    payload = generate_payload(4, [{"text": "a"}, {"text": "b", "image_data": [b"png"]}], {"n": 2}, True, seed=9)
    assert payload["text"] == ["a", "a", "b", "b"] and payload["image_data"] == [[], [], ["cG5n"], ["cG5n"]]
    seeds = [p["sampling_seed"] for p in payload["sampling_params"]]
    assert seeds == [sample_seed(9, p, j) for p in (4, 5) for j in (0, 1)] and len(set(seeds)) == 4
    assert all(0 <= s < 2**31 and p["n"] == 1 for s, p in zip(seeds, payload["sampling_params"]))
    unseeded = generate_payload(0, [{"input_ids": [1]}], {"n": 3}, False, seed=None)
    assert unseeded == {"input_ids": [[1]], "sampling_params": {"n": 3}, "return_logprob": False}


def test_server_gpus():
    from calibrl_mcore.config import RolloutConfig
    from calibrl_mcore.trainer.weight_sync import sync_method
    from rollout.launcher import server_base_gpu

    sglang = RolloutConfig(engine="sglang", server_tp_size=2)
    assert server_base_gpu(sglang, "distributed", trainer_gpus=4, device_count=8) == 4  # after the trainer's
    assert server_base_gpu(RolloutConfig(), "tensor", 8, 8) is None  # embedded on the CPU
    with pytest.raises(ValueError, match="share a GPU with a trainer rank"):
        server_base_gpu(sglang, "distributed", trainer_gpus=8, device_count=8)
    with pytest.raises(ValueError, match="share a GPU"):
        server_base_gpu(RolloutConfig(engine="sglang", server_base_gpu=0), "distributed", 1, 8)
    assert server_base_gpu(sglang, "disk", trainer_gpus=8, device_count=8) == 8  # allowed, with a warning
    assert sync_method("auto", "sglang") == "disk"  # vLLM's methods: tests/test_vllm_contract.py
