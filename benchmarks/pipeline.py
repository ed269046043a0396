"""Pipeline schedules as executed vs as simulated, side by side, in one run.

  XLA_FLAGS=--xla_force_host_platform_device_count=8 python benchmarks/pipeline.py \
      [--pp 4 --data 2 --layers 16 --schedules gpipe,1f1b,zb1p,dualpipev,dualpipe]

1. F, B, W of one stage chunk are measured on this machine (one device, the small config of
   tests/multidevice/pipeline_equivalence.py): the stage's forward F, its one-pass VJP B, and
   the two halves a split W runs: B with the weight gradients deferred (the input gradient,
   every gradient that is not a deferred weight's, and what W needs) and W
   (`common.deferred_weight_grads`: the Linears' and routed experts' dW GEMMs). Split modes
   are modelled with B = (deferred B) + W, the others with the one-pass B.
2. The report's PP (16) with those costs: the bubble as scheduled (MPMD), packed into lockstep
   ticks, and as this executor runs its tick table (`executor.tick_costs`) in each of its
   modes (MODES: branch-free or branched ticks; stage recompute or the forward's VJP residuals
   kept; a zero-bubble W apart or with its B).
3. For each schedule on the fake-device mesh: the simulator's MPMD and lockstep step times from
   those costs, the executor's step (the pipelined value-and-grad) timed as the median of 3 runs
   in the first mode, with the per-Linear W apart, with residuals kept and in the default
   one, its tick count, and the
   collective-permutes of the compiled program against the schedule's own cross-rank
   transfers: those inside the tick loop (its body and what it calls: branches, inner loops)
   and those outside it (once per step: for dualpipev and dualpipe, moving the MoE stack's
   layers between their at-rest layer-order shards and the schedule's stage placement, and
   their gradients back).

On fake CPU devices all "devices" share this machine's cores, so the executed time is the sum of
every rank's work, not the slowest rank's: each mode's time over the first mode's is compared
with the ratio of all ranks' op costs (in brackets).
"""
from __future__ import annotations

import argparse
import re
import statistics
import sys
import time

import jax
import jax.numpy as jnp

sys.path.insert(0, "tests/multidevice")


def count_permutes(hlo: str, ticks: int) -> tuple[int, int]:
    """Collective-permutes in a compiled program: (inside the tick loop: the while loop with
    `ticks` iterations and every computation it reaches, branches and inner loops included;
    elsewhere: run once per step)."""
    comps, name = {}, None
    for line in hlo.splitlines():
        head = re.match(r"(?:ENTRY )?%?([\w.\-]+) .*\{\s*$", line)
        if head and not line.startswith(" "):
            name, comps[head.group(1)] = head.group(1), []
        elif name is not None:
            comps[name].append(line)

    def callees(lines):
        text = "\n".join(lines)
        out = set(re.findall(r"(?:body|condition|calls|to_apply|true_computation|"
                             r"false_computation)=%?([\w.\-]+)", text))
        for group in re.findall(r"branch_computations=\{([^}]*)\}", text):
            out |= {c.strip().lstrip("%") for c in group.split(",")}
        return out

    loops = [re.search(r"body=%?([\w.\-]+)", line).group(1)
             for lines in comps.values() for line in lines
             if " while(" in line and f'"known_trip_count":{{"n":"{ticks}"}}' in line]
    if len(loops) != 1:
        raise RuntimeError(f"expected one while loop of {ticks} iterations, found {len(loops)}")
    reached, todo = set(), list(loops)
    while todo:
        c = todo.pop()
        if c in comps and c not in reached:
            reached.add(c)
            todo += callees(comps[c])
    count = lambda lines: sum(bool(re.search(r"collective-permute(?:-start)?\(", line))
                              for line in lines)
    inside = sum(count(comps[c]) for c in reached)
    return inside, sum(count(lines) for lines in comps.values()) - inside


def timed(fn, *args, n=3):
    jax.block_until_ready(fn(*args))
    out = []
    for _ in range(n):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        out.append(time.perf_counter() - t)
    return statistics.median(out)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pp", type=int, default=4)
    ap.add_argument("--data", type=int, default=2)
    ap.add_argument("--layers", type=int, default=16, help="MoE layers")
    ap.add_argument("--schedules", default="gpipe,1f1b,zb1p,dualpipev,dualpipe")
    ap.add_argument("--table-pp", type=int, default=16, help="PP of the bubble table (report: 16)")
    a = ap.parse_args(argv)
    import pipeline_equivalence as pe
    from dsv3_jax import model, sharding, train, train_config, train_state
    from dsv3_jax.layers import common
    from dsv3_jax.pipeline import executor, simulate

    c = pe.config(False, a.layers)
    cfg = train_config.validate(c)
    fns = train.make_step_fns(c, cfg)
    state = jax.jit(lambda: train_state.init_state(cfg, fns.optimizer, 0, ema=False))()
    micro = 2 * a.pp
    batch = pe.batches(1, micro)[0]
    mb = jax.tree.map(lambda x: x[0], batch)

    # 1. one stage chunk's F, B - W and W on one device (layers / (2 pp) layers: a V chunk)
    n = max(1, a.layers // (2 * a.pp))
    chunk = jax.tree.map(lambda x: x[:n], state["params"]["moe_layers"])
    bias = jax.tree.map(lambda x: x[:n], state["router_bias"]["moe_layers"])
    x = jnp.ones(mb["inputs"].shape + (cfg.hidden_size,), jnp.float32) * 0.1

    def f(p, x):
        y, st = model.forward_moe_chunk(cfg, {"params": {"moe_layers": p},
                                              "router_bias": {"moe_layers": bias}},
                                        x, mb["positions"], mb["segment_ids"])
        return y, fns.objective.stage_loss(st)
    cot = (jnp.ones_like(x), jnp.float32(1))
    t_f = timed(jax.jit(f), chunk, x, n=21)
    t_b = timed(jax.jit(lambda p, x: jax.vjp(f, p, x)[1](cot)), chunk, x, n=21)
    wi, wt = common.WGRAD_INPUTS, common.WGRAD_TAPS
    variables = lambda p: {"params": {"moe_layers": p}, "router_bias": {"moe_layers": bias}}
    _, taps = model.wgrad_store_shapes(cfg, variables(chunk), x, mb["positions"],
                                       mb["segment_ids"])
    taps = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), taps)

    def f_deferred(p, x, t):
        v = dict(variables(p), **{wt: {"moe_layers": t}})
        (y, st), col = model.forward_moe_chunk(cfg, v, x, mb["positions"], mb["segment_ids"],
                                               mutable=(wi,))
        return (y, fns.objective.stage_loss(st)), col[wi]["moe_layers"]

    def b_deferred(p, x):
        _, vjp, inputs = jax.vjp(f_deferred, p, x, taps, has_aux=True)
        return vjp(cot), inputs
    b_def = jax.jit(b_deferred)
    t_bd = timed(b_def, chunk, x, n=21)
    (_, _, dtaps), inputs = b_def(chunk, x)
    t_wd = timed(jax.jit(lambda p, i, d: common.deferred_weight_grads(p, i, d, cfg)), chunk,
                 inputs, dtaps, n=21)
    F, B, W = t_f, t_b, t_wd
    split_cost = dict(F=F, B=t_bd + t_wd, W=t_wd)   # what the split modes run
    whole_cost = dict(F=F, B=t_b, W=t_wd)           # W with its B: the one-pass VJP
    print(f"# one chunk of {n} MoE layer(s), {mb['inputs'].shape[0]} rows x "
          f"{mb['inputs'].shape[1]} tokens: F {F * 1e3:.1f} ms, B (one pass) {B * 1e3:.1f} ms; "
          f"split: B {t_bd * 1e3:.1f} ms + W {t_wd * 1e3:.1f} ms "
          f"(= {(t_bd + t_wd) / t_b:.2f} x the one pass)")
    gemm = dict(F=1.0, B=2.0, W=1.0)

    # 2. the report's PP with these costs: bubble fractions as scheduled (MPMD), packed in
    # lockstep ticks, and as this executor runs its tick table (executor.tick_costs) in each
    # mode: branch-free or branched ticks, stage recompute or kept residuals, W apart or with B.
    # The bubble is 1 - useful work / time, the useful work F + the one-pass B per stage and
    # micro-batch (a split B + W that costs more than the one pass counts its excess as idle).
    # Then the same with the GEMM model's costs F = 1, B = 2, W = 1 (every weight GEMM's input
    # and weight gradients cost its forward; a split costs what the one pass does), which a
    # large model on a GPU approaches.
    from dsv3_jax.pipeline import schedules as sched_lib
    for title, (s_cost, w_cost) in (("stage costs as measured above (one stage = one chunk)",
                                     (split_cost, whole_cost)),
                                    ("GEMM-model costs F = 1, B = 2, W = 1", (gemm, gemm))):
        print(f"\n# PP={a.table_pp}, M={2 * a.table_pp}, {title}")
        print("| schedule | MPMD bubble | lockstep bubble | " + " | ".join(m for m, _ in MODES)
              + " |")
        print("|---|---|---|" + "---|" * len(MODES))
        for name in a.schedules.split(","):
            m_ = 2 * a.table_pp
            sch = sched_lib.make(name, a.table_pp, m_, eager=name == "1f1b")
            own = sched_lib.make(name, a.table_pp, m_)
            work = m_ * sch.n_stages / a.table_pp * (w_cost["F"] + w_cost["B"])   # per rank
            busy = lambda r: 1 - work / r.time
            own_cost = s_cost if sch.split_w else w_cost   # the schedule's own B / W split
            cells = [f"{busy(simulate.simulate(own, **own_cost)):.1%}",
                     f"{busy(simulate.simulate_lockstep(sch, **own_cost)):.1%}"]
            for _, (branched, recompute, split_w) in MODES:
                _, plan = executor.build(name, a.table_pp, m_, sch.n_stages, split_w=split_w,
                                         keep_residuals=not recompute)
                c_ = s_cost if plan.split_w else w_cost
                executed = executor.tick_costs(plan, **c_, branched=branched,
                                               recompute=recompute).sum()
                cells.append(f"{1 - work / executed:.1%}")
            print(f"| {name}{' (eager)' if name == '1f1b' else ''} | " + " | ".join(cells)
                  + " |")
    print()

    shape = sharding.resolve_mesh_shape(dict(pipeline=a.pp, data=a.data, expert=-1),
                                        jax.device_count())
    mesh = sharding.make_mesh(shape)
    old, split, kept, new = MODES[0], MODES[1], MODES[3], MODES[-1]
    print(f"# mesh {shape}, {micro} micro-batches, jax {jax.__version__}; executed: median of 3 "
          f"steps in four modes: A = {old[0]}, S = {split[0]}, K = {kept[0]}, D = {new[0]} "
          "(S is D for gpipe and 1f1b, which have no W ops); on fake devices a step's time is "
          "all devices' work on this machine's cores, so the predicted ratios sum every rank's "
          "ops")
    print("| schedule | ticks | MPMD sim (ms) | lockstep sim (ms) | executed A (ms) | "
          "executed S (ms) | executed K (ms) | executed D (ms) | S / A (predicted) | "
          "K / A (predicted) | D / A (predicted) | collective-permutes compiled | "
          "schedule transfers |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name in a.schedules.split(","):
        times, work, permutes = {}, {}, None
        for label, (branched, recompute, split_w) in (old, split, kept, new):
            schedule, plan = executor.build(name, a.pp, micro, cfg.num_moe_layers,
                                            executor.layer_costs(cfg), split_w, not recompute)
            with jax.set_mesh(mesh):
                step = jax.jit(lambda p, b, x: executor.value_and_grad(
                    fns.objective, p, b, x, 0, schedule, plan, branched=branched,
                    recompute=recompute))
                compiled = step.lower(state["params"], state["router_bias"], batch).compile()
                if label == new[0]:
                    permutes = count_permutes(compiled.as_text(), plan.table.shape[0])
                times[label] = timed(step, state["params"], state["router_bias"], batch)
            work[label] = executor.rank_costs(plan, **(split_cost if plan.split_w else
                                                       whole_cost),
                                              branched=branched, recompute=recompute).sum()
        per_chunk = a.layers / schedule.n_stages / n     # scale the measured chunk to a stage
        cost = {k: v * per_chunk for k, v in split_cost.items()}
        mpmd = simulate.simulate(schedule, **cost).time
        lock = simulate.simulate_lockstep(schedule, **cost).time
        ticks = plan.table.shape[0]
        transfers = int(sum(((plan.table[..., executor.C["f_dir"]] == d).sum()
                             + (plan.table[..., executor.C["b_dir"]] == d).sum())
                            for d in (executor.RIGHT, executor.LEFT)))
        ratio = lambda m: (f"{times[m[0]] / times[old[0]]:.2f} "
                           f"({work[m[0]] / work[old[0]]:.2f})")
        print(f"| {name} | {ticks} | {mpmd * 1e3:.0f} | {lock * 1e3:.0f} | "
              f"{times[old[0]] * 1e3:.0f} | {times[split[0]] * 1e3:.0f} | "
              f"{times[kept[0]] * 1e3:.0f} | {times[new[0]] * 1e3:.0f} | {ratio(split)} | "
              f"{ratio(kept)} | {ratio(new)} | "
              f"{permutes[0]} in the tick loop x {ticks} ticks + {permutes[1]} once | "
              f"{transfers} |", flush=True)

# (label, (branched, recompute, split_w)): the executor's modes, the first the original one
# (every op on every rank, B and W re-run the forward, W apart), the last the default
MODES = [("branch-free, recompute, W apart", (False, True, True)),
         ("branched, recompute, W apart", (True, True, True)),
         ("branched, residuals kept, W apart", (True, False, True)),
         ("branched, residuals kept, W with B", (True, False, False)),
         ("branched, recompute, W with B (default)", (True, True, False))]


if __name__ == "__main__":
    main()
