"""Parameter EMA placements side by side (report §3.2.3), one process, alternating rounds:

  python benchmarks/ema_host.py [--rounds 4 --steps 5]

  none      no EMA
  device    ema = d * ema + (1 - d) * params inside the jitted step (train.ema_on_host=False)
  blocking  host EMA, each update copies the new params to the host at once (waits for the step)
  staged    host EMA as the trainer runs it: the copy enqueued into pinned host memory, a worker
            thread waits for it and updates (dsv3_jax/ema.py)

The loop is the trainer's: dispatch a step, hand its params to the EMA, next step; the metrics
are fetched once at the end. Prints ms/step (median over rounds), the ms per step the loop spends
inside `ema.update` (what keeps it from queueing the next step), the ratio to `none`, and the
EMA's bytes on the device vs on the host. Config: experiments/configs/tiny.py with the shapes
of benchmarks/step_config.py.
"""
import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from dsv3_jax import ema as ema_lib
from dsv3_jax import train, train_config, train_state
from step_config import our_config, random_batch


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--decay", type=float, default=0.99)
    args = ap.parse_args()
    batch = {k: jnp.asarray(v[None]) for k, v in random_batch().items()}
    runs = {}
    for name in ("none", "device", "blocking", "staged"):
        c = our_config()
        c.train.ema_decay = args.decay if name != "none" else 0.0
        cfg = train_config.validate(c)
        fns = train.make_step_fns(c, cfg)
        state = train_state.init_state(cfg, fns.optimizer, 0, name == "device")
        step = jax.jit(lambda s, b, fns=fns: train.train_step(s, b, fns), donate_argnums=0)
        state, m = step(state, batch)                                    # compile
        ema = None
        if name in ("blocking", "staged"):
            ema = ema_lib.HostEMA(args.decay, state["params"], stage=name == "staged")
            if name == "staged" and not ema.staged:
                raise SystemExit("this backend has no pinned_host memory: nothing to compare")
        ema_device = sum(x.nbytes for x in jax.tree.leaves(state.get("ema", {})))
        runs[name] = dict(step=step, state=state, ema=ema, times=[], waits=[],
                          device_mb=ema_device / 2**20,
                          host_mb=(ema.nbytes() if ema else 0) / 2**20)
    for _ in range(args.rounds):
        for r in runs.values():
            jax.block_until_ready(r["state"])
            t0, waited = time.perf_counter(), 0.0
            for _ in range(args.steps):
                r["state"], m = r["step"](r["state"], batch)
                if r["ema"] is not None:
                    t1 = time.perf_counter()
                    r["ema"].update(r["state"]["params"])
                    waited += time.perf_counter() - t1
            jax.block_until_ready(m["loss"])
            if r["ema"] is not None:
                r["ema"].wait()
            r["times"].append((time.perf_counter() - t0) / args.steps * 1e3)
            r["waits"].append(waited / args.steps * 1e3)
    base = float(np.median(runs["none"]["times"]))
    print(f"{'placement':10s} {'ms/step':>8s} {'in update':>10s} {'vs none':>8s} "
          f"{'EMA on device':>14s} {'EMA on host':>12s}")
    for name, r in runs.items():
        t, w = float(np.median(r["times"])), float(np.median(r["waits"]))
        print(f"{name:10s} {t:8.1f} {w:10.2f} {t / base:8.3f} {r['device_mb']:11.1f} MB "
              f"{r['host_mb']:9.1f} MB")
        if r["ema"] is not None:
            r["ema"].close()


if __name__ == "__main__":
    main()
