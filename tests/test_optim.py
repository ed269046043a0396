"""The paper's schedules at their boundary steps, and the optimizer's masks and moment dtypes."""
import math

import jax
import jax.numpy as jnp
import numpy as np

from dsv3_jax import config, model, optim


def test_lr_schedule_shape_at_boundaries():
    peak, n = 2.2e-4, 10_000
    lr = optim.lr_schedule(peak, n, warmup_steps=100, constant_until=0.676, decay_until=0.966,
                           tail1_until=0.989)
    f = lambda s: float(lr(s))
    assert math.isclose(f(0), peak / 100, rel_tol=1e-5)        # linear warm-up
    assert math.isclose(f(49), peak / 2, rel_tol=1e-5)
    assert math.isclose(f(99), peak, rel_tol=1e-5) and math.isclose(f(100), peak, rel_tol=1e-6)
    assert math.isclose(f(6759), peak, rel_tol=1e-6)           # constant until 67.6%
    mid = (6760 + 9660) // 2                                     # cosine half way: 55% of peak
    assert math.isclose(f(mid), peak * (0.1 + 0.9 * 0.5), rel_tol=1e-3)
    assert math.isclose(f(9659), peak * 0.1, rel_tol=1e-3)      # cosine reaches 10%
    assert math.isclose(f(9660), 2.2e-5, rel_tol=1e-5)          # first tail
    assert math.isclose(f(9889), 2.2e-5, rel_tol=1e-5)
    assert math.isclose(f(9890), peak * 0.033, rel_tol=1e-5)    # 7.3e-6 tail
    assert math.isclose(f(n - 1), 7.26e-6, rel_tol=1e-5)


def test_mtp_lambda_and_gamma_switch_at_their_fractions():
    lam = optim.piecewise_constant((0.3, 0.1), (0.676,), 1000)
    gamma = optim.piecewise_constant((0.001, 0.0), (0.966,), 1000)
    assert float(lam(675)) == np.float32(0.3) and float(lam(676)) == np.float32(0.1)
    assert float(gamma(965)) == np.float32(0.001) and float(gamma(966)) == 0.0


def test_no_weight_decay_on_norms():
    params = model.abstract_variables(config.tiny())["params"]
    mask = optim.decay_mask(params)
    flat = jax.tree_util.tree_flatten_with_path(mask)[0]
    for path, decays in flat:
        name = jax.tree_util.keystr(path)
        assert decays == ("scale" not in name), name


def test_bf16_moments_match_f32_adam_closely(rng):
    p = {"w": jnp.asarray(rng.standard_normal((8, 8)), jnp.float32)}
    g = {"w": jnp.asarray(rng.standard_normal((8, 8)), jnp.float32)}
    sched = lambda s: 1e-2
    opt32 = optim.make_optimizer(sched, weight_decay=0.0)
    opt16 = optim.make_optimizer(sched, weight_decay=0.0, moments_dtype="bfloat16")
    s32, s16 = opt32.init(p), opt16.init(p)
    assert s16[1][0].mu["w"].dtype == jnp.bfloat16 and s16[1][0].nu["w"].dtype == jnp.bfloat16
    for _ in range(3):
        u32, s32 = opt32.update(g, s32, p)
        u16, s16 = opt16.update(g, s16, p)
    np.testing.assert_allclose(u16["w"], u32["w"], rtol=2e-2, atol=1e-4)
