"""The DeepSeek-V3 FP8 training recipe (report §3.3; spec §5): fine-grained E4M3 quantization and
the three FP8 GEMMs of a linear layer, as `fp8_dot` (dense) and `fp8_grouped_dot` (MoE experts).

Quantization (E4M3, max 448, scales computed online from each tile's amax, no delayed scaling):
  activations / gradients  1x128 tiles along the GEMM's contraction dim: scale [..., K/128]
  weights                  128x128 blocks: scale [K/128, N/128]
  scale = max(amax, AMAX_FLOOR) / 448 is the dequantization multiplier ("weight_scale_inv" in the
  checkpoint): value ~= float(q) * scale. `pow2_scale=True` rounds it up to a power of two (the
  report's "round-scaled" tensors; V3.1's ue8m0), so rescaling is exact. Ragged edges are zero
  padded before the amax and cropped after (spec detailed §2.3).

The three GEMMs of `y = x . W` (x [M, K], W [K, N] as our params are stored [in, out]); each
operand is re-tiled along ITS contraction dim, so all scales lie along K of the GEMM:
  Fprop  y  = x . W       x 1x128 along K;   W 128x128 blocks (stored transposed, [N, K])
  Dgrad  dx = dy . W^T    dy 1x128 along N;  W 128x128 blocks (the same blocks as Fprop)
  Wgrad  dW = x^T . dy    x and dy in 128x1 tiles along the tokens M (1x128 of x^T, dy^T)
Every GEMM accumulates each 128-wide K chunk, then promotes it to FP32 with both scales applied
(N_C = 128). `implementation` picks `kernels_pallas.fp8_gemm`'s jnp reference ("jnp") or its
Mosaic GPU kernel ("pallas"; interpreted off-GPU). Outputs are in the compute dtype; gradients in
the dtypes of x and W.

Residuals (report §3.3.3, "Low-Precision Activation"): W's FP8 blocks (as uint8 bits, so that
remat cannot round them; see `_to_bits`) and x. With `cache_x=True` x is cached as Fprop's own
1x128 FP8 tiles and scales (about 1 + 4/128 bytes per value instead of the compute dtype's 2);
Wgrad dequantizes and re-tiles them 128x1. x's scales are then powers of 2 (the report's "round
scaled" tiles), so the re-tiling only shifts exponents: no second rounding short of underflow. With
`cache_x=False` x is kept in the compute dtype and Wgrad quantizes it 128x1 straight from x.
`fp8_grouped_swiglu_down` is the MoE's SwiGLU + down-projection: its inputs (gate, up) are cached
in FP8 and its output recomputed in the backward pass (report §3.3.3 (2)).

MoE Wgrad tiles: dW[e] contracts over expert e's rows. Its 128x1 tiles are taken inside e's group,
starting at the group's first row, so no tile mixes two experts. When tile_m is a multiple of 128
these are the layout's own 128-row blocks; otherwise each group is copied into 128-row-aligned
chunks (zero filled) before quantizing (`wgrad_chunks`).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from kernels_pallas import fp8_gemm
from kernels_pallas import interpret_default
from kernels_pallas.grouped_gemm import check_grouped_layout, sum_to_vma

E4M3 = jnp.float8_e4m3fn
E4M3_MAX = 448.0
TILE = 128
# Smallest amax a tile is scaled for. All-zero tiles then get a finite scale (no 0/0), and the
# scale stays a normal float32 (>= 2^-126) even after / 448. Not DeepGEMM's 1e-4: activation
# gradients are routinely below 1e-4 (the loss is a mean over ~1e6 tokens), and a 1e-4 floor
# would push them into E4M3 subnormals or to zero.
AMAX_FLOOR = 1e-30
IMPLEMENTATIONS = ("jnp", "pallas")


# ----------------------------------------------------------------------------------------------
# Quantization
# ----------------------------------------------------------------------------------------------

def scale_from_amax(amax: jax.Array, *, pow2_scale: bool = False) -> jax.Array:
    """Dequantization multiplier of a tile: amax/448, optionally rounded up to 2^ceil(log2)."""
    scale = jnp.maximum(amax.astype(jnp.float32), AMAX_FLOOR) / E4M3_MAX
    if pow2_scale:
        mant, exp = jnp.frexp(scale)                 # scale = mant * 2^exp, mant in [0.5, 1)
        scale = jnp.ldexp(jnp.ones_like(scale), jnp.where(mant == 0.5, exp - 1, exp))
    return scale


def _to_e4m3(x_over_scale: jax.Array) -> jax.Array:
    # |x| / scale <= 448 up to float rounding; clip so the cast saturates instead of making NaN.
    return jnp.clip(x_over_scale, -E4M3_MAX, E4M3_MAX).astype(E4M3)


def _pad_to_tiles(x: jax.Array, axes) -> jax.Array:
    pad = [(0, 0)] * x.ndim
    for a in axes:
        pad[a] = (0, -x.shape[a] % TILE)
    return jnp.pad(x, pad)


def quantize_1x128_padded(x: jax.Array, *, pow2_scale: bool = False):
    """1x128 tiles along the last dim, zero padded to a multiple of 128 (what the GEMMs take).

    Returns q [..., Kp] E4M3 and scale [..., Kp/128] float32.
    """
    xp = _pad_to_tiles(x, [-1]).astype(jnp.float32)
    tiles = xp.reshape(*xp.shape[:-1], -1, TILE)
    scale = scale_from_amax(jnp.max(jnp.abs(tiles), axis=-1), pow2_scale=pow2_scale)
    return _to_e4m3(tiles / scale[..., None]).reshape(xp.shape), scale


def quantize_128x128_padded(w: jax.Array, *, pow2_scale: bool = False):
    """128x128 blocks of the last two dims, zero padded: q [..., Rp, Cp], scale [..., Rp/128, Cp/128]."""
    wp = _pad_to_tiles(w, [-2, -1]).astype(jnp.float32)
    *lead, r, c = wp.shape
    blocks = wp.reshape(*lead, r // TILE, TILE, c // TILE, TILE)
    scale = scale_from_amax(jnp.max(jnp.abs(blocks), axis=(-3, -1)), pow2_scale=pow2_scale)
    q = _to_e4m3(blocks / scale[..., :, None, :, None])
    return q.reshape(wp.shape), scale


def quantize_1x128(x: jax.Array, *, pow2_scale: bool = False):
    """x [..., K] -> (q [..., K] E4M3, scale [..., ceil(K/128)] float32)."""
    q, scale = quantize_1x128_padded(x, pow2_scale=pow2_scale)
    return q[..., :x.shape[-1]], scale


def quantize_128x128(w: jax.Array, *, pow2_scale: bool = False):
    """w [..., R, C] -> (q [..., R, C] E4M3, scale [..., ceil(R/128), ceil(C/128)] float32)."""
    q, scale = quantize_128x128_padded(w, pow2_scale=pow2_scale)
    return q[..., :w.shape[-2], :w.shape[-1]], scale


def dequantize_1x128(q: jax.Array, scale: jax.Array, dtype=jnp.float32) -> jax.Array:
    k = q.shape[-1]
    s = jnp.repeat(scale, TILE, axis=-1)[..., :k]
    return (q.astype(jnp.float32) * s).astype(dtype)


def dequantize_128x128(q: jax.Array, scale: jax.Array, dtype=jnp.float32) -> jax.Array:
    r, c = q.shape[-2:]
    s = jnp.repeat(jnp.repeat(scale, TILE, axis=-2), TILE, axis=-1)[..., :r, :c]
    return (q.astype(jnp.float32) * s).astype(dtype)


# ----------------------------------------------------------------------------------------------
# Operands of the three GEMMs (NT layout: both operands keep the contraction dim last)
# ----------------------------------------------------------------------------------------------

class GemmOperands(NamedTuple):
    """out[m, n] = sum_k lhs[m, k] rhs[n, k] * lhs_scale[m, k//128] * rhs_scale[., k//128]."""
    lhs: jax.Array          # [M, Kp] E4M3
    lhs_scale: jax.Array    # [M, Kp/128]
    rhs: jax.Array          # [N, Kp] E4M3
    rhs_scale: jax.Array    # [N, Kp/128] per row, or [N/128, Kp/128] per 128x128 block


class QuantizedWeight(NamedTuple):
    q_KN: jax.Array         # [..., Kp, Np] E4M3, zero padded
    scale: jax.Array        # [..., Kp/128, Np/128]


def quantize_weight(w_KN: jax.Array, *, pow2_scale: bool = False) -> QuantizedWeight:
    return QuantizedWeight(*quantize_128x128_padded(w_KN, pow2_scale=pow2_scale))


def _swap(x):
    return jnp.swapaxes(x, -1, -2)


# FP8 residuals cross the custom VJP as their uint8 bits. jax's remat (any policy that saves
# them, e.g. everything_saveable; the model's "selective" recomputes them instead) applies reduce_precision(exponent_bits=4, mantissa_bits=3)
# to floating residuals; XLA reads that as an IEEE format whose largest finite value is 240, so
# E4M3FN values in (240, 448] would come back as inf (tests/test_fp8.py checks this).
def _to_bits(w: QuantizedWeight) -> QuantizedWeight:
    return w._replace(q_KN=jax.lax.bitcast_convert_type(w.q_KN, jnp.uint8))


def _from_bits(w: QuantizedWeight) -> QuantizedWeight:
    return w._replace(q_KN=jax.lax.bitcast_convert_type(w.q_KN, E4M3))


def fprop_operands(x_MK: jax.Array, w: QuantizedWeight, *, pow2_scale=False) -> GemmOperands:
    """y = x . W: x 1x128 along K; W^T [Np, Kp] with its 128x128 block scales transposed."""
    x_q, x_s = quantize_1x128_padded(x_MK, pow2_scale=pow2_scale)
    return GemmOperands(x_q, x_s, _swap(w.q_KN), _swap(w.scale))


def dgrad_operands(dy_MN: jax.Array, w: QuantizedWeight, *, pow2_scale=False) -> GemmOperands:
    """dx = dy . W^T: dy 1x128 along N; W [Kp, Np] is already K-major in N."""
    dy_q, dy_s = quantize_1x128_padded(dy_MN, pow2_scale=pow2_scale)
    return GemmOperands(dy_q, dy_s, w.q_KN, w.scale)


def wgrad_operands(x_MK: jax.Array, dy_MN: jax.Array, *, pow2_scale=False,
                   pow2_x: bool | None = None) -> GemmOperands:
    """dW = x^T . dy: x^T [K, Mp] and dy^T [N, Mp], each 1x128 along the tokens (x's scales
    power-of-2 if pow2_x, which defaults to pow2_scale)."""
    pow2_x = pow2_scale if pow2_x is None else pow2_x
    xt_q, xt_s = quantize_1x128_padded(x_MK.T, pow2_scale=pow2_x)
    gt_q, gt_s = quantize_1x128_padded(dy_MN.T, pow2_scale=pow2_scale)
    return GemmOperands(xt_q, xt_s, gt_q, gt_s)


# ----------------------------------------------------------------------------------------------
# The implementation switch
# ----------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class _Options:
    implementation: str
    pow2_scale: bool
    interpret: bool
    out_dtype: object
    cache_x: bool = False

    @property
    def pow2_x(self) -> bool:
        """x's tiles (Fprop 1x128, Wgrad 128x1) get power-of-2 scales when x is cached: the
        report's "round scaled" re-tiling, so turning the cached 1x128 tiles into Wgrad's
        128x1 tiles only shifts exponents and rounds nothing (short of E4M3 underflow)."""
        return self.pow2_scale or self.cache_x


def _options(implementation, pow2_scale, interpret, out_dtype, cache_x=False) -> _Options:
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"unknown FP8 implementation {implementation!r}; expected {IMPLEMENTATIONS}")
    if interpret is None:        # the Mosaic GPU kernel runs natively only on a GPU
        interpret = interpret_default()
    return _Options(implementation, bool(pow2_scale), bool(interpret),
                    None if out_dtype is None else jnp.dtype(out_dtype), bool(cache_x))


def _kernel(opt: _Options, name: str):
    suffix = "_reference" if opt.implementation == "jnp" else ""
    return functools.partial(getattr(fp8_gemm, name + suffix), interpret=opt.interpret)


def _gemm(opt: _Options, ops: GemmOperands, out_dtype) -> jax.Array:
    return _kernel(opt, "fp8_gemm")(*ops, out_dtype=out_dtype)


class CachedX(NamedTuple):
    """A GEMM input cached for Wgrad as Fprop's FP8 tiles: q [M, Kp] uint8 bits, scale
    [M, Kp/128] float32, and an empty [0, K] array of x's dtype (dx's dtype, x's width)."""
    bits: jax.Array
    scale: jax.Array
    like: jax.Array


def _cache_x(x_MK: jax.Array, ops: GemmOperands, opt: _Options):
    """What Wgrad keeps of x: Fprop's quantized x (cache_x) or x itself."""
    if not opt.cache_x:
        return x_MK
    return CachedX(jax.lax.bitcast_convert_type(ops.lhs, jnp.uint8), ops.lhs_scale,
                   x_MK[:0])     # [0, K]: x's dtype, width and shard_map varying axes


def _uncache_x(res):
    """(x [M, K] for Wgrad, an x-like array): cached FP8 tiles dequantized (float32), or x."""
    if not isinstance(res, CachedX):
        return res, res
    q = jax.lax.bitcast_convert_type(res.bits, E4M3)
    return dequantize_1x128(q, res.scale)[:, :res.like.shape[1]], res.like


# ----------------------------------------------------------------------------------------------
# Dense: fp8_dot
# ----------------------------------------------------------------------------------------------

def fp8_dot(x: jax.Array, w: jax.Array, *, implementation: str = "jnp", out_dtype=None,
            pow2_scale: bool = False, interpret: bool | None = None,
            cache_x: bool = False) -> jax.Array:
    """x [..., K] . w [K, N] -> [..., N] with FP8 Fprop, Dgrad and Wgrad (custom VJP).

    out_dtype defaults to x.dtype (the compute dtype). interpret=None interprets the Pallas
    kernel when not running on a GPU. cache_x: keep x for Wgrad as Fprop's FP8 tiles.
    """
    k, n = w.shape
    if x.shape[-1] != k:
        raise ValueError(f"fp8_dot: x {x.shape} does not contract with w {w.shape}")
    opt = _options(implementation, pow2_scale, interpret, out_dtype, cache_x)
    y = _fp8_matmul(x.reshape(-1, k), w, opt)
    return y.reshape(*x.shape[:-1], n)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _fp8_matmul(x_MK, w_KN, opt: _Options):
    return _fp8_matmul_fwd(x_MK, w_KN, opt)[0]


def _fp8_matmul_fwd(x_MK, w_KN, opt: _Options):
    w = quantize_weight(w_KN, pow2_scale=opt.pow2_scale)
    ops = fprop_operands(x_MK, w, pow2_scale=opt.pow2_x)
    y = _gemm(opt, ops, opt.out_dtype or x_MK.dtype)
    # An empty array carries W's dtype into the backward (residuals must be arrays).
    return y[:, :w_KN.shape[1]], (_cache_x(x_MK, ops, opt), _to_bits(w),
                                  jnp.zeros((0,), w_KN.dtype))


def _fp8_matmul_bwd(opt: _Options, res, dy_MN):
    x_res, w, w_dtype = res
    w = _from_bits(w)
    x_MK, x_like = _uncache_x(x_res)
    k = x_MK.shape[1]
    dx = _gemm(opt, dgrad_operands(dy_MN, w, pow2_scale=opt.pow2_scale), x_like.dtype)
    dw = _gemm(opt, wgrad_operands(x_MK, dy_MN, pow2_scale=opt.pow2_scale, pow2_x=opt.pow2_x),
               w_dtype.dtype)
    return dx[:, :k], dw


_fp8_matmul.defvjp(_fp8_matmul_fwd, _fp8_matmul_bwd)


# ----------------------------------------------------------------------------------------------
# MoE experts: fp8_grouped_dot (layout of kernels_pallas/grouped_gemm.py)
# ----------------------------------------------------------------------------------------------

def fp8_grouped_dot(lhs: jax.Array, rhs: jax.Array, tile_expert: jax.Array, *, tile_m: int,
                    implementation: str = "jnp", out_dtype=None,
                    used_tiles: jax.Array | None = None, pow2_scale: bool = False,
                    interpret: bool | None = None, cache_x: bool = False) -> jax.Array:
    """out[tile t] = lhs[tile t] . rhs[tile_expert[t]] in FP8, with FP8 Dgrad and Wgrad.

    lhs [M, K] rows sorted by expert, each expert's group padded to tiles of tile_m rows;
    rhs [E, K, N]; tile_expert [M // tile_m] int32 (non-decreasing). Tiles at and after
    `used_tiles` (if given) contribute nothing: their output rows are 0 and they add no gradient.
    cache_x: keep lhs for Wgrad as Fprop's FP8 tiles.
    """
    check_grouped_layout(lhs, rhs, tile_expert, tile_m, name="fp8_grouped_dot")
    m = lhs.shape[0]
    opt = _options(implementation, pow2_scale, interpret, out_dtype, cache_x)
    used = jnp.asarray(m // tile_m if used_tiles is None else used_tiles, jnp.int32)
    return _fp8_grouped(lhs, rhs, tile_expert.astype(jnp.int32), used, tile_m, opt)


def _used_rows(used: jax.Array, m: int, tile_m: int) -> jax.Array:
    return jnp.arange(m) < used * tile_m


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _fp8_grouped(lhs, rhs, tile_expert, used, tile_m, opt):
    return _fp8_grouped_fwd(lhs, rhs, tile_expert, used, tile_m, opt)[0]


def _fp8_grouped_fwd(lhs, rhs, tile_expert, used, tile_m, opt):
    w = quantize_weight(rhs, pow2_scale=opt.pow2_scale)                   # [E, Kp, Np] blocks
    ops = fprop_operands(lhs, w, pow2_scale=opt.pow2_x)
    used_rows = _used_rows(used, lhs.shape[0], tile_m)[:, None]
    ops = ops._replace(lhs_scale=jnp.where(used_rows, ops.lhs_scale, 0.0))      # unused: 0
    y = _kernel(opt, "fp8_grouped_gemm")(*ops, tile_expert, tile_m=tile_m,
                                         out_dtype=opt.out_dtype or lhs.dtype)
    # (the cached tiles of unused rows dequantize to 0: their scales are 0)
    return y[:, :rhs.shape[2]], (_cache_x(lhs, ops, opt), _to_bits(w), tile_expert, used,
                                 jnp.zeros((0,), rhs.dtype))


def _fp8_grouped_bwd(tile_m, opt, res, dy_MN):
    x_res, w, tile_expert, used, w_dtype = res
    w = _from_bits(w)
    x_MK, lhs = _uncache_x(x_res)
    e, k = w.q_KN.shape[0], x_MK.shape[1]
    used_rows = _used_rows(used, x_MK.shape[0], tile_m)[:, None]
    dy_MN = jnp.where(used_rows, dy_MN, 0)
    # Unused rows join the last expert's Wgrad chunks (their tile_expert is E-1): zero them in x
    # too, or their values would enter that chunk's 128x1 amax and change the real rows' scales.
    x_MK = jnp.where(used_rows, x_MK, 0)
    dx = _kernel(opt, "fp8_grouped_gemm")(*dgrad_operands(dy_MN, w, pow2_scale=opt.pow2_scale),
                                          tile_expert, tile_m=tile_m, out_dtype=lhs.dtype)[:, :k]
    x_c, dy_c, chunk_expert = wgrad_chunks(x_MK, dy_MN, tile_expert, tile_m=tile_m, num_experts=e)
    ops = wgrad_operands(x_c, dy_c, pow2_scale=opt.pow2_scale, pow2_x=opt.pow2_x)
    dw = _kernel(opt, "fp8_group_wgrad")(*ops, chunk_expert, num_experts=e,
                                         out_dtype=w_dtype.dtype)
    # Under shard_map (expert parallelism) the weights are invariant over the batch axes: their
    # gradient is summed over those (w.scale carries the weights' varying axes).
    return sum_to_vma(dx, lhs), sum_to_vma(dw, w.scale), None, None


_fp8_grouped.defvjp(_fp8_grouped_fwd, _fp8_grouped_bwd)


def _swiglu(gate, up):
    return jax.nn.silu(gate) * up


def fp8_grouped_swiglu_down(gate: jax.Array, up: jax.Array, w_down: jax.Array,
                            tile_expert: jax.Array, *, tile_m: int, implementation: str = "jnp",
                            used_tiles: jax.Array | None = None, pow2_scale: bool = False,
                            interpret: bool | None = None, name: str = "moe_gu") -> jax.Array:
    """down(silu(gate) * up) per tile's expert in FP8, the SwiGLU inputs cached in FP8.

    The report's MoE SwiGLU (§3.3.3 (2)): the forward computes silu(gate) * up from gate and up
    as they are; the backward keeps only their FP8 1x128 tiles (along F) and scales, named
    `name` for remat policies, and recomputes the SwiGLU output from them for the
    down-projection's Wgrad and for the SwiGLU's own gradient.
    gate, up [M, F] in the layout of `fp8_grouped_dot`; w_down [E, F, D].
    """
    check_grouped_layout(gate, w_down, tile_expert, tile_m, name="fp8_grouped_swiglu_down")
    opt = _options(implementation, pow2_scale, interpret, None)
    used = jnp.asarray(gate.shape[0] // tile_m if used_tiles is None else used_tiles, jnp.int32)
    return _fp8_swiglu_down(gate, up, w_down, tile_expert.astype(jnp.int32), used, tile_m, opt,
                            name)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def _fp8_swiglu_down(gate, up, w_down, tile_expert, used, tile_m, opt, name):
    return _fp8_swiglu_down_fwd(gate, up, w_down, tile_expert, used, tile_m, opt, name)[0]


def _fp8_swiglu_down_fwd(gate, up, w_down, tile_expert, used, tile_m, opt, name):
    from jax.ad_checkpoint import checkpoint_name
    y, (_, w, _, _, w_dtype) = _fp8_grouped_fwd(_swiglu(gate, up), w_down, tile_expert, used,
                                                tile_m, opt)
    cached = []
    for a in (gate, up):
        q, scale = quantize_1x128_padded(a, pow2_scale=opt.pow2_scale)
        cached.append(CachedX(checkpoint_name(jax.lax.bitcast_convert_type(q, jnp.uint8), name),
                              checkpoint_name(scale, name), a[:0]))
    return y, (*cached, w, tile_expert, used, w_dtype)


def _fp8_swiglu_down_bwd(tile_m, opt, name, res, dy_MN):
    gate_c, up_c, w, tile_expert, used, w_dtype = res
    (gate, like), (up, _) = _uncache_x(gate_c), _uncache_x(up_c)
    h, swiglu_vjp = jax.vjp(_swiglu, gate.astype(like.dtype), up.astype(like.dtype))
    dh, dw, _, _ = _fp8_grouped_bwd(tile_m, opt, (h, w, tile_expert, used, w_dtype), dy_MN)
    dgate, dup = swiglu_vjp(dh.astype(h.dtype))
    return dgate, dup, dw, None, None


_fp8_swiglu_down.defvjp(_fp8_swiglu_down_fwd, _fp8_swiglu_down_bwd)


def wgrad_chunks(x_MK: jax.Array, dy_MN: jax.Array, tile_expert: jax.Array, *, tile_m: int,
                 num_experts: int):
    """Rows regrouped so each 128-row chunk holds one expert's rows: (x_c, dy_c, chunk_expert).

    Chunk c of x_c / dy_c ([C*128, .]) belongs to expert chunk_expert[c] (non-decreasing);
    expert e's chunks hold its rows in order from its group's first row, zero filled at the end.
    tile_m a multiple of 128 needs no copy (the layout's 128-row blocks already are such chunks).
    """
    m = x_MK.shape[0]
    if tile_m % TILE == 0:
        return x_MK, dy_MN, jnp.repeat(tile_expert, tile_m // TILE)
    tiles = jnp.bincount(tile_expert, length=num_experts)
    rows = tiles * tile_m                                    # rows of each expert's group
    row_start = jnp.cumsum(rows) - rows
    chunks = -(-rows // TILE)
    chunk_end = jnp.cumsum(chunks)
    # sum_e ceil(rows_e/128) <= M/128 + E: a static bound. With tile_m < 128 a chunk also holds
    # >= 1 tile, so there are at most M/tile_m chunks (not so for tile_m > 128, e.g. 192).
    num_chunks = -(-m // TILE) + num_experts
    if tile_m < TILE:
        num_chunks = min(num_chunks, m // tile_m)
    c = jnp.arange(num_chunks)
    chunk_expert = jnp.minimum(jnp.searchsorted(chunk_end, c, side="right"), num_experts - 1)
    r = jnp.arange(num_chunks * TILE)
    e_r = chunk_expert[r // TILE]
    offset = (r // TILE - (chunk_end - chunks)[e_r]) * TILE + r % TILE    # row within the group
    valid = (offset < rows[e_r]) & (r // TILE < chunk_end[-1])
    src = jnp.where(valid, row_start[e_r] + offset, 0)
    gather = lambda a: jnp.where(valid[:, None], a[src], 0).astype(a.dtype)
    return gather(x_MK), gather(dy_MN), chunk_expert.astype(jnp.int32)
