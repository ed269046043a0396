#!/usr/bin/env bash
# base -> SFT -> GRPO on the arithmetic task, with the accuracy of each on 500 held-out problems.
#   bash experiments/posttraining_demo.sh runs/tiny runs/post     # runs/tiny: the main job
set -euo pipefail
BASE=${1:-runs/tiny}
OUT=${2:-runs/post}
mkdir -p "$OUT"
ev() { python -m dsv3_jax.evaluate --checkpoint "$1" --task arithmetic --n 500 --json | tail -1; }
ev "$BASE" > "$OUT/eval_base.json"
# SFT in two rounds of 2 epochs over 30k generated conversations each (seeds 1 and 3)
python -m dsv3_jax.sft --config experiments/configs/sft_tiny.py --config.train.init_from="$BASE" \
  --workdir "$OUT/sft1" --config.sft.num_train=30000 --config.optim.peak_lr=2e-3
python -m dsv3_jax.sft --config experiments/configs/sft_tiny.py --config.train.init_from="$OUT/sft1" \
  --workdir "$OUT/sft" --config.sft.num_train=30000 --config.sft.seed=3 --config.optim.peak_lr=2e-3
ev "$OUT/sft" > "$OUT/eval_sft.json"
python -m dsv3_jax.grpo --config experiments/configs/grpo_tiny.py --config.train.init_from="$OUT/sft" \
  --workdir "$OUT/grpo" --config.train.steps=60 --config.optim.peak_lr=2e-4 \
  --config.grpo.group=16 --config.data.global_batch=256
ev "$OUT/grpo" > "$OUT/eval_grpo.json"
python scripts/plot_grpo.py "$OUT/grpo"
cat "$OUT"/eval_*.json
