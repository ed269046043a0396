"""The gradient error of each precision recipe at fixed weights, against float32 compute.

  python experiments/fp8_grad_error.py                       # the BF16 run's final weights
  python experiments/fp8_grad_error.py --checkpoint DIR --batches 8
  python experiments/fp8_grad_error.py --init                # freshly initialised weights

`experiments/fp8_vs_bf16.py` compares whole training runs, whose losses also drift apart by
chaos (two BF16 runs from different inits differ by about as much as the bar). This script
takes one set of weights and the same training batches, computes the gradient of the trained
objective (CE + MTP + balance) under each recipe of experiments/configs/fp8_vs_bf16.py, and
reports ||g - g_fp32|| / ||g_fp32|| per parameter group and over all parameters (mean over
batches), and the cosine with the float32 gradient: what one step of each recipe adds, with
no trajectory in between. Recipes: `bf16` (the baseline), `fp8_no_cache` (FP8 GEMMs, BF16
activations kept for the backward), `fp8` (the report's recipe: FP8 caching and dispatch).
The last row, `fp8 - fp8_no_cache`, is ||g_fp8 - g_fp8_no_cache|| / ||g_fp32||: how far
switching caching on moves the gradient (its backward, and its forward through the cached
tiles' power-of-2 scales). Independent errors add in quadrature, so compare the rows above in
squares, not by their difference.
"""
from __future__ import annotations

import argparse
import collections
import os
import pathlib
import re
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import jax                                                  # noqa: E402
import jax.numpy as jnp                                     # noqa: E402
import numpy as np                                          # noqa: E402

from dsv3_jax import train                                  # noqa: E402
from experiments.configs import fp8_vs_bf16 as exp          # noqa: E402

RECIPES = {"fp32": {"dtype": "float32"}, "bf16": {},
           "fp8_no_cache": {"fp8": True, "fp8_cache_activations": False},
           "fp8": {"fp8": True}}
# parameter groups by path (first match wins); the report keeps embedding, head, router and
# norms in higher precision, so their error is what reaches them through the FP8 layers
GROUPS = (("embed", r"embed"), ("head", r"head"), ("mtp", r"mtp"),
          ("router", r"router"), ("norms", r"norm"),
          ("routed experts", r"experts|w_gate|w_up|w_down"), ("shared experts", r"shared"),
          ("attention", r"attn"), ("dense MLP", r"mlp"))


def group_of(path) -> str:
    key = jax.tree_util.keystr(path)
    return next((name for name, pat in GROUPS if re.search(pat, key)), "other")


def gradients(c, params, router_bias, batches, step: int, workdir: str) -> list:
    """[(path, grad float64)] per batch: d objective / d params under config c."""
    obj = train.set_up(c, workdir).fns.objective
    grad = jax.jit(jax.grad(lambda p, b, batch: obj.loss(p, b, batch, jnp.int32(step))[0]))
    out = []
    for batch in batches:
        g = grad(params, router_bias, batch)
        out.append([(p, np.asarray(x, np.float64))
                    for p, x in jax.tree_util.tree_flatten_with_path(g)[0]])
    return out


def errors(grads: list, ref: list, scale: list | None = None) -> dict:
    """{"all": ||g - r|| / ||s||, "cos": cosine of g and r, group: the same per group}, each
    the mean over batches; s (the scale) is r unless given."""
    per = collections.defaultdict(list)
    for gb, rb, sb in zip(grads, ref, scale or ref):
        acc = collections.defaultdict(lambda: np.zeros(2))
        dot, norm_r = 0.0, 0.0
        for (path, g), (_, r), (_, sc) in zip(gb, rb, sb):
            for k in ("all", group_of(path)):
                acc[k] += (((g - r) ** 2).sum(), (sc ** 2).sum())
            dot += float((g * r).sum())
            norm_r += float((r ** 2).sum())
        for k, (e, n) in acc.items():
            per[k].append(float(np.sqrt(e / n)))
        norm_g = np.sqrt(sum((g ** 2).sum() for _, g in gb))
        per["cos"].append(dot / (norm_g * np.sqrt(norm_r)))
    return {k: float(np.mean(v)) for k, v in per.items()}


def run(c, params, router_bias, n_batches: int, step: int, recipes=RECIPES) -> dict:
    """{recipe: errors(...) against the first recipe (float32)} on the first n_batches training
    batches of c's data, and `fp8 - fp8_no_cache` (relative to the float32 gradient)."""
    grads = {}
    with tempfile.TemporaryDirectory(prefix="fp8_grad_error_") as workdir:
        data = train.load_data(train.set_up(c, workdir))
        batches = [jax.tree.map(jnp.asarray, next(data.train_iter)) for _ in range(n_batches)]
        for name, over in recipes.items():
            ci = c.copy_and_resolve_references()
            ci.model.update(over)
            grads[name] = gradients(ci, params, router_bias, batches, step, workdir)
    ref_name = next(iter(recipes))
    out = {name: errors(g, grads[ref_name]) for name, g in grads.items() if name != ref_name}
    if {"fp8", "fp8_no_cache"} <= set(grads):
        out["fp8 - fp8_no_cache"] = errors(grads["fp8"], grads["fp8_no_cache"],
                                           scale=grads[ref_name])
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", default=str(ROOT / "runs/fp8_vs_bf16/s0/bf16"),
                   help="trainer workdir or step dir (default: the BF16 run of seed 0)")
    p.add_argument("--init", action="store_true", help="freshly initialised weights instead")
    p.add_argument("--batches", type=int, default=4)
    args = p.parse_args()
    t0 = time.time()
    c = exp.get_config(None)
    if args.init:   # the weights train.run starts from (train_state.init_state)
        from dsv3_jax import model, train_config
        variables = model.init(train_config.model_config(c),
                               jax.random.fold_in(jax.random.key(c.train.seed), 0))
        where, step = f"init seed {c.train.seed} (step 0)", 0
    else:
        from dsv3_jax import ckpt
        from dsv3_jax.ckpt import trainer as ckpt_trainer
        variables = ckpt.load_variables(args.checkpoint)[1]
        step = int(os.path.basename(ckpt_trainer.step_dir(args.checkpoint)))
        where = f"{args.checkpoint} (step {step})"
    params = jax.tree.map(jnp.asarray, variables["params"])
    bias = jax.tree.map(jnp.asarray, variables.get("router_bias", {}))
    out = run(c, params, bias, args.batches, step)
    groups = [g for g, _ in GROUPS if g in out["bf16"]] + (["other"] if "other" in out["bf16"]
                                                         else [])
    print(f"\nGradient error vs float32 compute at {where}, mean over {args.batches} batches "
          f"of {c.data.global_batch}x{c.data.seq_len} tokens (||g - g32|| / ||g32||):\n")
    print("| recipe | all | cosine | " + " | ".join(groups) + " |")
    print("|---" * (len(groups) + 3) + "|")
    for name, e in out.items():
        print(f"| {name} | {100 * e['all']:.2f}% | {e['cos']:.5f} | "
              + " | ".join(f"{100 * e[g]:.2f}%" for g in groups) + " |")
    print(f"\n({time.time() - t0:.0f} s)")


if __name__ == "__main__":
    main()
