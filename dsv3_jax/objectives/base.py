"""What the trainer asks of an objective, and how it finds one by name.

An objective is a frozen (hashable) object with

  loss(params, router_bias, batch, step) -> (loss, aux)
      the scalar to minimise for one micro-batch [rows, T]; aux is a dict of float32 scalars
      to log (averaged over micro-batches), plus `counts` and `mtp_counts` ([L, E] expert
      loads of the main and MTP MoE layers, summed over micro-batches), from which the step
      nudges the aux-loss-free router biases and computes MaxVio;
  eval(params, router_bias, batch) -> (nll_sum, tokens, counts)
      summed validation NLL, token count and main-layer expert loads of one batch.

`train_step` differentiates `loss` with respect to params only; router biases are state the
step updates outside the gradient.
"""
from __future__ import annotations

import importlib
from typing import Protocol

import jax

from dsv3_jax.config import ConfigError, ModelConfig

LOAD_KEYS = ("counts", "mtp_counts")   # aux entries summed (not averaged) over micro-batches


class Objective(Protocol):
    def loss(self, params, router_bias, batch: dict, step: jax.Array) -> tuple[jax.Array, dict]:
        ...

    def eval(self, params, router_bias, batch: dict) -> tuple[jax.Array, jax.Array, jax.Array]:
        ...


def make(c, cfg: ModelConfig) -> Objective:
    """The objective `c.train.objective` names: a module of dsv3_jax.objectives or a dotted
    module path; the module's `make(c, cfg)` builds it."""
    name = c.train.objective
    module_name = name if "." in name else f"dsv3_jax.objectives.{name}"
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name != module_name and not module_name.startswith(f"{e.name}."):
            raise
        raise ConfigError(f"train.objective: no module {module_name!r} (built in: pretrain, "
                          f"next_token; or a dotted module path with make(c, cfg))") from None
    if not hasattr(module, "make"):
        raise ConfigError(f"train.objective: {module_name} has no make(c, cfg)")
    return module.make(c, cfg)
