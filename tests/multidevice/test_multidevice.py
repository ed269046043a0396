"""Sharded training on 8 fake CPU devices, each scenario in its own process."""
import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(__file__)
ROOT = os.path.dirname(os.path.dirname(HERE))


def run_script(name, *args, devices=8, timeout=900):
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
               PYTHONPATH=ROOT)
    return subprocess.run([sys.executable, os.path.join(HERE, name), *args], capture_output=True,
                          text=True, env=env, cwd=ROOT, timeout=timeout)


@pytest.mark.parametrize("which", [
    "quick",                                    # (data 2 x expert 4), (data 4 x tensor 2)
    "skew",                                     # EP capacity overflow -> worst-case fallback
    pytest.param("all", marks=pytest.mark.slow),  # the five meshes of the issue
])
def test_meshes_match_single_device(which):
    out = run_script("mesh_equivalence.py", which)
    print(out.stdout)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
