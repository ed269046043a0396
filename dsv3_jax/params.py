"""Parameter counts from abstract shapes (`jax.eval_shape`; nothing is allocated).

  python -m dsv3_jax.params --preset deepseek_v3_671b [--json]

count_params(cfg) -> dict with
  total           main model: embedding + layers + final norm + head + the routers' selection
                  biases (671,026,419,200 for the release)
  activated       per token: embedding, head, norms, attention, routers (+ biases), shared experts
                  and num_experts_per_tok routed experts per MoE layer; dense FFN in dense layers
  mtp             the MTP modules' unique parameters (embedding and head are shared)
  mtp_activated   the same, per token
  total_with_mtp  total + mtp
  as_released     total_with_mtp + the copies of embedding and head the release stores per MTP
                  module (model.layers.61.embed_tokens / shared_head.head)
  router_bias     the non-trainable selection biases included above (main + MTP)
  breakdown       main model by component: embedding, head, attention, dense_ffn,
                  routed_experts, shared_experts, router, norms, router_bias
"""
from __future__ import annotations

import argparse
import json
import math
import sys

import jax

from dsv3_jax import errors
from dsv3_jax.config import ModelConfig, PRESETS, preset


def _flat(tree) -> list[tuple[tuple[str, ...], tuple[int, ...]]]:
    out = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        out.append((tuple(str(getattr(k, "key", k)) for k in path), tuple(leaf.shape)))
    return out


def _category(path: tuple[str, ...]) -> str:
    if path[0] == "router_bias":
        return "router_bias"
    name = path[1:]
    if name == ("embed",):
        return "embedding"
    if name == ("lm_head",):
        return "head"
    if "attn" in name:
        return "norms" if name[-2].endswith("norm") else "attention"
    if "experts" in name:
        return "routed_experts"
    if "shared" in name:
        return "shared_experts"
    if "router" in name:
        return "router"
    if "mlp" in name:
        return "dense_ffn"
    if "eh_proj" in name:
        return "mtp_projection"
    return "norms"


def count_params(cfg: ModelConfig) -> dict:
    """Exact counts from `dsv3_jax.model.abstract_variables(cfg)` shapes (see module doc)."""
    from dsv3_jax.model import abstract_variables

    variables = abstract_variables(cfg)
    main: dict[str, int] = {}
    mtp_total = mtp_act = main_act = 0
    for path, shape in _flat(variables):
        n = math.prod(shape)
        cat = _category(path)
        act = n
        if cat == "routed_experts":
            if n % cfg.n_routed_experts:
                raise AssertionError(f"{path}: {shape} not divisible by the expert count")
            act = n // cfg.n_routed_experts * cfg.num_experts_per_tok
        if path[1].startswith("mtp_"):
            mtp_total += n
            mtp_act += act
        else:
            main[cat] = main.get(cat, 0) + n
            main_act += act
    total = sum(main.values())
    shared = cfg.num_nextn_predict_layers * 2 * cfg.vocab_size * cfg.hidden_size
    bias = sum(math.prod(s) for p, s in _flat(variables) if p[0] == "router_bias")
    return {
        "total": total,
        "activated": main_act,
        "mtp": mtp_total,
        "mtp_activated": mtp_act,
        "total_with_mtp": total + mtp_total,
        "as_released": total + mtp_total + shared,
        "router_bias": bias,
        "breakdown": dict(sorted(main.items())),
    }


def _fmt(n: int) -> str:
    return f"{n:>19,}  ({n / 1e9:8.3f} B)"


@errors.cli
def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m dsv3_jax.params",
                                description="Parameter counts of a preset (no memory allocated).")
    p.add_argument("--preset", default="deepseek_v3_671b", choices=sorted(PRESETS))
    p.add_argument("--json", action="store_true", help="print one JSON object")
    args = p.parse_args(argv)
    counts = count_params(preset(args.preset))
    if args.json:
        print(json.dumps({"preset": args.preset, **counts}, indent=2))
        return 0
    print(f"preset {args.preset}")
    for k in ("total", "activated", "mtp", "mtp_activated", "total_with_mtp", "as_released",
              "router_bias"):
        print(f"  {k:<16}{_fmt(counts[k])}")
    print("  main model by component:")
    for k, v in counts["breakdown"].items():
        print(f"    {k:<16}{_fmt(v)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
