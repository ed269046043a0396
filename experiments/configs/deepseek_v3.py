"""The report's pre-training recipe, shape for shape (spec §7), on the release's architecture.

Not runnable on one machine: it documents the paper's schedule in this codebase's terms and is
the config the planning tool sizes (`python -m dsv3_jax.plan --config experiments/configs/deepseek_v3.py`).
14.8T tokens at 4K sequence length and a final batch of 15360 sequences is about 235K steps.
`:quick` keeps the schedule's shape on the tiny model for a smoke run.
"""
from dsv3_jax.train_config import base_config, model_block, parse_arg


def get_config(arg=None):
    variant = parse_arg(arg, config="deepseek_v3.py", quick=False)
    c = base_config()
    # The report's FP8 recipe (E4M3, 1x128 activation / 128x128 weight scales; dsv3_jax/fp8.py)
    # on BF16 compute (embedding, head, router, norms and attention core stay BF16/FP32).
    c.model = model_block("deepseek_v3_671b", dtype="bfloat16", remat="selective", fp8=True)
    c.data.seq_len = 4096
    c.data.global_batch = 15360
    c.data.micro_batch = 128            # one sequence per device of the (data x expert) = 128 ways
    c.mesh.update(dict(data=-1, expert=64, pipeline=16))   # the report's PP16 x EP64 x ZeRO-1 DP
    c.train.steps = 235_000
    c.train.peak_tflops = 989.0         # H800/H100 dense BF16
    c.train.eval_every = 1000
    c.train.checkpoint_every = 1000
    c.optim.peak_lr = 2.2e-4
    c.optim.warmup_steps = 2000
    c.optim.moments_dtype = "bfloat16"
    c.balance.gamma = 0.001
    c.balance.alpha = 1e-4
    c.mtp.lambda_start, c.mtp.lambda_end = 0.3, 0.1
    if variant.quick:
        c.model = model_block("tiny", dtype="bfloat16", remat="selective", fp8=True)
        c.data.micro_batch = 0
        c.mesh.update(dict(data=-1, expert=1, pipeline=1))
        c.data.seq_len = 128
        c.data.global_batch = 4
        c.train.steps = 20
        c.train.log_every = 5
        c.train.eval_every = 20
        c.train.checkpoint_every = 20
        c.optim.warmup_steps = 4
        c.data.eval_batches = 1
    return c
