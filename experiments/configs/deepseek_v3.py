"""The report's pre-training recipe, shape for shape (spec §7), on the release's architecture.

Not runnable on one machine: it documents the paper's schedule in this codebase's terms and is
the config the planning tool sizes (`python -m dsv3_jax.plan --config experiments/configs/deepseek_v3.py`).
14.8T tokens at 4K sequence length and a final batch of 15360 sequences is about 235K steps.
`:quick` keeps the schedule's shape on the tiny model for a smoke run. `:context=32768` and
`:context=131072` are the two context-extension phases of §4.3 (1000 steps each at the final
pre-training LR 7.3e-6, batch 1920 / 480, YaRN already in the release's rope_scaling);
`attention=reference` plans the materialised-T^2 attention instead of flash attention.
"""
from dsv3_jax.train_config import base_config, model_block, parse_arg


def get_config(arg=None):
    variant = parse_arg(arg, config="deepseek_v3.py", quick=False, context=4096,
                        attention="auto")
    c = base_config()
    # The report's FP8 recipe (E4M3, 1x128 activation / 128x128 weight scales; dsv3_jax/fp8.py)
    # on BF16 compute (embedding, head, router, norms and attention core stay BF16/FP32).
    c.model = model_block("deepseek_v3_671b", dtype="bfloat16", remat="selective", fp8=True,
                          train_attention=variant.attention)
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
    if variant.context != 4096:          # §4.3: 4K -> 32K (batch 1920) -> 128K (batch 480)
        batch = {32768: 1920, 131072: 480}
        if variant.context not in batch:
            from dsv3_jax.config import ConfigError
            raise ConfigError(f"deepseek_v3.py: context must be 4096, 32768 or 131072, got "
                              f"{variant.context}")
        c.data.seq_len, c.data.global_batch = variant.context, batch[variant.context]
        c.train.steps = 1000
        c.optim.peak_lr = 7.3e-6         # constant: the end-of-pre-training value
        c.optim.warmup_steps = 0
        c.optim.constant_until = c.optim.decay_until = c.optim.tail1_until = 1.0
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
