"""Checkpoints: the trainer's own, orbax exports of a model, and Hugging Face / official-release
safetensors directories; one loader for all of them.

  cfg, variables = load_variables(path, use_ema=False)   # any format (ckpt.load)
  cfg, variables = load_hf(path) / save_hf(cfg, variables, path)          (ckpt.hf)
  save_orbax(cfg, variables, path) / cfg, variables = load_orbax(path)    (ckpt.orbax_io)
  Checkpointer(directory)                                 # the trainer's (ckpt.trainer)

Modules: safetensors_io (the file format), layout (HF key table, config.json mapping),
fp8_blocks (the release's 128x128 block FP8), hf, orbax_io, trainer, load, cli, errors.
"""
from dsv3_jax.ckpt.errors import (CheckpointError, CheckpointMismatchError,
                                  CheckpointNotFoundError)
from dsv3_jax.ckpt.fp8_blocks import dequantize_fp8, quantize_fp8
from dsv3_jax.ckpt.hf import load_hf, save_hf
from dsv3_jax.ckpt.layout import hf_config_dict, hf_config_to_fields
from dsv3_jax.ckpt.load import detect_format, load_variables
from dsv3_jax.ckpt.orbax_io import load_orbax, save_orbax
from dsv3_jax.ckpt.trainer import Checkpointer

__all__ = ["CheckpointError", "CheckpointMismatchError", "CheckpointNotFoundError", "Checkpointer",
           "dequantize_fp8", "detect_format", "hf_config_dict", "hf_config_to_fields", "load_hf",
           "load_orbax", "load_variables", "quantize_fp8", "save_hf", "save_orbax"]
