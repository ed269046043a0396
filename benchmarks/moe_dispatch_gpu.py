"""MoE dispatch kernels on the accelerator: correctness, then GB/s against the jnp paths.

  python benchmarks/moe_dispatch_gpu.py                    # GPU: DeepSeek-V3 shapes, ~1-2 min
  python benchmarks/moe_dispatch_gpu.py --sweep            # + block-size candidates at dsv3_8k
  python benchmarks/moe_dispatch_gpu.py --interpret --small   # CPU smoke run (interpret mode)
  python benchmarks/moe_dispatch_gpu.py --check-only       # correctness at the real shapes only

For every shape it builds a random routing with the MoE layer's plan_dispatch, checks the Pallas
kernels (kernels_pallas/moe_dispatch.py) against the jnp references, forward and VJP, and times
  kernel   the Pallas kernels (fwd; fwd+bwd = forward + the custom-VJP kernels)
  ref      the plain-jnp *_reference (its backward is autodiff: a scatter-add)
  layer    md.permute_jnp / unpermute_combine_jnp (jnp gathers with a gather backward,
           what the layer runs today)
  copy     -x over a buffer the size of the expert-sorted one (an HBM read+write roofline).
GB/s counts useful bytes: every routed row read once, every output row written once (padding
rows written, not read); indices are ignored. Expect kernel >= 60-70 % of copy (research note
section 6). Raises if a check fails.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time
import warnings

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import jax                                    # noqa: E402
import jax.numpy as jnp                       # noqa: E402
import numpy as np                            # noqa: E402

from dsv3_jax.layers import moe               # noqa: E402
from kernels_pallas import moe_dispatch as md  # noqa: E402

warnings.filterwarnings("ignore", message=".*Pallas Triton backend is deprecated.*")

# name: (N tokens, P = top-k, E experts, D = hidden, dtype, routing)
SHAPES = {
    "dsv3_8k": (8192, 8, 256, 7168, "bfloat16", "uniform"),
    "dsv3_8k_skewed": (8192, 8, 256, 7168, "bfloat16", "skewed"),
    "dsv3_2k": (2048, 8, 256, 7168, "bfloat16", "uniform"),
    "dsv3_8k_f32": (8192, 8, 256, 7168, "float32", "uniform"),
}
SMALL_SHAPES = {
    "tiny": (40, 4, 8, 200, "bfloat16", "uniform"),
    "tiny_skewed": (24, 2, 6, 136, "float32", "skewed"),
}
SMALL_BLOCKS = md.DispatchBlocks(block_rows=8, block_d=64)


def routing(key, n, p, e, kind):
    """[N, P] distinct experts: Gumbel top-k, i.e. sampling without replacement from uniform or
    Zipf(1.2) expert popularity (skewed: a few hot experts, a long cold tail)."""
    k_perm, k_gumbel = jax.random.split(key)
    logits = jnp.zeros(e)
    if kind == "skewed":
        logits = jax.random.permutation(k_perm, -1.2 * jnp.log(jnp.arange(1, e + 1.0)))
    scores = logits[None, :] + jax.random.gumbel(k_gumbel, (n, e))
    return jax.lax.top_k(scores, p)[1].astype(jnp.int32)


def timeit(fn, args, iters):
    """Seconds per call: compile + warm up, then `iters` back-to-back calls, one sync; best of
    3 rounds (robust to clock ramps and other noise)."""
    jax.block_until_ready(fn(*args))
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(iters):
            out = fn(*args)
        jax.block_until_ready(out)
        best = min(best, (time.perf_counter() - t0) / iters)
    return best


def rel_err(a, b):
    a, b = np.asarray(jnp.asarray(a, jnp.float32)), np.asarray(jnp.asarray(b, jnp.float32))
    return float(np.abs(a - b).max(initial=0.0) / max(np.abs(b).max(initial=0.0), 1e-30))


def build(name, shape, key, blocks, interpret):
    n, p, e, d, dtype, kind = shape
    dtype = jnp.dtype(dtype)
    k_route, k_x, k_y, k_g, k_dx, k_dy = jax.random.split(key, 6)
    experts = routing(k_route, n, p, e, kind)
    plan = moe.plan_dispatch(experts, e, moe.default_tile_m(n * p, e))
    m = plan.src_slot_M.shape[0]
    data = dict(
        x=jax.random.normal(k_x, (n, d), dtype), y=jax.random.normal(k_y, (m, d), dtype),
        gates=jax.random.uniform(k_g, (n, p), jnp.float32),
        d_buf=jax.random.normal(k_dx, (m, d), dtype),
        d_out=jax.random.normal(k_dy, (n, d), jnp.float32),
        src=plan.src_slot_M, dest=plan.dest_row_NP)
    counts = np.bincount(np.asarray(experts).ravel(), minlength=e)

    kw = dict(interpret=interpret, blocks=blocks)
    permute = {
        "kernel": lambda x, src, dest: md.permute(x, src, p, dest_row_NP=dest, **kw),
        "ref": lambda x, src, dest: md.permute_reference(x, src, p),
        "layer": lambda x, src, dest: md.permute_jnp(x, src, p, dest_row_NP=dest),
    }
    combine = {
        "kernel": lambda y, g, src, dest: md.unpermute_combine(y, dest, g, src_slot_M=src, **kw),
        "ref": lambda y, g, src, dest: md.unpermute_combine_reference(y, dest, g),
        "layer": lambda y, g, src, dest: md.unpermute_combine_jnp(y, dest, g, src_slot_M=src),
    }
    b, s = dtype.itemsize, n * p                     # s routed slots = rows actually read
    bytes_ = {
        ("permute", "fwd"): (s * d * b + m * d * b),
        ("permute", "fwd+bwd"): (s * d * b + m * d * b) + (s * d * b + n * d * b),
        ("combine", "fwd"): (s * d * b + n * d * 4),
        ("combine", "fwd+bwd"): ((s * d * b + n * d * 4) + (s * d * 4 + m * d * b)
                                 + (n * d * 4 + s * d * b)),
    }
    info = dict(name=name, N=n, P=p, E=e, D=d, M=m, dtype=dtype.name, routing=kind,
                tile_m=plan.tile_m, max_load=int(counts.max()),
                empty_experts=int((counts == 0).sum()))
    return data, permute, combine, bytes_, info


def fwd_bwd_permute(fn):
    def run(x, src, dest, d_buf):
        out, vjp = jax.vjp(lambda x: fn(x, src, dest), x)
        return out, vjp(d_buf)[0]
    return run


def fwd_bwd_combine(fn):
    def run(y, g, src, dest, d_out):
        out, vjp = jax.vjp(lambda y, g: fn(y, g, src, dest), y, g)
        return (out,) + tuple(vjp(d_out))
    return run


def check(data, permute, combine, dtype):
    """Kernels vs the references, forward and VJP (the reference's by autodiff, float32 except
    permute's d_x, a scatter-add in x's dtype); max error relative to the largest entry.
    Limits: a copy is exact; float32 sums ~1e-6; a bf16 output's rounding ~2^-8."""
    lim = 1e-5 if dtype == jnp.float32 else 2e-2
    d = data
    pargs = (d["x"], d["src"], d["dest"], d["d_buf"])
    pk = jax.jit(fwd_bwd_permute(permute["kernel"]))(*pargs)
    pr = jax.jit(fwd_bwd_permute(permute["ref"]))(*pargs)
    cargs = (d["y"], d["gates"], d["src"], d["dest"], d["d_out"])
    ck = jax.jit(fwd_bwd_combine(combine["kernel"]))(*cargs)
    cr = jax.jit(fwd_bwd_combine(combine["ref"]))(*cargs)
    return {"permute fwd": (rel_err(pk[0], pr[0]), 0.0),
            "permute d_x": (rel_err(pk[1], pr[1]), lim),
            "combine fwd": (rel_err(ck[0], cr[0]), 1e-5),
            "combine d_y": (rel_err(ck[1], cr[1]), lim),
            "combine d_gates": (rel_err(ck[2], cr[2]), 1e-4)}


def time_shape(d, permute, combine, bytes_, base, iters):
    """One row per (op, mode): seconds and GB/s of kernel, ref and layer, vs the copy roofline."""
    copy_s = timeit(jax.jit(jnp.negative), (d["y"],), iters)
    copy_gbs = 2 * d["y"].nbytes / copy_s / 1e9
    print(f"   copy (-y, {d['y'].nbytes / 1e9:.2f} GB): {copy_s * 1e6:9.1f} us "
          f"{copy_gbs:8.1f} GB/s")
    print(f"   {'op':8s} {'mode':8s} " + " ".join(f"{i:>23s}" for i in permute)
          + "   kernel/copy")
    rows = []
    for op, impls in (("permute", permute), ("combine", combine)):
        if op == "permute":
            fargs, cot, fwd_bwd = (d["x"], d["src"], d["dest"]), d["d_buf"], fwd_bwd_permute
        else:
            fargs, cot = (d["y"], d["gates"], d["src"], d["dest"]), d["d_out"]
            fwd_bwd = fwd_bwd_combine
        for mode in ("fwd", "fwd+bwd"):
            rec = dict(base, op=op, mode=mode, copy_gbs=copy_gbs)
            cells = []
            for impl, fn in impls.items():
                f, a = (fn, fargs) if mode == "fwd" else (fwd_bwd(fn), fargs + (cot,))
                sec = timeit(jax.jit(f), a, iters)
                gbs = bytes_[(op, mode)] / sec / 1e9
                rec[f"{impl}_us"], rec[f"{impl}_gbs"] = sec * 1e6, gbs
                cells.append(f"{sec * 1e6:9.1f}us {gbs:7.1f}GB/s")
            rows.append(rec)
            print(f"   {op:8s} {mode:8s} " + " ".join(cells)
                  + f"   {rec['kernel_gbs'] / copy_gbs:6.1%}")
    return rows


def sweep(d, p, bytes_, base, interpret, iters):
    """Forward GB/s of every md.CANDIDATES block config."""
    print("   sweep (fwd): block_rows x block_d / warps")
    rows = []
    for cand in md.CANDIDATES:
        kw = dict(interpret=interpret, blocks=cand)
        t_p = timeit(jax.jit(lambda x, s, dd: md.permute(x, s, p, dest_row_NP=dd, **kw)),
                     (d["x"], d["src"], d["dest"]), iters)
        t_c = timeit(jax.jit(lambda y, g, s, dd: md.unpermute_combine(y, dd, g, src_slot_M=s,
                                                                      **kw)),
                     (d["y"], d["gates"], d["src"], d["dest"]), iters)
        gp, gc = bytes_[("permute", "fwd")] / t_p / 1e9, bytes_[("combine", "fwd")] / t_c / 1e9
        print(f"   {cand.block_rows:4d} x {cand.block_d:5d} / {cand.num_warps}: "
              f"permute {t_p * 1e6:8.1f}us {gp:7.1f}GB/s   "
              f"combine {t_c * 1e6:8.1f}us {gc:7.1f}GB/s")
        rows.append(dict(base, op="sweep", blocks=str(cand), permute_gbs=gp, combine_gbs=gc))
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--interpret", action="store_true", help="Pallas interpret mode (CPU)")
    ap.add_argument("--small", action="store_true", help="tiny shapes (CPU smoke run)")
    ap.add_argument("--shapes", default=None, help="comma-separated subset of SHAPES")
    ap.add_argument("--iters", type=int, default=20, help="calls per timing round")
    ap.add_argument("--sweep", action="store_true", help="time md.CANDIDATES at the first shape")
    ap.add_argument("--check-only", action="store_true", help="correctness checks, no timing")
    ap.add_argument("--json", default=None, help="write the result rows here")
    args = ap.parse_args(argv)

    shapes = SMALL_SHAPES if args.small else SHAPES
    if args.shapes:
        shapes = {k: shapes[k] for k in args.shapes.split(",")}
    blocks = SMALL_BLOCKS if args.small else None
    dev = jax.devices()[0]
    print(f"jax {jax.__version__}  device {dev.device_kind} ({dev.platform})  "
          f"interpret={args.interpret}  blocks={blocks or md.DEFAULT_BLOCKS}")
    rows = []
    key = jax.random.key(0)
    for i, (name, shape) in enumerate(shapes.items()):
        key, sub = jax.random.split(key)
        data, permute, combine, bytes_, info = build(name, shape, sub, blocks, args.interpret)
        errs = check(data, permute, combine, jnp.dtype(shape[4]))
        ok = all(e <= lim for e, lim in errs.values())
        print(f"\n== {name}: {info}")
        print("   check " + "  ".join(f"{k} {e:.1e}{'' if e <= lim else ' FAIL'}"
                                     for k, (e, lim) in errs.items()))
        base = dict(info, ok=ok, errors={k: e for k, (e, _) in errs.items()})
        if args.check_only:
            rows.append(dict(base, op="check"))
            continue
        rows += time_shape(data, permute, combine, bytes_, base, args.iters)
        if args.sweep and i == 0:
            rows += sweep(data, shape[1], bytes_, base, args.interpret, args.iters)
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(rows, indent=1))
    bad = sorted({r["name"] for r in rows if not r["ok"]})
    if bad:
        raise SystemExit(f"correctness check failed for {bad}")
    return rows


if __name__ == "__main__":
    main()
