#!/usr/bin/env bash
# GPU smoke test for the lent machine (see ../shared/GPU.md): one call, everything under $OUT as JSON.
#
#   Prepare here (CPU):  pip download the cp312 wheels listed in tools/gpu_wheels.txt into .whl/
#   Run there:           device run: bash tools/gpu_smoke.sh   (carry: [".whl"])
#
# It installs the carried wheels into /tmp/site, puts the repo on PYTHONPATH, then:
#   1. environment facts (GPU, torch, transformers, megatron-core)            -> env.json
#   2. bench/gpu_train.py: Megatron policy + CalibRL loss vs transformers SDPA -> gpu_train.json
#      (Qwen2.5-VL-3B text-decoder shape, seq 4096, bf16)
#   3. bench/gpu_rollout.py: embedded rollout engine vs transformers generate  -> gpu_rollout.json
#      (same Qwen2.5-3B-shaped decoder, bf16, 64 prompts x 512 tokens, 256 new, sampled)
#   4. bench/logprob.py: chunked fused log-prob/entropy vs unfused fp32 log_softmax -> logprob.json
#      (4096 tokens x vocab 151936, bf16: time and peak memory)
#   5. a few trainer steps of the tiny demo config on the GPU (nccl, bf16; embedded rollout server on
#      the GPU), loss and rollout/trainer log-prob mismatch                   -> trainer_metrics.jsonl
#   6. a summary with what was skipped and why                              -> summary.json
# Each stage has its own time limit (180 + 150 + 60 + 120 s: under the 600 s per call with the install) so one
# slow stage cannot eat the device budget of the others.
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

timeout 180 python3 bench/gpu_train.py --shape "$SHAPE" --seq "$SEQ" --steps 3 --warmup 1 --out "$OUT/gpu_train.json" \
  > "$OUT/gpu_train.log" 2>&1; status gpu_train $?
tail -5 "$OUT/gpu_train.log"

if [ "$SHAPE" = tiny ]; then ROLLOUT_ARGS=(--device "$SERVER_DEVICE"); LOGPROB_ARGS=(--device cpu); else
  ROLLOUT_ARGS=(--shape "$SHAPE"); LOGPROB_ARGS=(--dtype bf16); fi
timeout 150 python3 bench/gpu_rollout.py "${ROLLOUT_ARGS[@]}" --out "$OUT/gpu_rollout.json" \
  > "$OUT/gpu_rollout.log" 2>&1; status gpu_rollout $?
tail -2 "$OUT/gpu_rollout.log"
timeout 60 python3 bench/logprob.py "${LOGPROB_ARGS[@]}" --out "$OUT/logprob.json" > "$OUT/logprob.log" 2>&1
status logprob $?
tail -12 "$OUT/logprob.log"

work=/tmp/smoke_work; rm -rf "$work"; mkdir -p "$work"
python3 -c "from tools.make_tiny_model import make_tiny_model; make_tiny_model('qwen2_5_vl', '$work/tiny', seed=0)" \
  > "$OUT/trainer.log" 2>&1
python3 -m calibrl_mcore.cli data synth --out "$work/data" --n 64 --heldout 8 >> "$OUT/trainer.log" 2>&1
timeout 120 python3 -m calibrl_mcore.cli train --config configs/tiny_cpu.yaml model.hf_path="$work/tiny" \
  model.dtype="$DTYPE" rollout.server_device="$SERVER_DEVICE" data.train_path="$work/data/train.jsonl" train.run_dir="$work/run" \
  train.steps=3 train.progress=false train.tensorboard=false >> "$OUT/trainer.log" 2>&1; status trainer $?
cp "$work/run/metrics.jsonl" "$OUT/trainer_metrics.jsonl" 2>/dev/null || true
tail -3 "$OUT/trainer.log"

python3 - "$OUT" <<'PY'
import json, sys, pathlib
out = pathlib.Path(sys.argv[1])
summary = {"status": dict(l.split("=", 1) for l in (out / "status.txt").read_text().split()),
           "skipped": ["transformer_engine (TE/FP8 specs)", "sglang", "vllm", "nvidia-dali"]}
if (out / "gpu_train.json").exists():
    g = json.loads((out / "gpu_train.json").read_text())
    summary["gpu_train"] = {k: {m: v[m] for m in ("tokens_per_s", "mfu", "peak_gb")} for k, v in g["stacks"].items()}
    summary["gpu_train"]["ratio"] = g["megatron_over_transformers_throughput"]
if (out / "gpu_rollout.json").exists():
    r = json.loads((out / "gpu_rollout.json").read_text())
    summary["gpu_rollout"] = {k: r[k] for k in ("engine_generated_tokens_per_s", "hf_generate_generated_tokens_per_s",
                                                "engine_over_hf_generate")}
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
