"""Optimizer and the paper's schedules (spec §7), all expressed in fractions of the run.

LR (report §4.2): linear warm-up, constant, cosine decay to 10% of peak, then two constant tails
(2.2e-5 = 10% of 2.2e-4, and 7.3e-6 = 3.3%). With 14.8T tokens: constant until 10T (0.676),
cosine until 14.3T (0.966), first tail until 14.633T (0.989), second tail to the end.
MTP weight lambda: 0.3 until 10T tokens (0.676), then 0.1. Bias speed gamma: 0.001 until 14.3T
(0.966), then 0.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def _frac_step(frac: float, total_steps: int) -> int:
    return int(round(frac * total_steps))


def lr_schedule(peak: float, total_steps: int, *, warmup_steps: int, constant_until: float,
                decay_until: float, tail1_until: float, final_frac: float = 0.1,
                tail1_frac: float = 0.1, tail2_frac: float = 0.033):
    """The report's shape: warm-up -> constant -> cosine to final_frac -> two constant tails."""
    if not 0 <= constant_until <= decay_until <= tail1_until <= 1:
        raise ValueError("lr schedule needs 0 <= constant_until <= decay_until <= tail1_until <= 1, "
                         f"got {constant_until}, {decay_until}, {tail1_until}")
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
    s_const = max(_frac_step(constant_until, total_steps), warmup_steps)
    s_decay = max(_frac_step(decay_until, total_steps), s_const)
    s_tail1 = max(_frac_step(tail1_until, total_steps), s_decay)

    def schedule(step):
        step = jnp.asarray(step, jnp.float32)
        warm = peak * (step + 1) / max(warmup_steps, 1)
        progress = jnp.clip((step - s_const) / max(s_decay - s_const, 1), 0.0, 1.0)
        cosine = peak * (final_frac + (1 - final_frac) * 0.5 * (1 + jnp.cos(jnp.pi * progress)))
        lr = jnp.where(step < warmup_steps, warm, peak)
        lr = jnp.where(step >= s_const, cosine, lr)
        lr = jnp.where(step >= s_decay, peak * tail1_frac, lr)
        return jnp.where(step >= s_tail1, peak * tail2_frac, lr)

    return schedule


def piecewise_constant(values: tuple[float, ...], boundaries: tuple[float, ...], total_steps: int):
    """values[i] on [boundaries[i-1], boundaries[i]) in fractions of the run (len(values) = len(b)+1)."""
    if len(values) != len(boundaries) + 1:
        raise ValueError(f"need len(values) == len(boundaries) + 1, got {values}, {boundaries}")
    steps = [_frac_step(b, total_steps) for b in boundaries]

    def schedule(step):
        out = jnp.asarray(values[0], jnp.float32)
        for s, v in zip(steps, values[1:]):
            out = jnp.where(step >= s, v, out)
        return out

    return schedule


def decay_mask(params):
    """Weight decay on weight matrices only: none on norm scales (stacked layers make those
    2-D, so decide by name) or biases (the model has none; the router bias is not a param)."""
    def decays(path, p):
        name = getattr(path[-1], "key", str(path[-1]))
        return p.ndim > 1 and name not in ("scale", "bias")
    return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(schedule, *, b1: float = 0.9, b2: float = 0.95, weight_decay: float = 0.1,
                   clip_norm: float = 1.0, eps: float = 1e-8, moments_dtype: str | None = None):
    """AdamW with global-norm clipping; moments optionally in bfloat16 (master weights f32)."""
    mu_dtype = None if moments_dtype in (None, "float32") else jnp.dtype(moments_dtype)
    return optax.chain(
        optax.clip_by_global_norm(clip_norm),
        _adamw(schedule, b1, b2, eps, weight_decay, mu_dtype),
    )


def _adamw(lr, b1, b2, eps, weight_decay, moments_dtype):
    """optax.adamw keeps nu in f32 whatever mu_dtype says; the report keeps both moments in BF16."""
    return optax.chain(
        _scale_by_adam_lowp(b1, b2, eps, moments_dtype),
        optax.add_decayed_weights(weight_decay, mask=decay_mask),
        optax.scale_by_learning_rate(lr),
    )


def _scale_by_adam_lowp(b1, b2, eps, dtype):
    if dtype is None:
        return optax.scale_by_adam(b1=b1, b2=b2, eps=eps)

    def init(params):
        zeros = lambda p: jnp.zeros(p.shape, dtype)
        return optax.ScaleByAdamState(count=jnp.zeros([], jnp.int32),
                                      mu=jax.tree.map(zeros, params),
                                      nu=jax.tree.map(zeros, params))

    def update(updates, state, params=None):
        count = optax.safe_increment(state.count)
        mu = jax.tree.map(lambda m, g: (b1 * m.astype(jnp.float32) + (1 - b1) * g), state.mu, updates)
        nu = jax.tree.map(lambda v, g: (b2 * v.astype(jnp.float32) + (1 - b2) * g * g), state.nu,
                          updates)
        c = count.astype(jnp.float32)
        out = jax.tree.map(lambda m, v: (m / (1 - b1 ** c)) / (jnp.sqrt(v / (1 - b2 ** c)) + eps),
                           mu, nu)
        cast = lambda t: jax.tree.map(lambda x: x.astype(dtype), t)
        return out, optax.ScaleByAdamState(count=count, mu=cast(mu), nu=cast(nu))

    return optax.GradientTransformation(init, update)
