"""MoE layer fwd+bwd time vs number of routed experts at fixed tokens and top-k.

The dropless sorted path's cost must follow tokens x top-k, not the expert count; the dense
"every token through every expert" reference is timed beside it for contrast.

  python benchmarks/moe_scaling.py [--tokens 4096 --topk 8 --hidden 256 --width 128]
"""
import argparse
import time

import flax.linen as nn
import jax
import jax.numpy as jnp

from dsv3_jax import config
from dsv3_jax.layers import moe


def time_layer(cfg, tokens, repeats):
    layer = moe.MoE(cfg)
    x = jax.random.normal(jax.random.key(0), (tokens // 512, 512, cfg.hidden_size))
    valid = jnp.ones(x.shape[:2], bool)
    v = nn.meta.unbox(layer.init(jax.random.key(1), x, valid))

    @jax.jit
    def step(params, x):
        def loss(params, x):
            out, stats = layer.apply({"params": params, "router_bias": v["router_bias"]}, x, valid)
            return (out.astype(jnp.float32) ** 2).mean() + stats.balance_loss
        return jax.grad(loss, argnums=(0, 1))(params, x)

    jax.block_until_ready(step(v["params"], x))           # compile
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(step(v["params"], x))
        best = min(best, time.perf_counter() - t)
    return best


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--topk", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--experts", default="16,64,256")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--no-dense", action="store_true", help="skip the dense reference")
    args = ap.parse_args()
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}; tokens {args.tokens}, "
          f"top-{args.topk}, hidden {args.hidden}, expert width {args.width}, fwd+bwd, best of "
          f"{args.repeats}")
    rows = []
    for e in map(int, args.experts.split(",")):
        cfg = config.tiny(hidden_size=args.hidden, moe_intermediate_size=args.width,
                          n_routed_experts=e, num_experts_per_tok=args.topk, n_group=8,
                          topk_group=4, n_shared_experts=0)
        t_sorted = time_layer(cfg, args.tokens, args.repeats)
        t_dense = (float("nan") if args.no_dense or e > 64
                   else time_layer(cfg.replace(moe_impl="dense"), args.tokens, 2))
        tile = moe.tile_m_for(cfg, args.tokens * args.topk, e)
        rows.append((e, tile, t_sorted, t_dense))
        print(f"  experts {e:4d}  tile_m {tile:3d}  sorted {t_sorted * 1e3:8.1f} ms   "
              f"dense reference {t_dense * 1e3:8.1f} ms", flush=True)
    base = rows[0][2]
    print("ratio sorted time / sorted time at", rows[0][0], "experts:",
          ", ".join(f"{e}: {t / base:.2f}" for e, _, t, _ in rows))


if __name__ == "__main__":
    main()
