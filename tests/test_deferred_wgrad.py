"""The pipeline's per-Linear W (DeepSeek's WeightGradStore): a stage's backward split into B (the
input gradient, the Linears' output gradients and every gradient that is not a deferred weight's)
and W (`common.deferred_weight_grads`: each deferred Linear's and the routed experts' dW from what
B kept) adds up to the one-pass VJP, on fresh random inputs."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsv3_jax import config as config_lib
from dsv3_jax import model
from dsv3_jax.layers import common
from dsv3_jax.layers.moe import ROUTER_BIAS
from kernels_pallas import grouped_gemm

I, T = common.WGRAD_INPUTS, common.WGRAD_TAPS


def _chunk(cfg, layers, seed):
    """(params, router bias) of an MoE stack slice, a stage input, positions, segments, dy."""
    rows, seq = 2, 64
    k = jax.random.split(jax.random.key(seed), 4)
    x = jax.random.normal(k[0], (rows, seq, cfg.hidden_size), jnp.float32).astype(cfg.dtype)
    pos = jnp.tile(jnp.arange(seq, dtype=jnp.int32), (rows, 1))
    seg = jnp.where(jnp.arange(seq)[None] < jnp.array([[40], [64]]), 1, 2).astype(jnp.int32)
    v = nn.meta.unbox(jax.jit(lambda: model._MoEChunk(cfg, layers).init(k[1], x, pos, seg))())
    bias = jax.tree.map(lambda a: jax.random.normal(k[2], a.shape, a.dtype) * 0.01,
                        v[ROUTER_BIAS])
    dy = jax.random.normal(k[3], x.shape, jnp.float32).astype(cfg.dtype)
    return v["params"], bias, x, pos, seg, dy


def _split_and_full(cfg, layers=2, seed=0):
    """The chunk's one-pass VJP, its B (deferring) and W, on random inputs."""
    params, bias, x, pos, seg, dy = _chunk(cfg, layers, seed)

    def f(p, x_, taps=None):
        v = {"params": p, ROUTER_BIAS: bias}
        if taps is None:
            return model._MoEChunk(cfg, layers).apply(v, x_, pos, seg)[0], {}
        v[T] = taps
        (y, _), col = model._MoEChunk(cfg, layers).apply(v, x_, pos, seg, mutable=[I])
        return y, col[I]

    @jax.jit
    def full(p, x_):
        _, vjp, _ = jax.vjp(lambda p_, x2: f(p_, x2), p, x_, has_aux=True)
        return vjp(dy)

    _, cols = jax.eval_shape(lambda p: model._MoEChunk(cfg, layers).apply(
        {"params": p, ROUTER_BIAS: bias}, x, pos, seg, mutable=[I, T]), params)
    taps0 = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), cols[T])

    @jax.jit
    def b_op(p, x_):
        _, vjp, inputs = jax.vjp(f, p, x_, taps0, has_aux=True)
        dp, dx, dtaps = vjp(dy)
        return dp, dx, inputs, dtaps

    @jax.jit
    def w_op(p, inputs, dtaps):
        return common.deferred_weight_grads(p, inputs, dtaps, cfg)
    return params, x, full, b_op, w_op, cols


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


@pytest.mark.parametrize("kw", [dict(), dict(remat="selective"),
                                pytest.param(dict(remat="full"), marks=pytest.mark.slow),
                                # BF16 compute, FP32 master weights and dW, at tiny's own
                                # shapes (XLA:CPU lacks a BF16 x BF16 = F32 dot at some of the
                                # small ones)
                                pytest.param(dict(dtype="bfloat16", param_dtype="float32",
                                                  hidden_size=256), marks=pytest.mark.slow),
                                pytest.param(dict(fp8=True, moe_impl="sorted", dtype="bfloat16",
                                                  hidden_size=128, q_lora_rank=128,
                                                  kv_lora_rank=128, moe_intermediate_size=128,
                                                  intermediate_size=256),
                                             marks=pytest.mark.slow)])
def test_b_plus_deferred_w_equals_the_one_pass_vjp(kw):
    base = dict(hidden_size=64, intermediate_size=128, moe_intermediate_size=32, q_lora_rank=32,
                kv_lora_rank=32, num_attention_heads=2, num_key_value_heads=2,
                qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=8,
                n_group=4, topk_group=2, num_experts_per_tok=2, moe_impl="sorted")
    cfg = config_lib.tiny(**(dict(base, **kw) if kw.get("hidden_size", 64) != 256 else
                             dict(kw, moe_impl="sorted")))
    params, x, full, b_op, w_op, cols = _split_and_full(cfg, seed=len(kw))
    ref_p, ref_x = full(params, x)
    dp, dx, inputs, dtaps = b_op(params, x)
    dw = w_op(params, inputs, dtaps)
    assert _rel(dx, ref_x) <= 1e-6
    deferred = {jax.tree_util.keystr(k[:-1]) for k, _ in
                jax.tree_util.tree_flatten_with_path(cols[T])[0]}
    n_deferred = 0
    for (path, b), w, r in zip(jax.tree_util.tree_flatten_with_path(dp)[0],
                               jax.tree.leaves(dw), jax.tree.leaves(ref_p)):
        name = jax.tree_util.keystr(path)
        site = any(name.startswith(d) for d in deferred)
        if site:   # B gives a deferred weight no gradient; W gives it all of it
            n_deferred += 1
            assert float(jnp.abs(b).max()) == 0.0, name
        else:      # W gives the rest (norms, router) nothing
            assert float(jnp.abs(w).max()) == 0.0, name
        assert _rel(np.asarray(b, np.float64) + np.asarray(w, np.float64), r) <= 1e-6, name
    # every Linear of the layer (5 of MLA, 3 of the shared expert) and the routed experts
    # (gate, up, down; under FP8 through its GEMMs' own VJPs, moe.fp8_experts_wgrad)
    assert n_deferred == 11, n_deferred
    if not kw:   # the work moves, it does not grow: B + W has the one pass's FLOPs (as XLA's
        # cost analysis counts them; W is the dW GEMMs: a third of a GEMM-bound backward)
        flops = lambda fn, *a: fn.lower(*a).compile().cost_analysis()["flops"]
        one, b, w = flops(full, params, x), flops(b_op, params, x), flops(w_op, params, inputs,
                                                                          dtaps)
        assert b + w == pytest.approx(one, rel=0.01) and 0.2 * one < w < 0.5 * one, (one, b, w)


def test_grouped_swiglu_deferred_matches_the_reference_vjp():
    rng = np.random.default_rng(7)
    e, d, f, tile_m = 4, 32, 16, 8
    tile_expert = jnp.asarray(np.sort(rng.integers(0, e, 10)), jnp.int32)
    used = 8                                   # the last two tiles are padding
    m = tile_expert.shape[0] * tile_m
    x = jnp.asarray(rng.normal(size=(m, d)), jnp.float32)
    ws = [jnp.asarray(rng.normal(size=s) * 0.2, jnp.float32) for s in ((e, d, f), (e, d, f),
                                                                        (e, f, d))]
    dy = jnp.asarray(rng.normal(size=(m, d)), jnp.float32)
    ref = lambda x_, *w: grouped_gemm.grouped_swiglu_reference(
        x_, *w, tile_expert, tile_m=tile_m, used_tiles=used)
    y_ref, vjp = jax.vjp(ref, x, *ws)
    dx_ref, *dw_ref = vjp(dy)

    def deferred(x_, tap_gu, tap_y):
        return grouped_gemm.grouped_swiglu_deferred(x_, *ws, tile_expert, tap_gu, tap_y,
                                                    tile_m=tile_m, used_tiles=used)
    (y, gu), vjp2 = jax.vjp(deferred, x, jnp.zeros((m, 2 * f)), jnp.zeros((m, d)))
    dx, dgu, dy_tap = vjp2((dy, jnp.zeros_like(gu)))
    rows = used * tile_m
    np.testing.assert_allclose(y[:rows], y_ref[:rows], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dx[:rows], dx_ref[:rows], rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(dy_tap, dy)
    dw = grouped_gemm.grouped_swiglu_wgrad(x, gu, dgu, dy_tap, tile_expert, used, tile_m=tile_m,
                                           num_experts=e)
    for got, want in zip(dw, dw_ref):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_fp8_routed_experts_deferred_match_the_one_pass_vjp():
    """Under FP8 (with its activation caching) the routed experts' B takes zero taps on the
    gate | up and down GEMMs' outputs, W runs each GEMM's own FP8 VJP at what B stored
    (moe.fp8_experts_wgrad): dx from B, dW from W equal the one-pass VJP's, and B gives the
    weights nothing. Fresh random tokens, routing and weights."""
    from dsv3_jax.layers import moe, moe_ep
    cfg = config_lib.tiny(fp8=True, dtype="bfloat16", hidden_size=128,
                          moe_intermediate_size=96, n_routed_experts=4, n_group=2, topk_group=1,
                          num_experts_per_tok=2)
    rng = np.random.default_rng(11)
    n, e, d, f = 48, cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size
    x = jnp.asarray(rng.normal(size=(n, d)), jnp.bfloat16)
    experts = jnp.asarray(np.stack([rng.choice(e, 2, replace=False) for _ in range(n)]),
                          jnp.int32)
    gates = jnp.asarray(rng.uniform(0.2, 1.0, (n, 2)), jnp.float32)
    ws = [jnp.asarray(rng.normal(size=s) * 0.05, jnp.float32)
          for s in ((e, d, f), (e, d, f), (e, f, d))]
    dy = jnp.asarray(rng.normal(size=(n, d)), jnp.float32)   # the gate-weighted combine's
    run = lambda x_, *w, taps=None: moe.sorted_experts(x_, experts, gates, *w, cfg,
                                                       num_experts=e, taps=taps)
    _, vjp = jax.vjp(run, x, *ws)
    dx_ref, *dw_ref = vjp(dy)
    m = moe_ep.ep_store_rows(cfg, n * 2, 1)[0]
    taps = (jnp.zeros((m, moe.gate_up_width(cfg)), jnp.bfloat16), jnp.zeros((m, d), jnp.bfloat16))
    (_, store), vjp = jax.vjp(lambda x_, t, *w: run(x_, *w, taps=t), x, taps, *ws)
    dx, dtaps, *dw_b = vjp((dy, jax.tree.map(jnp.zeros_like, store)))
    dw = moe.experts_wgrad(ws, store["x"], store["gu"], *dtaps, store["tile_expert"],
                           store["used"], cfg)
    assert _rel(dx, dx_ref) <= 1e-6
    for b, w, r in zip(dw_b, dw, dw_ref):
        assert float(jnp.abs(b).max()) == 0.0
        assert float(jnp.abs(r).max()) > 0 and _rel(w, r) <= 1e-6
