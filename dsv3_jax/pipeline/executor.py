"""The pipeline executor: a schedule run inside the jitted train step over the `pipeline` axis.

  (loss, aux), grads = value_and_grad(objective, params, router_bias, batch, step, schedule,
                                      plan, branched=True, recompute=True)

It returns what `jax.value_and_grad(objective.loss, has_aux=True)` accumulated over the batch's
micro-batches returns in `train.train_step`: the mean loss and aux over micro-batches, the loads
summed, the mean gradient. Called under `jax.set_mesh(mesh)` with mesh.shape["pipeline"] ==
schedule.ranks; data, fsdp and expert stay automatic inside, so a stage's MoE layers run their
expert-parallel all-to-all as they do without a pipeline. `tensor` (> 1) is manual inside too:
each device holds its slice of the heads and FFN widths, the stages run a config of local widths
and the Megatron collectives are written out (dsv3_jax/layers/tp.py).

How the program is laid out (one SPMD program; every rank runs the same code):

* Stages. The MoE stack's L layers are cut into `schedule.n_stages` equal slices; rank r holds
  the slices `schedule.placement[r]` (one per chunk slot: 1 for gpipe/1f1b/zb1p, 2 for
  dualpipev/dualpipe). The first stage also runs the embedding and the dense layers
  (`model.forward_front`), the last stage the final norm, MTP modules and head + CE
  (`objective.tail_loss`). Their parameters (embedding, head, dense layers, MTP) are sharded over
  `pipeline` at rest (`train_state.params_specs`) and gathered over it once per step, before
  the shard_map; their gradients are summed over `pipeline` once at the end. The MoE stack's
  parameters are stacked [P, chunks, L/S, ...] and sharded over `pipeline` (for the V
  placement of dualpipev a static permutation of the layer axis; for dualpipe each stage
  appears on two ranks and its two gradients are summed).
* Ticks. `lax.scan` over the lockstep tick table of `simulate.lockstep`: in each tick a rank
  runs one F, one B and (split W) one W, then two `ppermute`s move activations and input
  gradients one rank right and one rank left (each carrying both); a V turn (the same rank
  holds the next stage) is a local write. Branched (default): each op is a `lax.cond` on the
  rank's own table entry and, inside a stage, the embedding + dense layers and the head + MTP
  are `lax.cond`s on the stage's kind, so a tick costs its slowest rank's own ops. Every
  collective inside a branch involves only the devices of one pipeline rank, which all take
  the same branch; the operands (the stage's parameter slices) are gathered outside the
  branches, and the embedding's gradient is a local scatter + all-reduce
  (`model.local_embed_grad`), as GSPMD's own scatter holds a collective-permute whose CPU
  rendezvous waits for every device. Branch-free: every rank runs every op every tick and
  masks what is idle (then the EP capacity branch is agreed over `pipeline` too).
  `tick_costs` models both; `benchmarks/pipeline.py` measures them.
* Residuals. A stage keeps its input activation and its output gradient per in-flight
  micro-batch in buffers of rows, a rank's rows shared by its chunks (`Plan.rows`: each value
  takes a free row from the tick it arrives to the tick it is last read, plus a scratch row for
  idle writes). With recompute (default) B re-runs the stage's forward under `jax.vjp`;
  without, F keeps the stage's VJP residuals (not its parameters, which B takes from its own
  slot; not the embedding's, dense layers' or head's, recomputed) in rows of their own, and B
  calls it. With split_w (zb1p, dualpipev,
  dualpipe), W is per Linear, as DeepSeek's WeightGradStore: B runs the MoE chunk with its
  Linears' (and, without FP8, the routed experts', expert-parallel or not) weight gradients
  deferred (`common.deferred_weight_grads`), computes every other gradient, and stores each
  deferred GEMM's input and output gradient (rows of their own, from the B-to-W intervals);
  W turns them into dW, with no forward and no input-gradient chain.
  Otherwise W runs with its B.
* Loss. Each micro-batch's loss is the sum of its stages' terms: α·Σ L_bal of every stage's
  MoE layers plus the last stage's CE + λ·MTP + α·L_bal(MTP); B seeds every stage's term with
  the cotangent 1/M, so the gradient is the mean over micro-batches, as in train_step.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from dsv3_jax import model
from dsv3_jax.layers import moe_ep, tp
from dsv3_jax.layers.common import (WGRAD_INPUTS, WGRAD_TAPS, deferred_weight_grads,
                                     dtype_of)
from dsv3_jax.pipeline.table import (  # noqa: F401  (re-exported: the executor's table)
    BUFFERS, C, COLS, FIRST, LAST, LEFT, LOCAL, MID, NONE, RIGHT, STAY, Plan, layer_costs,
    make_plan, op_costs, rank_costs, stage_layers, tick_costs)

AXIS = "pipeline"
# bytes per rank of each buffer of the most recently traced step ({"act", "grad", "res",
# "store"}: rows x bytes per row, scratch rows included), written at trace time: what
# `plan.py` predicts (tests/test_pipeline_executor.py compares them)
traced_buffers: dict = {}
MODE_OPTIONS = ("branched", "recompute", "split_w")   # c.pipeline's executor modes, in order

def _take(tree, i):
    return jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, i, 0, keepdims=False), tree)


def _add_at(tree, i, value):
    def one(acc, v):
        cur = jax.lax.dynamic_index_in_dim(acc, i, 0, keepdims=False)
        return jax.lax.dynamic_update_index_in_dim(acc, cur + v.astype(acc.dtype), i, 0)
    return jax.tree.map(one, tree, value)


def _row(rows, slot, mb):
    """The buffer row of (chunk slot, micro-batch) on this rank (`Plan.rows`, [chunks, M]); an
    idle op (slot, mb < 0) reads whatever row (0, 0) names and uses none of it."""
    return rows[jnp.maximum(slot, 0), jnp.maximum(mb, 0)]


def _write(buf, rows, slot, mb, value):
    """buf[row of (slot, mb)] = value, or into the scratch row (the last) where slot < 0: a
    plain in-place update either way (no read of what was there)."""
    i = jnp.where(slot >= 0, _row(rows, slot, mb), buf.shape[0] - 1)
    return buf.at[i].set(value.astype(buf.dtype))


def value_and_grad(objective, params: dict, router_bias: dict, batch: dict, step, schedule,
                   plan: Plan, branched: bool = True, recompute: bool = True):
    cfg = objective.cfg
    p, chunks = schedule.ranks, schedule.chunks
    m_n = batch["inputs"].shape[0]
    if m_n != schedule.microbatches:
        raise ValueError(f"the batch has {m_n} micro-batches, the schedule {schedule.microbatches}")
    if not recompute and not plan.keep_residuals:
        raise ValueError("recompute=False needs a plan with slots for the residuals "
                         "(make_plan(..., keep_residuals=True))")
    mesh_shape = dict(jax.sharding.get_abstract_mesh().shape)
    # Once per step, here, outside the pipeline's shard_map: the non-MoE parameters (sharded
    # over `pipeline` at rest) are gathered over it, and with fsdp each rank's stage parameters
    # over fsdp (XLA's SPMD partitioner aborts on fsdp-sharded weights inside the shard_map).
    # Their gradients go back to the shards through the step's out shardings.
    # With tensor > 1, `tensor` is manual inside as well (tp.py): the stages run a config of
    # local widths on each device's slice of the heads, FFN widths and vocabulary.
    from dsv3_jax import train_state
    ways = mesh_shape.get(tp.AXIS, 1)
    in_step = train_state.params_specs(cfg, params, dict(mesh_shape, fsdp=1), gathered=True)
    params = jax.lax.with_sharding_constraint(params, in_step)
    mcfg = tp.local_config(cfg, ways)
    obj = objective if ways == 1 else dataclasses.replace(objective, cfg=mcfg)
    manual = {AXIS} | ({tp.AXIS} if ways > 1 else set())
    # the shard_map's specs: [P, chunks, n, ...] by stage for the MoE stack, and the
    # tensor-split dims of every leaf
    moe_specs = tp.manual_specs(in_step["moe_layers"], (AXIS, None, None), drop=1)
    rest_specs = {k: tp.manual_specs(v) for k, v in in_step.items() if k != "moe_layers"}
    flat = plan.layer_index.reshape(-1)
    n = plan.layer_index.shape[-1]
    n_layers = cfg.num_moe_layers
    identity = plan.in_layer_order
    padded = bool((flat < 0).any())
    valid = jnp.asarray(plan.layer_index >= 0)

    def stack(a):   # [L, ...] -> [P, chunks, n, ...] (pads: copies of layer 0, skipped)
        a = a if identity else jnp.take(a, np.maximum(flat, 0), axis=0)
        return a.reshape((p, chunks, n) + a.shape[1:])

    def unstack(g, like):   # [P, chunks, n, ...] -> [L, ...], copies summed, pads dropped
        g = g.reshape((p * chunks * n,) + g.shape[3:])
        if identity:
            return g
        idx = np.where(flat < 0, n_layers, flat)
        return jnp.zeros(like.shape, g.dtype).at[idx].add(g, mode="drop")

    moe_p = jax.tree.map(stack, params["moe_layers"])
    moe_b = jax.tree.map(stack, router_bias["moe_layers"])
    rest_p = {k: v for k, v in params.items() if k != "moe_layers"}
    rest_b = {k: v for k, v in router_bias.items() if k != "moe_layers"}
    inv_m = 1.0 / m_n
    act_dtype = dtype_of(cfg.dtype)
    rows, seq = batch["inputs"].shape[1:3]
    x_shape = (rows, seq, cfg.hidden_size)
    n_rows = plan.n_rows
    n_e = cfg.n_routed_experts
    depth = cfg.num_nextn_predict_layers

    def per_rank(cp, cb, valid, rp, rb, batch, step, table, rmap):
        cp = jax.tree.map(lambda a: a[0], cp)          # [chunks, n, ...]
        cb = jax.tree.map(lambda a: a[0], cb)
        valid = valid[0]                               # [chunks, n]
        rmap = {k: v[0] for k, v in rmap.items()}      # buffer -> [chunks, M] rows
        r = jax.lax.axis_index(AXIS)

        tail_dtypes = {"ce": jnp.float32, "mtp_ce": jnp.float32, "balance": jnp.float32,
                     "mtp_weight": jnp.float32, "mtp_counts": jnp.int32}   # their dtypes

        def chunk_fn(jp, jb, ok, x, mb, taps=None):
            """(y, RouterStats, Linear inputs): with `taps` (B of a split schedule) the chunk's
            Linears defer their weight gradients (common.deferred_weight_grads) and return their
            inputs [n, M, K]; without, the inputs are {}."""
            def run(jp_, jb_, x_, taps_):
                v = {"params": {"moe_layers": jp_}, "router_bias": {"moe_layers": jb_}}
                args = (mcfg, v, x_, mb["positions"], mb["segment_ids"])
                if taps_ is None:
                    return model.forward_moe_chunk(*args) + ({},)
                v[WGRAD_TAPS] = {"moe_layers": taps_}
                (y, st), col = model.forward_moe_chunk(*args, mutable=(WGRAD_INPUTS,))
                return y, st, col[WGRAD_INPUTS]["moe_layers"]
            if not padded:
                return run(jp, jb, x, taps)

            def layer(x, xs):    # one layer at a time; a pad slot is computed and discarded
                lp, lb, v, tp = xs
                one = lambda t: jax.tree.map(lambda a: a[None], t)
                y, st, ins = run(one(lp), one(lb), x, None if tp is None else one(tp))
                return jnp.where(v, y, x), (jax.tree.map(lambda a: a[0] * v, st),
                                            jax.tree.map(lambda a: a[0], ins))
            y, (stats, ins) = jax.lax.scan(layer, x, (jp, jb, ok, taps))
            return y, stats, ins

        def front(rp_, x, mb):
            return model.forward_front(mcfg, {"params": rp_, "router_bias": rb}, mb["inputs"],
                                       mb["positions"], mb["segment_ids"]).astype(act_dtype)

        def tail_fn(rp_, y, mb):
            t_loss, tail = obj.tail_loss(rp_, rb, y, mb, step)
            return (t_loss.astype(jnp.float32),
                    {k: v.astype(tail_dtypes[k]) for k, v in tail.items()})

        def tail_zeros(rp_, y, mb):
            shapes = jax.eval_shape(tail_fn, rp_, y, mb)
            return jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), shapes)

        def stage(first, last, jp, rp_, x, jb, ok, mb, taps=None):
            """((y, loss term), ((counts [n, E], main balance, tail aux), the MoE chunk's Linear
            inputs: {} unless `taps`, see chunk_fn)) of one stage: the
            embedding and dense layers on the first stage, the head, MTP modules and loss on the
            last. Branched: each rank runs its kind's part only (`lax.cond` on the rank's own
            op; a collective inside, the expert all-to-all, involves only devices of the same
            pipeline rank, which take the same branch). Branch-free: every stage runs all parts
            and keeps what its kind uses."""
            x = x.astype(act_dtype)

            def front_part(rp_, x, mb):
                if branched:
                    return jax.lax.cond(first, front, lambda rp_, x, mb: x, rp_, x, mb)
                return jnp.where(first, front(rp_, x, mb), x)

            def tail_part(rp_, y, mb):
                if branched:
                    return jax.lax.cond(last, tail_fn, tail_zeros, rp_, y, mb)
                t_loss, tail = tail_fn(rp_, y, mb)
                return t_loss, {k: jnp.where(last, v, 0).astype(v.dtype) for k, v in tail.items()}

            if not recompute:
                # the VJP kept per micro-batch holds the MoE chunk's residuals only: B re-runs
                # the embedding + dense layers and the head + MTP from their inputs. (A
                # `lax.cond`'s linearisation returns every residual it needs as a new output,
                # parameters included, so their VJPs would keep a copy of the embedding, head
                # and dense weights per micro-batch.)
                front_part, tail_part = jax.checkpoint(front_part), jax.checkpoint(tail_part)
            x = front_part(rp_, x, mb)
            y, stats, inputs = chunk_fn(jp, jb, ok, x, mb, taps)
            t_loss, tail = tail_part(rp_, y, mb)
            term = obj.stage_loss(stats) + jnp.where(last, t_loss, 0.0)
            y = jnp.where(last, jnp.zeros_like(y), y)
            return (y.astype(act_dtype), term.astype(jnp.float32)), ((
                stats.counts.astype(jnp.int32), obj.balance(stats).astype(jnp.float32),
                tail), inputs)

        f32 = lambda t: jax.tree.map(lambda a: a.astype(jnp.float32), t)
        masked = lambda on, t: jax.tree.map(lambda a: jnp.where(on, a, jnp.zeros_like(a)), t)

        def operands(kind, slot, mbi, xin, gin, res, res_buffer="res"):
            row = lambda name: _row(rmap[name], slot, mbi)
            slot, mbi = jnp.maximum(slot, 0), jnp.maximum(mbi, 0)
            return (kind == FIRST, kind == LAST, _take(cp, slot), rp, _take(cb, slot),
                    valid[slot], xin[row("act")], gin[row("grad")], _take(batch, mbi),
                    [buf[row(res_buffer)] for buf in res])

        def idle(fn):
            """fn(*operands) where the rank has an op this tick, zeros where it is idle: a branch
            (`lax.cond`; the operands are gathered outside it, as the gathers of a stage's
            parameters may be collective-permutes over all devices) or a mask over work done
            anyway (branch-free)."""
            def run(kind, slot, mbi, xin, gin, res, res_buffer="res"):
                on = kind != NONE
                ops = operands(kind, slot, mbi, xin, gin, res, res_buffer)
                if branched:
                    zeros = lambda *a: jax.tree.map(lambda t: jnp.zeros(t.shape, t.dtype),
                                                    jax.eval_shape(fn, *a))
                    return jax.lax.cond(on, fn, zeros, *ops)
                return masked(on, fn(*ops))
            return run

        def stage_vjp(first, last, jp, rp_, jb, ok, x, mb):
            """The stage's outputs, aux and its VJP's leaves: the residuals, among them the
            stage's parameters themselves, marked in `where` by their index in (jp, rp_)'s
            leaves (-1: a residual to keep per micro-batch). Split W: the VJP is also with
            respect to the Linears' output taps, and aux holds their inputs for W."""
            f = lambda jp_, rp2, x_, t_: stage(first, last, jp_, rp2, x_, jb, ok, mb, t_)
            out, vjp, aux = jax.vjp(f, jp, rp_, x, taps0, has_aux=True)
            leaves, tdef, where = model.vjp_residuals(vjp, (jp, rp_))
            return out, aux, leaves, tdef, where

        # Split W: zero taps on the MoE chunk's Linear outputs (their cotangents are the output
        # gradients W needs) and the store B fills for W: each Linear's input and output
        # gradient, per micro-batch between its B and W (rows of its own, plan.rows["store"]).
        taps0 = None
        store0 = []
        if plan.split_w:
            x0 = jnp.zeros(x_shape, act_dtype)
            mb0 = _take(batch, 0)
            inputs0, taps_shape = model.wgrad_store_shapes(
                mcfg, {"params": {"moe_layers": _take(cp, 0)},
                      "router_bias": {"moe_layers": _take(cb, 0)}},
                x0, mb0["positions"], mb0["segment_ids"])
            taps0 = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), taps_shape)
            store_def = jax.tree.structure((inputs0, taps0))
            store0 = [jnp.zeros((n_rows["store"] + 1,) + a.shape, a.dtype) for a in
                      jax.tree.leaves((inputs0, taps0))]

        if recompute:
            vjp_def = None
            res0 = []
        else:
            # the residuals' layout, from one trace of a stage (XLA drops its unused work); F
            # keeps those that are not parameters, B and W rebuild the VJP from them. Every
            # operand of this trace is traced, as in F: a concrete one (a Python bool for
            # `first`) would be baked into the VJP's static part that B reuses.
            buf0 = jnp.zeros((max(n_rows["act"], n_rows["grad"]) + 1,) + x_shape, act_dtype)
            kind0 = table[0, r, C["f_kind"]]
            ops0 = operands(kind0, jnp.maximum(table[0, r, C["f_slot"]], 0), kind0 * 0, buf0,
                            buf0, [])
            _, (_, inputs0), leaves0, tdef0, where0 = stage_vjp(*ops0[:7], ops0[8])
            vjp_def = (tdef0, where0, [(a.shape, a.dtype) for a in leaves0])
            res0 = [jnp.zeros((n_rows["res"] + 1,) + a.shape, a.dtype)
                    for a in [a for a, w in zip(leaves0, where0) if w < 0] + jax.tree.leaves(
                        inputs0)]

        @idle
        def forward(first, last, jp, rp_, jb, ok, x, _, mb, _res):
            if recompute:
                (y, term), (aux, _) = stage(first, last, jp, rp_, x, jb, ok, mb)
                return y, term, aux, []
            (y, term), (aux, inputs), leaves, tdef, where = stage_vjp(first, last, jp, rp_, jb,
                                                                      ok, x, mb)
            if where != vjp_def[1] or [(a.shape, a.dtype) for a in leaves] != vjp_def[2]:
                raise AssertionError("a stage's VJP residuals differ between traces")
            # split W: the Linears' inputs travel with the residuals to B, which stores them
            return y, term, aux, [a for a, w in zip(leaves, where) if w < 0] + jax.tree.leaves(
                inputs)

        def backward(kind, slot, mbi, xin, gin, res):
            """B: (dx, d chunk params, d rest params, store), zero where the op is idle. Without
            split W, every gradient of the stage; with it, all but the MoE chunk's Linear
            kernels', whose inputs and output gradients go to the store for W."""
            @idle
            def op(first, last, jp, rp_, jb, ok, x, dy, mb, kept):
                cot = (dy, jnp.asarray(inv_m, jnp.float32))
                if recompute:
                    f = lambda jp_, rp2, x_, t_: stage(first, last, jp_, rp2, x_, jb, ok, mb, t_)
                    _, vjp, (_, inputs) = jax.vjp(f, jp, rp_, x, taps0, has_aux=True)
                else:   # the VJP F kept: its parameters from this op's own, the rest from F
                    tdef, where, _ = vjp_def
                    n_res = sum(w < 0 for w in where)
                    params, kept, ins = jax.tree.leaves((jp, rp_)), kept[:n_res], kept[n_res:]
                    kept = iter(kept)
                    vjp = jax.tree.unflatten(
                        tdef, [params[w] if w >= 0 else next(kept) for w in where])
                    inputs = ins
                djp, drp, dx, dtaps = vjp(cot)
                store = jax.tree.leaves((inputs, dtaps)) if plan.split_w else []
                return dx.astype(act_dtype), f32(djp), f32(drp), store
            return op(kind, slot, mbi, xin, gin, res)

        @idle
        def weights(first, last, jp, rp_, jb, ok, x, dy, mb, stored):
            """W: the MoE chunk's Linear kernel gradients from what B stored."""
            inputs, dys = jax.tree.unflatten(store_def, stored)
            return deferred_weight_grads(jp, inputs, dys, mcfg)

        def tick(carry, rows_all):
            xin, gin, res, store, dcp, drp, sums, counts, mtp_counts = carry
            row = rows_all[r]
            g = lambda name: row[C[name]]
            # F (and what its B and W will need: its VJP's residuals, unless they recompute)
            y, term, (cts, bal, tail), kept = forward(g("f_kind"), g("f_slot"), g("f_mb"),
                                                      xin, gin, res)
            sums = sums + jnp.stack(
                [term, tail["ce"], tail["mtp_ce"], bal + tail["balance"], tail["mtp_weight"]])
            counts = _add_at(counts, jnp.maximum(g("f_slot"), 0), cts)
            mtp_counts = mtp_counts + tail["mtp_counts"]
            # B; with split W, its store, then W (which may be the same micro-batch's)
            dx, dj, dr, st = backward(g("b_kind"), g("b_slot"), g("b_mb"), xin, gin, res)
            dcp = _add_at(dcp, jnp.maximum(g("b_slot"), 0), dj)
            drp = jax.tree.map(jnp.add, drp, dr)
            if plan.split_w:
                store = [_write(buf, rmap["store"], g("b_slot"), g("b_mb"), v)
                         for buf, v in zip(store, st)]
                dw = weights(g("w_kind"), g("w_slot"), g("w_mb"), xin, gin, store,
                             "store")
                dcp = _add_at(dcp, jnp.maximum(g("w_slot"), 0), dw)
            # F's residuals, once this tick's B has read theirs (make_plan's slot sizing)
            res = [_write(buf, rmap["res"], g("f_slot"), g("f_mb"), v)
                   for buf, v in zip(res, kept)]
            # outputs: right- and left-moving (activation, gradient) pairs, and local turns
            send = lambda d: jnp.stack([jnp.where(g("f_dir") == d, y, 0),
                                        jnp.where(g("b_dir") == d, dx, 0)])
            from_left = jax.lax.ppermute(send(RIGHT), AXIS, [(i, i + 1) for i in range(p - 1)])
            from_right = jax.lax.ppermute(send(LEFT), AXIS, [(i + 1, i) for i in range(p - 1)])
            xin = _write(xin, rmap["act"], g("ra_slot"), g("ra_mb"), from_left[0])
            xin = _write(xin, rmap["act"], g("la_slot"), g("la_mb"), from_right[0])
            xin = _write(xin, rmap["act"], g("oa_slot"), g("oa_mb"), y)
            gin = _write(gin, rmap["grad"], g("rg_slot"), g("rg_mb"), from_left[1])
            gin = _write(gin, rmap["grad"], g("lg_slot"), g("lg_mb"), from_right[1])
            gin = _write(gin, rmap["grad"], g("og_slot"), g("og_mb"), dx)
            return (xin, gin, res, store, dcp, drp, sums, counts, mtp_counts), None

        zeros_rp = jax.tree.map(lambda a: jnp.zeros(a.shape, jnp.float32), rp)
        carry = (jnp.zeros((n_rows["act"] + 1,) + x_shape, act_dtype),   # + a scratch row
                 jnp.zeros((n_rows["grad"] + 1,) + x_shape, act_dtype),
                 res0, store0,
                 jax.tree.map(lambda a: jnp.zeros(a.shape, jnp.float32), cp),
                 zeros_rp,
                 jnp.zeros((5,), jnp.float32), jnp.zeros((chunks, n, n_e), jnp.int32),
                 jnp.zeros((depth, n_e), jnp.int32))
        nbytes = lambda t: sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(t))
        traced_buffers.clear()
        traced_buffers.update(act=nbytes(carry[0]), grad=nbytes(carry[1]), res=nbytes(res0),
                              store=nbytes(store0))
        carry, _ = jax.lax.scan(tick, carry, table)
        _, _, _, _, dcp, drp, sums, counts, mtp_counts = carry
        sums, drp, mtp_counts = jax.lax.psum((sums, drp, mtp_counts), AXIS)
        expand = lambda t: jax.tree.map(lambda a: a[None], t)
        return sums, mtp_counts, drp, expand(dcp), counts[None]

    spec = lambda t, s: jax.tree.map(lambda _: s, t)
    row_maps = {k: jnp.asarray(v) for k, v in plan.rows.items()}
    fn = jax.shard_map(
        per_rank,
        in_specs=(moe_specs, spec(moe_b, P(AXIS)), P(AXIS), rest_specs,
                  spec(rest_b, P()), spec(batch, P()), P(), P(), spec(row_maps, P(AXIS))),
        out_specs=(P(), P(), rest_specs, moe_specs, P(AXIS)),
        axis_names=manual, check_vma=False)
    # Branch-free, every rank runs every MoE layer each tick, so the EP capacity branch inside
    # must be the same on all pipeline ranks (branched, only one rank's devices must agree).
    # Branched, the embedding's gradient is a local scatter + all-reduce (model.local_embed_grad):
    # GSPMD's own scatter holds a collective-permute over all devices, which must not sit in a
    # branch.
    with moe_ep.synced_over(*(() if branched else (AXIS,))), (
            model.local_embed_grad() if branched else contextlib.nullcontext()), (
            tp.manual() if ways > 1 else contextlib.nullcontext()):
        sums, mtp_counts, drp, dcp, counts = fn(moe_p, moe_b, valid, rest_p, rest_b, batch,
                                                step, jnp.asarray(plan.table), row_maps)
    grads = dict(drp)
    grads["moe_layers"] = jax.tree.map(unstack, dcp, params["moe_layers"])
    grads = jax.tree.map(lambda g_, p_: g_.astype(p_.dtype), grads, params)   # means already
    counts = unstack(counts, jax.ShapeDtypeStruct((cfg.num_moe_layers, n_e), jnp.int32))
    loss = sums[0] * inv_m
    aux = {"ce": sums[1] * inv_m, "mtp_ce": sums[2] * inv_m, "balance": sums[3] * inv_m,
           "mtp_weight": sums[4] * inv_m, "counts": counts, "mtp_counts": mtp_counts}
    return (loss, aux), grads


@functools.lru_cache(maxsize=64)
def build(name: str, ranks: int, microbatches: int, num_moe_layers: int,
          extras: tuple[float, float] = (0.0, 0.0), split_w: bool = False,
          keep_residuals: bool = False):
    """(schedule, plan) of a named schedule; raises ScheduleError / ValueError if invalid.
    split_w, keep_residuals: as in `make_plan`."""
    from dsv3_jax.pipeline import schedules, simulate
    # 1F1B runs its eager variant: the standard one packs into lockstep ticks badly (a rank's F
    # and the B it waits for land in different ticks); eager warm-up reaches the MPMD time at
    # 2(P-1-r)+1 activations on rank r (dsv3_jax/pipeline/simulate.py)
    schedule = schedules.make(name, ranks, microbatches, eager=name == "1f1b")
    counts = stage_layers(num_moe_layers, schedule.n_stages, *extras)
    return schedule, make_plan(schedule, simulate.lockstep(schedule), counts, split_w,
                               keep_residuals)


# Mesh axes the executor composes with. fsdp: the stage's parameters gathered over it once per
# step, in value_and_grad (XLA's SPMD partitioner aborts on fsdp-sharded weights inside a
# partially manual shard_map, or a branched tick deadlocks on a collective-permute over all
# devices). tensor: manual inside the shard_map, with the collectives written out
# (dsv3_jax/layers/tp.py), as the partitioner also aborts on tensor-sharded weights there.
COMPOSES_WITH = ("data", "fsdp", "expert", "tensor")


def problems(name: str, ranks: int, micro_per_step, cfg, objective,
             mesh_shape: dict | None = None) -> list[str]:
    """Everything wrong with running `name` on `ranks` pipeline ranks, before any compile:
    the schedule for every micro-batch count the run uses, the layer split, the objective and
    (mesh_shape) the other mesh axes."""
    from dsv3_jax.pipeline import schedules
    out = []
    mesh_shape = mesh_shape or {}
    other = {k: v for k, v in mesh_shape.items()
             if k not in (AXIS, *COMPOSES_WITH) and v > 1}
    if other:
        out.append("mesh." + ", mesh.".join(f"{k}={v}" for k, v in other.items()) +
                   f" with mesh.pipeline={ranks}: the pipeline composes with the "
                   f"{', '.join(COMPOSES_WITH)} axes only")
    ways = mesh_shape.get(tp.AXIS, 1)
    if ways > 1:
        out += [f"mesh.tensor={ways} with mesh.pipeline={ranks}: {p}" for p in
                tp.problems(cfg, ways)]
        if not dataclasses.is_dataclass(objective) or not hasattr(objective, "cfg"):
            out.append(f"mesh.tensor={ways} with mesh.pipeline={ranks}: the objective "
                       f"{type(objective).__name__} is not a dataclass with a `cfg` field (the "
                       "stages run it with a config of local widths)")
    if not all(hasattr(objective, k) for k in ("tail_loss", "stage_loss", "balance")):
        out.append(f"the objective {type(objective).__name__} has no pipeline stages "
                   "(stage_loss, tail_loss, balance; see dsv3_jax/objectives/pretrain.py): use "
                   "mesh.pipeline=1")
    for m in sorted(set(int(x) for x in micro_per_step)):
        try:
            schedule = schedules.make(name, ranks, m)
        except Exception as e:   # noqa: BLE001 - reported as the config problem it is
            out.append(f"pipeline.schedule={name} with {m} micro-batches per step: {e}")
            continue
        try:
            stage_layers(cfg.num_moe_layers, schedule.n_stages, *layer_costs(cfg))
        except ValueError as e:
            out.append(f"{name} on {ranks} ranks: {e}")
    return out


def step_value_and_grad(objective, name: str, ranks: int, params, router_bias, batch, step, *,
                        branched: bool = True, recompute: bool = True, split_w: bool = False):
    """The train step's (loss, aux), grads through the pipeline (micro-batches from the batch's
    leading axis; the schedule and its table are built once per micro-batch count)."""
    cfg = objective.cfg
    schedule, plan = build(name, ranks, int(batch["inputs"].shape[0]), cfg.num_moe_layers,
                           layer_costs(cfg), split_w, not recompute)
    return value_and_grad(objective, params, router_bias, batch, step, schedule, plan,
                          branched=branched, recompute=recompute)
