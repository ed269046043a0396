"""The MLA latent cache: cached decoding equals the full-sequence forward at every step, absorbed
equals naive, padding and partial commits are invisible, the cache holds exactly c_kv and the
rotated rope key, and its size is the formula."""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsv3_jax import config, kv_cache, model
from dsv3_jax.layers.common import apply_rope, rope_cos_sin
from dsv3_jax.layers.mla import MLA

YARN = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32, "beta_fast": 32,
        "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0}

fwd = jax.jit(model.forward, static_argnums=0, static_argnames="with_mtp")


def _decode(cfg, variables, cache, ids, positions, attn_impl, num_kept=None):
    ctx = kv_cache.step_context(cache, positions, attn_impl)
    out, stacks = model.decode(cfg, variables, ids, positions, cache, ctx)
    kept = jnp.full((ids.shape[0],), ids.shape[1], jnp.int32) if num_kept is None else num_kept
    return out, kv_cache.commit(cache, ctx, stacks, kept)


decode = jax.jit(_decode, static_argnums=(0, 5))


def scaled_init(cfg, seed, factor=2.5):
    """Weights large enough that activations are O(1): a wrong scale or a wrong rope must show
    (the default init leaves logits nearly flat)."""
    v = model.init(cfg, jax.random.key(seed))
    rng = np.random.default_rng(seed)
    params = jax.tree.map(lambda a: a * factor if a.ndim > 1 else
                          a + 0.3 * jnp.asarray(rng.standard_normal(a.shape), a.dtype), v["params"])
    bias = jax.tree.map(lambda a: jnp.asarray(0.05 * rng.standard_normal(a.shape), a.dtype),
                        v["router_bias"])
    return {"params": params, "router_bias": bias}


@pytest.fixture(scope="module")
def tiny():
    cfg = config.tiny(vocab_size=512)
    return cfg, scaled_init(cfg, 0)


@pytest.fixture(scope="module")
def yarn(tiny):
    """The same weights with YaRN rope and softmax scaling."""
    return config.tiny(vocab_size=512, rope_scaling=YARN), tiny[1]


def assert_close(ours, ref, rel=1e-5):
    """f32 noise floor scaled to the logits' magnitude (tests/parity notes)."""
    ref = np.asarray(ref)
    np.testing.assert_allclose(np.asarray(ours), ref, rtol=0,
                               atol=rel * max(1.0, float(np.abs(ref).max())))


@pytest.fixture(scope="module")
def tiny_blockwise(tiny):
    """The same weights with the blockwise (flash) training attention in several blocks."""
    return config.tiny(vocab_size=512, train_attention="blockwise", attn_block_size=8), tiny[1]


@pytest.mark.parametrize("model_fixture,attn_impl", [("tiny", "absorbed"), ("tiny", "naive"),
                                                   ("yarn", "absorbed"),
                                                   ("tiny_blockwise", "absorbed")])
def test_cached_decode_equals_full_forward_at_every_step(model_fixture, attn_impl, rng, request):
    """Prefill 5 tokens, then steps of 1, 3 (a verify-sized block) and 1 tokens: each step's
    logits equal the full forward's at those positions."""
    cfg, v = request.getfixturevalue(model_fixture)
    b, t = 2, 14
    ids = jnp.asarray(rng.integers(0, 512, (b, t)), jnp.int32)
    pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    cache = kv_cache.init_cache(cfg, b, 16)
    with jax.default_matmul_precision("highest"):
        full = fwd(cfg, v, ids, with_mtp=False).logits
        start = 0
        for n in (5, 1, 3, 1, 1, 3):
            sl = slice(start, start + n)
            out, cache = decode(cfg, v, cache, ids[:, sl], pos[:, sl], attn_impl)
            assert_close(out.logits, full[:, sl])
            start += n
    assert start == t
    np.testing.assert_array_equal(cache.length, [t, t])


def test_absorbed_equals_naive_mla(rng):
    """One MLA layer, random cache with holes (padding) and a 3-token block: folding W_UK into
    the query and W_UV into the output gives the naive expansion's output."""
    cfg = config.tiny(rope_scaling=YARN)
    b, s, t = 2, 24, 3
    mla = MLA(cfg)
    x = jnp.asarray(rng.standard_normal((b, t, cfg.hidden_size)), jnp.float32)
    pos = jnp.asarray(rng.integers(0, 100, (b, t)), jnp.int32)
    params = nn.meta.unbox(jax.jit(mla.init)(jax.random.key(int(rng.integers(1 << 30))), x, pos,
                                             jnp.ones((b, t), jnp.int32)))
    params = jax.tree.map(lambda a: a * 5.0 if a.ndim > 1 else a, params)
    kv = kv_cache.LatentKV(jnp.asarray(rng.standard_normal((b, s, cfg.kv_lora_rank)), jnp.float32),
                           jnp.asarray(rng.standard_normal((b, s, cfg.qk_rope_head_dim)),
                                       jnp.float32))
    cache = kv_cache.KVCache({}, jnp.asarray(np.where(rng.random((b, s)) < 0.3, -1,
                                                      np.arange(s)), jnp.int32),
                             jnp.asarray([10, 17], jnp.int32))
    outs = {}
    with jax.default_matmul_precision("highest"):
        for impl in kv_cache.ATTN_IMPLS:
            ctx = kv_cache.step_context(cache, pos, impl)
            outs[impl], _ = jax.jit(functools.partial(mla.apply, method="decode"))(
                params, x, pos, kv, ctx)
    assert_close(outs["absorbed"], outs["naive"])
    assert np.abs(np.asarray(outs["naive"])).max() > 1.0          # not a trivially small output


@pytest.mark.parametrize("padding", ["left", "right"])
def test_padded_batch_equals_each_prompt_alone(tiny, padding, rng):
    """Prompts of lengths 4 and 11 prefilled together (padded) then decoded 3 teacher-forced
    steps: every row's logits equal that prompt decoded alone."""
    cfg, v = tiny
    lengths, steps = (4, 11), 3
    prompts = [rng.integers(0, 512, n) for n in lengths]
    forced = rng.integers(0, 512, (len(lengths), steps))
    width = max(lengths)
    positions = kv_cache.prompt_positions(list(lengths), width, padding)
    ids = np.zeros((len(lengths), width), np.int32)
    ids[positions >= 0] = np.concatenate(prompts)
    with jax.default_matmul_precision("highest"):
        cache = kv_cache.init_cache(cfg, len(lengths), width + steps)
        out, cache = decode(cfg, v, cache, jnp.asarray(ids), jnp.asarray(positions), "absorbed")
        batch_logits = [np.asarray(out.logits)[positions >= 0].reshape(-1, 512)]
        for i in range(steps):
            out, cache = decode(cfg, v, cache, jnp.asarray(forced[:, i:i + 1]),
                                jnp.asarray(np.asarray(lengths)[:, None] + i, jnp.int32),
                                "absorbed")
            batch_logits.append(np.asarray(out.logits)[:, 0])
        for r, (prompt, n) in enumerate(zip(prompts, lengths)):
            alone = kv_cache.init_cache(cfg, 1, n + steps)
            out, alone = decode(cfg, v, alone, jnp.asarray(prompt[None], jnp.int32),
                                jnp.arange(n, dtype=jnp.int32)[None], "absorbed")
            start = sum(lengths[:r])
            assert_close(batch_logits[0][start:start + n], out.logits[0])
            for i in range(steps):
                out, alone = decode(cfg, v, alone, jnp.asarray(forced[r:r + 1, i:i + 1]),
                                    jnp.full((1, 1), n + i, jnp.int32), "absorbed")
                assert_close(batch_logits[1 + i][r], out.logits[0, 0])


def test_partial_commit_drops_rejected_tokens(tiny, rng):
    """A 3-token block of which rows keep 1 and 3 (speculative decoding's rewind), then the next
    step: logits equal a full forward over just the kept tokens."""
    cfg, v = tiny
    prompt = rng.integers(0, 512, (2, 5))
    block = rng.integers(0, 512, (2, 3))
    nxt = rng.integers(0, 512, (2, 1))
    with jax.default_matmul_precision("highest"):
        cache = kv_cache.init_cache(cfg, 2, 16)
        _, cache = decode(cfg, v, cache, jnp.asarray(prompt, jnp.int32),
                          jnp.broadcast_to(jnp.arange(5, dtype=jnp.int32), (2, 5)), "absorbed")
        _, cache = decode(cfg, v, cache, jnp.asarray(block, jnp.int32),
                          5 + jnp.broadcast_to(jnp.arange(3, dtype=jnp.int32), (2, 3)), "absorbed",
                          jnp.asarray([1, 3], jnp.int32))
        np.testing.assert_array_equal(cache.length, [6, 8])
        np.testing.assert_array_equal(np.asarray(cache.positions)[0, 6:], -1)
        out, cache = decode(cfg, v, cache, jnp.asarray(nxt, jnp.int32),
                            jnp.asarray([[6], [8]], jnp.int32), "absorbed")
        for r, kept in enumerate((1, 3)):
            seq = np.concatenate([prompt[r], block[r, :kept], nxt[r]])[None]
            full = fwd(cfg, v, jnp.asarray(seq, jnp.int32), with_mtp=False).logits
            assert_close(out.logits[r, 0], full[0, -1])


def test_cache_holds_normalised_latent_and_rotated_rope_key(tiny, rng):
    """Layer 0's cache after a prefill is RMSNorm(c_kv) and RoPE(k_rope) of that layer's input,
    recomputed here from the parameters; each scanned layer's slice of the stack differs."""
    cfg, v = tiny
    ids = jnp.asarray(rng.integers(0, 512, (1, 9)), jnp.int32)
    pos = jnp.arange(9, dtype=jnp.int32)[None]
    with jax.default_matmul_precision("highest"):
        _, cache = decode(cfg, v, kv_cache.init_cache(cfg, 1, 12), ids, pos, "absorbed")
        p = jax.tree.map(lambda a: a[0], v["params"]["dense_layers"])["block"]
        x = v["params"]["embed"][ids]
        var = jnp.mean(x * x, -1, keepdims=True)
        h = x * jax.lax.rsqrt(var + cfg.rms_norm_eps) * p["attn_norm"]["scale"][None, None]
        c_kv, k_rope = jax.jit(functools.partial(MLA(cfg).apply, method="project_latent"))(
            {"params": p["attn"]}, h)
        cos, sin = rope_cos_sin(cfg, pos)
        k_rope = apply_rope(k_rope, cos, sin, cfg.rope_interleave)
    dense = cache.stacks["dense_layers"]
    np.testing.assert_allclose(dense.c_kv[0, :, :9], c_kv, atol=1e-5)
    np.testing.assert_allclose(dense.k_rope[0, :, :9], k_rope, atol=1e-5)
    np.testing.assert_array_equal(dense.c_kv[0, :, 9:], 0)              # unwritten slots
    moe = np.asarray(cache.stacks["moe_layers"].c_kv)
    assert moe.shape[0] == cfg.num_moe_layers
    assert all(np.abs(moe[i] - moe[i + 1]).max() > 1e-3 for i in range(len(moe) - 1))


@pytest.mark.parametrize("preset,dtype,with_mtp", [("tiny", "float32", False),
                                                   ("small", "bfloat16", True)])
def test_cache_nbytes_is_the_formula(preset, dtype, with_mtp):
    cfg = config.preset(preset)
    b, s = 3, 40
    cache = kv_cache.init_cache(cfg, b, s, dtype=dtype, with_mtp=with_mtp)
    layers = cfg.num_hidden_layers + (cfg.num_nextn_predict_layers if with_mtp else 0)
    formula = layers * b * s * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * jnp.dtype(dtype).itemsize
    assert cache.nbytes == formula == kv_cache.latent_bytes(cfg, b, s, dtype=dtype,
                                                            with_mtp=with_mtp)
    assert cache.bookkeeping_nbytes == b * (s + 1) * 4
    for kv in cache.stacks.values():                           # [layers, batch, max_len, ...]
        assert kv.c_kv.shape[1:] == (b, s, cfg.kv_lora_rank)
        assert kv.k_rope.shape[1:] == (b, s, cfg.qk_rope_head_dim)


def test_release_cache_is_576_values_per_token_per_layer():
    cfg = config.deepseek_v3_671b()
    shapes = jax.eval_shape(lambda: kv_cache.init_cache(cfg, 1, 1, dtype="bfloat16"))
    assert sum(x.size for x in jax.tree.leaves(shapes.stacks)) == 61 * 576
    assert kv_cache.latent_bytes(cfg, 1, 1, dtype="bfloat16") == 61 * 576 * 2
    # versus every head's k (192) and v (128): 71x more
    assert kv_cache.mha_values_per_token_per_layer(cfg) == 128 * (192 + 128)


def test_remat_config_decodes(rng):
    """nn.remat wraps only the training call; the decode method of the stack still works."""
    cfg = config.tiny(vocab_size=512, remat="selective", num_hidden_layers=2,
                      num_nextn_predict_layers=0)
    v = scaled_init(cfg, 2)
    ids = jnp.asarray(rng.integers(0, 512, (1, 5)), jnp.int32)
    with jax.default_matmul_precision("highest"):
        out, _ = decode(cfg, v, kv_cache.init_cache(cfg, 1, 8), ids,
                        jnp.arange(5, dtype=jnp.int32)[None], "naive")
        assert_close(out.logits, fwd(cfg, v, ids, with_mtp=False).logits)
