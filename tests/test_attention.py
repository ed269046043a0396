"""Blockwise (flash) attention (dsv3_jax/layers/attention.py) against the materialised reference:
values and gradients w.r.t. q, k, v within 1e-5 in float32 (fresh random inputs per run), causal
and not, packed segments, T not a multiple of the block, MLA's shapes and YaRN's softmax scale;
the model with train_attention=blockwise equals the reference model; the blockwise VJP saves no
[T,S]-sized array; auto resolves by length; tokamax (GPU only) when present."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax._src.ad_checkpoint import saved_residuals

from dsv3_jax import config, model
from dsv3_jax.config import ConfigError
from dsv3_jax.layers import attention as A
from dsv3_jax.layers import mla

ON_GPU = jax.default_backend() == "gpu"
YARN = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 256, "beta_fast": 32,
        "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0}


def packed_segments(rng, b, t, padding=True):
    """Sorted document ids per row (packing), some rows ending in padding (id 0 after docs)."""
    rows = []
    for _ in range(b):
        cuts = np.sort(rng.choice(np.arange(1, t), size=min(3, t - 1), replace=False)) \
            if t > 1 else []
        seg = np.searchsorted(cuts, np.arange(t), side="right") + 1
        if padding and t > 4 and rng.random() < 0.5:
            seg[-rng.integers(1, t // 4 + 1):] = seg.max() + 1   # trailing padding document
        rows.append(seg)
    return jnp.asarray(np.stack(rows), jnp.int32)


def qkv(rng, b, t, h, x, v, s=None):
    f = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.float32)
    s = t if s is None else s
    return f(b, t, h, x), f(b, s, h, x), f(b, s, h, v)


def assert_values_and_grads(f, g, args, atol=1e-5):
    """Outputs and d/dq, d/dk, d/dv of <f, w> within atol x max(1, |reference|)."""
    with jax.default_matmul_precision("highest"):
        out_f, out_g = jax.jit(f)(*args), jax.jit(g)(*args)
        w = jnp.asarray(np.random.default_rng(0).standard_normal(out_f.shape), out_f.dtype)
        grad = lambda fn: jax.jit(jax.grad(lambda *a: (fn(*a) * w).sum(), argnums=(0, 1, 2)))
        gf, gg = grad(f)(*args), grad(g)(*args)
    scaled = lambda ref: atol * max(1.0, float(jnp.abs(ref).max()))
    np.testing.assert_allclose(out_f, out_g, atol=scaled(out_g), rtol=0)
    for name, a, b in zip("qkv", gf, gg):
        np.testing.assert_allclose(a, b, atol=scaled(b), rtol=0, err_msg=f"d{name}")


CASES = [  # b, t, h, x, v, block_q, block_k, causal, segments
    (2, 1, 2, 24, 16, 16, 16, True, True),        # a single token
    (2, 7, 3, 24, 16, 16, 16, False, True),       # shorter than a block
    (2, 100, 3, 48, 32, 32, 16, True, True),      # the tiny dims; T not a multiple of a block
    (2, 100, 3, 48, 32, 16, 32, False, True),
    (2, 100, 3, 48, 32, 32, 32, True, False),
    (2, 128, 2, 48, 32, 32, 32, False, False),    # exact multiple
    (1, 200, 2, 192, 128, 64, 128, True, True),   # MLA's dims (128 nope + 64 rope, v 128)
    (1, 200, 2, 192, 128, 128, 64, False, True),
]


def tol(ref):
    """1e-5 of the reference's magnitude (f32 summation-order noise; values are O(1))."""
    return 1e-5 * max(1.0, float(jnp.abs(ref).max()))


@pytest.mark.parametrize("b,t,h,x,v,bq,bk,causal,segments", CASES)
def test_blockwise_equals_reference(b, t, h, x, v, bq, bk, causal, segments, rng):
    q, k, val = qkv(rng, b, t, h, x, v)
    seg = packed_segments(rng, b, t) if segments else None
    scale = float(rng.uniform(0.5, 2.0)) * x ** -0.5
    f = lambda q, k, v: A.flash_attention(q, k, v, seg, scale=scale, causal=causal,
                                          block_q=bq, block_k=bk)
    g = lambda q, k, v: A.reference_attention(q, k, v, seg, scale=scale, causal=causal)
    assert_values_and_grads(f, g, (q, k, val))


def test_blockwise_equals_reference_float64(rng):
    """In float64 the two agree to rounding (1e-12): the algorithm is exact, not approximate."""
    with jax.enable_x64(True):
        q, k, val = (jnp.asarray(a, jnp.float64) for a in qkv(rng, 2, 90, 2, 24, 16))
        seg = packed_segments(rng, 2, 90)
        f = lambda q, k, v: A.flash_attention(q, k, v, seg, scale=0.2, block_q=32, block_k=16)
        g = lambda q, k, v: A.reference_attention(q, k, v, seg, scale=0.2)
        assert_values_and_grads(f, g, (q, k, val), atol=1e-12)


def test_unsorted_segments_and_cross_attention(rng):
    """Segment ids that are not contiguous (no document skipping) and T != S with separate key
    ids: still exact."""
    b, t, s = 2, 40, 72
    q, k, val = qkv(rng, b, t, 2, 24, 16, s=s)
    qs, ks = rng.integers(0, 3, (b, t)), rng.integers(0, 3, (b, s))
    qs[:, :3] = ks[:, :3] = [0, 1, 2]          # every query has a key (causal too)
    qs, ks = jnp.asarray(qs, jnp.int32), jnp.asarray(ks, jnp.int32)
    for causal in (True, False):
        f = lambda q, k, v: A.flash_attention(q, k, v, qs, ks, scale=0.2, causal=causal,
                                              block_q=16, block_k=16)
        g = lambda q, k, v: A.reference_attention(q, k, v, qs, ks, scale=0.2, causal=causal)
        assert_values_and_grads(f, g, (q, k, val))
    seg = jnp.asarray(rng.integers(0, 3, (b, t)), jnp.int32)      # self-attention, unsorted
    f = lambda q, k, v: A.flash_attention(q, k, v, seg, scale=0.2, block_q=16, block_k=8)
    g = lambda q, k, v: A.reference_attention(q, k, v, seg, scale=0.2)
    q, k, val = qkv(rng, b, t, 2, 24, 16)
    assert_values_and_grads(f, g, (q, k, val))


def test_query_without_keys_gives_zero_output_and_gradient(rng):
    q, k, val = qkv(rng, 1, 20, 2, 8, 8, s=24)
    qs = jnp.asarray(np.r_[np.full(10, 5), np.zeros(10)][None], jnp.int32)   # id 5: no key
    ks = jnp.zeros((1, 24), jnp.int32)
    f = lambda q, k, v: A.flash_attention(q, k, v, qs, ks, scale=0.3, causal=False, block_q=8,
                                          block_k=8)
    out = f(q, k, val)
    np.testing.assert_array_equal(out[:, :10], 0.0)
    dq, dk, _ = jax.grad(lambda *a: f(*a).sum(), argnums=(0, 1, 2))(q, k, val)
    np.testing.assert_array_equal(dq[:, :10], 0.0)
    g = lambda q, k, v: A.reference_attention(q[:, 10:], k, v, qs[:, 10:], ks, scale=0.3,
                                              causal=False)
    np.testing.assert_allclose(out[:, 10:], g(q, k, val), atol=1e-5)
    np.testing.assert_allclose(dk, jax.grad(lambda *a: g(*a).sum(), argnums=1)(q, k, val),
                               atol=1e-5)


def test_blockwise_equals_mla_attend_with_yarn_scale(rng):
    """Against the reference path itself (mla.attend_causal_blocks on the split nope/rope inputs), MLA
    dims, YaRN's softmax scale (mscale^2), packed documents."""
    cfg = config.tiny(qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
                      num_attention_heads=2, num_key_value_heads=2, rope_scaling=YARN)
    scale = config.softmax_scale(cfg)
    assert scale != pytest.approx(192 ** -0.5)
    b, t, h = 2, 200, 2
    f32 = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.float32)
    q_nope, q_rope, k_nope, k_rope, val = f32(b, t, h, 128), f32(b, t, h, 64), \
        f32(b, t, h, 128), f32(b, t, 64), f32(b, t, h, 128)
    seg = packed_segments(rng, b, t)
    index = jnp.broadcast_to(jnp.arange(t), (b, t))
    mask = mla.attention_mask(seg, seg, index, index)

    def blockwise(q_nope, q_rope, k_nope, k_rope, val):
        k_r = jnp.broadcast_to(k_rope[:, :, None], (b, t, h, 64))
        return A.flash_attention(jnp.concatenate([q_nope, q_rope], -1),
                                 jnp.concatenate([k_nope, k_r], -1), val, seg, scale=scale,
                                 block_q=64, block_k=32)

    ref = lambda *a: mla.attend_causal_blocks(*a, mask, scale, 4)
    args = (q_nope, q_rope, k_nope, k_rope, val)
    with jax.default_matmul_precision("highest"):
        np.testing.assert_allclose(jax.jit(blockwise)(*args), jax.jit(ref)(*args), atol=1e-5,
                                   rtol=0)
        g1 = jax.jit(jax.grad(lambda a: (blockwise(*a) ** 2).sum()))(args)
        g2 = jax.jit(jax.grad(lambda a: (ref(*a) ** 2).sum()))(args)
    for a, b_ in zip(g1, g2):   # the shared rope key's gradient sums over heads
        np.testing.assert_allclose(a, b_, atol=1e-5 * max(1.0, float(jnp.abs(b_).max())), rtol=0)


def test_saved_residuals_have_no_t_by_s_array(rng):
    """The VJP keeps q, k, v, out, lse and O(T) ints; the reference keeps [B,H,T,S] probs."""
    b, t, h, x, v = 1, 1024, 2, 24, 16
    q, k, val = qkv(rng, b, t, h, x, v)
    seg = packed_segments(rng, b, t)
    f = lambda q, k, v: A.flash_attention(q, k, v, seg, scale=0.1, block_q=128, block_k=128).sum()
    g = lambda q, k, v: A.reference_attention(q, k, v, seg, scale=0.1).sum()
    sizes = lambda fn: [np.prod(r[0].shape) for r in saved_residuals(fn, q, k, val)]
    assert max(sizes(f)) <= b * t * h * x < t * t
    assert max(sizes(g)) >= b * h * t * t


def test_causal_and_document_tiles_are_skipped():
    """Packed documents: each query block visits only the key blocks from its earliest
    document's start up to the diagonal (and the backward mirrors it)."""
    t, blk = 64, 8
    seg = jnp.asarray(np.repeat([1, 2, 3, 4], 16)[None], jnp.int32)       # 4 docs of 16
    kv_r, q_r = A._block_ranges(seg, seg, True, True, t, t, blk, blk, t, t)
    np.testing.assert_array_equal(kv_r, [[0, 1], [0, 2], [2, 3], [2, 4], [4, 5], [4, 6],
                                         [6, 7], [6, 8]])
    np.testing.assert_array_equal(q_r, [[0, 2], [1, 2], [2, 4], [3, 4], [4, 6], [5, 6],
                                        [6, 8], [7, 8]])
    unsorted = seg[:, ::-1]
    kv_r, _ = A._block_ranges(unsorted, unsorted, True, True, t, t, blk, blk, t, t)
    np.testing.assert_array_equal(kv_r[:, 0], 0)


def test_model_blockwise_equals_reference(rng):
    """A small model's logits and parameter gradients with train_attention=blockwise (small
    blocks, packed documents, YaRN) equal the reference's."""
    ref_cfg = config.tiny(vocab_size=512, num_hidden_layers=2, num_nextn_predict_layers=0,
                          train_attention="reference", attn_causal_blocks=2, rope_scaling=YARN)
    blk_cfg = ref_cfg.replace(train_attention="blockwise", attn_block_size=16)
    v = model.init(ref_cfg, jax.random.key(int(rng.integers(1 << 30))))
    b, t = 2, 72
    ids = jnp.asarray(rng.integers(0, 512, (b, t)), jnp.int32)
    seg = packed_segments(rng, b, t)

    def loss(params, cfg):
        out = model.forward(cfg, {**v, "params": params}, ids, segment_ids=seg, with_mtp=False)
        return jnp.mean(jax.nn.log_softmax(out.logits)[..., 0]), out.logits

    with jax.default_matmul_precision("highest"):
        (l1, lg1), g1 = jax.jit(jax.value_and_grad(loss, has_aux=True), static_argnums=1)(
            v["params"], blk_cfg)
        (l2, lg2), g2 = jax.jit(jax.value_and_grad(loss, has_aux=True), static_argnums=1)(
            v["params"], ref_cfg)
    np.testing.assert_allclose(lg1, lg2, atol=1e-5 * max(1.0, float(jnp.abs(lg2).max())), rtol=0)
    for a, b_ in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
        np.testing.assert_allclose(a, b_, atol=1e-5 * max(1e-3, float(jnp.abs(b_).max())), rtol=0)


def test_auto_and_config_validation():
    assert A.resolve("auto", 256, "cpu") == "reference"
    assert A.resolve("auto", A.AUTO_MIN_BLOCKWISE_T, "cpu") == "blockwise"
    assert A.resolve("auto", 32768, "tpu") == "blockwise"
    assert A.resolve("reference", 1 << 20, "cpu") == "reference"
    assert config.tiny().train_attention == "auto"
    with pytest.raises(ConfigError, match="train_attention"):
        config.tiny(train_attention="flash")
    with pytest.raises(ConfigError, match="attn_block_size"):
        config.tiny(attn_block_size=100)


@pytest.mark.skipif(not (ON_GPU and A.tokamax_available()), reason="needs a GPU and tokamax")
def test_tokamax_equals_reference_bf16(rng):
    """Hopper path, bf16, batch 2, causal with packed documents, MLA and tiny dims."""
    for x, v in ((192, 128), (48, 32)):
        q, k, val = qkv(rng, 2, 512, 4, x, v)
        seg = packed_segments(rng, 2, 512, padding=False)
        f = lambda q, k, v: A.tokamax_attention(q, k, v, seg, scale=x ** -0.5)
        g = lambda q, k, v: A.reference_attention(q, k, v, seg, scale=x ** -0.5)
        out_f, out_g = f(q, k, val), g(q, k, val)
        np.testing.assert_allclose(out_f, out_g, atol=3e-2, rtol=0)
        w = jnp.asarray(rng.standard_normal(out_f.shape), jnp.float32)
        gf = jax.grad(lambda *a: (f(*a) * w).sum(), argnums=(0, 1, 2))(q, k, val)
        gg = jax.grad(lambda *a: (g(*a) * w).sum(), argnums=(0, 1, 2))(q, k, val)
        for a, b_ in zip(gf, gg):
            np.testing.assert_allclose(a, b_, atol=5e-2 * max(1.0, float(jnp.abs(b_).max())))
