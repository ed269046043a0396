"""DeepSeekMoE (spec §3): shared experts + fine-grained routed experts, sigmoid affinities,
group-limited top-k with a selection-only bias, normalised gates times routed_scaling_factor,
computed dropless with a grouped GEMM whose cost follows tokens x top-k. Expert parallelism
(the all-to-all over the `expert` axis) is in `moe_ep`.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from dsv3_jax.config import ModelConfig
from dsv3_jax.layers import tp
from dsv3_jax.layers.common import (WGRAD_INPUTS, WGRAD_TAPS, SwiGLU, acc_dtype, deferring,
                                     dtype_of, normal_init)
from kernels_pallas import interpret_default, moe_dispatch
from kernels_pallas.grouped_gemm import grouped_swiglu, grouped_swiglu_deferred

ROUTER_BIAS = "router_bias"   # the non-trainable variable collection of the selection bias


class Routing(NamedTuple):
    experts_NP: jax.Array      # int32 chosen experts per token
    gates_NP: jax.Array        # float32 gate values (unbiased, normalised, scaled)
    scores_NE: jax.Array       # float32 sigmoid affinities s_i


class RouterStats(NamedTuple):
    counts: jax.Array          # [E] int32 tokens routed to each expert (valid tokens only)
    balance_loss: jax.Array    # [] float32 sequence-wise balance term sum_i f_i P_i (before alpha)
    batch_balance_loss: jax.Array   # [] float32 the same over the whole (micro-)batch's tokens


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
    batch_balance_loss: the same formula with the batch's valid tokens as one sequence (report
    §4.5.3, the batch-wise auxiliary loss).
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
    all_tokens = jnp.maximum(valid.sum(), 1.0)
    f_batch = sel_BTE.sum((0, 1)) * (e / (k * all_tokens))
    p_batch = (s_norm * valid[:, None]).sum(0) / all_tokens
    return RouterStats(counts, loss, (f_batch * p_batch).sum())


def default_tile_m(num_slots: int, num_experts: int, share: int = 4) -> int:
    """Rows per grouped-GEMM tile: padding costs at most E*(tile_m-1) rows, so keep E*tile_m
    near 1/share of the routed rows; a power of two in [8, 128]."""
    target = max(num_slots // (share * num_experts), 8)
    return int(min(128, 1 << (target.bit_length() - 1)))


def tile_m_for(cfg: ModelConfig, num_slots: int, num_experts: int) -> int:
    """cfg.moe_tile_m, else the default: FP8's grouped GEMMs (jnp or Pallas) run one tile per
    program (share 4); the jnp SwiGLU loop runs each expert's tiles as chunks of up to
    grouped_gemm.CHUNK_ROWS rows whatever the tile, so its tiles only set the padding
    (share 16)."""
    return cfg.moe_tile_m or default_tile_m(num_slots, num_experts, 4 if cfg.fp8 else 16)


class Dispatch(NamedTuple):
    """Where each (token, slot) goes in the expert-sorted, tile-padded buffer."""
    src_slot_M: jax.Array      # [M] flat (token*P + slot) feeding each buffer row; N*P = padding
    dest_row_NP: jax.Array     # [N, P] buffer row of each (token, slot): the inverse map
    tile_expert: jax.Array     # [M // tile_m] expert of each tile
    used_tiles: jax.Array      # [] int32 tiles holding routed rows; the rest are padding
    tile_m: int


def dispatch_rows(num_slots: int, num_experts: int, tile_m: int,
                  trash_group: bool = False) -> int:
    """Rows M of plan_dispatch's tile-padded buffer: its static bound, ceil(slots / tile_m) +
    groups tiles (a partial tile per group), at most one tile per slot."""
    groups = num_experts + int(trash_group)
    return min(-(-num_slots // tile_m) + groups, num_slots) * tile_m


def plan_dispatch(experts_NP: jax.Array, num_experts: int, tile_m: int,
                  trash_group: bool = False) -> Dispatch:
    """Sort slots by expert; pad each expert's group to whole tiles (static size bound).

    trash_group: ids == num_experts mark rows to skip (empty all-to-all buffer rows); they are
    sorted last, and their tiles fall after `used_tiles`, so no GEMM ever runs on them.
    """
    groups = num_experts + int(trash_group)
    n, p = experts_NP.shape
    slots = n * p
    num_tiles = dispatch_rows(slots, num_experts, tile_m, trash_group) // tile_m   # >= sum_e
    #                                                                  ceil(count_e / tile_m)
    flat_e = experts_NP.reshape(-1)
    order = jnp.argsort(flat_e, stable=True)
    sorted_e = flat_e[order]
    counts = jnp.bincount(flat_e, length=groups)
    group_start = jnp.cumsum(counts) - counts                     # first sorted slot of expert e
    tiles = -(-counts // tile_m)
    tile_end = jnp.cumsum(tiles)
    row_start = (tile_end - tiles) * tile_m                       # first buffer row of expert e
    dest_sorted = (row_start[sorted_e] + jnp.arange(slots) - group_start[sorted_e]).astype(jnp.int32)
    dest = jnp.zeros(slots, jnp.int32).at[order].set(dest_sorted)
    src = jnp.full(num_tiles * tile_m, slots, jnp.int32).at[dest_sorted].set(order.astype(jnp.int32))
    tile_expert = jnp.minimum(jnp.searchsorted(tile_end, jnp.arange(num_tiles), side="right"),
                              num_experts - 1).astype(jnp.int32)
    used = tile_end[num_experts - 1].astype(jnp.int32)
    return Dispatch(src, dest.reshape(n, p), tile_expert, used, tile_m)


def dispatch_fns(plan: Dispatch, gates_NP: jax.Array, pallas: bool):
    """(permute x_ND -> x_MD, combine y_MD -> out_ND) through the plan: the Pallas kernels
    (interpreted off-GPU) or the jnp gathers, both from kernels_pallas/moe_dispatch.py."""
    p = plan.dest_row_NP.shape[1]
    if pallas:
        interpret = interpret_default()
        permute, combine = moe_dispatch.permute, moe_dispatch.unpermute_combine
    else:
        interpret = False
        permute, combine = moe_dispatch.permute_jnp, moe_dispatch.unpermute_combine_jnp
    return (lambda x: permute(x, plan.src_slot_M, p, dest_row_NP=plan.dest_row_NP,
                              interpret=interpret),
            lambda y: combine(y, plan.dest_row_NP, gates_NP, src_slot_M=plan.src_slot_M,
                              interpret=interpret))


def _fp8_gmm(lhs, rhs, plan: Dispatch, cfg: ModelConfig, cache_x: bool):
    from dsv3_jax import fp8
    return fp8.fp8_grouped_dot(lhs, rhs, plan.tile_expert, tile_m=plan.tile_m,
                               used_tiles=plan.used_tiles, implementation=cfg.gemm_impl,
                               pow2_scale=cfg.fp8_dispatch, cache_x=cache_x)


def _fp8_gate_up_weight(w_gate, w_up):
    """gate | up as one [E, D, 2 Fp] weight, each padded to whole 128-column blocks, so the
    weights' quantization blocks are those of the two matrices apart."""
    from dsv3_jax import fp8
    f = w_gate.shape[-1]
    pad = lambda w: jnp.pad(w, ((0, 0), (0, 0), (0, -f % fp8.TILE)))
    return jnp.concatenate([pad(w_gate), pad(w_up)], -1)


def _fp8_swiglu_down(gu, w_down, plan: Dispatch, cfg: ModelConfig, f: int):
    from dsv3_jax import fp8
    gate, up = gu[:, :f], gu[:, gu.shape[1] // 2:gu.shape[1] // 2 + f]
    return fp8.fp8_grouped_swiglu_down(gate, up, w_down, plan.tile_expert, tile_m=plan.tile_m,
                                       used_tiles=plan.used_tiles,
                                       implementation=cfg.gemm_impl,
                                       pow2_scale=cfg.fp8_dispatch, name="moe_gu")


def _fp8_experts(x_MD, w_gate, w_up, w_down, plan: Dispatch, cfg: ModelConfig, taps=None):
    """The routed experts' three FP8 GEMMs; each weight keeps its own 128x128 blocks. With
    fp8_cache_activations the up-projections cache their input in FP8 and the SwiGLU keeps only
    its FP8 inputs (named moe_gu), recomputing its output in the backward pass (§3.3.3).

    taps (caching recipe only): zero taps (dgu [M, 2 Fp] on the gate | up GEMM's output, dy
    [M, D] on the down-projection's), the weights under stop_gradient: returns (y, gu), the
    deferred weight gradients' inputs (fp8_experts_wgrad)."""
    if not cfg.fp8_cache_activations:
        gate, up = (checkpoint_name(_fp8_gmm(x_MD, w, plan, cfg, False), "moe_gu")
                    for w in (w_gate, w_up))
        return _fp8_gmm(nn.silu(gate) * up, w_down, plan, cfg, False)
    f = w_gate.shape[-1]
    sg = jax.lax.stop_gradient if taps is not None else (lambda w: w)
    # gate | up as one GEMM, so x is cached once
    gu = _fp8_gmm(x_MD, _fp8_gate_up_weight(sg(w_gate), sg(w_up)), plan, cfg, True)
    if taps is None:
        return _fp8_swiglu_down(gu, w_down, plan, cfg, f)
    gu = gu + taps[0].astype(gu.dtype)
    y = _fp8_swiglu_down(gu, sg(w_down), plan, cfg, f)
    return y + taps[1].astype(y.dtype), jax.lax.stop_gradient(gu)


def fp8_experts_wgrad(w_gate, w_up, w_down, x, gu, dgu, dy, tile_expert, used,
                      cfg: ModelConfig):
    """(dW_gate, dW_up, dW_down) float32 of `_fp8_experts`' deferred weight gradients, each from
    its GEMM's own VJP (FP8 Wgrad: the cached FP8 tiles of x, and of the SwiGLU inputs from
    which the down-projection's input is recomputed) at the stored input and the taps'
    cotangents: what the one-pass backward computes, in W."""
    tile_m = x.shape[0] // tile_expert.shape[0]
    plan = Dispatch(None, None, tile_expert, used, tile_m)
    f = w_gate.shape[-1]
    _, vjp = jax.vjp(lambda wg, wu: _fp8_gmm(x, _fp8_gate_up_weight(wg, wu), plan, cfg, True),
                     w_gate, w_up)
    dwg, dwu = vjp(dgu.astype(gu.dtype))
    _, vjp = jax.vjp(lambda wd: _fp8_swiglu_down(gu, wd, plan, cfg, f), w_down)
    dwd, = vjp(dy.astype(gu.dtype))
    return tuple(w.astype(jnp.float32) for w in (dwg, dwu, dwd))


def gathered_experts(x_ND, experts_NP, gates_NP, w_gate, w_up, w_down):
    """Each (token, slot) runs its own expert's weights, gathered: [N*P, D, F] per matrix.

    Reads N*P expert matrices and does no sort, padding or tile loop, so it wins while N*P is
    about the expert count or less (decoding, speculative verification). The weight gradient is
    a scatter-add into the touched experts.
    """
    n, p = experts_NP.shape
    e_S = experts_NP.reshape(-1)
    x_SD = jnp.repeat(x_ND, p, axis=0)
    take = lambda w: w[e_S].astype(x_ND.dtype)
    h_SF = (nn.silu(jnp.einsum("SD,SDF->SF", x_SD, take(w_gate)))
            * jnp.einsum("SD,SDF->SF", x_SD, take(w_up)))
    y_NPD = jnp.einsum("SF,SFD->SD", h_SF, take(w_down)).reshape(n, p, -1)
    return jnp.einsum("NPD,NP->ND", y_NPD.astype(gates_NP.dtype), gates_NP)


def use_gather(cfg: ModelConfig, num_slots: int) -> bool:
    """moe_impl 'gather', or 'auto' with few routed slots: at most max(E, 32), where the sorted
    path's tiles hold ~1 row each and its sort and tile loop are overhead (decode, speculative
    verification). Never for FP8 or the Pallas kernels, which only the sorted path runs."""
    if cfg.moe_impl != "auto":
        return cfg.moe_impl == "gather"
    return (not cfg.fp8 and cfg.gemm_impl == "jnp"
            and num_slots <= max(cfg.n_routed_experts, 32))


def sorted_experts(x_ND, experts_NP, gates_NP, w_gate, w_up, w_down, cfg: ModelConfig, *,
                   num_experts: int, trash_group: bool = False, taps: tuple | None = None):
    """Dropless: permute by expert, grouped SwiGLU, unpermute + gate-weighted combine.

    taps: (dgu [M, 2F], dy [M, D]) zero taps (M = dispatch_rows), to defer the experts' weight
    gradients (the pipeline's split W; common.deferred_weight_grads): the grouped SwiGLU takes
    its weights under stop_gradient, the taps' cotangents are its output gradients, and the
    result is (out, store) with store {"x", "gu", "tile_expert", "used"}: what W needs."""
    n, p = experts_NP.shape
    with jax.named_scope("dispatch_plan"):
        plan = plan_dispatch(experts_NP, num_experts, tile_m_for(cfg, n * p, num_experts),
                             trash_group)
        plan = Dispatch(*(checkpoint_name(a, "moe_dispatch") for a in plan[:4]), plan.tile_m)
    permute, combine = dispatch_fns(plan, gates_NP, cfg.gemm_impl == "pallas")
    with jax.named_scope("dispatch"):
        x_MD = permute(x_ND)
    if taps is not None and taps[0].shape[0] != x_MD.shape[0]:
        raise ValueError(f"taps for {taps[0].shape[0]} rows, the buffer has {x_MD.shape[0]} "
                         "(moe.dispatch_rows)")
    sg = jax.lax.stop_gradient
    with jax.named_scope("experts"):
        if cfg.fp8:
            y_MD = _fp8_experts(x_MD, w_gate, w_up, w_down, plan, cfg, taps)
            if taps is not None:
                y_MD, gu = y_MD
        elif taps is not None:
            y_MD, gu = grouped_swiglu_deferred(
                x_MD, sg(w_gate), sg(w_up), sg(w_down), plan.tile_expert, *taps,
                tile_m=plan.tile_m, used_tiles=plan.used_tiles)
        else:         # the three GEMMs of each expert in one loop (kernels_pallas/grouped_gemm.py)
            y_MD = grouped_swiglu(x_MD, w_gate, w_up, w_down, plan.tile_expert,
                                  tile_m=plan.tile_m, used_tiles=plan.used_tiles)
    with jax.named_scope("combine"):
        out = combine(checkpoint_name(y_MD, "moe_out"))
    if taps is None:
        return out
    used = plan.tile_expert.shape[0] if plan.used_tiles is None else plan.used_tiles
    return out, {"x": sg(x_MD), "gu": sg(gu), "tile_expert": sg(plan.tile_expert),
                 "used": jnp.asarray(sg(used), jnp.int32)}


def gate_up_width(cfg: ModelConfig) -> int:
    """Columns of the routed experts' gate | up pre-activations (the deferred store's gu): 2F,
    under FP8 each half padded to whole 128-column blocks (_fp8_gate_up_weight)."""
    f = cfg.moe_intermediate_size
    return 2 * (-(-f // 128) * 128 if cfg.fp8 else f)


def experts_wgrad(weights: tuple, x, gu, dgu, dy, tile_expert, used, cfg: ModelConfig):
    """(dW_gate, dW_up, dW_down) float32 of sorted_experts' deferred weight gradients from its
    store and the taps' cotangents: FP8's GEMM VJPs (fp8_experts_wgrad) or the grouped
    SwiGLU's dW loop (grouped_swiglu_wgrad)."""
    from kernels_pallas.grouped_gemm import grouped_swiglu_wgrad
    if cfg.fp8:
        return fp8_experts_wgrad(*weights, x, gu, dgu, dy, tile_expert, used, cfg)
    tile_m = x.shape[0] // tile_expert.shape[0]
    return grouped_swiglu_wgrad(x, gu, dgu, dy, tile_expert, used, tile_m=tile_m,
                                num_experts=weights[0].shape[0])


def _active_mesh():
    """The mesh set by the trainer (jax.set_mesh), if it splits the batch; else None."""
    from dsv3_jax.sharding import BATCH_AXES
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return None
    ways = 1
    for a in BATCH_AXES:
        ways *= mesh.shape.get(a, 1)
    return mesh if ways > 1 else None


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
        # with `tensor` manual (pipeline stages) each device holds a slice of every expert's
        # width: the tokens and gates enter it replicated (tp.copy sums their partial
        # cotangents) and the partial outputs are summed after the combine
        if not tp.active():
            return self._experts(x_ND, routing)
        routing = routing._replace(gates_NP=tp.copy(routing.gates_NP))
        return tp.reduce(self._experts(tp.copy(x_ND), routing))

    def _experts(self, x_ND, routing: Routing):
        cfg = self.cfg
        if cfg.moe_impl == "dense":
            return self.dense(x_ND, routing)
        # The master weights go in as they are: the grouped GEMMs (and FP8's quantizer) cast
        # them per tile and return their weight gradient in the master dtype (FP32
        # accumulation, not rounded to the compute dtype).
        from dsv3_jax.layers import moe_ep
        weights = [self.gate, self.up, self.down]
        mesh = _active_mesh()
        # the pipeline's split W defers these weight gradients (BF16, FP32, and FP8 with its
        # activation caching; FP8 without keeps them in B): zero taps on the gate | up GEMM's
        # output and the down-projection's, their input and layout kept for W
        defer = deferring(self) and (not cfg.fp8 or cfg.fp8_cache_activations)
        if mesh is None and use_gather(cfg, routing.experts_NP.size):
            return gathered_experts(x_ND, routing.experts_NP, routing.gates_NP, *weights)
        taps = None
        if defer:
            slots = routing.experts_NP.size
            if mesh is None:
                m = moe_ep.ep_store_rows(cfg, slots, 1)[0]
            else:   # per device: its own buffer of received rows
                devices = math.prod(mesh.shape[a] for a in moe_ep.batch_axes(mesh))
                m = devices * moe_ep.ep_store_rows(cfg, slots // devices, mesh.shape["expert"])[0]
            zeros = lambda n: jnp.zeros((m, n), x_ND.dtype)
            taps = (self.perturb("dgu", zeros(gate_up_width(cfg)),
                                 collection=WGRAD_TAPS),
                    self.perturb("dy", zeros(cfg.hidden_size), collection=WGRAD_TAPS))
        if mesh is not None:
            out = moe_ep.expert_parallel(x_ND, routing, *weights, cfg, mesh, taps=taps)
        else:
            out = sorted_experts(x_ND, routing.experts_NP, routing.gates_NP, *weights, cfg,
                                 num_experts=cfg.n_routed_experts, taps=taps)
        if taps is None:
            return out
        out, store = out
        for name, v in store.items():
            self.put_variable(WGRAD_INPUTS, name, v)
        return out


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
        with jax.named_scope("routing"):
            logits = jnp.dot(x_ND.astype(acc), w_router.astype(acc),
                             precision=jax.lax.Precision.HIGHEST)
            # saved by remat="selective": the affinities and the chosen experts and gates (the
            # routing is not recomputed; the f32 copy of the normed input is)
            routing = route(checkpoint_name(jax.nn.sigmoid(logits), "moe_route"),
                            bias.value.astype(acc), cfg)
            routing = routing._replace(experts_NP=checkpoint_name(routing.experts_NP, "moe_route"),
                                       gates_NP=checkpoint_name(routing.gates_NP, "moe_route"))
        routed = RoutedExperts(cfg, name="experts")(x_ND, routing)
        out = routed.astype(x_BTD.dtype).reshape(b, t, d)
        if cfg.n_shared_experts:
            out = out + SwiGLU(cfg, cfg.n_shared_experts * cfg.moe_intermediate_size,
                               width_axis="moe_mlp", name="shared")(x_BTD)
        return out, router_stats(routing, valid_BT, cfg)
