"""dsv3_jax.ckpt: one loader for every checkpoint format (trainer, orbax export, safetensors),
ModelConfig.from_dict, and that what the loaders return drives every model entry point."""
import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsv3_jax import ckpt, config, generate, kv_cache, model
from dsv3_jax.config import ConfigError, ModelConfig
from test_convert import random_variables, small_cfg


def assert_bitwise_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)

    def eq(x, y):
        x, y = np.asarray(x), np.asarray(y)
        assert x.dtype == y.dtype == np.float32 and x.shape == y.shape
        np.testing.assert_array_equal(x.view(np.uint32), y.view(np.uint32))
    jax.tree.map(eq, a, b)


# ----------------------------------------------------------------------------------------------
# load_hf -> the model's entry points (NumPy variables)
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("mtp,moe_impl", [(0, "sorted"), (1, "auto")])
def test_load_hf_variables_drive_forward_on_the_sorted_moe_path(tmp_path, mtp, moe_impl):
    """The README's example: load_hf returns NumPy arrays; forward must take them, also where
    the sorted (grouped-GEMM) MoE path indexes expert weights with a traced index (2 x 40 rows
    with auto picks it)."""
    cfg = small_cfg(num_nextn_predict_layers=mtp, moe_impl=moe_impl)
    v = random_variables(cfg)
    ckpt.save_hf(cfg, v, str(tmp_path))
    cfg2, loaded = ckpt.load_hf(str(tmp_path), moe_impl=moe_impl)   # ours: not in config.json
    assert cfg2 == cfg and isinstance(jax.tree.leaves(loaded)[0], np.ndarray)
    ids = jnp.asarray(np.random.default_rng(1).integers(0, cfg.vocab_size, (2, 40)), jnp.int32)
    out = model.forward(cfg2, loaded, ids)
    want = model.forward(cfg, jax.tree.map(jnp.asarray, v), ids)
    np.testing.assert_array_equal(out.logits, want.logits)
    assert out.mtp_logits.shape[0] == mtp
    np.testing.assert_array_equal(out.mtp_logits, want.mtp_logits)


def test_load_hf_variables_drive_decode_and_decode_mtp(tmp_path):
    cfg = small_cfg(moe_impl="sorted")
    v = random_variables(cfg)
    ckpt.save_hf(cfg, v, str(tmp_path))
    cfg, loaded = ckpt.load_hf(str(tmp_path), moe_impl="sorted")
    b, t = 2, 40
    ids = jnp.asarray(np.random.default_rng(2).integers(0, cfg.vocab_size, (b, t)), jnp.int32)
    pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    cache = kv_cache.init_cache(cfg, b, 64, with_mtp=True)
    ctx = kv_cache.step_context(cache, pos, "absorbed")
    out, _ = model.decode(cfg, loaded, ids, pos, cache, ctx)
    logits, h, _ = model.decode_mtp(cfg, loaded, 0, out.hidden, ids, pos, cache, ctx)
    assert out.logits.shape == (b, t, cfg.vocab_size) and logits.shape == (b, t, cfg.vocab_size)
    assert np.isfinite(np.asarray(logits)).all()
    gen = generate.generate(cfg, loaded, [[3, 4, 5]], 3, speculative=True)
    assert len(gen.tokens[0]) == 3


# ----------------------------------------------------------------------------------------------
# load_variables: every source of the same model gives the same variables
# ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def three_sources(tmp_path_factory):
    """One random tiny model written as a trainer checkpoint (Checkpointer.save: workdir layout),
    an orbax export (save_orbax) and a safetensors directory (save_hf)."""
    cfg = small_cfg()
    v = random_variables(cfg)
    root = tmp_path_factory.mktemp("sources")
    workdir = root / "run"
    ema = jax.tree.map(lambda a: a + 1, v["params"])
    c = ckpt.Checkpointer(str(workdir / "checkpoints"), async_save=False)
    c.save(3, {"step": jnp.asarray(3), "params": v["params"], "router_bias": v["router_bias"],
               "ema": ema, "opt_state": {"mu": v["params"]}}, {"step": 3},
           {"config": {"model": {**dataclasses.asdict(cfg), "preset": "tiny"}}, "step": 3})
    c.close()
    ckpt.save_orbax(cfg, v, str(root / "export"))
    ckpt.save_hf(cfg, v, str(root / "hf"))
    return cfg, v, ema, {"trainer": str(workdir), "orbax": str(root / "export"),
                         "safetensors": str(root / "hf")}


@pytest.mark.parametrize("source", ["trainer", "orbax", "safetensors"])
def test_load_variables_is_the_same_from_every_source(three_sources, source):
    """Parameters bit for bit (float32) and router biases: all three formats store them (the
    HF layout as `mlp.gate.e_score_correction_bias`, float32)."""
    cfg, v, _, paths = three_sources
    assert ckpt.detect_format(paths[source]) == source
    cfg2, loaded = ckpt.load_variables(paths[source])
    assert cfg2 == cfg
    assert set(loaded) == {"params", "router_bias"}
    assert_bitwise_equal(loaded["params"], v["params"])
    assert_bitwise_equal(loaded["router_bias"], v["router_bias"])


def test_load_variables_trainer_paths_and_ema(three_sources):
    cfg, v, ema, paths = three_sources
    for p in (os.path.join(paths["trainer"], "checkpoints"),
              os.path.join(paths["trainer"], "checkpoints", "3")):
        cfg2, loaded = ckpt.load_variables(p)
        assert cfg2 == cfg
        assert_bitwise_equal(loaded["params"], v["params"])
    _, loaded = ckpt.load_variables(paths["trainer"], use_ema=True)
    assert_bitwise_equal(loaded["params"], ema)
    with pytest.raises(ckpt.CheckpointError, match="EMA"):
        ckpt.load_variables(paths["orbax"], use_ema=True)


def test_load_variables_names_what_is_wrong(tmp_path):
    with pytest.raises(ckpt.CheckpointNotFoundError, match="does not exist"):
        ckpt.load_variables(str(tmp_path / "nope"))
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ckpt.CheckpointError, match="no known checkpoint format"):
        ckpt.load_variables(str(tmp_path))


# ----------------------------------------------------------------------------------------------
# ModelConfig.from_dict
# ----------------------------------------------------------------------------------------------

def test_from_dict_round_trip_and_unknown_keys():
    cfg = config.small()
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    d = {**cfg.to_dict(), "hiden_size": 3, "zzz_unrelated": 1}
    with pytest.raises(ConfigError) as e:
        ModelConfig.from_dict(d)
    msg = str(e.value)
    assert "'hiden_size' (did you mean 'hidden_size'?)" in msg and "'zzz_unrelated'" in msg
    assert "zzz_unrelated' (did you mean" not in msg
    assert ModelConfig.from_dict(d, strict=False) == cfg
    with pytest.raises(ConfigError, match="hidden_size must be a positive int"):
        ModelConfig.from_dict({"hidden_size": 0}, strict=False)
