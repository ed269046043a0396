"""What the ablation modules and their notebooks share: size, results directory, provenance.

Every question is `experiments/<question>.py` (configs + `run(size, results_dir)` writing
`results.json`) and `notebooks/<question>.ipynb` (calls it, plots). The size comes from the
environment so that CI can ask for the smoke size:

  DSV3_NOTEBOOK_SIZE=smoke|full|auto   auto (default): load the committed full results if present,
                                       else run the smoke size
  DSV3_RESULTS_DIR=DIR                 where smoke (and uncommitted) runs write; default: a fresh
                                       temporary directory. Full results go to
                                       experiments/results/<question>/ and are committed.

Runs are cached: a results.json whose recorded config equals the requested one is reused, so
re-opening a notebook does not retrain.
"""
from __future__ import annotations

import datetime
import json
import os
import pathlib
import platform
import subprocess
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parents[1]
RESULTS = ROOT / "experiments" / "results"
FIGURES = ROOT / "experiments" / "figures"
SIZES = ("smoke", "full")


def parse_run_args(description: str, argv=None):
    """The ablation modules' command line: (size, steps or None, seeds or None)."""
    import argparse
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--size", default="full", choices=SIZES)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--seeds", default=None, help="comma separated, e.g. 0,1,2")
    args = p.parse_args(argv)
    return args.size, args.steps, ([int(x) for x in args.seeds.split(",")] if args.seeds
                                   else None)


def requested_size(question: str) -> str:
    """smoke or full, from DSV3_NOTEBOOK_SIZE (auto: full if committed results exist)."""
    size = os.environ.get("DSV3_NOTEBOOK_SIZE", "auto")
    if size == "auto":
        return "full" if (RESULTS / question / "results.json").exists() else "smoke"
    if size not in SIZES:
        raise ValueError(f"DSV3_NOTEBOOK_SIZE must be smoke, full or auto, got {size!r}")
    return size


def results_dir(question: str, size: str) -> pathlib.Path:
    """experiments/results/<question> for full; DSV3_RESULTS_DIR/<question> (or a temporary
    directory) for smoke, so a smoke run never writes over the committed results."""
    if size == "full":
        d = RESULTS / question
    else:
        base = os.environ.get("DSV3_RESULTS_DIR") or tempfile.mkdtemp(prefix="dsv3_smoke_")
        d = pathlib.Path(base) / question
    d.mkdir(parents=True, exist_ok=True)
    return d


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True,
                             capture_output=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=ROOT, text=True, capture_output=True).stdout.strip()
        return out + ("+uncommitted" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def provenance(command: str) -> dict:
    """Recorded with every result: when, at which commit, by which command, on what."""
    return {"date": datetime.date.today().isoformat(), "git_commit": git_commit(),
            "command": command, "python": sys.version.split()[0],
            "machine": f"{platform.machine()}, {os.cpu_count()} cores"}


def save(path: pathlib.Path, obj) -> None:
    path = pathlib.Path(path)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=float))
    os.replace(tmp, path)


def load(path: pathlib.Path):
    return json.loads(pathlib.Path(path).read_text())


def cached(path: pathlib.Path, config: dict):
    """The stored result at path if it was produced by exactly this config, else None."""
    path = pathlib.Path(path)
    if not path.exists():
        return None
    out = load(path)
    return out if out.get("config") == json.loads(json.dumps(config, default=float)) else None


def stat(values) -> dict:
    """{"values", "mean", "std"} over seeds; std is the sample std (ddof=1), 0 for one value."""
    import numpy as np
    v = np.asarray(values, float)
    return {"values": v.tolist(), "mean": float(v.mean()),
            "std": float(v.std(ddof=1)) if v.size > 1 else 0.0}


def mean_spread(values) -> str:
    """'m ± s (n=k)': mean and sample standard deviation (ddof=1) over seeds."""
    import numpy as np
    v = np.asarray(values, float)
    if v.size == 1:
        return f"{v[0]:.4f} (n=1)"
    return f"{v.mean():.4f} ± {v.std(ddof=1):.4f} (n={v.size})"


def obtain(question: str, run_fn):
    """(size, results) for a notebook: with DSV3_NOTEBOOK_SIZE unset (auto) the committed full
    results are loaded as they are (nothing retrains, nothing is rewritten); an explicit size
    calls run_fn(size), whose runs are cached."""
    size = requested_size(question)
    path = RESULTS / question / "results.json"
    if size == "full" and os.environ.get("DSV3_NOTEBOOK_SIZE", "auto") == "auto":
        return size, load(path)
    return size, run_fn(size)


def verdict(diffs, better: str = "lower") -> str:
    """'reproduces' when the paired differences (ours - baseline, over seeds) favour the report's
    direction on every seed; 'does not reproduce' when they oppose it on every seed; otherwise
    'inconclusive' (mixed signs: within seed-to-seed noise)."""
    import numpy as np
    d = np.asarray(diffs, float)
    good = d < 0 if better == "lower" else d > 0
    if good.all():
        return "reproduces"
    if (~good).all():
        return "does not reproduce"
    return "inconclusive"


def savefig(fig, name: str, size: str) -> str | None:
    """experiments/figures/<name>.png for full-size results; nothing at smoke size."""
    if size != "full":
        return None
    FIGURES.mkdir(parents=True, exist_ok=True)
    path = FIGURES / f"{name}.png"
    fig.savefig(path, dpi=110, bbox_inches="tight")
    return str(path.relative_to(ROOT))
