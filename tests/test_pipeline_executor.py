"""The executor's static side: stage sizes, the device table, config errors (no devices needed;
the numerics on 8 fake devices are tests/multidevice/pipeline_equivalence.py)."""
import dataclasses

import numpy as np
import pytest

from dsv3_jax import config as config_lib
from dsv3_jax.pipeline import SCHEDULES, executor, simulate
from dsv3_jax.pipeline import schedules as sched_lib


@pytest.mark.parametrize("layers,stages,first,last", [(58, 32, 3, 1), (58, 16, 3, 1), (3, 2, 1, 1),
                                                      (16, 16, 1, 1), (17, 4, 0, 0), (9, 8, 2, 0),
                                                      (2, 4, 1, 1)])
def test_stage_layers_cover_the_stack_within_the_cap(layers, stages, first, last):
    counts = executor.stage_layers(layers, stages, first, last)
    cap = -(-layers // stages)
    assert sum(counts) == layers and len(counts) == stages and max(counts) == cap
    assert all(c >= 1 for c, e in zip(counts, [first] + [0] * (stages - 2) + [last]) if not e)
    if first > 0 and layers % stages and stages > 2:   # the first stage's extra work makes it lighter
        assert counts[0] <= min(counts[1:-1])
    with pytest.raises(ValueError, match="do not split"):
        executor.stage_layers(stages - 1, stages)   # no extras: every stage needs a layer


@pytest.mark.parametrize("name", SCHEDULES)
@pytest.mark.parametrize("ranks", [2, 4])
@pytest.mark.parametrize("split_w,keep", [(True, False), (False, False), (True, True),
                                          (False, True)])
def test_device_table_runs_every_op_once_and_routes_every_transfer(name, ranks, split_w, keep):
    m = 2 * ranks
    layers = 3 * 2 * ranks + 1
    schedule = sched_lib.make(name, ranks, m, eager=name == "1f1b")
    counts = executor.stage_layers(layers, schedule.n_stages, 1, 1)
    plan = executor.make_plan(schedule, simulate.lockstep(schedule), counts, split_w, keep)
    assert plan.split_w == (split_w and schedule.split_w)
    t = plan.table
    C = executor.C
    for op in ("f", "b") + (("w",) if plan.split_w else ()):
        done = sorted((int(t[i, r, C[f"{op}_slot"]]), int(t[i, r, C[f"{op}_mb"]]), r)
                      for i in range(t.shape[0]) for r in range(ranks)
                      if t[i, r, C[f"{op}_kind"]] > 0)
        want = sorted((slot, mb, rank) for rank, slot, mb in
                      ((*schedule.route(s, mb), mb) for s in range(schedule.n_stages)
                       for mb in range(m)))
        assert done == want, op
    # every sent activation / gradient is received by the neighbour the direction names
    shift = {executor.RIGHT: (1, "ra", "rg"), executor.LEFT: (-1, "la", "lg"),
             executor.LOCAL: (0, "oa", "og")}
    for i in range(t.shape[0]):
        for r in range(ranks):
            for op, prefix_i in (("f", 1), ("b", 2)):
                d = int(t[i, r, C[f"{op}_dir"]])
                if d == executor.STAY:
                    continue
                step, *names = shift[d]
                assert 0 <= r + step < ranks
                assert t[i, r + step, C[f"{names[prefix_i - 1]}_mb"]] == t[i, r, C[f"{op}_mb"]]
    # layer index: every MoE layer held once per parameter copy, pads marked -1
    held = plan.layer_index[plan.layer_index >= 0]
    assert np.array_equal(np.bincount(held, minlength=layers),
                          np.full(layers, schedule.param_copies))
    # every buffered value has a row, and the buffers' rows are each rank's peak live values
    for name in executor.BUFFERS:
        rows, n = plan.rows[name], plan.n_rows[name]
        assert rows.min() >= 0 and rows.max() <= n
    _replay_buffers(plan, ranks)


def _replay_buffers(plan, ranks):
    """Run the tick table over the executor's buffers (a rank's rows, `plan.rows`) in the
    executor's order: within a tick F, then B read; B writes the store (split W), W reads it;
    at the tick's end F's residuals and the arrived activations and gradients are written.
    Every read must find its own (chunk slot, micro-batch): F its input, B F's residuals
    (plan.keep_residuals) or the stage input (recompute) and the output gradient, W what its
    B stored. No write may land in the scratch row unless idle."""
    t, C = plan.table, executor.C
    bufs = {name: {} for name in executor.BUFFERS}

    def key(name, r, slot, mb):
        row = int(plan.rows[name][r, slot, mb])
        assert row < plan.n_rows[name], (name, r, slot, mb, "no row")
        return r, row

    for i in range(t.shape[0]):
        writes = []
        for r in range(ranks):
            g = lambda col: int(t[i, r, C[col]])
            if g("f_kind") > 0:
                f = (g("f_slot"), g("f_mb"))
                if g("f_kind") != executor.FIRST:   # the first stage reads the batch instead
                    assert bufs["act"].get(key("act", r, *f)) == f, (i, r, "f")
                if plan.keep_residuals:
                    writes.append(("res", key("res", r, *f), f))
            if g("b_kind") > 0:
                b = (g("b_slot"), g("b_mb"))
                if plan.keep_residuals:
                    assert bufs["res"].get(key("res", r, *b)) == b, (i, r)
                elif g("b_kind") != executor.FIRST:
                    assert bufs["act"].get(key("act", r, *b)) == b, (i, r)
                if g("b_kind") != executor.LAST:   # the last stage seeds its own
                    assert bufs["grad"].get(key("grad", r, *b)) == b, (i, r)
                if plan.split_w:
                    bufs["store"][key("store", r, *b)] = b
            if plan.split_w and g("w_kind") > 0:
                w = (g("w_slot"), g("w_mb"))
                assert bufs["store"].get(key("store", r, *w)) == w, (i, r, "w")
            for prefix, name in (("ra", "act"), ("la", "act"), ("oa", "act"),
                                 ("rg", "grad"), ("lg", "grad"), ("og", "grad")):
                if g(f"{prefix}_slot") >= 0:
                    v = (g(f"{prefix}_slot"), g(f"{prefix}_mb"))
                    writes.append((name, key(name, r, *v), v))
        for name, k, v in writes:
            bufs[name][k] = v


def test_buffer_rows_are_the_peak_in_flight():
    """A rank's buffers hold the most values live at once on it, whatever chunk they belong
    to: DualPipeV's stage inputs need the schedule's own peak of stage activations in flight
    (2P + 1 at P = 16), not twice the busiest chunk's; with kept residuals its inputs are free
    after F, so the residuals take the peak rows and the inputs a handful."""
    from dsv3_jax.pipeline import simulate
    for name, p, m in (("dualpipev", 16, 120), ("dualpipe", 16, 120), ("zb1p", 8, 24)):
        s, plan = executor.build(name, p, m, 4 * p, (3.0, 1.0))
        peak = max(simulate.peak_inflight(s))
        assert plan.n_rows["act"] == peak, (name, plan.n_rows)
        assert plan.n_rows["res"] == plan.n_rows["store"] == 0
        s, kept = executor.build(name, p, m, 4 * p, (3.0, 1.0), True, True)
        assert kept.n_rows["res"] <= peak and kept.n_rows["act"] <= 4, (name, kept.n_rows)
        assert 1 <= kept.n_rows["store"] <= peak


def test_pipeline_problems_are_reported_before_compile():
    cfg = config_lib.tiny()
    from dsv3_jax.objectives import next_token, pretrain
    obj = pretrain.Pretrain(cfg=cfg, mtp_weight=lambda s: 0.3, alpha=1e-4)
    assert executor.problems("dualpipev", 2, [4], cfg, obj) == []
    text = " | ".join(executor.problems("dualpipe", 3, [6], cfg, obj)
                      + executor.problems("dualpipev", 2, [2], cfg, obj)
                      + executor.problems("dualpipev", 4, [8], cfg, obj)
                      + executor.problems("zigzag", 2, [4], cfg, obj)
                      + executor.problems("1f1b", 2, [4], cfg, next_token.NextToken(cfg)))
    for needle in ("dualpipe", "2 micro-batches", "3 MoE layers do not split into 8 stages", "zigzag",
                   "has no pipeline stages"):
        assert needle in text, (needle, text)
    # the other mesh axes compose with the pipeline; tensor where the widths split
    ok = dict(pipeline=2, expert=2, data=2, fsdp=1, tensor=1)
    assert executor.problems("dualpipev", 2, [4], cfg, obj, ok) == []
    assert executor.problems("dualpipev", 2, [4], cfg, obj, dict(ok, data=1, fsdp=2)) == []
    assert executor.problems("dualpipev", 2, [4], cfg, obj, dict(ok, expert=1, tensor=2)) == []
    bad = executor.problems("dualpipev", 2, [4], cfg, obj, dict(ok, expert=1, data=1, tensor=3))
    assert bad and all("mesh.tensor=3 with mesh.pipeline=2" in b for b in bad), bad
    assert any("num_attention_heads" in b for b in bad), bad
    fp8 = cfg.replace(fp8=True, dtype="bfloat16")
    bad = executor.problems("dualpipev", 2, [4], fp8, dataclasses.replace(obj, cfg=fp8),
                            dict(ok, expert=1, tensor=2))
    assert bad and "multiple of 128" in bad[0], bad
    bad = executor.problems("1f1b", 2, [4], cfg, _NoCfg(), dict(ok, expert=1, tensor=2))
    assert any("not a dataclass with a `cfg` field" in b for b in bad), bad


class _NoCfg:
    """An objective with pipeline stages but no config to localise (tensor beside pipeline)."""
    stage_loss = tail_loss = balance = None


def test_pipeline_microbatches_set_the_micro_batch():
    from dsv3_jax import train_config
    from experiments.configs import tiny
    c = tiny.get_config()
    c.mesh.pipeline = 2
    train_config.validate(c)
    assert c.pipeline.microbatches == 4 and c.data.micro_batch == c.data.global_batch // 4
    c = tiny.get_config()
    c.pipeline.microbatches, c.data.micro_batch = 4, 1
    with pytest.raises(config_lib.ConfigError, match="set one of them"):
        train_config.validate(c)


def test_unknown_schedule_is_a_config_error_with_a_suggestion():
    from dsv3_jax import train_config
    from experiments.configs import tiny
    c = tiny.get_config()
    c.pipeline.schedule = "dualpipv"
    with pytest.raises(config_lib.ConfigError, match="did you mean 'dualpipev'"):
        train_config.validate(c)


@pytest.mark.parametrize("name", ["1f1b", "zb1p", "dualpipev"])
def test_tick_costs_follow_the_busiest_rank(name):
    schedule = sched_lib.make(name, 4, 8, eager=name == "1f1b")
    plan = executor.make_plan(schedule, simulate.lockstep(schedule),
                              [1] * schedule.n_stages, split_w=True)
    F, B, W = 1.0, 2.5, 0.75
    cost = executor.op_costs(F, B, W, plan.split_w, recompute=True)
    t, C = plan.table, executor.C
    cols = [("F", "f_kind"), ("B", "b_kind")] + ([("W", "w_kind")] if plan.split_w else [])
    per_rank = sum(cost[o] * (t[:, :, C[c]] > 0) for o, c in cols)     # [T, P]
    branched = executor.tick_costs(plan, F, B, W, branched=True, recompute=True)
    free = executor.tick_costs(plan, F, B, W, branched=False, recompute=True)
    np.testing.assert_allclose(branched, per_rank.max(1))
    np.testing.assert_allclose(free, sum(cost[o] for o, _ in cols))
    assert (branched <= free).all() and branched.sum() < free.sum()
    # every rank does its stages' F, B (and W) for every micro-batch, once
    work = 8 * schedule.n_stages / 4 * sum(cost[o] for o, _ in cols)
    np.testing.assert_allclose(per_rank.sum(0), work)
    np.testing.assert_allclose(executor.rank_costs(plan, F, B, W, True, True), per_rank)
    # recompute: B re-runs the forward; a split W is the Linears' dW GEMMs alone
    assert cost["B"] == (F + B - W if plan.split_w else F + B)
    assert cost["W"] == (W if plan.split_w else 0.0)
    kept = executor.op_costs(F, B, W, plan.split_w, recompute=False)   # the VJP F kept
    assert kept["B"] == cost["B"] - F and kept["F"] == F and kept["W"] == cost["W"]


def test_local_embedding_gradient_equals_the_gather_gradient():
    import jax
    import jax.numpy as jnp
    from dsv3_jax import model
    rng = np.random.default_rng(3)
    table = jnp.asarray(rng.normal(size=(11, 6)), jnp.float32)
    ids = jnp.asarray(rng.integers(0, 11, (3, 7)), jnp.int32)      # repeated ids accumulate
    w = jnp.asarray(rng.normal(size=(3, 7, 6)), jnp.float32)
    loss = lambda f: lambda t: (f(t, ids) * w).sum()
    want = jax.grad(loss(lambda t, i: jnp.take(t, i, axis=0)))(table)
    got = jax.grad(loss(model._embed_local_grad))(table)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(model._embed_local_grad(table, ids), jnp.take(table, ids, axis=0))
    t16 = table.astype(jnp.bfloat16)                        # the gradient keeps the table's dtype
    g16 = jax.grad(lambda t: (model._embed_local_grad(t, ids).astype(jnp.float32) * w).sum())(t16)
    assert g16.dtype == jnp.bfloat16


def test_add_axes_puts_the_axis_on_the_first_dim_that_divides():
    """sharding.add_axes, by hand: the first dim divisible by its existing axes times the new
    one takes it; a spec that already uses the axis, a dim that no product divides and a
    scalar stay as they are; axes of size 1 are not added."""
    from jax.sharding import PartitionSpec as P
    from dsv3_jax import sharding
    mesh = {"data": 2, "fsdp": 1, "expert": 1, "pipeline": 4, "tensor": 1}
    add = lambda spec, shape: sharding.add_axes(spec, shape, mesh, ("pipeline",))
    assert add(P("data"), (8, 12)) == P(("data", "pipeline"), None)
    assert add(P("data"), (6, 8)) == P("data", "pipeline")        # 6 % (2 * 4) != 0
    assert add(P(None, "data"), (12, 6)) == P("pipeline", "data")
    assert add(P(), (6,)) == P()                                   # nothing divides
    assert add(P(), ()) == P()
    assert add(P("pipeline"), (8, 8)) == P("pipeline")             # already there
    assert sharding.add_axes(P(), (8,), mesh, ("fsdp",)) == P()    # size 1: not added


def test_plan_counts_what_the_step_gathers():
    """plan.state_memory with a pipeline: parameters at their at-rest shards; the step's
    gathered copy is the non-MoE parameters whole, and the gradients take the in-step layout
    (non-MoE whole, the MoE stack by stage), counted here leaf by leaf from the shapes."""
    import jax
    from dsv3_jax import config, model, plan, train_config
    c = train_config.base_config()
    cfg = config.tiny(num_hidden_layers=5)            # 1 dense + 4 MoE layers, MTP depth 1
    mesh = {"data": 1, "fsdp": 1, "expert": 1, "pipeline": 4, "tensor": 1}
    mem = plan.state_memory(c, cfg, mesh)
    shapes = jax.eval_shape(lambda: model.init(cfg, jax.random.key(0)))["params"]
    nbytes = lambda tree: sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))
    moe = nbytes(shapes["moe_layers"]) // 4          # 4 layers, one per rank
    rest = sum(nbytes(v) for k, v in shapes.items() if k != "moe_layers")
    assert mem["gathered"] == rest
    assert mem["grads"] == rest + moe
    assert mem["params"] < rest // 3 + moe           # at rest split four ways where it divides
    flat = plan.state_memory(c, cfg, dict(mesh, pipeline=1))
    assert flat["gathered"] == 0 and flat["grads"] == flat["params"] == nbytes(shapes)


def test_non_moe_parameters_rest_sharded_over_pipeline_and_gather_for_the_step():
    """train_state.params_specs with a pipeline: the MoE stack by stage (`layers`), every other
    leaf also over `pipeline` at rest, on its first dim that divides (none left out where a dim
    divides), and `gathered=True` (the executor's in-step layout) is the layout without it."""
    import jax
    from jax.sharding import PartitionSpec as P
    from dsv3_jax import config, model, train_state
    cfg = config.tiny(num_hidden_layers=5)        # 1 dense + 4 MoE layers: one per stage
    shapes = jax.eval_shape(lambda: model.init(cfg, jax.random.key(0)))["params"]
    mesh = {"data": 2, "fsdp": 1, "expert": 2, "pipeline": 4, "tensor": 1}
    rest = train_state.params_specs(cfg, shapes, mesh)
    step = train_state.params_specs(cfg, shapes, mesh, gathered=True)
    no_pp = train_state.params_specs(cfg, shapes, dict(mesh, pipeline=1))
    axes = lambda spec: {a for e in spec if e is not None
                         for a in ((e,) if isinstance(e, str) else e)}
    is_spec = lambda x: isinstance(x, P)
    for key in shapes:
        flat = lambda t: jax.tree.leaves(t[key], is_leaf=is_spec)
        for r, g, n, leaf in zip(flat(rest), flat(step), flat(no_pp), jax.tree.leaves(shapes[key])):
            if key == "moe_layers":
                assert r == g and "pipeline" in axes(r[:1])
                continue
            assert g == n and "pipeline" not in axes(g)
            if any(d % 4 == 0 for d in leaf.shape):
                assert "pipeline" in axes(r), (key, leaf.shape, r)
                dim = next(i for i, e in enumerate(r) if e is not None and "pipeline" in axes((e,)))
                ways = np.prod([mesh[a] for a in axes((r[dim],))])
                assert leaf.shape[dim] % ways == 0
    assert "pipeline" in axes(rest["embed"]) and "pipeline" in axes(rest["lm_head"])
    # tensor beside the pipeline: the stages keep the vocabulary, heads and FFN widths split
    # over it
    mesh = dict(mesh, data=1, tensor=2)
    step = train_state.params_specs(cfg, shapes, mesh, gathered=True)
    for spec in (step["embed"], step["lm_head"],
                 step["dense_layers"]["block"]["mlp"]["up"]["kernel"],
                 step["moe_layers"]["block"]["attn"]["q_b"]["kernel"],
                 step["moe_layers"]["block"]["moe"]["experts"]["down"]):
        assert "tensor" in axes(spec), spec


@pytest.mark.parametrize("name,moe_layers,slots", [
    ("gpipe", 8, 0),        # 4 stages of 2 layers in layer order: the stack is a reshape
    ("1f1b", 7, 2),         # 7 layers over 4 stages: padded to 2 slots per rank, a new buffer
    ("dualpipev", 8, 2),    # V: rank r holds stages r and 7 - r (1 layer each)
    ("dualpipev", 10, 4),   # 10 layers over 8 stages: 2 chunks x 2 slots, 3 layers at rest
    ("dualpipe", 8, 4),     # every stage (2 layers) on two ranks: 2 chunks x 2 slots
])
def test_plan_counts_the_stage_ordered_copy_of_the_moe_stack(name, moe_layers, slots):
    """plan: the MoE stack the executor runs is [P, chunks, n, ...] by stage; unless that is
    the at-rest layer order, the step holds it as a copy (params), and its gradient
    accumulator has its size instead of the at-rest one. Per-layer bytes from the shapes; the
    slots per rank by hand."""
    import jax
    from dsv3_jax import config, model, plan, train_config
    c = train_config.base_config()
    c.pipeline.schedule, c.data.global_batch, c.data.micro_batch = name, 16, 2
    c.data.seq_len = 32
    c.model = train_config.model_block("tiny", num_hidden_layers=1 + moe_layers)
    out = plan.plan(c, {"pipeline": 4, "data": 1, "expert": 1, "fsdp": 1, "tensor": 1}, 4)
    assert out["pipeline"]["stage_layer_slots"] == slots
    lines = {k: v for k, v in out["per_device_GiB"].items() if not k.startswith("  of which")}
    assert sum(lines.values()) == pytest.approx(out["total_per_device_GiB"], rel=1e-9)
    extra = [v for k, v in lines.items() if k.startswith("MoE stack by stage")]
    assert len(extra) == (slots > 0)
    if slots:
        cfg = config.tiny(num_hidden_layers=1 + moe_layers)
        shapes = jax.eval_shape(lambda: model.init(cfg, jax.random.key(0)))["params"]
        layer = sum(x.size * x.dtype.itemsize
                    for x in jax.tree.leaves(shapes["moe_layers"])) / moe_layers
        at_rest = -(-moe_layers // 4)
        assert extra[0] * plan.GB == pytest.approx((slots + max(slots - at_rest, 0)) * layer)


TOY_HLO = """\
%branch_a (p: (f32[2])) -> (f32[2]) {
  %x = f32[2]{0} collective-permute(%g), channel_id=1, source_target_pairs={{0,1},{1,0}}
}

%branch_b (p: (f32[2])) -> (f32[2]) {
  %y = f32[2]{0} multiply(%g, %g)
}

%inner_body (p: (s32[], f32[2])) -> (s32[], f32[2]) {
  %z = f32[2]{0} collective-permute-start(%g), channel_id=2
}

%inner_cond (p: (s32[], f32[2])) -> pred[] {
  %c = pred[] compare(%i, %n), direction=LT
}

%tick_body (p: (s32[], f32[2])) -> (s32[], f32[2]) {
  %t = f32[2]{0} collective-permute(%g), channel_id=3
  %k = (f32[2]{0}) conditional(%b, %u, %u), branch_computations={%branch_a, %branch_b}
  %w = (s32[], f32[2]{0}) while(%v), condition=%inner_cond, body=%inner_body, backend_config={"known_trip_count":{"n":"3"}}
}

%tick_cond (p: (s32[], f32[2])) -> pred[] {
  %c = pred[] compare(%i, %n), direction=LT
}

ENTRY %main (a: f32[2]) -> f32[2] {
  %o = f32[2]{0} collective-permute(%a), channel_id=4
  %l = (s32[], f32[2]{0}) while(%s), condition=%tick_cond, body=%tick_body, backend_config={"known_trip_count":{"n":"7"}}
}
"""


def test_benchmark_counts_permutes_inside_the_tick_loop_and_outside():
    """benchmarks/pipeline.count_permutes on a hand-written HLO: the tick loop (7 iterations)
    holds one permute in its body, one in a conditional's branch and one (async) in an inner
    loop; the entry holds one more, run once per step."""
    import importlib.util
    import pathlib
    path = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "pipeline.py"
    spec = importlib.util.spec_from_file_location("pipeline_benchmark", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.count_permutes(TOY_HLO, 7) == (3, 1)
    with pytest.raises(RuntimeError, match="one while loop of 5 iterations"):
        bench.count_permutes(TOY_HLO, 5)


def test_plan_counts_the_split_w_store_by_hand():
    """pipeline.split_w: the executor keeps each deferred GEMM's input and output gradient from
    B to W, in rows of its own (plan.rows["store"]). Per token and layer that is K + N per
    Linear (MLA: q_a, q_b, kv_a, kv_b, o_proj; shared expert: gate, up, down) plus the routed
    experts' grouped rows (x, dy: D each; gu, dgu: 2F each; and their tile layout): without
    expert parallelism top-k rows per token, padded to whole tiles; with it, a device's
    received rows (the all-to-all's capacity from each of the `expert` shards) over its
    E / expert experts, with a tile group for the empty rows."""
    from dsv3_jax import config, plan, train_config
    from dsv3_jax.layers import moe
    cfg = config.tiny()
    rows, seq = 2, 32
    tokens = rows * seq
    d, h, f = cfg.hidden_size, cfg.num_attention_heads, cfg.moe_intermediate_size
    qk = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim
    linears = [(d, cfg.q_lora_rank), (cfg.q_lora_rank, h * qk),
               (d, cfg.kv_lora_rank + cfg.qk_rope_head_dim),
               (cfg.kv_lora_rank, h * (cfg.qk_nope_head_dim + cfg.v_head_dim)),
               (h * cfg.v_head_dim, d)] + [(d, f), (d, f), (f, d)]   # one shared expert
    item = 4   # float32
    by_hand = tokens * item * sum(k + n for k, n in linears)
    slots_k = tokens * cfg.num_experts_per_tok
    tile = moe.tile_m_for(cfg, slots_k, cfg.n_routed_experts)
    tiles = -(-slots_k // tile) + cfg.n_routed_experts          # dropless: a partial tile each
    m = tiles * tile
    experts = m * item * (2 * d + 4 * f) + 4 * (tiles + 1)       # + tile_expert, used (int32)
    got = plan.deferred_w_bytes_per_layer(cfg, rows, seq)
    assert got == by_hand + experts, (got, by_hand + experts)
    ep = 2   # capacity: ceil(2.0 x slots / ep) rounded up to 8, from each of the ep shards
    received = ep * (-(-int(cfg.moe_ep_capacity_factor * slots_k / ep) // 8) * 8)
    tile = moe.tile_m_for(cfg, received, cfg.n_routed_experts // ep)
    tiles = min(-(-received // tile) + cfg.n_routed_experts // ep + 1, received)
    experts = tiles * tile * item * (2 * d + 4 * f) + 4 * (tiles + 1)
    got = plan.deferred_w_bytes_per_layer(cfg, rows, seq, expert_shards=ep)
    assert got == by_hand + experts, (got, by_hand + experts)
    # the plan adds chunks x (w_slots + 1) x layers per chunk of it to what the executor keeps
    c = train_config.base_config()
    c.pipeline.schedule, c.data.global_batch, c.data.micro_batch = "dualpipev", 16, 2
    c.data.seq_len = seq
    c.model = train_config.model_block("tiny", num_hidden_layers=9)
    mesh = {"pipeline": 2, "data": 1, "expert": 1, "fsdp": 1, "tensor": 1}
    off = plan.plan(c, mesh, 2)["pipeline"]
    c.pipeline.split_w = True
    on = plan.plan(c, mesh, 2)["pipeline"]
    per_layer = plan.deferred_w_bytes_per_layer(train_config.model_config(c), c.data.micro_batch,
                                                seq)
    want = (on["split_w_slots"] + 1) * 2 * per_layer      # rows (+ scratch) x 2 layers each
    assert on["split_w_store_GiB"] * plan.GB == pytest.approx(want)
    assert on["executor_GiB"] - off["executor_GiB"] == pytest.approx(want / plan.GB)
    assert 1 <= on["split_w_slots"] <= on["executor_slots"]


@pytest.mark.parametrize("keep,split", [(False, True), (True, False), (True, True)])
def test_plan_counts_the_buffers_the_executor_traces(keep, split):
    """plan.pipeline_plan's executor memory is what the executor allocates: its buffers'
    rows and bytes (executor.traced_buffers, from tracing the step on a one-rank pipeline:
    DualPipeV's two stages, the V turn local) equal the plan's for the stage inputs, output
    gradients and split-W store, and for the kept residuals within 1% (the plan's row is the
    MoE chunk's VJP from eval_shape + the front's and tail's input activations; the step's
    also holds the micro-batch's token ids and masks). The small config of the 8-device
    equivalence tests, with MTP and a dense layer."""
    import os
    import sys

    import jax
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "multidevice"))
    import pipeline_equivalence as pe
    from dsv3_jax import plan, sharding, train, train_config, train_state
    c = pe.config(False, 4)
    c.pipeline.update(schedule="dualpipev", split_w=split, recompute=not keep)
    cfg = train_config.validate(c)
    fns = train.make_step_fns(c, cfg)
    micro, rows = 4, pe.ROWS // 4
    batch = pe.batches(1, micro)[0]
    mesh = sharding.make_mesh(sharding.resolve_mesh_shape(dict(pipeline=1), 1))
    with jax.set_mesh(mesh):
        state = jax.eval_shape(lambda: train_state.init_state(cfg, fns.optimizer, 0, ema=False))
        jax.jit(lambda s, b: executor.step_value_and_grad(
            fns.objective, "dualpipev", 1, s["params"], s["router_bias"], b, s["step"],
            recompute=not keep, split_w=split)).lower(state, batch)
    got = dict(executor.traced_buffers)
    c.data.micro_batch = rows
    model_cfg = train_config.model_config(c)
    act = plan.activation_bytes_per_token_layer(model_cfg, model_cfg.remat, pe.SEQ,
                                                tokens=rows * pe.SEQ)
    pp = plan.pipeline_plan(c, model_cfg, 1, rows, act["per_token_layer"])
    assert pp["microbatches"] == micro
    want = {k: v * plan.GB for k, v in pp["executor_buffers_GiB"].items()}
    for k in ("act", "grad", "store"):
        assert got[k] == pytest.approx(want.get(k, 0), rel=1e-9), (k, got, want)
    n_res = pp["executor_rows"]["res"]
    assert (n_res > 0) == keep
    if keep:
        assert got["res"] == pytest.approx((n_res + 1) * pp["kept_residual_row_bytes"], rel=0.01)
    else:
        assert got["res"] == 0


def test_plan_with_tensor_beside_the_pipeline_counts_a_devices_slice():
    """With tensor beside the pipeline a device keeps its slice of the heads' and FFN widths'
    activations and the residual stream whole: the per-token figure and the kept residuals are
    the local config's (tp.local_config; the kept row from eval_shape of the model at those
    widths), between half and all of the unsplit ones; a tensor size that does not divide the
    widths is a mesh error."""
    from dsv3_jax import plan, train_config
    from dsv3_jax.layers import tp
    c = train_config.base_config()
    c.pipeline.schedule, c.pipeline.recompute = "dualpipev", False
    c.data.global_batch, c.data.micro_batch, c.data.seq_len = 16, 4, 32
    c.model = train_config.model_block("tiny", num_hidden_layers=5)
    mesh = {"pipeline": 2, "data": 1, "expert": 1, "fsdp": 1, "tensor": 1}
    one = plan.plan(c, mesh, 2)
    two = plan.plan(c, dict(mesh, tensor=2), 4)
    cfg = train_config.model_config(c)
    local = tp.local_config(cfg, 2)
    per = lambda cfg_: plan.activation_bytes_per_token_layer(
        cfg_, cfg_.remat, 32, tokens=4 * 32)["per_token_layer"]
    b1, b2 = (p["activation_assumptions"]["bytes_per_token_layer"] for p in (one, two))
    assert (b1, b2) == (per(cfg), per(local)) and b1 / 2 < b2 < b1
    row = lambda cfg_: plan.kept_residual_bytes(cfg_, 1, 4, 32, False)
    assert two["pipeline"]["kept_residual_row_bytes"] - row(local) == \
        one["pipeline"]["kept_residual_row_bytes"] - row(cfg)      # + the front's and tail's x
    assert row(cfg) / 2 < row(local) < row(cfg)
    with pytest.raises(Exception, match="mesh.tensor=3"):
        plan.plan(c, dict(mesh, tensor=3), 6)
