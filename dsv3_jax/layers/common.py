"""Building blocks shared by every layer: RMSNorm, the Linear that every projection goes through,
SwiGLU, and RoPE with YaRN.

Shape letters used across `dsv3_jax` (einsum subscripts and name suffixes):
  B batch, T query positions, S key positions, D model width, H heads,
  K q/k no-rope head dim (qk_nope_head_dim), R rope head dim (qk_rope_head_dim),
  V value head dim, Q q-lora rank, C kv-lora rank, E routed experts, F expert/FFN width,
  N tokens (B*T flattened), P top-k slots per token, V (vocab, for the head).
"""
from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

from dsv3_jax.config import ModelConfig, yarn_get_mscale
from dsv3_jax.layers import tp


def dtype_of(name: str):
    return jnp.dtype(name)


def acc_dtype(cfg: ModelConfig):
    """Precision of norms, softmax, rope and gating: float32, or float64 in a float64 model."""
    return jnp.promote_types(dtype_of(cfg.dtype), jnp.float32)


def head_logits(h_XD: jax.Array, w_DV: jax.Array, dtype, acc=jnp.float32) -> jax.Array:
    """The output head, h . W, in `dtype` with `acc` accumulation; any leading shape. One 2-D
    GEMM: XLA:CPU's weight gradient of a 3-D x 2-D dot is ~2x slower."""
    logits = jnp.dot(h_XD.reshape(-1, h_XD.shape[-1]).astype(dtype), w_DV.astype(dtype),
                     preferred_element_type=acc)
    return logits.reshape(*h_XD.shape[:-1], -1)


def normal_init(cfg: ModelConfig):
    return nn.initializers.normal(stddev=cfg.initializer_range)


class RMSNorm(nn.Module):
    """RMSNorm in float32 (the report keeps normalisations in high precision)."""
    cfg: ModelConfig
    eps: float | None = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.cfg
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
                           (x.shape[-1],), dtype_of(cfg.param_dtype))
        x32 = x.astype(acc_dtype(cfg))
        var = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
        eps = cfg.rms_norm_eps if self.eps is None else self.eps
        scale = scale.astype(x32.dtype).reshape((1,) * (x.ndim - 1) + (-1,))
        y = x32 * jax.lax.rsqrt(var + eps) * scale
        # Not named: remat="selective" saves only named values (layers/block.py), so the norm
        # and its float32 intermediates are recomputed from its input in the backward pass.
        return y.astype(dtype_of(cfg.dtype))


def linear_dot(x: jax.Array, kernel: jax.Array, num_in: int, cfg: ModelConfig,
               fp8_cache: bool = True) -> jax.Array:
    """x[..., *in] @ kernel[*in, *out] as one 2-D GEMM; FP8 (cfg.fp8) or in the compute dtype.

    fp8_cache: with cfg.fp8 and cfg.fp8_cache_activations, x is kept for Wgrad as FP8 tiles."""
    in_shape, out_shape = kernel.shape[:num_in], kernel.shape[num_in:]
    if tuple(x.shape[x.ndim - num_in:]) != tuple(in_shape):
        raise ValueError(f"linear: input trailing dims {x.shape[x.ndim - num_in:]} != kernel "
                         f"input dims {in_shape}")
    lead = x.shape[:x.ndim - num_in]
    k_dim, n_dim = math.prod(in_shape), math.prod(out_shape)
    x2 = x.reshape(-1, k_dim)
    w2 = kernel.reshape(k_dim, n_dim)
    dtype = dtype_of(cfg.dtype)
    if cfg.fp8:
        from dsv3_jax import fp8  # the FP8 recipe; see fp8.py
        y = fp8.fp8_dot(x2.astype(dtype), w2, implementation=cfg.gemm_impl, out_dtype=dtype,
                        cache_x=fp8_cache and cfg.fp8_cache_activations)
    elif w2.dtype != dtype:
        y = _low_precision_dot(x2.astype(dtype), w2)
    else:
        y = jnp.dot(x2.astype(dtype), w2)
    return y.reshape(*lead, *out_shape)


@jax.custom_vjp
def _low_precision_dot(x_MK, w_KN):
    """x . w in x's (compute) dtype, with the weight gradient accumulated AND returned in w's
    (master) dtype. Autodiff of `x . w.astype(bf16)` would round dW to BF16 before it reaches the
    FP32 master weights, which costs accuracy (the report's BF16 baseline keeps FP32 dW)."""
    return jnp.dot(x_MK, w_KN.astype(x_MK.dtype))


def _low_precision_dot_fwd(x_MK, w_KN):
    w_c = w_KN.astype(x_MK.dtype)
    return jnp.dot(x_MK, w_c), (x_MK, w_c, jnp.zeros((0,), w_KN.dtype))


def _low_precision_dot_bwd(res, dy_MN):
    x_MK, w_c, w_dtype = res
    dx = jnp.dot(dy_MN, w_c.T)
    dw = jnp.dot(x_MK.T, dy_MN, preferred_element_type=jnp.float32).astype(w_dtype.dtype)
    return dx, dw


_low_precision_dot.defvjp(_low_precision_dot_fwd, _low_precision_dot_bwd)


class Linear(nn.Module):
    """A bias-free projection whose kernel keeps its logical axis names (in..., out...)."""
    cfg: ModelConfig
    features: tuple[int, ...]
    axes: tuple[str, ...]
    num_in: int = 1
    init_std: float | None = None
    fp8_cache: bool = True      # FP8: keep the input for Wgrad as FP8 tiles (see linear_dot)

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        in_shape = tuple(x.shape[x.ndim - self.num_in:])
        shape = in_shape + tuple(self.features)
        if len(self.axes) != len(shape):
            raise ValueError(f"Linear {self.name}: {len(self.axes)} axis names for shape {shape}")
        init = (normal_init(self.cfg) if self.init_std is None
                else nn.initializers.normal(stddev=self.init_std))
        kernel = self.param("kernel", nn.with_logical_partitioning(init, self.axes), shape,
                            dtype_of(self.cfg.param_dtype))
        # tensor parallelism with `tensor` manual (the pipeline's stages): the collectives of a
        # column- or row-parallel Linear (dsv3_jax/layers/tp.py); no-ops otherwise
        ins = self.axes[:self.num_in]
        x = tp.enter(x, ins, self.axes[self.num_in:])
        if not deferring(self):
            return tp.leave(linear_dot(x, kernel, self.num_in, self.cfg, self.fp8_cache), ins)
        # Weight gradient deferred (see deferred_weight_grads): keep the input, give the kernel
        # no gradient here, and add a zero tap to the output whose cotangent is dy.
        lead = x.shape[:x.ndim - self.num_in]
        x2 = x.reshape(-1, math.prod(in_shape))
        self.put_variable(WGRAD_INPUTS, "x" if self.fp8_cache else "x_uncached", x2)
        y2 = linear_dot(x2, jax.lax.stop_gradient(kernel).reshape(x2.shape[1], -1), 1,
                        self.cfg, self.fp8_cache)
        y2 = self.perturb("dy", y2, collection=WGRAD_TAPS)   # before the row-parallel sum
        return tp.leave(y2, ins).reshape(*lead, *self.features)


# ----------------------------------------------------------------------------------------------
# Deferred weight gradients: the pipeline's per-Linear W (DeepSeek's WeightGradStore)
# ----------------------------------------------------------------------------------------------
# A zero-bubble schedule splits a stage's backward into B (the input gradient, which the previous
# stage waits for) and W (the weight gradients, which nothing waits for). A VJP for the weights
# alone would still run the input-gradient chain, so W is split per Linear instead: applied with
# WGRAD_INPUTS mutable and zeros in WGRAD_TAPS, every Linear keeps its input x [M, K] and adds the
# tap to its output [M, N]; the VJP with respect to the stage input and the taps (B) is then the
# input gradient plus each Linear's output gradient dy (the taps' cotangents) and the gradients of
# every parameter that is not a Linear kernel (norms, router, routed experts); W is
# dW = x^T dy of each Linear (`deferred_weight_grads`), computed by that Linear's own VJP, so FP8
# Wgrad quantizes exactly as in one backward pass.
WGRAD_INPUTS = "wgrad_inputs"
WGRAD_TAPS = "wgrad_taps"


def deferring(module: nn.Module) -> bool:
    """Whether `module` defers its weight gradients: applied (not initialised) with
    WGRAD_INPUTS mutable."""
    return module.is_mutable_collection(WGRAD_INPUTS) and not module.is_initializing()


def deferred_weight_grads(params: dict, inputs: dict, dys: dict, cfg: ModelConfig) -> dict:
    """The deferred weight gradients (float32), in the tree of `params`: zeros except at the
    Linears of `inputs` (WGRAD_INPUTS: {"x" or "x_uncached": [L..., M, K]}) and `dys` (the
    WGRAD_TAPS cotangents: {"dy": [L..., M, N]}), and at the routed experts whose grouped SwiGLU
    deferred them (moe.sorted_experts: {"x", "gu", "tile_expert", "used"} and {"dgu", "dy"};
    under a mesh, moe_ep.expert_parallel's per-device stores, used [devices]); L... the stacked
    layer axes."""
    from dsv3_jax.layers import moe, moe_ep

    def experts(p, xs, ds):   # one layer's routed experts
        weights = (p["gate"], p["up"], p["down"])
        if xs["used"].ndim == 1:   # expert-parallel: each device's received rows
            dw = moe_ep.expert_parallel_wgrad(weights, xs, ds, cfg, jax.sharding.get_abstract_mesh())
        else:
            dw = moe.experts_wgrad(weights, xs["x"], xs["gu"], ds["dgu"], ds["dy"],
                                   xs["tile_expert"], xs["used"], cfg)
        return dict(zip(("gate", "up", "down"), dw))

    def linear(p, xs, ds):   # one layer's Linear
        (name, x), = xs.items()
        w2 = p["kernel"].reshape(x.shape[-1], ds["dy"].shape[-1])
        _, vjp = jax.vjp(lambda w: linear_dot(x, w, 1, cfg, name == "x"), w2)
        return {"kernel": vjp(ds["dy"])[0].reshape(p["kernel"].shape).astype(jnp.float32)}

    def per_layer(fn, p, xs, ds):   # layer by layer over the stacked axes, as the backward runs
        if xs["x" if "x" in xs else "x_uncached"].ndim == 2:
            return fn(p, xs, ds)
        return jax.lax.map(lambda a: per_layer(fn, *a), (p, xs, ds))

    def walk(p, xs, ds):
        if not isinstance(p, dict):
            return jnp.zeros(p.shape, jnp.float32)
        if isinstance(ds, dict) and "dgu" in ds:
            return per_layer(experts, p, xs, ds)
        if isinstance(ds, dict) and "dy" in ds:
            return per_layer(linear, p, xs, ds)
        return {k: walk(v, (xs or {}).get(k), (ds or {}).get(k)) for k, v in p.items()}
    return walk(params, inputs, dys)


class SwiGLU(nn.Module):
    """Dense FFN: down(silu(gate(x)) * up(x)); used for the dense layers and the shared experts."""
    cfg: ModelConfig
    width: int
    width_axis: str = "mlp"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.cfg
        # gate and up are saved by remat="selective"; silu(gate) * up is recomputed from them
        gate = checkpoint_name(Linear(cfg, (self.width,), ("embed", self.width_axis),
                                      name="gate")(x), "ffn_gate_up")
        up = checkpoint_name(Linear(cfg, (self.width,), ("embed", self.width_axis),
                                    name="up")(x), "ffn_gate_up")
        h = nn.silu(gate) * up
        return Linear(cfg, (x.shape[-1],), (self.width_axis, "embed"), name="down")(h)


# ----------------------------------------------------------------------------------------------
# RoPE with YaRN
# ----------------------------------------------------------------------------------------------

def rope_inv_freq(cfg: ModelConfig) -> tuple[np.ndarray, float]:
    """Inverse frequencies [R/2] and the cos/sin amplitude factor (YaRN's attention_factor).

    YaRN (spec §1.3): f'_j = f_j (1 - ramp_j) + (f_j / s) ramp_j with a linear ramp between the
    correction dims of beta_fast and beta_slow over original_max_position_embeddings.
    """
    dim = cfg.qk_rope_head_dim
    base = cfg.rope_theta
    # float32 like the reference implementations (positions up to 163840 keep ~1e-3 rad error).
    freq = 1.0 / (base ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
    if not cfg.yarn:
        return freq.astype(np.float32), 1.0
    rs = cfg.rope_scaling
    factor = rs["factor"]
    l0 = rs["original_max_position_embeddings"]

    def correction_dim(rotations):
        return dim * math.log(l0 / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(rs["beta_fast"]), correction_dim(rs["beta_slow"])
    if rs["truncate"]:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = np.clip((np.arange(dim // 2, dtype=np.float64) - low) / (high - low), 0.0, 1.0)
    freq = freq * (1.0 - ramp) + (freq / factor) * ramp
    attention_factor = rs["attention_factor"]
    if attention_factor is None:
        if rs["mscale"] and rs["mscale_all_dim"]:
            attention_factor = (yarn_get_mscale(factor, rs["mscale"])
                                / yarn_get_mscale(factor, rs["mscale_all_dim"]))
        else:
            attention_factor = yarn_get_mscale(factor)
    return freq.astype(np.float32), float(attention_factor)


def rope_cos_sin(cfg: ModelConfig, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
    """cos, sin of shape [..., R/2] (float32, or float64 in a float64 model) for positions [...]."""
    inv_freq, amp = rope_inv_freq(cfg)
    dt = acc_dtype(cfg)
    inv_freq = jnp.asarray(inv_freq, dt).reshape((1,) * positions.ndim + (-1,))
    angles = positions.astype(dt)[..., None] * inv_freq
    return jnp.cos(angles) * amp, jnp.sin(angles) * amp


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array, interleave: bool) -> jax.Array:
    """Rotates x [..., R] by cos/sin [..., R/2] (broadcast over heads by the caller).

    interleave=True rotates adjacent pairs (x0,x1),(x2,x3)... as the released weights expect;
    False rotates the two halves. The output is laid out as [rotated evens | rotated odds] in the
    interleaved case (Hugging Face's layout): queries and keys share it, so scores are unchanged.
    """
    x32 = x.astype(jnp.promote_types(x.dtype, cos.dtype))
    if interleave:
        x1, x2 = x32[..., 0::2], x32[..., 1::2]
    else:
        half = x.shape[-1] // 2
        x1, x2 = x32[..., :half], x32[..., half:]
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)
