"""FP8 vs BF16 training, side by side (report §3.3.4: relative loss error below 0.25%).

  python experiments/fp8_vs_bf16.py [--quick] [--noise] [--workdir runs/fp8_vs_bf16]
                                    [--out experiments/fp8_vs_bf16.png]

Trains experiments/configs/fp8_vs_bf16.py twice with dsv3_jax.train.run, once per entry of its
`sweep` (BF16, then FP8): same init (train.seed), same batches (data.seed), only `model.fp8`
differs. Reads both metrics.jsonl files and prints, for the training loss (`loss`: next-token CE
+ MTP + balance terms, the trained objective) and the main next-token CE (`ce`): the last step's
value, the mean of the last --last steps (less batch noise), and FP8's relative error
|fp8 - bf16| / bf16; then the final validation losses. `--noise` adds two yardsticks on the same
batches, compared with BF16 the same way: BF16 from another init (train.seed + 1), and FP32
compute from the same init (a rounding change 16x finer than FP8's). The curves go to --out
(PNG). Runs whose workdir holds a finished result are reused with --reuse.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np                                          # noqa: E402

from dsv3_jax import train                                  # noqa: E402
from experiments.configs import fp8_vs_bf16 as exp          # noqa: E402

CLAIM = 0.0025          # the report's bound on the relative loss error


def configs(quick: bool, noise: bool, seed: int | None = None) -> dict:
    """name -> ConfigDict: the sweep's runs (+ the yardsticks), init seed `seed` if given."""
    runs = {}

    def config():
        c = exp.get_config("quick" if quick else None)
        c.train.seed = c.train.seed if seed is None else seed
        return c

    def add(**overrides):
        c = config()
        c.update_from_flattened_dict(overrides)
        runs["fp8" if c.model.fp8 else "bf16"] = c

    exp.sweep(add)
    if noise:
        c = config()
        c.train.seed += 1
        runs["bf16_other_init"] = c
        c = config()
        c.model.dtype = "float32"
        runs["fp32"] = c
    return runs


def train_once(name: str, c, workdir: str, reuse: bool) -> dict:
    done = os.path.join(workdir, "result.json")
    if reuse and os.path.exists(done) and json.load(open(done))["step"] == c.train.steps:
        print(f"== {name}: reusing {workdir}", flush=True)
    else:
        shutil.rmtree(workdir, ignore_errors=True)
        print(f"== {name}: training {c.train.steps} steps (fp8={c.model.fp8}, "
              f"dtype={c.model.dtype}, init seed {c.train.seed}, data seed {c.data.seed}) "
              f"in {workdir}", flush=True)
        t = time.time()
        train.run(c, workdir)
        print(f"== {name}: {time.time() - t:.0f} s", flush=True)
    return read_metrics(workdir)


def read_metrics(workdir: str) -> dict:
    """{"step": [...], "loss": [...], "ce": [...], "val_loss": float} from metrics.jsonl."""
    rows, val = {}, None
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        for line in f:
            r = json.loads(line)
            if "loss" in r:
                rows[r["step"]] = r
            if "val_loss" in r:
                val = r["val_loss"]
    steps = sorted(rows)
    return {"step": np.array(steps), "loss": np.array([rows[s]["loss"] for s in steps]),
            "ce": np.array([rows[s]["ce"] for s in steps]), "val_loss": val}


def rel(a: float, b: float) -> float:
    return abs(a - b) / abs(b)


def compare(base: dict, other: dict, last: int, key: str) -> dict:
    if not np.array_equal(base["step"], other["step"]):
        raise ValueError("the runs logged different steps; were they trained with log_every=1?")
    tail = lambda m: float(m[key][-last:].mean())
    return {"last_base": float(base[key][-1]), "last_other": float(other[key][-1]),
            "mean_base": tail(base), "mean_other": tail(other),
            "rel_last": rel(other[key][-1], base[key][-1]),
            "rel_mean": rel(tail(other), tail(base))}


def plot(curves: dict, out: str, last: int, title: str):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax, ax_rel) = plt.subplots(2, 1, figsize=(8, 7), sharex=True,
                                     gridspec_kw={"height_ratios": [2, 1]})
    base = curves["bf16"]
    for (name, m), color in zip(curves.items(), plt.rcParams["axes.prop_cycle"].by_key()["color"]):
        ax.plot(m["step"], m["loss"], label=name, lw=1.0, alpha=0.9, color=color)
        if name != "bf16":
            # relative difference of a smoothed curve: per-step noise is batch noise
            k = min(last, len(m["loss"]))
            smooth = lambda y: np.convolve(y, np.ones(k) / k, mode="valid")
            ax_rel.plot(base["step"][k - 1:], 100 * (smooth(m["loss"]) - smooth(base["loss"]))
                        / smooth(base["loss"]), label=f"{name} vs bf16 ({k}-step mean)", lw=1.0,
                        color=color)
    ax.set_ylabel("training loss")
    ax.set_title(title)
    ax.legend()
    ax.grid(alpha=0.3)
    lo, hi = base["loss"][len(base["loss"]) // 3:].min(), base["loss"][len(base["loss"]) // 3:].max()
    ax.set_ylim(lo - 0.1 * (hi - lo), base["loss"][0] * 1.02)
    for y in (-100 * CLAIM, 100 * CLAIM):
        ax_rel.axhline(y, color="k", ls=":", lw=0.8)
    ax_rel.axhline(0, color="k", lw=0.5)
    ax_rel.set_ylabel("relative difference (%)")
    ax_rel.set_xlabel("step")
    ax_rel.legend(fontsize=8)
    ax_rel.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    print(f"curves: {out}")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", default="runs/fp8_vs_bf16")
    p.add_argument("--out", default=str(ROOT / "experiments" / "fp8_vs_bf16.png"))
    p.add_argument("--last", type=int, default=20, help="steps averaged for the final loss")
    p.add_argument("--quick", action="store_true", help="the config's 12-step smoke variant")
    p.add_argument("--noise", action="store_true",
                   help="also BF16 from another init and FP32 compute (run-to-run yardsticks)")
    p.add_argument("--reuse", action="store_true", help="reuse finished runs in --workdir")
    p.add_argument("--seed", type=int, default=None, help="init seed (default: the config's)")
    args = p.parse_args()

    t0 = time.time()
    curves = {name: train_once(name, c, os.path.join(args.workdir, name), args.reuse)
              for name, c in configs(args.quick, args.noise, args.seed).items()}
    base = curves["bf16"]
    n = len(base["step"])
    print(f"\n== results after {n} steps; final = mean of the last {args.last} steps "
          f"(the report's bound: {100 * CLAIM:.2f}%)")
    pairs = [("bf16", name) for name in curves if name != "bf16"]
    if "fp32" in curves:
        pairs.append(("fp32", "fp8"))
    for a, b in pairs:
        print(f"-- {b} vs {a}")
        for key in ("loss", "ce"):
            r = compare(curves[a], curves[b], args.last, key)
            print(f"  {key:4s} {a} {r['mean_base']:.4f} (last {r['last_base']:.4f})   {b} "
                  f"{r['mean_other']:.4f} (last {r['last_other']:.4f})   relative error "
                  f"{100 * r['rel_mean']:.3f}% (last step {100 * r['rel_last']:.3f}%)")
        va, vb = curves[a]["val_loss"], curves[b]["val_loss"]
        if va is not None and vb is not None:
            print(f"  validation loss: {a} {va:.4f}, {b} {vb:.4f}, relative error "
                  f"{100 * rel(vb, va):.3f}%")
    r = compare(base, curves["fp8"], args.last, "loss")
    verdict = "below" if r["rel_mean"] < CLAIM else "NOT below"
    print(f"\nFP8 vs BF16 relative training-loss error {100 * r['rel_mean']:.3f}%: {verdict} the "
          f"report's {100 * CLAIM:.2f}%  ({time.time() - t0:.0f} s in all)")
    plot(curves, args.out, args.last,
         f"tiny DeepSeek-V3, same init and data: FP8 vs BF16 ({n} steps)")


if __name__ == "__main__":
    main()
