"""User mistakes through the command lines: one `error:` line naming the problem, exit status 2,
no traceback (DSV3_TRACEBACK=1 shows it). Each case runs the real entry point in a subprocess;
nothing is trained or compiled."""
import dataclasses
import os
import subprocess
import sys

import jax.numpy as jnp
import pytest

from dsv3_jax import ckpt
from test_convert import random_variables, small_cfg

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(module, *args, traceback=False):
    env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
    env.pop("DSV3_TRACEBACK", None)
    if traceback:
        env["DSV3_TRACEBACK"] = "1"
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], capture_output=True,
                          text=True, cwd=ROOT, env=env, timeout=300)


def assert_user_error(r, *needles):
    assert r.returncode == 2, (r.returncode, r.stderr[-3000:])
    assert "error:" in r.stderr and "Traceback" not in r.stderr, r.stderr[-3000:]
    for n in needles:
        assert n in r.stderr, (n, r.stderr[-3000:])


def generate(checkpoint, *extra, traceback=False):
    return run("dsv3_jax.generate", "--checkpoint", checkpoint, "--prompt", "def f",
               "--max_new_tokens", "2", *extra, traceback=traceback)


def tiny_cfg():
    return small_cfg(num_hidden_layers=2, num_nextn_predict_layers=0)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    cfg = tiny_cfg()
    path = tmp_path_factory.mktemp("hf")
    ckpt.save_hf(cfg, random_variables(cfg), str(path))
    return path


def test_missing_checkpoint(tmp_path):
    assert_user_error(generate(tmp_path / "nonexistent"), "does not exist", "nonexistent")


def test_directory_that_is_no_checkpoint(tmp_path):
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    assert_user_error(generate(tmp_path), "no known checkpoint format")


def test_truncated_safetensors(hf_dir, tmp_path):
    bad = tmp_path / "truncated"
    bad.mkdir()
    (bad / "config.json").write_bytes((hf_dir / "config.json").read_bytes())
    data = (hf_dir / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(data[:len(data) // 2])
    assert_user_error(generate(bad), "truncated", "model.safetensors")


def test_damaged_trainer_checkpoint(tmp_path):
    cfg = tiny_cfg()
    v = random_variables(cfg)
    c = ckpt.Checkpointer(str(tmp_path / "checkpoints"), async_save=False)
    c.save(1, {"step": jnp.asarray(1), **v}, {"step": 1},
           {"config": {"model": dataclasses.asdict(cfg)}, "step": 1})
    c.close()
    state = tmp_path / "checkpoints" / "1" / "state"
    damaged = 0
    for dirpath, _, names in os.walk(state):
        for n in names:
            with open(os.path.join(dirpath, n), "wb") as f:
                f.write(b"\x00garbage")
            damaged += 1
    assert damaged
    assert_user_error(generate(tmp_path), "cannot read the trainer checkpoint",
                      os.path.join("checkpoints", "1"))


def test_tokenizer_larger_than_the_vocabulary(hf_dir):
    """No tokenizer.json in the checkpoint: the packaged tokenizer (8192 tokens) vs 96."""
    assert_user_error(generate(hf_dir), "8192 tokens", "vocabulary has 96")


def test_missing_tokenizer_file(hf_dir, tmp_path):
    assert_user_error(generate(hf_dir, "--tokenizer", tmp_path / "tok.json"), "tok.json",
                      "does not exist")


def test_convert_missing_source(tmp_path):
    r = run("dsv3_jax.convert", "--from-hf", tmp_path / "missing", "--to", tmp_path / "out")
    assert_user_error(r, "does not exist")


def test_plan_bad_mesh():
    r = run("dsv3_jax.plan", "--config", os.path.join(ROOT, "experiments", "configs", "tiny.py"),
            "--mesh", "bogus=2")
    assert_user_error(r, "--mesh", "bogus")


def test_traceback_on_request(tmp_path):
    r = generate(tmp_path / "nonexistent", traceback=True)
    assert r.returncode != 0 and "Traceback" in r.stderr and "does not exist" in r.stderr
