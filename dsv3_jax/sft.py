"""Supervised fine-tuning (report §5.1): chat conversations, loss on assistant tokens only, samples
packed with cross-sample masking, cosine LR, a number of epochs; from a pre-trained checkpoint.

  python -m dsv3_jax.sft --config experiments/configs/sft_tiny.py \
      --config.train.init_from=runs/tiny --workdir runs/sft

SFT is the trainer (`train.run`) with another data stage: the loss is the `next_token`
objective (masked next-token CE; the mask is 1 on assistant tokens, `chat.render`), so there is
no SFT objective module. Conversations come from config.sft.train_jsonl / val_jsonl, or, when
those are empty, from the generated `arithmetic` task. train.steps is set from sft.epochs.
A checkpoint with the pre-training vocabulary (8192) is grown to the chat vocabulary first
(`chat.resize_vocab`, written once to workdir/init_vocab<V>).
"""
from __future__ import annotations

import math
import os
import sys

import jax
import numpy as np

from dsv3_jax import arithmetic, chat, errors, sharding, train
from dsv3_jax import train_state as ts
from dsv3_jax.config import ConfigError


class RowBatches:
    """Micro-batches of packed rows, reshuffled every epoch from `seed`; state = micro index."""

    def __init__(self, rows: dict, micro_batch: int, seed: int):
        self.rows, self.mb, self.seed = rows, micro_batch, seed
        self.n = len(rows["inputs"])
        self.step = 0

    def batch(self, i: int) -> dict:
        g = i * self.mb + np.arange(self.mb)
        epoch, k = g // self.n, g % self.n
        idx = np.array([np.random.default_rng([self.seed, int(e)]).permutation(self.n)[j]
                        for e, j in zip(epoch, k)])
        return {key: v[idx] for key, v in self.rows.items()}

    def get_state(self) -> dict:
        return {"step": self.step, "seed": self.seed, "rows": self.n}

    def set_state(self, state: dict) -> None:
        if state.get("seed", self.seed) != self.seed or state.get("rows", self.n) != self.n:
            raise errors.UserError(f"the checkpoint's SFT data ({state}) is not this run's "
                                   f"(seed {self.seed}, {self.n} rows): use another --workdir")
        self.step = int(state["step"])


def conversations(c, split: str) -> list[list[dict]]:
    path = c.sft.train_jsonl if split == "train" else c.sft.val_jsonl
    if path:
        return chat.read_jsonl(path)
    if c.sft.task != "arithmetic":
        raise ConfigError(f"sft.task: {c.sft.task!r} is not a built-in task (arithmetic); "
                          "or give sft.train_jsonl / sft.val_jsonl")
    if c.sft.lengths not in arithmetic.LENGTHS:
        raise ConfigError(f"sft.lengths must be one of {arithmetic.LENGTHS}, got "
                          f"{c.sft.lengths!r}")
    n = c.sft.num_train if split == "train" else c.sft.num_val
    # validation = other training-split problems (evaluation's held-out problems stay unseen),
    # drawn as evaluation draws them (sft.lengths shapes the training problems only)
    seed = c.sft.seed if split == "train" else c.sft.seed + 10_000
    lengths = c.sft.lengths if split == "train" else "uniform"
    return arithmetic.conversations(arithmetic.problems(seed, n, "train", lengths))


def packed(c, tok, split: str) -> dict:
    samples = [chat.render(tok, conv) for conv in conversations(c, split)]
    return chat.pack(samples, c.data.seq_len)


def make_data_fn(c, tok, train_rows: dict, val_rows: dict):
    def data_fn(s: train.Setup) -> train.Data:
        schedule = ts.BatchSchedule(c.data.global_batch, c.data.micro_batch, "", c.train.steps)
        gb = c.data.global_batch
        n_val = -(-len(val_rows["inputs"]) // gb) * gb
        pad = {k: np.concatenate([v, np.zeros((n_val - len(v),) + v.shape[1:], v.dtype)])
               for k, v in val_rows.items()}
        row_sharding = s.sharding(sharding.batch_spec(2))
        val = [train.to_global({k: v[i:i + gb] for k, v in pad.items()}, row_sharding, 0)
               for i in range(0, n_val, gb)]
        targets = train_rows["targets"][train_rows["loss_mask"] > 0]
        counts = np.bincount(targets, minlength=tok.get_vocab_size()).astype(np.float64)
        p = counts[counts > 0] / counts.sum()
        info = {"vocab_size": tok.get_vocab_size(), "train_rows": len(train_rows["inputs"]),
                "train_tokens": int(train_rows["loss_mask"].sum()),
                "val_tokens": int(val_rows["loss_mask"].sum()),
                "unigram_entropy": float(-(p * np.log(p)).sum()), "sft": True,
                "chat_digits": chat.digits_of(tok)}
        if info["vocab_size"] > s.cfg.vocab_size:
            raise ConfigError(f"the chat tokenizer has {info['vocab_size']} tokens but "
                              f"model.vocab_size is {s.cfg.vocab_size}")
        s.log(f"sft data: {info['train_rows']} rows of {c.data.seq_len} tokens, "
              f"{info['train_tokens']:,} assistant tokens; {info['val_tokens']:,} validation")
        return train.Data(schedule, RowBatches(train_rows, schedule.micro_batch, c.data.seed),
                          val, tok, info, micro_sharding=s.sharding(sharding.batch_spec(3, lead=1)),
                          row_sharding=row_sharding,   # the sample asks through the chat template
                          sample_prompt=(chat.prompt_ids(tok, c.train.sample_prompt), chat.END_ID))
    return data_fn


def grow_init_from(c, workdir: str) -> None:
    """Point train.init_from at a copy with the chat vocabulary, if it has fewer tokens."""
    from dsv3_jax import ckpt
    if not c.train.init_from:
        return
    tag = "_place" if c.sft.digits == "place" else ""   # place-value digits start from digits
    out = os.path.join(os.path.abspath(workdir), f"init_vocab{c.model.vocab_size}{tag}")
    if not os.path.isdir(out):
        cfg, variables = ckpt.load_variables(os.path.expanduser(c.train.init_from))
        if cfg.vocab_size >= c.model.vocab_size:
            return
        variables = chat.resize_vocab(jax.tree.map(np.asarray, variables), c.model.vocab_size,
                                      chat.new_token_rows(c.sft.digits))
        cfg = type(cfg).from_dict(dict(cfg.to_dict(), vocab_size=c.model.vocab_size))
        ckpt.save_orbax(cfg, variables, out)
    c.train.init_from = out


def run(c, workdir: str) -> dict:
    tok = chat.chat_tokenizer(digits=c.sft.digits)
    train_rows, val_rows = packed(c, tok, "train"), packed(c, tok, "val")
    if c.sft.epochs > 0:    # the run's length in epochs of packed rows
        c.train.steps = max(1, math.ceil(c.sft.epochs * len(train_rows["inputs"]) /
                                         c.data.global_batch))
    os.makedirs(workdir, exist_ok=True)
    grow_init_from(c, workdir)
    return train.run(c, workdir, data_fn=make_data_fn(c, tok, train_rows, val_rows))


main = train.cli_main(run)


if __name__ == "__main__":
    sys.exit(main())
