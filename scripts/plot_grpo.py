"""Curves of a GRPO run: reward, KL and response length per RL step, from its metrics.jsonl.

  python scripts/plot_grpo.py runs/grpo_tiny [--out grpo_curves.png]
"""
import argparse
import json
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("workdir")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    rows = [json.loads(x) for x in open(os.path.join(a.workdir, "metrics.jsonl"))]
    rows = [r for r in rows if "reward_mean" in r]
    steps = [r["step"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.2))
    for ax, key, title in zip(axes, ("reward_mean", "kl", "response_length"),
                              ("reward (mean over samples)", "KL to the reference (k3)",
                               "response length (tokens)")):
        ax.plot(steps, [r[key] for r in rows])
        ax.set_title(title)
        ax.set_xlabel("GRPO step")
    fig.tight_layout()
    out = a.out or os.path.join(a.workdir, "grpo_curves.png")
    fig.savefig(out, dpi=80)
    print(out)


if __name__ == "__main__":
    main()
