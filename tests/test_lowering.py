"""CUDA lowering of the GPU code paths on a CPU-only machine, and the review's shape rules.

`jax.jit(f).trace(...).lower(lowering_platforms=("cuda",))` runs the whole Pallas -> Mosaic GPU
pipeline (layout inference, wgmma/TMA lowering, the 227 KiB shared-memory check) and Pallas
Triton's IR generation, without a GPU; only ptxas and running the kernels need one. The single
kernels at the model's shapes are lowered in tests/test_fp8_gemm.py (dense, grouped, Wgrad) and
tests/test_moe_dispatch.py (permute / combine fwd + bwd); here: every tuning candidate, the
autodiff entry points, and the whole FP8 + Pallas train step of benchmarks/gpu_suite.py.
"""
import functools
import importlib.util
import pathlib
import warnings

import jax
import jax.numpy as jnp
import pytest

from dsv3_jax import fp8, model
from kernels_pallas import fp8_gemm as fg
from kernels_pallas import interpret_mode
from kernels_pallas import moe_dispatch as md
from test_moe_dispatch import _abstract_h200_mesh

ROOT = pathlib.Path(__file__).resolve().parents[1]
E4M3 = jnp.float8_e4m3fn
S = jax.ShapeDtypeStruct


def lower_for_cuda(fn, *args):
    """StableHLO text of fn lowered for CUDA (an abstract H200 named where jax allows, as Pallas
    Triton needs from jax 0.11); skips where this jaxlib cannot lower for CUDA at all."""
    try:
        jax.jit(lambda x: x + 1).trace(1.0).lower(lowering_platforms=("cuda",))
    except Exception as e:                                    # noqa: BLE001
        pytest.skip(f"this jax cannot lower for CUDA without a GPU: {e}")
    mesh = _abstract_h200_mesh()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)   # Pallas Triton, jax 0.11
        if mesh is None:
            return jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
        with jax.sharding.use_abstract_mesh(mesh):
            return jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()


@pytest.mark.parametrize("out_dtype", [jnp.float32, jnp.bfloat16])
def test_every_tuning_candidate_fits_smem_and_lowers(out_dtype):
    """_fit_steps' SMEM estimate against Mosaic's own 227 KiB check, for every sweep config."""
    m, k, n = 1024, 1024, 1152
    args = (S((m, k), E4M3), S((m, k // 128), jnp.float32), S((n, k), E4M3),
            S((n // 128, k // 128), jnp.float32))
    for cfg in fg.CANDIDATES:
        fn = functools.partial(fg.fp8_gemm, out_dtype=out_dtype, config=cfg)
        assert "mosaic_gpu" in lower_for_cuda(fn, *args), cfg


def test_fp8_dot_and_grouped_dot_fwd_bwd_lower():
    """The autodiff entry points the model calls (quantizers + three GEMMs each)."""
    m, k, n, e, tile_m = 512, 1024, 576, 4, 64

    def dense(x, w):
        return jax.grad(lambda x, w: fp8.fp8_dot(x, w, implementation="pallas",
                                                 interpret=False).astype(jnp.float32).sum(),
                        (0, 1))(x, w)

    def grouped(x, w, te):
        f = lambda x, w: fp8.fp8_grouped_dot(x, w, te, tile_m=tile_m, implementation="pallas",
                                             interpret=False).astype(jnp.float32).sum()
        return jax.grad(f, (0, 1))(x, w)
    text = lower_for_cuda(dense, S((m, k), jnp.bfloat16), S((k, n), jnp.float32))
    assert text.count("mosaic_gpu") >= 3
    text = lower_for_cuda(grouped, S((m, k), jnp.bfloat16), S((e, k, n), jnp.float32),
                          S((m // tile_m,), jnp.int32))
    assert text.count("mosaic_gpu") >= 3


def _suite():
    spec = importlib.util.spec_from_file_location("gpu_suite", ROOT / "benchmarks" / "gpu_suite.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_gpu_suite_fp8_train_step_lowers_with_remat():
    """benchmarks/gpu_suite.py's FP8 + Pallas train step as the GPU runs it (bf16, selective
    remat, Mosaic GPU GEMMs and Triton dispatch), CI-sized, from abstract values."""
    suite = _suite()
    cfg = suite.model_config(True, dtype="bfloat16", remat="selective", fp8=True,
                             gemm_impl="pallas")
    from dsv3_jax import optim
    tx = optim.make_optimizer(lambda _: 1e-4)
    variables = model.abstract_variables(cfg.replace(fp8=False, gemm_impl="jnp"))  # same shapes
    opt_state = jax.eval_shape(tx.init, variables["params"])
    batch = dict(inputs=S((2, 32), jnp.int32), targets=S((2, 32), jnp.int32),
                 mask=S((2, 32), jnp.float32))
    step = suite.make_train_step(cfg, tx)
    with interpret_mode(False):         # the kernels as compiled for the GPU, not interpreted
        text = lower_for_cuda(step, variables["params"], opt_state, variables["router_bias"],
                              batch)
    assert "mosaic_gpu" in text and "triton" in text


# ---- the review's shape rules -------------------------------------------------------------------

def test_default_config_prefers_128_columns_on_a_tie():
    for n in (1536, 2048, 7168, 18432, 24576, 768):
        assert fg.default_config(n).block_n == 128, n
    assert fg.default_config(576).block_n == 192        # 3 x 192: no padding vs 640


@pytest.mark.parametrize("tile_m", [1, 2, 4])
def test_grouped_tiles_under_8_rows_are_refused(tile_m):
    e, k, n, tiles = 2, 128, 128, 4
    args = (S((tiles * tile_m, k), E4M3), S((tiles * tile_m, 1), jnp.float32),
            S((e, n, k), E4M3), S((e, 1, 1), jnp.float32), S((tiles,), jnp.int32))
    with pytest.raises(ValueError, match="at least 8"):
        jax.eval_shape(functools.partial(fg.fp8_grouped_gemm, tile_m=tile_m), *args)


def test_dispatch_refuses_int32_overflowing_operands():
    n, p, d = 40_000, 8, 7168                           # M * D > 2^31
    m = n * p
    with pytest.raises(ValueError, match="int32"):
        jax.eval_shape(lambda x, s: md.permute(x, s, p), S((n, d), jnp.bfloat16),
                       S((m,), jnp.int32))
    with pytest.raises(ValueError, match="int32"):
        jax.eval_shape(lambda y, dd, g: md.unpermute_combine(y, dd, g), S((m, d), jnp.bfloat16),
                       S((n, p), jnp.int32), S((n, p), jnp.float32))
