#!/usr/bin/env bash
# base -> SFT -> GRPO on the arithmetic task, with the accuracy of each on 500 held-out problems.
#   bash experiments/posttraining_demo.sh runs/tiny runs/post     # runs/tiny: the main job
set -euo pipefail
BASE=${1:-runs/tiny}
OUT=${2:-runs/post}
mkdir -p "$OUT"
ev() { python -m dsv3_jax.evaluate --checkpoint "$1" --task arithmetic --n 500 --json | tail -1; }
ev "$BASE" > "$OUT/eval_base.json"
# SFT: 2 epochs over 90k generated conversations (place-value digit tokens, balanced operand
# lengths: the config's defaults; 820 steps of 32 rows), then GRPO at the config's LR 1e-4 with
# G = 16 samples x 16 prompts; ~14 min on 2 cores in all (README, post-training figures)
python -m dsv3_jax.sft --config experiments/configs/sft_tiny.py --config.train.init_from="$BASE" \
  --workdir "$OUT/sft" --config.sft.num_train=90000 --config.optim.peak_lr=3e-3 \
  --config.data.global_batch=32
ev "$OUT/sft" > "$OUT/eval_sft.json"
python -m dsv3_jax.grpo --config experiments/configs/grpo_tiny.py --config.train.init_from="$OUT/sft" \
  --workdir "$OUT/grpo" --config.train.steps=60 --config.grpo.group=16 \
  --config.data.global_batch=256
ev "$OUT/grpo" > "$OUT/eval_grpo.json"
python scripts/plot_grpo.py "$OUT/grpo"
cat "$OUT"/eval_*.json
