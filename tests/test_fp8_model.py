"""The FP8 recipe inside the model (cfg.fp8): which GEMMs run in FP8, and what that costs.

Report §3.3 / spec §5: every Linear of MLA (q_a, q_b, kv_a, kv_b, o), the dense FFNs, the shared
and routed experts and the MTP projection run their three GEMMs in FP8; embedding, output head,
router (gating), norms and the attention core stay in BF16/FP32.

Tolerances come from E4M3 itself. One FP8 GEMM of normal random operands has relative RMS error
~3.6%: each operand is rounded to 3 mantissa bits (half-ulp 2^-4 to 2^-5 of the value, RMS about
2.5%) and the two errors add in quadrature. BF16 (7 bits) gives 16x less per operand (2^-8 vs
2^-4). The model at init carries these errors forward about 3x (the BF16 model shows the same
factor), so FP8 logits sit ~10% from the FP32 ones, and BF16 about 1%.

Routing is pinned by the selection bias in the numeric comparisons: top-k is discrete, and at init
the sigmoid scores are so close together that FP8's noise flips ~7% of the (token, expert)
choices, each an O(1) change (cosine of the gradients ~0.975 unpinned; BF16 flips ~1%). Which
experts a token picks is not what these tests measure; the grouped FP8 GEMM still runs, with
12 of 16 experts empty.
"""
import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsv3_jax import config, fp8, model, train_config

VOCAB = 512
PINNED = (0, 1, 4, 5)    # two experts in each of groups 0 and 1: topk_group=2, top-4


def tiny_cfg(**kw):
    """1 dense + 1 MoE layer (both scanned stacks), MTP depth 1 (an MoE block), q LoRA."""
    return config.tiny(vocab_size=VOCAB, num_hidden_layers=2, **kw)


@pytest.fixture(scope="module")
def setup():
    seed = int(np.random.SeedSequence().entropy % (2 ** 31))
    print(f"[seed {seed}]")
    rng = np.random.default_rng(seed)
    cfg = tiny_cfg()
    variables = model.init(cfg, jax.random.key(seed))
    bias = np.zeros(cfg.n_routed_experts, np.float32)
    bias[list(PINNED)] = 10.0                   # >> the spread of sigmoid scores in [0, 1]
    pinned = dict(variables, router_bias=jax.tree.map(
        lambda b: jnp.broadcast_to(jnp.asarray(bias), b.shape), variables["router_bias"]))
    ids = jnp.asarray(rng.integers(0, VOCAB, (2, 32)), jnp.int32)
    targets = jnp.asarray(rng.integers(0, VOCAB, (2, 32)), jnp.int32)
    return cfg, variables, pinned, ids, targets


def _f64(a):
    return np.asarray(jnp.asarray(a, jnp.float32), np.float64)


def rel_err(a, ref):
    return np.linalg.norm(_f64(a) - _f64(ref)) / np.linalg.norm(_f64(ref))


def cosine(a, b):
    a, b = _f64(a).ravel(), _f64(b).ravel()
    return a @ b / np.linalg.norm(a) / np.linalg.norm(b)


def forward(cfg, variables, ids):
    return jax.jit(lambda v, i: model.forward(cfg, v, i))(variables, ids)


# ---- which GEMMs go through FP8 ---------------------------------------------------------------

def trace_fp8_calls(cfg, variables, ids, monkeypatch):
    """Traces the forward (no compile) and records, per module call, the FP8 GEMMs it ran."""
    counts = {"dot": 0, "grouped": 0}
    real_dot, real_grouped = fp8.fp8_dot, fp8.fp8_grouped_dot
    real_swiglu_down = fp8.fp8_grouped_swiglu_down

    def dot(*a, **k):
        counts["dot"] += 1
        return real_dot(*a, **k)

    def grouped(*a, **k):
        counts["grouped"] += 1
        return real_grouped(*a, **k)

    def swiglu_down(*a, **k):     # the down-projection (the SwiGLU inputs cached in FP8)
        counts["grouped"] += 1
        return real_swiglu_down(*a, **k)

    monkeypatch.setattr(fp8, "fp8_dot", dot)
    monkeypatch.setattr(fp8, "fp8_grouped_dot", grouped)
    monkeypatch.setattr(fp8, "fp8_grouped_swiglu_down", swiglu_down)
    calls = []

    def interceptor(next_fun, args, kwargs, context):
        before = dict(counts)
        out = next_fun(*args, **kwargs)
        delta = {k: counts[k] - before[k] for k in counts}
        calls.append((type(context.module).__name__, context.method_name,
                      context.module.path, delta))
        return out

    with nn.intercept_methods(interceptor):
        jax.eval_shape(lambda v, i: model.forward(cfg, v, i), variables, ids)
    return calls, counts


@pytest.mark.parametrize("cache", [True, False])
def test_exactly_the_papers_linears_run_in_fp8(setup, monkeypatch, cache):
    cfg, variables, _, ids, _ = setup
    calls, total = trace_fp8_calls(cfg.replace(fp8=True, fp8_cache_activations=cache),
                                   variables, ids, monkeypatch)
    linears = [(path, d) for cls, meth, path, d in calls if cls == "Linear" and meth == "__call__"]
    experts = [(path, d) for cls, meth, path, d in calls
               if cls == "RoutedExperts" and meth == "__call__"]
    # every Linear call is exactly one FP8 dot; every routed-expert call runs the three
    # matrices as grouped FP8 GEMMs: gate, up and down, or (caching x once) gate | up side by
    # side and down with the SwiGLU inputs cached
    per_expert_call = 2 if cache else 3
    assert all(d == {"dot": 1, "grouped": 0} for _, d in linears), linears
    assert all(d == {"dot": 0, "grouped": per_expert_call} for _, d in experts), experts
    # ... and nothing else is: the router's dot, the head and the embedding add no FP8 call
    assert total == {"dot": len(linears), "grouped": per_expert_call * len(experts)}
    assert {"head", "embed_tokens"} <= {meth for _, meth, _, _ in calls}
    for cls, meth, path, d in calls:
        if meth in ("head", "embed_tokens"):
            assert d == {"dot": 0, "grouped": 0}, (meth, d)
    names = {path[-2:] for path, _ in linears}
    assert names == {("attn", "q_a"), ("attn", "q_b"), ("attn", "kv_a"), ("attn", "kv_b"),
                     ("attn", "o_proj"), ("mlp", "gate"), ("mlp", "up"), ("mlp", "down"),
                     ("shared", "gate"), ("shared", "up"), ("shared", "down"),
                     ("mtp_0", "eh_proj")}
    # both MoE stacks (main and MTP) run their routed experts in FP8
    assert {path[0] for path, _ in experts} == {"moe_layers", "mtp_0"}
    # and every Linear kernel of the parameters is one of those calls
    kernels = {p[:-1] for p in flax.traverse_util.flatten_dict(variables["params"])
               if p[-1] == "kernel"}
    assert kernels == {path for path, _ in linears}


def test_fp8_off_runs_no_fp8_gemm(setup, monkeypatch):
    cfg, variables, _, ids, _ = setup
    _, total = trace_fp8_calls(cfg, variables, ids, monkeypatch)
    assert total == {"dot": 0, "grouped": 0}


def test_fp8_config_validates():
    assert config.tiny(fp8=True).fp8
    assert config.tiny(fp8=True, moe_impl="sorted").fp8
    for impl in ("gather", "dense"):          # these bypass the grouped GEMM: rejected, not ignored
        with pytest.raises(config.ConfigError, match="fp8=True needs moe_impl"):
            config.tiny(fp8=True, moe_impl=impl)
    from experiments.configs import deepseek_v3, fp8_vs_bf16
    assert train_config.validate(deepseek_v3.get_config()).fp8
    fp8_flags = []

    def add(**overrides):       # the experiment's sweep: BF16, then FP8, nothing else changed
        c = fp8_vs_bf16.get_config()
        c.update_from_flattened_dict(overrides)
        fp8_flags.append(train_config.validate(c).fp8)
        assert c.model.dtype == "bfloat16" and c.model.gemm_impl == "jnp"

    fp8_vs_bf16.sweep(add)
    assert fp8_flags == [False, True]
    assert train_config.validate(fp8_vs_bf16.get_config("fp8,quick")).fp8


# ---- numerics ---------------------------------------------------------------------------------

def test_logits_within_fp8_error_of_full_precision(setup):
    """FP8 logits vs FP32 with the same params: < 0.2 relative (measured ~0.1, see the module
    docstring), and within 16x (E4M3's 2^-4 over BF16's 2^-8) of the BF16 model's own error.
    A wrong scale or tile orientation gives O(1)."""
    cfg, _, pinned, ids, _ = setup
    ref = forward(cfg, pinned, ids)
    out8 = forward(cfg.replace(fp8=True), pinned, ids)
    out16 = forward(cfg.replace(dtype="bfloat16"), pinned, ids)
    np.testing.assert_array_equal(out8.router.counts, ref.router.counts)    # routing pinned
    for name in ("logits", "mtp_logits"):
        e8 = rel_err(getattr(out8, name), getattr(ref, name))
        e16 = rel_err(getattr(out16, name), getattr(ref, name))
        print(f"{name}: FP8 {e8:.4f}, BF16 {e16:.4f} relative error vs FP32")
        assert e8 < 0.2 and e8 < 16 * e16
        assert cosine(getattr(out8, name), getattr(ref, name)) > 0.98


def ce_loss(cfg, variables, ids, targets):
    def ce(logits, t):
        return jnp.mean(jax.nn.logsumexp(logits, -1)
                        - jnp.take_along_axis(logits, t[..., None], -1)[..., 0])

    def loss(params):
        out = model.forward(cfg, dict(variables, params=params), ids)
        return (ce(out.logits, targets) + 0.3 * ce(out.mtp_logits[0], targets)
                + 1e-4 * out.router.balance_loss.sum())
    return jax.jit(jax.grad(loss))


def test_grads_under_jit_scan_and_remat_align_with_full_precision(setup):
    """jit(grad) through the scanned stacks, with remat none / full / selective: finite; remat
    recomputes the same quantization, so it changes nothing; FP8 vs FP32 gradients have cosine
    >= 0.99 over all parameters (measured ~0.995) and >= 0.97 per tensor (small ones such as the
    q-path norms, whose gradients at init are tiny, are the noisiest: ~0.985)."""
    cfg, _, pinned, ids, targets = setup
    ref = ce_loss(cfg, pinned, ids, targets)(pinned["params"])
    grads = {r: ce_loss(cfg.replace(fp8=True, remat=r), pinned, ids, targets)(pinned["params"])
             for r in ("none", "full", "selective")}
    flat_ref = jax.tree_util.tree_flatten_with_path(ref)[0]
    for r, g in grads.items():
        leaves = jax.tree.leaves(g)
        assert all(np.all(np.isfinite(_f64(x))) for x in leaves), r
        if r != "none":
            for a, b in zip(leaves, jax.tree.leaves(grads["none"])):
                np.testing.assert_allclose(_f64(a), _f64(b), rtol=1e-4,
                                           atol=1e-5 * np.abs(_f64(b)).max())
    g = grads["none"]
    overall = cosine(np.concatenate([_f64(x).ravel() for x in jax.tree.leaves(g)]),
                     np.concatenate([_f64(x).ravel() for x in jax.tree.leaves(ref)]))
    per_leaf = {jax.tree_util.keystr(p): cosine(a, b)
                for (p, b), a in zip(flat_ref, jax.tree.leaves(g))}
    worst = min(per_leaf, key=per_leaf.get)
    print(f"gradient cosine FP8 vs FP32: overall {overall:.4f}, worst {worst} {per_leaf[worst]:.4f}")
    assert overall >= 0.99
    assert per_leaf[worst] >= 0.97
    # the pinned experts got gradients, the other (empty) experts exactly none
    dw = _f64(g["moe_layers"]["block"]["moe"]["experts"]["up"])[0]
    empty = np.setdiff1d(np.arange(cfg.n_routed_experts), PINNED)
    assert not np.any(dw[empty]) and np.all(np.abs(dw[list(PINNED)]).sum((1, 2)) > 0)


def test_grad_error_script_groups_every_parameter_and_measures_by_hand(rng):
    """experiments/fp8_grad_error.py: every parameter of the model (MTP on) falls in a named
    group, and `errors` gives the relative L2 per group and overall and the cosine of
    hand-built gradients (two batches, known perturbations)."""
    from experiments import fp8_grad_error as fge
    cfg = config.tiny(num_hidden_layers=3)
    shapes = jax.eval_shape(lambda: model.init(cfg, jax.random.key(0)))["params"]
    paths = [p for p, _ in jax.tree_util.tree_flatten_with_path(shapes)[0]]
    groups = {jax.tree_util.keystr(p): fge.group_of(p) for p in paths}
    assert "other" not in groups.values(), groups
    assert groups["['lm_head']"] == "head" and groups["['embed']"] == "embed"
    assert groups["['moe_layers']['block']['moe']['experts']['up']"] == "routed experts"
    assert groups["['moe_layers']['block']['moe']['router']"] == "router"
    assert groups["['moe_layers']['block']['attn']['kv_b']['kernel']"] == "attention"
    assert groups["['dense_layers']['block']['mlp']['gate']['kernel']"] == "dense MLP"
    k = jax.tree_util.GetAttrKey
    pe, pr = (k("embed"),), (k("moe_router"),)
    ref, got, want_e, want_r, want_all, want_cos = [], [], [], [], [], []
    for _ in range(2):
        e, r = rng.normal(size=7), rng.normal(size=(3, 2))
        de, dr = rng.normal(size=7) * 0.1, rng.normal(size=(3, 2)) * 0.3
        ref.append([(pe, e), (pr, r)])
        got.append([(pe, e + de), (pr, r + dr)])
        want_e.append(np.linalg.norm(de) / np.linalg.norm(e))
        want_r.append(np.linalg.norm(dr) / np.linalg.norm(r))
        flat_r, flat_g = np.concatenate([e, r.ravel()]), np.concatenate([e + de, (r + dr).ravel()])
        want_all.append(np.linalg.norm(flat_g - flat_r) / np.linalg.norm(flat_r))
        want_cos.append(flat_g @ flat_r / np.linalg.norm(flat_g) / np.linalg.norm(flat_r))
    out = fge.errors(got, ref)
    assert out["embed"] == pytest.approx(np.mean(want_e), rel=1e-12)
    assert out["router"] == pytest.approx(np.mean(want_r), rel=1e-12)
    assert out["all"] == pytest.approx(np.mean(want_all), rel=1e-12)
    assert out["cos"] == pytest.approx(np.mean(want_cos), rel=1e-12)
    # another scale divides by its norm instead (the `fp8 - fp8_no_cache` row:
    # relative to the float32 gradient); the cosine stays that of the two compared
    twice = [[(p, 2 * x) for p, x in b] for b in ref]
    scaled = fge.errors(got, ref, scale=twice)
    assert scaled["all"] == pytest.approx(out["all"] / 2, rel=1e-12)
    assert scaled["cos"] == pytest.approx(out["cos"], rel=1e-12)
