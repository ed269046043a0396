"""MoE local dispatch: permute (tokens -> expert-sorted buffer) and unpermute + gate-weighted
combine (buffer -> tokens), three implementations of each with one signature:
  permute / unpermute_combine                    the Pallas kernels (custom VJPs run kernels)
  permute_jnp / unpermute_combine_jnp            the production jnp path the MoE layer runs off
                                                 the Pallas path: XLA gathers whose custom VJPs
                                                 are gathers too (no scatter-add), shard_map-aware
  permute_reference / unpermute_combine_reference  plain jnp with autodiff: the oracle

Layout (the one `grouped_gemm.py` documents and `dsv3_jax.layers.moe.plan_dispatch` builds):
  x_ND        [N, D]   token rows; every token has P routing slots, slot s = n*P + j.
  src_slot_M  [M]      int32, the slot feeding buffer row r; N*P (or anything outside [0, N*P))
                       marks a padding row, which is all zeros.
  dest_row_NP [N, P]   int32, the buffer row of slot (n, j): the inverse map. A value outside
                       [0, M) means "no row" (a dropped slot) and reads as a zero row.
  gates_NP    [N, P]   gate of each slot.

  permute(x)[r]           = x[src[r] // P]                      (0 for padding rows)
  unpermute_combine(y)[n] = sum_j gates[n, j] * y[dest[n, j]]   (float32 accumulate and output)

Both are gathers, and each one's transpose is a gather through the other map, so no direction
needs a scatter-add (GPU atomics, nondeterministic):
  permute^T:            d_x[n]       = sum_j d_buf[dest[n, j]]         (the combine kernel, gates 1)
  unpermute_combine^T:  d_y[r]       = gates[s] * d_out[s // P], s = src[r]
                                                                     (the permute kernel, scaled)
                        d_gates[n,j] = <d_out[n], y[dest[n, j]]>       (a third, gather-dot kernel)
Every backward runs Pallas kernels. The map a backward needs but the forward was not given
(dest for permute, src for unpermute_combine) may be passed as `dest_row_NP=` / `src_slot_M=`;
otherwise it is rebuilt by inverting the other map (an O(M) int32 scatter-set, no D-wide work).

GPU backend: Pallas Triton (`pl.pallas_call` + `plt.CompilerParams`). A row gather with a
data-dependent row per output row is a pointer-tensor load in Triton, coalesced along D. Mosaic
GPU (the backend `research/pallas_kernels.md` recommends for the GEMMs) has no per-thread gather
on Hopper (TMA gather is sm100-only), so it would need one TMA copy plus barrier bookkeeping per
row; not worth it for a memory-bound copy. Triton is deprecated in jax 0.11 (a
DeprecationWarning at lowering) but present and working in 0.10.2 and 0.11.2; scalar prefetch is
not supported there, so the index vectors are read as ordinary masked loads.

Tiles: a grid over (D blocks, row blocks); block sizes are powers of two (a Triton rule), and
partial row/column tiles are masked, so any N, M, D works.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from kernels_pallas.grouped_gemm import sum_to_vma


# ----------------------------------------------------------------------------------------------
# Tuning
# ----------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class DispatchBlocks:
    """Tile of one program: block_rows output rows x block_d columns (both powers of two).

    Default: 16 x 1024 = 16K elements per program (32 KiB bf16): with 8 warps each thread moves
    64 elements as 16-byte vectors and holds a 64-register float32 accumulator in the combine;
    D=7168 splits into 7 column blocks, so N=8192, P=8 (M ~ 80K rows) gives ~36K programs for
    the permute. Untuned on H200; CANDIDATES is the sweep list
    (benchmarks/moe_dispatch_gpu.py --sweep).
    """
    block_rows: int = 16
    block_d: int = 1024
    num_warps: int = 8

    def __post_init__(self):
        for name in ("block_rows", "block_d"):
            v = getattr(self, name)
            if v < 1 or v & (v - 1):
                raise ValueError(f"{name} must be a power of two, got {v}")


DEFAULT_BLOCKS = DispatchBlocks()
CANDIDATES = tuple(DispatchBlocks(r, d, w) for r, d, w in [
    (8, 1024, 4), (16, 1024, 4), (16, 1024, 8), (32, 512, 4), (32, 1024, 8), (16, 2048, 8),
    (8, 2048, 8)])


def _blocks_for(d: int, blocks: DispatchBlocks | None) -> DispatchBlocks:
    b = blocks or DEFAULT_BLOCKS
    d_pow2 = 1 << max(d - 1, 0).bit_length()           # no wider than D needs
    return dataclasses.replace(b, block_d=min(b.block_d, d_pow2))


def _compiler_params(b: DispatchBlocks):
    return plt.CompilerParams(num_warps=b.num_warps, num_stages=1)   # no loops to pipeline


# ----------------------------------------------------------------------------------------------
# Kernels. Refs are whole arrays (no BlockSpecs): each program computes its own row and column
# indices and masks the tails, so no shape needs to divide by a block.
# ----------------------------------------------------------------------------------------------

def _tile_rows_cols(num_rows: int, d: int, br: int, bd: int):
    # grid = (D blocks, row blocks): neighbouring programs read the same rows' adjacent chunks
    cols = pl.program_id(0) * bd + jnp.arange(bd, dtype=jnp.int32)
    rows = pl.program_id(1) * br + jnp.arange(br, dtype=jnp.int32)
    row_ok = rows < num_rows
    col_ok = cols < d
    return rows, cols, row_ok, col_ok


def _permute_kernel(src_ref, *refs, n, p, m, d, br, bd, scaled):
    """out[r] = scale[src[r]] * x[src[r] // P] over one (row block, D block) tile."""
    if scaled:
        scale_ref, x_ref, o_ref = refs
    else:
        (x_ref, o_ref), scale_ref = refs, None
    rows, cols, row_ok, col_ok = _tile_rows_cols(m, d, br, bd)
    src = plt.load(src_ref.at[rows], mask=row_ok, other=n * p)
    valid = row_ok & (src >= 0) & (src < n * p)
    src = jnp.where(valid, src, 0)
    mask = valid[:, None] & col_ok[None, :]
    vals = plt.load(x_ref.at[jax.lax.div(src, p)[:, None], cols[None, :]], mask=mask, other=0)
    if scaled:
        g = plt.load(scale_ref.at[src], mask=valid, other=0)
        vals = vals.astype(jnp.float32) * g.astype(jnp.float32)[:, None]
    plt.store(o_ref.at[rows[:, None], cols[None, :]], vals.astype(o_ref.dtype),
              mask=row_ok[:, None] & col_ok[None, :])


def _combine_kernel(dest_ref, *refs, n, p, m, d, br, bd, weighted):
    """out[n] = sum_j gate[n, j] * y[dest[n, j]] in float32 over one (token block, D block)."""
    if weighted:
        gate_ref, y_ref, o_ref = refs
    else:
        (y_ref, o_ref), gate_ref = refs, None
    toks, cols, tok_ok, col_ok = _tile_rows_cols(n, d, br, bd)
    acc = jnp.zeros((br, bd), jnp.float32)
    for j in range(p):                                   # P is small and static (top-k)
        slot = toks * p + j
        dest = plt.load(dest_ref.at[slot], mask=tok_ok, other=m)
        valid = tok_ok & (dest >= 0) & (dest < m)
        dest = jnp.where(valid, dest, 0)
        y = plt.load(y_ref.at[dest[:, None], cols[None, :]],
                     mask=valid[:, None] & col_ok[None, :], other=0).astype(jnp.float32)
        if weighted:
            g = plt.load(gate_ref.at[slot], mask=valid, other=0).astype(jnp.float32)
            y = y * g[:, None]
        acc = acc + y
    plt.store(o_ref.at[toks[:, None], cols[None, :]], acc.astype(o_ref.dtype),
              mask=tok_ok[:, None] & col_ok[None, :])


def _gate_grad_kernel(dest_ref, dout_ref, y_ref, o_ref, *, n, p, m, d, br, bd):
    """Partial d_gates over one D block: o[jd, n*P + j] = sum_{d in block} d_out[n,d] y[dest,d]."""
    toks, cols, tok_ok, col_ok = _tile_rows_cols(n, d, br, bd)
    tile_ok = tok_ok[:, None] & col_ok[None, :]
    dout = plt.load(dout_ref.at[toks[:, None], cols[None, :]], mask=tile_ok,
                    other=0).astype(jnp.float32)
    jd = pl.program_id(0)
    for j in range(p):
        slot = toks * p + j
        dest = plt.load(dest_ref.at[slot], mask=tok_ok, other=m)
        valid = tok_ok & (dest >= 0) & (dest < m)
        dest = jnp.where(valid, dest, 0)
        y = plt.load(y_ref.at[dest[:, None], cols[None, :]],
                     mask=valid[:, None] & col_ok[None, :], other=0).astype(jnp.float32)
        plt.store(o_ref.at[jd, slot], jnp.sum(y * dout, axis=1), mask=tok_ok)


# ----------------------------------------------------------------------------------------------
# pallas_call wrappers (no autodiff)
# ----------------------------------------------------------------------------------------------

def _grid(rows: int, d: int, b: DispatchBlocks):
    return (pl.cdiv(d, b.block_d), pl.cdiv(rows, b.block_rows))


def _check_offsets(name: str, *shapes):
    """The kernels address rows as int32 row * D + column: refuse arrays where that wraps
    (M * D >= 2^31, e.g. ~37K tokens x top-8 at D = 7168) instead of reading wrong rows."""
    for rows, d in shapes:
        if rows * d >= 2 ** 31:
            raise ValueError(f"{name}: a [{rows}, {d}] operand has 2^31 or more elements; the "
                             f"kernel's int32 offsets would wrap (split the tokens)")


def _permute_call(x_ND, src_M, p, scale_S, out_dtype, interpret, blocks):
    n, d = x_ND.shape
    m = src_M.shape[0]
    b = _blocks_for(d, blocks)
    if m == 0 or d == 0:
        return jnp.zeros((m, d), out_dtype)
    _check_offsets("moe_permute", (n, d), (m, d))
    scaled = scale_S is not None
    kernel = functools.partial(_permute_kernel, n=n, p=p, m=m, d=d, br=b.block_rows,
                               bd=b.block_d, scaled=scaled)
    args = (src_M.astype(jnp.int32),) + ((scale_S,) if scaled else ()) + (x_ND,)
    return pl.pallas_call(
        kernel, out_shape=jax.ShapeDtypeStruct((m, d), out_dtype), grid=_grid(m, d, b),
        compiler_params=_compiler_params(b), interpret=interpret, name="moe_permute",
    )(*args)


def _combine_call(y_MD, dest_NP, gates_NP, out_dtype, interpret, blocks):
    m, d = y_MD.shape
    n, p = dest_NP.shape
    b = _blocks_for(d, blocks)
    if n == 0 or d == 0:
        return jnp.zeros((n, d), out_dtype)
    _check_offsets("moe_combine", (n, d), (m, d))
    weighted = gates_NP is not None
    kernel = functools.partial(_combine_kernel, n=n, p=p, m=m, d=d, br=b.block_rows,
                               bd=b.block_d, weighted=weighted)
    args = ((dest_NP.reshape(-1).astype(jnp.int32),)
            + ((gates_NP.reshape(-1).astype(jnp.float32),) if weighted else ()) + (y_MD,))
    return pl.pallas_call(
        kernel, out_shape=jax.ShapeDtypeStruct((n, d), out_dtype), grid=_grid(n, d, b),
        compiler_params=_compiler_params(b), interpret=interpret, name="moe_combine",
    )(*args)


def _gate_grad_call(y_MD, dest_NP, d_ND, interpret, blocks):
    m, d = y_MD.shape
    n, p = dest_NP.shape
    b = _blocks_for(d, blocks)
    if n == 0 or d == 0:
        return jnp.zeros((n, p), jnp.float32)
    _check_offsets("moe_gate_grad", (n, d), (m, d))
    grid = _grid(n, d, b)
    kernel = functools.partial(_gate_grad_kernel, n=n, p=p, m=m, d=d, br=b.block_rows,
                               bd=b.block_d)
    partial_JS = pl.pallas_call(
        kernel, out_shape=jax.ShapeDtypeStruct((grid[0], n * p), jnp.float32), grid=grid,
        compiler_params=_compiler_params(b), interpret=interpret, name="moe_gate_grad",
    )(dest_NP.reshape(-1).astype(jnp.int32), d_ND, y_MD)
    return partial_JS.sum(0).reshape(n, p)       # fixed-order sum over D blocks: deterministic


def invert_src_slots(src_slot_M: jax.Array, num_tokens: int, p: int) -> jax.Array:
    """dest_row_NP from src_slot_M: dest[src[r]] = r; slots no row reads get M ("no row")."""
    m = src_slot_M.shape[0]
    src = jnp.where(src_slot_M >= 0, src_slot_M, num_tokens * p)   # .at[] would wrap negatives
    dest = jnp.full((num_tokens * p,), m, jnp.int32)
    return dest.at[src].set(jnp.arange(m, dtype=jnp.int32), mode="drop").reshape(num_tokens, p)


def invert_dest_rows(dest_row_NP: jax.Array, num_rows: int) -> jax.Array:
    """src_slot_M from dest_row_NP: src[dest[s]] = s; rows no slot lands in get N*P (padding)."""
    s = dest_row_NP.size
    dest = jnp.where(dest_row_NP >= 0, dest_row_NP, num_rows).reshape(-1)
    src = jnp.full((num_rows,), s, jnp.int32)
    return src.at[dest].set(jnp.arange(s, dtype=jnp.int32), mode="drop")


# ----------------------------------------------------------------------------------------------
# permute
# ----------------------------------------------------------------------------------------------

def permute_reference(x_ND: jax.Array, src_slot_M: jax.Array, num_slots_per_token: int, *,
                      interpret: bool = False, dest_row_NP: jax.Array | None = None,
                      blocks: DispatchBlocks | None = None) -> jax.Array:
    """Plain jnp: out[r] = x[src[r] // P], zero rows where src[r] is outside [0, N*P).
    (`interpret`, `dest_row_NP`, `blocks` only mirror the kernel's signature.)"""
    del interpret, dest_row_NP, blocks
    n = x_ND.shape[0]
    p = num_slots_per_token
    valid = (src_slot_M >= 0) & (src_slot_M < n * p)
    tok = jnp.where(valid, src_slot_M // p, n)
    return jnp.take(x_ND, tok, axis=0, mode="fill", fill_value=0)


def permute(x_ND: jax.Array, src_slot_M: jax.Array, num_slots_per_token: int, *,
            interpret: bool = False, dest_row_NP: jax.Array | None = None,
            blocks: DispatchBlocks | None = None) -> jax.Array:
    """Token rows -> expert-sorted buffer [M, D], as a Pallas gather kernel.

    dest_row_NP: the inverse map, used by the backward; rebuilt from src_slot_M when omitted.
    """
    if dest_row_NP is not None:
        dest_row_NP = dest_row_NP.astype(jnp.int32)
    return _permute_vjp(x_ND, src_slot_M.astype(jnp.int32), dest_row_NP, num_slots_per_token,
                        interpret, blocks)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _permute_vjp(x_ND, src_M, dest_NP, p, interpret, blocks):
    return _permute_call(x_ND, src_M, p, None, x_ND.dtype, interpret, blocks)


def _permute_fwd(x_ND, src_M, dest_NP, p, interpret, blocks):
    out = _permute_call(x_ND, src_M, p, None, x_ND.dtype, interpret, blocks)
    if dest_NP is None:                   # only differentiation pays for the inverse map
        dest_NP = invert_src_slots(src_M, x_ND.shape[0], p)
    return out, dest_NP


def _permute_bwd(p, interpret, blocks, dest_NP, d_MD):
    # each token's gradient is the (float32) sum of its P buffer rows: the combine, gates = 1.
    # d_MD has the output's dtype, which is x's.
    d_x = _combine_call(d_MD, dest_NP, None, d_MD.dtype, interpret, blocks)
    return d_x, None, None


_permute_vjp.defvjp(_permute_fwd, _permute_bwd)


# ----------------------------------------------------------------------------------------------
# unpermute + combine
# ----------------------------------------------------------------------------------------------

def unpermute_combine_reference(y_MD: jax.Array, dest_row_NP: jax.Array, gates_NP: jax.Array, *,
                                interpret: bool = False, src_slot_M: jax.Array | None = None,
                                blocks: DispatchBlocks | None = None) -> jax.Array:
    """Plain jnp: out[n] = sum_j gates[n, j] * y[dest[n, j]] in float32 (products and sums
    elementwise, so no matmul-precision setting applies); dest outside [0, M) reads zero."""
    del interpret, src_slot_M, blocks
    y_NPD = jnp.take(y_MD, dest_row_NP, axis=0, mode="fill", fill_value=0)
    return (y_NPD.astype(jnp.float32) * gates_NP.astype(jnp.float32)[:, :, None]).sum(1)


def unpermute_combine(y_MD: jax.Array, dest_row_NP: jax.Array, gates_NP: jax.Array, *,
                      interpret: bool = False, src_slot_M: jax.Array | None = None,
                      blocks: DispatchBlocks | None = None) -> jax.Array:
    """Buffer rows back to tokens, gate-weighted and summed over the P slots; float32 [N, D].

    src_slot_M: the inverse map, used by the backward; rebuilt from dest_row_NP when omitted.
    """
    if src_slot_M is not None:
        src_slot_M = src_slot_M.astype(jnp.int32)
    return _combine_vjp(y_MD, dest_row_NP.astype(jnp.int32), gates_NP, src_slot_M, interpret,
                        blocks)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _combine_vjp(y_MD, dest_NP, gates_NP, src_M, interpret, blocks):
    return _combine_call(y_MD, dest_NP, gates_NP, jnp.float32, interpret, blocks)


def _combine_fwd(y_MD, dest_NP, gates_NP, src_M, interpret, blocks):
    out = _combine_call(y_MD, dest_NP, gates_NP, jnp.float32, interpret, blocks)
    if src_M is None:                     # only differentiation pays for the inverse map
        src_M = invert_dest_rows(dest_NP, y_MD.shape[0])
    return out, (y_MD, dest_NP, gates_NP, src_M)


def _combine_bwd(interpret, blocks, res, d_ND):
    y_MD, dest_NP, gates_NP, src_M = res
    p = dest_NP.shape[1]
    # buffer row r came from slot s = src[r] = n*P + j: its gradient is gates[n, j] * d_out[n]
    d_y = _permute_call(d_ND, src_M, p, gates_NP.reshape(-1).astype(jnp.float32), y_MD.dtype,
                        interpret, blocks)
    d_gates = _gate_grad_call(y_MD, dest_NP, d_ND, interpret, blocks)
    return d_y, None, d_gates.astype(gates_NP.dtype), None


_combine_vjp.defvjp(_combine_fwd, _combine_bwd)


# ----------------------------------------------------------------------------------------------
# The production jnp path (the MoE layer without Pallas): gathers both ways
# ----------------------------------------------------------------------------------------------
# Both maps are gathers, and each one's transpose is a gather through the other map, so neither
# direction needs a scatter-add (slow on CPU, atomics on GPU). Unlike the kernels, both maps
# must be given (the layer's plan has them). Cotangents are summed over the shard_map axes
# along which their primal is invariant (expert parallelism).

def _gather_rows(x, idx):
    """x[idx] with out-of-range idx (the padding sentinel) giving zero rows."""
    return jnp.take(x, idx, axis=0, mode="fill", fill_value=0)


def permute_jnp(x_ND: jax.Array, src_slot_M: jax.Array, num_slots_per_token: int, *,
                dest_row_NP: jax.Array, interpret: bool = False,
                blocks: DispatchBlocks | None = None) -> jax.Array:
    """Token rows -> expert-sorted buffer [M, D] (padding rows are zero), an XLA gather whose
    backward gathers each token's P buffer rows through dest_row_NP.
    (`interpret`, `blocks` only mirror the kernel's signature.)"""
    del interpret, blocks
    if dest_row_NP.shape[1] != num_slots_per_token:
        raise ValueError(f"dest_row_NP {dest_row_NP.shape} does not have "
                         f"{num_slots_per_token} slots per token")
    return _permute_jnp(x_ND, src_slot_M, dest_row_NP)


@jax.custom_vjp
def _permute_jnp(x_ND, src_M, dest_NP):
    p = dest_NP.shape[1]
    return _gather_rows(x_ND, jnp.where(src_M < x_ND.shape[0] * p, src_M // p, x_ND.shape[0]))


def _permute_jnp_fwd(x_ND, src_M, dest_NP):
    return _permute_jnp(x_ND, src_M, dest_NP), (dest_NP, x_ND)


def _permute_jnp_bwd(res, d_MD):
    dest_NP, x_ND = res
    # each token's gradient is the sum of its P buffer rows
    return sum_to_vma(_gather_rows(d_MD, dest_NP).sum(1), x_ND), None, None


_permute_jnp.defvjp(_permute_jnp_fwd, _permute_jnp_bwd)


def unpermute_combine_jnp(y_MD: jax.Array, dest_row_NP: jax.Array, gates_NP: jax.Array, *,
                          src_slot_M: jax.Array, interpret: bool = False,
                          blocks: DispatchBlocks | None = None) -> jax.Array:
    """Buffer rows back to tokens, weighted by the gates and summed over the top-k slots (in the
    gates' dtype), with a gather backward through src_slot_M.
    (`interpret`, `blocks` only mirror the kernel's signature.)"""
    del interpret, blocks
    return _combine_jnp(y_MD, dest_row_NP, gates_NP, src_slot_M)


@jax.custom_vjp
def _combine_jnp(y_MD, dest_NP, gates_NP, src_M):
    y_NPD = _gather_rows(y_MD, dest_NP)
    return jnp.einsum("NPD,NP->ND", y_NPD.astype(gates_NP.dtype), gates_NP)


def _combine_jnp_fwd(y_MD, dest_NP, gates_NP, src_M):
    return _combine_jnp(y_MD, dest_NP, gates_NP, src_M), (y_MD, dest_NP, gates_NP, src_M)


def _combine_jnp_bwd(res, d_ND):
    y_MD, dest_NP, gates_NP, src_M = res
    n, p = gates_NP.shape
    d_gates = jnp.einsum("NPD,ND->NP", _gather_rows(y_MD, dest_NP).astype(d_ND.dtype), d_ND)
    # buffer row r came from slot src[r] = token*P + j: its gradient is g[token, j] * d[token]
    scaled = (d_ND[:, None, :] * gates_NP[:, :, None]).reshape(n * p, -1)
    d_y = _gather_rows(scaled, src_M).astype(y_MD.dtype)
    return (sum_to_vma(d_y, y_MD), None, sum_to_vma(d_gates.astype(gates_NP.dtype), gates_NP),
            None)


_combine_jnp.defvjp(_combine_jnp_fwd, _combine_jnp_bwd)
