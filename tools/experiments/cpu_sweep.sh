#!/usr/bin/env bash
# The CPU experiment behind docs/experiments.md: synthetic visual task, tiny Qwen2.5-VL, SFT start,
# then three sweeps from that same start. ~30–60 min on 2 cores.
#   bash tools/experiments/cpu_sweep.sh [OUT=runs/experiments] [STEPS=20]
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-runs/experiments}; STEPS=${STEPS:-15}; PY=${PY:-.venv/bin/python}
mkdir -p "$OUT"
for p in 0 0.3 0.6; do   # same prompts and images (same seed); only the experts differ
  [ -f "$OUT/data_p$p/train.jsonl" ] || $PY -m calibrl_mcore.cli data synth --out "$OUT/data_p$p" --n 512 --heldout 64 --seed 0 --expert-noise $p
done
[ -f "$OUT/tiny/config.json" ] || $PY -c "from calibrl_mcore.make_tiny_model import make_tiny_model; make_tiny_model('qwen2_5_vl', '$OUT/tiny', seed=0)"
[ -f "$OUT/sft/hf/config.json" ] || $PY -m calibrl_mcore.cli sft --config configs/tiny_cpu.yaml model.hf_path="$OUT/tiny" \
  data.train_path="$OUT/data_p0/train.jsonl" train.run_dir="$OUT/sft" sft.steps=250 sft.out_dir="$OUT/sft/hf" train.progress=false
COMMON=(model.hf_path="$OUT/sft/hf" data.eval_path="$OUT/data_p0/eval.jsonl" train.eval_prompts=64 train.steps=$STEPS
        train.tensorboard=false)
# 1. algorithms on clean experts
$PY -m calibrl_mcore.cli sweep --config configs/tiny_cpu.yaml --out "$OUT/algorithms" \
  --grid algo.name=grpo,dapo,luffy,rlplus,calibrl --set "${COMMON[@]}" data.train_path="$OUT/data_p0/train.jsonl"
# 2. CalibRL with noisy experts, with and without gating (p = 0 is the calibrl cell of sweep 1)
$PY -m calibrl_mcore.cli sweep --config configs/tiny_cpu.yaml --out "$OUT/noise_gating" \
  --grid data.train_path="$OUT/data_p0.3/train.jsonl,$OUT/data_p0.6/train.jsonl" \
         algo.expert_gate=none,drop --set "${COMMON[@]}" algo.name=calibrl
# 3. CalibRL α grid (α = 0.5 is the calibrl cell of sweep 1)
$PY -m calibrl_mcore.cli sweep --config configs/tiny_cpu.yaml --out "$OUT/alpha" \
  --grid algo.alpha=0.2,1.0 --set "${COMMON[@]}" algo.name=calibrl data.train_path="$OUT/data_p0/train.jsonl"
$PY -m calibrl_mcore.cli eval --config configs/tiny_cpu.yaml --model "$OUT/sft/hf" data.eval_path="$OUT/data_p0/eval.jsonl" \
  train.eval_prompts=64 > "$OUT/eval_sft_start.json"
