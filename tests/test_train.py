"""The training job: loss goes down, one compile, exact resume after kill -9, SIGTERM saves,
NaN halts, mismatched checkpoints give one clear error, metrics.jsonl has its keys."""
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsv3_jax import train, train_config, train_state
from dsv3_jax.ckpt import CheckpointMismatchError
from dsv3_jax.config import ConfigError
from experiments.configs import tiny

MICRO = ["--config.model.num_hidden_layers=2", "--config.model.hidden_size=64",
         "--config.model.intermediate_size=128", "--config.model.moe_intermediate_size=32",
         "--config.model.q_lora_rank=32", "--config.model.kv_lora_rank=32",
         "--config.data.seq_len=64", "--config.data.global_batch=4", "--config.train.log_every=1",
         "--config.data.eval_batches=1", "--config.train.sample_tokens=4"]


def micro_config(**train_overrides):
    c = tiny.get_config("quick")
    for flag in MICRO:
        key, value = flag[len("--config."):].split("=")
        section, name = key.split(".", 1)
        node = c[section]
        *parents, leaf = name.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = type(node[leaf])(value)
    for k, v in train_overrides.items():
        section, name = k.split(".")
        c[section][name] = v
    return c


def read_metrics(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def losses(workdir):
    return {r["step"]: r["loss"] for r in read_metrics(workdir) if "loss" in r}


def run_cli(workdir, *extra, env=None, **kw):
    cmd = [sys.executable, "-m", "dsv3_jax.train", "--config",
           "experiments/configs/tiny.py:quick", f"--workdir={workdir}", *MICRO, *extra]
    return subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **(env or {})},
                          cwd=os.path.dirname(os.path.dirname(__file__)), timeout=600, **kw)


def random_batch(seed, rows=4, t=64):
    """One packed-format batch of random tokens (one document per row)."""
    ids = np.random.default_rng(seed).integers(2, 8192, (rows, t + 1)).astype(np.int32)
    return {"inputs": ids[:, :-1], "targets": ids[:, 1:],
            "positions": np.tile(np.arange(t, dtype=np.int32), (rows, 1)),
            "segment_ids": np.ones((rows, t), np.int32), "loss_mask": np.ones((rows, t), np.float32)}


EMA_DECAY = 0.9


@pytest.fixture(scope="module")
def ema_step():
    """The micro config's step with EMA on (decay 0.9: a visible pull per step), compiled once
    for the tests below."""
    c = micro_config(**{"train.ema_decay": EMA_DECAY})
    cfg = train_config.validate(c)
    fns = train.make_step_fns(c, cfg)
    state = train_state.init_state(cfg, fns.optimizer, 0, ema=True)
    return c, cfg, fns, state, jax.jit(lambda s, b: train.train_step(s, b, fns))


def test_loss_decreases_on_a_fixed_batch(ema_step):
    _, _, _, state, step = ema_step
    batch = {k: v[None] for k, v in random_batch(0).items()}   # one micro-batch
    first = None
    for _ in range(15):
        state, m = step(state, batch)
        first = float(m["loss"]) if first is None else first
    assert float(m["loss"]) < first - 1.0, (first, float(m["loss"]))


def test_ema_follows_params_and_evaluates_as_built_by_hand(ema_step, rng):
    """After each of 3 steps ema = d·ema + (1-d)·params (the new params), in NumPy; the
    Evaluator given state['ema'] returns what it returns for that hand-built tree."""
    from types import SimpleNamespace
    from jax.sharding import NamedSharding, PartitionSpec as P
    _, cfg, fns, state, step = ema_step
    np.testing.assert_array_equal(jax.tree.leaves(state["ema"])[0],
                                  jax.tree.leaves(state["params"])[0])
    ema = jax.tree.map(lambda p: np.asarray(p, np.float64), state["params"])
    for i in range(3):
        batch = {k: v[None] for k, v in random_batch(int(rng.integers(1 << 30))).items()}
        state, _ = step(state, batch)
        ema = jax.tree.map(lambda e, p: EMA_DECAY * e + (1 - EMA_DECAY) * np.asarray(p, np.float64),
                           ema, state["params"])
        for got, want, p in zip(jax.tree.leaves(state["ema"]), jax.tree.leaves(ema),
                                jax.tree.leaves(state["params"])):
            # float32 rounding of a convex combination, a few ulps of the weights
            np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6 * np.abs(want).max())
    moved = max(float(np.abs(np.asarray(e) - np.asarray(p)).max())
                for e, p in zip(jax.tree.leaves(state["ema"]), jax.tree.leaves(state["params"])))
    assert moved > 1e-4     # EMA and params differ, so evaluating the wrong tree would show

    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))
    repl = NamedSharding(mesh, P())
    s = SimpleNamespace(mesh=mesh, fns=fns, sharding=lambda spec: NamedSharding(mesh, spec))
    val = [{k: jnp.asarray(v) for k, v in random_batch(int(rng.integers(1 << 30))).items()}]
    data = SimpleNamespace(val_batches=val, row_sharding=repl)
    evaluator = train.Evaluator(s, data, {"params": jax.tree.map(lambda _: repl, state["params"]),
                                          "router_bias": jax.tree.map(lambda _: repl,
                                                                      state["router_bias"])})
    by_hand = jax.tree.map(lambda e: jnp.asarray(e, jnp.float32), ema)
    got, _ = evaluator(state["ema"], state["router_bias"])
    want, _ = evaluator(by_hand, state["router_bias"])
    plain, _ = evaluator(state["params"], state["router_bias"])
    np.testing.assert_allclose(got, want, rtol=1e-5)
    assert abs(got - plain) > 1e-4, (got, plain)


def test_run_compiles_once_and_logs_documented_keys(tmp_path):
    c = micro_config(**{"train.steps": 6, "train.eval_every": 3, "train.checkpoint_every": 3})
    result = train.run(c, str(tmp_path))
    assert result["train_step_compiles"] == 1
    records = read_metrics(tmp_path)
    scalars = [r for r in records if "loss" in r]
    assert [r["step"] for r in scalars] == list(range(1, 7))
    keys = {"loss", "ce", "mtp_ce", "balance", "grad_norm", "lr", "tokens_per_s", "mfu",
            "maxvio/mean", "maxvio/layer_0", "mtp_weight", "gamma"}
    assert keys <= set(scalars[-1]), keys - set(scalars[-1])
    assert any("histograms" in r for r in records)
    assert any("val_loss" in r and "val_maxvio" in r for r in records)
    assert os.listdir(tmp_path / "tensorboard")
    assert np.isfinite(result["val_loss"]) and isinstance(result["sample"], str)


def test_host_ema_equals_the_in_step_ema_resumes_and_evaluates(tmp_path):
    """train.ema_on_host keeps the EMA in host memory (dsv3_jax/ema.py): after 6 steps its
    checkpointed EMA equals the in-step (device) EMA's to float32 rounding (XLA may fuse the
    multiply-add), and so does val_loss_ema (eval.ema), which differs from val_loss; a run
    resumed from step 3 ends with the host run's EMA bit for bit."""
    import shutil
    from dsv3_jax import ckpt
    kw = {"train.steps": 6, "train.eval_every": 100, "train.checkpoint_every": 3,
          "train.ema_decay": 0.7, "train.sample_tokens": 0, "train.async_checkpoint": False}
    results, emas = {}, {}
    for name, on_host in (("device", False), ("host", True), ("resumed", True)):
        c = micro_config(**kw, **{"train.ema_on_host": on_host})
        c.eval.ema = True
        workdir = tmp_path / name
        if name == "resumed":       # the host run's checkpoints up to step 3, then resume
            shutil.copytree(tmp_path / "host" / "checkpoints", workdir / "checkpoints")
            shutil.rmtree(workdir / "checkpoints" / "6")
        results[name] = train.run(c, str(workdir))
        emas[name] = ckpt.load_variables(str(workdir), use_ema=True)[1]["params"]
    for a, b, c in zip(*(jax.tree.leaves(emas[n]) for n in ("host", "device", "resumed"))):
        a, b = np.asarray(a), np.asarray(b)
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6 * np.abs(b).max())
        np.testing.assert_array_equal(a, np.asarray(c))
    assert results["host"]["val_loss_ema"] == pytest.approx(results["device"]["val_loss_ema"],
                                                            rel=1e-6)
    assert results["host"]["val_loss_ema"] == results["resumed"]["val_loss_ema"]
    assert abs(results["host"]["val_loss_ema"] - results["host"]["val_loss"]) > 1e-4


def test_resume_after_kill_is_exact(tmp_path):
    """kill -9 after step 7 (checkpoints every 3), rerun the same command: the per-step losses
    of the whole run equal an uninterrupted run's, bit for bit."""
    args = ["--config.train.steps=10", "--config.train.checkpoint_every=3",
            "--config.train.eval_every=100"]
    full = run_cli(tmp_path / "full", *args)
    assert full.returncode == 0, full.stderr[-3000:]
    killed = run_cli(tmp_path / "resumed", *args, env={"DSV3_FAULT_KILL_AFTER_STEP": "7"})
    assert killed.returncode == -signal.SIGKILL
    resumed = run_cli(tmp_path / "resumed", *args)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout
    assert losses(tmp_path / "resumed") == losses(tmp_path / "full")


def test_sigterm_finishes_step_saves_and_exits_zero(tmp_path):
    cmd = [sys.executable, "-m", "dsv3_jax.train", "--config", "experiments/configs/tiny.py:quick",
           f"--workdir={tmp_path}", *MICRO, "--config.train.steps=100000",
           "--config.train.checkpoint_every=100000", "--config.train.eval_every=100000"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=os.path.dirname(os.path.dirname(__file__)))
    deadline = time.time() + 300
    while time.time() < deadline:
        if (tmp_path / "metrics.jsonl").exists() and len(losses(tmp_path)) >= 3:
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    saved = sorted(int(d) for d in os.listdir(tmp_path / "checkpoints") if d.isdigit())
    assert saved and saved[-1] == max(losses(tmp_path)) and saved[-1] < 100000


@dataclasses.dataclass(frozen=True)
class NaNFrom:
    """The pre-training objective, whose loss turns NaN from step `at` on."""
    inner: object
    at: int

    def loss(self, params, router_bias, batch, step):
        loss, aux = self.inner.loss(params, router_bias, batch, step)
        return jnp.where(step >= self.at, jnp.nan, loss), aux

    def eval(self, params, router_bias, batch):
        return self.inner.eval(params, router_bias, batch)


def test_nan_loss_stops_naming_the_step_and_keeps_last_good_checkpoint(tmp_path):
    """NaN at step 3 (checkpoints every 2): the run stops naming step 3 and the checkpoint of
    step 2, which exists, is the latest, and holds finite weights."""
    from dsv3_jax.ckpt import trainer as ckpt_lib
    from dsv3_jax.objectives import pretrain
    c = micro_config(**{"train.steps": 12, "train.checkpoint_every": 2, "train.eval_every": 100})
    objective = NaNFrom(pretrain.make(c, train_config.validate(c)), at=3)
    with pytest.raises(FloatingPointError, match=r"NaN/Inf at step (\d+)") as err:
        train.run(c, str(tmp_path), objective)
    msg = err.value.args[0]
    bad = int(msg.split("at step ")[1].split(";")[0])
    named = int(msg.split("(step ")[1].split(")")[0])
    assert bad == 3 and named == 2, msg
    saved = sorted(int(d) for d in os.listdir(tmp_path / "checkpoints") if d.isdigit())
    assert saved == [2], saved
    assert str(tmp_path / "checkpoints") in msg
    ckpt = ckpt_lib.Checkpointer(str(tmp_path / "checkpoints"), async_save=False)
    restored = ckpt.manager.restore(2)["state"]
    ckpt.close()
    assert int(restored["step"]) == 2 and int(restored["nonfinite_step"]) == -1
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(restored["params"]))


def test_restore_checks_shapes_seeds_and_data_position(tmp_path):
    """A checkpoint of step 2 (2 micro-batches per step) restores with the data iterator at
    micro-batch 4; another model shape, train.seed or data.seed is one clear error naming it."""
    from dsv3_jax import data as data_lib
    c = micro_config(**{"train.steps": 2, "train.checkpoint_every": 2})
    c.data.micro_batch = 2
    train.run(c, str(tmp_path))
    c.train.steps = 4
    s = train.set_up(c, str(tmp_path))
    data = train.load_data(s)
    state, _, ckpt = train.restore_or_init(s, data)
    ckpt.close()
    assert int(state["step"]) == 2
    assert data.train_iter.get_state() == {"step": 4, "seed": c.data.seed,
                                           "seq_len": c.data.seq_len,
                                           "global_batch": c.data.micro_batch,
                                           "fim_rate": 0.0, "passkey_rate": 0.0,
                                           "passkey_len": c.data.seq_len, "passkey_loss": "all"}

    def other_config(**overrides):
        o = micro_config(**{"train.steps": 4})
        o.data.micro_batch = 2
        for k, v in overrides.items():
            section, name = k.split(".")
            o[section][name] = v
        return o

    with pytest.raises(CheckpointMismatchError) as err:
        train.run(other_config(**{"model.hidden_size": 96, "model.n_routed_experts": 8}),
                  str(tmp_path))
    msg = str(err.value)
    assert "shape mismatch" in msg and "embed" in msg and "router" in msg
    with pytest.raises(ConfigError, match=r"train.seed=0.*train.seed=7"):
        train.run(other_config(**{"train.seed": 7}), str(tmp_path))
    with pytest.raises(data_lib.DataError, match=r"seed=0.*data.seed=5"):
        train.run(other_config(**{"data.seed": 5}), str(tmp_path))
    with pytest.raises(data_lib.DataError, match=r"passkey_rate=0.0.*data.passkey_rate=0.5"):
        train.run(other_config(**{"data.passkey_rate": 0.5}), str(tmp_path))


def test_gradient_accumulation_equals_one_big_batch():
    """4 rows as 2 micro-batches of 2 (MTP depth 2, equal token counts per micro-batch): the
    same gradients (global norm, and every leaf through Adam's first moment, which after one
    step is (1-b1)·clipped g), updated params, moments and router biases as one batch of 4, to
    float32 rounding, not only the loss."""
    c = micro_config()
    c.model.num_nextn_predict_layers = 2
    c.balance.gamma = 0.01
    cfg = train_config.validate(c)
    fns = train.make_step_fns(c, cfg)
    state = train_state.init_state(cfg, fns.optimizer, 0, ema=False)
    big = random_batch(1)
    split = {k: v.reshape(2, 2, -1) for k, v in big.items()}
    big = {k: v[None] for k, v in big.items()}
    step = jax.jit(lambda s, b: train.train_step(s, b, fns))
    s1, m1 = step(state, big)
    s2, m2 = step(state, split)
    # float32: the per-micro-batch sums differ from the big batch's by reordering (~1e-6 rel.)
    close = lambda a, b, rtol=1e-5, atol=0.0: np.testing.assert_allclose(
        np.asarray(a, np.float64), np.asarray(b, np.float64), rtol=rtol,
        atol=max(atol, rtol * float(np.abs(np.asarray(b)).max())))
    close(m2["loss"], m1["loss"])
    close(m2["grad_norm"], m1["grad_norm"])
    adam = lambda st: st["opt_state"][1][0]                 # chain(clip, chain(adam, ...))
    for mu1, mu2, nu1, nu2 in zip(*(jax.tree.leaves(x) for x in (
            adam(s1).mu, adam(s2).mu, adam(s1).nu, adam(s2).nu))):
        close(mu2, mu1)                                     # (1-b1)·clipped gradient
        close(nu2, nu1)                                     # (1-b2)·its square
    # A first Adam step moves p by -lr·(g/(|g|+eps) + wd·p); d/dg of g/(|g|+eps) is
    # eps/(|g|+eps)^2, so the gradients' allowed difference (1e-5 of the leaf's largest, as
    # for mu above) bounds each parameter's difference, plus the float32 rounding of the step.
    lr, eps = float(fns.lr(0)), c.optim.eps
    for a, b, mu in zip(jax.tree.leaves(s2["params"]), jax.tree.leaves(s1["params"]),
                        jax.tree.leaves(adam(s1).mu)):
        g = np.abs(np.asarray(mu, np.float64)) / (1 - c.optim.b1)
        bound = lr * np.minimum(eps * 1e-5 * g.max() / (g + eps) ** 2, 2.0)
        diff = np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))
        slack = 1e-5 * lr + 2.4e-7 * np.abs(np.asarray(b))    # float32 rounding of the step
        assert (diff <= bound + slack).all(), (diff - bound - slack).max()
    np.testing.assert_array_equal(m1["counts"], m2["counts"])
    for a, b in zip(jax.tree.leaves(s1["router_bias"]), jax.tree.leaves(s2["router_bias"])):
        np.testing.assert_array_equal(a, b)
    assert any(np.abs(np.asarray(b)).max() > 0 for b in jax.tree.leaves(s1["router_bias"]))
    # Empty rows (train_state.pad_rows: what a pipeline appends to micro-batches that do not
    # split over the batch axes) change nothing: same loss, gradients, update and loads.
    s3, m3 = step(state, train_state.pad_rows(split, 2, 1))
    close(m3["loss"], m2["loss"])
    close(m3["grad_norm"], m2["grad_norm"])
    for a, b in zip(jax.tree.leaves(adam(s3).mu), jax.tree.leaves(adam(s2).mu)):
        close(a, b)                                         # every gradient leaf
    np.testing.assert_array_equal(m3["counts"], m2["counts"])


def test_only_pipelines_pad_micro_batches():
    mesh = {"data": 2, "fsdp": 1, "expert": 2, "pipeline": 2, "tensor": 1}
    assert train_state.micro_batch_padding(mesh, 2) == 2      # 2 rows over 4 batch ways
    assert train_state.micro_batch_padding(mesh, 8) == 0
    assert train_state.micro_batch_padding(dict(mesh, pipeline=1), 2) == 0   # an error instead
    padded = train_state.pad_rows({"segment_ids": np.ones((3, 2, 5), np.int32)}, 2, 1)
    assert padded["segment_ids"].shape == (3, 4, 5) and not padded["segment_ids"][:, 2:].any()


def test_batch_ramp_stages():
    # 10 tokens per row: stages start once 80 and 120 tokens have been consumed
    sched = train_state.BatchSchedule(8, 2, "0:2,80:4,120:8", 8, seq_len=10)
    assert [sched.rows(s) for s in range(8)] == [2, 2, 2, 2, 4, 8, 8, 8]
    assert list(sched.first_micro) == [0, 1, 2, 3, 4, 6, 10, 14, 18]
    assert list(sched.tokens_before) == [0, 20, 40, 60, 80, 120, 200, 280, 360]
    assert [sched.step_at(t) for t in (0, 1e-9, 60, 61, 200, 0.5)] == [0, 1, 3, 4, 6, 6]
    with pytest.raises(ConfigError, match="multiple"):
        train_state.BatchSchedule(8, 3, "0:3,0.5:8", 8)


def test_bad_config_values_are_reported_together():
    c = micro_config()
    c.data.seq_len = 0
    c.optim.peak_lr = -1.0
    c.model.n_group = 3
    c.eval.ema = True                    # without train.ema_decay there is no EMA to evaluate
    c.data.fim_rate = 1.5
    c.data.passkey_rate, c.data.passkey_len, c.data.passkey_loss = -0.1, 20, "key"
    with pytest.raises(ConfigError) as err:
        train_config.validate(c)
    msg = str(err.value)
    assert "seq_len" in msg and "peak_lr" in msg and "n_group" in msg
    assert "train.ema_decay" in msg and "data.fim_rate" in msg
    assert all(f"data.passkey_{k}" in msg for k in ("rate", "len", "loss"))


def test_unknown_cli_key_is_an_error(tmp_path):
    out = run_cli(tmp_path, "--config.train.stepz=3")
    assert out.returncode != 0 and "stepz" in out.stderr
