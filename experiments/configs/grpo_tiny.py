"""GRPO of the SFT'd tiny model on the arithmetic task (dsv3_jax.grpo):

  python -m dsv3_jax.grpo --config experiments/configs/grpo_tiny.py \
      --config.train.init_from=runs/sft_tiny --workdir runs/grpo_tiny

G = 8 samples for each of 16 prompts per step, T = 1, ε = 0.2, β = 0.04 (k3 KL to the SFT model),
μ = 1; router biases frozen (balance.gamma = 0); constant LR after a short warm-up.
`:quick` is a smoke run.
"""
import ml_collections

from dsv3_jax.arithmetic import RL_SEED
from dsv3_jax.train_config import base_config, model_block, parse_arg


def get_config(arg=None):
    variant = parse_arg(arg, config="grpo_tiny.py", quick=False)
    c = base_config()
    c.model = model_block("tiny", vocab_size=8256, scan_unroll=4, attn_causal_blocks=4)
    c.grpo = ml_collections.ConfigDict(dict(
        task="arithmetic", reward="exact_answer", seed=RL_SEED,
        prompts_per_step=16, group=8, max_new_tokens=8, temperature=1.0,
        epsilon=0.2, epsilon_high=0.0,   # 0: = epsilon (symmetric clip)
        beta=0.04, mu=1, mask_truncated=False))
    c.train.objective = "grpo"
    c.train.steps = 60
    c.train.log_every = 1
    c.train.checkpoint_every = 30
    c.data.global_batch = c.grpo.prompts_per_step * c.grpo.group
    c.optim.peak_lr = 1e-4
    c.optim.warmup_steps = 5
    c.optim.constant_until = 1.0
    c.optim.decay_until = 1.0
    c.optim.tail1_until = 1.0
    c.optim.weight_decay = 0.0
    c.balance.gamma = 0.0          # the router biases stay as SFT left them
    c.balance.alpha = 0.0
    if variant.quick:
        c.train.steps = 3
        c.grpo.prompts_per_step, c.grpo.group = 2, 4
        c.data.global_batch = 8
    return c
