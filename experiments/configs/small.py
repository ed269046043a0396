"""The `small` preset (~100M total parameters): a GPU-sized run; slow but possible on CPU.

  python -m dsv3_jax.train --config experiments/configs/small.py --workdir runs/small
"""
from dsv3_jax.train_config import base_config, model_block, parse_arg


def get_config(arg=None):
    variant = parse_arg(arg, config="small.py", quick=False)
    c = base_config()
    c.model = model_block("small")
    c.data.seq_len = 512
    c.data.global_batch = 16
    c.train.steps = 5000
    c.train.eval_every = 500
    c.train.checkpoint_every = 500
    c.optim.peak_lr = 1.5e-3
    c.optim.warmup_steps = 200
    if variant.quick:
        c.train.steps = 10
        c.train.log_every = 2
        c.train.eval_every = 10
        c.train.checkpoint_every = 10
        c.data.global_batch = 2
        c.data.eval_batches = 1
    return c
