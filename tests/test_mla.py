"""MLA against a float64 NumPy multi-head attention built from the same weights (spec §2)."""
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsv3_jax import config
from dsv3_jax.layers.mla import MLA


def rms(x, w, eps):
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w


def rope_np(x, pos, freq, amp):
    """Adjacent-pair rotation as complex numbers, returned in the [evens | odds] layout."""
    z = (x[..., 0::2] + 1j * x[..., 1::2]) * np.exp(1j * pos[..., None] * freq) * amp
    return np.concatenate([z.real, z.imag], -1)


def yarn_mscale(s, m):
    return 0.1 * m * math.log(s) + 1.0 if s > 1 else 1.0


def rope_freq_and_scale(cfg):
    """Written from the formulas (not imported from the code under test): f_j = θ^(-2j/R);
    under YaRN a linear ramp between the floor/ceil correction dims of beta_fast and beta_slow
    blends f_j into f_j/s, cos/sin are scaled by mscale(s, mscale)/mscale(s, mscale_all_dim),
    and the softmax scale 1/sqrt(K+R) by mscale(s, mscale_all_dim)^2."""
    dim, base = cfg.qk_rope_head_dim, cfg.rope_theta
    freq = base ** (-np.arange(0, dim, 2, dtype=np.float64) / dim)
    scale = (cfg.qk_nope_head_dim + cfg.qk_rope_head_dim) ** -0.5
    rs = cfg.rope_scaling
    if rs is None:
        return freq, 1.0, scale
    s, l0 = float(rs["factor"]), rs["original_max_position_embeddings"]
    corr = lambda rot: dim * math.log(l0 / (2 * math.pi * rot)) / (2 * math.log(base))
    low = max(math.floor(corr(rs["beta_fast"])), 0)
    high = min(math.ceil(corr(rs["beta_slow"])), dim - 1)
    ramp = np.clip((np.arange(dim // 2) - low) / max(high - low, 1e-3), 0, 1)
    freq = freq * (1 - ramp) + freq / s * ramp
    amp = yarn_mscale(s, rs["mscale"]) / yarn_mscale(s, rs["mscale_all_dim"])
    return freq, amp, scale * yarn_mscale(s, rs["mscale_all_dim"]) ** 2


def mla_reference(p, x, pos, seg, cfg):
    """Naive MHA: materialise q, k = [k_nope; shared k_rope], v per head; float64 throughout."""
    K, R, C = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.kv_lora_rank
    eps = cfg.rms_norm_eps
    if cfg.q_lora_rank is None:
        q = np.einsum("btd,dhk->bthk", x, p["q_proj"]["kernel"])
    else:
        cq = rms(x @ p["q_a"]["kernel"], p["q_norm"]["scale"], eps)
        q = np.einsum("btq,qhk->bthk", cq, p["q_b"]["kernel"])
    kv = x @ p["kv_a"]["kernel"]
    ckv = rms(kv[..., :C], p["kv_norm"]["scale"], eps)
    freq, amp, softmax_scale = rope_freq_and_scale(cfg)
    # broadcast the positions over heads for q
    q_rope = rope_np(q[..., K:], pos[:, :, None], freq, amp)
    k_rope = rope_np(kv[..., C:], pos, freq, amp)                          # one shared head
    kvb = np.einsum("btc,chk->bthk", ckv, p["kv_b"]["kernel"])
    k = np.concatenate([kvb[..., :K], np.broadcast_to(k_rope[:, :, None], kvb.shape[:3] + (R,))], -1)
    v = kvb[..., K:]
    qf = np.concatenate([q[..., :K], q_rope], -1)
    s = np.einsum("bthd,bshd->bhts", qf, k) * softmax_scale
    t = x.shape[1]
    mask = (np.arange(t)[:, None] >= np.arange(t)[None]) & (seg[:, :, None] == seg[:, None, :])
    s = np.where(mask[:, None], s, -np.inf)
    prob = np.exp(s - s.max(-1, keepdims=True))
    prob /= prob.sum(-1, keepdims=True)
    o = np.einsum("bhts,bshv->bthv", prob, v)
    return np.einsum("bthv,hvd->btd", o, p["o_proj"]["kernel"])


YARN = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32, "beta_fast": 32,
        "beta_slow": 1, "mscale": 0.8, "mscale_all_dim": 1.0}


@pytest.mark.parametrize("overrides", [
    {},
    {"q_lora_rank": None},
    {"rope_scaling": YARN},
    {"rope_scaling": YARN, "q_lora_rank": None, "num_attention_heads": 3, "num_key_value_heads": 3},
])
def test_mla_matches_naive_multihead(overrides, rng):
    cfg = config.tiny(**overrides)
    b, t = 2, 13
    x = rng.standard_normal((b, t, cfg.hidden_size)).astype(np.float32)
    pos = rng.integers(0, 200, (b, t)).astype(np.int32)
    seg = np.sort(rng.integers(1, 3, (b, t)), axis=1).astype(np.int32)
    mla = MLA(cfg)
    params = nn.meta.unbox(mla.init(jax.random.key(int(rng.integers(1 << 30))), x, pos, seg))
    # Weights large enough that activations stay O(1): a wrong scale or rope must show.
    params = jax.tree.map(lambda a: np.asarray(a * 5.0 if a.ndim > 1
                                               else a + 0.3 * rng.standard_normal(a.shape),
                                               np.float32), params)
    with jax.default_matmul_precision("highest"):
        ours = np.asarray(mla.apply(params, x, pos, seg))
    ref = mla_reference(jax.tree.map(lambda a: np.asarray(a, np.float64), params["params"]),
                        x.astype(np.float64), pos, seg, cfg)
    np.testing.assert_allclose(ours, ref, atol=2e-4 * max(1.0, np.abs(ref).max()), rtol=0)


@pytest.mark.parametrize("blocks,t", [(4, 16), (2, 10), (3, 10)])
def test_causal_query_blocks_equal_full_attention(blocks, t, rng):
    """Values and gradients; packed segments inside the blocks; 3 does not divide 10 (one block)."""
    from dsv3_jax.layers.mla import attend, attend_causal_blocks, attention_mask
    b, h, k, r, v = 2, 3, 8, 4, 5
    arr = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.float32)
    q_nope, q_rope, k_nope, k_rope, val = arr(b, t, h, k), arr(b, t, h, r), arr(b, t, h, k), \
        arr(b, t, r), arr(b, t, h, v)
    seg = jnp.asarray(np.where(np.arange(t) < t // 2 + 1, 1, 2)[None].repeat(b, 0), jnp.int32)
    index = jnp.broadcast_to(jnp.arange(t), (b, t))
    mask = attention_mask(seg, seg, index, index)
    full = lambda *a: attend(*a, mask, 0.3)
    blocked = lambda *a: attend_causal_blocks(*a, mask, 0.3, blocks)
    args = (q_nope, q_rope, k_nope, k_rope, val)
    with jax.default_matmul_precision("highest"):
        np.testing.assert_allclose(blocked(*args), full(*args), rtol=1e-5, atol=1e-6)
        g1 = jax.grad(lambda a: (blocked(*a) ** 2).sum())(args)
        g2 = jax.grad(lambda a: (full(*a) ** 2).sum())(args)
    for x, y in zip(g1, g2):
        np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-5)
