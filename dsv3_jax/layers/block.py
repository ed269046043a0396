"""The pre-norm transformer block: x += MLA(RMSNorm(x)); x += FFN(RMSNorm(x)), FFN dense or MoE.

`Block.decode` is the same block over T new tokens against its layer's latent cache
(dsv3_jax/kv_cache.py); `block_stack` scans both methods over the stacked layers, the cache
stacked on the same `layers` axis as the parameters.
"""
from __future__ import annotations

import flax.linen as nn
import jax

from dsv3_jax import kv_cache
from dsv3_jax.config import ModelConfig
from dsv3_jax.layers.common import RMSNorm, SwiGLU
from dsv3_jax.layers.mla import MLA
from dsv3_jax.layers.moe import ROUTER_BIAS, MoE


class Block(nn.Module):
    cfg: ModelConfig
    moe: bool

    def setup(self):
        cfg = self.cfg
        self.attn_norm = RMSNorm(cfg)
        self.attn = MLA(cfg)
        self.ffn_norm = RMSNorm(cfg)
        if self.moe:
            self.moe_ffn = MoE(cfg, name="moe")
        else:
            self.mlp = SwiGLU(cfg, cfg.intermediate_size)

    def ffn(self, x_BTD, valid_BT):
        u = self.ffn_norm(x_BTD)
        if self.moe:
            f, stats = self.moe_ffn(u, valid_BT)
        else:
            f, stats = self.mlp(u), ()
        return x_BTD + f, stats

    def __call__(self, x_BTD: jax.Array, positions_BT: jax.Array, segment_ids_BT: jax.Array):
        x_BTD = x_BTD + self.attn(self.attn_norm(x_BTD), positions_BT, segment_ids_BT)
        return self.ffn(x_BTD, segment_ids_BT > 0)

    def decode(self, x_BTD, positions_BT, kv: kv_cache.LatentKV, ctx: kv_cache.StepContext):
        """(x, kv) after the block over T new tokens (positions -1 = padding); kv is [B,S,...]."""
        a, kv = self.attn.decode(self.attn_norm(x_BTD), positions_BT, kv, ctx)
        x_BTD, _ = self.ffn(x_BTD + a, positions_BT >= 0)
        return x_BTD, kv


_REMAT_POLICIES = {
    "full": None,   # save nothing: recompute the whole block in the backward pass
    # The report's selective recompute: RMSNorm outputs and MLA up-projections are recomputed.
    "selective": jax.checkpoint_policies.save_anything_except_these_names("norm", "mla_up"),
}


class _ScanBlock(nn.Module):
    """The signatures nn.scan wants: (carry, per-layer or broadcast inputs) -> (carry, ys)."""
    cfg: ModelConfig
    moe: bool

    def setup(self):
        self.block = Block(self.cfg, self.moe)

    def __call__(self, x_BTD, positions_BT, segment_ids_BT):
        return self.block(x_BTD, positions_BT, segment_ids_BT)          # ys: router stats

    def decode(self, x_BTD, positions_BT, kv, ctx):
        return self.block.decode(x_BTD, positions_BT, kv, ctx)          # ys: the layer's cache


def block_stack(cfg: ModelConfig, moe: bool, length: int, name: str) -> nn.Module:
    """`length` blocks stacked on a leading `layers` axis; compile time does not grow with depth.

    `stack(x, positions, segment_ids) -> (x, stats)` trains; `stack.decode(x, positions, kv, ctx)
    -> (x, kv)` decodes, kv a LatentKV [length, B, S, ...] scanned along with the layers.
    """
    cls = _ScanBlock
    if cfg.remat != "none":   # only __call__ is rematerialised; decoding takes no gradients
        cls = nn.remat(cls, policy=_REMAT_POLICIES[cfg.remat], prevent_cse=False)
    common = dict(variable_axes={"params": 0, ROUTER_BIAS: 0}, split_rngs={"params": True},
                  length=length, metadata_params={nn.PARTITION_NAME: "layers"},
                  unroll=min(cfg.scan_unroll, max(length, 1)))
    scanned = nn.scan(cls, methods={
        "__call__": dict(common, in_axes=(nn.broadcast, nn.broadcast)),
        "decode": dict(common, in_axes=(nn.broadcast, 0, nn.broadcast)),
    })
    return scanned(cfg, moe, name=name)
