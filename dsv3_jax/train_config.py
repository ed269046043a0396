"""The training config: its schema (every field, commented), variant parsing, and validation.

Experiment files (`experiments/configs/*.py`) build on `base_config()` and `model_block(preset)`,
parse their `get_config(arg)` variants with `parse_arg`, and the trainer checks the result with
`validate(c)` before anything compiles. ml-collections is imported here and in the entry modules
only; the model, kernels and benchmarks do not need it.
"""
from __future__ import annotations

import ast
import dataclasses
import difflib
import os

import ml_collections

from dsv3_jax import config as config_lib
from dsv3_jax.config import ConfigError, ModelConfig
from dsv3_jax.errors import UserError


def default_config_path() -> str:
    """experiments/configs/tiny.py beside the package (a file path: the library does not import
    the top-level `experiments` package)."""
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return os.path.join(here, "experiments", "configs", "tiny.py")


def load(path: str, arg: str | None = None) -> ml_collections.ConfigDict:
    """get_config(arg) of an experiment file; `path` may carry the variant as `file.py:arg`
    (as --config does)."""
    import importlib.util
    if arg is None and ":" in os.path.basename(path):
        path, arg = path.rsplit(":", 1)
    if not os.path.isfile(path):
        raise ConfigError(f"config file {path!r} does not exist")
    spec = importlib.util.spec_from_file_location(
        f"dsv3_config_{os.path.splitext(os.path.basename(path))[0]}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ConfigError(f"config file {path!r} defines no get_config(arg=None)")
    return module.get_config(arg)


def model_block(preset: str, **overrides) -> ml_collections.ConfigDict:
    """Every ModelConfig field of the preset, so any can be overridden from the command line."""
    fields = dataclasses.asdict(config_lib.preset(preset, **overrides))
    fields["preset"] = preset
    return ml_collections.ConfigDict(fields, type_safe=False)


def base_config() -> ml_collections.ConfigDict:
    """The schema: every section and field the trainer reads, with its default."""
    c = ml_collections.ConfigDict()
    c.data = ml_collections.ConfigDict(dict(
        seq_len=256,              # tokens per packed row
        global_batch=8,           # rows per optimizer step, all processes together
        micro_batch=0,            # rows per forward/backward (gradient accumulation); 0 = global
        batch_ramp="",            # e.g. "0:2,1e6:4,2e6:8": rows per step once that many tokens
                                  # have been consumed (report: 3072 -> 15360 over 469B tokens)
        seed=0,                   # shuffling of documents (per epoch)
        document_masking=False,   # packed documents attend only within themselves; the report
                                  # pre-trains without this masking (§4.1), SFT uses it
        fim_rate=0.0,             # share of documents in Fill-in-the-Middle's PSM form per epoch
                                  # (report §4.1: 0.1; dsv3_jax/fim.py); needs vocab >= 8198
        passkey_rate=0.0,         # share of rows that are passkey retrieval samples (long-context
                                  # stage; dsv3_jax/data.py)
        passkey_len=0,            # tokens per passkey sample (0 = the row), packed in the row
        passkey_loss="all",       # loss on every token of a passkey sample, or "answer" (the key)
        data_dir="",              # TFDS data dir; "" = $DSV3_DATA_DIR or ~/.cache/dsv3_jax/tfds
        eval_batches=8,           # validation batches per evaluation
    ))
    c.train = ml_collections.ConfigDict(dict(
        objective="pretrain",     # dsv3_jax/objectives/<name>.py (or a dotted module path)
        steps=600,                # optimizer steps of the run
        seed=0,                   # parameter init and the state RNG
        init_from="",             # start from these weights (trainer workdir/checkpoint, orbax
                                  # export or HF/official safetensors dir): fresh optimizer, step 0
        init_router_bias=True,    # with init_from: also take the routers' selection biases
        log_every=10,             # steps between metric logs (the only host syncs)
        eval_every=200,           # steps between validation loss / global MaxVio
        checkpoint_every=200,     # steps between checkpoints (and one at the end)
        keep_checkpoints=3,       # checkpoints kept in workdir/checkpoints
        async_checkpoint=True,    # orbax writes in the background
        ema_decay=0.0,            # parameter EMA (0 = off), e.g. 0.999
        ema_on_host=True,         # the EMA in host memory, updated after each step off the
                                  # device (report §3.2.3; dsv3_jax/ema.py); False: in the step
        ce_chunk=64,              # head + CE fused over this many positions (0 = full logits)
        peak_tflops=0.4,          # per-device peak for MFU (2 CPU cores ~0.4; H200 bf16 ~990)
        sample_prompt="def ",     # greedy sample printed at the end
        sample_tokens=48,
    ))
    c.optim = ml_collections.ConfigDict(dict(
        peak_lr=3e-3,             # report: 2.2e-4 at 671B scale
        warmup_steps=50,          # report: 2K steps
        # Schedule boundaries are token counts; a value in [0, 1] is that fraction of the run's
        # tokens (as here: the report's 10T / 14.3T / 14.633T of 14.8T).
        constant_until=0.676,     # constant LR until (report: 10T tokens)
        decay_until=0.966,        # cosine to 10% of peak until (14.3T)
        tail1_until=0.989,        # 10% of peak until (14.633T: 333B tokens), then 3.3% (7.3e-6)
        final_frac=0.1,           # where the cosine ends, as a fraction of peak (SFT: 1e-6/5e-6)
        b1=0.9, b2=0.95, eps=1e-8,
        weight_decay=0.1,         # not applied to norm scales
        clip_norm=1.0,            # global gradient norm clipping
        moments_dtype="float32",  # "bfloat16" as in the report
    ))
    c.balance = ml_collections.ConfigDict(dict(
        gamma=0.001,              # aux-loss-free bias speed
        gamma_until=0.966,        # then 0 (tokens or fraction; report: after 14.3T tokens)
        alpha=1e-4,               # sequence-wise balance loss weight
        loss="sequence",          # balance loss scope: "sequence" (report eqs. 17-20) or "batch"
                                  # (the batch-wise auxiliary loss of §4.5.3; per micro-batch)
    ))
    c.mtp = ml_collections.ConfigDict(dict(
        lambda_start=0.3,         # MTP loss weight ...
        lambda_end=0.1,           # ... and after the switch
        lambda_switch=0.676,      # tokens or fraction (report: 10T of 14.8T)
    ))
    c.eval = ml_collections.ConfigDict(dict(
        ema=False,                # also evaluate the EMA parameters (val_loss_ema; needs
                                  # train.ema_decay > 0)
    ))
    c.mesh = ml_collections.ConfigDict(dict(
        data=-1,                  # pure data parallel (-1: all devices left over)
        fsdp=1,                   # data parallel with params sharded along `embed`
        expert=1,                 # expert parallel (routed experts split; batch split too)
        pipeline=1,               # MoE layers split into stages (schedule: c.pipeline)
        tensor=1,                 # heads and FFN widths
    ))
    c.pipeline = ml_collections.ConfigDict(dict(
        schedule="dualpipev",     # gpipe | 1f1b | zb1p | dualpipev | dualpipe (mesh.pipeline > 1)
        microbatches=0,           # micro-batches per step through the pipeline; 0: the step's
                                  # micro-batches (global_batch / data.micro_batch); > 0 sets
                                  # data.micro_batch = global_batch / microbatches
        branched=True,            # each rank runs only its own ops in a tick (lax.cond per op
                                  # and stage kind); False: every rank runs every op, masked
        recompute=True,           # B and W re-run the stage's forward from its saved input;
                                  # False: F keeps the stage's VJP residuals per micro-batch
                                  # (more memory; slower on CPU: benchmarks/pipeline.py)
        split_w=False,            # zb1p / dualpipe(v): False: W runs with its B (one VJP);
                                  # True: W is its own op, per Linear: B stores each deferred
                                  # GEMM's input and output gradient, W computes the dW GEMMs
                                  # (layers/common.deferred_weight_grads; benchmarks/pipeline.py)
    ))
    return c


def parse_arg(arg: str | None, *, config: str = "config", **defaults) -> ml_collections.ConfigDict:
    """Parse a `get_config(arg)` variant string strictly (big_vision's `parse_arg`).

      parse_arg("quick,seed=3", quick=False, seed=0, mode="bf16")
        -> ConfigDict(quick=True, seed=3, mode="bf16")

    A bare name sets a boolean to True; `name=value` takes the default's type. A name that is not
    a declared variant is a ConfigError naming the known ones (and the closest match).
    """
    out = ml_collections.ConfigDict(dict(defaults))
    for part in filter(None, (p.strip() for p in (arg or "").split(","))):
        name, eq, value = part.partition("=")
        if name not in defaults:
            close = difflib.get_close_matches(name, list(defaults), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"{config}: unknown variant {name!r} in {arg!r} (known: "
                              f"{', '.join(sorted(defaults)) or 'none'}){hint}")
        default = defaults[name]
        if not eq:
            if not isinstance(default, bool):
                raise ConfigError(f"{config}: variant {name!r} needs a value ({name}=...)")
            out[name] = True
            continue
        try:
            if isinstance(default, bool):
                parsed = {"true": True, "1": True, "false": False, "0": False}[value.lower()]
            elif isinstance(default, str):
                parsed = value
            else:
                parsed = type(default)(ast.literal_eval(value))
        except (KeyError, ValueError, SyntaxError, TypeError):
            raise ConfigError(f"{config}: variant {name}={value!r} is not a "
                              f"{type(default).__name__}") from None
        out[name] = parsed
    return out


def model_config(c) -> ModelConfig:
    """config.model (a preset's fields plus overrides) -> the frozen, validated ModelConfig."""
    fields = {k: v for k, v in c.model.to_dict().items() if k != "preset"}
    return ModelConfig.from_dict(fields, strict=True, where="config.model")


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
    if "pipeline" in c:
        from dsv3_jax.pipeline.schedules import SCHEDULES
        if c.pipeline.schedule not in SCHEDULES:
            close = difflib.get_close_matches(c.pipeline.schedule, SCHEDULES, n=1)
            errors.append(f"pipeline.schedule={c.pipeline.schedule!r} is not one of "
                          f"{', '.join(SCHEDULES)}" + (f"; did you mean {close[0]!r}?" if close
                                                       else ""))
    if ("pipeline" in c and not c.pipeline.microbatches and not d.micro_batch
            and c.mesh.pipeline > 1):
        # a pipeline needs micro-batches: by default the fewest every schedule accepts (2P)
        c.pipeline.microbatches = 2 * c.mesh.pipeline
    if "pipeline" in c and c.pipeline.microbatches:
        mbs = c.pipeline.microbatches
        if mbs < 1 or d.global_batch % mbs:
            errors.append(f"pipeline.microbatches={mbs} must divide data.global_batch="
                          f"{d.global_batch}")
        elif d.micro_batch and d.micro_batch != d.global_batch // mbs:
            errors.append(f"pipeline.microbatches={mbs} means data.micro_batch="
                          f"{d.global_batch // mbs}, but data.micro_batch={d.micro_batch}: set "
                          "one of them")
        else:   # the pipeline's micro-batches are the step's micro-batches
            d.micro_batch = d.global_batch // mbs
    need(0.0 <= d.fim_rate <= 1.0, f"data.fim_rate must be in [0, 1], got {d.fim_rate}")
    need(0.0 <= d.passkey_rate <= 1.0,
         f"data.passkey_rate must be in [0, 1], got {d.passkey_rate}")
    from dsv3_jax.long_context_eval import MIN_LEN
    need(d.passkey_len == 0 or MIN_LEN <= d.passkey_len <= d.seq_len,
         f"data.passkey_len must be 0 (the row) or in [{MIN_LEN}, data.seq_len={d.seq_len}], "
         f"got {d.passkey_len}")
    need(d.passkey_loss in ("all", "answer"),
         f"data.passkey_loss must be 'all' or 'answer', got {d.passkey_loss!r}")
    if d.fim_rate > 0:
        from dsv3_jax import fim
        need(c.model.vocab_size >= fim.MIN_VOCAB,
             f"data.fim_rate={d.fim_rate} puts the FIM tokens (ids {fim.FIM_BEGIN_ID}-"
             f"{fim.FIM_END_ID}) in the stream, but model.vocab_size={c.model.vocab_size}: set "
             f"--config.model.vocab_size=8256 (or more)")
    need(t.steps >= 1, f"train.steps must be >= 1, got {t.steps}")
    for k in ("log_every", "eval_every", "checkpoint_every", "keep_checkpoints"):
        need(t[k] >= 1, f"train.{k} must be >= 1, got {t[k]}")
    need(0.0 <= t.ema_decay < 1.0, f"train.ema_decay must be in [0, 1), got {t.ema_decay}")
    need(not ("eval" in c and c.eval.ema) or t.ema_decay > 0,
         "eval.ema=True evaluates the parameter EMA, but train.ema_decay=0 keeps none: set "
         "train.ema_decay (e.g. 0.99)")
    need(t.ce_chunk >= 0, f"train.ce_chunk must be >= 0, got {t.ce_chunk}")
    need(t.peak_tflops > 0, f"train.peak_tflops must be > 0, got {t.peak_tflops}")
    if c.model.get("train_attention") == "pallas":
        from dsv3_jax.layers import attention
        need(attention.tokamax_available(),
             "model.train_attention='pallas' needs tokamax>=0.0.17 (Python >= 3.12, jax >= "
             "0.11.1) on a GPU; use 'blockwise' (or 'auto') here")
    need(not t.init_from or os.path.exists(os.path.expanduser(t.init_from)),
         f"train.init_from: {t.init_from!r} does not exist")
    need(o.peak_lr > 0, f"optim.peak_lr must be > 0, got {o.peak_lr}")
    need(0 <= o.warmup_steps, f"optim.warmup_steps must be >= 0, got {o.warmup_steps}")
    need(0 <= o.final_frac <= 1, f"optim.final_frac must be in [0, 1], got {o.final_frac}")
    need(min(o.constant_until, o.decay_until, o.tail1_until) >= 0,
         "optim.constant_until, decay_until and tail1_until are token counts (or fractions) >= 0")
    need(0 <= o.b1 < 1 and 0 <= o.b2 < 1, "optim.b1 and optim.b2 must be in [0, 1)")
    need(o.weight_decay >= 0 and o.clip_norm > 0, "optim.weight_decay >= 0 and clip_norm > 0")
    need(o.moments_dtype in ("float32", "bfloat16"),
         f"optim.moments_dtype must be float32 or bfloat16, got {o.moments_dtype!r}")
    need(b.gamma >= 0 and b.alpha >= 0, "balance.gamma and balance.alpha must be >= 0")
    need(b.loss in ("sequence", "batch"),
         f"balance.loss must be 'sequence' or 'batch', got {b.loss!r}")
    need(b.gamma_until >= 0 and m.lambda_switch >= 0,
         "balance.gamma_until and mtp.lambda_switch are token counts (or fractions) >= 0")
    need(m.lambda_start >= 0 and m.lambda_end >= 0, "mtp lambdas must be >= 0")
    if not errors:   # the boundaries in tokens, resolved against the run's batch schedule
        from dsv3_jax import train_state
        try:
            sched = train_state.batch_schedule(c)
            at = [sched.step_at(v) for v in (o.constant_until, o.decay_until, o.tail1_until)]
            need(at == sorted(at), "optim needs constant_until <= decay_until <= tail1_until "
                 f"(in tokens; steps {at})")
        except ConfigError as e:
            errors.append(str(e))
    try:
        cfg = model_config(c)
    except (ConfigError, TypeError) as e:
        errors.append(str(e))
        cfg = None
    if errors:
        raise ConfigError("invalid training config:\n  - " + "\n  - ".join(errors))
    return cfg


# ----------------------------------------------------------------------------------------------
# The command line of the training entry points
# ----------------------------------------------------------------------------------------------

def parse_flags(argv: list[str]):
    """absl flags: --config (file[:variant]) with --config.section.key=value overrides, --workdir,
    multi-process flags. Any mistake in them is a UserError (one `error:` line)."""
    from absl import flags
    from ml_collections import config_flags
    # The config file first, on its own, so that its errors (a missing file, an unknown variant)
    # surface as themselves rather than inside the flag library's report.
    import argparse
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument("--config", default=default_config_path())
    path = pre.parse_known_args(argv[1:])[0].config
    _check_override_keys(load(path), argv)
    f = flags.FlagValues()
    try:   # config_flags finds the overrides in argv while defining the flag
        config_flags.DEFINE_config_file("config", default_config_path(), "experiment config file",
                                        flag_values=f, lock_config=True, sys_argv=argv)
        flags.DEFINE_string("workdir", "runs/tiny", "checkpoints, metrics.jsonl and TensorBoard "
                            "logs", flag_values=f)
        flags.DEFINE_string("coordinator", None, "multi-process: coordinator host:port "
                            "(process 0)", flag_values=f)
        flags.DEFINE_integer("num_processes", None, "multi-process: number of processes",
                             flag_values=f)
        flags.DEFINE_integer("process_id", None, "multi-process: this process's index",
                             flag_values=f)
        rest = f(argv)
        f.config   # noqa: B018  (overrides are applied on first access)
    except UserError:
        raise
    except Exception as e:   # absl and ml_collections report bad flags with assorted types
        raise UserError(f"bad command line: {_flag_message(e)}") from e
    if len(rest) > 1:
        raise UserError(f"unexpected arguments {rest[1:]}")
    return f


def _check_override_keys(c, argv: list[str]) -> None:
    """--config.section.key=value must name a key of the config (with the closest as a hint)."""
    import difflib
    for a in argv:
        if not a.startswith("--config."):
            continue
        key = a[len("--config."):].split("=", 1)[0]
        node, walked = c, []
        for part in key.split("."):
            keys = list(node.keys()) if hasattr(node, "keys") else []
            if part not in keys:
                close = difflib.get_close_matches(part, keys, n=1)
                where = ".".join(walked) or "the config"
                hint = f"; did you mean {'.'.join(walked + close)!r}?" if close else ""
                raise UserError(f"--config.{key}: {where} has no key {part!r}{hint}")
            node, walked = node[part], walked + [part]


def _flag_message(e: BaseException) -> str:
    """ml_collections wraps 'unknown key' errors in reprs of reprs: unwrap to the text."""
    msg = str(e)
    while len(msg) > 1 and msg[0] == msg[-1] and msg[0] in "'\"":
        msg = msg[1:-1].encode().decode("unicode_escape")
    return " ".join(msg.split())
