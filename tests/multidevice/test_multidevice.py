"""Sharded training on 8 fake CPU devices, each scenario in its own process."""
import os
import subprocess
import sys

import pytest

import devices as devices_lib   # tests/multidevice/devices.py

HERE = os.path.dirname(__file__)
ROOT = devices_lib.ROOT


def run_script(name, *args, devices=8, timeout=900):
    env = devices_lib.env(devices)
    return subprocess.run([sys.executable, os.path.join(HERE, name), *args], capture_output=True,
                          text=True, env=env, cwd=ROOT, timeout=timeout)


@pytest.mark.parametrize("which", [
    "quick",                        # data 2 x expert 4 (tensor: pipeline quick, and "all")
    pytest.param("skew", marks=pytest.mark.slow),   # EP capacity overflow -> worst-case fallback
    pytest.param("fp8", marks=pytest.mark.slow),    # FP8 GEMMs + custom VJPs inside shard_map
    pytest.param("all", marks=pytest.mark.slow),  # the five meshes of the issue
])
def test_meshes_match_single_device(which):
    out = run_script("mesh_equivalence.py", which)
    print(out.stdout)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]


@pytest.mark.slow   # ~3-5 minutes on 2 cores: four trainer runs, two of them as 2 processes
def test_two_processes_match_one_and_checkpoint_restores_on_another_mesh(tmp_path):
    out = subprocess.run([sys.executable, os.path.join(HERE, "multiprocess.py"), str(tmp_path)],
                         capture_output=True, text=True, cwd=ROOT, timeout=1800,
                         env=dict(os.environ, PYTHONPATH=ROOT))
    print(out.stdout)
    assert out.returncode == 0 and "OK" in out.stdout, out.stdout[-4000:] + out.stderr[-4000:]


@pytest.mark.parametrize("which", [
    "quick",                                      # DualPipeV on (pipeline 2, tensor 2, expert 2)
    pytest.param("all", marks=pytest.mark.slow),  # 5 schedules x 3 meshes of the issue
    pytest.param("uneven", marks=pytest.mark.slow),   # 5 MoE layers over 4 stages: padded
    pytest.param("fp8", marks=pytest.mark.slow),  # DualPipe with the FP8 recipe (+ tensor)
    pytest.param("modes", marks=pytest.mark.slow),    # branch-free, kept residuals, W apart
    pytest.param("composed", marks=pytest.mark.slow),  # fsdp beside the pipeline
    pytest.param("tensor", marks=pytest.mark.slow),    # tensor beside it: 5 schedules x modes
])
def test_pipeline_matches_single_device(which):
    out = run_script("pipeline_equivalence.py", which, timeout=5400)
    print(out.stdout)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]


@pytest.mark.parametrize("which", [
    "quick",                                      # the usual and the worst-case branch
    pytest.param("all", marks=pytest.mark.slow),  # + no branch, and FP8
])
def test_deferred_expert_weight_gradients_under_expert_parallelism(which):
    """split W with the routed experts expert-parallel: B + W equals the one-pass VJP for the
    all-to-all's usual and worst-case capacity branches (tests/multidevice/deferred_ep.py)."""
    out = run_script("deferred_ep.py", which)
    print(out.stdout)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]


@pytest.mark.slow   # ~8 minutes on 2 cores: five trainer runs
def test_pipeline_cli_and_checkpoints_across_pipelines(tmp_path):
    out = subprocess.run([sys.executable, os.path.join(HERE, "pipeline_cli.py"), str(tmp_path)],
                         capture_output=True, text=True, cwd=ROOT, timeout=3600,
                         env=dict(os.environ, PYTHONPATH=ROOT))
    print(out.stdout)
    assert out.returncode == 0 and "OK" in out.stdout, out.stdout[-4000:] + out.stderr[-4000:]


BAD_MESH = """
import jax
from dsv3_jax import config, sharding
cfg = config.tiny()
cases = [dict(data=3), dict(data=-1, fsdp=-1), dict(data=2, expert=3, fsdp=-1),
         dict(data=4, expert=2), dict(tensor=8), dict(data=2, pipeline=4), dict(dataa=8)]
for sizes in cases:
    try:
        shape = sharding.resolve_mesh_shape(sizes, jax.device_count())
        sharding.validate_mesh(shape, cfg, global_batch=4)
        print("NO ERROR", sizes)
    except sharding.MeshError as e:
        print("ERROR", sizes, "|", str(e).replace(chr(10), " "))
"""


def test_bad_meshes_are_one_clear_error_each():
    out = subprocess.run([sys.executable, "-c", BAD_MESH], capture_output=True, text=True,
                         cwd=ROOT, timeout=120,
                         env=devices_lib.env(8))
    lines = [l for l in out.stdout.splitlines() if l.startswith(("ERROR", "NO ERROR"))]
    assert len(lines) == 7 and all(l.startswith("ERROR") for l in lines), out.stdout + out.stderr
    text = "\n".join(lines)
    for needle in ("3 devices, but 8", "at most one mesh axis may be -1", "not divisible",
                   "batch 4 (rows per micro-batch) is not divisible", "num_attention_heads 4 is not divisible",
                   "do not split over pipeline=4", "unknown mesh axes"):
        assert needle in text, (needle, text)
