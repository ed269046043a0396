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


def adamw_numpy(params, grads_per_step, lrs, b1, b2, eps, wd, clip):
    """AdamW with global-norm clipping in float64, written from the formulas: g <- g·min(1,
    clip/|g|); m = b1 m + (1-b1) g; v = b2 v + (1-b2) g²; p -= lr_t (m̂/(√v̂ + eps) + wd·p)
    with weight decay on matrices not named scale. Returns the updates, moments and the bound
    on their BF16-stored error per step (see test_bf16_moments_...)."""
    decays = {k: v.ndim > 1 and k != "scale" for k, v in params.items()}
    p = {k: v.astype(np.float64) for k, v in params.items()}
    m = {k: np.zeros_like(v) for k, v in p.items()}
    v = {k: np.zeros_like(x) for k, x in p.items()}
    em = {k: np.zeros_like(x) for k, x in p.items()}       # bounds on |m_bf16 - m|, |v_bf16 - v|
    ev = {k: np.zeros_like(x) for k, x in p.items()}
    u_bf16 = 2.0 ** -8                                       # BF16: 8 significant bits, nearest
    out = []
    for t, (g, lr) in enumerate(zip(grads_per_step, lrs), start=1):
        norm = np.sqrt(sum((x.astype(np.float64) ** 2).sum() for x in g.values()))
        scale = min(1.0, clip / norm)
        step, bound = {}, {}
        for k in p:
            gk = g[k].astype(np.float64) * scale
            m[k] = b1 * m[k] + (1 - b1) * gk
            v[k] = b2 * v[k] + (1 - b2) * gk * gk
            mh, vh = m[k] / (1 - b1 ** t), v[k] / (1 - b2 ** t)
            # the BF16 step computes this step's moments in float32 from the stored (rounded)
            # previous ones, then rounds them for storage
            dm, dv = b1 * em[k], b2 * ev[k]
            dmh, dvh = dm / (1 - b1 ** t), dv / (1 - b2 ** t)
            sv = np.sqrt(vh)
            dsv = np.minimum(dvh / (2 * np.sqrt(np.maximum(vh - dvh, 0)) + 1e-300), np.sqrt(dvh))
            bound[k] = lr * (dmh / (sv + eps) + np.abs(mh) * dsv / (sv + eps) ** 2)
            em[k] = dm + u_bf16 * (np.abs(m[k]) + dm)
            ev[k] = dv + u_bf16 * (np.abs(v[k]) + dv)
            step[k] = -lr * (mh / (sv + eps) + (wd * p[k] if decays[k] else 0.0))
            p[k] = p[k] + step[k]
        out.append((step, bound, norm))
    return out


def _opt_problem(rng, steps=5):
    """Params with a matrix, a 2-D stacked norm scale (never decayed) and a vector; fresh
    gradients each step at scales from 0.1x to 30x the clip norm, so clipping engages on some
    steps and not on others (Adam is not scale invariant across such steps)."""
    params = {"w": rng.standard_normal((6, 5)).astype(np.float32),
              "scale": (1 + 0.1 * rng.standard_normal((3, 5))).astype(np.float32),
              "b": rng.standard_normal(7).astype(np.float32)}
    scales = [30.0, 0.1, 3.0, 0.3, 10.0][:steps]
    grads = [{k: (s * rng.standard_normal(v.shape) / 6).astype(np.float32)
              for k, v in params.items()} for s in scales]
    return params, grads


def _run_optax(opt, params, grads):
    p = {k: jnp.asarray(v) for k, v in params.items()}
    state = opt.init(p)
    update = jax.jit(opt.update)
    out = []
    for g in grads:
        u, state = update({k: jnp.asarray(v) for k, v in g.items()}, state, p)
        p = jax.tree.map(lambda a, b: a + b, p, u)
        out.append(u)
    return out, state


HYPER = dict(b1=0.8, b2=0.9, eps=1e-6, weight_decay=0.3, clip_norm=1.0)


def test_adamw_with_clipping_and_decay_matches_numpy(rng):
    params, grads = _opt_problem(rng)
    lr = lambda s: 1e-2 * (1.0 + s) / (1.0 + 0.5 * s)        # varies per step
    got, _ = _run_optax(optim.make_optimizer(lr, **HYPER), params, grads)
    want = adamw_numpy(params, grads, [lr(s) for s in range(len(grads))], HYPER["b1"],
                       HYPER["b2"], HYPER["eps"], HYPER["weight_decay"], HYPER["clip_norm"])
    norms = [n for _, _, n in want]
    assert max(norms) > 3 * HYPER["clip_norm"] and min(norms) < HYPER["clip_norm"]
    for t, (u, (w, _, _)) in enumerate(zip(got, want)):
        for k in params:
            # float32 arithmetic on O(1e-2) steps: 1e-5 relative
            np.testing.assert_allclose(u[k], w[k], rtol=1e-5, atol=1e-9, err_msg=f"step {t} {k}")


def test_bf16_moments_stay_within_their_rounding_bound(rng):
    """BF16-stored moments against float64 AdamW: each stored moment is off by at most its
    rounding (2^-8 relative) plus the decayed error carried from the last step; that bound,
    carried into m̂/(√v̂+eps), bounds the update's error (with 1.5x slack for float32)."""
    params, grads = _opt_problem(rng)
    lr = lambda s: 1e-2
    opt = optim.make_optimizer(lr, moments_dtype="bfloat16", **HYPER)
    got, state = _run_optax(opt, params, grads)
    assert state[1][0].mu["w"].dtype == jnp.bfloat16 and state[1][0].nu["w"].dtype == jnp.bfloat16
    want = adamw_numpy(params, grads, [1e-2] * len(grads), HYPER["b1"], HYPER["b2"],
                       HYPER["eps"], HYPER["weight_decay"], HYPER["clip_norm"])
    worst = 0.0
    for t, (u, (w, bound, _)) in enumerate(zip(got, want)):
        for k in params:
            err = np.abs(np.asarray(u[k], np.float64) - w[k])
            lim = 1.5 * bound[k] + 1e-5 * np.abs(w[k]) + 1e-10
            assert (err <= lim).all(), (t, k, (err - lim).max())
            worst = max(worst, float((err / (np.abs(w[k]) + 1e-12)).max()))
    assert worst > 1e-4       # the moments really are BF16 (float32 would be ~1e-7)


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
