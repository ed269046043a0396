"""The pre-norm transformer block: x += MLA(RMSNorm(x)); x += FFN(RMSNorm(x)), FFN dense or MoE.

`Block.decode` is the same block over T new tokens against its layer's latent cache
(dsv3_jax/kv_cache.py); `block_stack` scans both methods over the stacked layers, the cache
stacked on the same `layers` axis as the parameters.
"""
from __future__ import annotations

import flax.linen as nn
import jax
from jax.ad_checkpoint import checkpoint_name

from dsv3_jax import kv_cache
from dsv3_jax.config import ModelConfig
from dsv3_jax.layers.common import WGRAD_INPUTS, WGRAD_TAPS, RMSNorm, SwiGLU
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
        x_BTD = checkpoint_name(x_BTD + self.attn(self.attn_norm(x_BTD), positions_BT,
                                                  segment_ids_BT), "block_mid")
        return self.ffn(x_BTD, segment_ids_BT > 0)

    def decode(self, x_BTD, positions_BT, kv: kv_cache.LatentKV, ctx: kv_cache.StepContext):
        """(x, kv) after the block over T new tokens (positions -1 = padding); kv is [B,S,...]."""
        a, kv = self.attn.decode(self.attn_norm(x_BTD), positions_BT, kv, ctx)
        x_BTD, _ = self.ffn(x_BTD + a, positions_BT >= 0)
        return x_BTD, kv


# What remat="selective" keeps for the backward pass: the values named with
# jax.ad_checkpoint.checkpoint_name at these sites, and nothing else (the block input is the scan's
# carry, kept by every policy). The report (§3.2.3) recomputes "all RMSNorm operations and MLA
# up-projections": RMSNorm (and its float32 intermediates), q_b and kv_b, and everything computed
# from their outputs without another GEMM (reshapes, casts, slices, RoPE, concatenations, the
# router's float32 copy of the normed input, the MoE permute) are recomputed because they are not
# named. No other GEMM, no softmax-score GEMM, no attention loop, routing sort or all_to_all runs
# again; silu(gate) * up is recomputed from the saved gate and up (as the grouped expert loop's
# own VJP does), and weight casts / FP8 weight quantization are redone from the weights.
# Saving by name (instead of "everything except the norms") is what makes the derived values
# go: values computed from a recomputed one are never saved unless named.
SELECTIVE_SAVED = (
    "block_mid",      # x + attention: the FFN's residual input (block.py)
    "mla_down",       # q_a and kv_a outputs [Q], [C + R] (mla.py)
    "attn_out",       # attention output [H, V] (mla.py; attention.py's flash residual)
    "attn_lse",       # flash attention's log-sum-exp [H] float32 (attention.py)
    "attn_scores",    # reference attention: masked scores [H, S] float32 (mla.attend)
    "ffn_gate_up",    # SwiGLU gate and up outputs, dense and shared experts (common.py)
    "moe_route",      # sigmoid affinities [E], chosen experts and gates [P] (moe.py)
    "moe_dispatch",   # the dispatch plan's index maps (moe.py)
    "moe_gu",         # routed experts' gate | up [M, 2F] (grouped_gemm.py; moe.py for FP8)
    "moe_out",        # routed experts' output rows [M, D] before the combine (moe.py)
    "moe_recv",       # expert parallelism: the rows received by all_to_all (moe_ep.py)
)

_REMAT_POLICIES = {
    "full": None,   # save nothing: recompute the whole block in the backward pass
    "selective": jax.checkpoint_policies.save_only_these_names(*SELECTIVE_SAVED),
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
    # the deferred-W collections (common.deferred_weight_grads) are per layer, like the weights
    axes = {"params": 0, ROUTER_BIAS: 0, WGRAD_INPUTS: 0, WGRAD_TAPS: 0}
    common = dict(variable_axes=axes, split_rngs={"params": True},
                  length=length, metadata_params={nn.PARTITION_NAME: "layers"},
                  unroll=min(cfg.scan_unroll, max(length, 1)))
    scanned = nn.scan(cls, methods={
        "__call__": dict(common, in_axes=(nn.broadcast, nn.broadcast)),
        "decode": dict(common, in_axes=(nn.broadcast, 0, nn.broadcast)),
    })
    return scanned(cfg, moe, name=name)
