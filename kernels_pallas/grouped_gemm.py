"""Grouped GEMM for dropless MoE: rows sorted by expert, each expert's group padded to whole tiles.

Layout (shared by every implementation, the FP8 variant and the dispatch kernels):
  lhs         [M, K]   rows sorted by expert; expert e's rows are padded with zero rows up to a
                       multiple of `tile_m`, so tile t = rows [t*tile_m, (t+1)*tile_m) belongs to
                       one expert; trailing unused tiles are all-zero rows.
  rhs         [E, K, N] one weight matrix per expert.
  tile_expert [M // tile_m] int32, the expert of each tile.
  out         [M, N]   out[tile t] = lhs[tile t] @ rhs[tile_expert[t]].

Cost is M*K*N with M <= tokens*top_k + E*(tile_m - 1): it follows the routed work, not the
number of experts. Unlike `jax.lax.ragged_dot` (which densifies over groups on CPU), nothing here
is ever multiplied by a weight the tile does not use.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def grouped_matmul_reference(lhs: jax.Array, rhs: jax.Array, tile_expert: jax.Array, *,
                             tile_m: int, precision=None,
                             preferred_element_type=None) -> jax.Array:
    """Plain-jnp grouped matmul: gather each tile's expert weight, one batched matmul."""
    m, k = lhs.shape
    if m % tile_m:
        raise ValueError(f"lhs rows ({m}) must be a multiple of tile_m ({tile_m})")
    num_tiles = m // tile_m
    if tile_expert.shape != (num_tiles,):
        raise ValueError(f"tile_expert must have shape ({num_tiles},), got {tile_expert.shape}")
    if rhs.ndim != 3 or rhs.shape[1] != k:
        raise ValueError(f"rhs must be [E, {k}, N], got {rhs.shape}")
    lhs_tiles = lhs.reshape(num_tiles, tile_m, k)
    rhs_tiles = jnp.take(rhs, tile_expert, axis=0)          # [tiles, K, N]
    out = jnp.einsum("tmk,tkn->tmn", lhs_tiles, rhs_tiles, precision=precision,
                     preferred_element_type=preferred_element_type)
    return out.reshape(m, rhs.shape[2])


def grouped_matmul(lhs: jax.Array, rhs: jax.Array, tile_expert: jax.Array, *, tile_m: int,
                   implementation: str = "jnp", precision=None) -> jax.Array:
    """The one entry point the MoE layer calls; `implementation` picks the backend."""
    if implementation == "jnp":
        return grouped_matmul_reference(lhs, rhs, tile_expert, tile_m=tile_m, precision=precision)
    raise ValueError(f"unknown grouped_matmul implementation {implementation!r}")
