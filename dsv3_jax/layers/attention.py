"""Training / prefill self-attention: which implementation, and the blockwise (flash) one.

  model.train_attention = reference | blockwise | pallas | auto        (config.py)

  reference  `mla.attend_causal_blocks`: materialises [B,H,T,S] scores and probabilities
             (memory and the saved residuals grow as T^2).
  blockwise  `flash_attention` below: FlashAttention-2 in jnp. Online softmax over key blocks, a
             custom VJP that saves only (q, k, v, out, lse) and recomputes the probabilities block
             by block, causal and document (segment) masks built per [bq, bk] tile, and tiles
             that the causal or document mask hides entirely are never computed. Memory grows as
             T x block, not T^2. Any backend; the CPU path for long sequences.
  pallas     a maintained Hopper kernel with MLA's shapes (d_qk != d_v): tokamax's Mosaic GPU
             flash attention (forward and backward; imported lazily, GPU box only). See
             `tokamax_attention`.
  auto       what measured fastest (benchmarks/attention.py): the reference for short sequences
             (T < AUTO_MIN_BLOCKWISE_T: its few big GEMMs beat the loop), else pallas on a GPU
             where tokamax imports, else blockwise. A long sequence never materialises T^2.

All implementations take q = [q_nope | q_rope] [B,T,H,X], k = [k_nope | k_rope broadcast]
[B,S,H,X], v [B,S,H,V] (MLA: X = 192, V = 128), `scale` = config.softmax_scale (YaRN's mscale^2
included), and attend causally by index (query t sees keys s <= t) within one packed document
(equal segment ids), exactly as `mla.attention_mask`.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.ad_checkpoint import checkpoint_name

from dsv3_jax.config import TRAIN_ATTENTION  # the one list, validated by ModelConfig

# auto: below this many tokens the reference (materialised scores, causal query blocks) is
# faster on CPU (benchmarks/attention.py; the README's table), from it on the blockwise path.
AUTO_MIN_BLOCKWISE_T = 1024
_NEG_INF = -1e30          # as mla.attend: a finite mask value keeps fully masked rows finite


def resolve(impl: str, seq_len: int, backend: str | None = None) -> str:
    """The implementation `auto` stands for at this length and backend (others: themselves)."""
    if impl != "auto":
        return impl
    if seq_len < AUTO_MIN_BLOCKWISE_T:
        return "reference"
    backend = backend or jax.default_backend()
    if backend == "gpu" and tokamax_available():
        return "pallas"
    return "blockwise"


# ----------------------------------------------------------------------------------------------
# The reference with the same signature (materialised [B,H,T,S]; for tests and benchmarks)
# ----------------------------------------------------------------------------------------------

def reference_attention(q_BTHX, k_BSHX, v_BSHV, segment_ids_BT=None, kv_segment_ids_BS=None, *,
                        scale: float, causal: bool = True, **unused):
    """Plain softmax attention with the same masks and signature as `flash_attention`."""
    acc = jnp.promote_types(v_BSHV.dtype, jnp.float32)
    b, t, s = q_BTHX.shape[0], q_BTHX.shape[1], k_BSHX.shape[1]
    mask = _mask(jnp.arange(t), jnp.arange(s), _seg(segment_ids_BT, b, t),
                 _seg(segment_ids_BT if kv_segment_ids_BS is None else kv_segment_ids_BS, b, s),
                 causal, s)
    scores = jnp.einsum("BTHX,BSHX->BHTS", q_BTHX, k_BSHX, preferred_element_type=acc) * scale
    probs = jax.nn.softmax(jnp.where(mask, scores, _NEG_INF), axis=-1).astype(v_BSHV.dtype)
    return jnp.einsum("BHTS,BSHV->BTHV", probs, v_BSHV)


def _seg(seg, b, t):
    return jnp.zeros((b, t), jnp.int32) if seg is None else seg


def _mask(q_index_T, kv_index_S, q_seg_BT, kv_seg_BS, causal: bool, s_valid: int):
    """[B,1,T,S] bool: same document, key inside the (unpadded) sequence, causal by index."""
    m = (q_seg_BT[:, :, None] == kv_seg_BS[:, None, :]) & (kv_index_S < s_valid)[None, None, :]
    if causal:
        m = m & (q_index_T[:, None] >= kv_index_S[None, :])[None]
    return m[:, None]


# ----------------------------------------------------------------------------------------------
# Blockwise (flash) attention in jnp
# ----------------------------------------------------------------------------------------------

def flash_attention(q_BTHX, k_BSHX, v_BSHV, segment_ids_BT=None, kv_segment_ids_BS=None, *,
                    scale: float, causal: bool = True, block_q: int = 512, block_k: int = 512):
    """FlashAttention-2 in jnp; equals `reference_attention` (values and gradients).

    segment_ids_BT: document ids of the queries (None: one document); kv_segment_ids_BS: of the
    keys (None: the same array, i.e. self-attention, T == S). Causal masking is by index (query
    t sees keys s <= t). T and S need not be multiples of the blocks (padded inside). Tiles are
    skipped where the causal mask hides them, and, for self-attention whose segment ids are
    non-decreasing along each row (packed documents), where the document mask does: a block of
    queries only visits keys from the earliest start of its documents on (and, non-causal, up to
    the latest end). Unsorted ids are still exact, only without that skipping. A query with no
    key to attend to (possible only with separate key ids) gets output 0 and zero gradients.
    """
    b, t, h, x = q_BTHX.shape
    s = k_BSHX.shape[1]
    self_attn = kv_segment_ids_BS is None
    if self_attn and t != s:
        raise ValueError(f"self-attention segments need T == S, got {t} and {s}")
    bq, bk = min(block_q, _ceil_to(t, 8)), min(block_k, _ceil_to(s, 8))
    tp, sp = _ceil_to(t, bq), _ceil_to(s, bk)
    q_seg = _seg(segment_ids_BT, b, t).astype(jnp.int32)
    kv_seg = q_seg if self_attn else kv_segment_ids_BS.astype(jnp.int32)
    kv_range, q_range = _block_ranges(q_seg, kv_seg, self_attn, causal, t, s, bq, bk, tp, sp)
    # [B,H,T,X] inside: every tile GEMM has its batch dims leading
    to_bh = lambda a, n: jnp.pad(a.transpose(0, 2, 1, 3), ((0, 0), (0, 0), (0, n - a.shape[1]),
                                                           (0, 0)))
    q, k, v = to_bh(q_BTHX, tp), to_bh(k_BSHX, sp), to_bh(v_BSHV, sp)
    q_seg = jnp.pad(q_seg, ((0, 0), (0, tp - t)), constant_values=-1)
    kv_seg = jnp.pad(kv_seg, ((0, 0), (0, sp - s)), constant_values=-2)
    static = _Static(float(scale), bool(causal), bq, bk, s)
    out = _flash(static, q, k, v, q_seg, kv_seg, kv_range, q_range)
    return out[:, :, :t].transpose(0, 2, 1, 3)


def _ceil_to(n: int, m: int) -> int:
    return -(-n // m) * m


def _block_ranges(q_seg, kv_seg, self_attn, causal, t, s, bq, bk, tp, sp):
    """[nq, 2] key-block range per query block (forward) and [nk, 2] query-block range per key
    block (backward), from causality and, for sorted self-attention segments, document bounds."""
    nq, nk = tp // bq, sp // bk
    qb, kb = jnp.arange(nq), jnp.arange(nk)
    kv_lo, kv_hi = jnp.zeros(nq, jnp.int32), jnp.full(nq, nk, jnp.int32)
    q_lo, q_hi = jnp.zeros(nk, jnp.int32), jnp.full(nk, nq, jnp.int32)
    if causal:   # query i*bq..(i+1)*bq-1 sees keys <= its index; key j*bk.. is seen from j*bk on
        kv_hi = jnp.minimum(((qb + 1) * bq - 1) // bk + 1, kv_hi)
        q_lo = (kb * bk) // bq
    if self_attn:
        idx = jnp.arange(t)
        new_doc = jnp.concatenate([jnp.ones_like(q_seg[:, :1], bool),
                                   q_seg[:, 1:] != q_seg[:, :-1]], axis=1)
        start = lax.cummax(jnp.where(new_doc, idx, 0), axis=1)                  # [B,T]
        end_doc = jnp.concatenate([new_doc[:, 1:], jnp.ones_like(new_doc[:, :1])], axis=1)
        end = lax.cummin(jnp.where(end_doc, idx, t - 1), axis=1, reverse=True)  # [B,T]
        sorted_ok = jnp.all(q_seg[:, 1:] >= q_seg[:, :-1])
        pad = lambda a, n, fill: jnp.pad(a, ((0, 0), (0, n - t)), constant_values=fill)
        # per query block: keys from the earliest document start (and to the latest end)
        lo_q = pad(start, tp, t).reshape(-1, nq, bq).min(axis=(0, 2)) // bk
        hi_q = pad(end, tp, 0).reshape(-1, nq, bq).max(axis=(0, 2)) // bk + 1
        # per key block: queries up to the latest document end (and from the earliest start)
        hi_k = pad(end, sp, 0).reshape(-1, nk, bk).max(axis=(0, 2)) // bq + 1
        lo_k = pad(start, sp, t).reshape(-1, nk, bk).min(axis=(0, 2)) // bq
        kv_lo = jnp.where(sorted_ok, jnp.maximum(kv_lo, lo_q), kv_lo)
        q_hi = jnp.where(sorted_ok, jnp.minimum(q_hi, hi_k), q_hi)
        if not causal:
            kv_hi = jnp.where(sorted_ok, jnp.minimum(kv_hi, hi_q), kv_hi)
            q_lo = jnp.where(sorted_ok, jnp.maximum(q_lo, lo_k), q_lo)
    kv_hi, q_hi = jnp.maximum(kv_hi, kv_lo), jnp.maximum(q_hi, q_lo)
    return (jnp.stack([kv_lo, kv_hi], 1).astype(jnp.int32),
            jnp.stack([q_lo, q_hi], 1).astype(jnp.int32))


class _Static(tuple):
    """(scale, causal, block_q, block_k, real key count): hashable, for nondiff_argnums."""
    def __new__(cls, *a):
        return super().__new__(cls, a)


def _tile(a, start, size, axis):
    return lax.dynamic_slice_in_dim(a, start, size, axis=axis)


def _tile_scores(st, q_i, k_j, qseg_i, kvseg_j, i, j):
    """Masked, scaled scores of one [bq, bk] tile, f32 (or wider): [B,H,bq,bk]."""
    scale, causal, bq, bk, s_valid = st
    acc = jnp.promote_types(q_i.dtype, jnp.float32)
    sc = jnp.einsum("BHqX,BHkX->BHqk", q_i, k_j, preferred_element_type=acc) * scale
    mask = _mask(i * bq + jnp.arange(bq), j * bk + jnp.arange(bk), qseg_i, kvseg_j, causal,
                 s_valid)
    return jnp.where(mask, sc, _NEG_INF)


def _flash_forward(st, q, k, v, q_seg, kv_seg, kv_range):
    _, _, bq, bk, _ = st
    bsz, h, tp, _ = q.shape
    acc = jnp.promote_types(v.dtype, jnp.float32)

    def q_block(i, carry):
        out, lse = carry
        q_i, qseg_i = _tile(q, i * bq, bq, 2), _tile(q_seg, i * bq, bq, 1)

        def kv_block(j, c):
            m, l, a = c
            k_j, v_j, kvseg_j = _tile(k, j * bk, bk, 2), _tile(v, j * bk, bk, 2), \
                _tile(kv_seg, j * bk, bk, 1)
            sc = _tile_scores(st, q_i, k_j, qseg_i, kvseg_j, i, j)
            m_new = jnp.maximum(m, sc.max(-1))
            corr = jnp.exp(m - m_new)
            p = jnp.exp(sc - m_new[..., None])
            pv = jnp.einsum("BHqk,BHkV->BHqV", p.astype(v.dtype), v_j, preferred_element_type=acc)
            return m_new, l * corr + p.sum(-1), a * corr[..., None] + pv

        init = (jnp.full((bsz, h, bq), _NEG_INF, acc), jnp.zeros((bsz, h, bq), acc),
                jnp.zeros((bsz, h, bq, v.shape[-1]), acc))
        m, l, a = lax.fori_loop(kv_range[i, 0], kv_range[i, 1], kv_block, init)
        # A row that may attend to no key (padding; cross-attention without a same-document
        # key) gets out = 0 and lse = +1e30, so its recomputed probabilities are 0 (FlashAttention's
        # convention; the reference averages all values there instead).
        seen = m > _NEG_INF / 2
        o = jnp.where(seen[..., None], a / jnp.where(seen, l, 1.0)[..., None], 0.0)
        out = lax.dynamic_update_slice_in_dim(out, o.astype(out.dtype), i * bq, axis=2)
        lse = lax.dynamic_update_slice_in_dim(
            lse, jnp.where(seen, m + jnp.log(jnp.where(seen, l, 1.0)), -_NEG_INF), i * bq, axis=2)
        return out, lse

    init = (jnp.zeros((bsz, h, tp, v.shape[-1]), v.dtype), jnp.zeros((bsz, h, tp), acc))
    return lax.fori_loop(0, tp // bq, q_block, init)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash(st, q, k, v, q_seg, kv_seg, kv_range, q_range):
    return _flash_forward(st, q, k, v, q_seg, kv_seg, kv_range)[0]


def _flash_fwd(st, q, k, v, q_seg, kv_seg, kv_range, q_range):
    out, lse = _flash_forward(st, q, k, v, q_seg, kv_seg, kv_range)
    # saved by remat="selective" (layers/block.py); q, k, v are recomputed from the MLA
    # up-projections, the forward loop never
    out, lse = checkpoint_name(out, "attn_out"), checkpoint_name(lse, "attn_lse")
    return out, (q, k, v, out, lse, q_seg, kv_seg, kv_range, q_range)


def _flash_bwd(st, res, dout):
    """FA2 backward: per key block, the query blocks that see it; P = exp(S - lse) recomputed;
    dV += P^T dO, dS = P (dO V^T - rowsum(dO O)), dK += dS^T Q, dQ += dS K (scale folded in)."""
    q, k, v, out, lse, q_seg, kv_seg, kv_range, q_range = res
    scale, _, bq, bk, _ = st
    acc = jnp.promote_types(v.dtype, jnp.float32)
    delta = jnp.einsum("BHTV,BHTV->BHT", dout.astype(acc), out.astype(acc))

    def kv_block(j, carry):
        dq, dk, dv = carry
        k_j, v_j, kvseg_j = _tile(k, j * bk, bk, 2), _tile(v, j * bk, bk, 2), \
            _tile(kv_seg, j * bk, bk, 1)

        def q_block(i, c):
            dq, dk_j, dv_j = c
            q_i, do_i = _tile(q, i * bq, bq, 2), _tile(dout, i * bq, bq, 2)
            p = jnp.exp(_tile_scores(st, q_i, k_j, _tile(q_seg, i * bq, bq, 1), kvseg_j, i, j)
                        - _tile(lse, i * bq, bq, 2)[..., None])
            dv_j = dv_j + jnp.einsum("BHqk,BHqV->BHkV", p.astype(dout.dtype), do_i,
                                     preferred_element_type=acc)
            dp = jnp.einsum("BHqV,BHkV->BHqk", do_i, v_j, preferred_element_type=acc)
            ds = p * (dp - _tile(delta, i * bq, bq, 2)[..., None]) * scale
            dk_j = dk_j + jnp.einsum("BHqk,BHqX->BHkX", ds.astype(q.dtype), q_i,
                                     preferred_element_type=acc)
            dq_i = jnp.einsum("BHqk,BHkX->BHqX", ds.astype(k.dtype), k_j,
                              preferred_element_type=acc)
            dq = lax.dynamic_update_slice_in_dim(dq, _tile(dq, i * bq, bq, 2) + dq_i, i * bq, 2)
            return dq, dk_j, dv_j

        init = (dq, jnp.zeros(k_j.shape, acc), jnp.zeros(v_j.shape, acc))
        dq, dk_j, dv_j = lax.fori_loop(q_range[j, 0], q_range[j, 1], q_block, init)
        dk = lax.dynamic_update_slice_in_dim(dk, dk_j.astype(dk.dtype), j * bk, axis=2)
        dv = lax.dynamic_update_slice_in_dim(dv, dv_j.astype(dv.dtype), j * bk, axis=2)
        return dq, dk, dv

    init = (jnp.zeros(q.shape, acc), jnp.zeros(k.shape, k.dtype), jnp.zeros(v.shape, v.dtype))
    dq, dk, dv = lax.fori_loop(0, k.shape[2] // bk, kv_block, init)
    return dq.astype(q.dtype), dk, dv, None, None, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


# ----------------------------------------------------------------------------------------------
# Hopper: tokamax's Mosaic GPU flash attention (d_v != d_qk natively; causal + document masks)
# ----------------------------------------------------------------------------------------------

def tokamax_available() -> bool:
    """tokamax >= 0.0.17 importable (Python >= 3.12, jax >= 0.11.1; the 0.1.0 wheel that pip
    picks on Python 3.11 is an empty placeholder, so check the function exists)."""
    try:
        import tokamax
    except ImportError:
        return False
    return hasattr(tokamax, "dot_product_attention")


def tokamax_attention(q_BTHX, k_BSHX, v_BSHV, segment_ids_BT=None, kv_segment_ids_BS=None, *,
                      scale: float, causal: bool = True, implementation: str = "mosaic", **unused):
    """tokamax.dot_product_attention in bf16 (its VJP needs f16/bf16), output in q's dtype.

    Documents: packed rows have contiguous segments, so "same document and causal" is a causal
    mask with k_start[t] = the first index of t's document, which tokamax's Mask expresses
    without a [T,S] array (tokamax/_src/ops/attention/base.py, Mask(k_start=..., is_causal)).
    The public API has no k_start, so it goes through the private op (version-sensitive)."""
    if not tokamax_available():
        raise RuntimeError("train_attention='pallas' needs tokamax>=0.0.17 (Python >= 3.12, "
                           "jax >= 0.11.1) on a GPU")
    import tokamax
    dt = q_BTHX.dtype
    q, k, v = (a.astype(jnp.bfloat16) for a in (q_BTHX, k_BSHX, v_BSHV))
    if segment_ids_BT is None:
        out = tokamax.dot_product_attention(q, k, v, scale=scale, is_causal=causal,
                                            implementation=implementation)
        return out.astype(dt)
    if kv_segment_ids_BS is not None or not causal:
        raise NotImplementedError("tokamax path: causal self-attention with segments only")
    from tokamax._src.ops.attention import base as tk_base
    from tokamax._src.ops.attention import pallas_mosaic_gpu as tk_mgpu
    t = segment_ids_BT.shape[1]
    idx = jnp.arange(t, dtype=jnp.int32)
    new_doc = jnp.concatenate([jnp.ones_like(segment_ids_BT[:, :1], bool),
                               segment_ids_BT[:, 1:] != segment_ids_BT[:, :-1]], axis=1)
    k_start = lax.cummax(jnp.where(new_doc, idx, 0), axis=1)[:, None, :]   # [B,1,T]
    mask = tk_base.Mask(k_start=k_start, is_causal=True)
    out = tk_mgpu.PallasMosaicGpuFlashAttention()(q, k, v, mask=mask, logits_scale=scale)
    return (out[0] if isinstance(out, tuple) else out).astype(dt)


# ----------------------------------------------------------------------------------------------
# The dispatcher MLA calls (training and prefill)
# ----------------------------------------------------------------------------------------------

def self_attention(impl: str, q_BTHX, k_BSHX, v_BSHV, segment_ids_BT, *, scale: float,
                   block: int = 256):
    """Causal self-attention within documents by a non-reference implementation."""
    if impl == "blockwise":
        return flash_attention(q_BTHX, k_BSHX, v_BSHV, segment_ids_BT, scale=scale,
                               block_q=block, block_k=block)
    if impl == "pallas":
        return tokamax_attention(q_BTHX, k_BSHX, v_BSHV, segment_ids_BT, scale=scale)
    raise ValueError(f"unknown train_attention {impl!r}; expected one of {TRAIN_ATTENTION}")
