"""The checkpoint user errors and the one-pass description of a tree mismatch they carry."""
from __future__ import annotations

from typing import Any, Iterable

import jax

from dsv3_jax.errors import UserError


class CheckpointError(UserError):
    """A checkpoint that is missing, corrupt, or does not fit its config. Carries every problem,
    found in one pass."""

    def __init__(self, message: str, missing: Iterable[str] = (), unexpected: Iterable[str] = (),
                 misshaped: Iterable[str] = ()):
        super().__init__(message)
        self.missing = list(missing)
        self.unexpected = list(unexpected)
        self.misshaped = list(misshaped)


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """No checkpoint (or no file it needs) where the user pointed; also a FileNotFoundError, so
    callers that catch OSError keep working."""


class CheckpointMismatchError(CheckpointError):
    """The checkpoint in the workdir does not fit the current config."""


def _key_name(k: Any) -> str:
    # stored metadata turns namedtuple fields into dict keys: compare by name/index alone
    for attr in ("name", "key", "idx"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def _flatten(tree: Any) -> dict[str, Any]:
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {"/".join(_key_name(k) for k in path): leaf for path, leaf in flat}


def describe_mismatch(stored: Any, expected: Any) -> list[str]:
    """Missing, unexpected and misshaped leaves between two trees of shaped things."""
    s, e = _flatten(stored), _flatten(expected)
    problems = [f"missing in checkpoint: {k} {tuple(e[k].shape)}" for k in sorted(e.keys() - s.keys())]
    problems += [f"unexpected in checkpoint: {k} {tuple(s[k].shape)}" for k in sorted(s.keys() - e.keys())]
    for k in sorted(s.keys() & e.keys()):
        ss, es = tuple(getattr(s[k], "shape", ())), tuple(getattr(e[k], "shape", ()))
        if ss != es:
            problems.append(f"shape mismatch: {k} checkpoint {ss} vs config {es}")
    return problems


def problem_list(problems: list[str], limit: int = 50) -> str:
    """`(n problems):` and the first `limit` of them, one per indented line."""
    return (f"({len(problems)} problems):\n  " + "\n  ".join(problems[:limit])
            + ("\n  ..." if len(problems) > limit else ""))
