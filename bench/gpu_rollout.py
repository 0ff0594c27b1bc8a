"""Rollout benchmark on the GPU: embedded engine vs transformers `generate`, same model, prompts and lengths.

    python bench/gpu_rollout.py                          # GPU: Qwen2.5-3B-shaped decoder, bf16, 64 x 512, 256 new
    python bench/gpu_rollout.py --shape 3b --layers 8    # scaled: fewer decoder layers
    python bench/gpu_rollout.py --device cpu             # CPU: tiny shapes (keeps the code path tested)

The checkpoint is a Qwen2.5-VL with the text decoder of `--shape` (bench/gpu_train.py's SHAPES; random
weights, a 1-layer vision tower) and the tiny model's tokenizer/processor (tools/make_tiny_model.py):
prompts are token ids, so the tokenizer only names the stop ids. Both sides run on one copy of the weights
(the engine's model object), sampled (temperature 1, top-p 1, n samples per prompt), stopping at the same
ids (see bench/rollout.py: the eos ids plus a few ordinary ids, rare at vocab 151936, so samples run close to
`--new-tokens`). The measurement is bench/rollout.py's `compare_case`: alternating runs, best of
`--repeats`, wall time on GPU and process CPU time on CPU. Writes bench/results/gpu_rollout_<device>.json
(<device> = the GPU's short name, e.g. h200, or cpu).

The engine runs both decode paths (rollout/engines/graph_decode.py): `engine_*` is the default config
(`decode_graphs="auto"`: the static pool with CUDA graphs on a GPU, the left-padded slab on the CPU), and
`engine_slab_*` / `engine_graphs_*` are each path alone (on the CPU the static pool runs eagerly). Each
engine first decodes the whole prompt set once, untimed, so that a graph engine has captured its (rows,
columns) graphs before the timed runs, as it has after the first rollout step of a training run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from bench.gpu_train import SHAPES  # noqa: E402
from bench.rollout import compare_case, make_prompts, run_engine, stop_ids_of  # noqa: E402
from rollout.engines.base import SamplingParams  # noqa: E402
from rollout.engines.embedded import EmbeddedEngine  # noqa: E402

GPU_DEFAULTS = dict(shape="3b", prompts=64, prompt_len=512, new_tokens=256)
CPU_DEFAULTS = dict(shape="tiny", prompts=8, prompt_len=32, new_tokens=16)


def write_checkpoint(out: Path, shape: dict[str, int], dtype: torch.dtype, device: str) -> Path:
    """A Qwen2.5-VL checkpoint with `shape`'s text decoder and the tiny model's tokenizer and processor."""
    from transformers import AutoConfig, AutoModelForImageTextToText, GenerationConfig

    from calibrl_mcore.make_tiny_model import make_tiny_model

    make_tiny_model("qwen2_5_vl", out, seed=0, num_layers=1)  # tokenizer, processor, special-token ids
    cfg = AutoConfig.from_pretrained(out).to_dict()
    head_dim = shape["hidden_size"] // shape["num_attention_heads"]
    text = cfg["text_config"]
    text.update(shape, max_window_layers=shape["num_hidden_layers"])
    text.pop("layer_types", None)  # derived from the depth again
    text["rope_parameters"]["mrope_section"] = [head_dim // 8, 3 * head_dim // 16, 3 * head_dim // 16]
    cfg["vision_config"]["out_hidden_size"] = shape["hidden_size"]
    cfg = AutoConfig.for_model(**cfg)
    generation = GenerationConfig.from_pretrained(out)
    with torch.device(device):  # initialise on the device: a 3B CPU init takes minutes
        model = AutoModelForImageTextToText.from_config(cfg, dtype=dtype)
    model.generation_config = generation
    for old in out.glob("model*.safetensors*"):  # the tiny weights
        old.unlink()
    model.save_pretrained(out, safe_serialization=True)
    del model
    return out


def device_name(device: str) -> str:
    """'cpu', or the GPU's short model name ('NVIDIA H200' -> 'h200')."""
    if not device.startswith("cuda"):
        return "cpu"
    return torch.cuda.get_device_name(device).split()[-1].lower().replace("-", "_")


def with_stops(params: SamplingParams, stop_ids: list[int]) -> SamplingParams:
    """`params` stopping at `stop_ids`, as compare_case runs them."""
    return SamplingParams(**{**params.__dict__, "stop_token_ids": tuple(stop_ids), "ignore_eos": False})


def engine_rate(engine: EmbeddedEngine, prompts: list[list[int]], params: SamplingParams, stop_ids: list[int],
                device: str, repeats: int) -> dict[str, Any]:
    """The engine half of compare_case for an engine measured alone: best of `repeats` after a warm-up."""
    params = with_stops(params, stop_ids)
    run_engine(engine, prompts, params)  # warm-up: the whole set, so a graph engine has captured its buckets
    measure = (lambda c: c.wall) if device.startswith("cuda") else (lambda c: c.cpu)
    seconds, tokens = float("inf"), 0
    for _ in range(repeats):
        clock, count = run_engine(engine, prompts, params)
        if measure(clock) < seconds:
            seconds, tokens = measure(clock), count
    return {"tokens_per_s": tokens / seconds, "tokens": tokens, "s": seconds}


def graph_stats(engine: EmbeddedEngine) -> dict[str, Any] | None:
    decoder = engine._graph_decoder
    if decoder is None or decoder.pool is None:
        return None
    return {"captured_graphs": decoder.captures, "cuda_graphs": decoder.use_graphs, "pool_slots": decoder.pool.slots,
            "pool_columns": decoder.pool.capacity, "pool_gib": decoder.pool.nbytes / 2**30}


def free_memory() -> None:
    """Give a deleted engine's memory back before the next one loads."""
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--shape", choices=sorted(SHAPES), default=None, help="default: 3b on GPU, tiny on CPU"
    )
    parser.add_argument("--layers", type=int, default=None, help="override the decoder depth (scaled runs)")
    parser.add_argument("--prompts", type=int, default=None, help="default: 64 on GPU, 8 on CPU")
    parser.add_argument("--prompt-len", type=int, default=None, help="default: 512 on GPU, 32 on CPU")
    parser.add_argument("--new-tokens", type=int, default=None, help="default: 256 on GPU, 16 on CPU")
    parser.add_argument("--n", type=int, default=1, help="samples per prompt")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    on_gpu = args.device.startswith("cuda")
    defaults = GPU_DEFAULTS if on_gpu else CPU_DEFAULTS
    shape_name = args.shape or defaults["shape"]
    shape = dict(SHAPES[shape_name])
    if args.layers is not None:
        shape["num_hidden_layers"] = args.layers
    count = args.prompts or defaults["prompts"]
    prompt_len = args.prompt_len or defaults["prompt_len"]
    new_tokens = args.new_tokens or defaults["new_tokens"]
    dtype = torch.bfloat16 if on_gpu else torch.float32
    out = args.out or REPO / "bench" / "results" / f"gpu_rollout_{device_name(args.device)}.json"
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))

    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        model_dir = write_checkpoint(Path(tmp) / "model", shape, dtype, args.device)
        engine_args = dict(device=args.device, dtype=dtype, max_batch_size=max(256, count * args.n))
        engine = EmbeddedEngine(model_dir, **engine_args)  # decode_graphs="auto": the default config
        setup_s = time.perf_counter() - start
        default_path = "graphs" if engine.model_info()["decode_graphs"] else "slab"
        prompts = make_prompts(len(engine.tokenizer), count, prompt_len, prompt_len, seed=0)
        params = SamplingParams(max_new_tokens=new_tokens, temperature=1.0, top_p=1.0, n=args.n)
        stop_ids = stop_ids_of(engine)
        # A whole untimed pass first (a graph engine captures its buckets), as engine_rate does.
        run_engine(engine, prompts, with_stops(params, stop_ids))
        # HF generate runs on the engine's own model object: the same weights, loaded once. The engine's
        # scheduler thread is idle between `generate` calls (compare_case waits for every result).
        case = compare_case(engine, engine.model, prompts, params, stop_ids, args.device, args.repeats)
        rates = {default_path: {"tokens_per_s": case["engine_tokens_per_s"], "tokens": case["engine_tokens"],
                                "s": case["engine_s"]}}
        stats = {default_path: graph_stats(engine)}
        engine.shutdown()
        del engine
        free_memory()
        report: dict[str, Any] = {
            "benchmark": "embedded rollout engine vs transformers generate (sampled)",
            "model": f"Qwen2.5-VL, {shape_name} text decoder{' (scaled)' if args.layers else ''}, random weights",
            "shape": shape,
            "dtype": str(dtype),
            "device": args.device,
            "gpu": torch.cuda.get_device_name(args.device) if on_gpu else None,
            "setup_s": setup_s,
            "case": case,
            "engine_generated_tokens_per_s": case["engine_tokens_per_s"],
            "hf_generate_generated_tokens_per_s": case["hf_generate_tokens_per_s"],
            "engine_over_hf_generate": case["speedup"],
            "engine_decode_path": default_path,
            "decode_paths": rates,
            "graph_decoder": stats.get("graphs"),
            "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(),
            "machine": platform.machine(),
        }
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2) + "\n")  # the goal's figures are safe if what follows fails
        # The other decode path, alone: forced "on" off CUDA runs the static pool eagerly.
        other_path = "slab" if default_path == "graphs" else "graphs"
        try:
            other = EmbeddedEngine(model_dir, decode_graphs="off" if other_path == "slab" else "on", **engine_args)
            rates[other_path] = engine_rate(other, prompts, params, stop_ids, args.device, max(args.repeats, 1))
            stats[other_path] = graph_stats(other)
            other.shutdown()
        except Exception as exc:  # noqa: BLE001 - report it; the default path's figures stand
            report["other_path_error"] = f"{other_path}: {type(exc).__name__}: {exc}"
            print(f"the {other_path} decode path failed: {exc}", file=sys.stderr)
    if other_path in rates:
        report["engine_slab_generated_tokens_per_s"] = rates["slab"]["tokens_per_s"]
        report["engine_graphs_generated_tokens_per_s"] = rates["graphs"]["tokens_per_s"]
        report["engine_graphs_over_slab"] = rates["graphs"]["tokens_per_s"] / rates["slab"]["tokens_per_s"]
        report["graph_decoder"] = stats["graphs"]
    out.write_text(json.dumps(report, indent=2) + "\n")
    slab, graphs = rates.get("slab", {}).get("tokens_per_s"), rates.get("graphs", {}).get("tokens_per_s")
    print(
        f"engine ({default_path}) {case['engine_tokens_per_s']:.0f} generated tok/s ({case['engine_tokens']} tokens), "
        f"HF generate {case['hf_generate_tokens_per_s']:.0f} tok/s ({case['hf_tokens']} tokens), "
        f"engine/HF {case['speedup']:.2f}x ({case['time_measure']}); setup {setup_s:.0f} s\n"
        f"decode paths: slab {slab} tok/s, graphs {graphs} tok/s"
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
