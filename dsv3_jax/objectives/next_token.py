"""Plain next-token prediction: the main head's CE only (no MTP loss, no balance loss).

The smallest objective, and the template for a new one (README, "Adding an objective"):
  python -m dsv3_jax.train --config.train.objective=next_token
"""
from __future__ import annotations

import dataclasses

from dsv3_jax import loss as loss_lib
from dsv3_jax import model
from dsv3_jax.config import ModelConfig
from dsv3_jax.objectives.pretrain import eval_step


@dataclasses.dataclass(frozen=True)
class NextToken:
    cfg: ModelConfig

    def loss(self, params, router_bias, batch, step):
        out = model.forward(self.cfg, {"params": params, "router_bias": router_bias},
                            batch["inputs"], positions=batch["positions"],
                            segment_ids=batch["segment_ids"], with_mtp=False)
        ce = loss_lib.masked_ce(out.logits, batch["targets"], batch["loss_mask"])
        return ce, {"ce": ce, "counts": out.router.counts, "mtp_counts": out.mtp_router.counts}

    def eval(self, params, router_bias, batch):
        return eval_step(params, router_bias, batch, self.cfg)


def make(c, cfg: ModelConfig) -> NextToken:
    # A model with MTP modules keeps them (e.g. SFT from a pre-trained checkpoint): they get no
    # gradient here, so only weight decay moves them.
    return NextToken(cfg)
