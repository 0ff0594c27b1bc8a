#!/usr/bin/env bash
# GPU smoke test for a lent GPU machine (see docs/gpu.md): everything under $OUT as JSON.
#
#   Prepare here (CPU):  pip download the cp312 wheels listed in tools/gpu_wheels.txt into .whl/
#   Run there, two calls (each under the 600 s per-call limit; carry: [".whl"]):
#       GPU_SMOKE_PART=train   bash tools/gpu_smoke.sh
#       GPU_SMOKE_PART=rollout bash tools/gpu_smoke.sh
#
# It installs the carried wheels into /tmp/site, puts the repo on PYTHONPATH, then (stage -> file, time limit):
#   part train:
#   1. environment facts (GPU, torch, transformers, megatron-core)                          -> env.json
#   2. bench/gpu_train.py, Qwen2.5-VL-3B text-decoder shape, seq 4096, bf16: our Megatron policy + CalibRL
#      loss on the sdpa spec, eager and model.compile, vs transformers SDPA                 -> gpu_train.json  240 s
#   3. the same shape, 8 rows of varied lengths: padded vs packed (model.packed_sequences)
#      vs transformers with an attention mask                                               -> gpu_train_rows.json 150 s
#   4. bench/logprob.py: chunked fused log-prob/entropy vs unfused fp32 log_softmax       -> logprob.json  60 s
#      (4096 tokens x vocab 151936, bf16: time and peak memory)
#   part rollout:
#   5. bench/gpu_rollout.py: embedded engine (CUDA-graph decode and the slab path) vs transformers
#      generate (same 3B decoder, 64 prompts x 512 tokens, 256 new, sampled)               -> gpu_rollout.json 240 s
#   6. a few trainer steps of the tiny demo config on the GPU (nccl, bf16; embedded rollout server on
#      the GPU), loss and rollout/trainer log-prob mismatch                                 -> trainer_metrics.jsonl 120 s
#   7. the 7B decoder shape with full recompute, eager vs transformers                      -> gpu_train_7b.json 150 s
#   both: a summary with what was skipped and why                                           -> summary.json
# GPU_SMOKE_PART=all (the default) runs both parts in one call: for the CPU dry run.
# CPU dry run: GPU_SMOKE_SHAPE=tiny GPU_SMOKE_SEQ=64 GPU_SMOKE_DTYPE=fp32 GPU_SMOKE_SERVER_DEVICE=cpu \
#              GPU_SMOKE_NO_WHEELS=1 PATH=.venv/bin:$PATH bash tools/gpu_smoke.sh
set -u
OUT=${OUT:-/tmp/gpu_smoke_out}
SHAPE=${GPU_SMOKE_SHAPE:-3b}; SEQ=${GPU_SMOKE_SEQ:-4096}
DTYPE=${GPU_SMOKE_DTYPE:-bf16}; SERVER_DEVICE=${GPU_SMOKE_SERVER_DEVICE:-cuda}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
if [ -z "${GPU_SMOKE_NO_WHEELS:-}" ] && ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo '{"error": "wheel install failed"}' > "$OUT/summary.json"; exit 1; }
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
status() { echo "$1=$2" >> "$OUT/status.txt"; echo "== $1: $2"; }

python3 - <<'PY' > "$OUT/env.json" 2>&1 || true
import json, torch, importlib.util as u
info = {"torch": torch.__version__, "cuda": torch.cuda.is_available(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}
for mod in ("transformers", "megatron.core", "transformer_engine", "sglang", "vllm", "nvidia.dali", "apex"):
    try:
        info[mod] = u.find_spec(mod) is not None
    except ModuleNotFoundError:
        info[mod] = False
import transformers, megatron.core
info["transformers_version"], info["megatron_core_version"] = transformers.__version__, megatron.core.__version__
print(json.dumps(info, indent=2))
PY
cat "$OUT/env.json"
for pkg in transformer_engine sglang nvidia.dali; do
  python3 -c "import importlib.util as u, sys; sys.exit(0 if u.find_spec('${pkg%%.*}') else 1)" 2>/dev/null \
    || echo "skipped: ${pkg} not installed (TE specs / FP8, SGLang server, DALI pipeline cannot be exercised here)"
done

PART=${GPU_SMOKE_PART:-all}
if [ "$SHAPE" = tiny ]; then BIG=tiny; ROLLOUT_ARGS=(--device "$SERVER_DEVICE"); LOGPROB_ARGS=(--device cpu); else
  BIG=7b; ROLLOUT_ARGS=(--shape "$SHAPE"); LOGPROB_ARGS=(--dtype bf16); fi

if [ "$PART" = train ] || [ "$PART" = all ]; then
  timeout 240 python3 bench/gpu_train.py --shape "$SHAPE" --seq "$SEQ" --steps 3 --warmup 2 \
    --stacks transformers,eager,compiled --out "$OUT/gpu_train.json" > "$OUT/gpu_train.log" 2>&1
  status gpu_train $?
  grep "tokens/s" "$OUT/gpu_train.log"
  timeout 150 python3 bench/gpu_train.py --shape "$SHAPE" --seq "$SEQ" --rows 8 --steps 3 --warmup 1 \
    --stacks transformers,eager,packed --out "$OUT/gpu_train_rows.json" > "$OUT/gpu_train_rows.log" 2>&1
  status gpu_train_rows $?
  grep "tokens/s" "$OUT/gpu_train_rows.log"
  # packed attention: torch varlen flash (CUDA, bf16) vs one SDPA per segment, outputs and grads
  timeout 60 python3 - > "$OUT/varlen.json" 2> "$OUT/varlen.log" <<'PY'
import json, torch
from model_providers.packing import PackedLayout
from model_providers.sdpa_attention import _varlen_causal, _varlen_usable
import torch.nn.functional as F
dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
layout = PackedLayout.from_lengths(torch.tensor([700, 1500, 300, 1596]), 1596, pad_multiple=8, device=dev)
g = torch.Generator(device=dev).manual_seed(0)
q, k, v = (torch.randn(layout.total, h, 128, generator=g, device=dev, dtype=dtype).requires_grad_() for h in (16, 2, 2))
result = {"usable": _varlen_usable(q, 0.0), "torch": torch.__version__}
if result["usable"]:
    out = _varlen_causal(q, k, v, layout.packed_seq_params(), 128 ** -0.5)
    out.float().square().sum().backward()
    grads = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    bounds = layout.cu_seqlens_cpu.tolist()
    ref = torch.cat([F.scaled_dot_product_attention(*(t[a:b].transpose(0, 1)[None] for t in (q, k, v)), is_causal=True,
                                                    enable_gqa=True)[0].transpose(0, 1) for a, b in zip(bounds, bounds[1:])])
    ref.float().square().sum().backward()
    result["max_abs_out"] = (out.float() - ref.float()).abs().max().item()
    result["max_rel_grad"] = max(((t.grad.float() - g0.float()).norm() / g0.float().norm()).item()
                                 for t, g0 in zip((q, k, v), grads))
print(json.dumps(result))
PY
  status varlen $?
  cat "$OUT/varlen.json"
  timeout 60 python3 bench/logprob.py "${LOGPROB_ARGS[@]}" --out "$OUT/logprob.json" > "$OUT/logprob.log" 2>&1
  status logprob $?
  tail -12 "$OUT/logprob.log"
fi

if [ "$PART" = rollout ] || [ "$PART" = all ]; then
  timeout 240 python3 bench/gpu_rollout.py "${ROLLOUT_ARGS[@]}" --out "$OUT/gpu_rollout.json" \
    > "$OUT/gpu_rollout.log" 2>&1; status gpu_rollout $?
  tail -2 "$OUT/gpu_rollout.log"

  work=/tmp/smoke_work; rm -rf "$work"; mkdir -p "$work"
  python3 -c "from tools.make_tiny_model import make_tiny_model; make_tiny_model('qwen2_5_vl', '$work/tiny', seed=0)" \
    > "$OUT/trainer.log" 2>&1
  python3 -m calibrl_mcore.cli data synth --out "$work/data" --n 64 --heldout 8 >> "$OUT/trainer.log" 2>&1
  timeout 120 python3 -m calibrl_mcore.cli train --config configs/tiny_cpu.yaml model.hf_path="$work/tiny" \
    model.dtype="$DTYPE" model.spec=auto rollout.server_device="$SERVER_DEVICE" data.train_path="$work/data/train.jsonl" \
    train.run_dir="$work/run" train.steps=3 train.progress=false train.tensorboard=false >> "$OUT/trainer.log" 2>&1
  status trainer $?
  cp "$work/run/metrics.jsonl" "$OUT/trainer_metrics.jsonl" 2>/dev/null || true
  tail -3 "$OUT/trainer.log"

  timeout 150 python3 bench/gpu_train.py --shape "$BIG" --seq "$SEQ" --recompute --steps 2 --warmup 1 \
    --stacks transformers,eager --out "$OUT/gpu_train_7b.json" > "$OUT/gpu_train_7b.log" 2>&1
  status gpu_train_7b $?
  grep "tokens/s" "$OUT/gpu_train_7b.log"
fi

python3 - "$OUT" <<'PY'
import json, sys, pathlib
out = pathlib.Path(sys.argv[1])
summary = {"status": dict(l.split("=", 1) for l in (out / "status.txt").read_text().split()),
           "skipped": ["transformer_engine (TE/FP8 specs)", "sglang", "vllm", "nvidia-dali"]}
for name in ("gpu_train", "gpu_train_rows", "gpu_train_7b"):
    if (out / f"{name}.json").exists():
        g = json.loads((out / f"{name}.json").read_text())
        summary[name] = {k: {m: v.get(m) for m in ("tokens_per_s", "mfu", "peak_gb", "throughput_over_transformers",
                                                   "peak_memory_over_transformers", "error") if m in v}
                         for k, v in g["stacks"].items()}
if (out / "varlen.json").exists() and (out / "varlen.json").read_text().strip():
    summary["varlen"] = json.loads((out / "varlen.json").read_text())
if (out / "gpu_rollout.json").exists():
    r = json.loads((out / "gpu_rollout.json").read_text())
    summary["gpu_rollout"] = {k: r.get(k) for k in (
        "engine_generated_tokens_per_s", "hf_generate_generated_tokens_per_s", "engine_over_hf_generate",
        "engine_decode_path", "engine_slab_generated_tokens_per_s", "engine_graphs_generated_tokens_per_s",
        "engine_graphs_over_slab", "other_path_error") if k in r}
if (out / "logprob.json").exists():
    lp = json.loads((out / "logprob.json").read_text())
    summary["logprob"] = {"shape": lp["shape"], "best_chunk": lp["best_chunk"], **lp["best_chunk_vs_unfused"],
                          "max_abs_diff": lp["max_abs_diff_vs_unfused"][f"fused_chunk{lp['best_chunk']}"]}
if (out / "trainer_metrics.jsonl").exists():
    rows = [json.loads(l) for l in (out / "trainer_metrics.jsonl").read_text().splitlines()]
    keys = ("train/loss", "reward/mean", "rollout/logprob_mismatch_mean", "rollout/logprob_mismatch_max",
            "time/step_s", "train/tokens_per_s")
    summary["trainer"] = [{k: r.get(k) for k in ("step",) + keys} for r in rows]
(out / "summary.json").write_text(json.dumps(summary, indent=2))
print(json.dumps(summary, indent=2))
PY
