"""Planning: per-device memory and FLOPs of a config on a mesh, from abstract shapes only.

  python -m dsv3_jax.plan --config experiments/configs/deepseek_v3.py \
      --mesh pipeline=16,expert=64,data=-1 --devices 2048

Parameters, gradients and optimizer state come from `jax.eval_shape` of the real train state and
the real sharding rules (sharding.RULES, ZeRO-1 for the moments); dims that do not split evenly
count their largest shard. Activations are estimated per token and layer from the tensors this
implementation keeps for the backward pass under the remat policy, times the tokens a device
holds in flight: with a pipeline, the schedule's peak stage activations in flight on the
busiest rank (dsv3_jax/pipeline/simulate.py) times the MoE layers per stage (`pipeline_plan`).
"""
from __future__ import annotations

import argparse
import json
import math

import jax
import numpy as np

from dsv3_jax import errors, sharding, train_config
from dsv3_jax import train_state as ts
from dsv3_jax.config import ModelConfig
from dsv3_jax.errors import UserError
from dsv3_jax.layers import attention, tp

GB = 1024 ** 3


def _bytes(leaf, spec, mesh_shape) -> int:
    return math.prod(sharding.local_shape(leaf.shape, spec, mesh_shape)) * leaf.dtype.itemsize


def state_memory(c, cfg: ModelConfig, mesh_shape) -> dict:
    """Bytes per device of params, gradients and optimizer state.

    Gradients take the parameters' layout, except where the pipeline executor gathers a leaf
    for the step (with pipeline > 1: the non-MoE parameters over `pipeline`, everything over
    `fsdp`; `train_state.params_specs(..., gathered=True)`): there the step holds the gathered
    copy (`gathered`) and a gradient of the gathered size."""
    from jax.sharding import PartitionSpec as P
    cfg = cfg.replace(fp8=False)     # same shapes; init need not trace the FP8 path
    optimizer, _ = ts.make_optimizer(c)
    abstract = jax.eval_shape(lambda: ts.init_state(cfg, optimizer, 0, ema=False))
    specs = ts.state_specs(abstract, cfg, optimizer, mesh_shape, uneven=True)
    is_spec = lambda x: isinstance(x, P)
    total = lambda tree, spec: sum(_bytes(l, s, mesh_shape) for l, s in zip(
        jax.tree.leaves(tree), jax.tree.leaves(spec, is_leaf=is_spec)))
    params = total(abstract["params"], specs["params"])
    moe = (total(abstract["params"]["moe_layers"], specs["params"]["moe_layers"])
           if "moe_layers" in abstract["params"] else 0)
    grads, gathered, moe_step = params, 0, moe
    if mesh_shape["pipeline"] > 1:
        step_specs = ts.params_specs(cfg, abstract["params"], dict(mesh_shape, fsdp=1),
                                     uneven=True, gathered=True)
        grads = 0
        for leaf, rest, step in zip(jax.tree.leaves(abstract["params"]),
                                    jax.tree.leaves(specs["params"], is_leaf=is_spec),
                                    jax.tree.leaves(step_specs, is_leaf=is_spec)):
            size = _bytes(leaf, step, mesh_shape)
            gathered += size if step != rest else 0
            grads += size
        moe_step = total(abstract["params"].get("moe_layers", {}), step_specs.get("moe_layers", {}))
    return {"params": params, "grads": grads, "gathered": gathered, "moe_params": moe,
            "moe_step": moe_step,
            "optimizer": total(abstract["opt_state"], specs["opt_state"]),
            "param_count": sum(l.size for l in jax.tree.leaves(abstract["params"]))}


def _moe_buffer_rows(cfg: ModelConfig, tokens: int) -> tuple[int, int]:
    """(rows M, tile_m) of the routed experts' tile-padded buffer for `tokens` tokens
    (moe.plan_dispatch's static bound: ceil(N P / tile_m) + E tiles, at most N P)."""
    from dsv3_jax.layers import moe
    slots, e = tokens * cfg.num_experts_per_tok, cfg.n_routed_experts
    tile_m = moe.tile_m_for(cfg, slots, e)
    return min(-(-slots // tile_m) + e, slots) * tile_m, tile_m


def activation_bytes_per_token_layer(cfg: ModelConfig, remat: str, seq_len: int,
                                     tokens: int | None = None) -> dict:
    """Bytes this implementation saves for the backward pass per token and MoE layer, term by
    term from the code (tests/test_remat.py checks each policy against
    jax.ad_checkpoint's saved residuals of the real scanned stack, BF16 and FP8).

    `tokens`: the tokens of one micro-batch on a device (default seq_len), which set the MoE
    buffer's tile padding. Single-device dispatch: expert parallelism's all_to_all buffers are
    not modelled. b = compute dtype bytes, r_m = MoE buffer rows per token (top-k plus padding).

      full       d b: the block input (the scan's carry); everything else is recomputed.
      selective  (layers/block.py SELECTIVE_SAVED) d b input + d b block_mid + (q + c + r) b
                 down-projection outputs + h v b attention output + attention's own residual
                 (reference: the masked float32 scores, 4 h S; flash: the float32 lse, 4 h)
                 + 2 fs b shared gate, up + 4 e affinities + 8 p experts, gates + 4 (r_m + p)
                 dispatch maps + r_m d b routed output rows + the routed gate|up rows: 2 f b,
                 or with FP8 caching (cfg.fp8_cache_activations) 2 c8(f), c8(n) = n' (1 + 4/128)
                 the E4M3 tiles and float32 scales of n values padded to n' (a multiple of 128).
      none       plain autodiff: the above without block_mid and the down-projection outputs,
                 plus three float32 copies per RMSNorm (x, 2x, x rsqrt), each Linear's input
                 (q_a and kv_a each keep the attention norm's output, the shared gate and up the
                 FFN norm's; with FP8 caching c8 of each, except the attention output
                 projection's, which stays h v b), q, k, v, the softmax's float32 probabilities
                 and their compute-dtype cast, silu's intermediates, the router's float32 input,
                 and per routed row the permuted input and the output (FP8 caching: c8(d) for
                 the input, 2 c8(f) for the SwiGLU inputs, d b for the output).
    `weights_per_layer`: weight-shaped residuals (bf16 casts or FP8 blocks of the weights),
    saved only by remat="none"; the selective policy recomputes them from the weights.
    """
    from dsv3_jax.layers.common import acc_dtype
    b = np.dtype(cfg.dtype).itemsize
    a = np.dtype(acc_dtype(cfg)).itemsize                     # norms, softmax, gating
    tokens = tokens or seq_len
    d, h = cfg.hidden_size, cfg.num_attention_heads
    k, r, v, c = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank
    q = cfg.q_lora_rank or 0
    p, f, e = cfg.num_experts_per_tok, cfg.moe_intermediate_size, cfg.n_routed_experts
    fs = cfg.n_shared_experts * f
    rows, tile_m = _moe_buffer_rows(cfg, tokens)
    r_m = rows / tokens
    impl = attention.resolve(cfg.train_attention, seq_len, "gpu")
    if impl == "reference":
        attn_own, pad = a * h * seq_len, 1.0                  # masked scores
    else:   # flash (blockwise; pallas assumed alike): out (below) and the lse, [B,H,Tp]
        bq = min(cfg.attn_block_size, -(-seq_len // 8) * 8)
        pad = -(-seq_len // bq) * bq / seq_len
        attn_own = a * h * pad
    route = a * e + 2 * 4 * p + 4 * (r_m + p) + 4 * (rows // tile_m + 1) / tokens
    fp8_cache = cfg.fp8 and cfg.fp8_cache_activations
    pad128 = lambda n: -(-n // 128) * 128
    c8 = lambda n: pad128(n) * (1 + 4 / 128)       # an FP8 cache: E4M3 tiles + float32 scales
    routed = r_m * ((2 * c8(f) if fp8_cache else 2 * f * b) + d * b)
    selective = (2 * d + q + c + r + h * v * pad + 2 * fs) * b + attn_own + route + routed
    up = int(a > b)   # the float32 upcasts exist (and are kept) only below float32
    norms = (2 + up) * a * (2 * d + q + c) + 2 * a * (3 if q else 2)  # x, 2x, x*rsqrt; rsqrt
    cached = (4 * d + q + c + fs) if q else (3 * d + c + fs)     # o_proj's input: h v b
    linear_in = h * v * b + (sum(c8(n) for n in ([d] * (4 if q else 3) + [q] * bool(q)
                                                  + [c, fs])) if fp8_cache else cached * b)
    if impl == "reference":
        # exp and the probabilities (float32, and their compute-dtype cast below float32);
        # the mask depends on the segment ids only: the scan keeps it once, not per layer
        attn = (2 * h * (k + r) + h * v) * b + h * seq_len * (a + b) + 2 * a * h
    else:
        attn = (2 * h * (k + r) + 2 * h * v) * b * pad + a * h * pad
    ffn = 5 * fs * b + a * (up * d + 2 * e + 2 * p + 5) + 2 * 4 * p + 4 * (r_m + p)
    if fp8_cache:   # x once for gate | up, the SwiGLU inputs, the output rows (bf16)
        ffn += r_m * (c8(d) + 2 * c8(f) + d * b)
    else:
        ffn += r_m * ((2 * d + 6 * f) if cfg.fp8 else (2 * d + 2 * f)) * b
    none = d * b + norms + linear_in + attn + ffn
    out = {"none": none, "selective": selective, "full": d * b}
    dense = ((d * q + q * h * (k + r)) if q else d * h * (k + r)) + d * (c + r) + c * h * (k + v) \
        + h * v * d + 3 * d * fs
    if cfg.fp8:   # FP8 blocks (1 byte, padded to 128) of every Linear and expert weight
        shapes = ([(d, q), (q, h * (k + r))] if q else [(d, h * (k + r))]) + [
            (d, c + r), (c, h * (k + v)), (h * v, d), (d, fs), (d, fs), (fs, d)]
        weights = sum(pad128(x) * pad128(y) for x, y in shapes) + e * 3 * pad128(d) * pad128(f)
    else:         # compute-dtype casts of the dense Linears (the expert loop reads the weights)
        weights = dense * b
    return {"per_token_layer": int(round(out[remat])),
            "weights_per_layer": weights if remat == "none" else 0,
            "attention_scores": (attn_own if remat == "selective" else
                                 attn if remat == "none" else 0),
            "attention": "T^2 scores" if impl == "reference" else f"{impl}: out, lse"}


def plan(c, mesh_sizes: dict, devices: int) -> dict:
    model_cfg = train_config.model_config(c)                 # the activations: as trained
    cfg = model_cfg.replace(fp8=False)                       # the state: FP8 changes no shape
    mesh_shape = sharding.resolve_mesh_shape(mesh_sizes, devices)
    mem = state_memory(c, cfg, mesh_shape)
    batch_ways = math.prod(mesh_shape[a] for a in sharding.BATCH_AXES)
    micro = c.data.micro_batch or c.data.global_batch
    rows_per_device = -(-micro // batch_ways)   # the largest shard when rows do not split
    # with tensor > 1 a device keeps its slice of the heads and FFN widths' activations (the
    # residual stream whole): the formulas at the local widths
    try:
        local_cfg = tp.local_config(model_cfg, mesh_shape["tensor"], fp8_tiles=False)
    except ValueError as e:
        raise sharding.MeshError(f"mesh.tensor={mesh_shape['tensor']}: {e}") from None
    act = activation_bytes_per_token_layer(local_cfg, cfg.remat, c.data.seq_len,
                                           tokens=rows_per_device * c.data.seq_len)
    pp = mesh_shape["pipeline"]
    pipe = None
    if pp > 1:
        pipe = pipeline_plan(c, cfg, pp, rows_per_device, act["per_token_layer"],
                             expert_shards=mesh_shape["expert"], tensor=mesh_shape["tensor"])
        in_flight, layers_per_device = pipe["in_flight_tokens_layers"], pipe["layers_per_device"]
        tokens_in_flight = rows_per_device * c.data.seq_len * pipe["peak_in_flight_stages"]
        activations = act["per_token_layer"] * in_flight
    else:
        tokens_in_flight = rows_per_device * c.data.seq_len
        layers_per_device = cfg.num_hidden_layers
        activations = act["per_token_layer"] * tokens_in_flight * layers_per_device
    activations += act["weights_per_layer"] * layers_per_device   # remat="none" only
    tokens_per_step = c.data.global_batch * c.data.seq_len
    # the executor's stage-ordered MoE stack (pipeline_plan): its params, and its gradient
    # beyond the at-rest size counted in "gradients"; at the step's (fsdp-gathered) layout
    slots = pipe["stage_layer_slots"] if pipe else 0
    stacked = slots * mem["moe_step"] / -(-cfg.num_moe_layers // mesh_shape["pipeline"])
    stage_copies = stacked + max(stacked - mem["moe_step"], 0) if slots else 0
    flops_token = ts.model_flops_per_token(cfg, c.data.seq_len)
    flops_step = flops_token * tokens_per_step
    return {
        "mesh": {k: v for k, v in mesh_shape.items()}, "devices": devices,
        "model_params": mem["param_count"],
        "per_device_GiB": {
            "params (f32 master)": mem["params"] / GB,
            "gradients (f32)": mem["grads"] / GB,
            **({"params gathered for the step (pipeline)": mem["gathered"] / GB}
               if mem["gathered"] else {}),
            f"optimizer ({c.optim.moments_dtype} moments, ZeRO-1)": mem["optimizer"] / GB,
            f"activations (remat={cfg.remat})": activations / GB,
            f"  of which attention ({act['attention']})": (
                act["attention_scores"] * activations / max(act["per_token_layer"], 1)) / GB,
            **({f"MoE stack by stage ({slots} layer slots)":
                stage_copies / GB} if stage_copies else {}),
        },
        "total_per_device_GiB": (mem["params"] + mem["grads"] + mem["gathered"]
                                 + mem["optimizer"] + activations + stage_copies) / GB,
        "activation_assumptions": {"micro_batch_rows": micro, "rows_per_device": rows_per_device,
                                   "micro_batches_in_flight": (pipe["peak_in_flight_stages"]
                                                               if pipe else 1),
                                   "layers_per_device": layers_per_device,
                                   "bytes_per_token_layer": act["per_token_layer"]},
        "pipeline": pipe,
        "flops": {"per_token_fwd_bwd": flops_token, "per_step": flops_step,
                  "per_device_per_step": flops_step / devices,
                  "tokens_per_step": tokens_per_step},
    }


def deferred_w_bytes_per_layer(cfg: ModelConfig, rows: int, seq_len: int,
                               expert_shards: int = 1) -> int:
    """Bytes one MoE layer's split-W store holds per micro-batch of rows x seq_len per device
    (pipeline.split_w): the input and output gradient of every deferred GEMM
    (`common.deferred_weight_grads`), from `jax.eval_shape` of the layer with its weight
    gradients deferred (the routed experts' too, except under FP8 without its activation
    caching). With expert parallelism (expert_shards > 1) a device stores its received rows
    instead (moe_ep.ep_store_rows: the all-to-all's usual capacity over its E / expert_shards
    experts): x, gu, dgu, dy and the tile layout."""
    from dsv3_jax import model
    from dsv3_jax.layers import moe, moe_ep
    cols = model.wgrad_store_shapes(cfg, *_abstract_chunk(cfg, 1, rows, seq_len))
    total, experts = 0, False
    for path, leaf in jax.tree_util.tree_flatten_with_path(cols)[0]:
        if expert_shards > 1 and "'experts'" in jax.tree_util.keystr(path):
            experts = True
            continue
        total += _nbytes([leaf])
    if experts:
        m, tile_m = moe_ep.ep_store_rows(cfg, rows * seq_len * cfg.num_experts_per_tok,
                                         expert_shards)
        width = 2 * cfg.hidden_size + 2 * moe.gate_up_width(cfg)   # x, dy; gu, dgu
        total += m * width * np.dtype(cfg.dtype).itemsize + 4 * (m // tile_m + 1)
    return int(total)


def kept_residual_bytes(cfg: ModelConfig, layers: int, rows: int, seq_len: int,
                        deferred: bool = False) -> int:
    """Bytes of what the VJP of `layers` MoE layers keeps per micro-batch of rows x seq_len
    (`model.chunk_residual_shapes`, cfg.remat's policy; without expert parallelism's capacity
    buffers): a kept stage's residuals in the pipeline executor (pipeline.recompute=False);
    `deferred` (pipeline.split_w): with the Linears' inputs that F hands to B for W."""
    from dsv3_jax import model
    return _nbytes(model.chunk_residual_shapes(
        cfg, *_abstract_chunk(cfg, layers, rows, seq_len), deferred))


def _abstract_chunk(cfg: ModelConfig, layers: int, rows: int, seq_len: int) -> tuple:
    """(variables, x, positions, segment_ids) of `layers` MoE layers as shapes, for the
    eval_shape counts above (nothing is allocated at the 671B shapes)."""
    from dsv3_jax import model
    x = jax.ShapeDtypeStruct((rows, seq_len, cfg.hidden_size), np.dtype(cfg.dtype))
    ids = jax.ShapeDtypeStruct((rows, seq_len), np.int32)
    variables = jax.eval_shape(model._MoEChunk(cfg, layers).init, jax.random.key(0), x, ids, ids)
    return variables, x, ids, ids


def _nbytes(leaves) -> int:
    return int(sum(math.prod(a.shape) * np.dtype(a.dtype).itemsize for a in leaves))


def pipeline_plan(c, cfg: ModelConfig, pp: int, rows: int, bytes_token_layer: int,
                  expert_shards: int = 1, tensor: int = 1) -> dict:
    """Stages, layers and activations in flight per device for c.pipeline.schedule on pp ranks.

    The schedule's activation memory (what an MPMD runtime keeping every layer's residuals
    holds): the rank with the most stage chunks in flight (simulate.peak_inflight) x the MoE
    layers per chunk x the tokens of a micro-batch. `executor_GiB` is what the executor here
    keeps between ops, per buffer (`executor_buffers_GiB`, rows from `Plan.n_rows` + a scratch
    row each): stage inputs and output gradients (a micro-batch's activation per row); with
    recompute (c.pipeline.recompute, the default) one stage's residuals while its backward
    runs, with recompute=False every in-flight stage's kept VJP: the MoE chunk's residuals
    from `jax.eval_shape` (`kept_residual_bytes`) plus the recomputed front's and tail's
    inputs, and the front's or tail's residuals while B recomputes them; with a split W
    (c.pipeline.split_w), the store of the deferred GEMMs' inputs and output gradients
    (`deferred_w_bytes_per_layer`). tests/test_pipeline_executor.py checks these against the
    buffers the executor traces."""
    from dsv3_jax.pipeline import executor, schedules, simulate
    m = max(1, (c.data.global_batch // (c.data.micro_batch or c.data.global_batch)))
    note = ""
    try:
        sched = schedules.make(c.pipeline.schedule, pp, m)   # the schedule's own (1F1B: standard)
    except schedules.ScheduleError as e:   # plan anyway, at the fewest micro-batches it takes
        note = f"{e}: planned at {2 * pp} micro-batches (the run itself would stop with this error)"
        m = 2 * pp
        sched = schedules.make(c.pipeline.schedule, pp, m)
    counts = executor.stage_layers(cfg.num_moe_layers, sched.n_stages, *executor.layer_costs(cfg))
    per_chunk = max(counts)
    peak = simulate.peak_inflight(sched)
    tokens = rows * c.data.seq_len
    dense_mtp = cfg.num_dense_layers + cfg.num_nextn_predict_layers
    layers_dev = per_chunk * sched.chunks * sched.param_copies // max(sched.param_copies, 1)
    # per rank: its peak stage activations in flight x the mean layers of the stages it holds
    # (the first stage's dense layers and the last stage's MTP modules included)
    extra = lambda st: (cfg.num_dense_layers if st == 0 else 0) + (
        cfg.num_nextn_predict_layers if st == sched.n_stages - 1 else 0)
    in_flight = max(peak[r] * float(np.mean([counts[st] + extra(st) for st in stages]))
                    for r, stages in enumerate(sched.placement))
    recompute = c.pipeline.recompute
    run = executor.build(sched.name, pp, m, cfg.num_moe_layers, executor.layer_costs(cfg),
                         c.pipeline.split_w, not recompute)[1]   # what the executor runs
    n_rows = {k: v + 1 for k, v in run.n_rows.items()}   # + the scratch row
    # as trained (FP8 caching included), at a device's widths with tensor beside the pipeline
    model_cfg = tp.local_config(train_config.model_config(c), tensor, fp8_tiles=False)
    x_bytes = tokens * cfg.hidden_size * np.dtype(cfg.dtype).itemsize
    front_tail = dense_mtp * tokens * bytes_token_layer  # one stage's extras, while B runs
    buffers = {"act": n_rows["act"] * x_bytes, "grad": n_rows["grad"] * x_bytes}
    row = 0
    if recompute:   # B re-runs one stage's whole forward: its residuals, transiently
        buffers["res"] = (per_chunk * tokens * bytes_token_layer) + front_tail
    else:   # per row: the chunk's VJP + the front's input x and the tail's input y
        row = kept_residual_bytes(model_cfg, per_chunk, rows, c.data.seq_len,
                                  run.split_w) + 2 * x_bytes
        buffers["res"] = n_rows["res"] * row + front_tail
    store = 0
    if run.split_w:
        store = n_rows["store"] * per_chunk * deferred_w_bytes_per_layer(
            model_cfg, rows, c.data.seq_len, expert_shards)
        buffers["store"] = store
    exec_bytes = sum(buffers.values())
    return {"schedule": sched.name, "ranks": pp, "microbatches": m, "stages": sched.n_stages,
            "moe_layers_per_stage": counts, "padded_layer_slots": per_chunk * sched.n_stages
            - cfg.num_moe_layers, "layers_per_device": layers_dev + dense_mtp,
            "param_copies": sched.param_copies, "peak_in_flight_stages": max(peak),
            "stage_layer_slots": 0 if run.in_layer_order else run.layer_slots,
            "in_flight_tokens_layers": int(in_flight * tokens),
            "executor_rows": dict(run.n_rows), "executor_slots": run.n_rows["act"],
            "executor_GiB": exec_bytes / GB,
            "executor_buffers_GiB": {k: v / GB for k, v in buffers.items()},
            "kept_residual_row_bytes": row,
            "split_w_store_GiB": store / GB, "split_w_slots": run.n_rows["store"],
            "bubble_fraction_mpmd": simulate.simulate(sched).bubble_fraction, "note": note}


@errors.cli
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", required=True, help="experiment config file (get_config)")
    ap.add_argument("--config-arg", default=None, help="get_config argument, e.g. quick")
    ap.add_argument("--mesh", default="", help="e.g. expert=64,pipeline=16,data=-1")
    ap.add_argument("--devices", type=int, default=None, help="device count (default: mesh product)")
    ap.add_argument("--schedule", default=None, help="pipeline schedule (default: the config's "
                    "pipeline.schedule): gpipe, 1f1b, zb1p, dualpipev, dualpipe")
    ap.add_argument("--split-w", action="store_true",
                    help="pipeline.split_w=True: the per-Linear W and its store")
    ap.add_argument("--keep-residuals", action="store_true",
                    help="pipeline.recompute=False: every in-flight stage's residuals kept")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    c = train_config.load(args.config, args.config_arg)
    if args.schedule:
        c.pipeline.schedule = args.schedule
    c.pipeline.split_w = c.pipeline.split_w or args.split_w
    c.pipeline.recompute = c.pipeline.recompute and not args.keep_residuals
    sizes = dict(c.mesh.to_dict())
    if args.mesh:   # --mesh names the whole mesh: axes it leaves out are 1
        sizes = dict.fromkeys(sharding.AXES, 1)
        for part in args.mesh.split(","):
            key, _, value = part.partition("=")
            if key not in sharding.AXES or not value.lstrip("-").isdigit():
                raise UserError(f"--mesh: bad entry {part!r}; axes are {', '.join(sharding.AXES)}"
                                f" (e.g. --mesh pipeline=16,expert=64,data=-1)")
            sizes[key] = int(value)
    devices = args.devices or math.prod(v for v in sizes.values() if v > 0)
    result = plan(c, sizes, devices)
    if args.json:
        print(json.dumps(result, indent=1))
        return
    print(f"mesh {result['mesh']} on {devices} devices; model {result['model_params'] / 1e9:.2f}B "
          f"parameters (MTP included)")
    for k, v in result["per_device_GiB"].items():
        print(f"  {k:45s} {v:9.2f} GiB")
    print(f"  {'total per device':45s} {result['total_per_device_GiB']:9.2f} GiB")
    a = result["activation_assumptions"]
    print(f"  (activations: {a['rows_per_device']} row(s) per device per micro-batch, "
          f"{a['micro_batches_in_flight']} micro-batches in flight, {a['layers_per_device']} "
          f"layers per device, {a['bytes_per_token_layer']:,} bytes per token per layer)")
    pp = result["pipeline"]
    if pp:
        print(f"  pipeline {pp['schedule']}: {pp['ranks']} ranks, {pp['stages']} stages, "
              f"{pp['microbatches']} micro-batches; MoE layers per stage "
              f"{sorted(set(pp['moe_layers_per_stage']))} ({pp['padded_layer_slots']} padded "
              f"slots), {pp['param_copies']}x parameter copies, peak {pp['peak_in_flight_stages']}"
              f" stage activations in flight, MPMD bubble {pp['bubble_fraction_mpmd']:.1%}; "
              f"this executor keeps {pp['executor_GiB']:.2f} GiB ("
              + ", ".join(f"{k} {v:.2f} GiB" + (f" in {pp['executor_rows'][k]} rows"
                                                if pp['executor_rows'][k] else " (one stage)")
                          for k, v in pp["executor_buffers_GiB"].items()) + ")")
        if pp["note"]:
            print(f"  note: {pp['note']}")
    fl = result["flops"]
    print(f"FLOPs per step: {fl['per_step']:.3e} total ({fl['per_token_fwd_bwd']:.3e} per token x "
          f"{fl['tokens_per_step']:,} tokens), {fl['per_device_per_step']:.3e} per device")


if __name__ == "__main__":
    main()
