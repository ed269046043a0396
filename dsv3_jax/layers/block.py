"""The pre-norm transformer block: x += MLA(RMSNorm(x)); x += FFN(RMSNorm(x)), FFN dense or MoE."""
from __future__ import annotations

import flax.linen as nn
import jax

from dsv3_jax.config import ModelConfig
from dsv3_jax.layers.common import RMSNorm, SwiGLU
from dsv3_jax.layers.mla import MLA
from dsv3_jax.layers.moe import MoE


class Block(nn.Module):
    cfg: ModelConfig
    moe: bool

    @nn.compact
    def __call__(self, x_BTD: jax.Array, positions_BT: jax.Array, segment_ids_BT: jax.Array):
        cfg = self.cfg
        x_BTD = x_BTD + MLA(cfg, name="attn")(RMSNorm(cfg, name="attn_norm")(x_BTD), positions_BT,
                                              segment_ids_BT)
        u = RMSNorm(cfg, name="ffn_norm")(x_BTD)
        if self.moe:
            f, stats = MoE(cfg, name="moe")(u, segment_ids_BT > 0)
        else:
            f, stats = SwiGLU(cfg, cfg.intermediate_size, name="mlp")(u), ()
        return x_BTD + f, stats


_REMAT_POLICIES = {
    "full": None,   # save nothing: recompute the whole block in the backward pass
    # The report's selective recompute: RMSNorm outputs and MLA up-projections are recomputed.
    "selective": jax.checkpoint_policies.save_anything_except_these_names("norm", "mla_up"),
}


class _ScanBlock(nn.Module):
    """(carry, broadcast inputs) -> (carry, per-layer stats), the signature nn.scan wants."""
    cfg: ModelConfig
    moe: bool

    @nn.compact
    def __call__(self, x_BTD, positions_BT, segment_ids_BT):
        return Block(self.cfg, self.moe, name="block")(x_BTD, positions_BT, segment_ids_BT)


def block_stack(cfg: ModelConfig, moe: bool, length: int, name: str) -> nn.Module:
    """`length` blocks stacked on a leading `layers` axis; compile time does not grow with depth."""
    from dsv3_jax.layers.moe import ROUTER_BIAS
    cls = _ScanBlock
    if cfg.remat != "none":
        cls = nn.remat(cls, policy=_REMAT_POLICIES[cfg.remat], prevent_cse=False)
    scanned = nn.scan(cls, variable_axes={"params": 0, ROUTER_BIAS: 0},
                      split_rngs={"params": True}, in_axes=(nn.broadcast, nn.broadcast),
                      length=length, metadata_params={nn.PARTITION_NAME: "layers"})
    return scanned(cfg, moe, name=name)
