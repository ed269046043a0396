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

Two jnp implementations:
  reference  gather each tile's weight, one batched matmul; plain autodiff. The oracle.
  loop       a loop over the used tiles with a custom VJP (dW accumulated in place per expert).
             On CPU XLA runs small batched matmuls single-threaded through Eigen; the loop of
             plain GEMMs is 2-3x faster fwd+bwd and never materialises [tiles, K, N] weights.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def _check(lhs, rhs, tile_expert, tile_m):
    m, k = lhs.shape
    if m % tile_m:
        raise ValueError(f"lhs rows ({m}) must be a multiple of tile_m ({tile_m})")
    if tile_expert.shape != (m // tile_m,):
        raise ValueError(f"tile_expert must have shape ({m // tile_m},), got {tile_expert.shape}")
    if rhs.ndim != 3 or rhs.shape[1] != k:
        raise ValueError(f"rhs must be [E, {k}, N], got {rhs.shape}")


def grouped_matmul_reference(lhs: jax.Array, rhs: jax.Array, tile_expert: jax.Array, *,
                             tile_m: int, used_tiles: jax.Array | None = None,
                             precision=None) -> jax.Array:
    """Plain-jnp grouped matmul: gather each tile's expert weight, one batched matmul."""
    _check(lhs, rhs, tile_expert, tile_m)
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
    vma = frozenset().union(*(_varying_axes(r) for r in refs))
    return jax.lax.pcast(z, tuple(sorted(vma)), to="varying") if vma else z


def _varying_axes(x) -> frozenset:
    aval = jax.typeof(x)
    mat = getattr(aval, "manual_axis_type", None)          # jax 0.10
    if mat is not None:
        return frozenset(mat.varying)
    return frozenset(getattr(aval, "vma", ()))              # other versions


def _tile(x, t, tile_m):
    return jax.lax.dynamic_slice_in_dim(x, t * tile_m, tile_m, axis=0)


def _loop_fwd_impl(lhs, rhs, tile_expert, used, tile_m):
    def body(t, out):
        y = jnp.dot(_tile(lhs, t, tile_m), rhs[tile_expert[t]].astype(lhs.dtype))
        return jax.lax.dynamic_update_slice_in_dim(out, y.astype(out.dtype), t * tile_m, axis=0)
    out = zeros_varying_like((lhs.shape[0], rhs.shape[2]), lhs.dtype, lhs, rhs, tile_expert, used)
    return jax.lax.fori_loop(0, used, body, out)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _grouped_matmul_loop(lhs, rhs, tile_expert, used, tile_m):
    return _loop_fwd_impl(lhs, rhs, tile_expert, used, tile_m)


def _loop_fwd(lhs, rhs, tile_expert, used, tile_m):
    return _loop_fwd_impl(lhs, rhs, tile_expert, used, tile_m), (lhs, rhs, tile_expert, used)


def _loop_bwd(tile_m, res, dy):
    lhs, rhs, tile_expert, used = res

    # lhs transposed once, so each tile's Wgrad is a plain [K, tile] x [tile, N] GEMM (XLA:CPU
    # runs a dot contracting the lhs's leading dim on a slower path).
    lhs_KM = lhs.T

    def body(t, carry):
        dx, dw = carry
        e = tile_expert[t]
        dy_t = _tile(dy, t, tile_m).astype(lhs.dtype)
        dx_t = jnp.dot(dy_t, rhs[e].astype(lhs.dtype).T)
        dx = jax.lax.dynamic_update_slice_in_dim(dx, dx_t.astype(dx.dtype), t * tile_m, axis=0)
        x_t_KT = jax.lax.dynamic_slice_in_dim(lhs_KM, t * tile_m, tile_m, axis=1)
        dw_e = jnp.dot(x_t_KT, dy_t, preferred_element_type=dw.dtype)
        return dx, dw.at[e].add(dw_e)          # in place: the loop carry is updated, not copied

    refs = (lhs, rhs, dy, tile_expert, used)
    dx, dw = jax.lax.fori_loop(0, used, body, (zeros_varying_like(lhs.shape, lhs.dtype, *refs),
                                               zeros_varying_like(rhs.shape, jnp.float32, *refs)))
    # Under shard_map a weight replicated over some axes gets its gradient summed over them.
    return sum_to_vma(dx, lhs), sum_to_vma(dw, rhs).astype(rhs.dtype), None, None


def sum_to_vma(ct, primal):
    """A cotangent summed over the shard_map axes along which its primal is invariant."""
    extra = tuple(sorted(_varying_axes(ct) - _varying_axes(primal)))
    return jax.lax.psum(ct, extra) if extra else ct


_grouped_matmul_loop.defvjp(_loop_fwd, _loop_bwd)


def grouped_matmul(lhs: jax.Array, rhs: jax.Array, tile_expert: jax.Array, *, tile_m: int,
                   used_tiles: jax.Array | None = None, implementation: str = "loop") -> jax.Array:
    """The one entry point the MoE layer calls; `implementation` picks the backend."""
    if implementation == "reference":
        return grouped_matmul_reference(lhs, rhs, tile_expert, tile_m=tile_m, used_tiles=used_tiles)
    if implementation == "loop":
        _check(lhs, rhs, tile_expert, tile_m)
        if used_tiles is None:
            used_tiles = tile_expert.shape[0]
        tile_expert = tile_expert.astype(jnp.int32)
        return _grouped_matmul_loop(lhs, rhs, tile_expert, jnp.asarray(used_tiles, jnp.int32),
                                    tile_m)
    raise ValueError(f"unknown grouped_matmul implementation {implementation!r}")
