"""MoE layer fwd+bwd on 8 fake CPU devices: expert-parallel (all_to_all) vs experts replicated,
and the all-to-all bytes per step (read off the compiled HLO) against the theoretical minimum.

  python benchmarks/moe_ep.py [--tokens 8192 --hidden 256 --width 128 --experts 32 --topk 8]
  python benchmarks/moe_ep.py --fp8     # + the FP8 recipe: BF16 vs FP8 dispatch, side by side

CPU "devices" here share two cores, so times show overheads, not a speed-up; the byte counts are
exact for the compiled program.
"""
import argparse
import os
import re
import time

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from dsv3_jax import config, sharding  # noqa: E402
from dsv3_jax.layers import moe  # noqa: E402

_BYTES = {"f32": 4, "bf16": 2, "s32": 4, "f16": 2, "u32": 4, "s8": 1, "u8": 1, "pred": 1}


def all_to_all_bytes(hlo: str) -> int:
    """Sum of the result sizes of every all-to-all in the compiled module (per device)."""
    total = 0
    for line in hlo.splitlines():
        if " all-to-all(" not in line:
            continue
        for dtype, dims in re.findall(r"(f32|bf16|s32|f16|u32|s8|u8|pred)\[([\d,]*)\]",
                                      line.split("=", 1)[1].split("all-to-all(")[0]):
            total += _BYTES[dtype] * int(np.prod([int(d) for d in dims.split(",") if d]))
    return total


def run(mesh_sizes, cfg, tokens, repeats):
    shape = sharding.resolve_mesh_shape(mesh_sizes, 8)
    mesh = sharding.make_mesh(shape)
    layer = moe.MoE(cfg)
    x = jax.random.normal(jax.random.key(0), (tokens // 256, 256, cfg.hidden_size)).astype(cfg.dtype)
    valid = jnp.ones(x.shape[:2], bool)
    v = nn.meta.unbox(layer.init(jax.random.key(1), x, valid))
    rows = jax.sharding.NamedSharding(mesh, sharding.batch_spec(3))
    experts = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("expert"))
    x = jax.device_put(x, rows)
    params = jax.tree.map(lambda a: jax.device_put(a, experts) if a.ndim == 3 and
                          a.shape[0] == cfg.n_routed_experts else a, v["params"])

    def loss(params, x):
        out, stats = layer.apply({"params": params, "router_bias": v["router_bias"]}, x, valid)
        return (out.astype(jnp.float32) ** 2).mean() + stats.balance_loss

    with jax.set_mesh(mesh):
        step = jax.jit(jax.grad(loss, argnums=(0, 1)))
        lowered = step.lower(params, x)
        a2a = all_to_all_bytes(lowered.compile().as_text())
        run.program_bytes = all_to_all_bytes(lowered.as_text(dialect="hlo"))
        jax.block_until_ready(step(params, x))
        best = float("inf")
        for _ in range(repeats):
            t = time.perf_counter()
            jax.block_until_ready(step(params, x))
            best = min(best, time.perf_counter() - t)
    return best, a2a, shape


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--experts", type=int, default=32)
    ap.add_argument("--topk", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--fp8", action="store_true",
                    help="also the FP8 recipe at expert 8: all-to-all bytes with BF16 vs FP8 dispatch")
    args = ap.parse_args()
    cfg = config.tiny(hidden_size=args.hidden, moe_intermediate_size=args.width,
                      n_routed_experts=args.experts, num_experts_per_tok=args.topk, n_group=8,
                      topk_group=4, n_shared_experts=0)
    print(f"MoE layer fwd+bwd, {args.tokens} tokens, top-{args.topk} of {args.experts} experts, "
          f"hidden {args.hidden}, width {args.width}, float32, 8 fake CPU devices")
    t_rep, a_rep, _ = run(dict(data=8), cfg, args.tokens, args.repeats)
    print(f"  experts replicated (data 8)        {t_rep * 1e3:8.1f} ms   all-to-all "
          f"{a_rep / 2**20:7.2f} MiB/device")
    row_bytes = args.hidden * 4
    for ep in (2, 4, 8):
        t_ep, a_hlo, shape = run(dict(data=8 // ep, expert=ep), cfg, args.tokens, args.repeats)
        slots = args.tokens // 8 * args.topk
        cf = cfg.moe_ep_capacity_factor
        cap = min(slots, -(-int(cf * slots / ep + 0.999999) // 8) * 8)
        # token rows cross 4 times per step (dispatch, combine, and their transposes) + expert ids
        taken = 4 * ep * cap * row_bytes + ep * cap * 4
        fallback = 4 * ep * slots * row_bytes + ep * slots * 4 if cap < slots else 0
        # minimum: each slot whose expert lives on another shard crosses once each way, fwd+bwd
        minimum = 4 * slots * (ep - 1) / ep * row_bytes
        print(f"  expert parallel (data {8 // ep} x expert {ep})  {t_ep * 1e3:8.1f} ms   all-to-all "
              f"{taken / 2**20:6.2f} MiB/device/step vs minimum {minimum / 2**20:6.2f} MiB "
              f"({taken / minimum:.2f}x at capacity factor {cf}); compiled HLO holds "
              f"{a_hlo / 2**20:.2f} MiB = this + the overflow fallback branch "
              f"{fallback / 2**20:.2f} MiB: {'ok' if abs(a_hlo - taken - fallback) < 1024 else 'MISMATCH'}")
    if args.fp8:
        fp8_dispatch_bytes(cfg, args)


def fp8_dispatch_bytes(cfg, args):
    """The FP8 recipe (BF16 compute) at data 1 x expert 8, fp8_dispatch off and on: all-to-all
    bytes of the compiled HLO (both capacity branches) against the formula. Per token row of
    width d each step: dispatch forward and combine backward (the gradient before the
    down-projections) carry d E4M3 bytes + 4 d/128 scale bytes instead of 2 d; combine forward
    and dispatch backward stay 2 d (BF16)."""
    ep, d = 8, args.hidden
    slots = args.tokens // 8 * args.topk
    cf = cfg.moe_ep_capacity_factor
    cap = min(slots, -(-int(cf * slots / ep + 0.999999) // 8) * 8)
    rows = ep * cap + (ep * slots if cap < slots else 0)       # both branches of the lax.cond
    print(f"FP8 recipe (bfloat16 compute), data 1 x expert {ep}, {args.tokens} tokens: "
          f"all-to-all bytes per device per step (both capacity branches)")
    print("  (the program's HLO as lowered; XLA:CPU's float normalization then widens BF16 "
          "collectives to F32 in the compiled module, a CPU-backend pass, shown after it)")
    got = {}
    for on in (False, True):
        c = cfg.replace(fp8=True, dtype="bfloat16", fp8_dispatch=on)
        _, compiled, _ = run(dict(data=1, expert=ep), c, args.tokens, 1)
        got[on] = run.program_bytes
        row = (2 * (d + 4 * -(-d // 128)) + 2 * 2 * d) if on else 4 * 2 * d
        want = rows * (row + 4)                                 # + the int32 expert ids
        print(f"  fp8_dispatch={str(on):5}  {got[on] / 2**20:7.2f} MiB  (formula "
              f"{want / 2**20:7.2f} MiB: {'ok' if abs(got[on] - want) < 1024 else 'MISMATCH'}; "
              f"XLA:CPU compiled {compiled / 2**20:.2f} MiB)")
    print(f"  FP8 / BF16 dispatch: {got[True] / got[False]:.3f}x the bytes")


if __name__ == "__main__":
    main()
