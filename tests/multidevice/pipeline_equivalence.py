"""Run in its own process with 8 fake CPU devices (XLA_FLAGS set by the caller).

Three train steps through the pipeline executor must give the losses, gradient norms, gradient
leaves and router biases of the single-device run (one micro-batch of all rows, no pipeline)
within 1e-5 relative: a small config with MTP on, 16 MoE layers (so that DualPipeV on 8 ranks
has its 16 stages) and every schedule on the meshes of the issue. Prints one JSON line per case;
exits 1 on failure.

  python tests/multidevice/pipeline_equivalence.py quick|all|fp8|uneven|modes|composed|tensor
  python tests/multidevice/pipeline_equivalence.py cases dualpipev@8 dualpipe@8
"""
import json
import sys

import jax
import numpy as np

from dsv3_jax import sharding, train, train_config, train_state
from dsv3_jax.pipeline import SCHEDULES, executor
from experiments.configs import tiny

ROWS, SEQ = 16, 32
MESHES = [dict(pipeline=2, expert=2, data=2), dict(pipeline=4, data=2), dict(pipeline=8)]
# tensor beside the pipeline, in every mode (branched, recompute, split_w) somewhere
TENSOR = [("dualpipev", dict(pipeline=2, tensor=2, expert=2), (True, False, True)),
          ("zb1p", dict(pipeline=2, tensor=2, data=2), (True, True, True)),
          ("dualpipe", dict(pipeline=2, tensor=2, expert=2), (False, True, False)),
          ("1f1b", dict(pipeline=2, tensor=2, data=2), (True, False, False)),
          ("gpipe", dict(pipeline=4, tensor=2), (True, True, False))]
LEAVES = [("moe_layers", "block", "moe", "experts", "gate"), ("embed",), ("lm_head",),
          ("moe_layers", "block", "attn", "q_b", "kernel"), ("mtp_0", "block", "moe", "router"),
          ("dense_layers", "block", "mlp", "up", "kernel")]


def config(fp8=False, moe_layers=16, ce_chunk=None):
    c = tiny.get_config()
    c.model.update(dict(num_hidden_layers=1 + moe_layers, hidden_size=32, intermediate_size=64,
                        moe_intermediate_size=16, q_lora_rank=16, kv_lora_rank=16,
                        num_attention_heads=2, num_key_value_heads=2, qk_nope_head_dim=16, qk_rope_head_dim=8,
                        v_head_dim=16, n_routed_experts=8, n_group=4, topk_group=2,
                        num_experts_per_tok=2, num_nextn_predict_layers=1))
    if fp8:   # each split width whole FP8 tiles with tensor=2 (tp.problems): 8 heads x 16
        c.model.update(dict(fp8=True, dtype="bfloat16", hidden_size=128, intermediate_size=256,
                            moe_intermediate_size=256, q_lora_rank=128, kv_lora_rank=128,
                            num_attention_heads=16, num_key_value_heads=16,
                            qk_rope_head_dim=16))
    c.data.update(dict(seq_len=SEQ, global_batch=ROWS))
    c.optim.warmup_steps = 1
    if ce_chunk is not None:
        c.train.ce_chunk = ce_chunk
    c.balance.gamma = 0.01          # visible bias moves
    return c


def batches(n, micro):
    rng = np.random.default_rng(0)
    out = []
    for _ in range(n):
        ids = rng.integers(2, 8192, (ROWS, SEQ + 1)).astype(np.int32)
        cut = rng.integers(8, SEQ, ROWS)[:, None]
        seg = np.where(np.arange(SEQ)[None] < cut, 1, 2).astype(np.int32)
        b = {"inputs": ids[:, :-1], "targets": ids[:, 1:],
             "positions": np.tile(np.arange(SEQ, dtype=np.int32), (ROWS, 1)),
             "segment_ids": seg, "loss_mask": np.ones((ROWS, SEQ), np.float32)}
        out.append({k: v.reshape((micro, ROWS // micro) + v.shape[1:]) for k, v in b.items()})
    return out


def leaf(tree, path):
    for k in path:
        tree = tree[k]
    return np.asarray(tree)


def run(c, mesh_sizes=None, schedule=None, micro=1, branched=True, recompute=True,
        split_w=False):
    cfg = train_config.validate(c)
    fns = train.make_step_fns(c, cfg)
    init = lambda: train_state.init_state(cfg, fns.optimizer, 0, ema=False)
    data = batches(3, micro)
    if mesh_sizes is None:
        state, step = jax.jit(init)(), jax.jit(lambda s, b: train.train_step(s, b, fns))
        grad_fn = jax.jit(lambda s, b: jax.grad(fns.objective.loss, has_aux=True)(
            s["params"], s["router_bias"], jax.tree.map(lambda x: x[0], b), s["step"])[0])
        ctx = None
    else:
        shape = sharding.resolve_mesh_shape(mesh_sizes, jax.device_count())
        sharding.validate_mesh(shape, cfg, ROWS // micro)
        fns = train.dataclasses.replace(fns, pipeline=(schedule, shape["pipeline"], branched,
                                                       recompute, split_w))
        mesh = sharding.make_mesh(shape)
        specs = train_state.state_specs(jax.eval_shape(init), cfg, fns.optimizer, shape)
        shard = sharding.named(mesh, specs)
        micro_sh = jax.sharding.NamedSharding(mesh, sharding.batch_spec(3, lead=1))
        data = [jax.device_put(b, micro_sh) for b in data]
        ctx = jax.set_mesh(mesh)
        ctx.__enter__()
        state = jax.jit(init, out_shardings=shard)()
        step = jax.jit(lambda s, b: train.train_step(s, b, fns), in_shardings=(shard, micro_sh),
                       out_shardings=(shard, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())),
                       donate_argnums=0)
        grad_fn = jax.jit(lambda s, b: executor.step_value_and_grad(
            fns.objective, schedule, shape["pipeline"], s["params"], s["router_bias"], b,
            s["step"], branched=branched, recompute=recompute, split_w=split_w)[1],
            in_shardings=(shard, micro_sh))
    grads = [leaf(grad_fn(state, data[0]), p) for p in LEAVES]
    losses, norms = [], []
    for b in data:
        state, m = step(state, b)
        losses.append(float(m["loss"]))
        norms.append(float(m["grad_norm"]))
    out = {"losses": losses, "grad_norms": norms, "grads": grads,
           "bias": [np.asarray(x) for x in jax.tree.leaves(state["router_bias"])],
           "ce": float(m["ce"]), "mtp_ce": float(m["mtp_ce"])}
    if ctx is not None:
        ctx.__exit__(None, None, None)
    return out


def close(a, b, rtol=1e-5):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return bool(np.abs(a - b).max() <= rtol * max(np.abs(b).max(), 1e-6))


def main():
    assert jax.device_count() == 8, jax.device_count()
    which = sys.argv[1] if len(sys.argv) > 1 else "quick"
    fp8 = which == "fp8"
    if which == "all":
        cases = [(s, m) for m in MESHES for s in SCHEDULES]
    elif which == "fp8":
        cases = [("dualpipe", MESHES[0]), ("dualpipe", dict(pipeline=2, tensor=2, data=2))]
    elif which == "uneven":   # 3 MoE layers over the 4 stages of DualPipeV on 2 ranks: padded
        cases = [("dualpipev", MESHES[0]), ("1f1b", MESHES[0])]
    elif which == "modes":   # the other modes (default: branched, stage recompute, W with B)
        cases = [(s, MESHES[0], mode) for s in ("1f1b", "dualpipev")
                 for mode in ((True, False, False), (False, True, False), (False, False, False))]
        cases += [(s, MESHES[0], mode) for s in ("zb1p", "dualpipev")
                  for mode in ((True, True, True), (True, False, True), (False, True, True))]
        # W apart on (pipeline 4, data 2): the routed experts' store per data shard, no
        # expert shards (on (2, 2, 2) above: expert-parallel)
        cases += [(s, MESHES[1], (True, True, True)) for s in ("zb1p", "dualpipe")]
    elif which == "composed":   # fsdp beside the pipeline (its parameters gathered per step)
        cases = [("1f1b", dict(pipeline=2, fsdp=2, expert=2)),
                 ("dualpipev", dict(pipeline=2, fsdp=2, data=2))]
    elif which == "tensor":   # tensor beside the pipeline (manual inside: layers/tp.py)
        cases = TENSOR
    elif which == "cases":   # e.g. cases dualpipev@8 dualpipe@8: schedule on the mesh of that P
        by_pp = {m["pipeline"]: m for m in MESHES}
        cases = [(c.split("@")[0], by_pp[int(c.split("@")[1])]) for c in sys.argv[2:]]
    else:   # quick: the default mode, with expert and tensor parallelism inside the stages
        cases = [("dualpipev", dict(pipeline=2, tensor=2, expert=2))]
    # 16 MoE layers give DualPipeV on 8 ranks its 16 stages; the quick case (DualPipeV on 2
    # ranks: 4 stages) takes 4, one per stage
    moe_layers = {"uneven": 5, "quick": 4, "modes": 4, "composed": 4, "tensor": 4}.get(which, 16)
    # tensor: the full logits' CE (vocab-split logits, tp.vocab_lse); elsewhere head + CE fused
    ce_chunk = 0 if which == "tensor" else None
    c = config(fp8, moe_layers, ce_chunk)
    # FP8's 1x128 activation and 128x1 Wgrad tiles follow each micro-batch's rows, so with FP8
    # the reference accumulates over the same 4 micro-batches the pipeline runs (the others take
    # all rows as one micro-batch: the pipeline's accumulation must equal one big batch)
    ref = run(c, micro=2 * MESHES[0]["pipeline"] if fp8 else 1)
    rtol = 1e-3 if fp8 else 1e-5
    ok = True
    for schedule, sizes, *mode in cases:
        micro = 2 * sizes["pipeline"]          # the smallest count every schedule accepts
        branched, recompute, split_w = mode[0] if mode else (True, True, False)
        got = run(config(fp8, moe_layers, ce_chunk), sizes, schedule, micro, branched,
                  recompute, split_w)
        checks = {
            "losses": close(got["losses"], ref["losses"], rtol),
            # FP8: each device quantises its own rows' 1x128 tiles, so even a plain expert-
            # parallel mesh moves single gradient leaves by tens of percent against one device
            # (the MTP experts most) and the global norm by ~1% at this width; after the first
            # update the runs drift apart (the losses above stay within 1e-3). First step only.
            "grad_norm": (close(got["grad_norms"][:1], ref["grad_norms"][:1], 2e-2) if fp8 else
                          close(got["grad_norms"], ref["grad_norms"], rtol)),
            "grad_leaves": fp8 or all(close(g, r) for g, r in zip(got["grads"], ref["grads"])),
            "router_bias": fp8 or all(close(g, r) for g, r in zip(got["bias"], ref["bias"])),
        }
        ok &= all(checks.values())
        print(json.dumps({"schedule": schedule, "mesh": sizes, "microbatches": micro,
                          "branched": branched, "recompute": recompute, "split_w": split_w,
                          "losses": got["losses"], "grad_norms": got["grad_norms"],
                          "reference_grad_norms": ref["grad_norms"], **checks}), flush=True)
    print("reference losses", ref["losses"])
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
