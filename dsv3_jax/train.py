"""The trainer: python -m dsv3_jax.train [--config experiments/configs/tiny.py] [--workdir runs/tiny]

`train_step(state, batch, fns)` is a pure module-level function jitted once; it differentiates
the objective that `fns` carries (dsv3_jax/objectives/: pretrain by default), so a new training
stage brings its own objective, not a copy of this file. `run` reads as its stages:

  set_up -> load_data -> restore_or_init -> train_loop (step, log, Evaluator, checkpoint) -> finish

The loop syncs with the device only at log, eval and checkpoint steps.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import signal
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from dsv3_jax import ckpt as ckpt_lib
from dsv3_jax import ema as ema_lib
from dsv3_jax import errors, model, optim, sharding
from dsv3_jax import train_state as ts
from dsv3_jax.ckpt import trainer as ckpt_trainer
from dsv3_jax.ckpt.errors import describe_mismatch, problem_list
from dsv3_jax.config import ConfigError, ModelConfig
from dsv3_jax.objectives import base as objectives
from dsv3_jax.objectives.pretrain import max_violation
from dsv3_jax.train_config import parse_flags, validate

# ----------------------------------------------------------------------------------------------
# The step (pure, jitted once)
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class StepFns:
    """The static pieces of the step: objective, optimizer and schedules."""
    cfg: ModelConfig
    objective: objectives.Objective
    optimizer: object
    lr: object
    gamma: object
    ema_decay: float
    pipeline: tuple | None = None   # (schedule, ranks, branched, recompute, split_w); P > 1


def make_step_fns(c, cfg: ModelConfig, objective: objectives.Objective | None = None) -> StepFns:
    """The step's pieces from the config; the objective is c.train.objective unless given."""
    schedule = ts.batch_schedule(c)
    optimizer, lr = ts.make_optimizer(c, schedule)
    gamma = optim.piecewise_constant((c.balance.gamma, 0.0),
                                     (schedule.step_at(c.balance.gamma_until),))
    return StepFns(cfg=cfg, objective=objective or objectives.make(c, cfg), optimizer=optimizer,
                   lr=lr, gamma=gamma, ema_decay=c.train.ema_decay)


def train_step(state: dict, batch: dict, fns: StepFns):
    """One optimizer step over `batch` [micro, rows, T] (gradients accumulated over the leading
    micro-batch axis), the aux-loss-free bias update from the whole batch's loads, EMA. A
    non-finite loss or gradient records the step in state['nonfinite_step']; the host stops
    there without saving, so the last checkpoint stays the last good state."""
    step = state["step"]
    grad_fn = jax.value_and_grad(fns.objective.loss, has_aux=True)
    if fns.pipeline is not None:   # the micro-batches go through the pipeline schedule
        from dsv3_jax.pipeline import executor
        (loss, aux), grads = executor.step_value_and_grad(
            fns.objective, *fns.pipeline[:2], state["params"], state["router_bias"], batch, step,
            **dict(zip(executor.MODE_OPTIONS, fns.pipeline[2:])))
        return _apply(state, fns, step, loss, aux, grads)

    def micro(acc, mb):
        (loss, aux), grads = grad_fn(state["params"], state["router_bias"], mb, step)
        return jax.tree.map(jnp.add, acc, (loss, aux, grads)), None

    n_micro = batch["inputs"].shape[0]
    first = jax.tree.map(lambda x: x[0], batch)
    if n_micro == 1:   # no accumulators to zero-fill and add (48 bytes x params saved per step)
        (loss, aux), grads = grad_fn(state["params"], state["router_bias"], first, step)
    else:
        zeros = jax.eval_shape(lambda: grad_fn(state["params"], state["router_bias"], first, step))
        zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), zeros)
        zeros = (zeros[0][0], zeros[0][1], zeros[1])
        (loss, aux, grads), _ = jax.lax.scan(micro, zeros, batch)
        loss, grads = loss / n_micro, jax.tree.map(lambda x: x / n_micro, grads)
        aux = {k: (v if k in objectives.LOAD_KEYS else v / n_micro) for k, v in aux.items()}
    return _apply(state, fns, step, loss, aux, grads)


def _apply(state: dict, fns: StepFns, step, loss, aux: dict, grads):
    """The optimizer update, the router-bias rule, EMA and the step's metrics."""
    updates, opt_state = fns.optimizer.update(grads, state["opt_state"], state["params"])
    params = jax.tree.map(lambda p, u: p + u.astype(p.dtype), state["params"], updates)
    # Outside the gradient: b_i += gamma * sign(mean load - load_i), loads of the global batch.
    router_bias = model.update_router_bias(state["router_bias"], aux["counts"], aux["mtp_counts"],
                                           fns.gamma(step))
    new = dict(state, step=step + 1, params=params, opt_state=opt_state, router_bias=router_bias)
    if fns.ema_decay and "ema" in state:   # else kept on the host (dsv3_jax/ema.py), or none
        new["ema"] = jax.tree.map(lambda e, p: fns.ema_decay * e + (1 - fns.ema_decay) * p,
                                  state["ema"], params)
    grad_norm = optax.tree.norm(grads)   # the norm the clipping reads
    ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    new["nonfinite_step"] = jnp.where(ok | (state["nonfinite_step"] >= 0),
                                      state["nonfinite_step"], step)
    metrics = {k: v for k, v in aux.items() if k not in objectives.LOAD_KEYS}
    metrics.update(loss=loss, grad_norm=grad_norm, lr=fns.lr(step), gamma=fns.gamma(step),
                   maxvio=max_violation(aux["counts"]),
                   mtp_maxvio=max_violation(aux["mtp_counts"]), counts=aux["counts"])
    return new, metrics


# ----------------------------------------------------------------------------------------------
# The stages of a run
# ----------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Setup:
    """What every stage reads: the config, validated, and where and on what the run happens."""
    c: object
    cfg: ModelConfig
    fns: StepFns
    workdir: str
    mesh_shape: dict
    mesh: jax.sharding.Mesh
    main_process: bool
    t_start: float
    pad_rows: int = 0     # empty rows after each micro-batch (ts.micro_batch_padding)

    def log(self, *args, **kw) -> None:
        if self.main_process:
            print(*args, **kw, flush=True)

    def sharding(self, spec) -> jax.sharding.NamedSharding:
        return jax.sharding.NamedSharding(self.mesh, spec)


def set_up(c, workdir: str, objective: objectives.Objective | None = None) -> Setup:
    """Config, objective, optimizer and mesh, all validated before anything compiles."""
    cfg = validate(c)
    fns = make_step_fns(c, cfg, objective)
    mesh_shape = sharding.resolve_mesh_shape(c.mesh.to_dict(), jax.device_count())
    micro = c.data.micro_batch or c.data.global_batch
    pad = ts.micro_batch_padding(mesh_shape, micro)
    sharding.validate_mesh(mesh_shape, cfg, micro + pad)
    if mesh_shape["pipeline"] > 1:
        from dsv3_jax.pipeline import executor
        ranks = mesh_shape["pipeline"]
        bad = executor.problems(c.pipeline.schedule, ranks, ts.batch_schedule(c).micro_per_step,
                                cfg, fns.objective, mesh_shape)
        if bad:
            raise ConfigError("pipeline does not fit:\n  - " + "\n  - ".join(bad))
        fns = dataclasses.replace(fns, pipeline=(c.pipeline.schedule, ranks, *(
            c.pipeline[k] for k in executor.MODE_OPTIONS)))
    os.makedirs(workdir, exist_ok=True)
    s = Setup(c=c, cfg=cfg, fns=fns, workdir=workdir, mesh_shape=mesh_shape,
              mesh=sharding.make_mesh(mesh_shape), main_process=jax.process_index() == 0,
              t_start=time.time(), pad_rows=pad)
    if pad:
        s.log(f"pipeline micro-batches of {micro} rows get {pad} empty rows each (no loss, no "
              f"expert load) to split over data*fsdp*expert = {micro + pad}: "
              f"{pad / micro:.0%} more compute; a larger data.global_batch avoids it")
    return s


@dataclasses.dataclass
class Data:
    schedule: ts.BatchSchedule
    train_iter: object            # data.PackedBatches: micro-batches of this process's rows
    val_batches: list             # global arrays [rows, T]
    tokenizer: object
    info: dict
    micro_sharding: jax.sharding.NamedSharding
    row_sharding: jax.sharding.NamedSharding
    # the final greedy sample's (prompt ids, stop id); None: train.sample_prompt's text as is
    sample_prompt: tuple | None = None


def to_global(local: dict, sharding_, rows_axis: int) -> dict:
    """This process's rows -> one global array (each process feeds only its shard)."""
    def one(x):
        shape = list(x.shape)
        shape[rows_axis] *= jax.process_count()
        return jax.make_array_from_process_local_data(sharding_, x, tuple(shape))
    return {k: one(v) for k, v in local.items()}


def load_data(s: Setup) -> Data:
    """The packed training stream, the validation batches and the tokenizer."""
    from dsv3_jax import data as data_lib
    c = s.c
    schedule = ts.batch_schedule(c)
    # The iterator yields micro-batches; step s takes micro-batches first_micro[s]... in order.
    train_iter, val_batches_fn, tokenizer, info = data_lib.make_datasets(
        c.data.seq_len, schedule.micro_batch, c.data.seed, process_index=jax.process_index(),
        process_count=jax.process_count(), data_dir=c.data.data_dir or None,
        document_masking=c.data.document_masking, fim_rate=c.data.fim_rate,
        passkey_rate=c.data.passkey_rate, passkey_len=c.data.passkey_len,
        passkey_loss=c.data.passkey_loss)
    if info["vocab_size"] > s.cfg.vocab_size:
        raise ConfigError(f"the tokenizer has {info['vocab_size']} tokens but model.vocab_size "
                          f"is {s.cfg.vocab_size}: set --config.model.vocab_size="
                          f"{info['vocab_size']} (or more)")
    row_sharding = s.sharding(sharding.batch_spec(2))
    pad = s.pad_rows // jax.process_count()
    val_batches = [to_global(ts.pad_rows(b, pad, 0), row_sharding, 0) for b in val_batches_fn(
        c.data.eval_batches * (c.data.global_batch // schedule.micro_batch))]
    s.log(f"data: {info['train_tokens']:,} train / {info['val_tokens']:,} validation tokens "
          f"({info['train_docs']:,} documents), {info['steps_per_epoch']:.0f} steps per epoch; "
          f"unigram entropy {info['unigram_entropy']:.3f} nats/token (the yardstick)")
    return Data(schedule, train_iter, val_batches, tokenizer, info,
                micro_sharding=s.sharding(sharding.batch_spec(3, lead=1)),
                row_sharding=row_sharding)


def _init_from(s: Setup, abstract: dict, state_sharding: dict) -> dict:
    """A step-0 state whose weights come from c.train.init_from (any checkpoint format)."""
    path = os.path.expanduser(s.c.train.init_from)
    _, variables = ckpt_lib.load_variables(path)
    wanted = {"params": abstract["params"], "router_bias": abstract["router_bias"]}
    found = {"params": variables["params"], "router_bias": variables.get("router_bias", {})}
    if not s.c.train.init_router_bias:   # the routers start unbiased, as at a random init
        found["router_bias"] = jax.tree.map(lambda a: np.zeros(a.shape, a.dtype),
                                            wanted["router_bias"])
    problems = describe_mismatch(found, wanted)
    if problems:
        raise ckpt_lib.CheckpointMismatchError(
            f"train.init_from={path} does not fit config.model " + problem_list(problems))
    found = jax.tree.map(lambda x, a: jnp.asarray(x, a.dtype), found, wanted)
    ema = "ema" in abstract
    rng = jax.random.fold_in(jax.random.key(s.c.train.seed), 1)
    return jax.jit(lambda v: ts.state_from_variables(v, s.fns.optimizer, rng, ema),
                   out_shardings=state_sharding)(found)


def restore_or_init(s: Setup, data: Data, stack: contextlib.ExitStack | None = None):
    """The latest checkpoint in the workdir (exactly where it stopped), else a fresh state:
    from c.train.init_from's weights if set, else a random init. Returns (state, sharding,
    checkpointer)."""
    c, fns = s.c, s.fns
    ema = c.train.ema_decay > 0
    abstract = jax.eval_shape(lambda: ts.init_state(s.cfg, fns.optimizer, c.train.seed, ema))
    state_sharding = sharding.named(s.mesh, ts.state_specs(abstract, s.cfg, fns.optimizer,
                                                           s.mesh_shape))
    abstract = jax.tree.map(lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh),
                            abstract, state_sharding)
    ckpt = ckpt_trainer.Checkpointer(os.path.join(s.workdir, ckpt_trainer.CHECKPOINTS_DIR),
                                     c.train.keep_checkpoints, c.train.async_checkpoint)
    if stack is not None:
        stack.callback(ckpt.close)
    try:
        state = _restore_or_init_state(s, data, ckpt, abstract, state_sharding, ema)
    except BaseException:
        ckpt.close()
        raise
    n_params = sum(x.size for x in jax.tree.leaves(state["params"]))
    s.log(f"model: {n_params / 1e6:.2f}M parameters; {c.train.steps} steps of "
          f"{c.data.global_batch}x{c.data.seq_len} tokens; mesh "
          f"{ {k: v for k, v in s.mesh_shape.items() if v > 1} or 'single device'}; "
          f"workdir {os.path.abspath(s.workdir)}")
    return state, state_sharding, ckpt


def _restore_or_init_state(s: Setup, data: Data, ckpt, abstract: dict, state_sharding: dict,
                           ema: bool) -> dict:
    c, fns = s.c, s.fns
    latest = ckpt.latest_step()
    if latest is not None:
        saved_seed = ckpt.read_meta(latest).get("config", {}).get("train", {}).get(
            "seed", c.train.seed)
        if saved_seed != c.train.seed:   # checked before the (large) state is read
            raise ConfigError(f"the checkpoint in {ckpt.directory} was written with train.seed="
                              f"{saved_seed}, this run has train.seed={c.train.seed}: use the "
                              f"config that wrote it, or another --workdir")
        state, data_state, _ = ckpt.restore(latest, abstract)
        data.train_iter.set_state(data_state)   # checks seed / seq_len / batch; position = step
        s.log(f"resumed from {ckpt.directory}/{latest} (step {int(state['step'])})")
        return state
    if c.train.init_from:
        state = _init_from(s, abstract, state_sharding)
        s.log(f"initialised from {c.train.init_from} (router biases "
              f"{'taken' if c.train.init_router_bias else 'reset'}), fresh optimizer, step 0")
        return state
    return jax.jit(lambda: ts.init_state(s.cfg, fns.optimizer, c.train.seed, ema),
                   out_shardings=state_sharding)()


class Evaluator:
    """Validation loss (nats/token) and global MaxVio of given weights over the fixed
    validation batches; one compiled eval step."""

    def __init__(self, s: Setup, data: Data, state_sharding: dict):
        self.mesh, self.batches = s.mesh, data.val_batches
        with jax.set_mesh(s.mesh):
            self.eval_fn = jax.jit(s.fns.objective.eval,
                                   in_shardings=(state_sharding["params"],
                                                 state_sharding["router_bias"], data.row_sharding),
                                   out_shardings=s.sharding(jax.sharding.PartitionSpec()))

    def __call__(self, params, router_bias) -> tuple[float, np.ndarray]:
        nll = tok = 0.0
        counts = 0
        for vb in self.batches:
            with jax.set_mesh(self.mesh):
                sum_nll, n, cts = self.eval_fn(params, router_bias, vb)
            nll, tok, counts = nll + sum_nll, tok + n, counts + cts
        return float(nll / max(float(tok), 1.0)), np.asarray(max_violation(counts))


class StopSignal:
    """While in effect, SIGTERM / Ctrl-C ask the loop to finish the current step, save and exit
    0; a second one acts as it would have before (e.g. KeyboardInterrupt). The previous handlers
    come back on exit."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __enter__(self):
        self.requested = False
        self._previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame):
        if self.requested:   # asked twice: stop waiting for the step
            signal.signal(signum, self._previous[signum])
            signal.raise_signal(signum)
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


def _check_finite(state: dict, ckpt) -> None:
    bad = int(state["nonfinite_step"])
    if bad >= 0:
        ckpt.wait()
        raise FloatingPointError(
            f"loss or gradient became NaN/Inf at step {bad}; stopping without saving. "
            f"The last good checkpoint is kept in {ckpt.directory} (step {ckpt.latest_step()}).")


def _validate(s: Setup, evaluator: Evaluator, state: dict, ema) -> dict:
    """val_loss, val_maxvio (and val_loss_ema with eval.ema) of the state's parameters."""
    val, vio = evaluator(state["params"], state["router_bias"])
    out = {"val_loss": val, "val_maxvio": float(vio.mean())}
    if "eval" in s.c and s.c.eval.ema:
        out["val_loss_ema"], _ = evaluator(ema_lib.params_of(state, ema), state["router_bias"])
    return out


def train_loop(s: Setup, data: Data, state: dict, state_sharding: dict, ckpt,
               evaluator: Evaluator, writer, stack: contextlib.ExitStack, ema=None):
    """Steps from the state's step to c.train.steps (or a stop signal): step, log, evaluate,
    checkpoint. `ema`: the HostEMA updated after each step (ema.off_device). Returns (state,
    compiled step function)."""
    from tqdm import tqdm
    c, sched = s.c, data.schedule
    start = int(state["step"])
    replicated = s.sharding(jax.sharding.PartitionSpec())
    with jax.set_mesh(s.mesh):   # the MoE layer's expert-parallel shard_map reads this mesh
        step_fn = jax.jit(functools.partial(train_step, fns=s.fns),
                          in_shardings=(state_sharding, data.micro_sharding),
                          out_shardings=(state_sharding, replicated), donate_argnums=0)
    # MFU: model FLOPs of all devices' tokens over all devices' peak
    peak_flops = c.train.peak_tflops * 1e12 * jax.device_count()
    flops_per_token = ts.model_flops_per_token(s.cfg, c.data.seq_len)
    stop = stack.enter_context(StopSignal())
    # Fault injection for the resume test: SIGKILL this process right after step N.
    kill_at = int(os.environ.get("DSV3_FAULT_KILL_AFTER_STEP", "-1"))
    bar = tqdm(total=c.train.steps, initial=start, unit="step", dynamic_ncols=True,
               disable=None if s.main_process else True, file=sys.stdout)
    t_log, step_log = time.perf_counter(), start
    for step in range(start, c.train.steps):
        batch = to_global(ts.pad_rows(sched.batch(data.train_iter, step),
                                   s.pad_rows // jax.process_count(), 1), data.micro_sharding, 1)
        with jax.set_mesh(s.mesh):
            state, metrics = step_fn(state, batch)
        if ema is not None:   # enqueues the new params' copy to host memory (ema.py)
            ema.update(state["params"])
        data.train_iter.set_state({"step": int(sched.first_micro[step + 1])})
        done = step + 1
        stopping = stop.requested          # read once: the signal may arrive mid-iteration
        last = done == c.train.steps or stopping
        if done % c.train.log_every == 0 or last:
            m = jax.device_get(metrics)
            _check_finite(state, ckpt)
            dt = time.perf_counter() - t_log
            rows = sched.first_micro[done] - sched.first_micro[step_log]
            tps = rows * sched.micro_batch * c.data.seq_len / max(dt, 1e-9)
            t_log, step_log = time.perf_counter(), done
            scalars = _scalars(m)
            scalars.update({"tokens_per_s": tps,
                            "mfu": tps * flops_per_token / peak_flops})
            writer.write_scalars(done, scalars)
            writer.write_histograms(done, {f"expert_load/layer_{i}": row
                                           for i, row in enumerate(np.asarray(m["counts"]))})
            bar.set_postfix(loss=f"{scalars['loss']:.3f}", tok_s=f"{tps:,.0f}")
        if done % c.train.eval_every == 0 and not last:
            v = _validate(s, evaluator, state, ema)
            writer.write_scalars(done, v)
            bar.write(f"step {done}: validation loss {v['val_loss']:.4f}, global MaxVio "
                      f"{v['val_maxvio']:.3f}" + (f", EMA validation loss {v['val_loss_ema']:.4f}"
                                                  if "val_loss_ema" in v else ""))
        if done % c.train.checkpoint_every == 0 or last:
            _check_finite(state, ckpt)
            ckpt.save(done, ema_lib.checkpointed(state, ema), data.train_iter.get_state(),
                      {"config": c.to_dict(), "data_info": data.info, "step": done})
        bar.update(1)
        if done == kill_at:
            writer.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        if stopping:
            bar.write(f"stop requested: saved step {done}, exiting")
            break
    bar.close()
    ckpt.wait()
    return state, step_fn


def finish(s: Setup, data: Data, state: dict, evaluator: Evaluator, writer, step_fn,
           ema=None) -> dict:
    """A finished run: final validation, a greedy sample, result.json."""
    from dsv3_jax import data as data_lib
    from dsv3_jax.generate import sample_text
    c, info = s.c, data.info
    final_step = int(state["step"])
    result = {"step": final_step, "workdir": os.path.abspath(s.workdir),
              "unigram_entropy": info["unigram_entropy"],
              "train_step_compiles": step_fn._cache_size()}
    if final_step == c.train.steps:
        v = _validate(s, evaluator, state, ema)
        writer.write_scalars(final_step, v)
        val, vio = v["val_loss"], v["val_maxvio"]
        prompt, stop = data.sample_prompt or (
            data.tokenizer.encode(c.train.sample_prompt).ids or [data_lib.EOS_ID],
            data_lib.EOS_ID)
        sample = sample_text(s.cfg, state, data.tokenizer, prompt, stop, c.train.sample_tokens)
        result.update(v, sample=sample)
        s.log(f"\nfinal validation loss {val:.4f} nats/token (unigram entropy "
              f"{info['unigram_entropy']:.4f}, {info['unigram_entropy'] - val:+.3f} better); "
              f"global MaxVio {vio:.3f}" + (f"; EMA parameters {v['val_loss_ema']:.4f}"
                                            if "val_loss_ema" in v else ""))
        s.log(f"greedy sample:\n{sample}\n")
    s.log(f"checkpoints: {os.path.join(result['workdir'], 'checkpoints')}\n"
          f"metrics: {os.path.join(result['workdir'], 'metrics.jsonl')}"
          f" (TensorBoard: tensorboard --logdir {result['workdir']})\n"
          f"wall time {time.time() - s.t_start:.0f}s")
    if s.main_process:
        with open(os.path.join(s.workdir, "result.json"), "w") as f:
            json.dump(result, f, indent=1)
    return result


def run(c, workdir: str, objective: objectives.Objective | None = None,
        data_fn=None) -> dict:
    """Train per config `c` in `workdir` (resuming what is there); returns the result dict.
    data_fn(setup) -> Data replaces the pre-training data stage (e.g. dsv3_jax.sft's)."""
    from dsv3_jax import writers
    s = set_up(c, workdir, objective)
    data = (data_fn or load_data)(s)
    with contextlib.ExitStack() as stack:   # closes checkpointer and writer, restores signals
        state, state_sharding, ckpt = restore_or_init(s, data, stack)
        ema, state, state_sharding = ema_lib.off_device(s.c, state, state_sharding, stack)
        evaluator = Evaluator(s, data, state_sharding)
        writer = (writers.create(workdir, truncate_after=int(state["step"])) if s.main_process
                  else writers.null())
        stack.callback(writer.close)
        state, step_fn = train_loop(s, data, state, state_sharding, ckpt, evaluator, writer,
                                    stack, ema)
        return finish(s, data, state, evaluator, writer, step_fn, ema)


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------

def cli_main(run_fn):
    """The `main(argv)` of a training entry point (train, sft, grpo): flags, multi-process
    initialisation, then run_fn(config, workdir); user errors as one line, exit 2."""
    @errors.cli
    def main(argv=None) -> int:
        from absl import logging
        logging.set_verbosity(logging.WARNING)   # orbax logs every file operation at INFO
        f = parse_flags(list(argv) if argv is not None else sys.argv)
        from dsv3_jax import distributed
        distributed.initialize(f.coordinator, f.num_processes, f.process_id)
        run_fn(f.config, f.workdir)
        return 0
    return main


main = cli_main(run)


if __name__ == "__main__":
    sys.exit(main())
