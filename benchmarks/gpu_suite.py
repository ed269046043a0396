"""Everything the GPU paths need proven and timed, in one call (one JSON + one Markdown table).

  python benchmarks/gpu_suite.py --out DIR                      # H200: <= 8 min with compiles
  python benchmarks/gpu_suite.py --out DIR --interpret --small  # CPU, CI-sized (a test)

Sections, each guarded (an error is recorded in the JSON and the run goes on), printed as they go:
  env          device, driver, jax / jaxlib versions
  correctness  every GPU kernel against its jnp reference on random inputs: FP8 dense, grouped
               and experts' Wgrad GEMMs, fp8_dot fwd+bwd, dispatch permute / unpermute-combine
               (fwd + VJP); flash attention (blockwise, and tokamax where it imports)
  gemm         FP8 block-scaled kernel vs bf16 jnp.dot (cuBLAS) vs XLA's per-tensor FP8 dot vs
               the jnp reference, TFLOP/s: 4096^3, 8192^3, the 671B model's Fprop/Dgrad/Wgrad
  grouped      the grouped and Wgrad kernels on one MoE layer's expert shapes
  dispatch     permute / combine GB/s vs a device copy (memory bandwidth)
  train        a ~1B DeepSeek-V3-shaped model's train step (value_and_grad + AdamW) in BF16 and
               FP8: tokens/s, MFU against 989 TFLOP/s bf16
  decode       decode tokens/s of that model, absorbed vs naive MLA
The timing code is benchmarks/fp8_gemm_gpu.py's and moe_dispatch_gpu.py's; the train step is
built here from dsv3_jax.model / loss / optim (not train.py, nor ml-collections).
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import json
import pathlib
import platform
import subprocess
import sys
import time
import traceback

ROOT = pathlib.Path(__file__).resolve().parents[1]
for path in (ROOT, ROOT / "benchmarks"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import jax                                    # noqa: E402
import jax.numpy as jnp                       # noqa: E402
import numpy as np                            # noqa: E402

import fp8_gemm_gpu as gemm_bench             # noqa: E402
import moe_dispatch_gpu as dispatch_bench     # noqa: E402
from dsv3_jax import config, fp8, loss, model, optim, params  # noqa: E402
from dsv3_jax.layers import attention            # noqa: E402
from kernels_pallas import fp8_gemm as fg     # noqa: E402

PEAK_BF16 = 989e12          # H100/H200 SXM dense bf16 tensor-core FLOP/s
SECTIONS = ("env", "correctness", "gemm", "grouped", "dispatch", "train", "decode")
# Soft time budgets (s) per section on the GPU; a section stops adding cases when its budget is
# spent (the rest are recorded as skipped). Sum ~ 6.5 min, leaving room for jax's start-up.
BUDGETS = dict(env=10, correctness=60, gemm=110, grouped=30, dispatch=30, train=120, decode=30)


def log(*a):
    print(*a, flush=True)


class Suite:
    def __init__(self, args):
        self.args = args
        self.key = jax.random.key(0)
        self.results = {}

    @contextlib.contextmanager
    def section(self, name):
        rec = self.results[name] = dict(status="ok", entries=[], seconds=None)
        t0 = time.time()
        log(f"\n== {name}")
        try:
            yield rec
        except Exception as e:                                   # noqa: BLE001
            rec["status"] = "error"
            rec["error"] = f"{type(e).__name__}: {e}"[:2000]
            log(f"   ERROR {rec['error'][:500]}")
            if self.args.verbose:
                traceback.print_exc()
        rec["seconds"] = round(time.time() - t0, 2)
        if rec["status"] == "ok" and any(e.get("ok") is False for e in rec["entries"]):
            rec["status"] = "fail"
        log(f"   [{name}: {rec['status']}, {rec['seconds']} s]")

    def over_budget(self, name, t0):
        budget = BUDGETS[name] * (1 if not self.args.small else 1e9)
        return time.time() - t0 > budget * self.args.budget_scale

    def entry(self, rec, label, fn, *a, **kw):
        """rec['entries'] += fn(...) (a dict), or an error entry; never raises."""
        t0 = time.time()
        try:
            e = dict(case=label, **fn(*a, **kw))
        except Exception as ex:                                  # noqa: BLE001
            e = dict(case=label, ok=False, error=f"{type(ex).__name__}: {ex}"[:1000])
            if self.args.verbose:
                traceback.print_exc()
        e["seconds"] = round(time.time() - t0, 2)
        rec["entries"].append(e)
        log("   " + "  ".join(f"{k}={_fmt(v)}" for k, v in e.items()))
        return e


def _fmt(v):
    if isinstance(v, float):
        return f"{v:.3g}"
    return str(v)


# ---- 1. environment ---------------------------------------------------------------------------

def env_section(suite, rec):
    import jaxlib
    dev = jax.devices()[0]
    info = dict(jax=jax.__version__, jaxlib=jaxlib.__version__, python=platform.python_version(),
                backend=jax.default_backend(), device_kind=dev.device_kind,
                device_count=jax.device_count(), interpret=suite.args.interpret,
                small=suite.args.small)
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,"
                              "clocks.max.sm,power.limit", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        info["nvidia_smi"] = out.stdout.strip() or out.stderr.strip()
    except (OSError, subprocess.SubprocessError) as e:
        info["nvidia_smi"] = f"unavailable: {e}"
    for k in ("core_count", "compute_capability"):
        if hasattr(dev, k):
            info[k] = str(getattr(dev, k))
    rec.update(info)
    log("   " + "  ".join(f"{k}={v}" for k, v in info.items()))


# ---- 2. correctness ---------------------------------------------------------------------------

def _errors(got, ref, tol):
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    abs_err = float(np.abs(got - ref).max()) if got.size else 0.0
    rel = abs_err / max(float(np.abs(ref).max()) if ref.size else 0.0, 1e-30)
    return dict(max_abs_err=abs_err, max_rel_err=rel, tol=tol, ok=bool(rel <= tol))


def _f32(a):
    return np.asarray(jnp.asarray(a, jnp.float32))


def check_fp8_dense(key, shape, cfg, interpret):
    m, k, n = shape
    _, _, ops = gemm_bench.operands(key, m, k, n, per_row_rhs=cfg is not None
                                    and cfg.wg_split == "n")
    got = jax.jit(functools.partial(fg.fp8_gemm, out_dtype=jnp.float32, config=cfg,
                                    interpret=interpret))(*ops)
    ref = fg.fp8_gemm_reference(*ops, out_dtype=jnp.float32)
    return dict(kernel="fp8_gemm", reference="fp8_gemm_reference",
                config=cfg.wg_split if cfg else "default", **_errors(_f32(got), _f32(ref), 2e-3))


def _grouped_operands(key, tile_m, small):
    e, rows, k, n = (4, 40, 256, 200) if small else (16, 300, 1024, 768)
    x, _, te, ops = gemm_bench.moe_case(key, e, rows, k, n, tile_m, empty=1)
    return e, n, x, te, ops


def check_fp8_grouped(key, tile_m, interpret, small):
    e, n, x, te, ops = _grouped_operands(key, tile_m, small)
    kw = dict(tile_m=tile_m, out_dtype=jnp.float32)
    got = jax.jit(functools.partial(fg.fp8_grouped_gemm, interpret=interpret, **kw))(*ops, te)
    ref = fg.fp8_grouped_gemm_reference(*ops, te, **kw)
    return dict(kernel="fp8_grouped_gemm", reference="fp8_grouped_gemm_reference",
                **_errors(_f32(got), _f32(ref), 2e-3))


def check_fp8_wgrad(key, tile_m, interpret, small):
    e, n, x, te, _ = _grouped_operands(key, tile_m, small)
    dy = jax.random.normal(jax.random.fold_in(key, 1), (x.shape[0], n), jnp.bfloat16)
    x_c, dy_c, chunk_expert = fp8.wgrad_chunks(x, dy, te, tile_m=tile_m, num_experts=e)
    ops = fp8.wgrad_operands(x_c, dy_c)
    got = jax.jit(functools.partial(fg.fp8_group_wgrad, num_experts=e, interpret=interpret))(
        *ops, chunk_expert)
    ref = fg.fp8_group_wgrad_reference(*ops, chunk_expert, num_experts=e)
    return dict(kernel="fp8_group_wgrad", reference="fp8_group_wgrad_reference",
                **_errors(_f32(got), _f32(ref), 2e-3))


def check_fp8_dot_grad(key, shape, interpret):
    """fp8_dot forward + both gradients, Pallas kernels vs the jnp reference implementation."""
    m, k, n = shape
    x, w, _ = gemm_bench.operands(key, m, k, n)
    w = w.astype(jnp.float32)
    dy = jax.random.normal(jax.random.fold_in(key, 2), (m, n), jnp.bfloat16)

    def run(impl):
        f = lambda x, w: fp8.fp8_dot(x, w, implementation=impl, interpret=interpret)
        out, vjp = jax.vjp(f, x, w)
        return (out,) + vjp(dy)
    got, ref = jax.jit(lambda x, w: run("pallas"))(x, w), jax.jit(lambda x, w: run("jnp"))(x, w)
    # Same quantized operands on both sides; outputs in bf16: a few bf16 ulps.
    errs = [_errors(_f32(a), _f32(b), 2e-2) for a, b in zip(got, ref)]
    worst = max(errs, key=lambda e: e["max_rel_err"])
    return dict(kernel="fp8_dot (fwd, dx, dw)", reference="fp8_dot jnp", **worst)


def check_dispatch(key, name, shape, interpret):
    blocks = dispatch_bench.SMALL_BLOCKS if name in dispatch_bench.SMALL_SHAPES else None
    data, permute, combine, _, info = dispatch_bench.build(name, shape, key, blocks, interpret)
    errs = dispatch_bench.check(data, permute, combine, jnp.dtype(shape[4]))
    worst = max(errs.items(), key=lambda kv: kv[1][0] / max(kv[1][1], 1e-12))
    return dict(kernel="moe_dispatch permute + unpermute_combine (fwd + VJP)",
                reference="*_reference", max_rel_err=max(e for e, _ in errs.values()),
                worst=worst[0], per_output={k: e for k, (e, _) in errs.items()},
                ok=all(e <= lim for e, lim in errs.values()), shape=info)


def check_attention(key, impl, small):
    """Flash attention (`blockwise` jnp, or `pallas` = tokamax) vs the materialised reference
    at MLA's head dims (q/k 192, v 128), packed documents, causal: output and dq, dk, dv."""
    b, t, h = (1, 160, 2) if small else (2, 2048, 16)
    kq, kk, kv, kg = jax.random.split(key, 4)
    q = jax.random.normal(kq, (b, t, h, 192), jnp.float32)
    k = jax.random.normal(kk, (b, t, h, 192), jnp.float32)
    v = jax.random.normal(kv, (b, t, h, 128), jnp.float32)
    seg = jnp.repeat(jnp.arange(1, 5, dtype=jnp.int32), t // 4)[None].repeat(b, 0)
    scale, dout = 192 ** -0.5, jax.random.normal(kg, (b, t, h, 128), jnp.float32)

    def outputs(f, q, k, v, seg, dout):   # arguments, not closed-over constants
        out, vjp = jax.vjp(lambda q, k, v: f(q, k, v, seg, scale=scale), q, k, v)
        return (out, *vjp(dout))

    args = (q, k, v, seg, dout)
    # float32 matmuls default to TF32 on Hopper: compare at full precision, as the CPU tests do
    precise = jax.default_matmul_precision("highest")
    with precise:
        ref = jax.jit(functools.partial(outputs, attention.reference_attention))(*args)
    if impl == "pallas" and not attention.tokamax_available():
        return dict(kernel="tokamax flash attention", ok=None,   # neither pass nor fail
                    skipped="tokamax not importable here (Python >= 3.12, jax >= 0.11.1 needed)")
    f = functools.partial(attention.self_attention, impl, block=128 if small else 256)
    with precise:
        got = jax.jit(functools.partial(outputs, f))(*args)
    tol = 1e-5 if impl == "blockwise" else 2e-2     # tokamax computes in bf16
    errs = {n: _errors(g, r, tol) for n, g, r in zip(("out", "dq", "dk", "dv"), got, ref)}
    return dict(kernel=f"attention {impl} (fwd + VJP)", reference="reference_attention",
                shape=dict(b=b, t=t, h=h), per_output=errs,
                max_rel_err=max(e["max_rel_err"] for e in errs.values()),
                ok=all(e["ok"] for e in errs.values()))


def correctness_section(suite, rec):
    a, key = suite.args, suite.key
    dense = fg.SMALL_SHAPES[1:2] if a.small else ((1000, 1152, 576), (1024, 2048, 1536))
    layouts = ((None,) if a.interpret else
               (None,) + tuple(fg.Fp8GemmConfig(wg_split=s) for s in ("m", "n", "single")))
    for shape in dense:
        for cfg in layouts:
            suite.entry(rec, f"fp8 dense {shape} {cfg.wg_split if cfg else 'default'}",
                        check_fp8_dense, key, shape, cfg, a.interpret)
    for tile_m in ((16,) if a.small else (64, 128)):
        suite.entry(rec, f"fp8 grouped tile_m={tile_m}", check_fp8_grouped, key, tile_m,
                    a.interpret, a.small)
        suite.entry(rec, f"fp8 expert wgrad tile_m={tile_m}", check_fp8_wgrad, key, tile_m,
                    a.interpret, a.small)
    suite.entry(rec, "fp8_dot fwd+bwd", check_fp8_dot_grad, key,
                fg.SMALL_SHAPES[2] if a.small else (2048, 2048, 1536), a.interpret)
    shapes = {"tiny_skewed": dispatch_bench.SMALL_SHAPES["tiny_skewed"]} if a.small else {
        k: dispatch_bench.SHAPES[k] for k in ("dsv3_2k", "dsv3_8k_f32")}
    for name, shape in shapes.items():
        suite.entry(rec, f"dispatch {name}", check_dispatch, key, name, shape, a.interpret)
    for impl in ("blockwise", "pallas"):
        suite.entry(rec, f"attention {impl}", check_attention, key, impl, a.small)


# ---- 3. GEMM / grouped / dispatch timings -----------------------------------------------------

def gemm_section(suite, rec):
    a, t0 = suite.args, time.time()
    gemm_bench.ERRORS.clear()
    for name, (m, k, n) in gemm_bench.dense_shapes(a.small)[:1 if a.small else None]:
        if suite.over_budget("gemm", t0):
            rec["entries"].append(dict(case=f"{name} {(m, k, n)}", skipped="time budget"))
            continue
        suite.entry(rec, f"{name} {(m, k, n)}", lambda: dict(
            shape=[m, k, n], tflops=gemm_bench.bench_shape(suite.key, name, m, k, n,
                                                           a.interpret, a.iters)))
    rec["timing_errors"] = list(gemm_bench.ERRORS)


def grouped_section(suite, rec):
    a, t0 = suite.args, time.time()
    e, rows, tile_m = (4, 40, 16) if a.small else (64, 256, 128)
    rec.update(experts=e, rows_per_expert=rows, tile_m=tile_m)
    gemm_bench.ERRORS.clear()
    cases = (("gate/up", (7168, 2048)), ("down", (2048, 7168)))
    for name, (k, n) in (cases[:1] if a.small else cases):
        if a.small:
            k, n = 256, 200
        if suite.over_budget("grouped", t0):
            rec["entries"].append(dict(case=name, skipped="time budget"))
            continue

        def one():
            m, tf = gemm_bench.bench_grouped(suite.key, name, e, rows, k, n, tile_m,
                                             a.interpret, a.iters)
            return dict(shape=[m, k, n], tflops=tf)
        suite.entry(rec, name, one)
    rec["timing_errors"] = list(gemm_bench.ERRORS)


def dispatch_section(suite, rec):
    a, t0 = suite.args, time.time()
    shapes = {"tiny": dispatch_bench.SMALL_SHAPES["tiny"]} if a.small else {
        k: dispatch_bench.SHAPES[k] for k in ("dsv3_8k", "dsv3_8k_skewed")}
    for name, shape in shapes.items():
        if suite.over_budget("dispatch", t0):
            rec["entries"].append(dict(case=name, skipped="time budget"))
            continue

        def one():
            blocks = dispatch_bench.SMALL_BLOCKS if a.small else None
            data, permute, combine, bytes_, info = dispatch_bench.build(
                name, shape, suite.key, blocks, a.interpret)
            rows = dispatch_bench.time_shape(data, permute, combine, bytes_, dict(info),
                                             a.iters)
            keep = ("op", "mode", "copy_gbs", "kernel_us", "kernel_gbs", "ref_gbs",
                    "layer_gbs")
            return dict(rows=[{k: r[k] for k in keep if k in r} for r in rows],
                        kernel_over_copy={f"{r['op']} {r['mode']}": r["kernel_gbs"]
                                          / r["copy_gbs"] for r in rows})
        suite.entry(rec, name, one)


# ---- 4. train step and decode of a ~1B DeepSeek-V3-shaped model -------------------------------

def model_config(small: bool, **kw) -> config.ModelConfig:
    """DeepSeek-V3's shapes scaled to ~1B parameters (small: CI-sized). MTP off: the step is the
    main model's next-token loss plus the balance term. Small runs on CPU: float32 (XLA:CPU has
    no bf16 x bf16 -> f32 dot) and no remat (the interpreted kernels' callbacks carry effects
    that remat cannot partially evaluate; tests/test_lowering.py lowers the GPU step with
    remat)."""
    if small:
        base = dict(vocab_size=512, hidden_size=128, intermediate_size=256,
                    moe_intermediate_size=64, num_hidden_layers=2, first_k_dense_replace=1,
                    n_routed_experts=8, num_experts_per_tok=2, n_group=2, topk_group=1,
                    num_attention_heads=2, num_key_value_heads=2, q_lora_rank=64,
                    kv_lora_rank=32, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32)
    else:
        base = dict(vocab_size=32768, hidden_size=2048, intermediate_size=5632,
                    moe_intermediate_size=256, num_hidden_layers=10, first_k_dense_replace=1,
                    n_routed_experts=64, num_experts_per_tok=8, n_group=8, topk_group=4,
                    num_attention_heads=16, num_key_value_heads=16, q_lora_rank=768,
                    kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64,
                    v_head_dim=128)
    base.update(num_nextn_predict_layers=0, n_shared_experts=1, max_position_embeddings=4096,
                rope_scaling=None, dtype="float32" if small else "bfloat16",
                param_dtype="float32", initializer_range=0.02,
                remat="none" if small else "selective")
    base.update(kw)
    return config.ModelConfig(**base)


def flops_per_token(cfg, counts, seq):
    """6 x activated matmul parameters (embedding lookup excluded, head included) + causal
    attention: 3 * L * H * seq * (qk + v) (fwd + bwd, half of the score and PV GEMMs)."""
    matmul = counts["activated"] - counts["breakdown"].get("embedding", 0)
    attn = 3 * cfg.num_hidden_layers * cfg.num_attention_heads * seq * (
        cfg.qk_head_dim + cfg.v_head_dim)
    return 6 * matmul + attn


def make_train_step(cfg, tx, alpha=1e-4):
    """One jitted step: value_and_grad of next-token CE (+ alpha x balance) and an AdamW update.
    Independent of train.py (router-bias updates and MTP are left out)."""
    def loss_fn(p, router_bias, batch):
        out = model.forward(cfg, {"params": p, "router_bias": router_bias}, batch["inputs"],
                            with_mtp=False, with_logits=False)
        ce = loss.head_ce(out.hidden, p["lm_head"], batch["targets"], batch["mask"])
        return ce + alpha * out.router.balance_loss.sum()

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def step(p, opt_state, router_bias, batch):
        value, grads = jax.value_and_grad(loss_fn)(p, router_bias, batch)
        updates, opt_state = tx.update(grads, opt_state, p)
        p = jax.tree.map(lambda a, u: a + u, p, updates)
        return p, opt_state, value
    return step


def time_train(cfg, variables, batch_size, seq, iters):
    variables = jax.tree.map(jnp.copy, variables)          # the step donates its inputs
    p, router_bias = variables["params"], variables["router_bias"]
    tx = optim.make_optimizer(lambda _: 1e-4)
    opt_state = tx.init(p)
    ids = jax.random.randint(jax.random.key(1), (batch_size, seq + 1), 2, cfg.vocab_size)
    batch = dict(inputs=ids[:, :-1], targets=ids[:, 1:], mask=jnp.ones((batch_size, seq)))
    step = make_train_step(cfg, tx)
    t0 = time.perf_counter()
    p, opt_state, value = step(p, opt_state, router_bias, batch)
    first_loss = float(value)
    compile_s = time.perf_counter() - t0
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        p, opt_state, value = step(p, opt_state, router_bias, batch)
        jax.block_until_ready(value)
        times.append(time.perf_counter() - t0)
    # iters=0 (the CI run): the first step's time, compile included, stands in
    return dict(compile_and_first_step_s=compile_s,
                step_ms=1e3 * float(np.median(times) if times else compile_s), timed_steps=iters,
                first_loss=first_loss, last_loss=float(value),
                finite=bool(np.isfinite(first_loss) and np.isfinite(float(value))))


def train_section(suite, rec):
    a, t0 = suite.args, time.time()
    batch_size, seq = (2, 32) if a.small else (4, 2048)
    cfg = model_config(a.small)
    counts = params.count_params(cfg)
    fpt = flops_per_token(cfg, counts, seq)
    rec.update(total_params=counts["total"], activated_params=counts["activated"],
               flops_per_token=fpt, batch=batch_size, seq=seq, peak_flops=PEAK_BF16,
               config={k: v for k, v in cfg.to_dict().items() if k in (
                   "hidden_size", "num_hidden_layers", "n_routed_experts", "num_experts_per_tok",
                   "moe_intermediate_size", "vocab_size", "num_attention_heads", "remat")})
    log(f"   params total {counts['total'] / 1e9:.3f} B, activated "
        f"{counts['activated'] / 1e9:.3f} B, {fpt / 1e9:.2f} GFLOP/token, batch "
        f"{batch_size} x {seq}")
    variants = (("bf16", dict(gemm_impl="jnp")), ("bf16 + pallas dispatch", dict(
        gemm_impl="pallas")), ("fp8 (pallas)", dict(fp8=True, gemm_impl="pallas")))
    if a.small:
        variants = (variants[0], variants[2])
    suite.variables = (cfg, model.init(cfg, jax.random.key(0)))    # FP8 changes no shapes
    for name, over in variants:
        if suite.over_budget("train", t0):
            rec["entries"].append(dict(case=name, skipped="time budget"))
            continue

        def one():
            r = time_train(cfg.replace(**over), suite.variables[1], batch_size, seq,
                           a.train_iters)
            tps = batch_size * seq / (r["step_ms"] * 1e-3)
            return dict(r, tokens_per_s=tps, mfu=tps * fpt / PEAK_BF16, ok=r["finite"])
        suite.entry(rec, name, one)


def decode_section(suite, rec):
    import decode as decode_bench          # benchmarks/decode.py
    a = suite.args
    cfg = model_config(a.small)
    context, batch, steps = (16, 2, 4) if a.small else (2048, 8, 16)
    have = getattr(suite, "variables", None)
    variables = have[1] if have and have[0] == cfg else model.init(cfg, jax.random.key(0))
    rec.update(context=context, batch=batch, steps=steps)
    for impl in ("naive", "absorbed"):
        suite.entry(rec, impl, lambda: dict(tokens_per_s=decode_bench.decode_tokens_per_s(
            cfg, variables, context, batch, steps, impl, repeats=2 if a.small else 3)))
    tps = [e.get("tokens_per_s") for e in rec["entries"]]
    if all(tps):
        rec["absorbed_over_naive"] = tps[1] / tps[0]


RUNNERS = dict(env=env_section, correctness=correctness_section, gemm=gemm_section,
               grouped=grouped_section, dispatch=dispatch_section, train=train_section,
               decode=decode_section)


# ---- report -----------------------------------------------------------------------------------

def markdown(results) -> str:
    lines = ["| section | case | status | key figures |", "|---|---|---|---|"]
    for name, rec in results.items():
        head = {k: v for k, v in rec.items() if k not in ("entries", "status", "seconds")}
        lines.append(f"| {name} | ({rec.get('seconds')} s) | {rec['status']} | "
                     + ", ".join(f"{k}={_fmt(v)}" for k, v in head.items()
                                 if not isinstance(v, (dict, list)))[:400] + " |")
        for e in rec["entries"]:
            figs = []
            for k, v in e.items():
                if k in ("case",):
                    continue
                if isinstance(v, dict):
                    figs += [f"{k}.{kk}={_fmt(vv)}" for kk, vv in v.items()
                             if not isinstance(vv, (dict, list))]
                elif not isinstance(v, list):
                    figs.append(f"{k}={_fmt(v)}")
            status = ("skipped" if "skipped" in e else "error" if "error" in e
                      else "FAIL" if e.get("ok") is False else "ok")
            lines.append(f"| | {e['case']} | {status} | " + ", ".join(figs).replace("|", "/")
                         + " |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="directory for gpu_suite.json / gpu_suite.md")
    ap.add_argument("--interpret", action="store_true", help="Pallas interpret mode (CPU)")
    ap.add_argument("--small", action="store_true", help="CI-sized shapes and model")
    ap.add_argument("--sections", default=",".join(SECTIONS), help="comma-separated subset")
    ap.add_argument("--iters", type=int, default=5, help="timed calls per kernel measurement")
    ap.add_argument("--train-iters", type=int, default=5, help="timed train steps")
    ap.add_argument("--budget-scale", type=float, default=1.0, help="x every section budget")
    ap.add_argument("--verbose", action="store_true", help="print tracebacks")
    args = ap.parse_args(argv)
    if args.small:
        args.iters, args.train_iters = min(args.iters, 1), 0
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    suite = Suite(args)
    t_start = time.time()
    for name in args.sections.split(","):
        with suite.section(name) as rec:
            RUNNERS[name](suite, rec)
        # written after every section: a run cut short still leaves its results
        doc = dict(wall_s=round(time.time() - t_start, 1), argv=sys.argv[1:],
                   sections=suite.results)
        (out / "gpu_suite.json").write_text(json.dumps(doc, indent=1, default=str))
        (out / "gpu_suite.md").write_text(markdown(suite.results))
    log(f"\n== done in {time.time() - t_start:.0f} s: "
        + ", ".join(f"{k} {v['status']}" for k, v in suite.results.items()))
    log(f"   {out / 'gpu_suite.json'}  {out / 'gpu_suite.md'}")
    return 0 if all(v["status"] == "ok" for v in suite.results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
