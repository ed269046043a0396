"""The trainer's checkpoints: orbax CheckpointManager steps holding the whole training state
(params, optimizer state, router biases, EMA, step, RNG: one pytree, item "state"), the data
iterator's position (item "data") and the run's config (item "meta", JSON).

Only this module knows those item names. Besides saving and restoring for resumption
(`Checkpointer`), it reads what other tools need out of a checkpoint:

  step_dir(path)                        workdir | its checkpoints/ | a step dir -> the step dir
  read_meta(path) -> dict               the run's config, data info and step
  read_model_config(path) -> ModelConfig
  read_variables(path, use_ema=False) -> {"params": ..., "router_bias": ...}

Restoring checks the stored shapes against the expected ones first and lists every mismatch in
one error, instead of a traceback from deep inside orbax; a damaged checkpoint is a
CheckpointError naming its path.
"""
from __future__ import annotations

import os
from typing import Any

import orbax.checkpoint as ocp

from dsv3_jax.ckpt.errors import (CheckpointError, CheckpointMismatchError,
                                  CheckpointNotFoundError, describe_mismatch, problem_list)
from dsv3_jax.config import ConfigError, ModelConfig

CHECKPOINTS_DIR = "checkpoints"       # under a trainer workdir
STATE, DATA, META = "state", "data", "meta"
# Keys of the run config's model section that are not ModelConfig fields.
_NOT_MODEL_FIELDS = ("preset",)


def _handlers() -> dict[str, Any]:
    return {STATE: ocp.StandardCheckpointHandler(), DATA: ocp.JsonCheckpointHandler(),
            META: ocp.JsonCheckpointHandler()}


class Checkpointer:
    """Async orbax CheckpointManager: save every N steps and at the end, keep the last K."""

    def __init__(self, directory: str, keep: int = 3, async_save: bool = True):
        self.directory = os.path.abspath(directory)
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                               enable_async_checkpointing=async_save)
        self.manager = ocp.CheckpointManager(self.directory, options=options,
                                             item_handlers=_handlers())

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, data_state: dict, meta: dict) -> None:
        self.manager.save(step, args=ocp.args.Composite(**{
            STATE: ocp.args.StandardSave(state), DATA: ocp.args.JsonSave(data_state),
            META: ocp.args.JsonSave(meta)}))

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict, dict]:
        """Returns (state, data_state, meta); raises CheckpointMismatchError listing problems."""
        stored = self.manager.item_metadata(step)[STATE]
        stored = getattr(stored, "tree", stored)
        problems = describe_mismatch(stored, abstract_state)
        if problems:
            raise CheckpointMismatchError(
                f"checkpoint {self.directory}/{step} was written by another config "
                + problem_list(problems) + "\nUse another --workdir, or the config that wrote it.")
        restored = self.manager.restore(step, args=ocp.args.Composite(**{
            STATE: ocp.args.StandardRestore(abstract_state), DATA: ocp.args.JsonRestore(),
            META: ocp.args.JsonRestore()}))
        return restored[STATE], restored[DATA], restored[META]

    def read_meta(self, step: int) -> dict:
        """The meta item of one step alone (the run's config and data info), before restoring."""
        return self.manager.restore(step, args=ocp.args.Composite(
            **{META: ocp.args.JsonRestore()}))[META]

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        """Wait for pending saves and release the manager; closing twice is fine."""
        if getattr(self, "_closed", False):
            return
        self._closed = True
        self.manager.wait_until_finished()
        self.manager.close()


# ----------------------------------------------------------------------------------------------
# Reading a checkpoint outside the trainer
# ----------------------------------------------------------------------------------------------

def _steps(path: str) -> list[str]:
    return [d for d in os.listdir(path) if d.isdigit() and os.path.isdir(os.path.join(path, d))]


def is_trainer_checkpoint(path: str) -> bool:
    """Whether `path` is a trainer workdir, its checkpoints/ dir or one step dir."""
    if os.path.isdir(os.path.join(path, CHECKPOINTS_DIR)):
        path = os.path.join(path, CHECKPOINTS_DIR)
    return os.path.isdir(os.path.join(path, STATE)) or (os.path.isdir(path) and bool(_steps(path)))


def step_dir(path: str) -> str:
    """A trainer workdir, its checkpoints/ dir, or one step dir -> that (or the latest) step dir."""
    if not os.path.isdir(path):
        raise CheckpointNotFoundError(f"checkpoint {path} does not exist")
    if os.path.isdir(os.path.join(path, CHECKPOINTS_DIR)):
        path = os.path.join(path, CHECKPOINTS_DIR)
    if os.path.isdir(os.path.join(path, STATE)):
        return os.path.abspath(path)
    steps = _steps(path)
    if not steps:
        raise CheckpointNotFoundError(f"no trainer checkpoint under {path}: expected a trainer "
                                      "workdir, its checkpoints/ directory, or a step directory")
    return os.path.abspath(os.path.join(path, max(steps, key=int)))


def _read(path: str, **items: Any) -> dict:
    """The named items of one step, through a read-only manager on its parent directory."""
    sdir = step_dir(path)
    parent, name = os.path.split(sdir)
    if not name.isdigit():
        raise CheckpointError(f"{sdir}: a step directory's name is its step number")
    try:
        options = ocp.CheckpointManagerOptions(read_only=True, create=False)
        with ocp.CheckpointManager(parent, options=options, item_handlers=_handlers()) as m:
            return m.restore(int(name), args=ocp.args.Composite(**items))
    except Exception as e:   # orbax/tensorstore report damaged files from deep inside
        raise CheckpointError(f"cannot read the trainer checkpoint {sdir} (damaged or "
                              f"incomplete?): {type(e).__name__}: {e}") from e


def read_meta(path: str) -> dict:
    """The step's meta item: {"config": the run's config dict, "data_info": ..., "step": ...}."""
    return _read(path, **{META: ocp.args.JsonRestore()})[META]


def model_config_of(meta: dict, where: str = "checkpoint") -> ModelConfig:
    """The ModelConfig recorded in a meta item (strict: an unknown key is an error)."""
    try:
        d = meta["config"]["model"]
    except (KeyError, TypeError):
        raise CheckpointError(f"{where}: its meta holds no config.model") from None
    try:
        return ModelConfig.from_dict({k: v for k, v in d.items() if k not in _NOT_MODEL_FIELDS})
    except ConfigError as e:
        raise ConfigError(f"{where}: the recorded model config: {e}") from None


def read_model_config(path: str) -> ModelConfig:
    """The ModelConfig a trainer checkpoint was written with."""
    return model_config_of(read_meta(path), step_dir(path))


def read_variables(path: str, use_ema: bool = False) -> dict:
    """{"params": ..., "router_bias": ...} of a trainer checkpoint (jax arrays); with use_ema
    the EMA parameters in place of params. The optimizer state is read too (orbax restores the
    state item whole) and dropped."""
    state = _read(path, **{STATE: ocp.args.StandardRestore()})[STATE]
    if use_ema and "ema" not in state:
        raise CheckpointError(f"{step_dir(path)} holds no EMA parameters (train.ema_decay was 0)")
    return {"params": state["ema"] if use_ema else state["params"],
            "router_bias": state["router_bias"]}
