#!/usr/bin/env bash
# Follow-up to cpu_sweep.sh (reuses its data and SFT start): at the demo's lr (2e-4) 15 steps barely
# move the policy, so this repeats the key comparisons with lr 1e-3 and 30 steps.
#   OUT=runs/experiments bash tools/experiments/cpu_sweep_lr.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-runs/experiments}; STEPS=${STEPS:-30}; LR=${LR:-1e-3}; PY=${PY:-.venv/bin/python}
[ -f "$OUT/sft/hf/config.json" ] || { echo "run tools/experiments/cpu_sweep.sh first"; exit 1; }
COMMON=(model.hf_path="$OUT/sft/hf" data.eval_path="$OUT/data_p0/eval.jsonl" train.eval_prompts=64 train.steps=$STEPS
        optim.lr=$LR train.tensorboard=false)
$PY -m calibrl_mcore.cli sweep --config configs/tiny_cpu.yaml --out "$OUT/lr_algorithms" \
  --grid algo.name=grpo,luffy,calibrl --set "${COMMON[@]}" data.train_path="$OUT/data_p0/train.jsonl"
$PY -m calibrl_mcore.cli sweep --config configs/tiny_cpu.yaml --out "$OUT/lr_noise_gating" \
  --grid algo.expert_gate=none,drop --set "${COMMON[@]}" algo.name=calibrl data.train_path="$OUT/data_p0.6/train.jsonl"
$PY -m calibrl_mcore.cli sweep --config configs/tiny_cpu.yaml --out "$OUT/lr_alpha" \
  --grid algo.alpha=0.2,1.0 --set "${COMMON[@]}" algo.name=calibrl data.train_path="$OUT/data_p0/train.jsonl"
