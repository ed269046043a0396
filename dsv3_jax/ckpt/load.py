"""One loader for every checkpoint format: detection, then (ModelConfig, variables).

  load_variables(path, use_ema=False) -> (cfg, {"params": ..., "router_bias": ...})

`path` may be
  * a trainer checkpoint (ckpt.trainer): a workdir, its checkpoints/ dir, or one step dir (the
    latest step is read; use_ema picks the EMA parameters);
  * an orbax export written by ckpt.save_orbax (config.json + variables/);
  * a Hugging Face / official-release safetensors directory (ckpt.load_hf; FP8 dequantized).
"""
from __future__ import annotations

import glob
import os

from dsv3_jax.ckpt import trainer
from dsv3_jax.ckpt.errors import CheckpointError, CheckpointNotFoundError
from dsv3_jax.ckpt.hf import load_hf
from dsv3_jax.ckpt.orbax_io import is_orbax_export, load_orbax
from dsv3_jax.config import ModelConfig

TRAINER, ORBAX, SAFETENSORS = "trainer", "orbax", "safetensors"


def detect_format(path: str) -> str:
    """"trainer", "orbax" or "safetensors"; CheckpointError when `path` is none of them."""
    if not os.path.exists(path):
        raise CheckpointNotFoundError(f"checkpoint {path} does not exist")
    if not os.path.isdir(path):
        raise CheckpointNotFoundError(f"checkpoint {path} is not a directory")
    if glob.glob(os.path.join(path, "*.safetensors")):
        return SAFETENSORS
    if is_orbax_export(path):
        return ORBAX
    if trainer.is_trainer_checkpoint(path):
        return TRAINER
    raise CheckpointError(
        f"{path} is no known checkpoint format: expected a trainer workdir (or its checkpoints/ "
        "or a step directory), an orbax export (config.json + variables/), or a Hugging Face "
        "safetensors directory (config.json + *.safetensors)")


def data_info(path: str) -> dict:
    """The data info a trainer checkpoint was written with (tokenizer hash, chat digit order,
    ...); {} for the other formats, which record none."""
    return trainer.read_meta(path).get("data_info", {}) if detect_format(path) == TRAINER else {}


def load_variables(path: str, use_ema: bool = False) -> tuple[ModelConfig, dict]:
    """(cfg, {"params": ..., "router_bias": ...}) from any checkpoint format (module doc).

    The trees have the layout of `dsv3_jax.model.init(cfg, rng)`. Leaves are NumPy arrays
    (safetensors: read lazily into host memory) or jax arrays (orbax formats); every model entry
    point accepts either, and a caller that shards them puts them where they belong with
    `jax.device_put`. Router biases: the trainer checkpoint and the orbax export store them
    exactly; the HF layout stores them as `e_score_correction_bias` (float32).
    use_ema: the trainer's EMA parameters instead of the live ones (other formats hold one set
    of parameters; asking them for EMA is an error).
    """
    kind = detect_format(path)
    if kind == TRAINER:
        return trainer.read_model_config(path), trainer.read_variables(path, use_ema)
    if use_ema:
        raise CheckpointError(f"{path} is a {kind} checkpoint, which holds no EMA parameters; "
                              "only trainer checkpoints do")
    if kind == ORBAX:
        return load_orbax(path)
    return load_hf(path)
