"""DeepSeekMoE (spec §3): shared experts + fine-grained routed experts, sigmoid affinities,
group-limited top-k with a selection-only bias, normalised gates times routed_scaling_factor,
computed dropless with a grouped GEMM whose cost follows tokens x top-k.
"""
from __future__ import annotations

from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from dsv3_jax.config import ModelConfig
from dsv3_jax.layers.common import SwiGLU, acc_dtype, dtype_of, normal_init
from kernels_pallas.grouped_gemm import grouped_matmul

ROUTER_BIAS = "router_bias"   # the non-trainable variable collection of the selection bias


class Routing(NamedTuple):
    experts_NP: jax.Array      # int32 chosen experts per token
    gates_NP: jax.Array        # float32 gate values (unbiased, normalised, scaled)
    scores_NE: jax.Array       # float32 sigmoid affinities s_i


class RouterStats(NamedTuple):
    counts: jax.Array          # [E] int32 tokens routed to each expert (valid tokens only)
    balance_loss: jax.Array    # [] float32 sequence-wise balance term sum_i f_i P_i (before alpha)


def route(scores_NE: jax.Array, bias_E: jax.Array, cfg: ModelConfig) -> Routing:
    """Group-limited top-k on s + b; gates from the unbiased s (report eqs. 13-16)."""
    n, e = scores_NE.shape
    choice = scores_NE + bias_E[None, :]
    if cfg.n_group > 1:
        grouped = choice.reshape(n, cfg.n_group, e // cfg.n_group)
        group_score = jax.lax.top_k(grouped, 2)[0].sum(-1)                     # [N, G]
        _, keep = jax.lax.top_k(group_score, cfg.topk_group)                   # [N, topk_group]
        group_mask = jnp.zeros((n, cfg.n_group), bool).at[jnp.arange(n)[:, None], keep].set(True)
        expert_mask = jnp.repeat(group_mask, e // cfg.n_group, axis=1)
        choice = jnp.where(expert_mask, choice, -jnp.inf)
    _, experts = jax.lax.top_k(choice, cfg.num_experts_per_tok)
    gates = jnp.take_along_axis(scores_NE, experts, axis=-1)
    if cfg.norm_topk_prob:
        gates = gates / (gates.sum(-1, keepdims=True) + 1e-20)
    return Routing(experts.astype(jnp.int32), gates * cfg.routed_scaling_factor, scores_NE)


def router_stats(routing: Routing, valid_BT: jax.Array, cfg: ModelConfig) -> RouterStats:
    """Expert loads and the complementary sequence-wise balance loss (report eqs. 17-20).

    f_i = E/(K T) * #tokens of the sequence that selected i (the actual routed set);
    P_i = mean_t s_it / sum_j s_jt; loss = mean over sequences of sum_i f_i P_i.
    """
    b, t = valid_BT.shape
    e, k = cfg.n_routed_experts, cfg.num_experts_per_tok
    acc = routing.scores_NE.dtype
    valid = valid_BT.reshape(-1).astype(acc)
    onehot = jax.nn.one_hot(routing.experts_NP, e, dtype=acc).sum(1)          # [N, E]
    counts = jnp.einsum("ne,n->e", onehot, valid).astype(jnp.int32)
    per_seq_tokens = jnp.maximum(valid_BT.astype(acc).sum(-1), 1.0)          # [B]
    sel_BTE = (onehot * valid[:, None]).reshape(b, t, e)
    f = sel_BTE.sum(1) * (e / (k * per_seq_tokens[:, None]))
    s_norm = routing.scores_NE / routing.scores_NE.sum(-1, keepdims=True)
    p = (s_norm * valid[:, None]).reshape(b, t, e).sum(1) / per_seq_tokens[:, None]
    has_tokens = (valid_BT.sum(-1) > 0).astype(acc)
    loss = ((f * p).sum(-1) * has_tokens).sum() / jnp.maximum(has_tokens.sum(), 1.0)
    return RouterStats(counts, loss)


def default_tile_m(num_slots: int, num_experts: int) -> int:
    """Rows per grouped-GEMM tile: padding costs at most E*(tile_m-1) rows, so keep E*tile_m
    near a quarter of the routed rows; a power of two in [8, 128]."""
    target = max(num_slots // (4 * num_experts), 8)
    return int(min(128, 1 << (target.bit_length() - 1)))


class Dispatch(NamedTuple):
    """Where each (token, slot) goes in the expert-sorted, tile-padded buffer."""
    src_slot_M: jax.Array      # [M] flat (token*P + slot) feeding each buffer row; N*P = padding
    dest_row_NP: jax.Array     # [N, P] buffer row of each (token, slot): the inverse map
    tile_expert: jax.Array     # [M // tile_m] expert of each tile
    used_tiles: jax.Array      # [] int32 tiles holding routed rows; the rest are padding
    tile_m: int


def plan_dispatch(experts_NP: jax.Array, num_experts: int, tile_m: int) -> Dispatch:
    """Sort slots by expert; pad each expert's group to whole tiles (static size bound)."""
    n, p = experts_NP.shape
    slots = n * p
    num_tiles = min(-(-slots // tile_m) + num_experts, slots)   # >= sum_e ceil(count_e / tile_m)
    flat_e = experts_NP.reshape(-1)
    order = jnp.argsort(flat_e, stable=True)
    sorted_e = flat_e[order]
    counts = jnp.bincount(flat_e, length=num_experts)
    group_start = jnp.cumsum(counts) - counts                     # first sorted slot of expert e
    tiles = -(-counts // tile_m)
    tile_end = jnp.cumsum(tiles)
    row_start = (tile_end - tiles) * tile_m                       # first buffer row of expert e
    dest_sorted = (row_start[sorted_e] + jnp.arange(slots) - group_start[sorted_e]).astype(jnp.int32)
    dest = jnp.zeros(slots, jnp.int32).at[order].set(dest_sorted)
    src = jnp.full(num_tiles * tile_m, slots, jnp.int32).at[dest_sorted].set(order.astype(jnp.int32))
    tile_expert = jnp.minimum(jnp.searchsorted(tile_end, jnp.arange(num_tiles), side="right"),
                              num_experts - 1).astype(jnp.int32)
    return Dispatch(src, dest.reshape(n, p), tile_expert, tile_end[-1].astype(jnp.int32), tile_m)


# Both maps are gathers, and each one's transpose is a gather through the other map, so neither
# direction needs a scatter-add (slow on CPU, atomics on GPU). The Pallas kernels in
# kernels_pallas/moe_dispatch.py implement the same two functions.

def _gather_rows(x, idx):
    """x[idx] with out-of-range idx (the padding sentinel) giving zero rows."""
    return jnp.take(x, idx, axis=0, mode="fill", fill_value=0)


@jax.custom_vjp
def permute(x_ND: jax.Array, plan: Dispatch) -> jax.Array:
    """Token rows -> expert-sorted buffer [M, D] (padding rows are zero)."""
    p = plan.dest_row_NP.shape[1]
    return _gather_rows(x_ND, jnp.where(plan.src_slot_M < x_ND.shape[0] * p,
                                        plan.src_slot_M // p, x_ND.shape[0]))


def _permute_fwd(x_ND, plan):
    return permute(x_ND, plan), plan


def _permute_bwd(plan, d_MD):
    # each token's gradient is the sum of its P buffer rows
    return _gather_rows(d_MD, plan.dest_row_NP).sum(1), None


permute.defvjp(_permute_fwd, _permute_bwd)


@jax.custom_vjp
def unpermute_combine(y_MD: jax.Array, plan: Dispatch, gates_NP: jax.Array) -> jax.Array:
    """Buffer rows back to tokens, weighted by the gates and summed over the top-k slots."""
    y_NPD = _gather_rows(y_MD, plan.dest_row_NP)
    return jnp.einsum("NPD,NP->ND", y_NPD.astype(gates_NP.dtype), gates_NP)


def _unpermute_fwd(y_MD, plan, gates_NP):
    return unpermute_combine(y_MD, plan, gates_NP), (y_MD, plan, gates_NP)


def _unpermute_bwd(res, d_ND):
    y_MD, plan, gates_NP = res
    n, p = gates_NP.shape
    d_gates = jnp.einsum("NPD,ND->NP", _gather_rows(y_MD, plan.dest_row_NP).astype(d_ND.dtype),
                         d_ND)
    # buffer row r came from slot src[r] = token*P + j: its gradient is g[token, j] * d[token]
    scaled = (d_ND[:, None, :] * gates_NP[:, :, None]).reshape(n * p, -1)
    d_y = _gather_rows(scaled, plan.src_slot_M).astype(y_MD.dtype)
    return d_y, None, d_gates.astype(gates_NP.dtype)


unpermute_combine.defvjp(_unpermute_fwd, _unpermute_bwd)


class RoutedExperts(nn.Module):
    """E SwiGLU experts stored stacked [E, D, F] / [E, F, D]."""
    cfg: ModelConfig

    def setup(self):
        cfg = self.cfg
        e, d, f = cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size
        pdt = dtype_of(cfg.param_dtype)
        init = nn.with_logical_partitioning(normal_init(cfg), ("expert", "embed", "moe_mlp"))
        self.gate = self.param("gate", init, (e, d, f), pdt)
        self.up = self.param("up", init, (e, d, f), pdt)
        self.down = self.param("down", nn.with_logical_partitioning(
            normal_init(cfg), ("expert", "moe_mlp", "embed")), (e, f, d), pdt)

    def _gmm(self, lhs, rhs, plan: Dispatch):
        cfg = self.cfg
        if cfg.fp8:
            from dsv3_jax import fp8
            return fp8.fp8_grouped_dot(lhs, rhs, plan.tile_expert, tile_m=plan.tile_m,
                                       implementation=cfg.gemm_impl)
        return grouped_matmul(lhs, rhs.astype(lhs.dtype), plan.tile_expert, tile_m=plan.tile_m,
                              used_tiles=plan.used_tiles)

    def sorted(self, x_ND, routing: Routing):
        """Dropless: permute by expert, grouped SwiGLU, unpermute + gate-weighted combine."""
        cfg = self.cfg
        n, p = routing.experts_NP.shape
        tile_m = cfg.moe_tile_m or default_tile_m(n * p, cfg.n_routed_experts)
        plan = plan_dispatch(routing.experts_NP, cfg.n_routed_experts, tile_m)
        x_MD = permute(x_ND, plan)
        h = nn.silu(self._gmm(x_MD, self.gate, plan)) * self._gmm(x_MD, self.up, plan)
        y_MD = self._gmm(h, self.down, plan)
        return unpermute_combine(y_MD, plan, routing.gates_NP)

    def dense(self, x_ND, routing: Routing):
        """Reference: every token through every expert, masked by the gates (cost x E)."""
        dt = x_ND.dtype
        combine_NE = jnp.zeros((x_ND.shape[0], self.cfg.n_routed_experts), routing.gates_NP.dtype)
        combine_NE = combine_NE.at[jnp.arange(x_ND.shape[0])[:, None], routing.experts_NP].add(
            routing.gates_NP)
        h = (nn.silu(jnp.einsum("ND,EDF->NEF", x_ND, self.gate.astype(dt)))
             * jnp.einsum("ND,EDF->NEF", x_ND, self.up.astype(dt)))
        y = jnp.einsum("NEF,EFD->NED", h, self.down.astype(dt))
        return jnp.einsum("NED,NE->ND", y.astype(combine_NE.dtype), combine_NE)

    def __call__(self, x_ND, routing: Routing):
        if self.cfg.moe_impl == "dense":
            return self.dense(x_ND, routing)
        return self.sorted(x_ND, routing)


class MoE(nn.Module):
    """h = sum_shared FFN_s(u) + sum_{i in top-k} g_i FFN_i(u); returns (h, RouterStats)."""
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x_BTD: jax.Array, valid_BT: jax.Array):
        cfg = self.cfg
        b, t, d = x_BTD.shape
        x_ND = x_BTD.reshape(b * t, d)
        w_router = self.param("router", nn.with_logical_partitioning(
            normal_init(cfg), ("embed", "expert")), (d, cfg.n_routed_experts),
            dtype_of(cfg.param_dtype))
        acc = acc_dtype(cfg)
        bias = self.variable(ROUTER_BIAS, "bias", jnp.zeros, (cfg.n_routed_experts,), acc)
        # Gating stays in float32 (report §3.3.2), at full matmul precision.
        logits = jnp.dot(x_ND.astype(acc), w_router.astype(acc), precision=jax.lax.Precision.HIGHEST)
        routing = route(jax.nn.sigmoid(logits), bias.value.astype(acc), cfg)
        routed = RoutedExperts(cfg, name="experts")(x_ND, routing)
        out = routed.astype(x_BTD.dtype).reshape(b, t, d)
        if cfg.n_shared_experts:
            out = out + SwiGLU(cfg, cfg.n_shared_experts * cfg.moe_intermediate_size,
                               width_axis="moe_mlp", name="shared")(x_BTD)
        return out, router_stats(routing, valid_BT, cfg)
