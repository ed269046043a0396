"""Checkpoint conversion, Hugging Face / official-release safetensors <-> our variables <-> orbax:
the public names of dsv3_jax.ckpt under the documented module name.

  cfg, variables = load_hf(path)               # HF (transformers 5) or official FP8 release layout
  save_hf(cfg, variables, path)                # HF layout that transformers' from_pretrained loads
  save_orbax(cfg, variables, path)             # path/variables (orbax) + path/config.json (ours)
  cfg, variables = load_orbax(path)
  dequantize_fp8(w8, scale_inv, block)         # the release's 128x128 block format -> float32
  quantize_fp8(w, block)                       # the inverse (amax/448 per block; for tests/tools)
  hf_config_to_fields(d) / hf_config_dict(cfg) # config.json <-> ModelConfig fields

  python -m dsv3_jax.convert --from-hf DIR --to CKPT_DIR
  python -m dsv3_jax.convert --from-orbax CKPT_DIR --to-hf DIR [--max-shard-bytes N]
"""
from __future__ import annotations

import sys

from dsv3_jax.ckpt.cli import main
from dsv3_jax.ckpt.errors import CheckpointError
from dsv3_jax.ckpt.fp8_blocks import DEFAULT_BLOCK, FP8_MAX, dequantize_fp8, quantize_fp8
from dsv3_jax.ckpt.hf import DEFAULT_MAX_SHARD_BYTES, load_hf, save_hf
from dsv3_jax.ckpt.layout import CONFIG_NAME, hf_config_dict, hf_config_to_fields
from dsv3_jax.ckpt.orbax_io import ORBAX_SUBDIR, load_orbax, save_orbax
from dsv3_jax.ckpt.safetensors_io import (INDEX_NAME, SINGLE_NAME, SafetensorsDir,
                                          SafetensorsFile, write_safetensors)

__all__ = ["CONFIG_NAME", "CheckpointError", "DEFAULT_BLOCK", "DEFAULT_MAX_SHARD_BYTES", "FP8_MAX",
           "INDEX_NAME", "ORBAX_SUBDIR", "SINGLE_NAME", "SafetensorsDir", "SafetensorsFile",
           "dequantize_fp8", "hf_config_dict", "hf_config_to_fields", "load_hf", "load_orbax",
           "main", "quantize_fp8", "save_hf", "save_orbax", "write_safetensors"]

if __name__ == "__main__":
    sys.exit(main())
