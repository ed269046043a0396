"""The context-extension stage (report §4.3) at tiny scale, and its evaluation.

  PYTHONPATH=$PWD python -m dsv3_jax.train --workdir /tmp/tiny_main      # the main job (once)
  PYTHONPATH=$PWD python experiments/context_extension.py --pretrained /tmp/tiny_main \
      --workdir /tmp/ctx

Runs phase 1 (256 -> 1024, YaRN s=4) from the pre-trained checkpoint and phase 2 (-> 4096,
s=16) from phase 1 (experiments/configs/context_extension.py), then evaluates four models:
the pre-trained one with plain RoPE, the same weights with YaRN (s=16) applied but not trained,
and each phase's result: loss versus position on the held-out documents longer than 4096 tokens,
and the passkey grid (length x depth). Writes experiments/context_extension_{loss,passkey}.png
and experiments/context_extension.json. --eval_only skips the training (workdirs must exist).
"""
import argparse
import json
import os
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from dsv3_jax import data, long_context_eval as lce, train, train_config  # noqa: E402
from dsv3_jax.generate import load_checkpoint  # noqa: E402

CONFIG = os.path.join(HERE, "configs", "context_extension.py")
LENGTHS, DEPTHS = (256, 1024, 4096), (0.0, 0.25, 0.5, 0.75, 1.0)
EDGES = (0, 256, 512, 1024, 2048, 4096)


def model_cfg(arg):
    return train_config.validate(train_config.load(CONFIG, arg))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pretrained", default="/tmp/tiny_main")
    ap.add_argument("--workdir", default="/tmp/ctx")
    ap.add_argument("--eval_only", action="store_true")
    ap.add_argument("--trials", type=int, default=2)
    ap.add_argument("--steps1", type=int, default=0)
    ap.add_argument("--steps2", type=int, default=0)
    args = ap.parse_args()
    w1, w2 = os.path.join(args.workdir, "phase1"), os.path.join(args.workdir, "phase2")
    timings = {}
    if not args.eval_only:
        for name, arg, wd in (("phase1", f"phase=1,init_from={args.pretrained},steps={args.steps1}",
                               w1),
                              ("phase2", f"phase=2,init_from={w1},steps={args.steps2}", w2)):
            t0 = time.perf_counter()
            c = train_config.load(CONFIG, arg)
            train.run(c, wd)
            timings[name] = time.perf_counter() - t0
            print(f"{name}: {timings[name]:.0f} s", flush=True)

    t0 = time.perf_counter()
    # Each model with the config its checkpoint was trained with; the untrained-YaRN row is the
    # pre-trained model with phase 2's rope scaling switched on.
    base_cfg, pre_vars, _ = load_checkpoint(args.pretrained)
    cfg16 = model_cfg("phase=2")
    yarn16 = base_cfg.replace(rope_scaling=cfg16.rope_scaling,
                              max_position_embeddings=cfg16.max_position_embeddings,
                              train_attention=cfg16.train_attention)
    cfg1, vars1, _ = load_checkpoint(w1)
    cfg2, vars2, _ = load_checkpoint(w2)
    models = {"pre-trained, RoPE": (base_cfg, pre_vars),
              "pre-trained + YaRN s=16 (untrained)": (yarn16, pre_vars),
              "phase 1 (1024, s=4)": (cfg1, vars1),
              "phase 2 (4096, s=16)": (cfg2, vars2)}
    builder = data.prepare_corpus()
    tok = data.load_tokenizer()
    vt, vo = data.tokenize_split(builder, "validation", tok)
    docs = lce.long_documents(vt, vo, LENGTHS[-1] + 1)
    filler = vt[vt != data.EOS_ID]        # the validation stream as one long run of code
    encode = lambda s: np.asarray(tok.encode(s).ids, np.int32)
    import datetime
    import subprocess
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, text=True,
                            capture_output=True).stdout.strip() or "unknown"
    results = {"command": " ".join(sys.argv), "args": vars(args), "commit": commit,
               "date": datetime.date.today().isoformat(),
               "lengths": LENGTHS, "depths": DEPTHS, "held_out_docs": len(docs),
               "timings_s": timings, "models": {}}
    for name, (cfg, variables) in models.items():
        variables = {"params": variables["params"], "router_bias": variables["router_bias"]}
        nll = lce.loss_by_position(cfg, variables, docs, LENGTHS[-1])
        grid = lce.passkey_grid(cfg, variables, encode, filler, LENGTHS, DEPTHS, args.trials)
        results["models"][name] = {"nll_buckets": lce.bucket_means(nll, EDGES),
                                   "nll_curve": nll.tolist(), "passkey": grid.tolist()}
        print(name, json.dumps(results["models"][name]["nll_buckets"]),
              "passkey by length:", grid.mean(1).round(2).tolist(), flush=True)
    timings["evaluation"] = time.perf_counter() - t0
    print(f"evaluation: {timings['evaluation']:.0f} s")
    plot(results)
    slim = {**results, "models": {k: {kk: vv for kk, vv in v.items() if kk != "nll_curve"}
                                  for k, v in results["models"].items()}}
    with open(os.path.join(HERE, "context_extension.json"), "w") as f:
        json.dump(slim, f, indent=1)


def plot(results):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4))
    k = 64
    for name, r in results["models"].items():
        curve = np.convolve(r["nll_curve"], np.ones(k) / k, mode="valid")
        ax.plot(np.arange(len(curve)) + k // 2, curve, label=name)
    for x in (256, 1024):
        ax.axvline(x, color="gray", lw=0.5, ls="--")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("position (tokens)")
    ax.set_ylabel(f"NLL (nats, {k}-token moving mean)")
    ax.set_title(f"Loss vs position, {results['held_out_docs']} held-out documents > 4096 tokens")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(HERE, "context_extension_loss.png"), dpi=110)
    names = list(results["models"])
    fig, axes = plt.subplots(1, len(names), figsize=(3.2 * len(names), 3), sharey=True)
    for ax, name in zip(axes, names):
        grid = np.asarray(results["models"][name]["passkey"])
        ax.imshow(grid.T, vmin=0, vmax=1, cmap="RdYlGn", origin="lower", aspect="auto")
        ax.set_xticks(range(len(results["lengths"])), [str(t) for t in results["lengths"]])
        ax.set_yticks(range(len(results["depths"])), [f"{d:.0%}" for d in results["depths"]])
        ax.set_title(name, fontsize=8)
        ax.set_xlabel("context length")
        for i in range(grid.shape[0]):
            for j in range(grid.shape[1]):
                ax.text(i, j, f"{grid[i, j]:.1f}", ha="center", va="center", fontsize=7)
    axes[0].set_ylabel("needle depth")
    fig.tight_layout()
    fig.savefig(os.path.join(HERE, "context_extension_passkey.png"), dpi=110)


if __name__ == "__main__":
    main()
