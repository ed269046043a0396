"""Grouped GEMM for dropless MoE: rows sorted by expert, each expert's group padded to whole tiles.

Layout (shared by every implementation, the FP8 variant and the dispatch kernels):
  lhs         [M, K]   rows sorted by expert; expert e's rows are padded with zero rows up to a
                       multiple of `tile_m`, so tile t = rows [t*tile_m, (t+1)*tile_m) belongs to
                       one expert; trailing unused tiles are all-zero rows.
  rhs         [E, K, N] one weight matrix per expert.
  tile_expert [M // tile_m] int32, the expert of each tile.
  used_tiles  optional int32 scalar: tiles at and after it are padding (zero rows, zero output).
  out         [M, N]   out[tile t] = lhs[tile t] @ rhs[tile_expert[t]].

Cost is M*K*N with M <= tokens*top_k + E*(tile_m - 1): it follows the routed work, not the
number of experts. Unlike `jax.lax.ragged_dot` (which densifies over groups on CPU), nothing here
is ever multiplied by a weight the tile does not use.

`grouped_matmul_reference` is the layout's oracle: gather each tile's weight, one batched
matmul, plain autodiff (the FP8 grouped GEMMs are checked against it).

`grouped_swiglu` is the routed experts' whole FFN, down(silu(x gate) * (x up)), on this layout,
what the MoE layer runs when not in FP8. Its `loop` implementation visits experts, not tiles:
each expert's weights are read (and, backward, transposed) once, its used tiles run as GEMMs of
up to CHUNK_ROWS rows with a chunk's three GEMMs back to back, and a custom VJP keeps each
expert's dW in the loop and stores it once. On CPU XLA runs small batched matmuls
single-threaded through Eigen; a loop of plain GEMMs never materialises [tiles, K, N] weights,
and visiting experts instead of 128-row tiles took one MoE layer's fwd+bwd at 8192 routed
rows from 50 ms to 27 ms on two cores.
`grouped_swiglu_reference` is three reference grouped matmuls.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name


def check_grouped_layout(lhs, rhs, tile_expert, tile_m, *, rhs_k_axis=1, name="grouped GEMM"):
    """The layout's shape rule, shared by every grouped GEMM (jnp, the FP8 dot and its kernels):
    lhs [M, K] with M a multiple of tile_m, tile_expert [M // tile_m], rhs 3-D with K on
    `rhs_k_axis`: [E, K, N] (1, the weights as stored) or [E, N, K] (2, the FP8 kernels' NT)."""
    m, k = lhs.shape
    if m % tile_m:
        raise ValueError(f"{name}: lhs rows ({m}) must be a multiple of tile_m ({tile_m})")
    if tile_expert.shape != (m // tile_m,):
        raise ValueError(f"{name}: tile_expert must have shape ({m // tile_m},), got "
                         f"{tile_expert.shape}")
    if rhs.ndim != 3 or rhs.shape[rhs_k_axis] != k:
        want = f"[E, {k}, N]" if rhs_k_axis == 1 else f"[E, N, {k}]"
        raise ValueError(f"{name}: rhs must be {want}, got {rhs.shape}")


def grouped_matmul_reference(lhs: jax.Array, rhs: jax.Array, tile_expert: jax.Array, *,
                             tile_m: int, used_tiles: jax.Array | None = None,
                             precision=None) -> jax.Array:
    """Plain-jnp grouped matmul: gather each tile's expert weight, one batched matmul."""
    check_grouped_layout(lhs, rhs, tile_expert, tile_m)
    m, k = lhs.shape
    num_tiles = m // tile_m
    out = jnp.einsum("tmk,tkn->tmn", lhs.reshape(num_tiles, tile_m, k),
                     jnp.take(rhs, tile_expert, axis=0), precision=precision)
    if used_tiles is not None:
        out = jnp.where((jnp.arange(num_tiles) < used_tiles)[:, None, None], out, 0)
    return out.reshape(m, rhs.shape[2]).astype(lhs.dtype)


def zeros_varying_like(shape, dtype, *refs):
    """Zeros whose shard_map 'varying manual axes' match the refs' (a loop carry's type must
    not change inside shard_map; jnp.zeros alone is invariant)."""
    z = jnp.zeros(shape, dtype)
    vma = frozenset().union(*(varying_axes(r) for r in refs))
    return jax.lax.pcast(z, tuple(sorted(vma)), to="varying") if vma else z


def varying_axes(x) -> frozenset:
    """The shard_map manual axes over which x varies (empty outside shard_map)."""
    aval = jax.typeof(x)
    mat = getattr(aval, "manual_axis_type", None)          # jax 0.10
    if mat is not None:
        return frozenset(mat.varying)
    return frozenset(getattr(aval, "vma", ()))              # other versions


# The loop visits experts, not tiles: each expert's weight is read (and, backward, transposed)
# once, its dW is accumulated in a loop carry and stored once, and its rows run as GEMMs of up to
# CHUNK_ROWS rows: whole chunks, then the remainder in halving sizes (each size a static shape).
CHUNK_ROWS = 512


def _expert_tiles(tile_expert, used, num_experts):
    """(first tile, number of used tiles) of each expert; tile_expert is non-decreasing."""
    used_t = (jnp.arange(tile_expert.shape[0]) < used).astype(jnp.int32)
    count = jnp.zeros((num_experts,), jnp.int32).at[tile_expert].add(used_t)
    return jnp.cumsum(count) - count, count


def _over_rows(first_tile, num_tiles, tile_m, total_tiles, body, carry):
    """carry = body(first row, rows (static), carry) over an expert's rows in chunks."""
    sizes, size = [], max(min(CHUNK_ROWS // tile_m, total_tiles), 1)
    while size >= 1:
        sizes.append(size)
        size //= 2
    for size in sizes:
        n = num_tiles // size

        def chunk(j, c, t0=first_tile, size=size):
            return body((t0 + j * size) * tile_m, size * tile_m, c)

        carry = jax.lax.fori_loop(0, n, chunk, carry)
        first_tile, num_tiles = first_tile + n * size, num_tiles - n * size
    return carry


def _rows(x, row0, rows, axis=0):
    return jax.lax.dynamic_slice_in_dim(x, row0, rows, axis=axis)


def sum_to_vma(ct, primal):
    """A cotangent summed over the shard_map axes along which its primal is invariant."""
    extra = tuple(sorted(varying_axes(ct) - varying_axes(primal)))
    return jax.lax.psum(ct, extra) if extra else ct


# ----------------------------------------------------------------------------------------------
# The routed experts' whole SwiGLU in one loop: down(silu(x Wg) * (x Wu)) per expert
# ----------------------------------------------------------------------------------------------

def grouped_swiglu_reference(x: jax.Array, w_gate: jax.Array, w_up: jax.Array,
                             w_down: jax.Array, tile_expert: jax.Array, *, tile_m: int,
                             used_tiles: jax.Array | None = None) -> jax.Array:
    """down(silu(x . gate) * (x . up)) per tile's expert, from three reference grouped matmuls."""
    gmm = functools.partial(grouped_matmul_reference, tile_expert=tile_expert, tile_m=tile_m,
                            used_tiles=used_tiles)
    h = jax.nn.silu(gmm(x, w_gate)) * gmm(x, w_up)
    return gmm(h, w_down)


def _swiglu_fwd_impl(x, wg, wu, wd, tile_expert, used, tile_m):
    """(y [M, D], the gate and up pre-activations [M, 2F] the backward reads, and each
    expert's (first tile, tile count), which it reuses)."""
    first, count = _expert_tiles(tile_expert, used, wg.shape[0])
    f = wg.shape[2]
    refs = (x, wg, wu, wd, tile_expert, used)

    def expert(e, carry):
        gu_w = jnp.concatenate([wg[e], wu[e]], axis=1).astype(x.dtype)    # [D, 2F]: one GEMM
        d_w = wd[e].astype(x.dtype)

        def body(row0, rows, carry):
            y, gu = carry
            gu_c = jnp.dot(_rows(x, row0, rows), gu_w)
            y_c = jnp.dot(jax.nn.silu(gu_c[:, :f]) * gu_c[:, f:], d_w)
            y = jax.lax.dynamic_update_slice_in_dim(y, y_c.astype(y.dtype), row0, axis=0)
            return y, jax.lax.dynamic_update_slice_in_dim(gu, gu_c.astype(gu.dtype), row0, axis=0)
        return _over_rows(first[e], count[e], tile_m, tile_expert.shape[0], body, carry)

    carry = (zeros_varying_like((x.shape[0], wd.shape[2]), x.dtype, *refs),
             zeros_varying_like((x.shape[0], 2 * f), x.dtype, *refs))
    y, gu = jax.lax.fori_loop(0, wg.shape[0], expert, carry)
    return y, gu, (first, count)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _grouped_swiglu_loop(x, wg, wu, wd, tile_expert, used, tile_m):
    return _swiglu_fwd_impl(x, wg, wu, wd, tile_expert, used, tile_m)[0]


def _swiglu_fwd(x, wg, wu, wd, tile_expert, used, tile_m):
    y, gu, ranges = _swiglu_fwd_impl(x, wg, wu, wd, tile_expert, used, tile_m)
    gu = checkpoint_name(gu, "moe_gu")   # saved by the model's remat="selective"
    return y, (x, gu, wg, wu, wd, tile_expert, used, ranges)


def _swiglu_input_grad(dy_c, gu_c, d_wT, gu_wT, dtype):
    """(dgu, dx) of a chunk of rows: the gate|up pre-activation gradient [rows, 2F] in `dtype`
    and the input gradient [rows, D], from the output gradient and the saved pre-activations."""
    f = gu_c.shape[1] // 2
    dh = jnp.dot(dy_c, d_wT, preferred_element_type=jnp.float32)
    gu_c = gu_c.astype(jnp.float32)
    g_c, u_c = gu_c[:, :f], gu_c[:, f:]
    s_c = jax.nn.sigmoid(g_c)
    # d silu(g) / dg = s (1 + g (1 - s))
    dgu = jnp.concatenate([dh * u_c * s_c * (1 + g_c * (1 - s_c)), dh * g_c * s_c],
                          axis=1).astype(dtype)
    return dgu, jnp.dot(dgu, gu_wT)


def _swiglu_bwd(tile_m, res, dy):
    x, gu, wg, wu, wd, tile_expert, used, (first, count) = res
    f = wg.shape[2]
    refs = (x, wg, wu, wd, dy, tile_expert, used)
    # Transposed once, so each chunk's Wgrad is a plain [K, rows] x [rows, N] GEMM.
    h_FM = (jax.nn.silu(gu[:, :f]) * gu[:, f:]).T
    x_DM = x.T

    def expert(e, carry):
        dx, dwg, dwu, dwd = carry
        gu_wT = jnp.concatenate([wg[e], wu[e]], axis=1).astype(x.dtype).T    # [2F, D]
        d_wT = wd[e].astype(x.dtype).T

        def body(row0, rows, c):
            dx, dgu_w, dd_w = c
            dy_c = _rows(dy, row0, rows).astype(x.dtype)
            dgu, dx_c = _swiglu_input_grad(dy_c, _rows(gu, row0, rows), d_wT, gu_wT, x.dtype)
            dx = jax.lax.dynamic_update_slice_in_dim(dx, dx_c.astype(dx.dtype), row0, axis=0)
            acc = functools.partial(jnp.dot, preferred_element_type=jnp.float32)
            return (dx, dgu_w + acc(_rows(x_DM, row0, rows, axis=1), dgu),
                    dd_w + acc(_rows(h_FM, row0, rows, axis=1), dy_c))

        zeros = lambda shape: zeros_varying_like(shape, jnp.float32, *refs)
        dx, dgu_w, dd_w = _over_rows(first[e], count[e], tile_m, tile_expert.shape[0], body,
                                     (dx, zeros((wg.shape[1], 2 * f)), zeros(wd.shape[1:])))
        return (dx, dwg.at[e].set(dgu_w[:, :f]), dwu.at[e].set(dgu_w[:, f:]),
                dwd.at[e].set(dd_w))

    zeros = lambda w: zeros_varying_like(w.shape, jnp.float32, *refs)
    dx, dwg, dwu, dwd = jax.lax.fori_loop(
        0, wg.shape[0], expert,
        (zeros_varying_like(x.shape, x.dtype, *refs), zeros(wg), zeros(wu), zeros(wd)))
    return (sum_to_vma(dx, x),) + tuple(sum_to_vma(d, w).astype(w.dtype) for d, w in
                                        ((dwg, wg), (dwu, wu), (dwd, wd))) + (None, None)


_grouped_swiglu_loop.defvjp(_swiglu_fwd, _swiglu_bwd)


# ----------------------------------------------------------------------------------------------
# The same SwiGLU with its weight gradients deferred (the pipeline's per-Linear W): the backward
# returns the input gradient and, through two zero taps, the gate|up pre-activation gradient
# dgu [M, 2F] and the output gradient dy [M, D]; `grouped_swiglu_wgrad` later turns them (with x
# and gu) into dW, the GEMMs the fused VJP above runs in its loop.
# ----------------------------------------------------------------------------------------------

@functools.partial(jax.custom_vjp, nondiff_argnums=(8,))
def _grouped_swiglu_tapped(x, wg, wu, wd, tile_expert, used, tap_gu, tap_y, tile_m):
    y, gu, _ = _swiglu_fwd_impl(x, wg, wu, wd, tile_expert, used, tile_m)
    return y + tap_y.astype(y.dtype), gu


def _tapped_fwd(x, wg, wu, wd, tile_expert, used, tap_gu, tap_y, tile_m):
    y, gu, ranges = _swiglu_fwd_impl(x, wg, wu, wd, tile_expert, used, tile_m)
    gu = checkpoint_name(gu, "moe_gu")   # saved by the model's remat="selective"
    return (y + tap_y.astype(y.dtype), gu), (x, gu, wg, wu, wd, tile_expert, used, ranges,
                                             tap_gu, tap_y)


def _tapped_bwd(tile_m, res, cts):
    x, gu, wg, wu, wd, tile_expert, used, (first, count), tap_gu, tap_y = res
    dy = cts[0]                          # gu is returned for W's store, not differentiated
    refs = (x, wg, wu, wd, dy, tile_expert, used)

    def expert(e, carry):
        gu_wT = jnp.concatenate([wg[e], wu[e]], axis=1).astype(x.dtype).T    # [2F, D]
        d_wT = wd[e].astype(x.dtype).T

        def body(row0, rows, c):
            dx, dgu_all = c
            dgu, dx_c = _swiglu_input_grad(_rows(dy, row0, rows).astype(x.dtype),
                                           _rows(gu, row0, rows), d_wT, gu_wT, x.dtype)
            dx = jax.lax.dynamic_update_slice_in_dim(dx, dx_c.astype(dx.dtype), row0, axis=0)
            return dx, jax.lax.dynamic_update_slice_in_dim(dgu_all, dgu, row0, axis=0)
        return _over_rows(first[e], count[e], tile_m, tile_expert.shape[0], body, carry)

    dx, dgu = jax.lax.fori_loop(
        0, wg.shape[0], expert, (zeros_varying_like(x.shape, x.dtype, *refs),
                                 zeros_varying_like(gu.shape, x.dtype, *refs)))
    zero = lambda w: zeros_varying_like(w.shape, w.dtype, w)   # (taken under stop_gradient)
    return (dx, zero(wg), zero(wu), zero(wd), None, None, dgu.astype(tap_gu.dtype),
            dy.astype(tap_y.dtype))


_grouped_swiglu_tapped.defvjp(_tapped_fwd, _tapped_bwd)


def grouped_swiglu_deferred(x, w_gate, w_up, w_down, tile_expert, tap_gu, tap_y, *, tile_m: int,
                            used_tiles=None):
    """(y, gu): `grouped_swiglu`'s y (plus the zero tap_y) and the gate|up pre-activations
    [M, 2F]. Its VJP gives the input gradient, zero weight gradients and, as the cotangents of
    the zero taps tap_gu [M, 2F] and tap_y [M, D], what `grouped_swiglu_wgrad` needs."""
    check_grouped_layout(x, w_gate, tile_expert, tile_m, name="grouped_swiglu_deferred")
    used = tile_expert.shape[0] if used_tiles is None else used_tiles
    return _grouped_swiglu_tapped(x, w_gate, w_up, w_down, tile_expert.astype(jnp.int32),
                                  jnp.asarray(used, jnp.int32), tap_gu, tap_y, tile_m)


def grouped_swiglu_wgrad(x, gu, dgu, dy, tile_expert, used, *, tile_m: int, num_experts: int):
    """(dW_gate [E, D, F], dW_up, dW_down [E, F, D]) in float32 from the grouped layout's input
    x [M, D], pre-activations gu [M, 2F], their gradient dgu and the output gradient dy [M, D]:
    per expert, x^T dgu and silu(g)*u ^T dy over its rows (the fused VJP's weight GEMMs)."""
    f = gu.shape[1] // 2
    first, count = _expert_tiles(tile_expert, used, num_experts)
    h_FM = (jax.nn.silu(gu[:, :f]) * gu[:, f:]).astype(x.dtype).T
    x_DM = x.T
    acc = functools.partial(jnp.dot, preferred_element_type=jnp.float32)

    def expert(e, carry):
        dwg, dwu, dwd = carry

        def body(row0, rows, c):
            dgu_w, dd_w = c
            return (dgu_w + acc(_rows(x_DM, row0, rows, axis=1), _rows(dgu, row0, rows)),
                    dd_w + acc(_rows(h_FM, row0, rows, axis=1),
                               _rows(dy, row0, rows).astype(x.dtype)))
        dgu_w, dd_w = _over_rows(first[e], count[e], tile_m, tile_expert.shape[0], body,
                                 (zeros_varying_like((x.shape[1], 2 * f), jnp.float32, *refs),
                                  zeros_varying_like((f, dy.shape[1]), jnp.float32, *refs)))
        return dwg.at[e].set(dgu_w[:, :f]), dwu.at[e].set(dgu_w[:, f:]), dwd.at[e].set(dd_w)

    refs = (x, gu, dgu, dy, tile_expert, used)   # under shard_map: per-device values
    zeros = lambda *shape: zeros_varying_like((num_experts,) + shape, jnp.float32, *refs)
    return jax.lax.fori_loop(0, num_experts, expert,
                             (zeros(x.shape[1], f), zeros(x.shape[1], f), zeros(f, dy.shape[1])))


def grouped_swiglu(x: jax.Array, w_gate: jax.Array, w_up: jax.Array, w_down: jax.Array,
                   tile_expert: jax.Array, *, tile_m: int, used_tiles: jax.Array | None = None,
                   implementation: str = "loop") -> jax.Array:
    """y[tile t] = down_e(silu(x gate_e) * (x up_e)), e = tile_expert[t]: the routed experts'
    SwiGLU on the grouped layout (x [M, D], gate/up [E, D, F], down [E, F, D]).

    `loop` runs all three GEMMs of a chunk back to back on one expert's weights (gate|up
    joined per expert into one [D, 2F] GEMM; the silu product never leaves the chunk), saves
    the [M, 2F] pre-activations for the backward, and its custom VJP keeps each expert's dW in
    the loop and stores it once, in FP32 before the cast to the weights' dtype; `reference` is
    three reference grouped matmuls."""
    if implementation == "reference":
        return grouped_swiglu_reference(x, w_gate, w_up, w_down, tile_expert, tile_m=tile_m,
                                        used_tiles=used_tiles)
    if implementation != "loop":
        raise ValueError(f"unknown grouped_swiglu implementation {implementation!r}")
    check_grouped_layout(x, w_gate, tile_expert, tile_m, name="grouped_swiglu")
    if w_up.shape != w_gate.shape or w_down.shape != (w_gate.shape[0], w_gate.shape[2],
                                                      x.shape[1]):
        raise ValueError(f"grouped_swiglu: gate {w_gate.shape}, up {w_up.shape}, down "
                         f"{w_down.shape} do not fit x {x.shape}")
    used = tile_expert.shape[0] if used_tiles is None else used_tiles
    return _grouped_swiglu_loop(x, w_gate, w_up, w_down, tile_expert.astype(jnp.int32),
                                jnp.asarray(used, jnp.int32), tile_m)
