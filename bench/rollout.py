"""Rollout benchmark: embedded engine vs transformers `generate`, plus a loopback HTTP load test.

    python bench/rollout.py [--quick] [--model HF_DIR] [--device cpu] [--out bench/results/rollout.json]

1. Throughput (generated tokens/s) on the same tiny model, same prompts (mixed lengths), same n and
   max_new_tokens, greedy and sampled. Both sides stop a sample at the same token ids (the model's eos
   plus a few "stop" ids that make sample lengths vary like RL responses do), so both generate exactly
   the same kind of work. The baseline is HF `generate` on the whole prompt set at once (left padding,
   `num_return_sequences=n`): its strongest single-call configuration.
2. Latency: N client threads send `/generate` requests to `python -m rollout.server` on a free
   127.0.0.1 port for T seconds (bounded by count and time); p50/p99 per request, errors counted.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from rollout.engines.base import GenerateRequest, SamplingParams  # noqa: E402
from rollout.engines.embedded import EmbeddedEngine  # noqa: E402

N_STOP_IDS = 3  # extra stop ids: each step ends a sample with p ~ 3/vocab, so lengths vary


def make_prompts(vocab: int, count: int, min_len: int, max_len: int, seed: int) -> list[list[int]]:
    """Random ordinary-token prompts with lengths spread evenly over [min_len, max_len]."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.linspace(min_len, max_len, count).long().tolist()
    return [torch.randint(10, vocab - 64, (n,), generator=gen).tolist() for n in lengths]


class Clock:
    """Wall time and this process's CPU time (all threads). On a shared machine other jobs inflate wall
    time; with one intra-op thread each side computes on one core, so CPU time is the fairer measure."""

    def __enter__(self) -> Clock:
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall, self.cpu = time.perf_counter() - self.wall, time.process_time() - self.cpu


def run_engine(engine: EmbeddedEngine, prompts: list[list[int]], params: SamplingParams) -> tuple[Clock, int]:
    with Clock() as clock:
        results = engine.generate([GenerateRequest(input_ids=p, sampling=params) for p in prompts])
    return clock, sum(len(s.output_ids) for samples in results for s in samples)


def run_hf(model: Any, pad_id: int, prompts: list[list[int]], params: SamplingParams,
           stop_ids: list[int], device: torch.device) -> tuple[Clock, int]:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, prompt in enumerate(prompts):  # left padding, as generation requires
        ids[row, width - len(prompt):] = torch.tensor(prompt)
        mask[row, width - len(prompt):] = 1
    sampled = params.temperature > 0
    kwargs = dict(do_sample=sampled, num_return_sequences=params.n, max_new_tokens=params.max_new_tokens,
                  eos_token_id=stop_ids, pad_token_id=pad_id)
    if sampled:
        kwargs.update(temperature=params.temperature, top_p=params.top_p, top_k=0)
    if device.type == "cuda":
        torch.cuda.synchronize()
    with Clock() as clock, torch.inference_mode():
        out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), **kwargs)
        generated = out[:, width:].cpu()  # .cpu() waits for the device  # [P * n, new]
    tokens = 0
    for row in generated.tolist():  # count up to and including the first stop token (the rest is padding)
        ends = [i for i, t in enumerate(row) if t in stop_ids]
        tokens += ends[0] + 1 if ends else len(row)
    return clock, tokens


def stop_ids_of(engine: EmbeddedEngine) -> list[int]:
    """The model's eos ids plus N_STOP_IDS ordinary ids: both sides stop a sample at these."""
    return sorted(engine._eos_ids) + list(range(100, 100 + N_STOP_IDS))


def compare_case(engine: EmbeddedEngine, model: Any, prompts: list[list[int]], params: SamplingParams,
                 stop_ids: list[int], device: str, repeats: int) -> dict[str, Any]:
    """Engine vs HF `generate` on the same prompts and params: best of `repeats` alternating runs."""
    pad_id = engine.tokenizer.pad_token_id or 0
    params = SamplingParams(**{**params.__dict__, "stop_token_ids": tuple(stop_ids), "ignore_eos": False})
    run_engine(engine, prompts[:2], params)  # warm-up both sides
    run_hf(model, pad_id, prompts[:2], params, stop_ids, torch.device(device))
    # Best of `repeats` alternating runs: the 2-core CI machines are shared, so single runs are noisy.
    # On a GPU the host CPU time says nothing about device work: compare wall time there.
    measure = (lambda c: c.wall) if device.startswith("cuda") else (lambda c: c.cpu)
    engine_s = hf_s = engine_wall = hf_wall = float("inf")
    for _ in range(repeats):
        clock, engine_tokens = run_engine(engine, prompts, params)
        engine_s, engine_wall = min(engine_s, measure(clock)), min(engine_wall, clock.wall)
        clock, hf_tokens = run_hf(model, pad_id, prompts, params, stop_ids, torch.device(device))
        hf_s, hf_wall = min(hf_s, measure(clock)), min(hf_wall, clock.wall)
    return {
        "prompts": len(prompts), "n": params.n, "max_new_tokens": params.max_new_tokens, "best_of": repeats,
        "prompt_len_range": [min(map(len, prompts)), max(map(len, prompts))],
        "time_measure": "wall" if device.startswith("cuda") else "process CPU time",
        "engine_tokens_per_s": engine_tokens / engine_s, "engine_tokens": engine_tokens, "engine_s": engine_s,
        "hf_generate_tokens_per_s": hf_tokens / hf_s, "hf_tokens": hf_tokens, "hf_s": hf_s,
        "speedup": (engine_tokens / engine_s) / (hf_tokens / hf_s),
        "engine_wall_s": engine_wall, "hf_wall_s": hf_wall, "speedup_wall": (engine_tokens / engine_wall) / (hf_tokens / hf_wall),
    }


def throughput(model_dir: Path, device: str, quick: bool) -> dict[str, Any]:
    from transformers import AutoModelForImageTextToText

    engine = EmbeddedEngine(model_dir, device=device, max_batch_size=512)
    model = AutoModelForImageTextToText.from_pretrained(model_dir).to(device).eval()
    vocab = len(engine.tokenizer)
    stop_ids = stop_ids_of(engine)
    count, max_new, repeats = (8, 32, 1) if quick else (32, 128, 2)
    prompts = make_prompts(vocab, count, 16, 64 if quick else 384, seed=0)
    cases = {
        "greedy_n1": SamplingParams(max_new_tokens=max_new, temperature=0.0, n=1),
        # RL rollouts sample from the unfiltered policy (temperature 1, top-p 1) so that log-probs match
        # training; the top-p case adds the per-step vocabulary sort that both sides then pay.
        "sampled_n8": SamplingParams(max_new_tokens=max_new, temperature=1.0, n=4 if quick else 8),
        "sampled_n8_top_p095": SamplingParams(max_new_tokens=max_new, temperature=1.0, top_p=0.95,
                                              n=4 if quick else 8),
    }
    results: dict[str, Any] = {}
    for name, params in cases.items():
        results[name] = compare_case(engine, model, prompts, params, stop_ids, device, repeats)
        print(f"{name}: engine {results[name]['engine_tokens_per_s']:.0f} tok/s, HF generate "
              f"{results[name]['hf_generate_tokens_per_s']:.0f} tok/s, speedup {results[name]['speedup']:.2f}x "
              f"(wall-clock {results[name]['speedup_wall']:.2f}x)", flush=True)
    engine.shutdown()
    return results


def verify(model_dir: Path, device: str) -> dict[str, Any]:
    """Correctness on this device: greedy == HF generate, log-probs == a teacher-forced forward (fp32),
    seeded sampling reproducible, and a bf16 engine that runs (finite log-probs)."""
    from transformers import AutoModelForImageTextToText

    engine = EmbeddedEngine(model_dir, device=device)
    model = AutoModelForImageTextToText.from_pretrained(model_dir).to(device).eval()
    prompts = make_prompts(len(engine.tokenizer), 4, 8, 40, seed=1)
    greedy = SamplingParams(max_new_tokens=24, temperature=0.0, ignore_eos=True)
    outs = engine.generate([GenerateRequest(input_ids=p, sampling=greedy, return_logprob=True) for p in prompts])
    match, max_err = True, 0.0
    for prompt, (sample,) in zip(prompts, outs):
        ids = torch.tensor([prompt], device=device)
        with torch.inference_mode():
            ref = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=24,
                                 do_sample=False)[0, len(prompt):].tolist()
            full = torch.tensor([prompt + sample.output_ids], device=device)
            logprobs = torch.log_softmax(model(input_ids=full).logits[0].float(), -1)[len(prompt) - 1 : -1]
        forced = logprobs.gather(1, torch.tensor(sample.output_ids, device=device)[:, None]).squeeze(1).cpu()
        match &= sample.output_ids[: len(ref)] == ref
        max_err = max(max_err, (forced - torch.tensor(sample.output_logprobs)).abs().max().item())
    seeded = SamplingParams(max_new_tokens=16, temperature=1.0, n=4, seed=5)
    runs = [[s.output_ids for s in engine.generate([GenerateRequest(input_ids=prompts[0], sampling=seeded)])[0]]
            for _ in range(2)]
    engine.shutdown()
    bf16 = EmbeddedEngine(model_dir, device=device, dtype=torch.bfloat16)
    bf16_out = bf16.generate([GenerateRequest(input_ids=prompts[1], sampling=SamplingParams(max_new_tokens=16, n=2))])
    bf16.shutdown()
    result = {"greedy_matches_hf_generate": match, "max_abs_logprob_error_fp32": max_err,
              "seeded_sampling_reproducible": runs[0] == runs[1],
              "bf16_runs": all(torch.isfinite(torch.tensor(s.output_logprobs)).all().item() for s in bf16_out[0])}
    print(f"verify on {device}: {result}", flush=True)
    return result


def load_test(model_dir: Path, clients: int, seconds: float) -> dict[str, Any]:
    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "rollout.server", "--model", str(model_dir), "--port", str(port)],
                            cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.3)
        latencies: list[float] = []
        statuses: dict[int, int] = {}
        lock = threading.Lock()
        until = time.time() + seconds

        def client(i: int) -> None:
            with httpx.Client(base_url=url, timeout=120) as http:
                k = 0
                while time.time() < until and k < 100_000:
                    body = {"input_ids": [(i * 13 + k) % 500 + 10] * (8 + (i * 7 + k) % 120),
                            "sampling_params": {"max_new_tokens": 16 + (k % 4) * 16, "n": 1 + (k % 4)},
                            "return_logprob": True}
                    start = time.perf_counter()
                    code = http.post("/generate", json=body).status_code
                    with lock:
                        latencies.append(time.perf_counter() - start)
                        statuses[code] = statuses.get(code, 0) + 1
                    k += 1

        import psutil

        server_process = psutil.Process(proc.pid)
        rss_before = server_process.memory_info().rss / 2**20
        threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(seconds + 300)
        rss_after = server_process.memory_info().rss / 2**20
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    latencies.sort()
    pct = lambda q: latencies[min(len(latencies) - 1, int(q * len(latencies)))]  # noqa: E731
    result = {"clients": clients, "seconds": seconds, "requests": len(latencies), "statuses": statuses,
              "p50_s": pct(0.50), "p99_s": pct(0.99), "requests_per_s": len(latencies) / seconds,
              "server_rss_mb_before": rss_before, "server_rss_mb_after": rss_after}
    print(f"load: {clients} clients x {seconds:.0f} s: {len(latencies)} requests, p50 {result['p50_s']:.3f} s, "
          f"p99 {result['p99_s']:.3f} s, statuses {statuses}", flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes for CI (~1 minute)")
    parser.add_argument("--model", type=Path, default=None, help="HF checkpoint (default: a tiny Qwen2.5-VL)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--skip-load", action="store_true", help="throughput only (e.g. on a GPU box)")
    parser.add_argument("--verify", action="store_true", help="first check greedy/log-probs against HF here")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "rollout.json")
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.model
        if model_dir is None:
            from calibrl_mcore.make_tiny_model import make_tiny_model

            model_dir = make_tiny_model("qwen2_5_vl", Path(tmp) / "tiny", seed=0)
        report: dict[str, Any] = {
            "model": "tiny random Qwen2.5-VL (tools/make_tiny_model.py)" if args.model is None else str(args.model),
            "device": args.device, "quick": args.quick, "torch_threads": torch.get_num_threads(),
            "machine": platform.machine(), "cpu_count": os.cpu_count(),
            # Other jobs on a shared machine skew absolute numbers (ratios are measured back to back).
            "load_average_at_start": os.getloadavg()[0],
        }
        if args.device.startswith("cuda"):
            report["gpu"] = torch.cuda.get_device_name(args.device)
        if args.verify:
            report["verify"] = verify(model_dir, args.device)
        report["throughput"] = throughput(model_dir, args.device, args.quick)
        if not args.skip_load:
            report["load"] = load_test(model_dir, *((8, 5.0) if args.quick else (32, 30.0)))
        report["load_average_at_end"] = os.getloadavg()[0]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
