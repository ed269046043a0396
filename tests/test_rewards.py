"""Rewards: the exact-answer verifier with its format check, and the code sandbox (reward 0 for
an infinite loop, a memory bomb, a write outside its directory, a network or process escape;
the caller survives all of them)."""
import os
import time

import pytest

from dsv3_jax import rewards
from dsv3_jax.rewards import sandbox

TEST = "def check(f):\n    assert f(2, 3) == 5\n    assert f(-1, 1) == 0\n"
GOOD = "def add(a, b):\n    return a + b\n"


def test_exact_answer_and_format():
    assert rewards.exact_answer("579", 579) == 1.0
    assert rewards.exact_answer(" 579\n", "579") == 1.0
    assert rewards.exact_answer("-12", -12) == 1.0
    for bad in ("578", "579 apples", "The answer is 579", "5 7 9", "", "579\n580"):
        assert rewards.exact_answer(bad, 579) == 0.0, bad
    assert rewards.ExactAnswer()(["q"] * 2, ["7", "8"], [{"answer": 7}] * 2) == [1.0, 0.0]


def test_model_reward_interface():
    rf = rewards.ModelReward(lambda ps, cs: [len(c) / 10 for c in cs])
    assert rf(["a"], ["hello"], [{}]) == [0.5]


def test_passing_and_failing_code():
    assert sandbox.python_tests(GOOD, TEST, "add") == 1.0
    assert sandbox.python_tests("def add(a, b):\n    return a - b\n", TEST, "add") == 0.0
    assert sandbox.python_tests("def add(a, b):\n    pass\n", TEST, "add") == 0.0
    # exiting 0 before the tests ran is not a pass
    assert sandbox.python_tests("import os\nos._exit(0)\n", TEST, "add") == 0.0
    assert sandbox.python_tests("import sys\nsys.exit(0)\n", TEST, "add") == 0.0


def test_infinite_loop_times_out():
    t0 = time.perf_counter()
    r = sandbox.run_python("while True:\n    pass\n", timeout=1.0)
    assert not r["ok"] and r["timed_out"] and time.perf_counter() - t0 < 5


def test_memory_bomb_is_killed():
    r = sandbox.run_python("x = []\nwhile True:\n    x.append(' ' * 10**7)\n", timeout=10,
                           memory_mb=256)
    assert not r["ok"] and not r["timed_out"], r
    assert "MemoryError" in r["output"] or r["returncode"] < 0


def test_write_outside_the_directory_is_refused(tmp_path):
    target = tmp_path / "escaped.txt"
    for prog in (f"open({str(target)!r}, 'w').write('x')\n",
                 f"import os\nfd = os.open({str(target)!r}, os.O_CREAT | os.O_WRONLY)\n",
                 f"import pathlib\npathlib.Path({str(target)!r}).write_text('x')\n"):
        r = sandbox.run_python(prog + "print('wrote')\n", timeout=5)
        assert not r["ok"] and "PermissionError" in r["output"], r
    assert not target.exists()
    # inside its own directory it may write (and the directory is gone afterwards)
    r = sandbox.run_python("import os\nopen('a.txt', 'w').write('x')\nprint(os.getcwd())\n")
    assert r["ok"], r
    assert not os.path.exists(r["output"].strip())


@pytest.mark.parametrize("prog", [
    "import socket\nsocket.create_connection(('127.0.0.1', 80))\n",
    "import subprocess\nsubprocess.run(['true'])\n",
    "import os\nos.system('true')\n",
    "import os\nos.kill(os.getppid(), 9)\n",
])
def test_network_and_process_escapes_are_refused(prog):
    assert not sandbox.run_python(prog, timeout=5)["ok"]


def test_the_caller_survives_and_runs_many():
    bad = ["while True: pass", "x = ' ' * (1 << 40)", "raise SystemExit(3)"]
    items = [(b, TEST, "add") for b in bad] + [(GOOD, TEST, "add")]
    assert sandbox.python_tests_many(items, timeout=1.5, memory_mb=256) == [0.0, 0.0, 0.0, 1.0]
    assert rewards.PythonTests(timeout=3)(["def add(a, b):\n"], ["    return a + b\n"],
                                          [{"test": TEST, "entry_point": "add"}]) == [1.0]
