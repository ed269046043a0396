"""The training frame: strict configs, user errors through the CLI, starting from a checkpoint,
an objective as one module, and the package's import structure."""
import ast
import os
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsv3_jax import errors, model, train, train_config, train_state
from dsv3_jax.config import ConfigError, ModelConfig
from experiments.configs import tiny

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "experiments" / "configs").glob("*.py"))
CONFIGS = [p for p in CONFIGS if p.name != "__init__.py"]
QUICK = str(ROOT / "experiments" / "configs" / "tiny.py") + ":quick"


# ---- configs ------------------------------------------------------------------------------------

@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_config_rejects_an_unknown_variant(path):
    with pytest.raises(ConfigError, match="unknown variant 'quik'"):
        train_config.load(str(path), "quik")


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_config_validates(path):
    assert isinstance(train_config.validate(train_config.load(str(path))), ModelConfig)


def test_parse_arg_types_and_errors():
    v = train_config.parse_arg("quick,seed=3,mode=fp8,scale=0.5", quick=False, seed=0,
                               mode="bf16", scale=1.0, flag=False)
    assert (v.quick, v.seed, v.mode, v.scale, v.flag) == (True, 3, "fp8", 0.5, False)
    assert train_config.parse_arg("", quick=False).quick is False
    with pytest.raises(ConfigError, match="needs a value"):
        train_config.parse_arg("seed", seed=0)
    with pytest.raises(ConfigError, match="is not a int"):
        train_config.parse_arg("seed=x", seed=0)
    with pytest.raises(ConfigError, match="exclude each other"):
        train_config.load(str(ROOT / "experiments/configs/fp8_vs_bf16.py"), "bf16,fp8")


def test_model_config_from_dict_is_strict():
    d = ModelConfig().to_dict()
    assert ModelConfig.from_dict(d) == ModelConfig()
    with pytest.raises(ConfigError, match="'hiden_size' \\(did you mean 'hidden_size'\\?\\)"):
        ModelConfig.from_dict({**d, "hiden_size": 8})
    assert ModelConfig.from_dict({**d, "extra": 1}, strict=False) == ModelConfig()


# ---- user errors through the CLI ----------------------------------------------------------------

@pytest.mark.parametrize("args,message", [
    (["--config.train.stepz=3"], "train has no key 'stepz'; did you mean 'train.steps'"),
    (["--config.trian.steps=3"], "the config has no key 'trian'; did you mean 'train'"),
    (["--config.train.steps=abc"], "--config.train.steps=abc"),
    (["--config.train.steps=0"], "train.steps must be >= 1"),
    (["--config.model.n_group=3"], "n_group"),
    (["--config.mesh.expert=3"], "mesh axis"),
    (["--config.train.init_from=/nonexistent/run"], "init_from"),
    (["--config.model.vocab_size=300"], "tokenizer has 8192 tokens"),
    (["--bogus=1"], "Unknown command line flag 'bogus'"),
    (["extra"], "unexpected arguments"),
], ids=["key", "section", "value", "range", "model", "mesh", "init_from", "tokenizer", "flag",
        "positional"])
def test_train_cli_reports_user_errors_in_one_line(args, message, capsys, tmp_path, monkeypatch):
    monkeypatch.delenv(errors.TRACEBACK_ENV, raising=False)
    with pytest.raises(SystemExit) as exit_:
        train.main(["train", "--config", QUICK, f"--workdir={tmp_path}", *args])
    err = capsys.readouterr().err
    assert exit_.value.code == 2
    assert "error:" in err and message in err, err
    assert "Traceback" not in err


def test_config_file_mistakes(capsys, tmp_path):
    for config, message in [("nonexistent.py", "does not exist"),
                            (str(ROOT / "experiments/configs/small.py") + ":quik",
                             "small.py: unknown variant 'quik'")]:
        with pytest.raises(SystemExit) as exit_:
            train.main(["train", "--config", config, f"--workdir={tmp_path}"])
        assert exit_.value.code == 2 and message in capsys.readouterr().err


def test_traceback_on_request(monkeypatch, tmp_path):
    monkeypatch.setenv(errors.TRACEBACK_ENV, "1")
    with pytest.raises(errors.UserError, match="stepz"):
        train.main(["train", "--config", QUICK, f"--workdir={tmp_path}", "--config.train.stepz=3"])


def test_internal_errors_keep_their_traceback():
    @errors.cli
    def broken(argv=None):
        raise KeyError("a bug, not a user mistake")
    with pytest.raises(KeyError):
        broken()


# ---- starting from a checkpoint -----------------------------------------------------------------

def _micro(**overrides):
    c = tiny.get_config("quick")
    c.model.update(dict(num_hidden_layers=2, hidden_size=64, intermediate_size=128,
                        moe_intermediate_size=32, q_lora_rank=32, kv_lora_rank=32))
    c.data.update(dict(seq_len=64, global_batch=4))
    for k, v in overrides.items():
        section, name = k.split(".")
        c[section][name] = v
    return c


def _source_variables(cfg: ModelConfig):
    """Random weights and non-zero router biases (so taking them is visible)."""
    variables = model.init(cfg, jax.random.key(123))
    rng = np.random.default_rng(5)
    variables["router_bias"] = jax.tree.map(
        lambda b: jnp.asarray(rng.normal(size=b.shape), b.dtype), variables["router_bias"])
    return variables


def _write(kind: str, c, variables, path: str) -> str:
    from dsv3_jax import convert
    cfg = train_config.validate(c)
    if kind == "orbax":
        convert.save_orbax(cfg, variables, path)
    elif kind == "safetensors":
        convert.save_hf(cfg, variables, path)
    else:   # a trainer workdir with one checkpoint
        from dsv3_jax.ckpt import trainer
        fns = train.make_step_fns(c, cfg)
        state = train_state.state_from_variables(variables, fns.optimizer, jax.random.key(0),
                                                 ema=False)
        ckpt = trainer.Checkpointer(os.path.join(path, "checkpoints"), async_save=False)
        ckpt.save(7, state, {"step": 7}, {"config": c.to_dict(), "step": 7})
        ckpt.close()
    return path


@pytest.mark.parametrize("kind", ["trainer", "orbax", "safetensors"])
def test_init_from_takes_weights_bit_for_bit_with_a_fresh_optimizer(kind, tmp_path):
    c = _micro()
    variables = _source_variables(train_config.validate(c))
    src = _write(kind, c, variables, str(tmp_path / "src"))
    for take_bias in (True, False):
        c2 = _micro(**{"train.init_from": src, "train.init_router_bias": take_bias,
                       "train.seed": 9})
        s = train.set_up(c2, str(tmp_path / f"run_{take_bias}"))
        state, _, ckpt = train.restore_or_init(s, data=None)
        ckpt.close()
        assert int(state["step"]) == 0
        for a, b in zip(jax.tree.leaves(variables["params"]), jax.tree.leaves(state["params"])):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        for a, b in zip(jax.tree.leaves(variables["router_bias"]),
                        jax.tree.leaves(state["router_bias"])):
            np.testing.assert_array_equal(np.asarray(b), np.asarray(a) if take_bias else 0.0)
        assert all(not np.any(np.asarray(x)) for x in jax.tree.leaves(state["opt_state"])
                   if np.asarray(x).ndim)   # fresh moments


def test_init_from_a_checkpoint_of_another_shape_is_a_clear_error(tmp_path):
    c = _micro()
    src = _write("orbax", c, _source_variables(train_config.validate(c)), str(tmp_path / "src"))
    other = _micro(**{"train.init_from": src})
    other.model.hidden_size = 96
    s = train.set_up(other, str(tmp_path / "run"))
    with pytest.raises(errors.UserError, match="(?s)does not fit config.model.*params/embed"):
        train.restore_or_init(s, data=None)


# ---- an objective is one module -------------------------------------------------------------------

def test_next_token_objective_trains_the_main_head_only(rng):
    """objectives/next_token: the step's loss is the main head's CE, recomputed in float64
    NumPy from the logits, and the MTP module gets no gradient (weight decay alone moves it)."""
    c = _micro(**{"train.objective": "next_token"})
    cfg = train_config.validate(c)
    fns = train.make_step_fns(c, cfg)
    state = train_state.init_state(cfg, fns.optimizer, 0, ema=False)
    ids = rng.integers(2, cfg.vocab_size, (2, 33)).astype(np.int32)
    batch = {"inputs": ids[:, :-1], "targets": ids[:, 1:],
             "positions": np.tile(np.arange(32, dtype=np.int32), (2, 1)),
             "segment_ids": np.ones((2, 32), np.int32), "loss_mask": np.ones((2, 32), np.float32)}
    new, metrics = jax.jit(lambda s, b: train.train_step(s, b, fns))(
        state, {k: v[None] for k, v in batch.items()})
    logits = np.asarray(model.forward(cfg, {"params": state["params"],
                                            "router_bias": state["router_bias"]},
                                      batch["inputs"]).logits, np.float64)
    lse = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    ce = (lse - np.take_along_axis(logits, batch["targets"][..., None], -1)[..., 0]).mean()
    np.testing.assert_allclose(float(metrics["loss"]), ce, rtol=2e-5)
    assert set(metrics) >= {"loss", "ce", "grad_norm", "maxvio"} and "mtp_ce" not in metrics
    decay = 1 - float(fns.lr(0)) * c.optim.weight_decay      # AdamW's decoupled decay alone
    for a, b in zip(jax.tree.leaves(state["params"]["mtp_0"]),
                    jax.tree.leaves(new["params"]["mtp_0"])):
        if a.ndim >= 2:
            np.testing.assert_allclose(np.asarray(b), np.asarray(a) * decay, rtol=1e-6)


def test_unknown_objective_is_a_config_error():
    c = _micro(**{"train.objective": "pretrian"})
    with pytest.raises(ConfigError, match="no module 'dsv3_jax.objectives.pretrian'"):
        train.make_step_fns(c, train_config.validate(c))


# ---- structure --------------------------------------------------------------------------------------

def _imports(path: pathlib.Path, modules: set[str]) -> set[str]:
    """dsv3_jax modules imported at module level (function-level imports are lazy by design).
    `from pkg import sub` counts as importing pkg.sub, not pkg's __init__."""
    tree = ast.parse(path.read_text())
    out = set()
    for node in tree.body:
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            subs = {f"{node.module}.{a.name}" for a in node.names} & modules
            out |= subs if len(subs) == len(node.names) else subs | {node.module}
    return {m for m in out if m in modules}


def _module_graph() -> dict[str, set[str]]:
    pkg = ROOT / "dsv3_jax"
    names = {}
    for p in pkg.rglob("*.py"):
        rel = p.relative_to(ROOT).with_suffix("")
        parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
        names[".".join(parts)] = p
    return {m: {i for i in _imports(p, set(names)) if i != m} for m, p in names.items()}


def test_the_package_has_no_import_cycle():
    graph = _module_graph()
    state = {}

    def visit(m, stack):
        state[m] = "open"
        for n in graph[m]:
            if state.get(n) == "open":
                raise AssertionError("import cycle: " + " -> ".join(stack + [m, n]))
            if n not in state:
                visit(n, stack + [m])
        state[m] = "done"

    for m in graph:
        if m not in state:
            visit(m, [])


def test_plan_and_model_do_not_import_the_trainer_or_experiments():
    graph = _module_graph()

    def reach(m, seen=None):
        seen = set() if seen is None else seen
        for n in graph[m]:
            if n not in seen:
                seen.add(n)
                reach(n, seen)
        return seen

    for m in ("dsv3_jax.plan", "dsv3_jax.train_state", "dsv3_jax.model"):
        assert "dsv3_jax.train" not in reach(m), m
    for p in (ROOT / "dsv3_jax").rglob("*.py"):
        assert "experiments" not in {i.split(".")[0] for i in _imports_all(p)}, p


def _imports_all(path: pathlib.Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
    return out


def test_modules_stay_small():
    """One concept per module: none past ~500 lines."""
    sizes = {p.relative_to(ROOT).as_posix(): len(p.read_text().splitlines())
             for d in ("dsv3_jax", "kernels_pallas") for p in (ROOT / d).rglob("*.py")}
    assert not {p: n for p, n in sizes.items() if n > 520}, sizes


def test_resuming_with_another_data_order_is_a_user_error(capsys, tmp_path):
    """The checkpoint's data position belongs to its data.seed: resuming with another seed
    would silently train on another stream."""
    from test_train import MICRO
    base = ["train", "--config", QUICK, f"--workdir={tmp_path}", *MICRO,
            "--config.train.steps=2", "--config.train.eval_every=100"]
    assert train.main(base) == 0
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        train.main(base + ["--config.train.steps=4", "--config.data.seed=1"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "data.seed=1" in err and "Traceback" not in err, err
