"""Text generation. This first version recomputes the full forward over a fixed-length buffer per
token (one compile, O(T^2) work): simple and exact, used for the trainer's end-of-run sample.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from dsv3_jax import model
from dsv3_jax.config import ModelConfig


@functools.partial(jax.jit, static_argnums=(0,))
def _next_token_logits(cfg: ModelConfig, variables, buf_BT, length):
    out = model.forward(cfg, variables, buf_BT, with_mtp=False)
    return jax.lax.dynamic_index_in_dim(out.logits, length - 1, axis=1, keepdims=False)


def greedy_generate(cfg: ModelConfig, variables, prompt_ids: list[int], max_new_tokens: int,
                    eos_id: int | None = None) -> list[int]:
    """Greedy continuation of one prompt; stops at eos_id or after max_new_tokens."""
    if not prompt_ids:
        raise ValueError("prompt_ids must not be empty")
    total = len(prompt_ids) + max_new_tokens
    buf = np.zeros((1, total), np.int32)
    buf[0, :len(prompt_ids)] = prompt_ids
    out = []
    for n in range(len(prompt_ids), total):
        logits = _next_token_logits(cfg, variables, jnp.asarray(buf), n)
        tok = int(jnp.argmax(logits[0]))
        if eos_id is not None and tok == eos_id:
            break
        buf[0, n] = tok
        out.append(tok)
    return out
