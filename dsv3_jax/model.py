"""DeepSeek-V3: embedding, scanned dense and MoE blocks, final norm, head, MTP modules.

Public API:
  variables = init(cfg, rng)           # {"params": ..., "router_bias": ...}
  out = forward(cfg, variables, input_ids, positions=None, segment_ids=None)
  out.logits [B,T,V] f32, out.mtp_logits [D,B,T,V] f32, out.router / out.mtp_router RouterStats
  (counts [L,E], balance_loss [L]), out.hidden [B,T,D] (after the final norm).

`router_bias` holds the aux-loss-free selection bias of every MoE layer: a variable collection,
not a parameter, so no optimizer ever touches it; `update_router_bias` applies the paper's rule.
"""
from __future__ import annotations

import functools

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from dsv3_jax.config import ModelConfig
from dsv3_jax.layers.block import block_stack
from dsv3_jax.layers.common import RMSNorm, acc_dtype, dtype_of, normal_init
from dsv3_jax.layers.moe import ROUTER_BIAS, RouterStats
from dsv3_jax.layers.mtp import MTPModule, shift_left


@flax.struct.dataclass
class ModelOutputs:
    logits: jax.Array            # [B, T, V] float32
    mtp_logits: jax.Array        # [D, B, T, V] float32; depth k (1-based) predicts t_{i+k+1}
    router: RouterStats          # main MoE layers: counts [L_moe, E], balance_loss [L_moe]
    mtp_router: RouterStats      # MTP modules: counts [D, E], balance_loss [D]
    hidden: jax.Array            # [B, T, D] main-model hidden state after the final norm


def _empty_stats(cfg: ModelConfig) -> RouterStats:
    return RouterStats(jnp.zeros((0, cfg.n_routed_experts), jnp.int32), jnp.zeros((0,), jnp.float32))


class Transformer(nn.Module):
    cfg: ModelConfig

    def setup(self):
        cfg = self.cfg
        pdt = dtype_of(cfg.param_dtype)
        self.embed = self.param("embed", nn.with_logical_partitioning(
            normal_init(cfg), ("vocab", "embed")), (cfg.vocab_size, cfg.hidden_size), pdt)
        if cfg.num_dense_layers:
            self.dense_layers = block_stack(cfg, False, cfg.num_dense_layers, "dense_layers")
        if cfg.num_moe_layers:
            self.moe_layers = block_stack(cfg, True, cfg.num_moe_layers, "moe_layers")
        self.final_norm = RMSNorm(cfg)
        self.lm_head = self.param("lm_head", nn.with_logical_partitioning(
            normal_init(cfg), ("embed", "vocab")), (cfg.hidden_size, cfg.vocab_size), pdt)
        self.mtp = [MTPModule(cfg, name=f"mtp_{k}") for k in range(cfg.num_nextn_predict_layers)]

    def embed_tokens(self, ids_BT):
        return jnp.take(self.embed, ids_BT, axis=0).astype(dtype_of(self.cfg.dtype))

    def head(self, h_BTD):
        dt = dtype_of(self.cfg.dtype)
        # A 2-D GEMM: XLA:CPU's weight gradient of a 3-D x 2-D dot is ~2x slower.
        logits = jnp.dot(h_BTD.reshape(-1, h_BTD.shape[-1]).astype(dt), self.lm_head.astype(dt),
                         preferred_element_type=acc_dtype(self.cfg))
        return logits.reshape(*h_BTD.shape[:-1], -1)

    def __call__(self, input_ids, positions, segment_ids, with_mtp: bool = True):
        cfg = self.cfg
        x = self.embed_tokens(input_ids)
        if cfg.num_dense_layers:
            x, _ = self.dense_layers(x, positions, segment_ids)
        router = _empty_stats(cfg)
        if cfg.num_moe_layers:
            x, router = self.moe_layers(x, positions, segment_ids)
        hidden = self.final_norm(x)
        logits = self.head(hidden)

        mtp_logits, mtp_stats, h = [], [], hidden
        for k, module in enumerate(self.mtp if with_mtp else (), start=1):
            h, stats = module(h, self.embed_tokens(shift_left(input_ids, k)), positions, segment_ids)
            mtp_logits.append(self.head(h))
            mtp_stats.append(stats)
        if mtp_logits:
            mtp_logits = jnp.stack(mtp_logits)
            mtp_router = jax.tree.map(lambda *s: jnp.stack(s), *mtp_stats)
        else:
            mtp_logits = jnp.zeros((0,) + logits.shape, logits.dtype)
            mtp_router = _empty_stats(cfg)
        return ModelOutputs(logits, mtp_logits, router, mtp_router, hidden)


def _defaults(input_ids, positions, segment_ids):
    b, t = input_ids.shape
    if positions is None:
        positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    if segment_ids is None:
        segment_ids = jnp.ones((b, t), jnp.int32)
    return positions, segment_ids


def init_boxed(cfg: ModelConfig, rng: jax.Array):
    """Variables with their logical-axis metadata (nn.LogicallyPartitioned boxes)."""
    ids = jnp.zeros((1, 8), jnp.int32)
    pos, seg = _defaults(ids, None, None)
    return Transformer(cfg).init(rng, ids, pos, seg)


def init(cfg: ModelConfig, rng: jax.Array) -> dict:
    """Fresh variables: {"params": trainable weights (f32), "router_bias": selection biases}."""
    variables = jax.jit(functools.partial(init_boxed, cfg))(rng)
    return dict(nn.meta.unbox(variables))


def abstract_variables(cfg: ModelConfig):
    """Shapes and dtypes of the variables, no memory allocated."""
    return nn.meta.unbox(jax.eval_shape(functools.partial(init_boxed, cfg), jax.random.key(0)))


def logical_axes(cfg: ModelConfig):
    """The logical axis names of every variable, as PartitionSpecs of names (router_bias: layers)."""
    boxed = jax.eval_shape(functools.partial(init_boxed, cfg), jax.random.key(0))
    specs = nn.get_partition_spec(boxed)
    # router_bias carries no box; its leading axis is the scanned layer axis.
    specs[ROUTER_BIAS] = jax.tree.map(
        lambda x: jax.sharding.PartitionSpec(*(("layers", "expert") if x.ndim == 2 else ("expert",))),
        boxed[ROUTER_BIAS])
    return specs


def forward(cfg: ModelConfig, variables: dict, input_ids: jax.Array, *,
            positions: jax.Array | None = None, segment_ids: jax.Array | None = None,
            with_mtp: bool = True) -> ModelOutputs:
    """Full-sequence forward. segment_ids: packed-document ids (0 = padding), default all 1."""
    if input_ids.ndim != 2:
        raise ValueError(f"input_ids must be [batch, seq], got shape {input_ids.shape}")
    positions, segment_ids = _defaults(input_ids, positions, segment_ids)
    return Transformer(cfg).apply(variables, input_ids, positions, segment_ids, with_mtp)


def update_router_bias(router_bias: dict, counts_main: jax.Array, counts_mtp: jax.Array,
                       gamma) -> dict:
    """Aux-loss-free balancing (report §2.1.2): b_i += gamma * sign(mean load - load_i).

    counts are the expert loads of the whole global batch, [L_moe, E] and [D, E].
    """
    def step(bias, counts):
        load = counts.astype(jnp.float32)
        return bias + gamma * jnp.sign(load.mean(-1, keepdims=True) - load)

    out = jax.tree.map(lambda x: x, router_bias)
    if "moe_layers" in out:
        b = out["moe_layers"]["block"]["moe"]["bias"]
        out["moe_layers"]["block"]["moe"]["bias"] = step(b, counts_main)
    for k in range(counts_mtp.shape[0]):
        b = out[f"mtp_{k}"]["block"]["moe"]["bias"]
        out[f"mtp_{k}"]["block"]["moe"]["bias"] = step(b, counts_mtp[k])
    return out
