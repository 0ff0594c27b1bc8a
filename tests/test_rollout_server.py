"""The rollout server as a real subprocess (`python -m rollout.server`) on a free loopback port."""

from __future__ import annotations

import base64
import io
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import psutil
import pytest
import torch

from rollout.client import RolloutClient, RolloutRequestError
from rollout.launcher import free_port
from tests.test_rollout_engine import random_image, teacher_forced_logprobs, tiny_model_dir

REPO = Path(__file__).resolve().parents[1]
API_KEY = "test-key"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
LOAD_CLIENTS, LOAD_SECONDS = 16, 10.0
RSS_GROWTH_LIMIT_MB = 150  # after warm-up; a leak of ~1 KB per request would show at this load


def png_b64(seed: int) -> str:
    buffer = io.BytesIO()
    random_image(seed).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    base = tmp_path_factory.getbasetemp()
    return tiny_model_dir(base, "qwen2_5_vl", 0), tiny_model_dir(base, "qwen2_5_vl", 1)


@pytest.fixture(scope="module")
def server(models):
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "rollout.server", "--model", str(models[0]), "--port", str(port),
         "--api-key", API_KEY, "--max-batch-size", "128"],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"server exited with {proc.returncode}:\n{proc.stdout.read()}")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.3)
    else:
        proc.kill()
        pytest.fail("server did not become healthy in 120 s")
    yield url, proc
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server[0], headers=AUTH, timeout=120) as client:
        yield client


@pytest.fixture(scope="module")
def hf_model(models):
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText.from_pretrained(models[0]).eval()


def test_health_model_info_and_models(http):
    assert http.get("/health").json() == {"status": "ok"}
    info = http.get("/get_model_info").json()
    assert isinstance(info["weight_version"], str) and info["model_path"] and info["engine"] == "embedded"
    assert http.get("/v1/models").json()["data"][0]["id"] == info["model_path"]
    assert http.post("/flush_cache").json()["success"] is True


def test_generate_n_samples_stop_and_max_new_tokens(http):
    body = {"text": "the quick brown fox", "return_logprob": True,
            "sampling_params": {"max_new_tokens": 12, "n": 4, "temperature": 1.0, "sampling_seed": 3}}
    items = http.post("/generate", json=body).json()
    assert len(items) == 4 and len({tuple(i["output_ids"]) for i in items}) > 1
    for item in items:
        meta = item["meta_info"]
        assert len(item["output_ids"]) <= 12 and meta["completion_tokens"] == len(item["output_ids"])
        assert [t[1] for t in meta["output_token_logprobs"]] == item["output_ids"]
        assert meta["finish_reason"]["type"] in {"stop", "length"} and "weight_version" in meta
    # Greedy is deterministic; a stop string taken from its text cuts text and ids there.
    greedy = {"max_new_tokens": 20, "temperature": 0, "ignore_eos": True}
    base = http.post("/generate", json={"text": "1+2=3", "sampling_params": greedy}).json()
    stop = base["text"][8:11]
    cut = http.post("/generate", json={"text": "1+2=3", "sampling_params": {**greedy, "stop": [stop]}}).json()
    assert cut["text"] == base["text"][: base["text"].index(stop)]
    assert cut["meta_info"]["finish_reason"] == {"type": "stop", "matched": stop}
    assert cut["output_ids"] == base["output_ids"][: len(cut["output_ids"])]
    # Batch of token-id prompts: prompt-major list.
    batch = http.post("/generate", json={"input_ids": [[5, 6, 7], [8, 9]],
                                         "sampling_params": {"max_new_tokens": 3, "n": 2}}).json()
    assert [b["meta_info"]["prompt_tokens"] for b in batch] == [3, 3, 2, 2]


def test_generate_with_image_and_logprobs_equal_teacher_forcing(http, hf_model):
    from transformers import AutoProcessor

    text = ("<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Describe.<|im_end|>\n"
            "<|im_start|>assistant\n")
    image_b64 = png_b64(5)
    item = http.post("/generate", json={"text": text, "image_data": image_b64, "return_logprob": True,
                                        "sampling_params": {"max_new_tokens": 16, "temperature": 1.0, "sampling_seed": 7}}).json()
    processor_dir = hf_model.name_or_path
    try:
        processor = AutoProcessor.from_pretrained(processor_dir)
    except ImportError:  # no torchvision: same fallback as the engine
        from rollout.engines.prompts import load_processor

        processor = load_processor(processor_dir)
    inputs = processor(text=[text], images=[random_image(5)], return_tensors="pt")
    prompt_ids = inputs.pop("input_ids")[0].tolist()
    inputs.pop("attention_mask")
    assert item["meta_info"]["prompt_tokens"] == len(prompt_ids)
    output_ids = item["output_ids"]
    mm = {k: v for k, v in inputs.items()}
    if "mm_token_type_ids" in mm:  # extend the modality mask over the generated (text) tokens
        mm["mm_token_type_ids"] = torch.cat([mm["mm_token_type_ids"], torch.zeros(1, len(output_ids), dtype=torch.int64)
                                             .to(mm["mm_token_type_ids"].dtype)], dim=1)
    forced = teacher_forced_logprobs(hf_model, prompt_ids, output_ids, **mm)
    served = torch.tensor([t[0] for t in item["meta_info"]["output_token_logprobs"]])
    error = (served - forced).abs().max().item()
    print(f"max |server logprob - teacher-forced logprob| = {error:.3e}")
    assert error <= 1e-5


def test_openai_client_chat_text_and_image(server):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=server[0] + "/v1", api_key=API_KEY)
    model = client.models.list().data[0].id
    reply = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hello"}],
                                           max_tokens=8, n=2, temperature=0.8, seed=1, logprobs=True)
    assert len(reply.choices) == 2 and reply.usage.completion_tokens <= 16
    assert reply.choices[0].finish_reason in {"stop", "length"}
    assert len(reply.choices[0].logprobs.content) >= 1
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64," + png_b64(2)}}
    reply = client.chat.completions.create(
        model=model, max_completion_tokens=6, temperature=0, stop=["\n\n"],
        messages=[{"role": "user", "content": [image, {"type": "text", "text": "What is it?"}]}])
    assert isinstance(reply.choices[0].message.content, str)
    assert reply.usage.prompt_tokens > 10  # the image tokens are part of the prompt


@pytest.mark.parametrize(
    ("route", "body", "field", "status"),
    [
        ("/generate", b'{"text": "hi"', "body", 400),
        ("/generate", {"text": "hi", "sampling_params": {"max_new_tokens": -1}}, "sampling_params.max_new_tokens", 400),
        ("/generate", {"text": "hi", "sampling_params": {"max_tokens": 4}}, "sampling_params.max_tokens", 400),
        ("/generate", {"text": "hi", "sampling_params": {"temperature": -1}}, "sampling_params.temperature", 400),
        ("/generate", {"input_ids": list(range(5)) * 2000}, "input_ids", 400),
        ("/generate", {"text": "x <|image_pad|>", "image_data": "bm90IGFuIGltYWdl"}, "image_data", 400),
        ("/generate", {"text": "x <|image_pad|>", "image_data": "https://example.com/a.png"}, "image_data", 400),
        ("/generate", {"text": "x <|image_pad|>", "image_data": "/etc/passwd"}, "image_data", 400),
        ("/v1/chat/completions", {"messages": []}, "messages", 400),
        ("/update_weights_from_disk", {"model_path": "/no/such/dir"}, "model_path", 400),
        ("/update_weights_from_tensor", {"serialized_named_tensors": ["!!"]}, "serialized_named_tensors", 400),
    ],
)
def test_bad_input_is_a_4xx_naming_the_field(http, route, body, field, status):
    if isinstance(body, bytes):
        response = http.post(route, content=body, headers={"Content-Type": "application/json"})
    else:
        response = http.post(route, json=body)
    assert response.status_code == status, response.text
    assert response.json()["error"]["field"] == field, response.text
    assert http.post("/generate", json={"text": "still alive", "sampling_params": {"max_new_tokens": 2}}).status_code == 200


def test_api_key_is_required(server):
    url = server[0]
    assert httpx.post(url + "/generate", json={"text": "hi"}).status_code == 401
    wrong = httpx.post(url + "/update_weights_from_disk", json={"model_path": "x"},
                       headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401 and wrong.json()["error"]["field"] == "Authorization"
    assert httpx.get(url + "/health").status_code == 200  # health stays open for probes


def test_update_weights_from_disk_and_tensor_change_outputs(http, models, hf_model):
    from safetensors.torch import save

    body = {"input_ids": [3, 4, 5, 6], "return_logprob": True,
            "sampling_params": {"max_new_tokens": 6, "temperature": 0, "ignore_eos": True}}
    before = http.post("/generate", json=body).json()
    reply = http.post("/update_weights_from_disk", json={"model_path": str(models[1]), "weight_version": "5"}).json()
    assert reply["success"] and reply["weight_version"] == "5" != before["meta_info"]["weight_version"]
    after = http.post("/generate", json=body).json()
    assert after["meta_info"]["weight_version"] == reply["weight_version"]
    assert after["meta_info"]["output_token_logprobs"] != before["meta_info"]["output_token_logprobs"]
    # Back to the first model through the tensor route (raw safetensors body), with an explicit version.
    payload = save({k: v.contiguous() for k, v in hf_model.state_dict().items()})
    reply = http.post("/update_weights_from_tensor", content=payload, params={"weight_version": 100},
                      headers={"Content-Type": "application/octet-stream"}).json()
    assert reply["success"] and reply["weight_version"] == "100"
    restored = http.post("/generate", json=body).json()
    assert restored["output_ids"] == before["output_ids"] and restored["meta_info"]["weight_version"] == "100"
    assert http.get("/get_model_info").json()["weight_version"] == "100"
    bad = http.post("/update_weights_from_tensor", content=save({"lm_head.weight": torch.zeros(2, 2)}),
                    headers={"Content-Type": "application/octet-stream"})
    assert bad.status_code == 400 and "lm_head.weight" in bad.json()["error"]["message"]


def test_client_round_robin_retries_and_samples(server):
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens here: connection refused, then retried
    with RolloutClient([dead, server[0]], api_key=API_KEY, max_retries=3, backoff=0.01, batch_size=2) as client:
        prompts = [{"text": "the quick"}, {"input_ids": [7, 8, 9]}, {"input_ids": [1, 2]},
                   {"text": "x <|vision_start|><|image_pad|><|vision_end|>", "image_data": [random_image(4)]}]
        samples = client.generate(prompts, {"max_new_tokens": 5, "n": 3, "temperature": 1.0})
        assert [(s.prompt_index, s.sample_index) for s in samples] == [(p, k) for p in range(4) for k in range(3)]
        assert all(len(s.logprobs) == len(s.output_ids) <= 5 for s in samples)
        assert samples[3].prompt_tokens == 3 and samples[6].prompt_tokens == 2
        assert client.health() == {dead: False, server[0]: True}
        with pytest.raises(RolloutRequestError) as err:
            client.generate([{"text": "hi"}], {"max_new_tokens": -5})
        assert err.value.status == 400


def test_bounded_load_no_5xx_and_bounded_rss(server):
    url, proc = server
    rss = lambda: psutil.Process(proc.pid).memory_info().rss / 2**20  # noqa: E731
    statuses: dict[int, int] = {}
    latencies: list[float] = []
    lock = threading.Lock()

    def client_loop(i: int, until: float) -> None:
        with httpx.Client(base_url=url, headers=AUTH, timeout=60) as c:
            k = 0
            while time.time() < until:
                body = {"input_ids": [(i * 7 + k) % 500 + 1] * (4 + (i + k) % 24),
                        "sampling_params": {"max_new_tokens": 8 + (k % 3) * 8, "n": 1 + k % 4}, "return_logprob": True}
                start = time.perf_counter()
                code = c.post("/generate", json=body).status_code
                with lock:
                    statuses[code] = statuses.get(code, 0) + 1
                    latencies.append(time.perf_counter() - start)
                k += 1

    def run(seconds: float) -> None:
        until = time.time() + seconds
        threads = [threading.Thread(target=client_loop, args=(i, until)) for i in range(LOAD_CLIENTS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(seconds + 120)

    run(2.0)  # warm-up: allocator pools, thread pools
    statuses.clear()
    latencies.clear()
    rss_before = rss()
    run(LOAD_SECONDS)
    growth = rss() - rss_before
    latencies.sort()
    print(f"load: {sum(statuses.values())} requests, statuses {statuses}, p50 {latencies[len(latencies) // 2]:.3f}s "
          f"p99 {latencies[int(len(latencies) * 0.99)]:.3f}s, RSS growth {growth:.1f} MB")
    assert set(statuses) == {200}, statuses
    assert growth < RSS_GROWTH_LIMIT_MB
    assert httpx.get(url + "/health").status_code == 200
