"""Pieces every experiment config shares: the model block from a preset, and the defaults."""
import dataclasses

import ml_collections

from dsv3_jax import config as model_config


def model_block(preset: str, **overrides) -> ml_collections.ConfigDict:
    """Every ModelConfig field of the preset, so any can be overridden from the command line."""
    fields = dataclasses.asdict(model_config.preset(preset, **overrides))
    fields["preset"] = preset
    return ml_collections.ConfigDict(fields, type_safe=False)


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.data = ml_collections.ConfigDict(dict(
        seq_len=256,              # tokens per packed row
        global_batch=8,           # rows per optimizer step, all processes together
        micro_batch=0,            # rows per forward/backward (gradient accumulation); 0 = global
        batch_ramp="",            # e.g. "0:2,0.05:4,0.1:8": rows from that fraction of the run on
        seed=0,                   # shuffling of documents (per epoch)
        data_dir="",              # TFDS data dir; "" = $DSV3_DATA_DIR or ~/.cache/dsv3_jax/tfds
        eval_batches=8,           # validation batches per evaluation
    ))
    c.train = ml_collections.ConfigDict(dict(
        steps=600,                # optimizer steps of the run
        seed=0,                   # parameter init and the state RNG
        log_every=10,             # steps between metric logs (the only host syncs)
        eval_every=200,           # steps between validation loss / global MaxVio
        checkpoint_every=200,     # steps between checkpoints (and one at the end)
        keep_checkpoints=3,       # checkpoints kept in workdir/checkpoints
        async_checkpoint=True,    # orbax writes in the background
        ema_decay=0.0,            # parameter EMA (0 = off), e.g. 0.999
        ce_chunk=64,              # head + CE fused over this many positions (0 = full logits)
        peak_tflops=0.4,          # per-device peak for MFU (2 CPU cores ~0.4; H200 bf16 ~990)
        sample_prompt="def ",     # greedy sample printed at the end
        sample_tokens=48,
    ))
    c.optim = ml_collections.ConfigDict(dict(
        peak_lr=3e-3,             # report: 2.2e-4 at 671B scale
        warmup_steps=50,          # report: 2K steps
        constant_until=0.676,     # fraction of the run (report: 10T of 14.8T tokens)
        decay_until=0.966,        # cosine to 10% of peak until here (14.3T)
        tail1_until=0.989,        # 10% of peak until here (333B tokens), then 3.3% (7.3e-6)
        b1=0.9, b2=0.95, eps=1e-8,
        weight_decay=0.1,         # not applied to norm scales
        clip_norm=1.0,            # global gradient norm clipping
        moments_dtype="float32",  # "bfloat16" as in the report
    ))
    c.balance = ml_collections.ConfigDict(dict(
        gamma=0.001,              # aux-loss-free bias speed
        gamma_until=0.966,        # then 0 (report: after 14.3T tokens)
        alpha=1e-4,               # sequence-wise balance loss weight
    ))
    c.mtp = ml_collections.ConfigDict(dict(
        lambda_start=0.3,         # MTP loss weight ...
        lambda_end=0.1,           # ... and after the switch
        lambda_switch=0.676,      # fraction of the run (report: 10T of 14.8T)
    ))
    c.mesh = ml_collections.ConfigDict(dict(
        data=-1,                  # pure data parallel (-1: all devices left over)
        fsdp=1,                   # data parallel with params sharded along `embed`
        expert=1,                 # expert parallel (routed experts split; batch split too)
        pipeline=1,               # layers (schedules: not yet supported, must be 1)
        tensor=1,                 # heads and FFN widths
    ))
    return c
