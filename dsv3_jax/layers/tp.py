"""Tensor parallelism written out (Megatron-style), for code that runs with `tensor` manual.

Under GSPMD (the default) the `tensor` axis needs nothing here: the rules table shards heads and
FFN widths over it and XLA inserts the collectives. Inside the pipeline executor's shard_map,
`tensor` is a manual axis instead (XLA's SPMD partitioner aborts on tensor-sharded weights in a
partially manual shard_map, jax 0.10.2), so each device holds its slice of every split weight
and runs the model with a config of local widths (`local_config`), and the collectives are
explicit. Where they go follows from the Linears' logical axes (`Linear` calls `enter`/`leave`):

  column-parallel (an output axis split, no input axis): x = copy(x)   forward id, backward psum
  row-parallel    (an input axis split):                 y = reduce(y) forward psum, backward id

so every value outside the split section is replicated and its cotangent is the full one, the
two ops' VJPs summing the partial input gradients and nothing else. Besides the Linears: MLA's
shared rope key enters the per-head attention (copy), and the routed experts take the dispatched
tokens and their gates (copy) and return the combined output (reduce). The vocabulary is split
too (Megatron's vocab-parallel embedding and cross-entropy): a device looks up the ids in its
rows of the embedding (zeros elsewhere, summed), and the head's logits stay split: the
log-sum-exp and the target's logit are gathered over `tensor` (`vocab_lse`, `vocab_pick`), never
the [tokens, V] logits.
"""
from __future__ import annotations

import contextlib
import dataclasses

import jax
import jax.numpy as jnp

AXIS = "tensor"
SPLIT = ("heads", "mlp", "moe_mlp", "vocab")   # the logical axes split over `tensor` in stages
_ACTIVE = False                              # set by `manual()` while tracing


@contextlib.contextmanager
def manual():
    """While tracing inside (a shard_map manual over `tensor`), the model's split sections run
    their collectives explicitly."""
    global _ACTIVE
    old, _ACTIVE = _ACTIVE, True
    try:
        yield
    finally:
        _ACTIVE = old


def active() -> bool:
    return _ACTIVE


def _sum(x):
    """psum over `tensor` in float32 (or wider), rounded back to x's dtype once after the sum.
    (A BF16 all-reduce in a partially manual shard_map also aborts XLA:CPU, jax 0.10.2:
    "Invalid binary instruction opcode copy".)"""
    acc = jnp.promote_types(x.dtype, jnp.float32)
    return jax.lax.psum(x.astype(acc), AXIS).astype(x.dtype)


@jax.custom_vjp
def copy(x):
    """Identity; the backward sums the partial cotangents over `tensor` (Megatron's f)."""
    return x


copy.defvjp(lambda x: (x, None), lambda _, g: (_sum(g),))


@jax.custom_vjp
def reduce(x):
    """The sum over `tensor` of each device's partial output; the backward is the identity
    (the output's cotangent is replicated, and each device's partial output got it whole)."""
    return _sum(x)


reduce.defvjp(lambda x: (_sum(x), None), lambda _, g: (g,))


def splits(names) -> bool:
    return any(n in SPLIT for n in names)


def enter(x, in_names, out_names):
    """A Linear's input: copied in where the Linear is column-parallel."""
    return copy(x) if _ACTIVE and splits(out_names) and not splits(in_names) else x


def leave(y, in_names):
    """A Linear's output: summed where the Linear is row-parallel."""
    return reduce(y) if _ACTIVE and splits(in_names) else y


def maybe_copy(x):
    return copy(x) if _ACTIVE else x


def manual_specs(specs, lead: tuple = (), drop: int = 0):
    """A shard_map's in/out specs for a tree of mesh specs: only the dims split over `tensor`
    (the other axes stay automatic), after `lead` entries, the first `drop` entries replaced."""
    from jax.sharding import PartitionSpec as P
    axes = lambda e: () if e is None else (e,) if isinstance(e, str) else tuple(e)
    one = lambda sp: P(*lead, *[AXIS if AXIS in axes(e) else None for e in tuple(sp)[drop:]])
    return jax.tree.map(one, specs, is_leaf=lambda x: isinstance(x, P))


# ---- the vocabulary split over `tensor` (embedding rows, head columns) ----------------------

def vocab_slice(ids, local_vocab: int):
    """(ids - this device's first row, whether the id is in its slice) of a vocab-split table."""
    local = ids - jax.lax.axis_index(AXIS) * local_vocab
    return local, (local >= 0) & (local < local_vocab)


def vocab_lse(logits):
    """log-sum-exp over the whole vocabulary of vocab-split logits [..., V/T] (float32): the
    max and the sum of exponentials gathered over `tensor`. Differentiable (the sum leaves
    through `reduce`, whose backward gives each slice the whole cotangent)."""
    m = jax.lax.pmax(jax.lax.stop_gradient(logits.max(-1)), AXIS)
    return m + jnp.log(reduce(jnp.exp(logits - m[..., None]).sum(-1)))


def vocab_pick(logits, targets):
    """logits[..., target] of vocab-split logits: the device holding the target's column gives
    it, the others 0, summed over `tensor`."""
    local, ok = vocab_slice(targets, logits.shape[-1])
    pick = jnp.take_along_axis(logits, jnp.clip(local, 0, logits.shape[-1] - 1)[..., None],
                               -1)[..., 0]
    return reduce(jnp.where(ok, pick, 0.0))


def widths(cfg) -> dict[str, int]:
    """The config fields split over `tensor` (each must divide by its size)."""
    return {"num_attention_heads": cfg.num_attention_heads,
            "intermediate_size": cfg.intermediate_size,
            "moe_intermediate_size": cfg.moe_intermediate_size,
            "vocab_size": cfg.vocab_size}


def problems(cfg, ways: int) -> list[str]:
    """Why the model cannot be split `ways` ways over `tensor` inside the pipeline's stages."""
    out = [f"{k}={v} is not divisible by mesh.tensor={ways}"
           for k, v in widths(cfg).items() if v % ways]
    if cfg.fp8 and not out:
        # each device's slice of a split GEMM dim must be whole FP8 tiles (1x128 activations,
        # 128x128 weight blocks): a tile across two devices would be quantized as two padded
        # ones, not as the unsplit model's recipe
        h = cfg.num_attention_heads // ways
        local = {"the query up-projection's heads x qk_head_dim": h * cfg.qk_head_dim,
                 "kv_b's heads x (qk_nope_head_dim + v_head_dim)":
                     h * (cfg.qk_nope_head_dim + cfg.v_head_dim),
                 "the output projection's heads x v_head_dim": h * cfg.v_head_dim,
                 "intermediate_size": cfg.intermediate_size // ways,
                 "moe_intermediate_size": cfg.moe_intermediate_size // ways}
        out += [f"FP8 with mesh.tensor={ways}: {k} per device is {v}, not a multiple of 128 "
                "(the FP8 tile)" for k, v in local.items() if v % 128]
    return out


def local_config(cfg, ways: int, fp8_tiles: bool = True):
    """cfg with the split widths divided by `ways` (the shapes one device's slice has);
    fp8_tiles=False skips the FP8 tile check (for planning)."""
    if ways == 1:
        return cfg
    bad = problems(cfg.replace(fp8=cfg.fp8 and fp8_tiles), ways)
    if bad:
        raise ValueError("; ".join(bad))
    local = {k: v // ways for k, v in widths(cfg).items()}
    return dataclasses.replace(cfg, num_key_value_heads=local["num_attention_heads"], **local)
