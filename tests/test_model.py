"""Whole-model properties: packing, MTP shifts, gradients, logical axes."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsv3_jax import config, model


# jitted once per config: eager flax apply of scanned blocks is slow
fwd = jax.jit(model.forward, static_argnums=0, static_argnames="with_mtp")


@pytest.fixture(scope="module")
def tiny():
    cfg = config.tiny(vocab_size=512)
    return cfg, model.init(cfg, jax.random.key(0))


def test_output_shapes(tiny):
    cfg, v = tiny
    out = fwd(cfg, v, jnp.zeros((2, 16), jnp.int32))
    assert out.logits.shape == (2, 16, 512) and out.logits.dtype == jnp.float32
    assert out.mtp_logits.shape == (1, 2, 16, 512)
    assert out.router.counts.shape == (cfg.num_moe_layers, cfg.n_routed_experts)
    assert out.router.balance_loss.shape == (cfg.num_moe_layers,)
    assert out.mtp_router.counts.shape == (1, cfg.n_routed_experts)
    np.testing.assert_array_equal(out.router.counts.sum(-1), 2 * 16 * cfg.num_experts_per_tok)


def test_packed_segments_do_not_attend_across_documents(tiny, rng):
    """Two documents packed in one row give the logits each gets alone (positions restart)."""
    cfg, v = tiny
    a, b = rng.integers(0, 512, 9), rng.integers(0, 512, 7)
    packed = jnp.asarray(np.concatenate([a, b])[None], jnp.int32)
    seg = jnp.asarray([[1] * 9 + [2] * 7], jnp.int32)
    pos = jnp.asarray([list(range(9)) + list(range(7))], jnp.int32)
    with jax.default_matmul_precision("highest"):
        out = fwd(cfg, v, packed, positions=pos, segment_ids=seg, with_mtp=False).logits
        alone_a = fwd(cfg, v, jnp.asarray(a[None], jnp.int32), with_mtp=False).logits
        alone_b = fwd(cfg, v, jnp.asarray(b[None], jnp.int32), with_mtp=False).logits
    np.testing.assert_allclose(out[0, :9], alone_a[0], atol=1e-5)
    np.testing.assert_allclose(out[0, 9:], alone_b[0], atol=1e-5)


def test_causality_via_gradients(tiny):
    """d logits[t] / d embedding[s] is zero for s > t (main head), s > t+1 (MTP depth 1)."""
    cfg, v = tiny
    ids = jnp.arange(12, dtype=jnp.int32)[None] * 7
    t = 5

    def emb_grad(head):
        def f(params):
            out = fwd(cfg, {"params": params, "router_bias": v["router_bias"]}, ids)
            return (out.logits[0, t] if head == "main" else out.mtp_logits[0, 0, t]).sum()
        g = jax.grad(f)(v["params"])["embed"]
        return np.abs(np.asarray(g)[np.asarray(ids[0])]).sum(-1)

    g_main, g_mtp = emb_grad("main"), emb_grad("mtp")
    assert (g_main[:t + 1] > 0).all() and (g_main[t + 1:] == 0).all()
    assert (g_mtp[:t + 2] > 0).all() and (g_mtp[t + 2:] == 0).all()


def test_mtp_depth1_predicts_t_plus_2(tiny):
    """The MTP module at position i embeds token i+1 (so it can predict i+2): changing token j
    changes MTP logits at j-1 but none before."""
    cfg, v = tiny
    ids = jnp.asarray(np.arange(10)[None] * 3, jnp.int32)
    base = fwd(cfg, v, ids).mtp_logits[0, 0]
    changed = fwd(cfg, v, ids.at[0, 6].set(99)).mtp_logits[0, 0]
    diff = np.abs(np.asarray(base - changed)).max(-1)
    assert (diff[:5] == 0).all() and diff[5] > 0


def test_jit_equals_eager(tiny, rng):
    cfg, v = tiny
    ids = jnp.asarray(rng.integers(0, 512, (2, 11)), jnp.int32)
    eager = model.forward(cfg, v, ids)
    jitted = jax.jit(lambda v, i: model.forward(cfg, v, i))(v, ids)
    np.testing.assert_allclose(eager.logits, jitted.logits, atol=1e-5)


def test_grad_matches_finite_differences_float64(rng):
    cfg = config.tiny(vocab_size=64, hidden_size=32, intermediate_size=48, moe_intermediate_size=16,
                      num_hidden_layers=2, q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8,
                      qk_rope_head_dim=8, v_head_dim=8, num_attention_heads=2,
                      num_key_value_heads=2, dtype="float64", param_dtype="float64",
                      initializer_range=0.3)
    ids = jnp.asarray(rng.integers(0, 64, (2, 6)), jnp.int32)
    with jax.enable_x64(True):
        v = model.init(cfg, jax.random.key(int(rng.integers(1 << 30))))
        params = v["params"]

        @jax.jit
        def loss(p):
            out = model.forward(cfg, {"params": p, "router_bias": v["router_bias"]}, ids)
            lp = jax.nn.log_softmax(out.logits[:, :-1])
            ce = -jnp.take_along_axis(lp, ids[:, 1:, None], -1).mean()
            return ce + out.mtp_logits.mean() + out.router.balance_loss.sum()

        grads = jax.grad(loss)(params)
        leaves, treedef = jax.tree.flatten(params)
        gleaves = jax.tree.leaves(grads)
        eps = 1e-6
        checked = 0
        for i, (leaf, g) in enumerate(zip(leaves, gleaves)):
            for _ in range(2):
                idx = tuple(int(rng.integers(0, d)) for d in leaf.shape)
                def at(delta):
                    new = list(leaves)
                    new[i] = leaf.at[idx].add(delta)
                    return loss(jax.tree.unflatten(treedef, new))
                fd = (at(eps) - at(-eps)) / (2 * eps)
                assert abs(fd - g[idx]) <= 1e-6 + 1e-4 * abs(fd), (i, idx, fd, g[idx])
                checked += 1
        assert checked >= 2 * len(leaves)


def test_every_param_has_logical_axes(tiny):
    cfg, _ = tiny
    axes = model.logical_axes(cfg)
    shapes = model.abstract_variables(cfg)
    known = {"vocab", "embed", "q_lora", "kv_lora", "heads", "head_dim", "mlp", "moe_mlp",
             "expert", "layers", "norm", "mtp_concat"}
    for spec, leaf in zip(jax.tree.leaves(axes, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec)),
                          jax.tree.leaves(shapes)):
        assert len(spec) == leaf.ndim and set(spec) <= known, (spec, leaf.shape)


def test_abstract_variables_allocate_nothing():
    shapes = model.abstract_variables(config.deepseek_v3_671b())
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(shapes))


def test_speed_knobs_and_skipped_head_change_nothing(tiny, rng):
    """scan_unroll (how XLA loops over layers) and attn_causal_blocks (query blocks that skip
    the masked keys) leave the outputs equal; with_logits=False only skips the head (its hidden
    states are what the trainer's fused head + CE reads)."""
    cfg, variables = tiny
    ids = jnp.asarray(rng.integers(0, cfg.vocab_size, (2, 12)), jnp.int32)
    with jax.default_matmul_precision("highest"):
        a = model.forward(cfg, variables, ids)
        b = model.forward(cfg.replace(scan_unroll=3, attn_causal_blocks=4), variables, ids)
        c = model.forward(cfg, variables, ids, with_logits=False)
    np.testing.assert_allclose(a.logits, b.logits, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(a.mtp_logits, b.mtp_logits, rtol=1e-5, atol=1e-5)
    assert c.logits is None and c.mtp_logits is None
    lm_head = variables["params"]["lm_head"]
    with jax.default_matmul_precision("highest"):
        np.testing.assert_allclose(c.hidden @ lm_head, a.logits, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(c.mtp_hidden @ lm_head, a.mtp_logits, rtol=1e-4, atol=1e-4)


def test_bf16_compute_keeps_float32_weight_gradients(rng):
    """With BF16 compute and FP32 master weights, a Linear's weight gradient is accumulated and
    returned in FP32 (autodiff through w.astype(bf16) would round it to BF16: ~1e-3 error)."""
    from dsv3_jax.layers.common import linear_dot
    cfg = config.tiny(dtype="bfloat16")
    x = jnp.asarray(rng.standard_normal((64, 32)), jnp.bfloat16)
    w = jnp.asarray(rng.standard_normal((32, 16)), jnp.float32)
    g = jnp.asarray(rng.standard_normal((64, 16)), jnp.bfloat16)
    y, vjp = jax.vjp(lambda x, w: linear_dot(x, w, 1, cfg), x, w)
    dx, dw = vjp(g)
    assert y.dtype == dx.dtype == jnp.bfloat16 and dw.dtype == jnp.float32
    x64, g64 = np.asarray(x, np.float64), np.asarray(g, np.float64)
    want = x64.T @ g64                                 # exact for BF16 inputs, up to FP32 sums
    assert np.abs(np.asarray(dw, np.float64) - want).max() <= 1e-5 * np.abs(want).max()
    w_bf16 = np.asarray(w.astype(jnp.bfloat16), np.float64)
    np.testing.assert_allclose(np.asarray(y, np.float64), x64 @ w_bf16, rtol=2e-2, atol=2e-2)
