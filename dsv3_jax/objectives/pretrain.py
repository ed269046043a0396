"""The pre-training objective (report §2.2, §2.1.2): next-token CE + λ·MTP + α·balance.

  L = CE(main head) + λ(step) / D · Σ_k CE_k(MTP depth k) + α · Σ_layers L_bal

CE_k reads the targets of `layers.mtp.mtp_targets` (depth k at position i predicts t_{i+k+1},
nothing across a document boundary). L_bal is the complementary sequence-wise balance loss of
every MoE layer, MTP modules included (`balance.loss="batch"`: the same formula over the whole
micro-batch's tokens, the report's batch-wise auxiliary loss of §4.5.3). Validation is the main head's CE (MTP discarded), and
MaxVio measures the expert-load imbalance.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp

from dsv3_jax import loss as loss_lib
from dsv3_jax import model, optim, train_state
from dsv3_jax.config import ModelConfig
from dsv3_jax.layers.common import dtype_of
from dsv3_jax.layers.mtp import mtp_targets


def max_violation(counts_LE: jax.Array) -> jax.Array:
    """MaxVio = (max load - mean load) / mean load per layer (Wang et al. 2024)."""
    load = counts_LE.astype(jnp.float32)
    mean = jnp.maximum(load.mean(-1), 1e-9)
    return (load.max(-1) - mean) / mean


@dataclasses.dataclass(frozen=True)
class Pretrain:
    cfg: ModelConfig
    mtp_weight: Callable        # step -> λ
    alpha: float                # balance loss weight
    balance_loss: str = "sequence"   # "sequence" (report eqs. 17-20) or "batch" (§4.5.3)
    ce_chunk: int = 0           # > 0: head + CE fused over chunks of this many positions

    def loss(self, params, router_bias, batch: dict, step):
        return compute_loss(params, router_bias, batch, self, step)

    def eval(self, params, router_bias, batch: dict):
        return eval_step(params, router_bias, batch, self.cfg)

    def balance(self, stats):
        return _balance(self, stats)

    def stage_loss(self, stats):
        return stage_loss(self, stats)

    def tail_loss(self, params, router_bias, x_BTD, batch: dict, step):
        return tail_loss(self, params, router_bias, x_BTD, batch, step)


def compute_loss(params, router_bias, batch: dict, obj: Pretrain, step):
    """(loss, aux) of one micro-batch; aux: ce, mtp_ce, balance, mtp_weight and the loads."""
    cfg = obj.cfg
    out = model.forward(cfg, {"params": params, "router_bias": router_bias}, batch["inputs"],
                        positions=batch["positions"], segment_ids=batch["segment_ids"],
                        with_logits=not obj.ce_chunk)
    ce, mtp_ce, weight = _head_losses(obj, params, out, batch, step)
    # one complementary balance loss per MoE layer (MTP modules included), summed
    balance = _balance(obj, out.router) + _balance(obj, out.mtp_router)
    loss = ce + weight * mtp_ce + obj.alpha * balance
    aux = {"ce": ce, "mtp_ce": mtp_ce, "balance": balance, "mtp_weight": weight,
           "counts": out.router.counts, "mtp_counts": out.mtp_router.counts}
    return loss, aux


def _balance(obj: Pretrain, stats) -> jax.Array:
    """Σ over the layers of `stats` of their balance loss: sequence-wise or batch-wise."""
    return (stats.batch_balance_loss if obj.balance_loss == "batch" else stats.balance_loss).sum()


def _head_losses(obj: Pretrain, params, out: model.ModelOutputs, batch: dict, step):
    """(main CE, mean MTP CE over depths, λ(step)) from the model's outputs."""
    cfg = obj.cfg
    if obj.ce_chunk:          # head + CE fused, no [B, T, V] logits (dsv3_jax/loss.py)
        def ce_of(h_BTD, targets, mask):
            return loss_lib.head_ce(h_BTD, params["lm_head"], targets, mask, chunk=obj.ce_chunk,
                                    dtype=dtype_of(cfg.dtype))
        main_in, mtp_in = out.hidden, out.mtp_hidden       # what the head would read
    else:
        ce_of = loss_lib.masked_ce
        main_in, mtp_in = out.logits, out.mtp_logits
    ce = ce_of(main_in, batch["targets"], batch["loss_mask"])
    depth = cfg.num_nextn_predict_layers
    mtp_ces = [ce_of(mtp_in[k - 1], *mtp_targets(batch, k)) for k in range(1, depth + 1)]
    mtp_ce = sum(mtp_ces) / depth if depth else jnp.zeros((), jnp.float32)
    return ce, mtp_ce, obj.mtp_weight(step)


# The same loss cut into pipeline stages (dsv3_jax/pipeline/executor.py): the first stage runs
# model.forward_front, every stage a slice of the MoE stack and adds `stage_loss` of its layers,
# the last stage adds `tail_loss`. Summed over stages, they are compute_loss's loss and aux.

def stage_loss(obj: Pretrain, stats) -> jax.Array:
    """α · Σ L_bal over one stage's MoE layers."""
    return obj.alpha * _balance(obj, stats)


def tail_loss(obj: Pretrain, params, router_bias, x_BTD, batch: dict, step):
    """The last stage: final norm, MTP modules and head on the MoE stack's output x. aux holds
    ce, mtp_ce, the MTP layers' balance (`balance`), mtp_weight and mtp_counts."""
    out = model.forward_tail(obj.cfg, {"params": params, "router_bias": router_bias}, x_BTD,
                             batch["inputs"], batch["positions"], batch["segment_ids"],
                             with_logits=not obj.ce_chunk)
    ce, mtp_ce, weight = _head_losses(obj, params, out, batch, step)
    balance = _balance(obj, out.mtp_router)
    loss = ce + weight * mtp_ce + obj.alpha * balance
    return loss, {"ce": ce, "mtp_ce": mtp_ce, "balance": balance, "mtp_weight": weight,
                  "mtp_counts": out.mtp_router.counts}


def eval_step(params, router_bias, batch: dict, cfg: ModelConfig):
    """Summed validation NLL of the main head, token count and expert loads of one batch."""
    out = model.forward(cfg, {"params": params, "router_bias": router_bias}, batch["inputs"],
                        positions=batch["positions"], segment_ids=batch["segment_ids"],
                        with_mtp=False)
    mask = batch["loss_mask"].astype(jnp.float32)
    ce = loss_lib.masked_ce(out.logits, batch["targets"], mask)
    return ce * mask.sum(), mask.sum(), out.router.counts


def make(c, cfg: ModelConfig) -> Pretrain:
    m = c.mtp
    switch = train_state.batch_schedule(c).step_at(m.lambda_switch)   # tokens -> step
    return Pretrain(cfg=cfg,
                    mtp_weight=optim.piecewise_constant((m.lambda_start, m.lambda_end), (switch,)),
                    alpha=c.balance.alpha, balance_loss=c.balance.loss,
                    ce_chunk=int(c.train.ce_chunk))
