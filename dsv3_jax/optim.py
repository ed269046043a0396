"""Optimizer and the paper's schedules (report §4.2), as functions of the step.

The report states its boundaries in tokens; `train_state.BatchSchedule.step_at` turns a token
count into the first step that starts at or past it (batch-size ramp included), and these
functions take the resulting steps.

LR: linear warm-up (2K steps), constant 2.2e-4 until 10T tokens, cosine decay to 2.2e-5 until
14.3T, 2.2e-5 for 333B tokens, then 7.3e-6 (3.3% of peak) for the last 167B. MTP weight lambda:
0.3 until 10T tokens, then 0.1. Bias speed gamma: 0.001 until 14.3T, then 0.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def lr_schedule(peak: float, *, warmup_steps: int, constant_until: int, decay_until: int,
                tail1_until: int, final_frac: float = 0.1, tail1_frac: float = 0.1,
                tail2_frac: float = 0.033):
    """The report's shape, boundaries in steps: warm-up -> constant -> cosine to final_frac ->
    two constant tails. The cosine runs over steps, which is over tokens where the batch is
    constant (after the ramp, as in the report)."""
    if not 0 <= constant_until <= decay_until <= tail1_until:
        raise ValueError("lr schedule needs 0 <= constant_until <= decay_until <= tail1_until, "
                         f"got {constant_until}, {decay_until}, {tail1_until}")
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
    s_const = max(constant_until, warmup_steps)
    s_decay = max(decay_until, s_const)
    s_tail1 = max(tail1_until, s_decay)

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


def piecewise_constant(values: tuple[float, ...], boundaries: tuple[int, ...]):
    """values[i] on steps [boundaries[i-1], boundaries[i]) (len(values) = len(boundaries) + 1)."""
    if len(values) != len(boundaries) + 1:
        raise ValueError(f"need len(values) == len(boundaries) + 1, got {values}, {boundaries}")

    def schedule(step):
        out = jnp.asarray(values[0], jnp.float32)
        for s, v in zip(boundaries, values[1:]):
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
