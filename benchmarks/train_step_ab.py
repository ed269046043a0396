"""A/B of train-step variants in one process, alternating rounds (fair under background load).

  python benchmarks/train_step_ab.py "model.scan_unroll=1,train.ce_chunk=0" \
                                     "model.scan_unroll=4,train.ce_chunk=64"

Each argument is a comma-separated list of config overrides (section.key=value) on
experiments/configs/tiny.py with the issue's shapes (benchmarks/step_config.py; MTP off,
batch 8 x 256, float32). Prints min and median ms/step over --rounds rounds of 3 steps, and the
first step's loss (equal across variants that only change how the step runs).
"""
import argparse
import ast
import time

import jax
import jax.numpy as jnp

from dsv3_jax import train, train_config, train_state
from step_config import our_config, random_batch


def config_for(spec: str):
    c = our_config()
    for item in filter(None, spec.split(",")):
        key, value = item.split("=")
        section, name = key.split(".")
        try:
            c[section][name] = ast.literal_eval(value)   # 1e-3, True, None, 64 ...
        except (ValueError, SyntaxError):
            c[section][name] = value                     # a bare string: jnp, selective ...
    return c


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("variants", nargs="+")
    ap.add_argument("--rounds", type=int, default=4)
    args = ap.parse_args()
    batch = {k: jnp.asarray(v[None]) for k, v in random_batch().items()}   # one micro-batch
    runs = {}
    for spec in args.variants:
        c = config_for(spec)
        cfg = train_config.validate(c)
        fns = train.make_step_fns(c, cfg)
        state = train_state.init_state(cfg, fns.optimizer, 0, False)
        step = jax.jit(lambda s, b, fns=fns: train.train_step(s, b, fns), donate_argnums=0)
        state, m = step(state, batch)                                  # compile
        runs[spec] = dict(step=step, state=state, times=[], loss=float(m["loss"]))
    for _ in range(args.rounds):
        for r in runs.values():
            t0 = time.perf_counter()
            for _ in range(3):
                r["state"], m = r["step"](r["state"], batch)
            jax.block_until_ready(m["loss"])
            r["times"].append((time.perf_counter() - t0) / 3 * 1e3)
    for spec, r in runs.items():
        times = sorted(r["times"])
        print(f"{spec or 'tiny.py':50s} min {times[0]:7.1f} ms  median {times[len(times) // 2]:7.1f}"
              f" ms  first loss {r['loss']:.5f}")


if __name__ == "__main__":
    main()
