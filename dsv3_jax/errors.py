"""User errors and how every entry point reports them.

A `UserError` is a mistake the user can fix (a config key or value, a mesh, a missing or corrupt
checkpoint, data, a tokenizer that does not match): the entry points print it as one line
`error: ...` on stderr and exit with status 2, no traceback. Set DSV3_TRACEBACK=1 (or pass
--traceback where an entry point has it) to see the traceback as well. Any other exception is an
internal error and keeps its traceback.

  @errors.cli
  def main(argv=None) -> int: ...
"""
from __future__ import annotations

import functools
import os
import sys

EXIT_USAGE = 2
TRACEBACK_ENV = "DSV3_TRACEBACK"


class UserError(ValueError):
    """A mistake in what the user gave us; the message names the problem and the fix."""


def show_tracebacks() -> bool:
    return os.environ.get(TRACEBACK_ENV, "").lower() not in ("", "0", "false", "no")


def report(e: BaseException, prog: str | None = None) -> int:
    """Print a user error as one `error:` message (its lines indented) and return the exit code."""
    prog = prog or _prog()
    lines = str(e).strip().splitlines() or [type(e).__name__]
    print(f"{prog}: error: {lines[0]}", file=sys.stderr)
    for line in lines[1:]:
        print(f"  {line}", file=sys.stderr)
    if not show_tracebacks():
        print(f"  (set {TRACEBACK_ENV}=1 to see the traceback)", file=sys.stderr)
    return EXIT_USAGE


def _prog() -> str:
    """`python -m dsv3_jax.train` runs .../dsv3_jax/train.py: name it dsv3_jax.train."""
    path = os.path.abspath(sys.argv[0] or "dsv3_jax")
    parent, name = os.path.split(path)
    if os.path.basename(parent) == "dsv3_jax" and name.endswith(".py"):
        return f"dsv3_jax.{name[:-3]}"
    grand, package = os.path.split(parent)     # python -m dsv3_jax.<package>
    if name == "__main__.py" and os.path.basename(grand) == "dsv3_jax":
        return f"dsv3_jax.{package}"
    return os.path.basename(path)


def cli(main):
    """Decorate an entry point `main(argv=None)`: a UserError becomes `error: ...` and exit 2."""
    @functools.wraps(main)
    def wrapped(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except UserError as e:
            if show_tracebacks():
                raise
            raise SystemExit(report(e)) from None
    return wrapped
