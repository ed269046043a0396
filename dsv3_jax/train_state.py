"""The train state and what sizes it: init, sharding specs, the optimizer from the config, the
batch schedule, and FLOPs per token. No host loop here: plan.py and every training stage import
this module without importing a trainer.

  state = {"step", "params", "opt_state", "router_bias", "rng", "nonfinite_step"[, "ema"]}
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from dsv3_jax import model, optim, params as params_lib, sharding
from dsv3_jax.config import ConfigError, ModelConfig


def make_optimizer(c):
    """(optimizer, lr schedule) of config sections optim and train.steps."""
    o = c.optim
    lr = optim.lr_schedule(o.peak_lr, c.train.steps, warmup_steps=o.warmup_steps,
                           constant_until=o.constant_until, decay_until=o.decay_until,
                           tail1_until=o.tail1_until, final_frac=o.get("final_frac", 0.1))
    optimizer = optim.make_optimizer(lr, b1=o.b1, b2=o.b2, eps=o.eps,
                                     weight_decay=o.weight_decay, clip_norm=o.clip_norm,
                                     moments_dtype=o.moments_dtype)
    return optimizer, lr


def init_state(cfg: ModelConfig, optimizer, seed: int, ema: bool) -> dict:
    rng = jax.random.key(seed)
    variables = model.init(cfg, jax.random.fold_in(rng, 0))
    return state_from_variables(variables, optimizer, jax.random.fold_in(rng, 1), ema)


def state_from_variables(variables: dict, optimizer, rng: jax.Array, ema: bool) -> dict:
    """A step-0 state around given weights: fresh optimizer moments, EMA = the weights."""
    state = {"step": jnp.zeros((), jnp.int32), "params": variables["params"],
             "opt_state": optimizer.init(variables["params"]),
             "router_bias": variables.get("router_bias", {}),
             "rng": jax.random.key_data(rng),
             "nonfinite_step": jnp.full((), -1, jnp.int32)}
    if ema:
        state["ema"] = jax.tree.map(jnp.copy, variables["params"])
    return state


def state_specs(abstract_state, cfg: ModelConfig, optimizer, mesh_shape,
                uneven: bool = False) -> dict:
    """PartitionSpecs of the whole state from the one rules table; optimizer moments also
    sharded over the ZeRO-1 axes; router biases, counters and the RNG replicated."""
    import optax
    from jax.sharding import PartitionSpec as P
    axes = model.logical_axes(cfg)["params"]
    is_spec = lambda x: isinstance(x, P)
    param_specs = jax.tree.map(lambda names, a: sharding.logical_to_mesh(tuple(names), a.shape,
                                                                       mesh_shape, uneven),
                               axes, abstract_state["params"], is_leaf=is_spec)
    moment = lambda leaf, spec: sharding.add_zero1(spec, leaf.shape, mesh_shape)
    opt_specs = optax.tree_map_params(optimizer, moment, abstract_state["opt_state"], param_specs,
                                      transform_non_params=lambda _: P(), is_leaf=is_spec)
    specs = jax.tree.map(lambda _: P(), abstract_state)
    specs.update(params=param_specs, opt_state=opt_specs)
    if "ema" in abstract_state:
        specs["ema"] = param_specs
    return specs


class BatchSchedule:
    """Global batch per step (an optional ramp in stages, report §4.2) as a number of
    micro-batches of `micro_batch` rows; each stage compiles the step once.

    ramp: "" (constant) or "frac:rows,frac:rows,..." e.g. "0:2,0.05:4,0.1:8" (rows from that
    fraction of the run on; the last stage should equal data.global_batch).
    """

    def __init__(self, global_batch: int, micro_batch: int, ramp: str, steps: int):
        micro_batch = micro_batch or global_batch
        stages = [(0.0, global_batch)]
        if ramp:
            try:
                stages = [(float(f), int(b)) for f, b in (p.split(":") for p in ramp.split(","))]
            except ValueError:
                raise ConfigError(f"data.batch_ramp must look like '0:2,0.1:4,0.2:8', got {ramp!r}")
        errors = [f"batch {b} is not a positive multiple of data.micro_batch={micro_batch}"
                  for _, b in stages if b <= 0 or b % micro_batch]
        if [f for f, _ in stages] != sorted(f for f, _ in stages) or stages[0][0] != 0:
            errors.append(f"data.batch_ramp fractions must start at 0 and increase: {ramp!r}")
        if errors:
            raise ConfigError("bad batch schedule: " + "; ".join(errors))
        self.micro_batch = micro_batch
        per_step = np.zeros(steps, np.int64)
        for frac, rows in stages:
            per_step[int(round(frac * steps)):] = rows // micro_batch
        self.micro_per_step = per_step
        self.first_micro = np.concatenate([[0], np.cumsum(per_step)])   # micro index of each step

    def rows(self, step: int) -> int:
        return int(self.micro_per_step[step]) * self.micro_batch

    def batch(self, data_iter, step: int) -> dict:
        """[micro, rows, T] arrays: micro-batches first_micro[step] ... of the data stream."""
        idx = range(int(self.first_micro[step]), int(self.first_micro[step + 1]))
        parts = [data_iter.batch(i) for i in idx]
        return {k: np.stack([p[k] for p in parts]) for k in parts[0]}


def model_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """6 x activated matmul parameters (fwd+bwd; from params.count_params: the main model's
    activated parameters less the embedding lookup and the router biases; MTP is training-only
    extra work) + causal attention scores and values."""
    counts = params_lib.count_params(cfg)
    active = (counts["activated"] - counts["breakdown"]["embedding"]
              - counts["breakdown"].get("router_bias", 0))
    attn = (cfg.num_hidden_layers * cfg.num_attention_heads
            * (cfg.qk_head_dim + cfg.v_head_dim) * seq_len)   # 2 flops x T/2 causal keys x 2 GEMMs
    return 6.0 * active + 3.0 * attn
