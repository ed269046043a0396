"""The report's training recipe, shape for shape (report §3-4), on the release's architecture.

Not runnable on one machine: it states the paper's schedule in this codebase's terms, and it is
the config the planning tool sizes:

  python -m dsv3_jax.plan --config experiments/configs/deepseek_v3.py --mesh pipeline=16,expert=64,data=2
  python -m dsv3_jax.plan --config experiments/configs/deepseek_v3.py:stage=ext32k ...

Variants: `stage=pretrain` (default; 14.8T tokens at 4K with plain RoPE, the batch ramped from
3072 to 15360 sequences over the first 469B tokens, every boundary in tokens), `stage=ext32k`
and `stage=ext128k` (§4.3: YaRN s=40, alpha=1, beta=32, sqrt(t) = 0.1 ln s + 1 on the decoupled
rope key only; 1000 steps each at 32K x 1920 and 128K x 480, LR 7.3e-6, starting from the
previous stage via --config.train.init_from=DIR), and `quick` (the tiny model with the
schedule's shape, for a smoke run). `attention=reference` plans the attention that materialises
the [T, S] probabilities instead of the default flash attention (`model.train_attention`).
"""
from dsv3_jax.train_config import base_config, model_block, parse_arg

SEQ_LEN = 4096
RAMP = (3072, 15360, 469e9, 8)        # rows from, rows to, over these tokens, in this many stages
TOTAL_TOKENS = 14.8e12
YARN = {"type": "yarn", "factor": 40, "original_max_position_embeddings": SEQ_LEN,
        "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0}


def batch_ramp(start: int, end: int, tokens: float, stages: int) -> str:
    """`stages` equal token spans from `start` to just below `end` rows, then `end`."""
    step = (end - start) // stages
    parts = [f"{k * tokens / stages:.6g}:{start + k * step}" for k in range(stages)]
    return ",".join(parts + [f"{tokens:.6g}:{end}"])


def steps_for(total_tokens: float, seq_len: int, ramp=RAMP) -> int:
    """Optimizer steps that consume `total_tokens` under the ramp (each ramp stage runs whole
    steps until its token span is used up)."""
    start, end, tokens, stages = ramp
    span, used, steps = tokens / stages, 0.0, 0
    for k in range(stages):
        rows = start + k * ((end - start) // stages)
        while used < (k + 1) * span:
            used += rows * seq_len
            steps += 1
    return steps + int(-(-(total_tokens - used) // (end * seq_len)))


def get_config(arg=None):
    variant = parse_arg(arg, config="deepseek_v3.py", quick=False, stage="pretrain",
                        attention="auto")
    if variant.stage not in ("pretrain", "ext32k", "ext128k"):
        from dsv3_jax.config import ConfigError
        raise ConfigError(f"deepseek_v3.py: stage must be pretrain, ext32k or ext128k, got "
                          f"{variant.stage!r}")
    c = base_config()
    # The report's FP8 recipe (E4M3, 1x128 activation / 128x128 weight scales; dsv3_jax/fp8.py)
    # on BF16 compute (embedding, head, router, norms and attention core stay BF16/FP32).
    # Pre-training uses plain RoPE at 4K; YaRN belongs to the context-extension stages.
    c.model = model_block("deepseek_v3_671b", dtype="bfloat16", remat="selective", fp8=True,
                          rope_scaling=None, max_position_embeddings=SEQ_LEN,
                          train_attention=variant.attention)
    c.data.seq_len = SEQ_LEN
    c.data.fim_rate = 0.1               # §4.1: Fill-in-the-Middle (PSM) on 10% of documents
    c.data.global_batch = RAMP[1]
    c.data.micro_batch = 128            # one sequence per device of the (data x expert) = 128 ways
    c.data.batch_ramp = batch_ramp(*RAMP)
    c.mesh.update(dict(data=-1, expert=64, pipeline=16))   # the report's PP16 x EP64 x ZeRO-1 DP
    c.train.steps = steps_for(TOTAL_TOKENS, SEQ_LEN)       # 244,829
    c.train.peak_tflops = 989.0         # H800/H100 dense BF16
    c.train.eval_every = 1000
    c.train.checkpoint_every = 1000
    c.optim.peak_lr = 2.2e-4
    c.optim.warmup_steps = 2000
    c.optim.constant_until = 10e12      # tokens: 2.2e-4 until 10T,
    c.optim.decay_until = 14.3e12       # cosine to 2.2e-5 by 14.3T,
    c.optim.tail1_until = 14.633e12     # 2.2e-5 for 333B tokens, then 7.3e-6 for the last 167B
    c.optim.moments_dtype = "bfloat16"
    c.balance.gamma = 0.001
    c.balance.gamma_until = 14.3e12     # gamma 0.001 for the first 14.3T tokens, then 0
    c.balance.alpha = 1e-4
    c.mtp.lambda_start, c.mtp.lambda_end = 0.3, 0.1
    c.mtp.lambda_switch = 10e12         # lambda 0.3 for the first 10T tokens, then 0.1
    if variant.stage != "pretrain":     # §4.3: two phases of 1000 steps, same YaRN both times
        seq_len, rows = {"ext32k": (32768, 1920), "ext128k": (131072, 480)}[variant.stage]
        c.model = model_block("deepseek_v3_671b", dtype="bfloat16", remat="selective", fp8=True,
                              rope_scaling=YARN, max_position_embeddings=seq_len,
                              train_attention=variant.attention)
        c.data.seq_len, c.data.global_batch, c.data.batch_ramp = seq_len, rows, ""
        # 1920 rows keep one sequence per (data x expert) device per micro-batch; 480 do not
        # split 128 ways, so that phase takes its batch whole
        c.data.micro_batch = 128 if rows % 128 == 0 else 0
        c.train.steps = 1000
        c.optim.peak_lr = 7.3e-6        # the final pre-training LR, constant
        c.optim.warmup_steps = 0
        c.optim.constant_until = c.optim.decay_until = c.optim.tail1_until = 1.0
        c.balance.gamma = 0.0
        c.mtp.lambda_start = c.mtp.lambda_end = 0.1
    if variant.quick:
        c.model = model_block("tiny", dtype="bfloat16", remat="selective", fp8=True)
        c.data.micro_batch = 0
        c.data.batch_ramp = ""
        c.mesh.update(dict(data=-1, expert=1, pipeline=1))
        c.data.seq_len = 128
        c.data.global_batch = 4
        c.train.steps = 20
        c.train.log_every = 5
        c.train.eval_every = 20
        c.train.checkpoint_every = 20
        c.optim.warmup_steps = 4
        for section, key in (("optim", "constant_until"), ("optim", "decay_until"),
                             ("optim", "tail1_until"), ("balance", "gamma_until"),
                             ("mtp", "lambda_switch")):   # the same shape, as fractions
            if c[section][key] > 1:
                c[section][key] /= TOTAL_TOKENS
        c.data.eval_batches = 1
    return c
