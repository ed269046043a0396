"""The test harness itself: a test whose xdist worker crashes is rerun once on a fresh worker
(conftest.pytest_handlecrashitem); a second crash, and any ordinary failure, still fail."""
import pathlib
import shutil
import subprocess
import sys

CONFTEST = pathlib.Path(__file__).with_name("conftest.py")

CASES = '''
import os, pathlib, signal
MARK = pathlib.Path(__file__).with_name("crashed_once")

def test_crashes_once():
    if not MARK.exists():
        MARK.write_text("")
        os.kill(os.getpid(), signal.SIGSEGV)

def test_crashes_always():
    os.kill(os.getpid(), signal.SIGSEGV)

def test_passes():
    pass

def test_fails():
    assert 0
'''


def run_cases(tmp_path, *args) -> str:
    """The output of `pytest -q` run with this conftest over CASES in tmp_path."""
    shutil.copy(CONFTEST, tmp_path / "conftest.py")
    (tmp_path / "test_cases.py").write_text(CASES)
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300).stdout


def test_a_worker_crash_is_rerun_once_and_a_second_crash_fails(tmp_path):
    out = run_cases(tmp_path, "-n", "2", "-p", "no:faulthandler", "test_cases.py")
    assert out.rstrip().splitlines()[-1].startswith("2 failed, 2 passed, 2 rerun"), out
    assert "FAILED test_cases.py::test_fails" in out
    assert "FAILED test_cases.py::test_crashes_always" in out
    assert "rerun once on a fresh worker" in out


def test_the_conftest_loads_without_xdist(tmp_path):
    """The crash hook is xdist's; without xdist the same conftest still collects and runs."""
    out = run_cases(tmp_path, "-p", "no:xdist", "test_cases.py::test_passes")
    assert out.rstrip().splitlines()[-1].startswith("1 passed"), out
