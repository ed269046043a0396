"""DeepSeekMoE: routing rules (spec §3) and the dropless sorted computation vs a dense reference."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsv3_jax import config, model
from dsv3_jax.layers import moe, moe_ep


def route_reference(s, b, cfg):
    """Per token, in plain NumPy: group score = sum of top-2 (s+b), keep topk_group groups,
    top-k of s+b inside them; gates from the unbiased s, normalised, times the scaling factor."""
    n, e = s.shape
    g = cfg.n_group
    experts, gates = [], []
    for t in range(n):
        c = s[t] + b
        gs = np.sort(c.reshape(g, e // g), axis=1)[:, -2:].sum(1) if g > 1 else np.zeros(1)
        keep = np.argsort(-gs, kind="stable")[:cfg.topk_group]
        allowed = np.concatenate([np.arange(k * e // g, (k + 1) * e // g) for k in keep])
        idx = allowed[np.argsort(-c[allowed], kind="stable")[:cfg.num_experts_per_tok]]
        w = s[t, idx]
        if cfg.norm_topk_prob:
            w = w / w.sum()
        experts.append(np.sort(idx))
        gates.append(dict(zip(idx, w * cfg.routed_scaling_factor)))
    return experts, gates


def _sorted_routing(r):
    order = np.argsort(np.asarray(r.experts_NP), axis=1)
    return (np.take_along_axis(np.asarray(r.experts_NP), order, 1),
            np.take_along_axis(np.asarray(r.gates_NP), order, 1))


@pytest.mark.parametrize("overrides", [{}, {"n_group": 1, "topk_group": 1},
                                       {"n_routed_experts": 32, "n_group": 8, "topk_group": 3,
                                        "num_experts_per_tok": 6, "norm_topk_prob": False}])
def test_group_limited_topk_matches_reference(overrides, rng):
    cfg = config.tiny(**overrides)
    s = 1 / (1 + np.exp(-rng.standard_normal((64, cfg.n_routed_experts))))
    b = 0.2 * rng.standard_normal(cfg.n_routed_experts)
    r = moe.route(jnp.asarray(s, jnp.float32), jnp.asarray(b, jnp.float32), cfg)
    ref_e, ref_g = route_reference(s, b, cfg)
    e, g = _sorted_routing(r)
    np.testing.assert_array_equal(e, np.stack(ref_e))
    np.testing.assert_allclose(g, [[d[i] for i in row] for d, row in zip(ref_g, e)], rtol=1e-5)


def test_selected_experts_lie_in_topk_groups(rng):
    cfg = config.tiny(n_routed_experts=32, n_group=8, topk_group=2, num_experts_per_tok=4)
    s = jax.nn.sigmoid(jnp.asarray(rng.standard_normal((256, 32)), jnp.float32))
    r = moe.route(s, jnp.zeros(32), cfg)
    groups_used = np.asarray(r.experts_NP) // (32 // 8)
    assert max(len(set(row)) for row in groups_used) <= cfg.topk_group


def test_bias_changes_selection_not_gates(rng):
    cfg = config.tiny()
    s = jax.nn.sigmoid(jnp.asarray(rng.standard_normal((128, 16)), jnp.float32))
    bias = jnp.asarray(rng.normal(0, 0.3, 16), jnp.float32)
    r0, r1 = moe.route(s, jnp.zeros(16), cfg), moe.route(s, bias, cfg)
    assert (np.sort(np.asarray(r0.experts_NP), 1) != np.sort(np.asarray(r1.experts_NP), 1)).any()
    # gate values come from the unbiased affinities of whichever experts were selected
    sel = np.take_along_axis(np.asarray(s), np.asarray(r1.experts_NP), 1)
    np.testing.assert_allclose(np.asarray(r1.gates_NP),
                               sel / sel.sum(1, keepdims=True) * cfg.routed_scaling_factor, rtol=1e-6)
    # a large bias forces an expert in, but its gate is still its own (small) affinity share
    forced = moe.route(s, jnp.zeros(16).at[5].set(10.0), cfg)
    assert (np.asarray(forced.experts_NP) == 5).any(1).all()


def test_dispatch_plan_is_a_tile_aligned_permutation(rng):
    n, p, e, tile = 50, 3, 8, 8
    experts = rng.integers(0, e, (n, p))
    experts[:20] = 2  # skew: one hot expert
    experts = jnp.asarray(experts, jnp.int32)
    plan = moe.plan_dispatch(experts, e, tile)
    dest = np.asarray(plan.dest_row_NP)
    assert len(np.unique(dest)) == n * p                      # every slot has its own row
    tile_of = dest // tile
    np.testing.assert_array_equal(np.asarray(plan.tile_expert)[tile_of], np.asarray(experts))
    src = np.asarray(plan.src_slot_M)
    np.testing.assert_array_equal(src[dest], np.arange(n * p).reshape(n, p))
    assert (src == n * p).sum() == src.size - n * p           # the rest are zero padding rows
    assert int(plan.used_tiles) == sum(-(-c // tile) for c in np.bincount(experts.ravel(), minlength=e))


def _moe_setup(cfg, rng, n_tokens=96, skew=False):
    x = jnp.asarray(rng.standard_normal((2, n_tokens // 2, cfg.hidden_size)), jnp.float32)
    layer = moe.MoE(cfg)
    valid = jnp.ones(x.shape[:2], bool)
    variables = nn.meta.unbox(layer.init(jax.random.key(int(rng.integers(1 << 30))), x, valid))
    if skew:  # most tokens prefer expert 3
        variables["router_bias"]["bias"] = variables["router_bias"]["bias"].at[3].set(5.0)
    return layer, variables, x, valid


@pytest.mark.parametrize("impl,tile_m,skew,n_tokens", [
    ("sorted", 8, False, 96), ("sorted", 16, True, 96), ("sorted", 128, False, 96),
    ("sorted", None, True, 96), ("gather", None, False, 96), ("gather", None, True, 6),
    ("auto", None, False, 4)])
def test_sorted_and_gathered_moe_equal_dense_reference(impl, tile_m, skew, n_tokens, rng):
    cfg = config.tiny(moe_impl=impl, moe_tile_m=tile_m)
    layer, variables, x, valid = _moe_setup(cfg, rng, n_tokens=n_tokens, skew=skew)
    dense = moe.MoE(cfg.replace(moe_impl="dense"))

    def loss(params, layer):
        out, _ = layer.apply({"params": params, "router_bias": variables["router_bias"]}, x, valid)
        return (out ** 2).sum(), out

    with jax.default_matmul_precision("highest"):
        (l1, o1), g1 = jax.value_and_grad(loss, has_aux=True)(variables["params"], layer)
        (l2, o2), g2 = jax.value_and_grad(loss, has_aux=True)(variables["params"], dense)
    np.testing.assert_allclose(o1, o2, atol=1e-5 * float(jnp.abs(o2).max()))
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
        np.testing.assert_allclose(a, b, atol=1e-5 * float(jnp.abs(b).max()) + 1e-8)


def test_auto_gathers_only_few_slots_in_the_plain_jnp_path():
    cfg = config.tiny()                                   # 16 experts, top-4
    assert moe.use_gather(cfg, 8) and moe.use_gather(cfg, 32)
    assert not moe.use_gather(cfg, 33)
    assert not moe.use_gather(cfg.replace(gemm_impl="pallas"), 8)
    assert not moe.use_gather(cfg.replace(moe_impl="sorted"), 8)
    assert moe.use_gather(cfg.replace(moe_impl="gather"), 4096)


@pytest.mark.parametrize("overrides", [{}, {"n_routed_experts": 32, "n_group": 8, "topk_group": 3,
                                            "num_experts_per_tok": 6}])
def test_router_stats_match_numpy(overrides, rng):
    """Loads and the sequence-wise balance loss from a NumPy routing of s + b (random non-zero
    bias, group-limited): f_i counts the routed set (biased choice), P_i the unbiased affinities
    s_i / sum_j s_j; padding tokens and an all-padding row count for nothing."""
    cfg = config.tiny(**overrides)
    b, t, e, k = 3, 20, cfg.n_routed_experts, cfg.num_experts_per_tok
    s = 1 / (1 + np.exp(-rng.standard_normal((b * t, e))))
    bias = 0.3 * rng.standard_normal(e)          # large enough to change most routed sets
    r = moe.route(jnp.asarray(s, jnp.float32), jnp.asarray(bias, jnp.float32), cfg)
    valid = rng.random((b, t)) > 0.3
    valid[2] = False                                   # an all-padding row is ignored
    stats = moe.router_stats(r, jnp.asarray(valid), cfg)
    ex = np.stack(route_reference(s, bias, cfg)[0]).reshape(b, t, k)
    assert (ex != np.stack(route_reference(s, 0 * bias, cfg)[0]).reshape(b, t, k)).any()
    sn = s.reshape(b, t, e)
    counts = np.bincount(ex[valid].ravel(), minlength=e)
    np.testing.assert_array_equal(stats.counts, counts)
    losses = []
    for i in range(2):
        tt = valid[i].sum()
        f = e / (k * tt) * np.bincount(ex[i][valid[i]].ravel(), minlength=e)
        p = (sn[i][valid[i]] / sn[i][valid[i]].sum(-1, keepdims=True)).mean(0)
        losses.append((f * p).sum())
    # float32 sums of ~20 affinities: ~1e-6 relative
    np.testing.assert_allclose(stats.balance_loss, np.mean(losses), rtol=1e-5)


def test_bias_update_pushes_overloaded_expert_down():
    cfg = config.tiny()
    variables = model.abstract_variables(cfg)
    bias = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), variables["router_bias"])
    counts = jnp.ones((cfg.num_moe_layers, 16), jnp.int32).at[:, 3].set(100).at[:, 7].set(0)
    counts_mtp = jnp.ones((1, 16), jnp.int32).at[0, 3].set(100)
    new = model.update_router_bias(bias, counts, counts_mtp, 0.001)
    b = np.asarray(new["moe_layers"]["block"]["moe"]["bias"])
    assert (b[:, 3] == -0.001).all() and (b[:, 7] == 0.001).all()
    assert (np.asarray(new["mtp_0"]["block"]["moe"]["bias"])[3] == -0.001)


def test_bias_update_matches_numpy_on_random_loads(rng):
    """b_i += γ·sign(mean_j load_j - load_i) per layer (main and MTP), random loads and biases,
    ties with the mean leave b_i alone."""
    cfg = config.tiny(num_nextn_predict_layers=2)
    variables = model.abstract_variables(cfg)
    bias = jax.tree.map(lambda a: jnp.asarray(0.1 * rng.standard_normal(a.shape), a.dtype),
                        variables["router_bias"])
    e = cfg.n_routed_experts
    counts = rng.integers(0, 50, (cfg.num_moe_layers, e))
    counts[0, :] = 7                                    # all at the mean: no change
    counts_mtp = rng.integers(0, 50, (2, e))
    gamma = 0.0123
    new = model.update_router_bias(bias, jnp.asarray(counts, jnp.int32),
                                   jnp.asarray(counts_mtp, jnp.int32), gamma)

    def want(b, c):
        c = c.astype(np.float64)
        return np.asarray(b, np.float64) + gamma * np.sign(c.mean(-1, keepdims=True) - c)

    main = lambda tree: tree["moe_layers"]["block"]["moe"]["bias"]
    np.testing.assert_allclose(main(new), want(main(bias), counts), rtol=0, atol=1e-7)
    np.testing.assert_array_equal(main(new)[0], main(bias)[0])
    for d in range(2):
        got = new[f"mtp_{d}"]["block"]["moe"]["bias"]
        np.testing.assert_allclose(got, want(bias[f"mtp_{d}"]["block"]["moe"]["bias"],
                                             counts_mtp[d]), rtol=0, atol=1e-7)


def test_default_tile_m_bounds_padding():
    for slots, e in [(8192, 16), (8192, 256), (64, 64), (10**6, 8)]:
        for share in (4, 16):
            m = moe.default_tile_m(slots, e, share)
            assert 8 <= m <= 128 and m & (m - 1) == 0
            assert e * m <= max(slots // share, 8 * e)
    assert moe.default_tile_m(8192, 16) == 128 and moe.default_tile_m(8192, 16, 16) == 32


@pytest.mark.parametrize("dtype,chunk_rows,used", [("float32", 8, 20), ("float32", 32, 20),
                                                    ("float32", 512, 20), ("bfloat16", 32, 20),
                                                    ("float32", 32, None)])
def test_grouped_swiglu_loop_equals_reference(dtype, chunk_rows, used, rng, monkeypatch):
    """The fused expert SwiGLU loop (custom VJP) against three reference grouped matmuls:
    output and all four gradients, with empty experts, chunked and halved tiles, unused
    trailing tiles; BF16 compute keeps FP32 weight gradients."""
    from kernels_pallas import grouped_gemm
    monkeypatch.setattr(grouped_gemm, "CHUNK_ROWS", chunk_rows)
    tile, e, d, f = 8, 6, 24, 16
    tile_expert = jnp.asarray([1] * 9 + [2] * 3 + [4] * 7 + [5] * 3, jnp.int32)
    m = tile_expert.shape[0] * tile
    dt = jnp.dtype(dtype)
    x = jnp.asarray(rng.standard_normal((m, d)), dt)
    ws = [jnp.asarray(rng.standard_normal(s) / np.sqrt(s[1]), jnp.float32)
          for s in ((e, d, f), (e, d, f), (e, f, d))]
    dy = jnp.asarray(rng.standard_normal((m, d)), dt)

    def run(impl):
        def fn(x, wg, wu, wd):
            if impl == "reference":      # the reference casts per tile like the model does
                wg, wu, wd = (w.astype(dt) for w in (wg, wu, wd))
            return grouped_gemm.grouped_swiglu(x, wg, wu, wd, tile_expert, tile_m=tile,
                                               used_tiles=used, implementation=impl)
        y, vjp = jax.vjp(jax.jit(fn), x, *ws)
        return (y,) + vjp(dy)

    got, want = run("loop"), run("reference")
    tol = 1e-5 if dtype == "float32" else 3e-2
    for name, a, b in zip(["y", "dx", "dgate", "dup", "ddown"], got, want):
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        np.testing.assert_allclose(a, b, rtol=tol, atol=tol * np.abs(b).max(), err_msg=name)
    if dtype == "bfloat16":   # FP32 dW, not BF16-rounded: most entries fall between BF16 values
        for g in got[2:]:
            g = np.asarray(g)[np.asarray(g) != 0]                # empty experts' dW is exactly 0
            assert np.mean(g != np.asarray(jnp.asarray(g, jnp.bfloat16), np.float32)) > 0.9
    if used is not None:                                          # padding tiles: zero output
        assert not np.any(np.asarray(got[0][used * tile:], np.float32))


def test_node_limited_routing_with_one_group_per_expert_shard(rng):
    """n_group == number of expert shards: each token's experts live on <= topk_group shards,
    so the dispatch all_to_all sends every token to at most topk_group devices."""
    cfg = config.tiny(n_routed_experts=32, n_group=8, topk_group=3, num_experts_per_tok=6)
    shards = cfg.n_group
    s = jax.nn.sigmoid(jnp.asarray(rng.standard_normal((512, 32)), jnp.float32))
    bias = jnp.asarray(rng.normal(0, 0.2, 32), jnp.float32)
    r = moe.route(s, bias, cfg)
    shard_of = np.asarray(r.experts_NP) // (cfg.n_routed_experts // shards)
    per_token = [len(set(row)) for row in shard_of]
    assert max(per_token) <= cfg.topk_group and max(per_token) == cfg.topk_group
    # the all-to-all plan agrees: rows for a token are sent to exactly those shards
    plan, _, _ = moe_ep.plan_all_to_all(r.experts_NP, shards, 32 // shards, capacity=512 * 6)
    dest_shard = np.asarray(plan.dest_row_NP) // (512 * 6)
    np.testing.assert_array_equal(dest_shard, shard_of)


def test_pallas_dispatch_path_equals_jnp_path(rng):
    """gemm_impl='pallas' sends permute/unpermute through the Pallas kernels (interpreted here)."""
    cfg = config.tiny(moe_tile_m=8)
    layer, variables, x, valid = _moe_setup(cfg, rng, n_tokens=32, skew=True)
    pallas = moe.MoE(cfg.replace(gemm_impl="pallas"))

    def run(layer):
        f = lambda p, x: layer.apply({"params": p, "router_bias": variables["router_bias"]},
                                     x, valid)[0].sum()
        return jax.value_and_grad(f, argnums=(0, 1))(variables["params"], x)

    (a, ga), (b, gb) = run(layer), run(pallas)
    np.testing.assert_allclose(a, b, rtol=1e-5)
    for u, w in zip(jax.tree.leaves(ga), jax.tree.leaves(gb)):
        np.testing.assert_allclose(u, w, rtol=1e-4, atol=1e-5)
