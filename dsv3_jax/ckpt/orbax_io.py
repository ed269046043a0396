"""Orbax exports of a model's variables: `path/variables` (an orbax StandardCheckpointer
checkpoint) next to `path/config.json` (our ModelConfig as JSON), written by `save_orbax` and read
back, checked against the config first, by `load_orbax`.
"""
from __future__ import annotations

import json
import os
import shutil
from typing import Any

from dsv3_jax.ckpt.errors import (CheckpointError, CheckpointNotFoundError, describe_mismatch,
                                  problem_list)
from dsv3_jax.ckpt.layout import CONFIG_NAME, read_config_json, to_dict
from dsv3_jax.config import ConfigError, ModelConfig

ORBAX_SUBDIR = "variables"


def is_orbax_export(path: str) -> bool:
    """Whether `path` looks like a directory written by save_orbax."""
    return (os.path.isfile(os.path.join(path, CONFIG_NAME))
            and os.path.isdir(os.path.join(path, ORBAX_SUBDIR)))


def save_orbax(cfg: ModelConfig, variables: dict, path: str, *, overwrite: bool = False) -> None:
    """path/variables: an orbax (StandardCheckpointer) checkpoint of the variables;
    path/config.json: our ModelConfig as JSON."""
    import orbax.checkpoint as ocp

    path = os.path.abspath(path)
    if os.path.exists(path) and not os.path.isdir(path):
        raise NotADirectoryError(f"{path} exists and is not a directory")
    if os.path.isdir(path) and os.listdir(path):
        if not overwrite:
            raise FileExistsError(f"{path} is not empty (pass overwrite=True / --overwrite)")
        shutil.rmtree(path)
    os.makedirs(path, exist_ok=True)
    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(os.path.join(path, ORBAX_SUBDIR), to_dict(variables))
        ckpt.wait_until_finished()
    with open(os.path.join(path, CONFIG_NAME), "w") as f:
        json.dump(cfg.to_dict(), f, indent=2, sort_keys=True)


def _model_config(path: str, d: dict[str, Any], overrides: dict[str, Any]) -> ModelConfig:
    try:
        return ModelConfig.from_dict({**d, **overrides})
    except ConfigError as e:
        hf_like = "model_type" in d or "architectures" in d
        raise ConfigError(f"{os.path.join(path, CONFIG_NAME)}: {e}"
                          + (" (is this a Hugging Face directory? use --from-hf)" if hf_like
                             else "")) from None


def load_orbax(path: str, **overrides: Any) -> tuple[ModelConfig, dict]:
    """(cfg, variables) from a directory written by save_orbax, checked against the config first.
    overrides: ModelConfig fields to force (e.g. dtype). Variables are jax arrays."""
    import orbax.checkpoint as ocp

    from dsv3_jax.model import abstract_variables

    path = os.path.abspath(path)
    cfg = _model_config(path, read_config_json(path), overrides)
    vdir = os.path.join(path, ORBAX_SUBDIR)
    if not os.path.isdir(vdir):
        raise CheckpointNotFoundError(f"no orbax checkpoint at {vdir}")
    abstract = to_dict(abstract_variables(cfg))
    try:
        with ocp.StandardCheckpointer() as ckpt:
            stored = ckpt.metadata(vdir)
            stored = getattr(stored, "item_metadata", stored)
            stored = getattr(stored, "tree", stored)
            problems = describe_mismatch(stored, abstract)
            if problems:
                raise CheckpointError(f"orbax checkpoint {vdir} does not match {CONFIG_NAME} "
                                      + problem_list(problems, limit=len(problems)))
            variables = ckpt.restore(vdir, abstract)
    except CheckpointError:
        raise
    except Exception as e:   # orbax/tensorstore report damaged files from deep inside
        raise CheckpointError(f"cannot read the orbax checkpoint {vdir} (damaged or incomplete?): "
                              f"{type(e).__name__}: {e}") from e
    return cfg, to_dict(variables)
