"""SFT of the tiny model on the arithmetic task (dsv3_jax.sft):

  python -m dsv3_jax.sft --config experiments/configs/sft_tiny.py \
      --config.train.init_from=runs/tiny --workdir runs/sft_tiny

The report's recipe (§5.1): 2 epochs, cosine LR 5e-6 -> 1e-6 (final_frac 0.2), sample masking.
The peak LR is the tiny model's (a 12M model learning a new format in minutes), not 671B's.
sft.digits: "split" (one token per digit, most significant first, as the release's tokenizer)
or "reversed" (least significant first in token space; `dsv3_jax.chat.ReversedDigits`) or
"place" (least significant first, one token per digit and place; `dsv3_jax.chat.PlaceDigits`).
sft.lengths: "uniform" (operands uniform in 0..999, as evaluated) or "balanced" (each operand's
digit count uniform in 1..3; `dsv3_jax.arithmetic.problems`), for the training problems.
`:quick` is a smoke run.
"""
import ml_collections

from dsv3_jax.train_config import base_config, model_block, parse_arg


def sft_block(**kw):
    d = dict(task="arithmetic", train_jsonl="", val_jsonl="", num_train=8000, num_val=256,
             epochs=2.0, seed=1, digits="place", lengths="balanced")
    d.update(kw)
    return ml_collections.ConfigDict(d)


def get_config(arg=None):
    variant = parse_arg(arg, config="sft_tiny.py", quick=False)
    c = base_config()
    c.model = model_block("tiny", vocab_size=8256, scan_unroll=4, attn_causal_blocks=4)
    c.sft = sft_block()
    c.train.objective = "next_token"
    c.train.sample_prompt = "What is 12 + 34?"
    c.train.sample_tokens = 8
    c.train.eval_every = 100
    c.train.checkpoint_every = 100
    c.train.log_every = 10
    c.data.seq_len = 128
    c.data.global_batch = 16
    c.data.eval_batches = 1
    c.optim.peak_lr = 1e-3
    c.optim.warmup_steps = 10
    c.optim.constant_until = 0.0
    c.optim.decay_until = 1.0
    c.optim.tail1_until = 1.0
    c.optim.final_frac = 0.2
    c.balance.alpha = 0.0
    if variant.quick:
        c.sft.num_train, c.sft.num_val, c.sft.epochs = 64, 16, 1.0
        c.train.eval_every = c.train.checkpoint_every = 1000
        c.train.log_every = 2
        c.optim.warmup_steps = 1
    return c
