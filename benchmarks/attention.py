"""Training attention: blockwise (flash, jnp) vs the materialised reference, and on a GPU the
Hopper kernels.

  python benchmarks/attention.py                    # CPU: fwd+bwd ms, T = 256..4096, tiny dims
  python benchmarks/attention.py --memory           # tiny model: saved residuals + peak RSS
  python benchmarks/attention.py --gpu              # H200: TFLOP/s fwd / bwd at T = 4K, 32K

CPU: causal self-attention with the tiny model's dims (4 heads, q/k 48 = 32 nope + 16 rope, v 32),
float32, B = max(1, 2048 // T) rows, alternating rounds (fair under background load); the
reference is the main job's path (mla.attend_causal_blocks with 4 causal query blocks); blockwise at
block 256 and 512. --memory: for one tiny-model training step at T = 4096 / 16384 with
global_batch 1, the bytes of the residuals the step saves for the backward pass
(jax saved_residuals, abstract) and, in a subprocess per run, the peak RSS.
GPU: MLA's dims (128 heads, 192/128), bf16, causal, 4 packed documents; blockwise jnp, tokamax's
Mosaic kernel (if importable), cuDNN through jax.nn.dot_product_attention (v zero-padded to 192:
the public API needs d_v == d_qk) and the reference where it fits in memory.
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from dsv3_jax.layers import attention as A
from dsv3_jax.layers import mla

HERE = os.path.dirname(os.path.abspath(__file__))


def timed(fn, args, rounds):
    out = fn(*args)
    jax.block_until_ready(out)
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return times


def split_reference(q, k, v, seg, scale, blocks=4):
    """Today's reference on the concatenated inputs (k's rope part is the shared head)."""
    b, t = seg.shape
    index = jnp.broadcast_to(jnp.arange(t), (b, t))
    mask = mla.attention_mask(seg, seg, index, index)
    nope = 32
    return mla.attend_causal_blocks(q[..., :nope], q[..., nope:], k[..., :nope], k[:, :, 0, nope:],
                                    v, mask, scale, blocks)


def fwd_bwd(f):
    def loss(q, k, v, w):
        return jnp.sum(f(q, k, v) * w)
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))


def cpu_speed(lengths, rounds):
    rng = np.random.default_rng(0)
    h, x, v_dim, scale = 4, 48, 32, 48 ** -0.5
    print(f"{'T':>6} {'B':>3} {'reference ms':>13} {'blockwise-256':>14} {'blockwise-512':>14}"
          f" {'ratio ref/bw512':>16}")
    rows = []
    for t in lengths:
        b = max(1, 2048 // t)
        q, k, v = (jnp.asarray(rng.standard_normal((b, t, h, d)), jnp.float32)
                   for d in (x, x, v_dim))
        k = k.at[:, :, 1:, 32:].set(jnp.broadcast_to(k[:, :, :1, 32:], (b, t, h - 1, 16)))
        w = jnp.asarray(rng.standard_normal((b, t, h, v_dim)), jnp.float32)
        seg = jnp.ones((b, t), jnp.int32)
        fns = {"reference": fwd_bwd(lambda q, k, v: split_reference(q, k, v, seg, scale)),
               "blockwise-256": fwd_bwd(lambda q, k, v: A.flash_attention(
                   q, k, v, seg, scale=scale, block_q=256, block_k=256)),
               "blockwise-512": fwd_bwd(lambda q, k, v: A.flash_attention(
                   q, k, v, seg, scale=scale, block_q=512, block_k=512))}
        times = {name: [] for name in fns}
        for name, fn in fns.items():
            jax.block_until_ready(fn(q, k, v, w))                      # compile
        for _ in range(rounds):                                         # alternate
            for name, fn in fns.items():
                times[name] += timed(fn, (q, k, v, w), 1)
        med = {n: 1e3 * float(np.median(ts)) for n, ts in times.items()}
        rows.append(dict(T=t, B=b, **med))
        print(f"{t:6d} {b:3d} {med['reference']:13.1f} {med['blockwise-256']:14.1f} "
              f"{med['blockwise-512']:14.1f} {med['reference'] / med['blockwise-512']:16.2f}")
    return rows


# ---- memory: one tiny-model train step ---------------------------------------------------------

def step_setup(seq_len, impl):
    from dsv3_jax import train, train_config, train_state
    from experiments.configs import tiny
    c = tiny.get_config()
    c.data.seq_len, c.data.global_batch = seq_len, 1
    c.model.train_attention = impl
    cfg = train_config.validate(c)
    fns = train.make_step_fns(c, cfg)
    ids = np.random.default_rng(0).integers(2, cfg.vocab_size, (1, 1, seq_len + 1), np.int32)
    batch = {"inputs": ids[..., :-1], "targets": ids[..., 1:],
             "positions": np.arange(seq_len, dtype=np.int32)[None, None],
             "segment_ids": np.ones((1, 1, seq_len), np.int32),
             "loss_mask": np.ones((1, 1, seq_len), np.float32)}
    return c, cfg, fns, {k: jnp.asarray(v) for k, v in batch.items()}, train, train_state


def residual_bytes(seq_len, impl):
    from jax._src.ad_checkpoint import saved_residuals
    _, cfg, fns, batch, _, train_state = step_setup(seq_len, impl)
    state = jax.eval_shape(lambda: train_state.init_state(cfg, fns.optimizer, 0, False))
    mb = jax.tree.map(lambda a: a[0], batch)
    res = saved_residuals(lambda p, rb: fns.objective.loss(p, rb, mb, jnp.int32(0))[0],
                          state["params"], state["router_bias"])
    sizes = [int(np.prod(r[0].shape)) * r[0].dtype.itemsize for r in res]
    ts = [int(np.prod(r[0].shape)) * r[0].dtype.itemsize for r in res
          if sum(d >= seq_len for d in r[0].shape) >= 2 or
          (r[0].ndim >= 2 and r[0].shape[-1] * r[0].shape[-2] >= seq_len * seq_len // 16)]
    return sum(sizes), sum(ts)


def one_step_rss(seq_len, impl):
    """Run in a fresh process: one compiled training step; print peak RSS (GiB) and time."""
    _, cfg, fns, batch, train, train_state = step_setup(seq_len, impl)
    state = train_state.init_state(cfg, fns.optimizer, 0, False)
    step = jax.jit(lambda s, b: train.train_step(s, b, fns), donate_argnums=0)
    t0 = time.perf_counter()
    state, m = step(state, batch)
    jax.block_until_ready(m["loss"])
    t1 = time.perf_counter()
    state, m = step(state, batch)
    jax.block_until_ready(m["loss"])
    t2 = time.perf_counter()
    print(json.dumps({"rss_GiB": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20,
                      "first_step_s": t1 - t0, "step_s": t2 - t1, "loss": float(m["loss"])}))


def memory(lengths, impls, rss_cap):
    print(f"{'T':>6} {'impl':>10} {'saved residuals MiB':>20} {'of which >= T^2/16':>19} "
          f"{'peak RSS GiB':>13} {'step s':>7}")
    rows = []
    for t in lengths:
        for impl in impls:
            total, tt = residual_bytes(t, impl)
            row = dict(T=t, impl=impl, residual_MiB=total / 2 ** 20, t2_MiB=tt / 2 ** 20)
            # the reference's [B,H,T,T] probabilities: only run it where it fits beside others
            est_gib = 4 * 4 * t * t * 4 * 2 / 2 ** 30
            if impl == "reference" and est_gib > rss_cap:
                row.update(rss_GiB=None, step_s=None)
            else:
                env = dict(os.environ, PYTHONPATH=os.pathsep.join(
                    [os.path.dirname(HERE), os.environ.get("PYTHONPATH", "")]))
                out = subprocess.run([sys.executable, __file__, "--_one_step", str(t), impl],
                                     capture_output=True, text=True, env=env)
                r = json.loads(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 else {}
                if out.returncode:
                    print(out.stderr[-2000:])
                row.update(rss_GiB=r.get("rss_GiB"), step_s=r.get("step_s"))
            rows.append(row)
            f = lambda v, fmt: fmt.format(v) if v is not None else "(skipped)"
            print(f"{t:6d} {impl:>10} {row['residual_MiB']:20.1f} {row['t2_MiB']:19.1f} "
                  f"{f(row['rss_GiB'], '{:13.2f}'):>13} {f(row['step_s'], '{:7.1f}'):>7}")
    return rows


# ---- GPU ---------------------------------------------------------------------------------------

def gpu(lengths, rounds):
    rng = np.random.default_rng(0)
    h, x, v_dim = 128, 192, 128
    scale = x ** -0.5
    print(f"device {jax.devices()[0].device_kind}; tokamax available: {A.tokamax_available()}")
    print(f"{'T':>6} {'B':>2} {'impl':>22} {'fwd ms':>8} {'fwd TF/s':>9} {'f+b ms':>8} "
          f"{'bwd TF/s':>9}")
    for t in lengths:
        b = max(1, 8192 // t)
        mk = lambda d: jnp.asarray(rng.standard_normal((b, t, h, d)), jnp.bfloat16)
        q, k, v = mk(x), mk(x), mk(v_dim)
        seg = jnp.asarray(np.repeat(np.arange(4), t // 4)[None].repeat(b, 0), jnp.int32)
        dense_seg = jnp.ones_like(seg)
        # causal FLOPs (half the square): fwd 2 GEMMs, bwd 5 (dq, dk, dv, dp, recomputed s)
        fl_fwd = 2 * b * h * t * t * (x + v_dim) / 2
        fl_bwd = 2.5 * fl_fwd
        impls = {"blockwise jnp (1 doc)": lambda q, k, v: A.flash_attention(
                     q, k, v, dense_seg, scale=scale, block_q=512, block_k=512),
                 "blockwise jnp (4 docs)": lambda q, k, v: A.flash_attention(
                     q, k, v, seg, scale=scale, block_q=512, block_k=512)}
        if A.tokamax_available():
            impls["tokamax mosaic (1 doc)"] = lambda q, k, v: A.tokamax_attention(
                q, k, v, None, scale=scale)
            impls["tokamax mosaic (4 docs)"] = lambda q, k, v: A.tokamax_attention(
                q, k, v, seg, scale=scale)

        def cudnn_padded(q, k, v):
            vp = jnp.pad(v, ((0, 0), (0, 0), (0, 0), (0, x - v_dim)))
            return jax.nn.dot_product_attention(q, k, vp, scale=scale, is_causal=True,
                                                implementation="cudnn")[..., :v_dim]
        impls["cudnn (v padded to 192)"] = cudnn_padded
        if b * h * t * t * 4 * 3 < 60 * 2 ** 30:
            impls["reference (T^2 probs)"] = lambda q, k, v: A.reference_attention(
                q, k, v, dense_seg, scale=scale)
        w = jnp.asarray(rng.standard_normal((b, t, h, v_dim)), jnp.bfloat16)
        for name, f in impls.items():
            try:
                fwd = jax.jit(f)
                fb = fwd_bwd(lambda q, k, v, f=f: f(q, k, v).astype(jnp.float32))
                tf = float(np.median(timed(fwd, (q, k, v), rounds)))
                tfb = float(np.median(timed(fb, (q, k, v, w), rounds)))
                tb = max(tfb - tf, 1e-9)
                print(f"{t:6d} {b:2d} {name:>22} {1e3 * tf:8.2f} {fl_fwd / tf / 1e12:9.1f} "
                      f"{1e3 * tfb:8.2f} {fl_bwd / tb / 1e12:9.1f}", flush=True)
            except Exception as e:    # a kernel that refuses the shapes: say why, go on
                print(f"{t:6d} {b:2d} {name:>22} failed: {type(e).__name__}: "
                      f"{str(e).splitlines()[0][:150]}", flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gpu", action="store_true")
    ap.add_argument("--memory", action="store_true")
    ap.add_argument("--lengths", default="")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--rss_cap_gib", type=float, default=6.0,
                    help="--memory: skip running the reference where its T^2 buffers exceed this")
    ap.add_argument("--_one_step", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    lengths = [int(s) for s in args.lengths.split(",") if s]
    if args._one_step:
        one_step_rss(int(args._one_step[0]), args._one_step[1])
    elif args.gpu:
        gpu(lengths or [4096, 32768], args.rounds)
    elif args.memory:
        memory(lengths or [4096, 16384], ["reference", "blockwise"], args.rss_cap_gib)
    else:
        cpu_speed(lengths or [256, 512, 1024, 2048, 4096], args.rounds)


if __name__ == "__main__":
    main()
