"""The train state and what sizes it: init, sharding specs, the optimizer from the config, the
batch schedule, and FLOPs per token. No host loop here: plan.py and every training stage import
this module without importing a trainer.

  state = {"step", "params", "opt_state", "router_bias", "rng", "nonfinite_step"[, "ema"]}
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from dsv3_jax import model, optim, params as params_lib, sharding
from dsv3_jax.config import ConfigError, ModelConfig


def batch_schedule(c) -> "BatchSchedule":
    """The run's batch per step (config data.* and train.steps)."""
    return BatchSchedule(c.data.global_batch, c.data.micro_batch, c.data.batch_ramp,
                         c.train.steps, c.data.seq_len)


def make_optimizer(c, schedule: "BatchSchedule | None" = None):
    """(optimizer, lr schedule) of config sections optim and train.steps; the LR boundaries are
    token counts (or fractions of the run's tokens) turned into steps by the batch schedule."""
    o = c.optim
    at = (schedule or batch_schedule(c)).step_at
    lr = optim.lr_schedule(o.peak_lr, warmup_steps=o.warmup_steps,
                           constant_until=at(o.constant_until), decay_until=at(o.decay_until),
                           tail1_until=at(o.tail1_until), final_frac=o.final_frac)
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


def params_specs(cfg: ModelConfig, params, mesh_shape, uneven: bool = False,
                 gathered: bool = False) -> dict:
    """PartitionSpecs of the parameters from the rules table (params: arrays or shapes).

    With a pipeline, the MoE stack is sharded over `pipeline` by stage (its `layers` axis). The
    other parameters (embedding, dense layers, head, MTP modules) run on the first or last stage
    of every rank's copy of the program: at rest they are sharded over `pipeline` too, on their
    first dim that divides, and the pipeline executor gathers them once per step (FSDP-style);
    `gathered=True` is that in-step layout (replicated over `pipeline`)."""
    from jax.sharding import PartitionSpec as P
    axes = model.logical_axes(cfg)["params"]
    is_spec = lambda x: isinstance(x, P)
    spec_of = lambda shape_: lambda names, a: sharding.logical_to_mesh(tuple(names), a.shape,
                                                                       shape_, uneven)
    specs = jax.tree.map(spec_of(mesh_shape), axes, params, is_leaf=is_spec)
    if mesh_shape.get("pipeline", 1) > 1:
        # Only the MoE stack is cut into pipeline stages; the rest is sharded over `pipeline`
        # at rest only (see above).
        no_pp = dict(mesh_shape, pipeline=1)

        def outside_stages(names, a):
            spec = spec_of(no_pp)(names, a)
            return spec if gathered else sharding.add_axes(spec, a.shape, mesh_shape,
                                                           ("pipeline",))
        specs = {k: v if k == "moe_layers" else
                 jax.tree.map(outside_stages, axes[k], params[k], is_leaf=is_spec)
                 for k, v in specs.items()}
    return specs


def state_specs(abstract_state, cfg: ModelConfig, optimizer, mesh_shape,
                uneven: bool = False) -> dict:
    """PartitionSpecs of the whole state from the one rules table; optimizer moments also
    sharded over the ZeRO-1 axes; router biases, counters and the RNG replicated."""
    import optax
    from jax.sharding import PartitionSpec as P
    is_spec = lambda x: isinstance(x, P)
    param_specs = params_specs(cfg, abstract_state["params"], mesh_shape, uneven)
    moment = lambda leaf, spec: sharding.add_zero1(spec, leaf.shape, mesh_shape)
    opt_specs = optax.tree_map_params(optimizer, moment, abstract_state["opt_state"], param_specs,
                                      transform_non_params=lambda _: P(), is_leaf=is_spec)
    specs = jax.tree.map(lambda _: P(), abstract_state)
    specs.update(params=param_specs, opt_state=opt_specs)
    if "ema" in abstract_state:
        specs["ema"] = param_specs
    return specs


class BatchSchedule:
    """Global batch per step as a number of micro-batches of `micro_batch` rows, with an optional
    ramp in stages (report §4.2: 3072 -> 15360 sequences over the first 469B tokens); each stage
    compiles the step once. Also the run's clock in tokens: `tokens_before[s]` is the number of
    tokens consumed before step s, and `step_at(t)` the first step that starts at or past t.

    ramp: "" (constant) or "tokens:rows,tokens:rows,..." e.g. "0:2,4096:4,8192:8" (rows per step
    once that many tokens have been consumed; the last stage should equal data.global_batch).
    """

    def __init__(self, global_batch: int, micro_batch: int, ramp: str, steps: int,
                 seq_len: int = 1):
        micro_batch = micro_batch or global_batch
        stages = [(0.0, global_batch)]
        if ramp:
            try:
                stages = [(float(t), int(b)) for t, b in (p.split(":") for p in ramp.split(","))]
            except ValueError:
                raise ConfigError("data.batch_ramp must look like 'tokens:rows,...' e.g. "
                                  f"'0:3072,58.6e9:4608', got {ramp!r}") from None
        errors = [f"batch {b} is not a positive multiple of data.micro_batch={micro_batch}"
                  for _, b in stages if b <= 0 or b % micro_batch]
        if [t for t, _ in stages] != sorted(t for t, _ in stages) or stages[0][0] != 0:
            errors.append(f"data.batch_ramp token counts must start at 0 and increase: {ramp!r}")
        if errors:
            raise ConfigError("bad batch schedule: " + "; ".join(errors))
        self.micro_batch, self.seq_len = micro_batch, seq_len
        # A stage runs from the step where its token count has been consumed: whole steps
        # while fewer tokens than the next stage's start have been consumed.
        per_step = np.zeros(steps, np.int64)
        done, consumed = 0, 0
        for k, (_, rows) in enumerate(stages):
            n = steps - done
            if k + 1 < len(stages):
                n = min(n, max(0, math.ceil((stages[k + 1][0] - consumed) / (rows * seq_len))))
            per_step[done:done + n] = rows // micro_batch
            done, consumed = done + n, consumed + n * rows * seq_len
        tokens = np.concatenate([[0], np.cumsum(per_step * micro_batch * seq_len)])
        self.micro_per_step = per_step
        self.first_micro = np.concatenate([[0], np.cumsum(per_step)])   # micro index of each step
        self.tokens_before = tokens

    @property
    def total_tokens(self) -> int:
        return int(self.tokens_before[-1])

    def step_at(self, tokens: float) -> int:
        """First step that starts with at least `tokens` consumed; a value in [0, 1] is a
        fraction of the run's tokens."""
        if tokens < 0:
            raise ConfigError(f"a schedule boundary must be >= 0 tokens, got {tokens}")
        if tokens <= 1:
            tokens = tokens * self.total_tokens
        return int(np.searchsorted(self.tokens_before, tokens, side="left"))

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


def micro_batch_padding(mesh_shape: dict, micro_batch: int) -> int:
    """Empty rows to append to each micro-batch. A pipeline cuts the step into at least as many
    micro-batches as its schedule needs (2P for DualPipe), so their rows often do not split
    over the batch axes: they are padded up to the next multiple (rows whose segment id is 0
    add nothing to the loss, its gradient or the expert loads). Elsewhere 0: a batch that does
    not split is an error."""
    ways = math.prod(mesh_shape[a] for a in sharding.BATCH_AXES)
    pad = -micro_batch % ways
    if mesh_shape.get("pipeline", 1) == 1 or pad % jax.process_count():
        return 0
    return pad


def pad_rows(local: dict, rows: int, rows_axis: int) -> dict:
    """`rows` empty rows (all zeros: segment id 0, no loss mask) appended along rows_axis."""
    if not rows:
        return local
    widths = lambda x: [(0, rows if i == rows_axis else 0) for i in range(x.ndim)]
    return {k: np.pad(v, widths(v)) for k, v in local.items()}
