"""The paper's schedules at their boundary steps, and the optimizer's masks and moment dtypes."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsv3_jax import config, model, optim


def test_lr_schedule_shape_at_boundaries():
    peak = 2.2e-4
    lr = optim.lr_schedule(peak, warmup_steps=100, constant_until=6760, decay_until=9660,
                           tail1_until=9890)
    f = lambda s: float(lr(s))
    assert math.isclose(f(0), peak / 100, rel_tol=1e-5)        # linear warm-up
    assert math.isclose(f(49), peak / 2, rel_tol=1e-5)
    assert math.isclose(f(99), peak, rel_tol=1e-5) and math.isclose(f(100), peak, rel_tol=1e-6)
    assert math.isclose(f(6759), peak, rel_tol=1e-6)           # constant until step 6760
    mid = (6760 + 9660) // 2                                     # cosine half way: 55% of peak
    assert math.isclose(f(mid), peak * (0.1 + 0.9 * 0.5), rel_tol=1e-3)
    assert math.isclose(f(9659), peak * 0.1, rel_tol=1e-3)      # cosine reaches 10%
    assert math.isclose(f(9660), 2.2e-5, rel_tol=1e-5)          # first tail
    assert math.isclose(f(9889), 2.2e-5, rel_tol=1e-5)
    assert math.isclose(f(9890), peak * 0.033, rel_tol=1e-5)    # 7.3e-6 tail
    assert math.isclose(f(9999), 7.26e-6, rel_tol=1e-5)


def test_mtp_lambda_and_gamma_switch_at_their_steps():
    lam = optim.piecewise_constant((0.3, 0.1), (676,))
    gamma = optim.piecewise_constant((0.001, 0.0), (966,))
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


def test_report_schedule_at_full_scale_with_the_batch_ramp():
    """experiments/configs/deepseek_v3.py: every boundary of the report's schedule (§4.2) in
    tokens, with the batch ramped 3072 -> 15360 over the first 469B tokens."""
    from dsv3_jax import train_config, train_state
    from dsv3_jax.objectives import pretrain
    c = train_config.load("experiments/configs/deepseek_v3.py")
    sched = train_state.batch_schedule(c)
    # Independently: tokens before each step (ints), stage k of the ramp runs 3072 + 1536 k rows
    # while fewer than (k + 1) * 469B / 8 tokens have been consumed.
    used, before = 0, []
    while used < 14.8e12:
        before.append(used)
        k = min(int(used // (469e9 / 8)), 8)
        used += (3072 + 1536 * k) * 4096
    assert len(before) == c.train.steps
    np.testing.assert_array_equal(sched.tokens_before[:-1], before)
    assert 14.8e12 <= sched.total_tokens < 14.8e12 + 15360 * 4096
    assert sched.rows(0) == 3072 and sched.rows(c.train.steps - 1) == 15360
    first = lambda tokens: next(s for s, t in enumerate(before) if t >= tokens)
    ramp_end = first(469e9)
    assert sched.rows(ramp_end - 1) == 13824 and sched.rows(ramp_end) == 15360

    _, lr = train_state.make_optimizer(c, sched)
    f = lambda s: float(lr(s))
    s10, s143, s14633 = first(10e12), first(14.3e12), first(14.633e12)
    assert math.isclose(f(2000), 2.2e-4, rel_tol=1e-6)                  # after 2K warm-up steps
    assert math.isclose(f(s10 - 1), 2.2e-4, rel_tol=1e-6)               # constant until 10T
    mid = (s10 + s143) // 2                                              # cosine half way
    assert math.isclose(f(mid), 2.2e-4 * 0.55, rel_tol=2e-3)
    assert math.isclose(f(s143 - 1), 2.2e-5, rel_tol=1e-3)              # ... to 2.2e-5 by 14.3T
    assert math.isclose(f(s143), 2.2e-5, rel_tol=1e-6)                  # 2.2e-5 for 333B tokens
    assert math.isclose(f(s14633 - 1), 2.2e-5, rel_tol=1e-6)
    assert math.isclose(f(s14633), 7.26e-6, rel_tol=1e-5)               # 7.3e-6, last 167B
    assert math.isclose(f(c.train.steps - 1), 7.26e-6, rel_tol=1e-5)
    assert (14.8e12 - before[s14633]) / 1e9 == pytest.approx(167, abs=0.1)

    cfg = train_config.validate(c)
    lam = pretrain.make(c, cfg).mtp_weight
    assert float(lam(s10 - 1)) == np.float32(0.3) and float(lam(s10)) == np.float32(0.1)
    from dsv3_jax import train
    gamma = train.make_step_fns(c, cfg.replace(fp8=False)).gamma
    assert float(gamma(s143 - 1)) == np.float32(0.001) and float(gamma(s143)) == 0.0


def test_pretraining_uses_plain_rope_and_extension_yarn():
    """Report §4.3: YaRN (s=40, alpha=1, beta=32, sqrt(t) = 0.1 ln s + 1) only for the
    context-extension stages, 32K x 1920 then 128K x 480 at LR 7.3e-6."""
    from dsv3_jax import config as config_lib, train_config
    path = "experiments/configs/deepseek_v3.py"
    pre = train_config.validate(train_config.load(path))
    assert pre.rope_scaling is None and pre.max_position_embeddings == 4096
    assert config_lib.softmax_scale(pre) == pytest.approx(192 ** -0.5)
    for stage, seq, rows in (("ext32k", 32768, 1920), ("ext128k", 131072, 480)):
        c = train_config.load(path, f"stage={stage}")
        cfg = train_config.validate(c)
        rs = cfg.rope_scaling
        assert (rs["factor"], rs["beta_fast"], rs["beta_slow"]) == (40, 32, 1)
        assert rs["original_max_position_embeddings"] == 4096
        mscale = 0.1 * math.log(40) + 1
        assert config_lib.softmax_scale(cfg) == pytest.approx(192 ** -0.5 * mscale ** 2)
        assert (c.data.seq_len, c.data.global_batch, c.train.steps) == (seq, rows, 1000)
        _, lr = train_state_make(c)
        assert float(lr(0)) == pytest.approx(7.3e-6) and float(lr(999)) == pytest.approx(7.3e-6)


def train_state_make(c):
    from dsv3_jax import train_state
    return train_state.make_optimizer(c)
