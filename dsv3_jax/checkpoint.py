"""Orbax checkpoints of the whole training state: params, optimizer state, router biases, EMA,
step, RNG (all in one pytree) plus the data iterator's position and the run's config (JSON).

Restoring checks the stored shapes against the expected ones first and lists every mismatch in
one error, instead of a traceback from deep inside orbax.
"""
from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp

from dsv3_jax.errors import UserError


class CheckpointMismatchError(UserError):
    """The checkpoint in the workdir does not fit the current config."""


def _key_name(k) -> str:
    # stored metadata turns namedtuple fields into dict keys: compare by name/index alone
    for attr in ("name", "key", "idx"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def _flatten(tree) -> dict[str, Any]:
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {"/".join(_key_name(k) for k in path): leaf for path, leaf in flat}


def describe_mismatch(stored, expected) -> list[str]:
    """Missing, unexpected and misshaped leaves between two trees of shaped things."""
    s, e = _flatten(stored), _flatten(expected)
    problems = [f"missing in checkpoint: {k} {tuple(e[k].shape)}" for k in sorted(e.keys() - s.keys())]
    problems += [f"unexpected in checkpoint: {k} {tuple(s[k].shape)}" for k in sorted(s.keys() - e.keys())]
    for k in sorted(s.keys() & e.keys()):
        ss, es = tuple(getattr(s[k], "shape", ())), tuple(getattr(e[k], "shape", ()))
        if ss != es:
            problems.append(f"shape mismatch: {k} checkpoint {ss} vs config {es}")
    return problems


class Checkpointer:
    """Async orbax CheckpointManager: save every N steps and at the end, keep the last K."""

    def __init__(self, directory: str, keep: int = 3, async_save: bool = True):
        self.directory = os.path.abspath(directory)
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                               enable_async_checkpointing=async_save)
        self.manager = ocp.CheckpointManager(
            self.directory, options=options,
            item_handlers={"state": ocp.StandardCheckpointHandler(),
                           "data": ocp.JsonCheckpointHandler(),
                           "meta": ocp.JsonCheckpointHandler()})

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state, data_state: dict, meta: dict) -> None:
        self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state),
            meta=ocp.args.JsonSave(meta)))

    def restore(self, step: int, abstract_state):
        """Returns (state, data_state, meta); raises CheckpointMismatchError listing problems."""
        stored = self.manager.item_metadata(step)["state"]
        stored = getattr(stored, "tree", stored)
        problems = describe_mismatch(stored, abstract_state)
        if problems:
            raise CheckpointMismatchError(
                f"checkpoint {self.directory}/{step} was written by another config "
                f"({len(problems)} problems):\n  " + "\n  ".join(problems[:50])
                + ("\n  ..." if len(problems) > 50 else "")
                + "\nUse another --workdir, or the config that wrote it.")
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore(),
            meta=ocp.args.JsonRestore()))
        return restored["state"], restored["data"], restored["meta"]

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
