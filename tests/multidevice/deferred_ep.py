"""Run in its own process with 8 fake CPU devices (XLA_FLAGS set by the caller).

The pipeline's split W with the routed experts expert-parallel: B (the MoE chunk with every
Linear's and the experts' weight gradients deferred) + W (`common.deferred_weight_grads`, the
experts' through `moe_ep.expert_parallel_wgrad`: each device's received rows, summed over the
devices holding the same experts) equals the one-pass VJP under the same mesh, on fresh random
inputs, within 1e-5: for the all-to-all's usual capacity branch (W computes the experts' dW),
the worst-case branch (B keeps them, W's store is empty), a capacity that needs no branch, and
the FP8 recipe.
Prints one JSON line per case; exits 1 on failure.

  python tests/multidevice/deferred_ep.py [quick|all]   # quick: the first two cases
"""
import json
import os
import sys

import jax
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
import test_deferred_wgrad as tdw   # noqa: E402  (tests/test_deferred_wgrad.py)

from dsv3_jax import config as config_lib   # noqa: E402
from dsv3_jax import sharding   # noqa: E402

BASE = dict(hidden_size=64, intermediate_size=128, moe_intermediate_size=32, q_lora_rank=32,
            kv_lora_rank=32, num_attention_heads=2, num_key_value_heads=2, qk_nope_head_dim=16,
            qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=8, n_group=4, topk_group=2,
            num_experts_per_tok=2, moe_impl="sorted")


FP8 = dict(fp8=True, dtype="bfloat16", hidden_size=128, q_lora_rank=128, kv_lora_rank=128,
           moe_intermediate_size=128, intermediate_size=256)


def case(mesh_sizes, capacity_factor, want_branch, seed, **kw):
    cfg = config_lib.tiny(**dict(BASE, moe_ep_capacity_factor=capacity_factor, **kw))
    mesh = sharding.make_mesh(sharding.resolve_mesh_shape(mesh_sizes, jax.device_count()))
    with jax.set_mesh(mesh):
        params, x, full, b_op, w_op, cols = tdw._split_and_full(cfg, seed=seed)
        ref_p, ref_x = full(params, x)
        dp, dx, inputs, dtaps = b_op(params, x)
        dw = w_op(params, inputs, dtaps)
    used = sum(int(np.asarray(leaf).sum()) for path, leaf in
               jax.tree_util.tree_flatten_with_path(inputs)[0]
               if jax.tree_util.keystr(path).endswith("['experts']['used']"))
    branch = "usual" if used > 0 else "worst case"
    errs = {"dx": tdw._rel(dx, ref_x)}
    for (path, b), w, r in zip(jax.tree_util.tree_flatten_with_path(dp)[0],
                               jax.tree.leaves(dw), jax.tree.leaves(ref_p)):
        errs[jax.tree_util.keystr(path)] = tdw._rel(
            np.asarray(b, np.float64) + np.asarray(w, np.float64), r)
    experts_in_w = max(float(np.abs(np.asarray(w)).max()) for (path, _), w in zip(
        jax.tree_util.tree_flatten_with_path(dp)[0], jax.tree.leaves(dw))
        if "experts" in jax.tree_util.keystr(path))
    ok = (max(errs.values()) <= 1e-5 and branch == want_branch
          and (experts_in_w > 0) == (branch == "usual"))
    print(json.dumps({"mesh": mesh_sizes, "capacity_factor": capacity_factor,
                      "fp8": cfg.fp8, "branch": branch,
                      "experts_dw_in_W": experts_in_w > 0, "max_rel_err": max(errs.values()),
                      "worst": max(errs, key=errs.get), "ok": ok}), flush=True)
    return ok


def main():
    assert jax.device_count() == 8, jax.device_count()
    which = sys.argv[1] if len(sys.argv) > 1 else "quick"
    ok = True
    ok &= case(dict(data=2, expert=4), 2.0, "usual", 0)
    ok &= case(dict(data=2, expert=4), 0.1, "worst case", 1)       # capacity 8 < what is sent
    if which == "all":
        ok &= case(dict(data=4, expert=2), 8.0, "usual", 2)        # capacity = all slots
        # FP8 (E4M3 dispatch, the experts' FP8 GEMMs with their activation caching): W
        # through each GEMM's own VJP (moe.fp8_experts_wgrad)
        ok &= case(dict(data=2, expert=4), 2.0, "usual", 3, **FP8)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
