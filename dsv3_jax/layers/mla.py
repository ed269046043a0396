"""Multi-head Latent Attention (spec §2; report eqs. 1-11).

  c_q  = RMSNorm(x W_DQ)                      [B,T,Q]   (or q = x W_Q when q_lora_rank is None)
  q    = c_q W_UQ -> [q_nope | q_rope]        [B,T,H,K+R]
  [c_kv | k_rope] = x W_DKV                   [B,T,C+R]; c_kv = RMSNorm(c_kv)
  [k_nope | v] = c_kv W_UKV                   [B,T,H,K+V]
  k_rope = RoPE(k_rope): ONE head shared by all heads
  o    = softmax((q_nope.k_nope + q_rope.k_rope) * scale + mask) v ; out = o W_O

Decoding (`MLA.decode`) attends against the latent cache (dsv3_jax/kv_cache.py) in one of two
mathematically identical forms:
  naive:    expand every cached c_kv through W_UKV into per-head k_nope, v, then attend as above.
  absorbed: W_UK folds into the query and W_UV into the output, so attention is MQA over the
            latent itself (d_k = C + R, d_v = C) and nothing per head is built for the S keys:
              q~_h = W_UK,h^T q_nope_h [C];  score = q~_h . c_kv + q_rope_h . k_rope
              o~_h = sum_s p_s c_kv,s [C];    o_h = W_UV,h o~_h;  out = o W_O
            Per new token it costs O(S (C + R) H) instead of the naive O(S C H (K + V)).
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from dsv3_jax import kv_cache
from dsv3_jax.config import ModelConfig, softmax_scale
from dsv3_jax.layers import attention, tp
from dsv3_jax.layers.common import Linear, RMSNorm, apply_rope, dtype_of, rope_cos_sin

_NEG_INF = -1e30


def attention_mask(q_segment_ids: jax.Array, kv_segment_ids: jax.Array,
                   q_index: jax.Array, kv_index: jax.Array) -> jax.Array:
    """[B,1,T,S] bool: causal (by index) and within one packed document (same segment id)."""
    causal = q_index[:, :, None] >= kv_index[:, None, :]
    same_doc = q_segment_ids[:, :, None] == kv_segment_ids[:, None, :]
    return (causal & same_doc)[:, None]


def attend(q_nope_BTHK, q_rope_BTHR, k_nope_BSHK, k_rope_BSR, v_BSHV, mask_B1TS, scale):
    """Softmax attention with MLA's shared rope key; scores and softmax in float32 (or wider)."""
    acc = jnp.promote_types(v_BSHV.dtype, jnp.float32)
    # One score GEMM over [nope | rope] (the shared rope key broadcast to every head): a single
    # K = nope + rope contraction is faster than two GEMMs and a [B, H, T, S] add.
    k_rope_BSHR = jnp.broadcast_to(k_rope_BSR[:, :, None],
                                   (*k_rope_BSR.shape[:2], q_rope_BTHR.shape[2], k_rope_BSR.shape[-1]))
    q_BTHX = jnp.concatenate([q_nope_BTHK, q_rope_BTHR], axis=-1)
    k_BSHX = jnp.concatenate([k_nope_BSHK, k_rope_BSHR.astype(k_nope_BSHK.dtype)], axis=-1)
    scores = jnp.einsum("BTHX,BSHX->BHTS", q_BTHX, k_BSHX, preferred_element_type=acc) * scale
    # saved by remat="selective" (the softmax is recomputed from it, not the score GEMM)
    scores = checkpoint_name(jnp.where(mask_B1TS, scores, _NEG_INF), "attn_scores")
    probs = jax.nn.softmax(scores, axis=-1).astype(v_BSHV.dtype)
    return jnp.einsum("BHTS,BSHV->BTHV", probs, v_BSHV)


def attend_causal_blocks(q_nope_BTHK, q_rope_BTHR, k_nope_BSHK, k_rope_BSR, v_BSHV, mask_B1TS,
                         scale, blocks: int):
    """`attend` for causal self-attention (T == S, the mask causal by index), in `blocks` query
    blocks: block i sees keys [0, end of block i) only, so the masked upper triangle is mostly
    never computed ((blocks - 1) / (2 blocks) of the score and PV work saved). Exact: the
    skipped keys are masked for those queries. blocks must divide T (else one block)."""
    t = q_nope_BTHK.shape[1]
    if blocks <= 1 or t % blocks:
        return attend(q_nope_BTHK, q_rope_BTHR, k_nope_BSHK, k_rope_BSR, v_BSHV, mask_B1TS, scale)
    size = t // blocks
    outs = []
    for i in range(blocks):
        q, end = slice(i * size, (i + 1) * size), (i + 1) * size
        outs.append(attend(q_nope_BTHK[:, q], q_rope_BTHR[:, q], k_nope_BSHK[:, :end],
                           k_rope_BSR[:, :end], v_BSHV[:, :end], mask_B1TS[:, :, q, :end], scale))
    return jnp.concatenate(outs, axis=1)


def attend_absorbed(q_nope_BTHK, q_rope_BTHR, c_kv_BSC, k_rope_BSR, w_uk_CHK, w_uv_CHV,
                    mask_B1TS, scale):
    """`attend` with k_nope = c_kv W_UK and v = c_kv W_UV, computed without expanding the latent:
    W_UK moves to the query side and W_UV after the probability-weighted sum."""
    dt = c_kv_BSC.dtype
    acc = jnp.promote_types(dt, jnp.float32)
    q_lat_BTHC = jnp.einsum("BTHK,CHK->BTHC", q_nope_BTHK, w_uk_CHK.astype(dt),
                            preferred_element_type=acc).astype(dt)
    scores = (jnp.einsum("BTHC,BSC->BHTS", q_lat_BTHC, c_kv_BSC, preferred_element_type=acc)
              + jnp.einsum("BTHR,BSR->BHTS", q_rope_BTHR, k_rope_BSR,
                           preferred_element_type=acc)) * scale
    scores = jnp.where(mask_B1TS, scores, _NEG_INF)
    probs = jax.nn.softmax(scores, axis=-1).astype(dt)
    o_lat_BTHC = jnp.einsum("BHTS,BSC->BTHC", probs, c_kv_BSC)
    return jnp.einsum("BTHC,CHV->BTHV", o_lat_BTHC, w_uv_CHV.astype(dt))


class MLA(nn.Module):
    cfg: ModelConfig

    def setup(self):
        cfg = self.cfg
        h, qk = cfg.num_attention_heads, cfg.qk_head_dim
        if cfg.q_lora_rank is None:
            self.q_proj = Linear(cfg, (h, qk), ("embed", "heads", "head_dim"))
        else:
            self.q_a = Linear(cfg, (cfg.q_lora_rank,), ("embed", "q_lora"))
            self.q_norm = RMSNorm(cfg)
            self.q_b = Linear(cfg, (h, qk), ("q_lora", "heads", "head_dim"))
        self.kv_a = Linear(cfg, (cfg.kv_lora_rank + cfg.qk_rope_head_dim,), ("embed", "kv_lora"))
        self.kv_norm = RMSNorm(cfg)
        self.kv_b = Linear(cfg, (h, cfg.qk_nope_head_dim + cfg.v_head_dim),
                           ("kv_lora", "heads", "head_dim"))
        # Its input, the attention output, is kept in the compute dtype anyway (remat
        # "selective" saves it as attn_out; flash attention's backward needs it): an FP8 cache
        # would add a copy, not replace one. The report stores
        # it as E5M6 (§3.3.3 (1)); XLA has no 12-bit type, and E5M6 in a 16-bit container is
        # BF16's size with less precision, so the compute dtype is the nearest format.
        self.o_proj = Linear(cfg, (cfg.hidden_size,), ("heads", "head_dim", "embed"), num_in=2,
                             fp8_cache=False)

    def project_q(self, x_BTD):
        """Queries [B,T,H,K] and un-rotated rope queries [B,T,H,R]."""
        cfg = self.cfg
        if cfg.q_lora_rank is None:
            q = self.q_proj(x_BTD)
        else:
            # the down-projection is saved by remat="selective"; q_norm and q_b are recomputed
            q = self.q_b(self.q_norm(checkpoint_name(self.q_a(x_BTD), "mla_down")))
        return q[..., :cfg.qk_nope_head_dim], q[..., cfg.qk_nope_head_dim:]

    def project_latent(self, x_BTD):
        """The cacheable part: normalised latent c_kv [B,T,C] and un-rotated rope key [B,T,R]."""
        cfg = self.cfg
        kv = checkpoint_name(self.kv_a(x_BTD), "mla_down")     # saved by remat="selective"
        return self.kv_norm(kv[..., :cfg.kv_lora_rank]), kv[..., cfg.kv_lora_rank:]

    def expand_latent(self, c_kv_BSC):
        """Naive formulation: per-head k_nope [B,S,H,K] and v [B,S,H,V] from the latent."""
        kv = self.kv_b(c_kv_BSC)
        return kv[..., :self.cfg.qk_nope_head_dim], kv[..., self.cfg.qk_nope_head_dim:]

    def __call__(self, x_BTD, positions_BT, segment_ids_BT):
        cfg = self.cfg
        cos, sin = rope_cos_sin(cfg, positions_BT)                       # [B,T,R/2]
        q_nope, q_rope = self.project_q(x_BTD)
        q_rope = apply_rope(q_rope, cos[:, :, None], sin[:, :, None], cfg.rope_interleave)
        c_kv, k_rope = self.project_latent(x_BTD)
        # the one rope key enters every head's attention: with `tensor` manual (pipeline
        # stages) each device's heads give it a partial cotangent, summed by tp.copy
        k_rope = tp.maybe_copy(apply_rope(k_rope, cos, sin, cfg.rope_interleave))
        q_rope, k_rope = q_rope.astype(q_nope.dtype), k_rope.astype(q_nope.dtype)
        k_nope, v = self.expand_latent(c_kv)
        impl = attention.resolve(cfg.train_attention, x_BTD.shape[1])
        with jax.named_scope("attention"):
            if impl == "reference":
                index = jnp.broadcast_to(jnp.arange(x_BTD.shape[1]), positions_BT.shape)
                mask = attention_mask(segment_ids_BT, segment_ids_BT, index, index)
                o = checkpoint_name(attend_causal_blocks(q_nope, q_rope, k_nope, k_rope, v, mask,
                                                         softmax_scale(cfg),
                                                         cfg.attn_causal_blocks), "attn_out")
            else:   # flash attention on [q_nope | q_rope] . [k_nope | shared k_rope]: no [T, S]
                k_rope_BSHR = jnp.broadcast_to(k_rope[:, :, None],
                                               (*k_nope.shape[:3], k_rope.shape[-1]))
                o = attention.self_attention(
                    impl, jnp.concatenate([q_nope, q_rope], -1),
                    jnp.concatenate([k_nope, k_rope_BSHR], -1), v, segment_ids_BT,
                    scale=softmax_scale(cfg), block=cfg.attn_block_size)
                if impl != "blockwise":   # blockwise names its own residuals (out, lse)
                    o = checkpoint_name(o, "attn_out")
        return self.o_proj(o.astype(dtype_of(cfg.dtype)))

    def decode(self, x_BTD, positions_BT, kv: kv_cache.LatentKV, ctx: kv_cache.StepContext):
        """T new tokens against this layer's cache kv ([B,S,...]): writes their latents at
        ctx.write_index_B, attends over the slots ctx.mask_B1TS allows; returns (out, kv)."""
        cfg = self.cfg
        cos, sin = rope_cos_sin(cfg, jnp.maximum(positions_BT, 0))       # padding: any angle
        q_nope, q_rope = self.project_q(x_BTD)
        q_rope = apply_rope(q_rope, cos[:, :, None], sin[:, :, None], cfg.rope_interleave)
        c_kv, k_rope = self.project_latent(x_BTD)
        k_rope = apply_rope(k_rope, cos, sin, cfg.rope_interleave)
        q_rope, k_rope = q_rope.astype(q_nope.dtype), k_rope.astype(q_nope.dtype)
        kv = kv_cache.write(kv, ctx.write_index_B, c_kv, k_rope)
        c_kv_BSC, k_rope_BSR = kv.c_kv.astype(q_nope.dtype), kv.k_rope.astype(q_nope.dtype)
        if ctx.attn_impl == "naive":
            k_nope, v = self.expand_latent(c_kv_BSC)
            with jax.named_scope("attention"):
                o = attend(q_nope, q_rope, k_nope, k_rope_BSR, v, ctx.mask_B1TS,
                           softmax_scale(cfg))
        else:
            w_ukv_CHX = nn.meta.unbox(self.kv_b.variables["params"]["kernel"])   # X = K + V
            k = cfg.qk_nope_head_dim
            with jax.named_scope("attention_absorbed"):
                o = attend_absorbed(q_nope, q_rope, c_kv_BSC, k_rope_BSR, w_ukv_CHX[..., :k],
                                    w_ukv_CHX[..., k:], ctx.mask_B1TS, softmax_scale(cfg))
        return self.o_proj(o.astype(dtype_of(cfg.dtype))), kv
