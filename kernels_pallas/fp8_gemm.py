"""Block-scaled FP8 GEMMs of the DeepSeek-V3 recipe (report §3.3), as Pallas Mosaic GPU kernels.

Semantics (shared by every kernel and its `*_reference`), "NT" layout: both operands keep the
contraction dimension K minor, as FP8 wgmma requires.
  lhs        [M, K]  float8_e4m3fn        lhs_scale  [M, K/128]  float32
  rhs        [N, K]  float8_e4m3fn        rhs_scale  [N, K/128] (one per row) or
                                                     [ceil(N/128), K/128] (128x128 blocks)
  out[m, n] = sum_c ( sum_{k in chunk c} lhs[m, k] * rhs[n, k] ) * lhs_scale[m, c] * rhs_scale[n, c]
Every 128-wide K chunk is accumulated on the tensor cores, then promoted to an FP32 register
accumulator with both scales applied ("N_C = 128"). K must be a multiple of 128 (the quantizers
in `dsv3_jax.fp8` pad it with zeros); M and N are padded here to whole CTA tiles and cropped.
The scale is the dequantization multiplier ("scale_inv" in the checkpoint): value = fp8 * scale.

Kernels:
  fp8_gemm            dense: Fprop x.W, Dgrad dy.W^T and Wgrad x^T.dy of `dsv3_jax.fp8`.
  fp8_grouped_gemm    MoE routed experts, the layout of `grouped_gemm.py`: rows sorted by expert
                      and padded to tiles of `tile_m`; tile t uses rhs[tile_expert[t]]. Fprop and
                      Dgrad of the experts.
  fp8_group_wgrad     the experts' Wgrad: out[e] = sum over e's 128-row chunks of lhs^T.rhs, the
                      contraction (tokens) split by expert ("k-grouped"); chunk c belongs to
                      expert chunk_expert[c] and experts own consecutive chunks.

Backend: Pallas **Mosaic GPU** (`plgpu.kernel`, Warpgroup semantics), chosen on the evidence of
`shared/research/pallas_kernels.md`: it exposes wgmma + TMA + warp specialization, which a
DeepGEMM-style kernel needs to beat bf16 by ~1.5x, while Pallas Triton is deprecated in jax 0.11
and its block-FP8 kernels reach 40-80 % of DeepGEMM. The dense/grouped kernel is the
DeepGEMM structure: a persistent grid over (M, N) CTA tiles, one TMA warpgroup feeding two
compute warpgroups through a `max_concurrent_steps`-deep SMEM ring, per K chunk a fresh wgmma
accumulator that is scaled and added into the FP32 register carry (one warpgroup promotes while
the other's wgmma runs). The Wgrad kernel uses the plain `emit_pipeline`, whose grid may be
dynamic (an expert's chunk count), as jax's `transposed_ragged_dot_mgpu` does.

Mosaic GPU facts this code relies on (probed in `shared/research/pallas_probes/`):
  * FP8 wgmma operands must be K-major: B is stored [N, K] and passed transposed (`ref.T`).
  * Interpret mode (`InterpretGPUParams`) cannot run wgmma on transposed refs, `plgpu.load` or
    `layout_cast`, so `interpret=True` swaps exactly those for plain ref reads and `jnp.dot`; the
    pipeline, tiling, indexing and epilogue are the GPU code. `.lower(lowering_platforms=("cuda",))`
    on CPU checks the real lowering (see tests/test_fp8_gemm.py).
  * Per-row / per-column scale vectors are loaded in the WGMMA row / column layouts and widened
    with `lax.broadcast_in_dim` (`x * s[:, None]` fails layout inference).
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from kernels_pallas.grouped_gemm import check_grouped_layout, zeros_varying_like

CHUNK_K = 128          # scale granularity along K = the promotion interval N_C = one TMA box
WG_ROWS = 64           # rows of one warpgroup's wgmma
MIN_TILE_M = 8         # fewest rows of a grouped tile (the epilogue stores whole 8-row groups)
SMEM_BYTES = 227 * 1024
F32 = jnp.float32


# ----------------------------------------------------------------------------------------------
# Tuning and named shapes
# ----------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Fp8GemmConfig:
    """CTA tile, warpgroup layout and pipeline depth. Untuned on H200; `CANDIDATES` is the sweep.

    wg_split "m" / "n": warp specialized, one TMA warpgroup feeding two compute warpgroups stacked
    along M / N. "single": one warpgroup issues the TMA copies and wgmma itself (the plain
    pipeline); interpret mode runs this one (see `default_config`).
    Default "m" with block_n 128: CTA 128 x 128 (DeepGEMM's BLOCK_M=128); a warpgroup holds a
    64x128 f32 carry plus a fresh 64x128 wgmma accumulator (128 registers/thread; 64x256 would
    spill). Four stages of 33 KiB fit SMEM next to the epilogue buffers.
    """
    block_n: int = 128               # columns per compute warpgroup (multiple of 64, <= 192)
    wg_split: str = "m"              # "m" | "n" | "single"
    max_concurrent_steps: int = 4    # SMEM ring depth (lowered automatically to fit SMEM)
    grid_tile_width: int = 8         # planar-snake band width (in tiles) for L2 reuse
    num_sms: int | None = None       # persistent grid size; None = the device's SM count

    @property
    def warp_specialized(self) -> bool:
        return self.wg_split != "single"

    @property
    def cta_m(self) -> int:
        return WG_ROWS * (2 if self.wg_split == "m" else 1)

    @property
    def cta_n(self) -> int:
        return self.block_n * (2 if self.wg_split == "n" else 1)


CANDIDATES = tuple(Fp8GemmConfig(block_n=bn, wg_split=s, max_concurrent_steps=st, grid_tile_width=w)
                   for bn in (128, 192) for s in ("m", "n", "single") for st in (4, 6)
                   for w in (4, 16) if not (bn == 192 and s == "n"))


def default_config(n: int, *, tile_m: int | None = None, interpret: bool = False) -> Fp8GemmConfig:
    """Fewest padded columns of N (128 wide on a tie); compute warpgroups along N when a grouped
    tile has under 128 rows (along M the second one would compute rows of the next tile and
    drop them).

    Interpret mode uses "single": jax 0.10's GPU interpreter runs a block's three warpgroup
    threads as executions on one CPU device, which PjRt may serialize, so a warp-specialized
    kernel can deadlock there (the N split always did; it is correct with the threads on separate
    CPU devices, see tests/test_fp8_gemm.py).
    """
    if interpret:
        split = "single"
    else:
        split = "n" if tile_m is not None and tile_m < 2 * WG_ROWS else "m"
    # 128 on a tie: a 64x192 f32 carry plus a fresh 64x192 wgmma accumulator take 192 of the
    # 232 registers setmaxnreg gives a compute warpgroup, so 192 risks spills; keep it for N it
    # pads less (576 = 3 x 192).
    widths = (128,) if split == "n" else (128, 192)
    block_n = min(widths, key=lambda bn: (_round_up(n, bn * (1 + (split == "n"))), bn))
    return Fp8GemmConfig(block_n=block_n, wg_split=split)


# GEMM shapes (M, K, N) shared with tests/test_fp8_gemm.py and benchmarks/fp8_gemm_gpu.py.
# The 671B model's projections at 4096 tokens with K = 7168 (q_a 1536, kv_a 576, q_b-sized
# 24576, dense MLP 18432, routed expert 2048); the benchmark also times their backward GEMMs,
# Dgrad [M, N] . [N, K] and Wgrad [K, M] . [M, N].
DSV3_671B_FPROP = tuple((4096, 7168, n) for n in (1536, 576, 24576, 18432, 2048))
SQUARE_SHAPES = ((4096, 4096, 4096), (8192, 8192, 8192))
# CI-sized: ragged M, N and K (padded to 128 by the quantizer), N = 576's 64-multiple case.
SMALL_SHAPES = ((256, 384, 200), (200, 256, 576), (130, 128, 72))

# ----------------------------------------------------------------------------------------------
# Plain-jnp references (same signatures as the kernels)
# ----------------------------------------------------------------------------------------------

def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def row_scales(scale: jax.Array, rows: int) -> jax.Array:
    """[rows, K/128] per-row scales from per-row or 128-row-block scales ([ceil(rows/128), K/128])."""
    if scale.shape[-2] == rows:
        return scale.astype(F32)
    return jnp.repeat(scale.astype(F32), CHUNK_K, axis=-2)[..., :rows, :]


def dequantize(q: jax.Array, scale: jax.Array) -> jax.Array:
    """FP32 values of a K-major operand: q[..., r, k] * scale[..., r, k // 128]."""
    *lead, rows, k = q.shape
    s = row_scales(scale, rows)
    chunks = q.astype(F32).reshape(*lead, rows, k // CHUNK_K, CHUNK_K)
    return (chunks * s[..., None]).reshape(*lead, rows, k)


def _check_k(lhs, rhs):
    if lhs.shape[-1] != rhs.shape[-1] or lhs.shape[-1] % CHUNK_K:
        raise ValueError(f"contraction dims {lhs.shape[-1]}, {rhs.shape[-1]} must match and be a "
                         f"multiple of {CHUNK_K} (pad with zeros when quantizing)")


def fp8_gemm_reference(lhs: jax.Array, lhs_scale: jax.Array, rhs: jax.Array,
                       rhs_scale: jax.Array, *, out_dtype=jnp.bfloat16,
                       config: Fp8GemmConfig | None = None, interpret: bool = False) -> jax.Array:
    """Dequantize, then one FP32 dot. Equal to the chunked formula in exact arithmetic: each
    scale is constant over its 128-chunk, so it factors out of the chunk's sum; only the FP32
    summation order differs (~1e-7 relative). `config`/`interpret` mirror the kernel."""
    del config, interpret
    _check_k(lhs, rhs)
    out = jnp.dot(dequantize(lhs, lhs_scale), dequantize(rhs, rhs_scale).T,
                  precision=lax.Precision.HIGHEST)
    return out.astype(out_dtype)


def fp8_grouped_gemm_reference(lhs: jax.Array, lhs_scale: jax.Array, rhs: jax.Array,
                               rhs_scale: jax.Array, tile_expert: jax.Array, *, tile_m: int,
                               out_dtype=jnp.bfloat16, config: Fp8GemmConfig | None = None,
                               interpret: bool = False) -> jax.Array:
    """out[tile t] = deq(lhs[tile t]) . deq(rhs[tile_expert[t]])^T, a scan over tiles (memory
    O(M*N); gathering [tiles, N, K] weights would not fit at model scale)."""
    del config, interpret
    _check_grouped(lhs, rhs, tile_expert, tile_m)
    m, k = lhs.shape
    w_ENK = dequantize(rhs, rhs_scale)
    x_TMK = dequantize(lhs, lhs_scale).reshape(m // tile_m, tile_m, k)

    def tile(_, xs):
        x_MK, e = xs
        return None, jnp.dot(x_MK, w_ENK[e].T, precision=lax.Precision.HIGHEST).astype(out_dtype)

    _, out = lax.scan(tile, None, (x_TMK, tile_expert))
    return out.reshape(m, rhs.shape[1])


def fp8_group_wgrad_reference(lhs_t: jax.Array, lhs_t_scale: jax.Array, rhs_t: jax.Array,
                              rhs_t_scale: jax.Array, chunk_expert: jax.Array, *,
                              num_experts: int, out_dtype=jnp.float32,
                              config: Fp8GemmConfig | None = None,
                              interpret: bool = False) -> jax.Array:
    """out[e] = sum_{c: chunk_expert[c] = e} deq(lhs_t[:, c]) . deq(rhs_t[:, c])^T  -> [E, K, N].

    lhs_t [K, C*128] and rhs_t [N, C*128] are the transposed activations / gradients, K-major in
    the token dimension, with 1x128 scales along it ([K, C], [N, C]). Experts with no chunk get 0.
    """
    del config, interpret
    _check_k(lhs_t, rhs_t)
    k, n = lhs_t.shape[0], rhs_t.shape[0]
    x_KCT = dequantize(lhs_t, lhs_t_scale).reshape(k, -1, CHUNK_K)
    g_NCT = dequantize(rhs_t, rhs_t_scale).reshape(n, -1, CHUNK_K)

    def chunk(c, dw_EKN):
        part = jnp.dot(x_KCT[:, c], g_NCT[:, c].T, precision=lax.Precision.HIGHEST)
        return dw_EKN.at[chunk_expert[c]].add(part)

    # The carry varies over the same shard_map axes as the operands (expert parallelism).
    init = zeros_varying_like((num_experts, k, n), F32, lhs_t, rhs_t, chunk_expert)
    dw = lax.fori_loop(0, chunk_expert.shape[0], chunk, init)
    return dw.astype(out_dtype)


def _check_grouped(lhs, rhs, tile_expert, tile_m):
    _check_k(lhs, rhs)
    check_grouped_layout(lhs, rhs, tile_expert, tile_m, rhs_k_axis=2, name="fp8_grouped_gemm")


# ----------------------------------------------------------------------------------------------
# Mosaic GPU helpers (jax 0.10 / 0.11 differences live here)
# ----------------------------------------------------------------------------------------------

def _interpret_params():
    params = getattr(plgpu, "InterpretGPUParams", None)      # public from jax 0.11
    if params is None:
        from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams as params
    return params()


def _compiler_kwargs(interpret: bool) -> dict:
    if interpret:
        return dict(interpret=_interpret_params())
    return dict(compiler_params=plgpu.CompilerParams(
        lowering_semantics=plgpu.LoweringSemantics.Warpgroup))   # the default only from 0.11


def _load(ref, layout, interpret):
    """A scale vector from SMEM in a wgmma layout (a plain read in interpret mode)."""
    if interpret:
        return ref[...]
    try:
        return plgpu.load(ref, layout=layout)                # jax >= 0.11
    except TypeError:
        return plgpu.load(ref, (), layout=layout)            # jax 0.10: the index is positional


def _chunk_product(a_smem, b_smem, interpret):
    """sum_k a[m, k] b[n, k] over one 128-wide chunk, in a fresh f32 wgmma accumulator."""
    if interpret:        # the interpreter cannot run wgmma on a transposed ref
        return jnp.dot(a_smem[...].astype(F32), b_smem[...].astype(F32).T)

    def mma(acc_ref):
        plgpu.wgmma(acc_ref, a_smem, b_smem.T)               # FP8 B must be K-major: [N, K].T
        return acc_ref[...]                                  # reading the ACC waits for wgmma
    return pl.run_scoped(mma, plgpu.ACC((a_smem.shape[0], b_smem.shape[0]), F32))


def _zeros_acc(shape, interpret):
    z = jnp.zeros(shape, F32)
    return z if interpret else plgpu.layout_cast(z, plgpu.Layout.WGMMA)


_ROW = plgpu.Layout.WGMMA.reduce(1)       # a vector along the accumulator's rows
_COL = plgpu.Layout.WGMMA.reduce(0)       # ... along its columns
_FP8_TRANSFORMS = (plgpu.TilingTransform((8, CHUNK_K)), plgpu.SwizzleTransform(128))


def _promote(rows, cols, interpret):
    """Pipeline body: one K chunk's product, scaled by both scale vectors, added to the carry."""
    def body(_, a_smem, as_smem, b_smem, bs_smem, acc):
        part = _chunk_product(a_smem.at[rows], b_smem.at[cols], interpret)
        sa = _load(as_smem.at[0, rows], _ROW, interpret)
        sb = _load(bs_smem.at[0, cols], _COL, interpret)
        shape = part.shape      # s[:, None] fails layout inference; broadcast_in_dim works
        scale = lax.broadcast_in_dim(sa, shape, [0]) * lax.broadcast_in_dim(sb, shape, [1])
        return acc + part * scale
    return body


def _chunk_specs(a_rows, b_rows, chunk):
    """Blocks of K chunk `chunk(step)` of the four operands, each already sliced to its rows:
    lhs [rows, K] / rhs [rows, K] FP8, and their scales stored K-outer ([K/128, rows]) so one
    chunk's scales are a contiguous TMA row."""
    def fp8(rows):
        return plgpu.BlockSpec((rows, CHUNK_K), lambda c: (0, chunk(c)),
                               transforms=_FP8_TRANSFORMS, memory_space=plgpu.SMEM)

    def scale(rows):
        return plgpu.BlockSpec((1, rows), lambda c: (chunk(c), 0), memory_space=plgpu.SMEM)
    return [fp8(a_rows), scale(a_rows), fp8(b_rows), scale(b_rows)]


def _store(o_smem, acc, dst, rows):
    """Epilogue: registers -> SMEM -> TMA store of the first `rows` rows into `dst`."""
    plgpu.wait_smem_to_gmem(0, wait_read_only=True)     # the previous tile's store left o_smem
    o_smem[...] = acc.astype(o_smem.dtype)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(o_smem.at[pl.ds(0, rows)], dst)


def _num_sms(cfg: Fp8GemmConfig, interpret: bool) -> int:
    if cfg.num_sms is not None:
        return cfg.num_sms
    if interpret:
        return 2
    dev = jax.devices()[0]
    return dev.core_count if dev.platform == "gpu" else 132     # 132: H100/H200 (CPU lowering)


def _fit_steps(cfg: Fp8GemmConfig, out_dtype) -> int:
    """Largest ring depth <= the configured one whose buffers fit in SMEM."""
    stage = (cfg.cta_m + cfg.cta_n) * (CHUNK_K + 4)             # FP8 tiles + f32 scale rows
    epilogue = (2 if cfg.warp_specialized else 1) * WG_ROWS * cfg.block_n * jnp.dtype(out_dtype).itemsize
    fit = (SMEM_BYTES - epilogue - 2048) // stage
    if fit < 2:
        raise ValueError(f"{cfg} does not fit in SMEM with {jnp.dtype(out_dtype).name} output")
    return int(min(cfg.max_concurrent_steps, fit))


# ----------------------------------------------------------------------------------------------
# Dense / grouped kernel: a persistent grid over CTA tiles, one expert per CTA row block
# ----------------------------------------------------------------------------------------------

def _tiles_kernel(block_expert, a_gmem, as_gmem, b_gmem, bs_gmem, o_gmem, *, cfg, steps,
                  row_stride, rows_out, interpret):
    """CTA row block i reads rows [i*row_stride, +cta_m) of lhs against rhs[block_expert[i]] and
    writes its first `rows_out` rows (< cta_m only for grouped tiles of under 128 rows)."""
    cta_m, cta_n, bn = cfg.cta_m, cfg.cta_n, cfg.block_n
    m_blocks, n_blocks = block_expert.shape[0], o_gmem.shape[1] // cta_n
    k_steps = a_gmem.shape[1] // CHUNK_K
    rows_kept = min(WG_ROWS, rows_out)          # rows each storing warpgroup writes
    specs = _chunk_specs(cta_m, cta_n, lambda c: c)

    def cta_operands(mi, ni):
        row0, col0, e = mi * row_stride, ni * cta_n, block_expert[mi]
        return (a_gmem.at[pl.ds(row0, cta_m)], as_gmem.at[:, pl.ds(row0, cta_m)],
                b_gmem.at[e, pl.ds(col0, cta_n)], bs_gmem.at[e, :, pl.ds(col0, cta_n)])

    def tiles(body):        # the persistent loop, in an L2-friendly order
        @plgpu.nd_loop((m_blocks * n_blocks,), collective_axes="sm")
        def _(info):
            body(*plgpu.planar_snake(info.index[0], (m_blocks, n_blocks), 1, cfg.grid_tile_width))

    if not cfg.warp_specialized:
        @functools.partial(pl.run_scoped, o_smem=plgpu.SMEM((WG_ROWS, bn), o_gmem.dtype))
        def _(o_smem):
            @tiles
            def _(mi, ni):
                acc = plgpu.emit_pipeline(
                    _promote(slice(None), slice(None), interpret), grid=(k_steps,),
                    in_specs=specs, max_concurrent_steps=steps,
                    init_carry=_zeros_acc((WG_ROWS, bn), interpret))(*cta_operands(mi, ni))
                _store(o_smem, acc, o_gmem.at[pl.ds(mi * row_stride, rows_kept),
                                              pl.ds(ni * cta_n, bn)], rows_kept)
        plgpu.wait_smem_to_gmem(0, wait_read_only=True)
        return

    split_m = cfg.wg_split == "m"

    def pipeline(body, context):
        return plgpu.emit_pipeline_warp_specialized(
            body, grid=(k_steps,), in_specs=specs, memory_registers=40, wg_axis="wg",
            num_compute_wgs=2, max_concurrent_steps=steps, compute_context=context)

    ignore = lambda *_, **__: None
    allocs = pipeline(ignore, ignore).get_allocations(*cta_operands(0, 0))

    @functools.partial(pl.run_scoped, allocs=allocs, collective_axes="wg",
                       o_smem=plgpu.SMEM((2, WG_ROWS, bn), o_gmem.dtype))
    def _(allocs, o_smem):
        wg = lax.axis_index("wg")
        rows = pl.ds(wg * WG_ROWS, WG_ROWS) if split_m else pl.ds(0, WG_ROWS)
        cols = pl.ds(0, bn) if split_m else pl.ds(wg * bn, bn)

        @tiles
        def _(mi, ni):
            dst = o_gmem.at[pl.ds(mi * row_stride + rows.start, rows_kept),
                            pl.ds(ni * cta_n + cols.start, bn)]

            def context(run):
                acc = run(_zeros_acc((WG_ROWS, bn), interpret))
                store = lambda: _store(o_smem.at[wg], acc, dst, rows_kept)
                if split_m and rows_out < cta_m:   # a tile of <= 64 rows is warpgroup 0's
                    pl.when(wg == 0)(store)
                else:
                    store()

            pipeline(_promote(rows, cols, interpret), context)(*cta_operands(mi, ni),
                                                               allocations=allocs)

    plgpu.wait_smem_to_gmem(0, wait_read_only=True)


def _run_tiles(lhs, lhs_scale, rhs, rhs_scale, block_expert, *, row_stride, rows_out,
               out_rows, out_dtype, cfg, interpret):
    """Pads to whole CTA tiles, lays the scales out K-outer for TMA, launches, crops."""
    m, k = lhs.shape
    e, n, _ = rhs.shape
    n_pad = _round_up(n, cfg.cta_n)
    m_pad = (block_expert.shape[0] - 1) * row_stride + cfg.cta_m         # the last block's reads
    lhs = jnp.pad(lhs, ((0, m_pad - m), (0, 0)))
    as_KM = jnp.pad(lhs_scale.astype(F32), ((0, m_pad - m), (0, 0))).T
    rhs = jnp.pad(rhs, ((0, 0), (0, n_pad - n), (0, 0)))
    bs_EKN = jnp.pad(row_scales(rhs_scale, n), ((0, 0), (0, n_pad - n), (0, 0))).transpose(0, 2, 1)
    kernel = functools.partial(_tiles_kernel, cfg=cfg, steps=_fit_steps(cfg, out_dtype),
                               row_stride=row_stride, rows_out=rows_out, interpret=interpret)
    threads = dict(num_threads=3, thread_name="wg") if cfg.warp_specialized else {}
    out_type = jax.ShapeDtypeStruct((block_expert.shape[0] * row_stride, n_pad), out_dtype)
    out = plgpu.kernel(kernel, out_type=out_type, grid=(_num_sms(cfg, interpret),),
                       grid_names=("sm",), **threads, **_compiler_kwargs(interpret),
                       )(block_expert.astype(jnp.int32), lhs, as_KM, rhs, bs_EKN)
    return out[:out_rows, :n]


def fp8_gemm(lhs: jax.Array, lhs_scale: jax.Array, rhs: jax.Array, rhs_scale: jax.Array, *,
             out_dtype=jnp.bfloat16, config: Fp8GemmConfig | None = None,
             interpret: bool = False) -> jax.Array:
    """[M, K] x [N, K] -> [M, N], block-scaled FP8 (see the module docstring)."""
    _check_k(lhs, rhs)
    cfg = config or default_config(rhs.shape[0], interpret=interpret)
    m = lhs.shape[0]
    blocks = jnp.zeros((-(-m // cfg.cta_m),), jnp.int32)            # one "expert"
    return _run_tiles(lhs, lhs_scale, rhs[None], rhs_scale[None], blocks, row_stride=cfg.cta_m,
                      rows_out=cfg.cta_m, out_rows=m, out_dtype=out_dtype, cfg=cfg,
                      interpret=interpret)


def fp8_grouped_gemm(lhs: jax.Array, lhs_scale: jax.Array, rhs: jax.Array,
                     rhs_scale: jax.Array, tile_expert: jax.Array, *, tile_m: int,
                     out_dtype=jnp.bfloat16, config: Fp8GemmConfig | None = None,
                     interpret: bool = False) -> jax.Array:
    """out[tile t] = lhs[tile t] . rhs[tile_expert[t]]^T, tiles of `tile_m` rows; rhs [E, N, K].

    A CTA row block must see one expert: tile_m is a multiple of the CTA rows (a tile splits into
    blocks) or divides 64 (a tile is one block, which reads past the tile and keeps its tile_m
    rows: tiles under 64 rows waste wgmma work, so prefer tile_m >= 64 on the GPU). Tiles of
    under MIN_TILE_M = 8 rows do not lower: the epilogue's SMEM slice and TMA store of the
    tile's rows need whole 8-row groups (Mosaic GPU layout inference fails).
    """
    _check_grouped(lhs, rhs, tile_expert, tile_m)
    cfg = config or default_config(rhs.shape[1], tile_m=tile_m, interpret=interpret)
    if tile_m % cfg.cta_m == 0:
        per_tile = tile_m // cfg.cta_m
        block_expert, stride, rows_out = jnp.repeat(tile_expert, per_tile), cfg.cta_m, cfg.cta_m
    elif WG_ROWS % tile_m == 0 and tile_m >= MIN_TILE_M:
        block_expert, stride, rows_out = tile_expert, tile_m, tile_m
    else:
        raise ValueError(f"tile_m={tile_m} must be a multiple of {cfg.cta_m} or divide {WG_ROWS} "
                         f"and be at least {MIN_TILE_M}")
    return _run_tiles(lhs, lhs_scale, rhs, rhs_scale, block_expert, row_stride=stride,
                      rows_out=rows_out, out_rows=lhs.shape[0], out_dtype=out_dtype, cfg=cfg,
                      interpret=interpret)


# ----------------------------------------------------------------------------------------------
# Experts' Wgrad: k-grouped, one expert's 128-row chunks per output tile
# ----------------------------------------------------------------------------------------------

def _wgrad_kernel(chunk_start, chunk_count, a_gmem, as_gmem, b_gmem, bs_gmem, o_gmem, *, bn,
                  steps, interpret):
    """Output tile (e, mi, ni) = sum over expert e's chunks of the promoted chunk products.

    One warpgroup per CTA with the plain pipeline, whose grid (the expert's chunk count) may be
    dynamic, as in jax's transposed_ragged_dot_mgpu.
    """
    num_experts, k_rows, n_cols = o_gmem.shape
    m_blocks, n_blocks = k_rows // WG_ROWS, n_cols // bn

    @functools.partial(pl.run_scoped, o_smem=plgpu.SMEM((WG_ROWS, bn), o_gmem.dtype))
    def _(o_smem):
        @plgpu.nd_loop((num_experts * m_blocks * n_blocks,), collective_axes="sm")
        def _(info):
            e, mn = info.index[0] // (m_blocks * n_blocks), info.index[0] % (m_blocks * n_blocks)
            mi, ni = mn // n_blocks, mn % n_blocks
            start, count = chunk_start[e], chunk_count[e]
            rows, cols = pl.ds(mi * WG_ROWS, WG_ROWS), pl.ds(ni * bn, bn)
            pipeline = plgpu.emit_pipeline(
                _promote(slice(None), slice(None), interpret), grid=(count,),
                in_specs=_chunk_specs(WG_ROWS, bn, lambda c: start + c),
                max_concurrent_steps=steps, init_carry=_zeros_acc((WG_ROWS, bn), interpret))
            operands = (a_gmem.at[rows], as_gmem.at[:, rows], b_gmem.at[cols], bs_gmem.at[:, cols])
            # An expert without rows still owns its (zero) gradient tile.
            acc = lax.cond(count > 0, lambda: pipeline(*operands),
                           lambda: _zeros_acc((WG_ROWS, bn), interpret))
            _store(o_smem, acc, o_gmem.at[e, rows, cols], WG_ROWS)

    plgpu.wait_smem_to_gmem(0, wait_read_only=True)


def fp8_group_wgrad(lhs_t: jax.Array, lhs_t_scale: jax.Array, rhs_t: jax.Array,
                    rhs_t_scale: jax.Array, chunk_expert: jax.Array, *, num_experts: int,
                    out_dtype=jnp.float32, config: Fp8GemmConfig | None = None,
                    interpret: bool = False) -> jax.Array:
    """[E, K, N] per-expert x^T.dy; see `fp8_group_wgrad_reference` for the operands.
    Uses `config.block_n`, `max_concurrent_steps` and `num_sms` (always one warpgroup)."""
    _check_k(lhs_t, rhs_t)
    cfg = config or Fp8GemmConfig()
    k, n = lhs_t.shape[0], rhs_t.shape[0]
    k_pad, n_pad = _round_up(k, WG_ROWS), _round_up(n, cfg.block_n)
    counts = jnp.bincount(chunk_expert, length=num_experts).astype(jnp.int32)
    starts = (jnp.cumsum(counts) - counts).astype(jnp.int32)
    pad_rows = lambda a, rows: jnp.pad(a, ((0, rows - a.shape[0]), (0, 0)))
    steps = _fit_steps(dataclasses.replace(cfg, wg_split="single"), out_dtype)
    kernel = functools.partial(_wgrad_kernel, bn=cfg.block_n, steps=steps, interpret=interpret)
    out = plgpu.kernel(
        kernel, out_type=jax.ShapeDtypeStruct((num_experts, k_pad, n_pad), out_dtype),
        grid=(_num_sms(cfg, interpret),), grid_names=("sm",), **_compiler_kwargs(interpret),
    )(starts, counts, pad_rows(lhs_t, k_pad), pad_rows(lhs_t_scale.astype(F32), k_pad).T,
      pad_rows(rhs_t, n_pad), pad_rows(rhs_t_scale.astype(F32), n_pad).T)
    return out[:, :k, :n]
