"""The trainer: python -m dsv3_jax.train [--config experiments/configs/tiny.py] [--workdir runs/tiny]

One linear main() in sections: config -> data -> state -> restore -> loop {batch, step, log,
eval, checkpoint} -> final eval and sample. `train_step` is a pure module-level function jitted
once; the loop syncs with the device only at log, eval and checkpoint steps.
"""
from __future__ import annotations

import dataclasses
import functools
import importlib.util
import json
import math
import os
import signal
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from dsv3_jax.ckpt import trainer as ckpt_lib
from dsv3_jax import loss as loss_lib
from dsv3_jax import model, optim, sharding
from dsv3_jax.config import ConfigError, ModelConfig
from dsv3_jax.layers.common import dtype_of
from dsv3_jax.loss import masked_ce
from dsv3_jax.layers.mtp import shift_left


# ----------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------

def default_config_path() -> str:
    return importlib.util.find_spec("experiments.configs.tiny").origin


def model_config(c) -> ModelConfig:
    fields = {k: v for k, v in c.model.to_dict().items() if k != "preset"}
    unknown = set(fields) - {f.name for f in dataclasses.fields(ModelConfig)}
    if unknown:
        raise ConfigError(f"config.model has unknown keys {sorted(unknown)}")
    return ModelConfig(**fields)


def validate(c) -> ModelConfig:
    """Every value checked before anything compiles; all problems reported at once."""
    errors = []
    def need(cond, msg):
        if not cond:
            errors.append(msg)
    d, t, o, b, m = c.data, c.train, c.optim, c.balance, c.mtp
    need(d.seq_len >= 8, f"data.seq_len must be >= 8, got {d.seq_len}")
    need(d.global_batch >= 1, f"data.global_batch must be >= 1, got {d.global_batch}")
    need(d.micro_batch >= 0 and (d.micro_batch == 0 or d.global_batch % d.micro_batch == 0),
         f"data.micro_batch must be 0 (= global_batch) or divide global_batch, got {d.micro_batch}")
    need(d.eval_batches >= 1, f"data.eval_batches must be >= 1, got {d.eval_batches}")
    need(t.steps >= 1, f"train.steps must be >= 1, got {t.steps}")
    for k in ("log_every", "eval_every", "checkpoint_every", "keep_checkpoints"):
        need(t[k] >= 1, f"train.{k} must be >= 1, got {t[k]}")
    need(0.0 <= t.ema_decay < 1.0, f"train.ema_decay must be in [0, 1), got {t.ema_decay}")
    need(t.get("ce_chunk", 0) >= 0, f"train.ce_chunk must be >= 0, got {t.get('ce_chunk')}")
    need(t.peak_tflops > 0, f"train.peak_tflops must be > 0, got {t.peak_tflops}")
    need(o.peak_lr > 0, f"optim.peak_lr must be > 0, got {o.peak_lr}")
    need(0 <= o.warmup_steps, f"optim.warmup_steps must be >= 0, got {o.warmup_steps}")
    need(0 <= o.constant_until <= o.decay_until <= o.tail1_until <= 1,
         "optim needs 0 <= constant_until <= decay_until <= tail1_until <= 1")
    need(0 <= o.b1 < 1 and 0 <= o.b2 < 1, "optim.b1 and optim.b2 must be in [0, 1)")
    need(o.weight_decay >= 0 and o.clip_norm > 0, "optim.weight_decay >= 0 and clip_norm > 0")
    need(o.moments_dtype in ("float32", "bfloat16"),
         f"optim.moments_dtype must be float32 or bfloat16, got {o.moments_dtype!r}")
    need(b.gamma >= 0 and b.alpha >= 0, "balance.gamma and balance.alpha must be >= 0")
    need(0 <= b.gamma_until <= 1 and 0 <= m.lambda_switch <= 1,
         "balance.gamma_until and mtp.lambda_switch are fractions of the run in [0, 1]")
    need(m.lambda_start >= 0 and m.lambda_end >= 0, "mtp lambdas must be >= 0")
    try:
        cfg = model_config(c)
    except (ConfigError, TypeError) as e:
        errors.append(str(e))
        cfg = None
    if errors:
        raise ConfigError("invalid training config:\n  - " + "\n  - ".join(errors))
    return cfg


# ----------------------------------------------------------------------------------------------
# Loss and the train step (pure, jitted once)
# ----------------------------------------------------------------------------------------------

def mtp_targets(batch, k: int):
    """Depth k at position i predicts t_{i+k+1} = targets[i+k]; valid while the hidden state,
    the embedded token and the target all belong to one document."""
    seg = batch["segment_ids"]
    same_doc = shift_left(seg, k, fill=-1) == seg
    return shift_left(batch["targets"], k), shift_left(batch["loss_mask"], k) * same_doc


def max_violation(counts_LE):
    """MaxVio = (max load - mean load) / mean load per layer (Wang et al. 2024)."""
    load = counts_LE.astype(jnp.float32)
    mean = jnp.maximum(load.mean(-1), 1e-9)
    return (load.max(-1) - mean) / mean


@dataclasses.dataclass(frozen=True)
class StepFns:
    """The static pieces of the step: model config, optimizer and schedules."""
    cfg: ModelConfig
    optimizer: object
    lr: object
    mtp_weight: object
    gamma: object
    alpha: float
    ema_decay: float
    ce_chunk: int = 0          # > 0: head + CE fused over chunks of this many positions


def compute_loss(params, router_bias, batch, fns: StepFns, step):
    cfg = fns.cfg
    out = model.forward(cfg, {"params": params, "router_bias": router_bias}, batch["inputs"],
                        positions=batch["positions"], segment_ids=batch["segment_ids"],
                        with_logits=not fns.ce_chunk)
    if fns.ce_chunk:          # head + CE fused, no [B, T, V] logits (dsv3_jax/loss.py)
        def ce_of(h_BTD, targets, mask):
            return loss_lib.head_ce(h_BTD, params["lm_head"], targets, mask, chunk=fns.ce_chunk,
                                    dtype=dtype_of(cfg.dtype))
        main_in, mtp_in = out.hidden, out.mtp_hidden       # what the head would read
    else:
        ce_of = masked_ce
        main_in, mtp_in = out.logits, out.mtp_logits
    ce = ce_of(main_in, batch["targets"], batch["loss_mask"])
    depth = cfg.num_nextn_predict_layers
    mtp_ces = [ce_of(mtp_in[k - 1], *mtp_targets(batch, k)) for k in range(1, depth + 1)]
    mtp_ce = sum(mtp_ces) / depth if depth else jnp.zeros((), jnp.float32)
    # one complementary balance loss per MoE layer (MTP modules included), summed
    balance = out.router.balance_loss.sum() + out.mtp_router.balance_loss.sum()
    loss = ce + fns.mtp_weight(step) * mtp_ce + fns.alpha * balance
    aux = {"ce": ce, "mtp_ce": mtp_ce, "balance": balance,
           "counts": out.router.counts, "mtp_counts": out.mtp_router.counts}
    return loss, aux


def train_step(state: dict, batch: dict, fns: StepFns):
    """One optimizer step over `batch` [micro, rows, T] (gradients accumulated over the leading
    micro-batch axis), the aux-loss-free bias update from the whole batch's loads, EMA. A
    non-finite loss or gradient records the step in state['nonfinite_step']; the host stops
    there without saving, so the last checkpoint stays the last good state."""
    step = state["step"]
    grad_fn = jax.value_and_grad(compute_loss, has_aux=True)

    def micro(acc, mb):
        (loss, aux), grads = grad_fn(state["params"], state["router_bias"], mb, fns, step)
        return jax.tree.map(jnp.add, acc, (loss, aux, grads)), None

    n_micro = batch["inputs"].shape[0]
    if n_micro == 1:   # no accumulators to zero-fill and add (48 bytes x params saved per step)
        (loss, aux), grads = grad_fn(state["params"], state["router_bias"],
                                     jax.tree.map(lambda x: x[0], batch), fns, step)
    else:
        zeros = jax.eval_shape(lambda: grad_fn(state["params"], state["router_bias"],
                                               jax.tree.map(lambda x: x[0], batch), fns, step))
        zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), zeros)
        zeros = (zeros[0][0], zeros[0][1], zeros[1])
        (loss, aux, grads), _ = jax.lax.scan(micro, zeros, batch)
        loss, grads = loss / n_micro, jax.tree.map(lambda x: x / n_micro, grads)
        aux = {k: (v if k.endswith("counts") else v / n_micro) for k, v in aux.items()}

    updates, opt_state = fns.optimizer.update(grads, state["opt_state"], state["params"])
    params = jax.tree.map(lambda p, u: p + u.astype(p.dtype), state["params"], updates)
    # Outside the gradient: b_i += gamma * sign(mean load - load_i), loads of the global batch.
    router_bias = model.update_router_bias(state["router_bias"], aux["counts"], aux["mtp_counts"],
                                           fns.gamma(step))
    new = dict(state, step=step + 1, params=params, opt_state=opt_state, router_bias=router_bias)
    if fns.ema_decay:
        new["ema"] = jax.tree.map(lambda e, p: fns.ema_decay * e + (1 - fns.ema_decay) * p,
                                  state["ema"], params)
    grad_norm = optax_global_norm(grads)
    ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    new["nonfinite_step"] = jnp.where(ok | (state["nonfinite_step"] >= 0),
                                      state["nonfinite_step"], step)
    metrics = {"loss": loss, "ce": aux["ce"], "mtp_ce": aux["mtp_ce"], "balance": aux["balance"],
               "grad_norm": grad_norm, "lr": fns.lr(step), "mtp_weight": fns.mtp_weight(step),
               "gamma": fns.gamma(step), "maxvio": max_violation(aux["counts"]),
               "mtp_maxvio": max_violation(aux["mtp_counts"]), "counts": aux["counts"]}
    return new, metrics


def optax_global_norm(tree):
    return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree)))


def eval_step(params, router_bias, batch, cfg: ModelConfig):
    """Summed validation NLL, token count and expert loads of one batch."""
    out = model.forward(cfg, {"params": params, "router_bias": router_bias}, batch["inputs"],
                        positions=batch["positions"], segment_ids=batch["segment_ids"],
                        with_mtp=False)
    mask = batch["loss_mask"].astype(jnp.float32)
    ce = masked_ce(out.logits, batch["targets"], mask)
    return ce * mask.sum(), mask.sum(), out.router.counts


def init_state(cfg: ModelConfig, optimizer, seed: int, ema: bool):
    rng = jax.random.key(seed)
    variables = model.init(cfg, jax.random.fold_in(rng, 0))
    state = {"step": jnp.zeros((), jnp.int32), "params": variables["params"],
             "opt_state": optimizer.init(variables["params"]),
             "router_bias": variables.get("router_bias", {}),
             "rng": jax.random.key_data(jax.random.fold_in(rng, 1)),
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


def make_step_fns(c, cfg: ModelConfig) -> StepFns:
    steps = c.train.steps
    lr = optim.lr_schedule(c.optim.peak_lr, steps, warmup_steps=c.optim.warmup_steps,
                           constant_until=c.optim.constant_until, decay_until=c.optim.decay_until,
                           tail1_until=c.optim.tail1_until)
    optimizer = optim.make_optimizer(lr, b1=c.optim.b1, b2=c.optim.b2, eps=c.optim.eps,
                                     weight_decay=c.optim.weight_decay,
                                     clip_norm=c.optim.clip_norm,
                                     moments_dtype=c.optim.moments_dtype)
    return StepFns(cfg=cfg, optimizer=optimizer, lr=lr,
                   mtp_weight=optim.piecewise_constant((c.mtp.lambda_start, c.mtp.lambda_end),
                                                       (c.mtp.lambda_switch,), steps),
                   gamma=optim.piecewise_constant((c.balance.gamma, 0.0), (c.balance.gamma_until,),
                                                  steps),
                   alpha=c.balance.alpha, ema_decay=c.train.ema_decay,
                   ce_chunk=int(c.train.get("ce_chunk", 0)))


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
    """6 x activated matmul parameters (fwd+bwd) + causal attention scores and values."""
    import flax
    flat = flax.traverse_util.flatten_dict(model.abstract_variables(cfg)["params"])
    active = 0.0
    for path, leaf in flat.items():
        if path[0].startswith("mtp_") or path[0] == "embed":   # MTP is training-only extra work
            continue
        share = (cfg.num_experts_per_tok / cfg.n_routed_experts) if "experts" in path else 1.0
        active += leaf.size * share
    attn = (cfg.num_hidden_layers * cfg.num_attention_heads
            * (cfg.qk_head_dim + cfg.v_head_dim) * seq_len)   # 2 flops x T/2 causal keys x 2 GEMMs
    return 6.0 * active + 3.0 * attn


# ----------------------------------------------------------------------------------------------
# Host side: logging, stop signals
# ----------------------------------------------------------------------------------------------

class StopSignal:
    """SIGTERM / Ctrl-C: finish the current step, save, exit 0."""

    def __init__(self):
        self.requested = False
        signal.signal(signal.SIGTERM, self._handle)
        signal.signal(signal.SIGINT, self._handle)

    def _handle(self, signum, frame):
        self.requested = True


def _scalars(metrics: dict) -> dict:
    out = {}
    for k, v in metrics.items():
        v = np.asarray(v)
        if k == "counts":
            continue
        if v.ndim == 0:
            out[k] = float(v)
        else:
            for i, x in enumerate(v):
                out[f"{k}/layer_{i}"] = float(x)
            if v.size:
                out[f"{k}/mean"] = float(v.mean())
    return out


def main(argv=None):
    from absl import app, flags, logging
    from ml_collections import config_flags

    logging.set_verbosity(logging.WARNING)   # orbax logs every file operation at INFO

    config_flags.DEFINE_config_file("config", default_config_path(), "experiment config file",
                                    lock_config=True)
    flags.DEFINE_string("workdir", "runs/tiny", "checkpoints, metrics.jsonl and TensorBoard logs")
    flags.DEFINE_string("coordinator", None, "multi-process: coordinator host:port (process 0)")
    flags.DEFINE_integer("num_processes", None, "multi-process: number of processes")
    flags.DEFINE_integer("process_id", None, "multi-process: this process's index")

    def _main(argv):
        if len(argv) > 1:
            raise app.UsageError(f"unexpected arguments {argv[1:]}")
        from dsv3_jax import distributed
        f = flags.FLAGS
        distributed.initialize(f.coordinator, f.num_processes, f.process_id)
        run(f.config, f.workdir)

    app.run(_main, argv=argv)


def run(c, workdir: str) -> dict:
    from dsv3_jax import data as data_lib
    from dsv3_jax import writers
    from dsv3_jax.generate import greedy_generate

    # ---- config (validated before any compile) ----
    cfg = validate(c)
    fns = make_step_fns(c, cfg)
    main_process = jax.process_index() == 0
    log = print if main_process else (lambda *a, **k: None)
    mesh_shape = sharding.resolve_mesh_shape(c.mesh.to_dict(), jax.device_count())
    micro = c.data.micro_batch or c.data.global_batch
    sharding.validate_mesh(mesh_shape, cfg, micro)
    mesh = sharding.make_mesh(mesh_shape)
    os.makedirs(workdir, exist_ok=True)
    t_start = time.time()

    # ---- data ----
    schedule = BatchSchedule(c.data.global_batch, c.data.micro_batch, c.data.batch_ramp,
                             c.train.steps)
    # The iterator yields micro-batches; step s takes micro-batches first_micro[s]... in order.
    train_iter, val_batches_fn, tokenizer, info = data_lib.make_datasets(
        c.data.seq_len, schedule.micro_batch, c.data.seed, process_index=jax.process_index(),
        process_count=jax.process_count(), data_dir=c.data.data_dir or None)
    if info["vocab_size"] > cfg.vocab_size:
        raise ConfigError(f"tokenizer has {info['vocab_size']} tokens but model.vocab_size is "
                          f"{cfg.vocab_size}")
    row_sharding = jax.sharding.NamedSharding(mesh, sharding.batch_spec(2))
    micro_sharding = jax.sharding.NamedSharding(mesh, sharding.batch_spec(3, lead=1))

    def to_global(local: dict, sharding_, rows_axis: int) -> dict:
        """This process's rows -> one global array (each process feeds only its shard)."""
        def one(x):
            shape = list(x.shape)
            shape[rows_axis] *= jax.process_count()
            return jax.make_array_from_process_local_data(sharding_, x, tuple(shape))
        return {k: one(v) for k, v in local.items()}

    val_batches = [to_global(b, row_sharding, 0) for b in val_batches_fn(
        c.data.eval_batches * (c.data.global_batch // schedule.micro_batch))]
    log(f"data: {info['train_tokens']:,} train / {info['val_tokens']:,} validation tokens "
          f"({info['train_docs']:,} documents), {info['steps_per_epoch']:.0f} steps per epoch; "
          f"unigram entropy {info['unigram_entropy']:.3f} nats/token (the yardstick)", flush=True)

    # ---- state: init, or restore the latest checkpoint in the workdir ----
    ema = c.train.ema_decay > 0
    abstract = jax.eval_shape(lambda: init_state(cfg, fns.optimizer, c.train.seed, ema))
    state_sharding = sharding.named(mesh, state_specs(abstract, cfg, fns.optimizer, mesh_shape))
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                            abstract, state_sharding)
    ckpt = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), c.train.keep_checkpoints,
                                 c.train.async_checkpoint)
    latest = ckpt.latest_step()
    if latest is not None:
        state, data_state, _ = ckpt.restore(latest, abstract)
        train_iter.set_state(data_state)   # checks seed / seq_len / batch; position = step
        log(f"resumed from {ckpt.directory}/{latest} (step {int(state['step'])})", flush=True)
    else:
        state = jax.jit(lambda: init_state(cfg, fns.optimizer, c.train.seed, ema),
                        out_shardings=state_sharding)()
    start = int(state["step"])
    n_params = sum(x.size for x in jax.tree.leaves(state["params"]))
    log(f"model: {n_params / 1e6:.2f}M parameters; {c.train.steps} steps of "
          f"{c.data.global_batch}x{c.data.seq_len} tokens; mesh "
          f"{ {k: v for k, v in mesh_shape.items() if v > 1} or 'single device'}; "
          f"workdir {os.path.abspath(workdir)}", flush=True)

    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    with jax.set_mesh(mesh):   # the MoE layer's expert-parallel shard_map reads this mesh
        step_fn = jax.jit(functools.partial(train_step, fns=fns),
                          in_shardings=(state_sharding, micro_sharding),
                          out_shardings=(state_sharding, replicated), donate_argnums=0)
        eval_fn = jax.jit(functools.partial(eval_step, cfg=cfg),
                          in_shardings=(state_sharding["params"], state_sharding["router_bias"],
                                        row_sharding), out_shardings=replicated)
    writer = writers.create(workdir, truncate_after=start) if main_process else writers.null()
    flops_per_token = model_flops_per_token(cfg, c.data.seq_len)
    stop = StopSignal()
    # Fault injection for the resume test: SIGKILL this process right after step N.
    kill_at = int(os.environ.get("DSV3_FAULT_KILL_AFTER_STEP", "-1"))

    def evaluate(params):
        nll = tok = 0.0
        counts = 0
        for vb in val_batches:
            with jax.set_mesh(mesh):
                s, n, cts = eval_fn(params, state["router_bias"], vb)
            nll, tok, counts = nll + s, tok + n, counts + cts
        val = float(nll / max(float(tok), 1.0))
        return val, np.asarray(max_violation(counts))

    def check_finite():
        bad = int(state["nonfinite_step"])
        if bad >= 0:
            ckpt.close()
            raise FloatingPointError(
                f"loss or gradient became NaN/Inf at step {bad}; stopping without saving. "
                f"The last good checkpoint is kept in {ckpt.directory} "
                f"(step {ckpt.latest_step()}).")

    def save(step):
        check_finite()
        ckpt.save(step, state, train_iter.get_state(),
                  {"config": c.to_dict(), "data_info": info, "step": step})

    # ---- loop ----
    from tqdm import tqdm
    bar = tqdm(total=c.train.steps, initial=start, unit="step", dynamic_ncols=True,
               disable=None if main_process else True, file=sys.stdout)
    t_log, step_log = time.perf_counter(), start
    metrics = None
    for step in range(start, c.train.steps):
        batch = to_global(schedule.batch(train_iter, step), micro_sharding, 1)
        with jax.set_mesh(mesh):
            state, metrics = step_fn(state, batch)
        train_iter.set_state({"step": int(schedule.first_micro[step + 1])})
        done = step + 1
        stopping = stop.requested          # read once: the signal may arrive mid-iteration
        last = done == c.train.steps or stopping
        if done % c.train.log_every == 0 or last:
            m = jax.device_get(metrics)
            check_finite()
            dt = time.perf_counter() - t_log
            rows = schedule.first_micro[done] - schedule.first_micro[step_log]
            tps = rows * schedule.micro_batch * c.data.seq_len / max(dt, 1e-9)
            t_log, step_log = time.perf_counter(), done
            scalars = _scalars(m)
            scalars.update({"tokens_per_s": tps,
                            "mfu": tps * flops_per_token / (c.train.peak_tflops * 1e12)})
            writer.write_scalars(done, scalars)
            writer.write_histograms(done, {f"expert_load/layer_{i}": row
                                           for i, row in enumerate(np.asarray(m["counts"]))})
            bar.set_postfix(loss=f"{scalars['loss']:.3f}", tok_s=f"{tps:,.0f}")
        if done % c.train.eval_every == 0 and not last:
            val, vio = evaluate(state["params"])
            writer.write_scalars(done, {"val_loss": val, "val_maxvio": float(vio.mean())})
            bar.write(f"step {done}: validation loss {val:.4f}, global MaxVio {vio.mean():.3f}")
        if done % c.train.checkpoint_every == 0 or last:
            save(done)
        bar.update(1)
        if done == kill_at:
            writer.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        if stopping:
            bar.write(f"stop requested: saved step {done}, exiting")
            break
    bar.close()
    ckpt.wait()

    # ---- end: validation, a sample, where things are ----
    final_step = int(state["step"])
    result = {"step": final_step, "workdir": os.path.abspath(workdir),
              "unigram_entropy": info["unigram_entropy"],
              "train_step_compiles": step_fn._cache_size()}
    if final_step == c.train.steps:
        val, vio = evaluate(state["params"])
        writer.write_scalars(final_step, {"val_loss": val, "val_maxvio": float(vio.mean())})
        prompt = tokenizer.encode(c.train.sample_prompt).ids or [data_lib.EOS_ID]
        if jax.process_count() == 1:
            sample_ids = greedy_generate(cfg, {"params": state["params"],
                                               "router_bias": state["router_bias"]},
                                         prompt, c.train.sample_tokens, eos_id=data_lib.EOS_ID)
            sample = tokenizer.decode(prompt + sample_ids)
        else:   # the sample generator is single-process; sample from the checkpoint instead
            sample = "(skipped in a multi-process run: python -m dsv3_jax.generate --checkpoint ...)"
        result.update(val_loss=val, val_maxvio=float(vio.mean()), sample=sample)
        log(f"\nfinal validation loss {val:.4f} nats/token (unigram entropy "
              f"{info['unigram_entropy']:.4f}, {info['unigram_entropy'] - val:+.3f} better); "
              f"global MaxVio {vio.mean():.3f}")
        log(f"greedy sample:\n{sample}\n")
    writer.close()
    ckpt.close()
    log(f"checkpoints: {ckpt.directory}\nmetrics: {os.path.join(result['workdir'], 'metrics.jsonl')}"
          f" (TensorBoard: tensorboard --logdir {result['workdir']})\n"
          f"wall time {time.time() - t_start:.0f}s", flush=True)
    if main_process:
        with open(os.path.join(workdir, "result.json"), "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
