"""Block-scaled FP8 GEMMs (kernels_pallas/fp8_gemm.py) on the accelerator: correctness, TFLOP/s.

  python benchmarks/fp8_gemm_gpu.py                       # H200: everything, < 5 min
  python benchmarks/fp8_gemm_gpu.py --no-sweep            # skip the config sweep at 8192^3
  python benchmarks/fp8_gemm_gpu.py --interpret --small   # CPU smoke run (interpret mode)

1. Checks every kernel (dense, grouped, experts' Wgrad; each warpgroup layout) against its jnp
   reference on random FP8 operands (same inputs: only accumulation differs; Hopper's FP8 wgmma
   keeps ~14 bits inside a 128-K chunk, so expect ~1e-4 relative, tolerance 2e-3).
2. Times, per (M, K, N), with TFLOP/s = 2MNK / t:
     fp8      the Pallas kernel on pre-quantized operands (bf16 out)
     bf16     jnp.dot in bf16 (cuBLAS)
     xla_fp8  XLA's per-tensor-scaled FP8 dot (cuBLASLt; no block scales: an upper bound)
     ref      the jnp FP8 reference (dequantize + f32 dot)
   at 4096^3, 8192^3 and the 671B model's GEMMs (4096 tokens x 7168 x N, their Dgrad and Wgrad),
   the grouped kernels on a MoE layer, and fp8_dot fwd+bwd (quantization included) vs bf16.
   Target: fp8 >= 1.5x bf16 at 8192^3.
3. Sweeps `CANDIDATES` at 8192^3 while time is left (--budget seconds in all).
Every shape and column is guarded: a failure prints its error and the run goes on.
"""
from __future__ import annotations

import argparse
import pathlib
import sys
import time
import traceback

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import jax                                    # noqa: E402
import jax.numpy as jnp                       # noqa: E402
import numpy as np                            # noqa: E402

from dsv3_jax import fp8                      # noqa: E402
from kernels_pallas import fp8_gemm as fg     # noqa: E402

ERRORS: list[str] = []


def guarded(label, fn, *args, **kwargs):
    """fn(...) or None; the error is printed at the end (the run goes on)."""
    try:
        return fn(*args, **kwargs)
    except Exception as e:                                  # noqa: BLE001
        ERRORS.append(f"{label}: {type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}")
        if "--verbose" in sys.argv:
            traceback.print_exc()
        return None


# ---- timing -----------------------------------------------------------------------------------

def time_ms(fn, *args, iters=10):
    """Median device time of jitted fn(*args) in ms: CUPTI kernel time (mosaic profiler) on
    a GPU, wall clock otherwise or if CUPTI is unavailable."""
    fn = jax.jit(fn)
    jax.block_until_ready(fn(*args))                        # compile + warm up
    if jax.default_backend() == "gpu":
        try:
            from jax.experimental.mosaic.gpu import profiler
            _, times = profiler.measure(fn, iterations=iters)(*args)
            if times:
                return float(np.median(times))
        except Exception as e:                              # noqa: BLE001
            ERRORS.append(f"CUPTI timing unavailable, wall clock used: {e}")
    walls = []
    for _ in range(iters):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        walls.append((time.perf_counter() - t) * 1e3)
    return float(np.median(walls))


def tflops(m, k, n, ms):
    return None if ms is None else 2.0 * m * k * n / (ms * 1e-3) / 1e12


# ---- operands ---------------------------------------------------------------------------------

def operands(key, m, k, n, per_row_rhs=False):
    """bf16 x [M, K], w [K, N] and their FP8 GEMM operands (rhs 128x128 blocks, or 1x128 rows as
    in Wgrad)."""
    kx, kw = jax.random.split(key)
    x = jax.random.normal(kx, (m, k), jnp.bfloat16)
    w = (jax.random.normal(kw, (k, n), jnp.float32) * k ** -0.5).astype(jnp.bfloat16)
    if per_row_rhs:
        ops = fp8.GemmOperands(*fp8.quantize_1x128_padded(x), *fp8.quantize_1x128_padded(w.T))
    else:
        ops = fp8.fprop_operands(x, fp8.quantize_weight(w))
    return x, w, ops


def rel_err(out, ref):
    out, ref = np.asarray(out, np.float32), np.asarray(ref, np.float32)
    return float(np.abs(out - ref).max() / max(np.abs(ref).max(), 1e-30))


# ---- 1. correctness ---------------------------------------------------------------------------

def check_dense(key, shape, cfg, interpret):
    m, k, n = shape
    _, _, ops = operands(key, m, k, n, per_row_rhs=cfg is not None and cfg.wg_split == "n")
    got = fg.fp8_gemm(*ops, out_dtype=jnp.float32, config=cfg, interpret=interpret)
    return rel_err(got, fg.fp8_gemm_reference(*ops, out_dtype=jnp.float32))


def moe_case(key, e, rows_per_expert, k, n, tile_m, empty=0):
    """Balanced routing (plus `empty` experts with no rows) in the grouped layout."""
    tiles = np.full(e, -(-rows_per_expert // tile_m))
    tiles[:empty] = 0
    te = jnp.asarray(np.repeat(np.arange(e), tiles), jnp.int32)
    m = int(tiles.sum()) * tile_m
    kx, kw = jax.random.split(key)
    x = jax.random.normal(kx, (m, k), jnp.bfloat16)
    w = (jax.random.normal(kw, (e, k, n), jnp.float32) * k ** -0.5).astype(jnp.bfloat16)
    xq, xs = fp8.quantize_1x128_padded(x)
    wq = fp8.quantize_weight(w)
    return x, w, te, (xq, xs, jnp.swapaxes(wq.q_KN, 1, 2), jnp.swapaxes(wq.scale, 1, 2))


def check_grouped(key, tile_m, interpret, small):
    e, rows, k, n = (4, 100, 256, 200) if small else (16, 300, 1024, 768)
    x, _, te, ops = moe_case(key, e, rows, k, n, tile_m, empty=1)
    got = fg.fp8_grouped_gemm(*ops, te, tile_m=tile_m, out_dtype=jnp.float32, interpret=interpret)
    ref = fg.fp8_grouped_gemm_reference(*ops, te, tile_m=tile_m, out_dtype=jnp.float32)
    dy = jax.random.normal(jax.random.fold_in(key, 1), (x.shape[0], n), jnp.bfloat16)
    x_c, dy_c, chunk_expert = fp8.wgrad_chunks(x, dy, te, tile_m=tile_m, num_experts=e)
    wops = fp8.wgrad_operands(x_c, dy_c)
    got_w = fg.fp8_group_wgrad(*wops, chunk_expert, num_experts=e, interpret=interpret)
    ref_w = fg.fp8_group_wgrad_reference(*wops, chunk_expert, num_experts=e)
    return max(rel_err(got, ref), rel_err(got_w, ref_w))


def run_checks(args, key):
    print("== correctness: kernel vs jnp reference (same FP8 operands), max |err| / max |ref|")
    shapes = fg.SMALL_SHAPES if args.small else ((1000, 1152, 576), (1024, 2048, 1536))
    layouts = ((None,) if args.interpret else
               (None,) + tuple(fg.Fp8GemmConfig(wg_split=s) for s in ("m", "n", "single")))
    ok = True
    for shape in shapes:
        for cfg in layouts:
            err = guarded(f"check {shape} {cfg}", check_dense, key, shape, cfg, args.interpret)
            ok &= err is not None and err < 2e-3
            print(f"  dense {str(shape):22s} {cfg.wg_split if cfg else 'default':8s} "
                  f"{'FAILED' if err is None else f'{err:.2e}'}")
    for tile_m in ((16, 128) if args.small else (64, 128)):
        err = guarded(f"check grouped tile_m={tile_m}", check_grouped, key, tile_m,
                      args.interpret, args.small)
        ok &= err is not None and err < 2e-3
        print(f"  grouped + wgrad, tile_m={tile_m:<4d}          "
              f"{'FAILED' if err is None else f'{err:.2e}'}")
    print("  ->", "all within 2e-3" if ok else "SOME CHECK FAILED (see errors below)")
    return ok


# ---- 2. throughput ----------------------------------------------------------------------------

def xla_fp8_dot(xq, wq_t):
    """Per-tensor FP8 x FP8 -> bf16 (XLA rewrites to cuBLASLt on Hopper)."""
    return jax.lax.dot_general(xq, wq_t, (((1,), (1,)), ((), ())),
                               preferred_element_type=jnp.bfloat16)


def bench_shape(key, name, m, k, n, interpret, iters, cfg=None):
    x, w, ops = operands(key, m, k, n, per_row_rhs=name.startswith("wgrad"))
    kernel = lambda *o: fg.fp8_gemm(*o, config=cfg, interpret=interpret)
    row = dict(
        fp8=guarded(f"{name} fp8", time_ms, kernel, *ops, iters=iters),
        bf16=guarded(f"{name} bf16", time_ms, jnp.dot, x, w, iters=iters),
        xla_fp8=guarded(f"{name} xla_fp8", time_ms, xla_fp8_dot, ops.lhs, ops.rhs, iters=iters),
        ref=guarded(f"{name} ref", time_ms, fg.fp8_gemm_reference, *ops, iters=iters))
    return {c: tflops(m, k, n, t) for c, t in row.items()}


def print_row(name, shape, tf):
    cell = lambda v: "     ERR" if v is None else f"{v:8.1f}" if v >= 1 else f"{v:8.2g}"
    ratio = lambda a, b: f"{a / b:6.3g}x" if a and b else "    -  "
    print(f"  {name:10s} {str(shape):22s}" + "".join(cell(tf[c]) for c in ("fp8", "bf16", "xla_fp8", "ref"))
          + f"   {ratio(tf['fp8'], tf['bf16'])} {ratio(tf['fp8'], tf['xla_fp8'])} {ratio(tf['fp8'], tf['ref'])}",
          flush=True)


def dense_shapes(small):
    if small:
        return [("small", s) for s in fg.SMALL_SHAPES]
    named = [("square", s) for s in fg.SQUARE_SHAPES]
    fprop = fg.DSV3_671B_FPROP
    named += [("fprop", s) for s in fprop]
    named += [("dgrad", (m, n, k)) for m, k, n in fprop]       # dy [M, N] . W^T
    named += [("wgrad", (k, m, n)) for m, k, n in fprop]       # x^T [K, M] . dy
    return named


def run_dense(args, key):
    print("== dense GEMM, TFLOP/s (M, K, N)")
    print(f"  {'':10s} {'':22s}{'fp8':>8s}{'bf16':>8s}{'xla_fp8':>8s}{'ref':>8s}"
          f"   fp8/bf16 fp8/xla fp8/ref")
    for name, (m, k, n) in dense_shapes(args.small):
        if time.time() - START > args.budget:
            print("  (time budget spent; skipping the remaining shapes)")
            break
        tf = bench_shape(key, name, m, k, n, args.interpret, args.iters)
        print_row(name, (m, k, n), tf)


def bench_grouped(key, name, e, rows, k, n, tile_m, interpret, iters):
    """(M routed rows, TFLOP/s of: the grouped kernel, the experts' Wgrad kernel, one dense bf16
    jnp.dot over all rows, the jnp grouped reference)."""
    x, w, te, ops = moe_case(key, e, rows, k, n, tile_m)
    m = x.shape[0]
    grouped = lambda *o: fg.fp8_grouped_gemm(*o, tile_m=tile_m, interpret=interpret)
    dy = jax.random.normal(jax.random.fold_in(key, 1), (m, n), jnp.bfloat16)
    x_c, dy_c, ce = fp8.wgrad_chunks(x, dy, te, tile_m=tile_m, num_experts=e)
    wops = fp8.wgrad_operands(x_c, dy_c)
    wgrad = lambda *o: fg.fp8_group_wgrad(*o, num_experts=e, interpret=interpret)
    t = dict(
        fp8=guarded(f"grouped {name}", time_ms, grouped, *ops, te, iters=iters),
        wgrad=guarded(f"group wgrad {name}", time_ms, wgrad, *wops, ce, iters=iters),
        bf16=guarded(f"grouped {name} bf16", time_ms, jnp.dot, x, w[0], iters=iters),
        ref=guarded(f"grouped {name} ref", time_ms,
                    lambda *o: fg.fp8_grouped_gemm_reference(*o, te, tile_m=tile_m),
                    *ops, iters=iters))
    return m, {c: tflops(m, k, n, v) for c, v in t.items()}


def run_grouped(args, key):
    """A MoE layer's expert GEMMs: E experts, balanced routing, tile_m = 128."""
    e, rows, tile_m = (4, 100, 16) if args.small else (64, 256, 128)
    print(f"== grouped (E={e}, {rows} rows/expert, tile_m={tile_m}), TFLOP/s of routed rows; "
          f"bf16 column: one dense jnp.dot over all rows (xla_only_group0 upper bound)")
    for name, (k, n) in (("gate/up", (7168, 2048)), ("down", (2048, 7168))):
        if args.small:
            k, n = 256, 200
        if time.time() - START > args.budget:
            break
        m, tf = bench_grouped(key, name, e, rows, k, n, tile_m, args.interpret, args.iters)
        cells = "  ".join(f"{c} {v:7.1f}" if v else f"{c}     ERR" for c, v in tf.items())
        ratio = f"{tf['fp8'] / tf['bf16']:.2f}x bf16" if tf["fp8"] and tf["bf16"] else ""
        print(f"  {name:8s} M={m} K={k} N={n}: {cells}   fp8 = {ratio}", flush=True)


def run_end_to_end(args, key):
    """fp8_dot forward + backward (three FP8 GEMMs and all quantization) vs bf16 autodiff."""
    print("== fp8_dot fwd+bwd (quantization included) vs bf16 jnp.dot fwd+bwd, TFLOP/s (6MKN)")
    shapes = fg.SMALL_SHAPES[:1] if args.small else ((8192, 8192, 8192), (4096, 7168, 18432))
    for m, k, n in shapes:
        if time.time() - START > args.budget:
            break
        x, w, _ = operands(key, m, k, n)
        w = w.astype(jnp.float32)
        fp8_step = jax.grad(lambda x, w: jnp.sum(fp8.fp8_dot(x, w, implementation="pallas",
                                                             interpret=args.interpret)
                                                 .astype(jnp.float32)), (0, 1))
        bf16_step = jax.grad(lambda x, w: jnp.sum(jnp.dot(x, w.astype(jnp.bfloat16))
                                                  .astype(jnp.float32)), (0, 1))
        t8 = guarded(f"fp8_dot {m, k, n}", time_ms, fp8_step, x, w, iters=args.iters)
        t16 = guarded(f"bf16 grad {m, k, n}", time_ms, bf16_step, x, w, iters=args.iters)
        tf8, tf16 = (None if t is None else 3 * tflops(m, k, n, t) for t in (t8, t16))
        ratio = f"{tf8 / tf16:.2f}x" if tf8 and tf16 else "-"
        print(f"  {str((m, k, n)):22s} fp8_dot {tf8 or float('nan'):7.1f}   bf16 "
              f"{tf16 or float('nan'):7.1f}   ratio {ratio}", flush=True)


def run_sweep(args, key):
    m = k = n = 512 if args.small else 8192
    print(f"== config sweep at {m}^3 (fp8 kernel TFLOP/s), while the budget lasts")
    x, w, ops = operands(key, m, k, n)
    best = None
    # The interpreter runs a block's warpgroup threads on one CPU device and can deadlock on the
    # warp-specialized layouts (see fg.default_config): sweep only "single" there.
    candidates = [c for c in fg.CANDIDATES if not (args.interpret and c.warp_specialized)]
    for cfg in candidates:
        if time.time() - START > args.budget:
            print("  (time budget spent)")
            break
        kernel = lambda *o, cfg=cfg: fg.fp8_gemm(*o, config=cfg, interpret=args.interpret)
        tf = tflops(m, k, n, guarded(f"sweep {cfg}", time_ms, kernel, *ops, iters=args.iters))
        print(f"  {tf if tf else float('nan'):8.1f}  {cfg}", flush=True)
        if tf and (best is None or tf > best[0]):
            best = (tf, cfg)
    if best:
        print(f"  best: {best[0]:.1f} TFLOP/s  {best[1]}")


START = time.time()


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--small", action="store_true", help="CI-sized shapes")
    p.add_argument("--interpret", action="store_true", help="run kernels in interpret mode (CPU)")
    p.add_argument("--no-sweep", action="store_true", help="skip the config sweep")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--budget", type=float, default=240.0, help="seconds before optional parts stop")
    p.add_argument("--verbose", action="store_true", help="print tracebacks")
    args = p.parse_args()
    if args.interpret or args.small:
        args.iters = min(args.iters, 2)
    dev = jax.devices()[0]
    print(f"jax {jax.__version__}, {dev.platform}: {dev.device_kind}, "
          f"interpret={args.interpret}")
    key = jax.random.key(0)
    ok = run_checks(args, key)
    run_dense(args, key)
    run_grouped(args, key)
    run_end_to_end(args, key)
    if not args.no_sweep:
        run_sweep(args, key)
    if ERRORS:
        print(f"== {len(ERRORS)} errors")
        for e in ERRORS:
            print("  " + e)
    print(f"done in {time.time() - START:.0f} s")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
