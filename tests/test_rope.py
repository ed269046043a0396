"""RoPE/YaRN frequencies and rotations against float64 NumPy references of the spec's formulas."""
import math

import jax.numpy as jnp
import numpy as np

from dsv3_jax import config
from dsv3_jax.layers.common import apply_rope, rope_cos_sin, rope_inv_freq


def yarn_reference(dim, base, factor, l0, beta_fast, beta_slow):
    """Spec §1.3, written independently: ramp between floor/ceil correction dims."""
    f = np.array([base ** (-2 * j / dim) for j in range(dim // 2)])
    corr = lambda r: dim * math.log(l0 / (2 * math.pi * r)) / (2 * math.log(base))
    low, high = max(math.floor(corr(beta_fast)), 0), min(math.ceil(corr(beta_slow)), dim - 1)
    ramp = np.clip((np.arange(dim // 2) - low) / (high - low), 0, 1)
    return f * (1 - ramp) + f / factor * ramp, (low, high)


def test_release_yarn_correction_range_and_frequencies():
    cfg = config.deepseek_v3_671b()
    ref, (low, high) = yarn_reference(64, 10000.0, 40.0, 4096, 32, 1)
    assert (low, high) == (10, 23)  # spec §1.3 [DERIVED]
    freq, amp = rope_inv_freq(cfg)
    np.testing.assert_allclose(freq, ref, rtol=1e-6)
    assert amp == 1.0  # mscale == mscale_all_dim: all temperature goes into the softmax scale
    # dims j <= 10 keep the base frequency, j >= 23 are divided by the factor
    base = 10000.0 ** (-np.arange(0, 64, 2) / 64)
    np.testing.assert_allclose(freq[:11], base[:11], rtol=1e-6)
    np.testing.assert_allclose(freq[23:], base[23:] / 40, rtol=1e-6)


def test_release_softmax_scale():
    m = 0.1 * math.log(40) + 1
    assert math.isclose(config.softmax_scale(config.deepseek_v3_671b()), 192 ** -0.5 * m * m,
                        rel_tol=1e-12)
    assert math.isclose(config.softmax_scale(config.tiny()), 48 ** -0.5)


def test_yarn_without_mscale_scales_cos_sin():
    cfg = config.tiny(rope_scaling={"rope_type": "yarn", "factor": 4.0,
                                    "original_max_position_embeddings": 256})
    _, amp = rope_inv_freq(cfg)
    assert math.isclose(amp, 0.1 * math.log(4.0) + 1)
    assert config.softmax_scale(cfg) == cfg.qk_head_dim ** -0.5


def test_interleaved_rope_is_complex_rotation_of_adjacent_pairs(rng):
    cfg = config.tiny(rope_scaling={"type": "yarn", "factor": 8.0, "beta_fast": 32, "beta_slow": 1,
                                    "original_max_position_embeddings": 64, "mscale": 1.0,
                                    "mscale_all_dim": 1.0})
    r = cfg.qk_rope_head_dim
    x = rng.standard_normal((2, 7, r))
    pos = rng.integers(0, 500, (2, 7))
    cos, sin = rope_cos_sin(cfg, jnp.asarray(pos))
    out = np.asarray(apply_rope(jnp.asarray(x, jnp.float32), cos, sin, interleave=True))
    freq, _ = rope_inv_freq(cfg)
    z = (x[..., 0::2] + 1j * x[..., 1::2]) * np.exp(1j * pos[..., None] * freq.astype(np.float64))
    # our layout: [rotated evens | rotated odds]
    np.testing.assert_allclose(out, np.concatenate([z.real, z.imag], -1), atol=2e-5)


def test_half_split_rope_matches_rotate_half(rng):
    cfg = config.tiny()
    r = cfg.qk_rope_head_dim
    x = rng.standard_normal((3, 5, r))
    pos = rng.integers(0, 100, (3, 5))
    cos, sin = rope_cos_sin(cfg, jnp.asarray(pos))
    out = np.asarray(apply_rope(jnp.asarray(x, jnp.float32), cos, sin, interleave=False))
    ang = pos[..., None] * (10000.0 ** (-np.arange(0, r, 2) / r))
    c, s = np.concatenate([np.cos(ang)] * 2, -1), np.concatenate([np.sin(ang)] * 2, -1)
    rot_half = np.concatenate([-x[..., r // 2:], x[..., :r // 2]], -1)
    np.testing.assert_allclose(out, x * c + rot_half * s, atol=2e-5)


def test_rope_preserves_relative_positions(rng):
    """q.k after RoPE depends only on the position difference."""
    cfg = config.tiny()
    q, k = rng.standard_normal((2, cfg.qk_rope_head_dim)).astype(np.float32)
    def score(pq, pk):
        cq, sq = rope_cos_sin(cfg, jnp.asarray([pq]))
        ck, sk = rope_cos_sin(cfg, jnp.asarray([pk]))
        return float(jnp.dot(apply_rope(jnp.asarray(q)[None], cq, sq, True)[0],
                             apply_rope(jnp.asarray(k)[None], ck, sk, True)[0]))
    assert math.isclose(score(10, 3), score(107, 100), rel_tol=1e-4)
