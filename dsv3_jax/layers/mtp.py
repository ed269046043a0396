"""Multi-token prediction (spec §4): module k predicts token t_{i+k+1} from position i.

  h'_i = W_k [RMSNorm(Emb(t_{i+k})); RMSNorm(h^{k-1}_i)]   (embedding first, as the release)
  h^k  = Block_k(h'),  logits^k = Head(RMSNorm_k(h^k))      (embedding and head shared)
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from dsv3_jax import kv_cache
from dsv3_jax.config import ModelConfig
from dsv3_jax.layers.block import Block
from dsv3_jax.layers.common import Linear, RMSNorm


def shift_left(x_BT: jax.Array, k: int, fill=0) -> jax.Array:
    """x[:, i + k] at position i; the last k positions get `fill` (their losses are masked)."""
    if k == 0:
        return x_BT
    pad = jnp.full((x_BT.shape[0], k) + x_BT.shape[2:], fill, x_BT.dtype)
    return jnp.concatenate([x_BT[:, k:], pad], axis=1)


def mtp_targets(batch: dict, k: int) -> tuple[jax.Array, jax.Array]:
    """Targets and loss mask of MTP depth k (1-based): depth k at position i predicts
    t_{i+k+1} = targets[i+k]; valid while the hidden state, the embedded token (the input
    shift_left(inputs, k)) and the target all belong to one document."""
    seg = batch["segment_ids"]
    same_doc = shift_left(seg, k, fill=-1) == seg
    return shift_left(batch["targets"], k), shift_left(batch["loss_mask"], k) * same_doc


class MTPModule(nn.Module):
    cfg: ModelConfig

    def setup(self):
        cfg = self.cfg
        self.enorm = RMSNorm(cfg)
        self.hnorm = RMSNorm(cfg)
        self.eh_proj = Linear(cfg, (cfg.hidden_size,), ("mtp_concat", "embed"))
        self.block = Block(cfg, moe=True)
        self.norm = RMSNorm(cfg)

    def combine(self, h_prev_BTD, emb_next_BTD):
        x = jnp.concatenate([self.enorm(emb_next_BTD), self.hnorm(h_prev_BTD)], axis=-1)
        return self.eh_proj(x)

    def __call__(self, h_prev_BTD, emb_next_BTD, positions_BT, segment_ids_BT):
        x, stats = self.block(self.combine(h_prev_BTD, emb_next_BTD), positions_BT, segment_ids_BT)
        return self.norm(x), stats

    def decode(self, h_prev_BTD, emb_next_BTD, positions_BT, kv: kv_cache.LatentKV,
               ctx: kv_cache.StepContext):
        """T new positions against the module's own latent cache kv ([B,S,...]): as a draft model
        for speculative decoding. Returns (h^k, kv)."""
        x, kv = self.block.decode(self.combine(h_prev_BTD, emb_next_BTD), positions_BT, kv, ctx)
        return self.norm(x), kv
