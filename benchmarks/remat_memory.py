"""What each remat policy keeps for the backward pass, per MoE layer, measured with jax's
saved-residual analysis of the real scanned stack (tracing only: nothing is allocated or
compiled, so the 671B shapes work on a laptop) next to `plan.activation_bytes_per_token_layer`.

  python benchmarks/remat_memory.py                  # tiny (2 x 128 tokens) and DeepSeek-V3 (1 x 4096)
  python benchmarks/remat_memory.py --only tiny

Columns: BF16; FP8 with BF16 caches (fp8_cache_activations=False); FP8 as the report caches
(Linear inputs and the MoE SwiGLU inputs in FP8, §3.3.3). Bytes per layer for the given tokens.
"""
import argparse

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from jax._src.ad_checkpoint import saved_residuals   # behind jax.ad_checkpoint.print_saved_residuals

from dsv3_jax import config, model, plan

LAYERS = 3
VARIANTS = {"BF16": dict(fp8=False), "FP8, BF16 caches": dict(fp8=True, fp8_cache_activations=False),
            "FP8 (report)": dict(fp8=True)}


def measure(cfg, batch: int, seq: int) -> int:
    """Bytes per layer that the scan stacks for the backward pass ([L, ...] residuals)."""
    x = jax.ShapeDtypeStruct((batch, seq, cfg.hidden_size), jnp.dtype(cfg.dtype))
    pos = jnp.broadcast_to(jnp.arange(seq), (batch, seq))
    seg = jnp.ones((batch, seq), jnp.int32)
    chunk = model._MoEChunk(cfg, LAYERS)
    shapes = nn.meta.unbox(jax.eval_shape(lambda: chunk.init(jax.random.key(0), jnp.zeros(
        x.shape, x.dtype), pos, seg)))

    def loss(params, x):
        y, stats = model.forward_moe_chunk(cfg, {"params": params,
                                                 "router_bias": shapes["router_bias"]},
                                           x, pos, seg)
        return y.astype(jnp.float32).sum() + stats.balance_loss.sum()

    total = 0
    for aval, src in saved_residuals(loss, shapes["params"], x):
        if "from the argument" not in src and aval.ndim and aval.shape[0] == LAYERS:
            total += int(np.prod(aval.shape)) * aval.dtype.itemsize // LAYERS
    return total


def table(name, make_cfg, batch, seq):
    print(f"\n{name}: {batch} x {seq} tokens, bytes per MoE layer, measured (formula); "
          f"'none' includes the weight-shaped residuals (BF16 casts or FP8 blocks), shown apart")
    print("| remat | " + " | ".join(VARIANTS) + " |")
    print("|---|" + "---|" * len(VARIANTS))
    for remat in ("none", "selective", "full"):
        cells = []
        for kw in VARIANTS.values():
            cfg = make_cfg(remat=remat, **kw)
            got = measure(cfg, batch, seq)
            f = plan.activation_bytes_per_token_layer(cfg, remat, seq, tokens=batch * seq)
            want = f["per_token_layer"] * batch * seq + f["weights_per_layer"]
            cell = f"{_fmt(got)} ({_fmt(want)})"
            if f["weights_per_layer"]:
                cell += f", of which weights {_fmt(f['weights_per_layer'])}"
            cells.append(cell)
        print(f"| {remat} | " + " | ".join(cells) + " |", flush=True)


def _fmt(n: float) -> str:
    return f"{n / 1e9:,.2f} GB" if n >= 1e9 else f"{n / 1e6:,.2f} MB"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", choices=["tiny", "deepseek_v3"], default=None)
    args = ap.parse_args()
    if args.only in (None, "tiny"):
        table("tiny (vocab 512)", lambda **kw: config.tiny(vocab_size=512, dtype="bfloat16", **kw),
              2, 128)
    if args.only in (None, "deepseek_v3"):
        from experiments.configs import deepseek_v3
        base = deepseek_v3.get_config().model.to_dict()

        def v3(**kw):
            d = dict(base, **kw)
            d["train_attention"] = "blockwise"
            return config.ModelConfig(**{k: v for k, v in d.items()
                                         if k in config.ModelConfig.__dataclass_fields__})
        table("DeepSeek-V3 (671B shapes, flash attention)", v3, 1, 4096)


if __name__ == "__main__":
    main()
