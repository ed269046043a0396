"""Context extension (report §4.3) at tiny scale: the main job's model (pre-trained at 256 tokens,
experiments/configs/tiny.py) extended in two YaRN phases, 256 -> 1024 -> 4096.

  python -m dsv3_jax.train --config experiments/configs/context_extension.py:phase=1,init_from=/tmp/tiny_main --workdir /tmp/ctx/phase1
  python -m dsv3_jax.train --config experiments/configs/context_extension.py:phase=2,init_from=/tmp/ctx/phase1 --workdir /tmp/ctx/phase2

(experiments/context_extension.py runs both and the evaluation.) The report's recipe, scaled:
  - YaRN on the decoupled rope key/query only: scale s = new / original length (4, then 16 over
    the original 256), alpha = beta_slow = 1, beta = beta_fast = 32, mscale = 0.1 ln s + 1 in the
    softmax scale (mscale = mscale_all_dim = 1, as the release); max_position_embeddings = s x 256.
  - Fixed LR at the end-of-pre-training value (tiny.py's schedule ends at 3.3% of its peak, as
    the report's 7.3e-6 of 2.2e-4), no warm-up; bias speed gamma 0 and MTP lambda 0.1 as at the
    end of pre-training.
  - Batch scaled down as the length grows (report: 1920 x 32K then 480 x 128K): 8 x 256 tokens in
    pre-training, 2 x 1024 in phase 1 (same tokens per step), 1 x 4096 in phase 2 (one row is the
    least; 2x the tokens).
  - Steps: the report's 1000 per phase shrunk to fit 2 CPU cores (150 and 60).
  - train_attention auto: blockwise flash attention at these lengths, no T^2 scores.
Variants: phase=1|2, init_from=<workdir of the previous stage>, steps=<override>.
"""
from dsv3_jax.config import ConfigError
from dsv3_jax.train_config import parse_arg

from experiments.configs import tiny

ORIGINAL = 256
PHASES = {1: dict(seq_len=1024, global_batch=2, steps=150),
          2: dict(seq_len=4096, global_batch=1, steps=60)}


def yarn(factor: float) -> dict:
    return {"type": "yarn", "factor": float(factor), "original_max_position_embeddings": ORIGINAL,
            "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0}


def get_config(arg=None):
    v = parse_arg(arg, config="context_extension.py", phase=1, init_from="", steps=0)
    if v.phase not in PHASES:
        raise ConfigError(f"context_extension.py: phase must be 1 or 2, got {v.phase}")
    p = PHASES[v.phase]
    c = tiny.get_config()
    pre_peak = c.optim.peak_lr
    factor = p["seq_len"] / ORIGINAL
    c.model.rope_scaling = yarn(factor)
    c.model.max_position_embeddings = int(factor * ORIGINAL)
    c.model.train_attention = "auto"
    c.data.seq_len, c.data.global_batch = p["seq_len"], p["global_batch"]
    c.data.eval_batches = 2
    c.train.init_from = v.init_from
    c.train.steps = v.steps or p["steps"]
    c.train.log_every = 10
    c.train.eval_every = c.train.checkpoint_every = c.train.steps
    c.train.sample_tokens = 16
    c.optim.peak_lr = pre_peak * 0.033          # the schedule's final value (optim.lr_schedule)
    c.optim.warmup_steps = 0
    c.optim.constant_until = c.optim.decay_until = c.optim.tail1_until = 1.0
    c.balance.gamma = 0.0
    c.mtp.lambda_start = c.mtp.lambda_end = c.mtp.lambda_end
    if c.data.seq_len > c.model.max_position_embeddings:
        raise ConfigError("data.seq_len exceeds model.max_position_embeddings")
    return c
