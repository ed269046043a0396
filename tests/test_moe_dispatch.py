"""MoE dispatch kernels (kernels_pallas/moe_dispatch.py): permute and unpermute + combine.

One test base per op, one thin subclass per backend: the jnp reference, the Pallas kernel in
interpret mode on CPU, the compiled kernel on GPU (skipped without one). The oracle is a plain
NumPy loop over slots in float64, and its backward is written as the scatter-add the kernels
avoid, so it shares no formula with them. Routings come from the MoE layer's own plan_dispatch.
"""
import importlib.util
import pathlib
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsv3_jax.layers import moe
from kernels_pallas import moe_dispatch as md

ROOT = pathlib.Path(__file__).resolve().parents[1]
SMALL = md.DispatchBlocks(block_rows=8, block_d=64)     # several row and column tiles per case

# (N tokens, P slots per token, E experts, D width, tile_m, blocks). D is never a multiple of
# the column block and M = tiles * tile_m is not always a multiple of the row block.
SHAPES = {
    "odd": (13, 3, 5, 200, 4, SMALL),
    "tiny": (2, 1, 4, 24, 8, None),          # N*P = 2: almost every buffer row is padding
    "wide": (16, 4, 8, 136, 8, md.DispatchBlocks(16, 128)),
}
CASES = [("odd", "uniform", jnp.float32), ("odd", "skewed", jnp.bfloat16),
         ("odd", "empty_experts", jnp.float32), ("tiny", "uniform", jnp.bfloat16),
         ("wide", "empty_experts", jnp.bfloat16), ("wide", "skewed", jnp.float32)]


def random_experts(rng, n, p, e, kind):
    """[N, P] distinct experts per token. skewed: Zipf-like loads; empty_experts: a random
    subset of experts gets no token at all."""
    probs = np.ones(e)
    if kind == "skewed":
        probs = rng.permutation(1.0 / np.arange(1, e + 1) ** 1.5)
    elif kind == "empty_experts":
        probs[rng.choice(e, e - max(p, e // 2), replace=False)] = 0.0
    probs /= probs.sum()
    return np.stack([rng.choice(e, p, replace=False, p=probs) for _ in range(n)]).astype(np.int32)


def make_case(rng, shape, kind, dtype):
    n, p, e, d, tile_m, blocks = SHAPES[shape]
    experts = random_experts(rng, n, p, e, kind)
    if kind == "empty_experts":
        assert np.bincount(experts.ravel(), minlength=e).min() == 0
    plan = moe.plan_dispatch(jnp.asarray(experts), e, tile_m)
    m = plan.src_slot_M.shape[0]
    x = jnp.asarray(rng.standard_normal((n, d)), dtype)
    y = jnp.asarray(rng.standard_normal((m, d)), dtype)
    gates = jnp.asarray(rng.random((n, p)), jnp.float32)
    return plan, x, y, gates, blocks


# ---- float64 NumPy oracles -------------------------------------------------------------------

def _f64(a):
    return np.asarray(jnp.asarray(a, jnp.float32), np.float64)


def permute_oracle(x, src, p):
    x, src = _f64(x), np.asarray(src)
    out = np.zeros((len(src), x.shape[1]))
    for r, s in enumerate(src):
        if 0 <= s < x.shape[0] * p:
            out[r] = x[s // p]
    return out


def permute_grad_oracle(d_buf, src, n, p):
    """Transpose of the gather as a scatter-add over buffer rows."""
    d_buf, src = _f64(d_buf), np.asarray(src)
    d_x = np.zeros((n, d_buf.shape[1]))
    for r, s in enumerate(src):
        if 0 <= s < n * p:
            d_x[s // p] += d_buf[r]
    return d_x


def combine_oracle(y, dest, gates):
    y, dest, gates = _f64(y), np.asarray(dest), _f64(gates)
    n, p = dest.shape
    out = np.zeros((n, y.shape[1]))
    for t in range(n):
        for j in range(p):
            if 0 <= dest[t, j] < y.shape[0]:
                out[t] += gates[t, j] * y[dest[t, j]]
    return out


def combine_grad_oracle(y, dest, gates, d_out):
    """d_y as a scatter-add over slots, d_gates as per-slot dot products."""
    y, dest, gates, d_out = _f64(y), np.asarray(dest), _f64(gates), _f64(d_out)
    n, p = dest.shape
    d_y, d_g = np.zeros_like(y), np.zeros((n, p))
    for t in range(n):
        for j in range(p):
            r = dest[t, j]
            if 0 <= r < y.shape[0]:
                d_y[r] += gates[t, j] * d_out[t]
                d_g[t, j] = d_out[t] @ y[r]
    return d_y, d_g


def assert_close(actual, expected, bound, n_terms, what="", bf16_sums=False):
    """|actual - expected| <= tol * bound elementwise, where `bound` is the same computation on
    absolute values. tol: float32 accumulation error ~ eps * sqrt(terms) (4x margin), plus the
    roundings to a bf16 output (2^-8 relative): one, or one per term when the sum itself runs
    in bf16 (`bf16_sums`: plain autodiff's scatter-add in the input dtype)."""
    roundings = (n_terms if bf16_sums else 1) if actual.dtype == jnp.bfloat16 else 0
    tol = 4 * np.finfo(np.float32).eps * np.sqrt(max(n_terms, 1)) + roundings * 2.0 ** -8
    excess = np.abs(_f64(actual) - expected) - tol * np.abs(bound)
    assert excess.max(initial=-1.0) <= 0, f"{what}: exceeds tolerance by {excess.max()}"


def _abs(a):
    return jnp.abs(jnp.asarray(a, jnp.float32))


# ---- permute ---------------------------------------------------------------------------------

class PermuteTest:
    FN = staticmethod(md.permute_reference)
    INTERPRET = False
    BF16_SUMS = True          # the reference's gradient is autodiff's scatter-add in x's dtype

    def permute(self, x, plan, blocks, with_inverse=True):
        return self.FN(x, plan.src_slot_M, plan.dest_row_NP.shape[1], interpret=self.INTERPRET,
                       dest_row_NP=plan.dest_row_NP if with_inverse else None, blocks=blocks)

    @pytest.mark.parametrize("shape,kind,dtype", CASES)
    def test_forward_and_vjp_match_oracle(self, shape, kind, dtype, rng):
        plan, x, _, _, blocks = make_case(rng, shape, kind, dtype)
        n, p = plan.dest_row_NP.shape
        src = np.asarray(plan.src_slot_M)
        out, vjp = jax.vjp(lambda x: self.permute(x, plan, blocks), x)
        assert out.dtype == dtype and out.shape == (len(src), x.shape[1])
        np.testing.assert_array_equal(_f64(out), permute_oracle(x, src, p))   # a copy: exact
        d_buf = jnp.asarray(rng.standard_normal(out.shape), dtype)
        (d_x,) = vjp(d_buf)
        assert d_x.dtype == dtype
        assert_close(d_x, permute_grad_oracle(d_buf, src, n, p),
                     permute_grad_oracle(_abs(d_buf), src, n, p), p, "d_x", self.BF16_SUMS)

    def test_all_padding_buffer_is_zero_and_gets_no_gradient(self, rng):
        n, p, d = 5, 2, 72
        x = jnp.asarray(rng.standard_normal((n, d)), jnp.bfloat16)
        src = jnp.asarray(rng.choice([n * p, n * p + 3, -1], size=19), jnp.int32)
        fn = lambda x: self.FN(x, src, p, interpret=self.INTERPRET, blocks=SMALL)
        out, vjp = jax.vjp(fn, x)
        assert out.shape == (19, d) and not np.any(_f64(out))
        assert not np.any(_f64(vjp(jnp.ones_like(out))[0]))

    def test_jit_equals_eager_with_rebuilt_inverse(self, rng):
        plan, x, _, _, blocks = make_case(rng, "odd", "uniform", jnp.float32)
        d_buf = jnp.asarray(rng.standard_normal((plan.src_slot_M.shape[0], x.shape[1])))

        def fwd_bwd(x, with_inverse):
            out, vjp = jax.vjp(lambda x: self.permute(x, plan, blocks, with_inverse), x)
            return out, vjp(d_buf)[0]
        eager = fwd_bwd(x, True)
        jitted = jax.jit(fwd_bwd, static_argnums=1)(x, False)
        for a, b in zip(eager, jitted):
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


# ---- unpermute + combine ---------------------------------------------------------------------

class CombineTest:
    FN = staticmethod(md.unpermute_combine_reference)
    INTERPRET = False

    def combine(self, y, dest, gates, blocks, src=None):
        return self.FN(y, dest, gates, interpret=self.INTERPRET, src_slot_M=src, blocks=blocks)

    @pytest.mark.parametrize("shape,kind,dtype", CASES)
    def test_forward_and_vjp_match_oracle(self, shape, kind, dtype, rng):
        plan, _, y, gates, blocks = make_case(rng, shape, kind, dtype)
        dest = plan.dest_row_NP
        p, d = dest.shape[1], y.shape[1]
        out, vjp = jax.vjp(lambda y, g: self.combine(y, dest, g, blocks, plan.src_slot_M),
                           y, gates)
        assert out.dtype == jnp.float32 and out.shape == (dest.shape[0], d)
        assert_close(out, combine_oracle(y, dest, gates), combine_oracle(_abs(y), dest, gates),
                     p, "out")
        d_out = jnp.asarray(rng.standard_normal(out.shape), jnp.float32)
        d_y, d_g = vjp(d_out)
        assert d_y.dtype == dtype and d_g.dtype == jnp.float32
        exp_y, exp_g = combine_grad_oracle(y, dest, gates, d_out)
        bound_y, bound_g = combine_grad_oracle(_abs(y), dest, gates, _abs(d_out))
        assert_close(d_y, exp_y, bound_y, 1, "d_y")      # each buffer row has one slot
        assert_close(d_g, exp_g, bound_g, d, "d_gates")  # a length-D dot product

    def test_dropped_slots_read_zero_and_get_no_gradient(self, rng):
        """Slots whose row is outside [0, M) (e.g. dropped by a capacity limit) contribute
        nothing; the backward rebuilds src_slot_M from dest_row_NP."""
        plan, _, y, gates, blocks = make_case(rng, "odd", "uniform", jnp.float32)
        m = y.shape[0]
        drop = rng.random(plan.dest_row_NP.shape) < 0.3
        dest = jnp.where(jnp.asarray(drop), m + 1, plan.dest_row_NP)
        out, vjp = jax.vjp(lambda y, g: self.combine(y, dest, g, blocks), y, gates)
        np.testing.assert_allclose(out, combine_oracle(y, dest, gates), rtol=1e-5, atol=1e-5)
        d_out = jnp.asarray(rng.standard_normal(out.shape), jnp.float32)
        d_y, d_g = vjp(d_out)
        exp_y, exp_g = combine_grad_oracle(y, dest, gates, d_out)
        np.testing.assert_allclose(d_y, exp_y, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(d_g, exp_g, rtol=1e-5, atol=1e-4)
        assert not np.any(np.asarray(d_g)[drop])


@pytest.mark.parametrize("kind", ["uniform", "skewed", "empty_experts"])
def test_inverse_maps_rebuild_the_plan(kind, rng):
    """invert_src_slots / invert_dest_rows (what a backward uses when the other map is not
    passed) reproduce plan_dispatch's dest_row_NP and src_slot_M exactly."""
    plan, *_ = make_case(rng, "odd", kind, jnp.float32)
    n, p = plan.dest_row_NP.shape
    m = plan.src_slot_M.shape[0]
    np.testing.assert_array_equal(md.invert_src_slots(plan.src_slot_M, n, p), plan.dest_row_NP)
    np.testing.assert_array_equal(md.invert_dest_rows(plan.dest_row_NP, m), plan.src_slot_M)


# ---- backends --------------------------------------------------------------------------------

class TestPermuteReference(PermuteTest):
    pass


class TestCombineReference(CombineTest):
    pass


def _vjp_pair(fn, primals, cotangent):
    out, vjp = jax.vjp(fn, *primals)
    return (out,) + tuple(vjp(cotangent))


class TestPermuteInterpret(PermuteTest):
    FN = staticmethod(md.permute)
    INTERPRET = True
    BF16_SUMS = False         # the kernel sums the P rows in float32

    @pytest.mark.parametrize("shape,kind,dtype", CASES[1:4])
    def test_kernel_equals_reference_and_moe_layer(self, shape, kind, dtype, rng):
        """Forward and VJP against the reference (its VJP by plain autodiff, a scatter-add)
        and against md.permute_jnp (the custom-VJP gather the layer uses off the Pallas path)."""
        plan, x, _, _, blocks = make_case(rng, shape, kind, dtype)
        p = plan.dest_row_NP.shape[1]
        d_buf = jnp.asarray(rng.standard_normal((plan.src_slot_M.shape[0], x.shape[1])), dtype)
        got = _vjp_pair(lambda x: self.permute(x, plan, blocks, with_inverse=False), (x,), d_buf)
        for fn in (lambda x: md.permute_reference(x, plan.src_slot_M, p),
                   lambda x: md.permute_jnp(x, plan.src_slot_M, p, dest_row_NP=plan.dest_row_NP)):
            want = _vjp_pair(fn, (x,), d_buf)
            np.testing.assert_array_equal(_f64(got[0]), _f64(want[0]))
            # P-term sums: float32 in the kernel, possibly bf16 on the other side
            assert_close(got[1], _f64(want[1]),
                         permute_grad_oracle(_abs(d_buf), plan.src_slot_M, x.shape[0], p), p,
                         "d_x", bf16_sums=True)


class TestCombineInterpret(CombineTest):
    FN = staticmethod(md.unpermute_combine)
    INTERPRET = True

    @pytest.mark.parametrize("shape,kind,dtype", CASES[1:4])
    def test_kernel_equals_reference_and_moe_layer(self, shape, kind, dtype, rng):
        plan, _, y, gates, blocks = make_case(rng, shape, kind, dtype)
        dest, d = plan.dest_row_NP, y.shape[1]
        d_out = jnp.asarray(rng.standard_normal((dest.shape[0], d)), jnp.float32)
        got = _vjp_pair(lambda y, g: self.combine(y, dest, g, blocks), (y, gates), d_out)
        bounds = (combine_oracle(_abs(y), dest, gates),
                  *combine_grad_oracle(_abs(y), dest, gates, _abs(d_out)))
        for fn in (lambda y, g: md.unpermute_combine_reference(y, dest, g),
                   lambda y, g: md.unpermute_combine_jnp(y, dest, g, src_slot_M=plan.src_slot_M)):
            want = _vjp_pair(fn, (y, gates), d_out)
            for a, b, bound, terms in zip(got, want, bounds, (dest.shape[1], 1, d)):
                # both sides round: allow twice the one-sided tolerance
                assert_close(a, _f64(b), 2 * bound, terms)


ON_GPU = jax.default_backend() == "gpu"


@pytest.mark.skipif(not ON_GPU, reason="compiled Triton kernels need a GPU")
class TestPermuteGPU(TestPermuteInterpret):
    INTERPRET = False


@pytest.mark.skipif(not ON_GPU, reason="compiled Triton kernels need a GPU")
class TestCombineGPU(TestCombineInterpret):
    INTERPRET = False


# ---- CUDA lowering on CPU --------------------------------------------------------------------

def _abstract_h200_mesh():
    try:
        from jax.sharding import AbstractDevice, AbstractMesh
    except ImportError:
        return None
    dev = AbstractDevice(device_kind="NVIDIA H200", num_cores=132, platform="cuda")
    return AbstractMesh((1,), ("x",), abstract_device=dev)


DSV3 = (8192, 8, 7168)                     # tokens, top-k, hidden: one layer at T = 8192


def _fwd_bwd_fns(n, p, d, dtype):
    m = moe.plan_dispatch(jnp.zeros((n, p), jnp.int32), 256, 64).src_slot_M.shape[0]
    spec = jax.ShapeDtypeStruct
    x, y = spec((n, d), dtype), spec((m, d), dtype)
    src, dest, gates = spec((m,), jnp.int32), spec((n, p), jnp.int32), spec((n, p), jnp.float32)

    def permute_fb(x, src, dest):
        out, vjp = jax.vjp(lambda x: md.permute(x, src, p, dest_row_NP=dest), x)
        return out, vjp(out)

    def combine_fb(y, dest, gates, src):
        out, vjp = jax.vjp(lambda y, g: md.unpermute_combine(y, dest, g, src_slot_M=src), y,
                           gates)
        return out, vjp(out)
    # (function, abstract args, number of Pallas kernels in its forward + backward)
    return [(permute_fb, (x, src, dest), 2), (combine_fb, (y, dest, gates, src), 3)]


def _lower_for_h200(fn, args):
    mesh = _abstract_h200_mesh()
    if mesh is None:
        pytest.skip(f"jax {jax.__version__} cannot name an abstract GPU (no AbstractDevice)")
    try:
        with warnings.catch_warnings(), jax.sharding.use_abstract_mesh(mesh):
            warnings.simplefilter("ignore", DeprecationWarning)     # Triton deprecated in 0.11
            return jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    except ImportError as e:
        pytest.skip(f"this jaxlib cannot lower Pallas Triton kernels: {e}")


def test_kernels_lower_for_cuda_at_dsv3_shapes():
    """fwd+bwd of both ops lower to Triton kernel calls for CUDA at N=8192, P=8, D=7168 bf16.
    This generates the Triton IR for sm90 (jax 0.11 needs the GPU named by an abstract mesh);
    it does not compile it: see the next test."""
    for fn, args, kernels in _fwd_bwd_fns(*DSV3, jnp.bfloat16):
        assert _lower_for_h200(fn, args).count("__gpu$xla.gpu.triton") == kernels, fn.__name__


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_triton_ir_compiles_for_sm90_with_16_byte_accesses(dtype, tmp_path):
    """Compile each kernel's Triton IR to sm_90 PTX + cubin with the `triton` package (its own
    ptxas; no GPU needed) and check that the row gathers and stores became 16-byte vector
    accesses. Needs `pip install triton` (not a project dependency), which may be a different
    Triton than the one inside jaxlib; captures the IR through a private jax hook."""
    triton = pytest.importorskip("triton", reason="the optional `triton` package is absent")
    from triton.backends.compiler import GPUTarget
    from jax._src.pallas.triton import pallas_call_registration as registration
    modules = []
    lower = registration.lowering.lower_jaxpr_to_triton_module

    def capture(*args, **kwargs):
        result = lower(*args, **kwargs)
        modules.append(result.module.operation.get_asm(enable_debug_info=False))
        return result
    registration.lowering.lower_jaxpr_to_triton_module = capture
    try:
        for fn, args, _ in _fwd_bwd_fns(*DSV3, dtype):
            _lower_for_h200(fn, args)
    finally:
        registration.lowering.lower_jaxpr_to_triton_module = lower
    assert len(modules) == 5
    for i, text in enumerate(modules):
        path = tmp_path / f"kernel{i}.ttir"
        path.write_text(text)
        compiled = triton.compile(str(path), target=GPUTarget("cuda", 90, 32),
                                  options={"num_warps": md.DEFAULT_BLOCKS.num_warps,
                                           "num_stages": 1})
        ptx = compiled.asm["ptx"]
        assert compiled.asm["cubin"] and "ld.global.v4" in ptx and "st.global" in ptx, text[:200]


# ---- the benchmark's own correctness check, CI-sized ----------------------------------------

def test_benchmark_smoke_interpret():
    spec = importlib.util.spec_from_file_location("moe_dispatch_gpu",
                                                  ROOT / "benchmarks" / "moe_dispatch_gpu.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    rows = bench.main(["--interpret", "--small", "--shapes", "tiny", "--check-only"])
    assert rows and all(r["ok"] for r in rows)
