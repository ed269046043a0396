"""Expert parallelism for DeepSeekMoE's routed experts: the all-to-all dispatch and combine
over the `expert` mesh axis (a shard_map over the batch axes), its FP8 wire format (report
§3.3.3), the capacity branch, and the split-W store and weight gradients of the experts when
they run expert-parallel (the pipeline's per-Linear W)."""
from __future__ import annotations

import contextlib
import functools

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name
from jax.sharding import PartitionSpec as P

from dsv3_jax.config import ModelConfig
from dsv3_jax.layers.moe import (Dispatch, dispatch_fns, dispatch_rows, experts_wgrad,
                                 sorted_experts, tile_m_for)
from kernels_pallas.grouped_gemm import varying_axes, zeros_varying_like


def _a2a(t, axis: str):
    with jax.named_scope("expert_exchange"):
        return jax.lax.all_to_all(t, axis, 0, 0, tiled=True)


def _fp8_send(x, axis: str, name: str | None):
    """all_to_all of rows as FP8 E4M3 bits + power-of-2 1x128 scales, dequantized on arrival
    (exactly: a power-of-2 scale times an E4M3 value is representable in BF16)."""
    from dsv3_jax import fp8
    q, scale = fp8.quantize_1x128_padded(x, pow2_scale=True)
    bits, scale = _a2a(jax.lax.bitcast_convert_type(q, jnp.uint8), axis), _a2a(scale, axis)
    if name:
        bits, scale = checkpoint_name(bits, name), checkpoint_name(scale, name)
    q = jax.lax.bitcast_convert_type(bits, fp8.E4M3)
    return fp8.dequantize_1x128(q, scale)[:, :x.shape[1]].astype(x.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def fp8_dispatch_exchange(x_RD, axis: str):
    """Dispatch's all_to_all with FP8 rows (report §3.3.3); its backward (the gradient sent
    back to the tokens' devices, a combine) stays in x's dtype. The received FP8 bits and
    scales are named moe_recv for remat="selective"."""
    return _fp8_send(x_RD, axis, "moe_recv")


fp8_dispatch_exchange.defvjp(lambda x, axis: (_fp8_send(x, axis, "moe_recv"), None),
                             lambda axis, _, g: (_a2a(g, axis),))


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def fp8_grad_combine_exchange(y_RD, axis: str):
    """Combine's all_to_all in y's dtype (report §3.3.3: combine stays BF16); its backward, the
    activation gradient before the down-projections, travels as FP8 like the dispatch."""
    return _a2a(y_RD, axis)


fp8_grad_combine_exchange.defvjp(lambda y, axis: (_a2a(y, axis), None),
                                 lambda axis, _, g: (_fp8_send(g, axis, None),))


def plan_all_to_all(experts_NP: jax.Array, num_shards: int, experts_per_shard: int,
                    capacity: int) -> tuple[Dispatch, jax.Array, jax.Array]:
    """Send buffer [shards * capacity] rows, grouped by destination shard then expert.

    Returns the plan (its permute/unpermute maps are all we use), each send row's local expert id
    (experts_per_shard = empty row) and the largest per-destination count (to detect overflow).
    """
    n, p = experts_NP.shape
    slots = n * p
    flat_e = experts_NP.reshape(-1)
    dest = flat_e // experts_per_shard
    order = jnp.argsort(flat_e, stable=True)              # by destination shard, then expert
    counts = jnp.bincount(dest, length=num_shards)
    start = jnp.cumsum(counts) - counts
    sorted_dest = dest[order]
    row_sorted = (sorted_dest * capacity + jnp.arange(slots) - start[sorted_dest]).astype(jnp.int32)
    rows = num_shards * capacity
    dest_row = jnp.zeros(slots, jnp.int32).at[order].set(row_sorted)
    src = jnp.full(rows, slots, jnp.int32).at[row_sorted].set(order.astype(jnp.int32), mode="drop")
    local_e = jnp.where(src < slots, flat_e[jnp.minimum(src, slots - 1)] % experts_per_shard,
                        experts_per_shard).astype(jnp.int32)
    plan = Dispatch(src, dest_row.reshape(n, p), jnp.zeros((0,), jnp.int32),
                    jnp.zeros((), jnp.int32), 1)
    return plan, local_e, counts.max()


def ep_capacity(cfg: ModelConfig, slots: int, ep: int) -> int:
    """Rows each destination gets per source in expert_parallel's usual branch:
    ceil(moe_ep_capacity_factor * slots / ep) rounded up to 8, at most `slots` (the
    worst-case branch's)."""
    cf = cfg.moe_ep_capacity_factor
    return min(slots, -(-int(cf * slots / ep + 0.999999) // 8) * 8) if cf > 0 else slots


def ep_store_rows(cfg: ModelConfig, slots: int, ep: int) -> tuple[int, int]:
    """(M, tile_m) of one device's grouped buffer under expert_parallel's usual branch, for
    `slots` (token, expert) pairs per device: what its deferred weight gradients store per
    device (the tile layout of the ep x capacity received rows over its E / ep experts)."""
    if ep == 1:
        tile_m = tile_m_for(cfg, slots, cfg.n_routed_experts)
        return dispatch_rows(slots, cfg.n_routed_experts, tile_m), tile_m
    rows, e_local = ep * ep_capacity(cfg, slots, ep), cfg.n_routed_experts // ep
    tile_m = tile_m_for(cfg, rows, e_local)
    return dispatch_rows(rows, e_local, tile_m, trash_group=True), tile_m


def batch_axes(mesh) -> tuple:
    """The mesh's batch axes (the devices over which the tokens are split)."""
    from dsv3_jax.sharding import BATCH_AXES
    return tuple(a for a in BATCH_AXES if a in mesh.shape)


def _ep_layout(cfg: ModelConfig, mesh):
    axes = batch_axes(mesh)
    return (mesh.shape["expert"], cfg.n_routed_experts // mesh.shape["expert"], axes,
            P(axes, None), P("expert", None, None))


def expert_parallel(x_ND, routing, w_gate, w_up, w_down, cfg: ModelConfig, mesh,
                    taps: tuple | None = None):
    """Routed experts under a mesh: shard_map over the batch axes; experts split over `expert`.

    Each device routes its own tokens, sends every (token, slot) to the shard holding its expert
    with one all_to_all, runs its local experts' grouped SwiGLU, sends results back with a second
    all_to_all and combines them with the gates. Buffers: each destination gets `capacity` rows
    per source, capacity = ceil(moe_ep_capacity_factor * slots / shards) (rounded up to 8). If any
    device would overflow that, the step takes the worst-case branch (capacity = all its slots):
    a safe fallback decided collectively with lax.cond, never a dropped token. With the FP8
    recipe (cfg.fp8 and cfg.fp8_dispatch) the dispatched rows travel as E4M3 with power-of-2
    1x128 scales, and so does the combine's gradient; the combine itself stays in x's dtype.

    taps: per-device zero taps (dgu [D_b * M, 2F], dy [D_b * M, D]; D_b devices over the batch
    axes, M from ep_store_rows) to defer the weight gradients (sorted_experts): returns (out,
    store), the store per device (x, gu, tile_expert, and used [D_b]), for
    expert_parallel_wgrad. The worst-case branch does not defer: its weight gradients stay in
    the VJP and its store is empty (used = 0), so W adds nothing for that step.
    """
    ep, e_local, axes, row, weight = _ep_layout(cfg, mesh)

    def local(x, ex, g, wg, wu, wd, *tap):
        tap = tap or None
        if ep == 1:
            out = sorted_experts(x, ex, g, wg, wu, wd, cfg, num_experts=cfg.n_routed_experts,
                                 taps=tap)
            return out if tap is None else (out[0], dict(out[1], used=out[1]["used"][None]))
        slots = ex.size
        fp8_wire = cfg.fp8 and cfg.fp8_dispatch

        def exchange(capacity, deferred):
            with jax.named_scope("dispatch_plan"):
                plan, local_e, _ = plan_all_to_all(ex, ep, e_local, capacity)
            permute, combine = dispatch_fns(plan, g, pallas=False)
            a2a = functools.partial(_a2a, axis="expert")
            with jax.named_scope("dispatch"):
                send = permute(x)
            if fp8_wire:
                recv = fp8_dispatch_exchange(send, "expert")
                send_back = functools.partial(fp8_grad_combine_exchange, axis="expert")
            else:
                recv = checkpoint_name(a2a(send), "moe_recv")   # no all_to_all recomputed
                send_back = a2a
            recv_e = a2a(local_e)
            y = sorted_experts(recv, recv_e[:, None], jnp.ones((recv.shape[0], 1), g.dtype),
                               wg, wu, wd, cfg, num_experts=e_local, trash_group=True,
                               taps=tap if deferred else None)
            if tap is not None:
                if deferred:
                    y, store = y
                    store = dict(store, used=store["used"][None])
                else:   # empty: W adds nothing (this branch's weight gradients are in B)
                    m, tile_m = tap[0].shape[0], ep_store_rows(cfg, slots, ep)[1]
                    zeros = lambda shape, dtype: zeros_varying_like(shape, dtype, recv)
                    store = {"x": zeros((m, x.shape[1]), recv.dtype),
                             "gu": zeros(tap[0].shape, tap[0].dtype),
                             "tile_expert": zeros((m // tile_m,), jnp.int32),
                             "used": zeros((1,), jnp.int32)}
            back = checkpoint_name(send_back(y.astype(x.dtype)), "moe_out")
            with jax.named_scope("combine"):
                out = combine(back)
            return out if tap is None else (out, store)

        small = ep_capacity(cfg, slots, ep)
        if small >= slots:
            return exchange(slots, True)
        _, _, biggest = plan_all_to_all(ex, ep, e_local, 1)
        # the branch must be the same on every device that runs this program in lockstep: all
        # of the batch axes (the weight gradients' sums over the data axes sit inside the
        # branches: the worst-case branch's in its backward, and with split W's deferral the
        # other branch has none), and under a pipeline (dsv3_jax/pipeline) every pipeline
        # rank too
        overflow = jax.lax.pmax(biggest, axes + SYNC_AXES) > small
        return jax.lax.cond(overflow, lambda: exchange(slots, False),
                            lambda: exchange(small, True))

    args = (x_ND, routing.experts_NP, routing.gates_NP, w_gate, w_up, w_down)
    specs = (row, row, row, weight, weight, weight)
    out_specs = row
    if taps is not None:
        args, specs = args + tuple(taps), specs + (row, row)
        out_specs = (row, {"x": row, "gu": row, "tile_expert": P(axes), "used": P(axes)})
    return jax.shard_map(local, mesh=mesh, in_specs=specs, out_specs=out_specs)(*args)


def expert_parallel_wgrad(weights: tuple, xs: dict, ds: dict, cfg: ModelConfig, mesh):
    """(dW_gate, dW_up, dW_down) float32 of expert_parallel's deferred weight gradients from its
    store (xs: x, gu, tile_expert, used per device; ds: the taps' cotangents dgu, dy): each
    device's received rows give its local experts' dW (`experts_wgrad`), summed over the
    devices that hold the same experts (the batch axes other than `expert`). `weights`: the
    experts' (gate, up, down), for FP8's Wgrad VJPs."""
    ep, e_local, axes, row, weight = _ep_layout(cfg, mesh)
    others = tuple(a for a in axes if a != "expert")

    def local(wg, wu, wd, x, gu, dgu, dy, tile_expert, used):
        dw = experts_wgrad((wg, wu, wd), x, gu, dgu, dy, tile_expert, used[0], cfg)
        # summed over the devices holding the same experts: FP8's GEMM VJPs return that sum
        # already (the transpose of the weights' broadcast over those axes), the dW loop not
        summed = lambda w: tuple(a for a in others if a in varying_axes(w))
        return tuple(jax.lax.psum(w, summed(w)) if summed(w) else w for w in dw)

    return jax.shard_map(local, mesh=mesh,
                         in_specs=(weight,) * 3 + (row,) * 4 + (P(axes),) * 2,
                         out_specs=(weight,) * 3)(*weights, xs["x"], xs["gu"], ds["dgu"],
                                                  ds["dy"], xs["tile_expert"], xs["used"])


SYNC_AXES: tuple = ()   # extra manual axes the capacity decision is agreed over


@contextlib.contextmanager
def synced_over(*axes: str):
    """While tracing inside, the EP capacity branch is agreed over `axes` too (the pipeline
    executor's branch-free ticks: every pipeline rank must take the same branch, as all run
    every tick's ops)."""
    global SYNC_AXES
    old, SYNC_AXES = SYNC_AXES, SYNC_AXES + tuple(axes)
    try:
        yield
    finally:
        SYNC_AXES = old


