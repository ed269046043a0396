"""The converter's command line (`python -m dsv3_jax.convert`):

  python -m dsv3_jax.convert --from-hf DIR --to CKPT_DIR
  python -m dsv3_jax.convert --from-orbax CKPT_DIR --to-hf DIR [--max-shard-bytes N]

A missing, corrupt or mismatched checkpoint, or an output directory in the way, is one
`error:` line and exit status 2 (dsv3_jax.errors.cli).
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Iterable

from dsv3_jax import errors
from dsv3_jax.ckpt.hf import DEFAULT_MAX_SHARD_BYTES, load_hf, save_hf
from dsv3_jax.ckpt.orbax_io import load_orbax, save_orbax


@errors.cli
def main(argv: Iterable[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m dsv3_jax.convert",
        description="Convert DeepSeek-V3 checkpoints: Hugging Face / official FP8 safetensors "
                    "<-> orbax (variables + our config.json).")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--from-hf", metavar="DIR", help="HF or official-release checkpoint directory")
    src.add_argument("--from-orbax", metavar="CKPT_DIR", help="directory written by --to")
    p.add_argument("--to", metavar="CKPT_DIR", help="output orbax directory (with --from-hf)")
    p.add_argument("--to-hf", metavar="DIR", help="output HF directory (with --from-orbax)")
    p.add_argument("--mtp", choices=("auto", "require", "skip"), default="auto",
                   help="MTP modules on --from-hf (default: auto)")
    p.add_argument("--param-dtype", default="float32", help="dtype of the loaded parameters")
    p.add_argument("--dtype", default=None, help="--to-hf: cast weights (e.g. bfloat16)")
    p.add_argument("--max-shard-bytes", type=int, default=DEFAULT_MAX_SHARD_BYTES,
                   help="--to-hf: largest safetensors shard (default 5 GiB)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --to directory")
    args = p.parse_args(None if argv is None else list(argv))
    if args.from_hf and (not args.to or args.to_hf):
        p.error("--from-hf needs --to CKPT_DIR (and no --to-hf)")
    if args.from_orbax and (not args.to_hf or args.to):
        p.error("--from-orbax needs --to-hf DIR (and no --to)")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        if args.from_hf:
            cfg, variables = load_hf(args.from_hf, mtp=args.mtp, param_dtype=args.param_dtype)
            save_orbax(cfg, variables, args.to, overwrite=args.overwrite)
            dest = args.to
        else:
            cfg, variables = load_orbax(args.from_orbax)
            if os.path.exists(args.to_hf) and not os.path.isdir(args.to_hf):
                raise NotADirectoryError(f"{args.to_hf} exists and is not a directory")
            if os.path.isdir(args.to_hf) and os.listdir(args.to_hf) and not args.overwrite:
                raise FileExistsError(f"{args.to_hf} is not empty (pass --overwrite)")
            save_hf(cfg, variables, args.to_hf, max_shard_bytes=args.max_shard_bytes,
                    dtype=args.dtype)
            dest = args.to_hf
    except errors.UserError:
        raise
    except (OSError, ValueError) as e:     # a path in the way, a bad option value
        raise errors.UserError(str(e)) from e
    from dsv3_jax.params import count_params
    n = count_params(cfg)
    print(f"wrote {dest}: {n['total']:,} main-model parameters"
          + (f" + {n['mtp']:,} MTP" if n["mtp"] else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
