"""The FP8 recipe (dsv3_jax/fp8.py): E4M3 tile quantization, fp8_dot and fp8_grouped_dot.

Fresh random inputs per test (the `rng` fixture prints its seed). Error bounds are derived from
E4M3 itself rather than tuned: a value rounded to E4M3 (3 mantissa bits) moves by at most half an
ulp, 2^-4 of its magnitude while normal (|q| >= 2^-6), and at most 2^-10 (half the subnormal
spacing 2^-9) below that; both are in units of the tile's scale.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsv3_jax import fp8
from kernels_pallas.grouped_gemm import grouped_matmul_reference

REL_E4M3 = 2.0 ** -4          # half-ulp, relative, of a normal E4M3 value
ABS_SUBNORMAL = 2.0 ** -10    # half the subnormal spacing, in units of the scale


def rand(rng, shape, dtype=jnp.float32, spread=True):
    """Normal values; with `spread`, each row gets its own magnitude in 1e-7..1e3 so the tiles'
    scales differ by orders of magnitude (gradients and activations both occur)."""
    x = rng.standard_normal(shape)
    if spread:
        x *= 10.0 ** rng.uniform(-7, 3, shape[:-1] + (1,))
    return jnp.asarray(x, dtype)


def rounding_bound(x, scale_expanded):
    x = np.abs(np.asarray(x, np.float64))
    return np.maximum(REL_E4M3 * x, ABS_SUBNORMAL * scale_expanded) * (1 + 1e-6)


def _f64(a):
    return np.asarray(jnp.asarray(a, jnp.float32), np.float64)


# ---- quantization -----------------------------------------------------------------------------

@pytest.mark.parametrize("pow2", [False, True])
@pytest.mark.parametrize("shape", [(5, 300), (2, 3, 128), (7, 1)])
def test_1x128_error_within_e4m3_rounding_of_each_tile(shape, pow2, rng):
    x = rand(rng, shape)
    q, s = fp8.quantize_1x128(x, pow2_scale=pow2)
    assert q.dtype == fp8.E4M3 and q.shape == x.shape
    assert s.shape == shape[:-1] + (-(-shape[-1] // 128),) and s.dtype == jnp.float32
    err = np.abs(_f64(fp8.dequantize_1x128(q, s)) - _f64(x))
    s_full = np.repeat(_f64(s), 128, axis=-1)[..., :shape[-1]]
    assert np.all(err <= rounding_bound(x, s_full))


@pytest.mark.parametrize("pow2", [False, True])
@pytest.mark.parametrize("shape", [(300, 200), (128, 256), (3, 130, 5)])
def test_128x128_error_within_e4m3_rounding_of_each_block(shape, pow2, rng):
    w = rand(rng, shape, spread=False) * 10.0 ** rng.uniform(-6, 2)
    q, s = fp8.quantize_128x128(w, pow2_scale=pow2)
    assert q.shape == w.shape
    assert s.shape == shape[:-2] + (-(-shape[-2] // 128), -(-shape[-1] // 128))
    err = np.abs(_f64(fp8.dequantize_128x128(q, s)) - _f64(w))
    s_full = np.repeat(np.repeat(_f64(s), 128, -2), 128, -1)[..., :shape[-2], :shape[-1]]
    assert np.all(err <= rounding_bound(w, s_full))


def test_scales_are_tile_amax_over_448_with_padding_ignored(rng):
    x = rand(rng, (4, 200))
    _, s = fp8.quantize_1x128(x)
    amax = np.stack([np.abs(_f64(x)[:, :128]).max(1), np.abs(_f64(x)[:, 128:]).max(1)], 1)
    np.testing.assert_allclose(_f64(s), amax / 448, rtol=1e-6)
    w = rand(rng, (130, 260), spread=False)
    _, sw = fp8.quantize_128x128(w)
    wf = np.abs(_f64(w))
    assert np.isclose(_f64(sw)[1, 2], wf[128:, 256:].max() / 448, rtol=1e-6)
    assert np.isclose(_f64(sw)[0, 1], wf[:128, 128:256].max() / 448, rtol=1e-6)


def test_pow2_scales_are_the_next_power_of_two(rng):
    x = rand(rng, (6, 256))
    _, s = fp8.quantize_1x128(x)
    _, s2 = fp8.quantize_1x128(x, pow2_scale=True)
    s, s2 = _f64(s), _f64(s2)
    assert np.all(np.log2(s2) == np.round(np.log2(s2)))
    assert np.all((s2 >= s) & (s2 < 2 * s))
    exact = jnp.full((1, 128), 448.0 * 2.0 ** -5)          # amax/448 is exactly 2^-5
    assert float(fp8.quantize_1x128(exact, pow2_scale=True)[1][0, 0]) == 2.0 ** -5


def test_zero_tiles_get_a_finite_scale_and_zero_values():
    x = jnp.zeros((3, 200)).at[1, 150].set(1e-3)
    q, s = fp8.quantize_1x128(x)
    assert np.all(np.isfinite(_f64(s))) and np.all(_f64(s) > 0)
    assert np.all(np.isfinite(_f64(q))) and float(jnp.abs(q.astype(jnp.float32)).sum()) == 448.0
    w_q, w_s = fp8.quantize_128x128(jnp.zeros((130, 5)))
    assert np.all(np.isfinite(_f64(w_s))) and not np.any(_f64(w_q))


def test_values_saturate_at_448(rng):
    """Scales below amax/448 (e.g. rounded down by float math) must clip, not overflow to NaN."""
    x = jnp.asarray(rng.standard_normal((4, 128)) * 1e3, jnp.float32)
    q = fp8._to_e4m3(x / 0.1)
    assert np.all(np.isfinite(_f64(q))) and np.abs(_f64(q)).max() == 448.0
    q, _ = fp8.quantize_1x128(x)
    assert np.abs(_f64(q)).max() == 448.0                    # the amax element maps to 448


# ---- the three GEMMs' operands ------------------------------------------------------------------

def test_operands_are_tiled_along_each_gemms_contraction(rng):
    m, k, n = 300, 200, 136
    x, w, dy = rand(rng, (m, k)), rand(rng, (k, n), spread=False), rand(rng, (m, n))
    qw = fp8.quantize_weight(w)
    kp, np_, mp = 256, 256, 384
    fprop = fp8.fprop_operands(x, qw)          # contracts K
    assert (fprop.lhs.shape, fprop.lhs_scale.shape) == ((m, kp), (m, 2))
    assert (fprop.rhs.shape, fprop.rhs_scale.shape) == ((np_, kp), (2, 2))
    dgrad = fp8.dgrad_operands(dy, qw)         # contracts N
    assert (dgrad.lhs.shape, dgrad.lhs_scale.shape) == ((m, np_), (m, 2))
    assert (dgrad.rhs.shape, dgrad.rhs_scale.shape) == ((kp, np_), (2, 2))
    wgrad = fp8.wgrad_operands(x, dy)          # contracts the tokens M: 128x1 tiles of x, dy
    assert (wgrad.lhs.shape, wgrad.lhs_scale.shape) == ((k, mp), (k, 3))
    assert (wgrad.rhs.shape, wgrad.rhs_scale.shape) == ((n, mp), (n, 3))
    xf, dyf = np.abs(_f64(x)), np.abs(_f64(dy))
    # orientation: which elements each scale covers
    assert np.isclose(_f64(fprop.lhs_scale)[7, 1], xf[7, 128:].max() / 448, rtol=1e-6)
    assert np.isclose(_f64(dgrad.lhs_scale)[7, 1], dyf[7, 128:].max() / 448, rtol=1e-6)
    assert np.isclose(_f64(wgrad.lhs_scale)[5, 2], xf[256:, 5].max() / 448, rtol=1e-6)
    assert np.isclose(_f64(wgrad.rhs_scale)[9, 1], dyf[128:256, 9].max() / 448, rtol=1e-6)
    wf = np.abs(_f64(w))
    assert np.isclose(_f64(fprop.rhs_scale)[1, 0], wf[:128, 128:].max() / 448, rtol=1e-6)
    np.testing.assert_array_equal(_f64(fprop.rhs.T), _f64(dgrad.rhs))   # one set of W blocks


# ---- fp8_dot ----------------------------------------------------------------------------------

IMPLS = ["jnp", "pallas"]


def cosine(a, b):
    a, b = _f64(a).ravel(), _f64(b).ravel()
    return a @ b / np.linalg.norm(a) / np.linalg.norm(b)


@pytest.mark.parametrize("impl", IMPLS)
def test_fp8_dot_within_e4m3_error_of_float32(impl, rng):
    """|y - x.w| <= sum_k (e_x |w| + |x| e_w + e_x e_w), elementwise, where e_x, e_w are the
    per-element rounding bounds of the quantized operands (module docstring). It is what FP8
    inputs can cost with exact accumulation; FP32 accumulation adds ~1e-6 relative."""
    x = rand(rng, (3, 70, 200), spread=False)
    w = rand(rng, (200, 136), spread=False) * 0.05
    y = fp8.fp8_dot(x, w, implementation=impl, out_dtype=jnp.float32)
    assert y.shape == (3, 70, 136) and y.dtype == jnp.float32
    x2, wf = _f64(x).reshape(-1, 200), _f64(w)
    _, sx = fp8.quantize_1x128(x.reshape(-1, 200))
    _, sw = fp8.quantize_128x128(w)
    ex = rounding_bound(x2, np.repeat(_f64(sx), 128, 1)[:, :200])
    ew = rounding_bound(wf, np.repeat(np.repeat(_f64(sw), 128, 0), 128, 1)[:200, :136])
    bound = ex @ np.abs(wf) + np.abs(x2) @ ew + ex @ ew
    err = np.abs(_f64(y).reshape(-1, 136) - x2 @ wf)
    assert np.all(err <= bound + 1e-5 * (np.abs(x2) @ np.abs(wf)))
    assert np.linalg.norm(err) / np.linalg.norm(x2 @ wf) < 0.1           # and not vacuous


@pytest.mark.parametrize("impl", IMPLS)
def test_fp8_dot_gradients_align_with_full_precision(impl, rng):
    """Dgrad and Wgrad in FP8: cosine similarity >= 0.99 with exact (FP32) gradients and with
    those of a BF16 matmul (the report's baseline); dtypes follow x, w. A linear loss makes dy
    the same in all three, so only the backward GEMMs are compared."""
    x = rand(rng, (2, 96, 200), jnp.bfloat16, spread=False)
    w = rand(rng, (200, 136), spread=False) * 0.05
    g = rand(rng, (2, 96, 136), spread=False)
    loss = lambda f: (lambda x, w: jnp.sum(f(x, w).astype(jnp.float32) * g))
    dx, dw = jax.grad(loss(lambda x, w: fp8.fp8_dot(x, w, implementation=impl)), (0, 1))(x, w)
    rx, rw = jax.grad(loss(lambda x, w: jnp.dot(x.astype(jnp.float32), w,
                                                precision="highest")), (0, 1))(x, w)
    bx, bw = jax.grad(loss(lambda x, w: jnp.dot(x, w.astype(jnp.bfloat16))), (0, 1))(x, w)
    assert dx.dtype == jnp.bfloat16 and dw.dtype == jnp.float32
    assert cosine(dx, rx) >= 0.99 and cosine(dw, rw) >= 0.99
    assert cosine(dx, bx) >= 0.99 and cosine(dw, bw) >= 0.99


def test_jnp_and_pallas_implementations_agree(rng):
    """Same quantized operands in all three GEMMs (a linear loss keeps dy independent of y), so
    the kernel and the jnp reference differ only in float32 summation order."""
    x, w = rand(rng, (130, 200), spread=False), rand(rng, (200, 72), spread=False)
    g = rand(rng, (130, 72), spread=False)
    run = lambda i: jax.value_and_grad(
        lambda x, w: jnp.sum(fp8.fp8_dot(x, w, implementation=i) * g), (0, 1))(x, w)
    for a, b in zip(jax.tree.leaves(run("pallas")), jax.tree.leaves(run("jnp"))):
        np.testing.assert_allclose(_f64(a), _f64(b), rtol=0, atol=1e-5 * np.abs(_f64(b)).max())


def test_fp8_dot_under_jit_grad_and_scan(rng):
    """A 3-layer scan of FP8 linears, jitted, differentiated: equals the eager unrolled loop."""
    ws = rand(rng, (3, 128, 128), spread=False) * 0.1
    x = rand(rng, (16, 128), spread=False)

    def net(ws, x):
        h, _ = jax.lax.scan(lambda h, w: (jnp.tanh(fp8.fp8_dot(h, w)), None), x, ws)
        return jnp.sum(h ** 2)

    def unrolled(ws, x):
        for w in ws:
            x = jnp.tanh(fp8.fp8_dot(x, w))
        return jnp.sum(x ** 2)

    v, g = jax.jit(jax.value_and_grad(net))(ws, x)
    v2, g2 = jax.value_and_grad(unrolled)(ws, x)
    np.testing.assert_allclose(float(v), float(v2), rtol=1e-5)
    # jit and eager sum in different orders, so now and then one gradient element lands on the
    # other side of an E4M3 rounding boundary (one FP8 step, ~6%, in a whole column of dW):
    # compare in norm, where a wrong scale, tile or residual would be of order 1.
    g, g2 = _f64(g), _f64(g2)
    assert np.linalg.norm(g - g2) <= 2e-2 * np.linalg.norm(g2), np.linalg.norm(g - g2)


@pytest.mark.parametrize("policy", ["everything_saveable", "save_anything_except_these_names"])
def test_remat_policies_that_save_fp8_residuals_change_nothing(policy, rng):
    """Under jax.checkpoint with a policy that saves the FP8 weight residual, the gradients are
    the plain ones. (jax's remat rounds saved float residuals with reduce_precision(4, 3), which
    XLA reads as IEEE E4M3 with max 240: E4M3FN values in (240, 448] became inf, and dx/dW NaN.)"""
    pol = getattr(jax.checkpoint_policies, policy)
    pol = pol("norm") if policy.endswith("names") else pol
    x, w = rand(rng, (64, 200), spread=False), rand(rng, (200, 136), spread=False) * 0.05
    x8, w8, te = grouped_case(rng, 16)
    dense = lambda x, w: jnp.sum(jnp.tanh(fp8.fp8_dot(x, w)))
    grouped = lambda x, w: jnp.sum(jnp.tanh(fp8.fp8_grouped_dot(x, w, te, tile_m=16)))
    for f, args in ((dense, (x, w)), (grouped, (x8, w8))):
        want = jax.grad(f, (0, 1))(*args)
        got = jax.jit(jax.grad(jax.checkpoint(f, policy=pol), (0, 1)))(*args)
        for a, b in zip(got, want):
            assert np.all(np.isfinite(_f64(a)))
            np.testing.assert_allclose(_f64(a), _f64(b), rtol=1e-5, atol=1e-6 * np.abs(_f64(b)).max())


# ---- fp8_grouped_dot --------------------------------------------------------------------------

def grouped_case(rng, tile_m, e=4, k=200, n=72):
    """Random group sizes with an empty expert, padded to tiles, two trailing zero tiles."""
    counts = rng.integers(1, 3 * tile_m, e)
    counts[rng.integers(e)] = 0
    tiles = -(-counts // tile_m)
    te = np.concatenate([np.repeat(np.arange(e), tiles), [e - 1, e - 1]]).astype(np.int32)
    x = np.zeros((len(te) * tile_m, k), np.float32)
    row = 0
    for c, t in zip(counts, tiles):
        x[row:row + c] = rng.standard_normal((c, k))
        row += t * tile_m
    w = rng.standard_normal((e, k, n)).astype(np.float32) * 0.05
    return jnp.asarray(x), jnp.asarray(w), jnp.asarray(te)


def grouped_oracle(x, w, te, tile_m):
    """A plain loop over tiles in float64."""
    x, w = _f64(x), _f64(w)
    return np.concatenate([x[t * tile_m:(t + 1) * tile_m] @ w[e]
                           for t, e in enumerate(np.asarray(te))])


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("tile_m", [16, 128])
def test_grouped_matches_loop_and_gradients_align(impl, tile_m, rng):
    x, w, te = grouped_case(rng, tile_m)
    g = jnp.asarray(rng.standard_normal((x.shape[0], w.shape[2])), jnp.float32)
    f = lambda x, w: fp8.fp8_grouped_dot(x, w, te, tile_m=tile_m, implementation=impl)
    y, (dx, dw) = f(x, w), jax.grad(lambda x, w: jnp.sum(f(x, w) * g), (0, 1))(x, w)
    ref = grouped_oracle(x, w, te, tile_m)
    assert np.linalg.norm(_f64(y) - ref) / np.linalg.norm(ref) < 0.08       # ~2 x 2^-4 / sqrt 3
    exact = lambda x, w: jnp.sum(grouped_matmul_reference(x, w, te, tile_m=tile_m,
                                                          precision="highest") * g)
    rx, rw = jax.grad(exact, (0, 1))(x, w)
    bf16 = lambda x, w: jnp.sum(grouped_matmul_reference(
        x.astype(jnp.bfloat16), w.astype(jnp.bfloat16), te, tile_m=tile_m).astype(jnp.float32) * g)
    bx, bw = jax.grad(bf16, (0, 1))(x, w)
    assert cosine(dx, rx) >= 0.99 and cosine(dw, rw) >= 0.99
    assert cosine(dx, bx) >= 0.99 and cosine(dw, bw) >= 0.99
    empty = np.setdiff1d(np.arange(w.shape[0]), np.asarray(te))
    assert not np.any(_f64(dw)[empty])


def test_grouped_used_tiles_zero_the_rest(rng):
    x, w, te = grouped_case(rng, 16)
    x = x.at[-32:].set(1.0)            # nonzero rows in the two trailing (unused) tiles
    used = te.shape[0] - 2
    f = lambda x, w: fp8.fp8_grouped_dot(x, w, te, tile_m=16, used_tiles=used)
    y = f(x, w)
    assert not np.any(_f64(y)[-32:])
    dx, dw = jax.grad(lambda x, w: jnp.sum(f(x, w)), (0, 1))(x, w)
    assert not np.any(_f64(dx)[-32:])
    dw_clean = jax.grad(lambda w: jnp.sum(f(x.at[-32:].set(0.0), w)))(w)
    np.testing.assert_allclose(_f64(dw), _f64(dw_clean), rtol=1e-6)


@pytest.mark.parametrize("tile_m", [8, 48, 128, 192])   # 192: more chunks than tiles
def test_wgrad_chunks_hold_one_expert_each_and_every_row_once(tile_m, rng):
    x, w, te = grouped_case(rng, tile_m, e=5)
    dy = jnp.asarray(rng.standard_normal((x.shape[0], 3)), jnp.float32)
    x_c, dy_c, chunk_expert = fp8.wgrad_chunks(x, dy, te, tile_m=tile_m, num_experts=5)
    assert x_c.shape[0] == dy_c.shape[0] == 128 * chunk_expert.shape[0]
    assert np.all(np.diff(np.asarray(chunk_expert)) >= 0)
    # per expert, x_c^T dy_c over its chunks equals x^T dy over its tiles (rows moved, not mixed)
    xc, dyc = _f64(x_c).reshape(-1, 128, x.shape[1]), _f64(dy_c).reshape(-1, 128, 3)
    ce = np.asarray(chunk_expert)
    rows_e = np.repeat(np.asarray(te), tile_m)
    for e in range(5):
        got = np.einsum("crk,crn->kn", xc[ce == e], dyc[ce == e])
        want = _f64(x)[rows_e == e].T @ _f64(dy)[rows_e == e]
        np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-9)


# ---- FP8 caching and dispatch (report §3.3.3) ------------------------------------------------

def _residuals(f, *args):
    from jax._src.ad_checkpoint import saved_residuals
    return [(aval, src) for aval, src in saved_residuals(f, *args)
            if "from the argument" not in src]


def test_cached_x_keeps_fprop_tiles_and_wgrad_retiles_them(rng):
    """cache_x: x is kept as Fprop's own 1x128 tiles with power-of-2 scales (E4M3 bits [M, Kp]
    + float32 scales [M, Kp/128], no copy of x); Wgrad re-tiles them 128x1, and with power-of-2
    scales on both sides that rounds (almost) nothing, where re-tiling with amax/448 scales
    would round most values a second time. dx does not involve x: the same bits as uncached."""
    from kernels_pallas import fp8_gemm
    x = rand(rng, (96, 200), jnp.bfloat16, spread=False)
    w = rand(rng, (200, 136), spread=False) * 0.05
    g = rand(rng, (96, 136), spread=False)
    run = lambda cache: jax.value_and_grad(
        lambda x, w: jnp.sum(fp8.fp8_dot(x, w, cache_x=cache, out_dtype=jnp.float32) * g),
        (0, 1))(x, w)
    (_, (dx1, dw1)), (_, (dx0, _)) = run(True), run(False)
    np.testing.assert_array_equal(_f64(dx1), _f64(dx0))
    q, s = fp8.quantize_1x128(x, pow2_scale=True)
    cached = fp8.dequantize_1x128(q, s)                     # the values the cache holds
    changed = lambda pow2: float(np.mean(_f64(fp8.dequantize_1x128(
        *fp8.quantize_1x128(cached.T, pow2_scale=pow2))) != _f64(cached.T)))
    assert changed(True) < 1e-3 and changed(False) > 0.3, (changed(True), changed(False))
    ops = fp8.wgrad_operands(cached, g, pow2_scale=False, pow2_x=True)
    dw_ref = fp8_gemm.fp8_gemm_reference(*ops, out_dtype=jnp.float32)[:200, :136]
    np.testing.assert_allclose(_f64(dw1), _f64(dw_ref), rtol=1e-6,
                               atol=1e-6 * np.abs(_f64(dw_ref)).max())
    assert cosine(dw1, _f64(x).T @ _f64(g)) >= 0.99
    res = _residuals(lambda x, w: jnp.sum(fp8.fp8_dot(x, w, cache_x=True)), x, w)
    kinds = sorted((a.dtype.name, a.shape) for a, _ in res)
    assert ("uint8", (96, 256)) in kinds and ("float32", (96, 2)) in kinds, kinds
    assert not any(a.dtype == jnp.bfloat16 and a.size for a, _ in res), kinds


def _swiglu_down_case(rng, tile_m=16, f=72, d=200):
    x, w_down, te = grouped_case(rng, tile_m, k=f, n=d)
    m = x.shape[0]
    rows = np.asarray(jnp.abs(x).sum(1) > 0)[:, None]
    gate = jnp.asarray(rng.standard_normal((m, f)) * rows, jnp.bfloat16)
    up = jnp.asarray(rng.standard_normal((m, f)) * rows, jnp.bfloat16)
    g = jnp.asarray(rng.standard_normal((m, d)) * rows, jnp.float32)
    return gate, up, w_down, te, g


@pytest.mark.parametrize("pow2", [False, True])
def test_swiglu_down_caches_its_inputs_in_fp8_and_recomputes_the_output(pow2, rng):
    """fp8_grouped_swiglu_down: the forward is fp8_grouped_dot(silu(gate) * up) exactly; the
    backward recomputes silu(gate) * up from FP8 gate and up, so its gradients are those of the
    uncached composite evaluated at the rounded inputs (float32 reassociation aside) and within
    FP8 error of float64; the residuals are the named FP8 tiles, no BF16 [M, F]."""
    tile_m = 16
    gate, up, w, te, g = _swiglu_down_case(rng, tile_m)
    fused = lambda a, b, w: fp8.fp8_grouped_swiglu_down(a, b, w, te, tile_m=tile_m,
                                                         pow2_scale=pow2)
    plain = lambda a, b, w: fp8.fp8_grouped_dot(jax.nn.silu(a) * b, w, te, tile_m=tile_m,
                                                pow2_scale=pow2)
    loss = lambda f: (lambda a, b, w: jnp.sum(f(a, b, w).astype(jnp.float32) * g))
    np.testing.assert_array_equal(_f64(fused(gate, up, w)), _f64(plain(gate, up, w)))
    got = jax.grad(loss(fused), (0, 1, 2))(gate, up, w)
    rounded = [fp8.dequantize_1x128(*fp8.quantize_1x128(a, pow2_scale=pow2), jnp.bfloat16)
               for a in (gate, up)]
    want = jax.grad(loss(plain), (0, 1, 2))(*rounded, w)
    for a, b in zip(got, want):
        np.testing.assert_allclose(_f64(a), _f64(b), rtol=0, atol=2e-2 * np.abs(_f64(b)).max())
    a64, b64 = _f64(gate), _f64(up)
    sig = 1 / (1 + np.exp(-a64))
    h = a64 * sig * b64
    dy = np.concatenate([_f64(g)[t * tile_m:(t + 1) * tile_m] for t in range(len(te))])
    dh = np.concatenate([dy[t * tile_m:(t + 1) * tile_m] @ _f64(w)[e].T
                         for t, e in enumerate(np.asarray(te))])
    assert cosine(got[0], dh * b64 * sig * (1 + a64 * (1 - sig))) >= 0.99
    assert cosine(got[1], dh * a64 * sig) >= 0.99
    dw = np.zeros(w.shape)
    for t, e in enumerate(np.asarray(te)):
        dw[e] += h[t * tile_m:(t + 1) * tile_m].T @ dy[t * tile_m:(t + 1) * tile_m]
    assert cosine(got[2], dw) >= 0.99
    res = _residuals(lambda a, b, w: jnp.sum(fused(a, b, w)), gate, up, w)
    named = [a for a, src in res if "moe_gu" in src]
    assert sorted(a.dtype.name for a in named) == ["float32", "float32", "uint8", "uint8"], res
    assert not any(a.dtype == jnp.bfloat16 and a.shape == gate.shape for a, _ in res), res


def test_pow2_dispatch_then_gemm_equals_the_gemm_alone(rng):
    """FP8 dispatch adds no rounding: rows quantized with power-of-2 1x128 scales, sent, and
    dequantized (exactly, in BF16) quantize again to the same E4M3 values in the experts'
    power-of-2 Fprop, so the grouped GEMM's output is the same bit for bit."""
    x, w, te = grouped_case(rng, 16, k=256)
    x = (x * jnp.asarray(10.0 ** rng.uniform(-6, 3, (x.shape[0], 1)), jnp.float32)).astype(jnp.bfloat16)
    q, s = fp8.quantize_1x128(x, pow2_scale=True)
    sent = fp8.dequantize_1x128(q, s, jnp.bfloat16)
    np.testing.assert_array_equal(_f64(sent), _f64(fp8.dequantize_1x128(q, s)))   # exact in BF16
    gemm = lambda x: fp8.fp8_grouped_dot(x, w, te, tile_m=16, pow2_scale=True)
    np.testing.assert_array_equal(_f64(gemm(sent)), _f64(gemm(x)))


def test_fp8_exchanges_on_one_shard(rng):
    """The two FP8 all_to_alls on a 1-device expert mesh (the exchange itself is the identity):
    dispatch returns the FP8-rounded rows and passes the gradient back unrounded; combine
    returns its rows as they are and rounds the gradient to FP8 (power-of-2 scales)."""
    from jax.sharding import PartitionSpec as P
    from dsv3_jax.layers import moe_ep
    mesh = jax.make_mesh((1,), ("expert",), axis_types=(jax.sharding.AxisType.Auto,))
    x = rand(rng, (24, 256), jnp.bfloat16)
    g = rand(rng, (24, 256), jnp.float32)
    rnd = lambda a: fp8.dequantize_1x128(*fp8.quantize_1x128(a, pow2_scale=True), a.dtype)
    for fn, fwd_round, bwd_round in ((moe_ep.fp8_dispatch_exchange, True, False),
                                     (moe_ep.fp8_grad_combine_exchange, False, True)):
        f = jax.shard_map(lambda a: fn(a, "expert"), mesh=mesh, in_specs=P("expert"),
                          out_specs=P("expert"))
        y, vjp = jax.vjp(f, x)
        np.testing.assert_array_equal(_f64(y), _f64(rnd(x) if fwd_round else x))
        (dx,) = vjp(g.astype(jnp.bfloat16))
        gb = g.astype(jnp.bfloat16)
        np.testing.assert_array_equal(_f64(dx), _f64(rnd(gb) if bwd_round else gb))
