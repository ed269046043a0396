import hashlib
import os
import tempfile

# One persistent compilation cache per test session, shared by the xdist workers and by the
# subprocesses the CLI and multi-device tests start (both inherit the environment the session's
# first process sets here): a program that several tests compile (the micro model's train step,
# a CLI run and its resumed rerun) is compiled once per session. Set before jax is imported. An
# outer JAX_COMPILATION_CACHE_DIR wins (empty: no cache); the folder made here is removed when
# the session ends.
_OWN_CACHE = "JAX_COMPILATION_CACHE_DIR" not in os.environ
if _OWN_CACHE:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="dsv3_jax_test_jit_cache_")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")

# Tests compile far more than they run, and on XLA:CPU LLVM's optimisation of the generated code
# is much of each compile: the tests (and the subprocesses they start, which inherit XLA_FLAGS)
# use optimisation level 0. The HLO passes (fusion, simplification) are unchanged, so the
# programs are the same HLO; their machine code is slower and may round differently in the
# last bits (the tests' tolerances are far wider). Measured alone, 2026-12-01, -n 2:
# tests/test_model.py + test_decode.py 121 s -> 75 s; the DualPipeV 8-device check 96 s -> 64 s.
# Any level in an outer XLA_FLAGS wins (e.g. --xla_backend_optimization_level=2, XLA's default).
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = " ".join(
        [os.environ.get("XLA_FLAGS", ""), "--xla_backend_optimization_level=0"]).strip()

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

# Implicit rank promotion hides shape bugs; make it an error in every test.
jax.config.update("jax_numpy_rank_promotion", "raise")

SEED_ENV = "DSV3_TEST_SEED"


def seed_for(nodeid: str) -> int:
    """A stable seed from the test id (the same every run and on every machine)."""
    return int.from_bytes(hashlib.sha256(nodeid.encode()).digest()[:4], "little") % (2**31)


@pytest.fixture
def rng(request):
    """A NumPy generator seeded from the test id, so a failure replays as it failed; the seed is
    printed (shown on failure), and DSV3_TEST_SEED=<seed> overrides it (to replay a printed seed
    or to try another draw)."""
    env = os.environ.get(SEED_ENV)
    seed = int(env) if env else seed_for(request.node.nodeid)
    print(f"[seed {seed}: rerun with {SEED_ENV}={seed}]")
    return np.random.default_rng(seed)


def pytest_sessionfinish(session, exitstatus):
    """The session's own compilation cache goes with it (the first process only: xdist workers
    and nested sessions inherit the folder and leave it)."""
    if _OWN_CACHE and not hasattr(session.config, "workerinput"):
        import shutil
        shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)


# A test whose xdist worker dies of a signal (a native crash inside XLA, which no assertion can
# catch) is run once more on a fresh worker; a second crash of the same test fails the run. The
# first crash stays visible: an "R" in the progress line, a "rerun" count in the summary and a
# line naming the test. Failures of the test itself are never rerun.
_CRASHED: set[str] = set()


@pytest.hookimpl(optionalhook=True)   # an xdist hook: runs without xdist stay valid
def pytest_handlecrashitem(crashitem, report, sched):
    if crashitem not in _CRASHED:
        _CRASHED.add(crashitem)
        sched.mark_test_pending(crashitem)
        report.outcome = "rerun"


def pytest_report_teststatus(report, config):
    if report.outcome == "rerun":
        return "rerun", "R", ("RERUN", {"yellow": True})


def pytest_terminal_summary(terminalreporter):
    for nodeid in sorted(_CRASHED):
        terminalreporter.write_line(
            f"the worker running {nodeid} crashed: rerun once on a fresh worker",
            yellow=True)
