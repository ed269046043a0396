"""The mutation check (tests/mutations.py) in the slow tier: every planted bug must be caught."""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow   # ~15-20 minutes on 2 cores: the relevant tests once per mutation
def test_no_mutation_survives():
    out = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "mutations.py")],
                         capture_output=True, text=True, cwd=ROOT, timeout=3600,
                         env=dict(os.environ, PYTHONPATH=ROOT))
    print(out.stdout)
    assert out.returncode == 0, out.stdout[-6000:] + out.stderr[-3000:]
