"""The default run: the `tiny` preset on the embedded corpus (CPython's standard library sources).

  python -m dsv3_jax.train                                   # = --config experiments/configs/tiny.py
  python -m dsv3_jax.train --config experiments/configs/tiny.py:quick --workdir runs/smoke

Expect (2 CPU cores): ~8 minutes, final validation loss well below the corpus's unigram entropy.
`:quick` is a 30-step smoke run.
"""
from dsv3_jax.train_config import base_config, model_block, parse_arg


def get_config(arg=None):
    variant = parse_arg(arg, config="tiny.py", quick=False)
    c = base_config()
    # Packed documents masked from each other: not the report's pre-training choice, kept so the
    # main job's figures stay comparable (the validation rows are packed the same way) and
    # because at 256-token rows a row's tokens mostly come from one ~3.9K-token stdlib file.
    c.data.document_masking = True
    # CPU speed knobs (no effect on the numbers): the 4 layers unrolled, 4 causal query blocks
    c.model = model_block("tiny", scan_unroll=4, attn_causal_blocks=4)
    if variant.quick:
        c.train.steps = 30
        c.train.log_every = 5
        c.train.eval_every = 15
        c.train.checkpoint_every = 15
        c.data.eval_batches = 2
        c.optim.warmup_steps = 5
        c.train.sample_tokens = 8
    return c


def sweep(add):
    """The MTP ablation at tiny scale (report §4.5.1, in direction)."""
    for depth in (0, 1):
        add(**{"model.num_nextn_predict_layers": depth})
