"""Running untrusted Python (model-written code and its tests) in a separate process.

Never `exec` in the trainer's process: each program runs in a fresh `python -I` child with
  - a throw-away working directory (deleted afterwards) as cwd and HOME, a minimal environment;
  - resource limits: address space (memory_mb), CPU seconds, file size, open files, no core;
  - a wall-clock timeout, after which the child's whole process group is killed;
  - an audit hook (PEP 578, cannot be removed once installed) that refuses writes, deletes and
    renames outside the working directory, any socket (no network), starting processes
    (subprocess, os.system, exec*, fork, spawn), signals to other processes and ctypes.
The reward is 1 only for exit status 0 within the limits after the program ran to its end (a
marker written after it, from a nonce the program never sees: `os._exit(0)` early does not
pass). This is a guard against accidents
and reward hacking by a small model, not a security boundary against a determined adversary
(use a container or VM for that, as for any code-execution service).
"""
from __future__ import annotations

import os
import resource
import secrets
import signal
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor

_GUARD = r'''
import os, sys
_ROOT = os.path.realpath(os.getcwd())
_W = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND

def _inside(p):
    if isinstance(p, int):
        return True
    try:
        p = os.fsdecode(p)
    except TypeError:
        return False
    p = os.path.realpath(p)
    return p == _ROOT or p.startswith(_ROOT + os.sep)

_PATH_EVENTS = {"os.remove", "os.rename", "os.replace", "os.mkdir", "os.rmdir", "os.chmod",
                "os.chown", "os.symlink", "os.link", "os.truncate", "os.utime",
                "shutil.rmtree", "shutil.move", "shutil.copyfile", "os.chdir"}
_DENY_PREFIX = ("socket.", "subprocess.", "os.exec", "os.posix_spawn", "os.spawn", "os.fork",
                "os.system", "os.kill", "os.killpg", "pty.", "ctypes.", "os.startfile",
                "_posixsubprocess", "os.forkpty", "resource.setrlimit", "sys.remote_exec",
                "sys._getframe", "sys._current_frames", "gc.get_referrers", "gc.get_objects")

def _hook(event, args):
    if event == "open":
        path, mode, flags = (list(args) + [None, None])[:3]
        writing = (isinstance(mode, str) and any(ch in mode for ch in "wax+")) or \
                  (isinstance(flags, int) and flags & _W)
        if writing and not _inside(path):
            raise PermissionError(f"sandbox: write outside the working directory: {path}")
    elif event in _PATH_EVENTS:
        for a in args:
            if isinstance(a, (str, bytes, os.PathLike)) and not _inside(a):
                raise PermissionError(f"sandbox: {event} outside the working directory")
    elif event.startswith(_DENY_PREFIX):
        raise PermissionError(f"sandbox: {event} is not allowed")
    elif event == "import" and args and args[0] in ("ctypes", "_ctypes", "socket", "_socket"):
        raise ImportError(f"sandbox: import of {args[0]} is not allowed")

def _main():
    nonce = sys.stdin.readline().strip()      # the end-of-program marker, unseen by the program
    sys.stdin = None
    with open("program.py") as f:
        src = f.read()
    sys.addaudithook(_hook)
    exec(compile(src, "program.py", "exec"), {"__name__": "__main__"})
    sys.stdout.flush()
    os.write(1, ("\n" + nonce + "\n").encode())

_main()
'''


def _limit(pid: int, memory_mb: int, cpu_s: int) -> None:
    """Resource limits set on the child from outside (resource.prlimit): no preexec_fn, whose
    Python code between fork and exec can deadlock a multithreaded parent such as a JAX
    trainer. The child waits for its nonce on stdin before it runs any of the program."""
    mem = memory_mb << 20
    for which, value in ((resource.RLIMIT_AS, (mem, mem)),
                         (resource.RLIMIT_CPU, (cpu_s, cpu_s + 1)),
                         (resource.RLIMIT_FSIZE, (16 << 20, 16 << 20)),
                         (resource.RLIMIT_NOFILE, (64, 64)),
                         (resource.RLIMIT_CORE, (0, 0))):
        resource.prlimit(pid, which, value)


def run_python(program: str, *, timeout: float = 5.0, memory_mb: int = 512) -> dict:
    """Runs `program` in the sandbox; returns {ok, returncode, timed_out, output (tail)}."""
    with tempfile.TemporaryDirectory(prefix="dsv3_sandbox_") as work:
        with open(os.path.join(work, "program.py"), "w") as f:
            f.write(program)
        env = {"PATH": "/usr/bin:/bin", "HOME": work, "TMPDIR": work, "PYTHONHASHSEED": "0",
               "LANG": "C.UTF-8"}
        proc = subprocess.Popen([sys.executable, "-I", "-c", _GUARD], cwd=work, env=env,
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, start_new_session=True)
        timed_out = False
        try:
            _limit(proc.pid, memory_mb, int(timeout) + 1)
        except OSError:                  # the child is gone already: nothing ran
            proc.kill()
        nonce = secrets.token_hex(16)
        try:
            out, _ = proc.communicate((nonce + "\n").encode(), timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            out, _ = proc.communicate()
    rc = proc.returncode
    text = out.decode(errors="replace")
    finished = text.rstrip().endswith(nonce)
    text = text.rstrip()[:-len(nonce)].rstrip("\n") if finished else text
    return {"ok": rc == 0 and not timed_out and finished, "returncode": rc,
            "timed_out": timed_out, "output": text[-2000:]}


def check_program(code: str, test: str, entry_point: str | None = None) -> str:
    """HumanEval's layout: the solution, the test code, then check(entry_point)."""
    prog = f"{code}\n\n{test}\n"
    if entry_point:
        prog += f"\ncheck({entry_point})\n"
    return prog


def python_tests(code: str, test: str, entry_point: str | None = None, *,
                 timeout: float = 5.0, memory_mb: int = 512) -> float:
    """1.0 if `code` passes `test` in the sandbox, else 0.0."""
    return float(run_python(check_program(code, test, entry_point), timeout=timeout,
                            memory_mb=memory_mb)["ok"])


def python_tests_many(items: list[tuple[str, str, str | None]], *, timeout: float = 5.0,
                      memory_mb: int = 512, workers: int = 2) -> list[float]:
    """python_tests over (code, test, entry_point) items, `workers` children at a time."""
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(lambda it: python_tests(*it, timeout=timeout, memory_mb=memory_mb),
                             items))
