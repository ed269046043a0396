"""Mutation check of the test suite: plant one-line bugs, one at a time, and see the tests fail.

  python tests/mutations.py                  # every mutation; a table of killed / survived
  python tests/mutations.py -k ema,balance   # the mutations whose name contains a word
  python tests/mutations.py --baseline       # first check the selected tests pass unmutated

Each mutation is (name, file, exact old text, new text, tests that should kill it). It is applied
to a copy of the repository (dsv3_jax/, kernels_pallas/, tests/, experiments/, pytest.ini) in a
temporary directory; the named tests run there (`-x -q -m "not slow"`, PYTHONPATH = the copy) and
the mutation is killed when they fail. Exit status 1 when a mutation survives or its old text is
not found exactly once (the list must follow the code). The list is in README.md, "Mutation
testing". About 15 minutes on 2 CPU cores.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COPY = ["dsv3_jax", "kernels_pallas", "tests", "experiments", "pytest.ini"]

T_OBJ = "tests/test_objective.py::test_total_loss_matches_float64_recomputation"
T_MTP = "tests/test_objective.py::test_mtp_targets_match_the_stream"
T_STATS = "tests/test_moe.py::test_router_stats_match_numpy"
T_ROUTE = "tests/test_moe.py::test_group_limited_topk_matches_reference"
T_GATES = "tests/test_moe.py::test_bias_changes_selection_not_gates"
T_BIAS = "tests/test_moe.py::test_bias_update_matches_numpy_on_random_loads"
T_MLA = "tests/test_mla.py::test_mla_matches_naive_multihead"
T_MTP_MODEL = "tests/test_model.py::test_mtp_depth1_predicts_t_plus_2"
T_LOSS = "tests/test_loss.py::test_head_ce_value_and_grads_match_float64"
T_ADAMW = "tests/test_optim.py::test_adamw_with_clipping_and_decay_matches_numpy"
T_BF16 = "tests/test_optim.py::test_bf16_moments_stay_within_their_rounding_bound"
T_LR = "tests/test_optim.py::test_lr_schedule_shape_at_boundaries"
T_TOKEN_CLOCK = "tests/test_train.py::test_batch_ramp_stages"
T_INIT_FROM = "tests/test_frame.py::test_init_from_takes_weights_bit_for_bit_with_a_fresh_optimizer"
T_PIECEWISE = "tests/test_optim.py::test_mtp_lambda_and_gamma_switch_at_their_steps"
T_EMA = "tests/test_train.py::test_ema_follows_params_and_evaluates_as_built_by_hand"
T_ACCUM = "tests/test_train.py::test_gradient_accumulation_equals_one_big_batch"
T_NAN = "tests/test_train.py::test_nan_loss_stops_naming_the_step_and_keeps_last_good_checkpoint"
T_RESTORE = "tests/test_train.py::test_restore_checks_shapes_seeds_and_data_position"
T_MESH = "tests/multidevice/test_multidevice.py::test_bad_meshes_are_one_clear_error_each"
T_PIPE = "tests/multidevice/test_multidevice.py::test_pipeline_matches_single_device[quick]"
T_HOST_EMA = "tests/test_train.py::test_host_ema_equals_the_in_step_ema_resumes_and_evaluates"
T_SWIGLU8 = ("tests/test_fp8.py::"
             "test_swiglu_down_caches_its_inputs_in_fp8_and_recomputes_the_output")
T_XCACHE = "tests/test_fp8.py::test_cached_x_keeps_fprop_tiles_and_wgrad_retiles_them"
T_EXCHANGE = "tests/test_fp8.py::test_fp8_exchanges_on_one_shard"
T_FIM = "tests/test_fim.py::test_token_at_is_the_vectorised_psm"
T_PASSKEY = "tests/test_data.py::test_short_passkey_samples_and_answer_loss"
T_KEYSCORE = "tests/test_long_context_eval.py::test_key_scores_against_float64"
T_PIPE_TABLE = ("tests/test_pipeline_executor.py::"
                "test_device_table_runs_every_op_once_and_routes_every_transfer")
T_PLAN_GATHER = "tests/test_pipeline_executor.py::test_plan_counts_what_the_step_gathers"
T_PLAN_COPY = "tests/test_pipeline_executor.py::test_plan_counts_the_stage_ordered_copy_of_the_moe_stack"
T_AT_REST = ("tests/test_pipeline_executor.py::"
             "test_non_moe_parameters_rest_sharded_over_pipeline_and_gather_for_the_step")
T_DEFER = "tests/test_deferred_wgrad.py::test_b_plus_deferred_w_equals_the_one_pass_vjp"
T_DEFER_GMM = ("tests/test_deferred_wgrad.py::"
               "test_grouped_swiglu_deferred_matches_the_reference_vjp")
T_DEFER_EP = ("tests/multidevice/test_multidevice.py::"
              "test_deferred_expert_weight_gradients_under_expert_parallelism[quick]")
T_DEFER_FP8 = ("tests/test_deferred_wgrad.py::"
               "test_fp8_routed_experts_deferred_match_the_one_pass_vjp")
T_PLAN_STORE = "tests/test_pipeline_executor.py::test_plan_counts_the_split_w_store_by_hand"
T_PLAN_TRACED = ("tests/test_pipeline_executor.py::"
                 "test_plan_counts_the_buffers_the_executor_traces")

# (name, file, old, new, tests)
MUTATIONS = [
    # the pipeline executor
    ("pipeline: every stage's loss seeded with 1, not 1/M", "dsv3_jax/pipeline/executor.py",
     "cot = (dy, jnp.asarray(inv_m, jnp.float32))", "cot = (dy, jnp.asarray(1.0, jnp.float32))",
     [T_PIPE]),
    ("pipeline: a V turn sends to the neighbour", "dsv3_jax/pipeline/table.py",
     "d = {r: LOCAL, r + 1: RIGHT, r - 1: LEFT}.get(r2)",
     "d = {r: RIGHT, r + 1: RIGHT, r - 1: LEFT}.get(r2)", [T_PIPE_TABLE]),
    ("plan: the step's gathered parameters not counted", "dsv3_jax/plan.py",
     "gathered += size if step != rest else 0", "gathered += 0", [T_PLAN_GATHER]),
    ("plan: the stage-ordered copy of the MoE stack not counted", "dsv3_jax/plan.py",
     '"stage_layer_slots": 0 if run.in_layer_order else',
     '"stage_layer_slots": 0 if True else',
     [T_PLAN_COPY]),
    ("split W: a deferred Linear's kernel also gets its gradient in B",
     "dsv3_jax/layers/common.py",
     "y2 = linear_dot(x2, jax.lax.stop_gradient(kernel).reshape(",
     "y2 = linear_dot(x2, (kernel).reshape(", [T_DEFER]),
    ("split W: the routed experts' down-projection reads dgu for dy",
     "kernels_pallas/grouped_gemm.py",
     "_rows(dy, row0, rows).astype(x.dtype)))", "_rows(dgu[:, :dy.shape[1]], row0, rows)))",
     [T_DEFER_GMM]),
    ("pipeline: a buffer row reused one tick before its value's last read",
     "dsv3_jax/pipeline/table.py",
     "i = next((i for i, f in enumerate(free_at) if f <= w), len(free_at))",
     "i = next((i for i, f in enumerate(free_at) if f <= w + 1), len(free_at))",
     [T_PIPE_TABLE]),
    ("pipeline: a stage input freed after F though B recomputes from it",
     "dsv3_jax/pipeline/table.py",
     "act_live[key] = (t, f_tick[key] if keep_residuals else last_use[key])",
     "act_live[key] = (t, f_tick[key])", [T_PIPE_TABLE]),
    ("split W, expert-parallel: W's expert dW not summed over the data axes",
     "dsv3_jax/layers/moe_ep.py",
     "return tuple(jax.lax.psum(w, summed(w)) if summed(w) else w for w in dw)",
     "return dw", [T_DEFER_EP]),
    ("split W, FP8: the gate | up GEMM's output not tapped", "dsv3_jax/layers/moe.py",
     "    gu = gu + taps[0].astype(gu.dtype)\n", "", [T_DEFER_FP8]),
    ("tensor beside pipeline: the rope key's partial cotangents not summed",
     "dsv3_jax/layers/mla.py", "k_rope = tp.maybe_copy(apply_rope(", "k_rope = (apply_rope(",
     [T_PIPE]),
    ("tensor beside pipeline: the routed experts' gates' partial cotangents not summed",
     "dsv3_jax/layers/moe.py", "gates_NP=tp.copy(routing.gates_NP)",
     "gates_NP=routing.gates_NP", [T_PIPE]),
    ("tensor beside pipeline: the fused head's input gradient not summed over the vocab",
     "dsv3_jax/loss.py", "dh = jax.lax.psum(dh, tp.AXIS)", "dh = dh", [T_PIPE]),
    ("plan: the split-W store not counted", "dsv3_jax/plan.py",
     '        buffers["store"] = store\n', "", [T_PLAN_STORE]),
    ("plan: kept residuals per row without the front's and tail's inputs", "dsv3_jax/plan.py",
     "run.split_w) + 2 * x_bytes", "run.split_w)", [T_PLAN_TRACED]),
    ("pipeline: non-MoE parameters replicated at rest", "dsv3_jax/train_state.py",
     "return spec if gathered else sharding.add_axes(",
     "return spec if True else sharding.add_axes(", [T_AT_REST]),
    # MTP and the objective
    ("mtp targets shifted by k, not k+1", "dsv3_jax/layers/mtp.py",
     'return shift_left(batch["targets"], k), shift_left(batch["loss_mask"], k) * same_doc',
     'return shift_left(batch["targets"], k - 1), shift_left(batch["loss_mask"], k - 1) * same_doc',
     [T_MTP]),
    ("mtp targets cross document boundaries", "dsv3_jax/layers/mtp.py",
     "same_doc = shift_left(seg, k, fill=-1) == seg", "same_doc = seg == seg", [T_MTP]),
    ("mtp module embeds token i+k-1", "dsv3_jax/model.py",
     "self.embed_tokens(shift_left(input_ids, k))", "self.embed_tokens(shift_left(input_ids, k - 1))",
     [T_MTP_MODEL]),
    ("mtp loss summed, not averaged over depths (λ, not λ/D)", "dsv3_jax/objectives/pretrain.py",
     "mtp_ce = sum(mtp_ces) / depth if depth", "mtp_ce = sum(mtp_ces) if depth", [T_OBJ]),
    ("balance loss of the MTP modules dropped", "dsv3_jax/objectives/pretrain.py",
     "balance = _balance(obj, out.router) + _balance(obj, out.mtp_router)",
     "balance = _balance(obj, out.router)", [T_OBJ]),
    ("masked CE divides by all positions", "dsv3_jax/loss.py",
     "return (nll * mask).sum() / jnp.maximum(mask.sum(), 1.0)",
     "return (nll * mask).sum() / mask.size", [T_LOSS]),
    # routing and balance
    ("balance P_i from the biased scores", "dsv3_jax/layers/moe.py",
     "return Routing(experts.astype(jnp.int32), gates * cfg.routed_scaling_factor, scores_NE)",
     "return Routing(experts.astype(jnp.int32), gates * cfg.routed_scaling_factor, "
     "scores_NE + bias_E[None, :])", [T_STATS]),
    ("balance f_i over all positions, padding included", "dsv3_jax/layers/moe.py",
     "f = sel_BTE.sum(1) * (e / (k * per_seq_tokens[:, None]))", "f = sel_BTE.sum(1) * (e / (k * t))",
     [T_STATS]),
    ("group score from the top-1, not the top-2 experts", "dsv3_jax/layers/moe.py",
     "group_score = jax.lax.top_k(grouped, 2)[0].sum(-1)",
     "group_score = jax.lax.top_k(grouped, 1)[0].sum(-1)", [T_ROUTE]),
    ("gates from the biased scores", "dsv3_jax/layers/moe.py",
     "gates = jnp.take_along_axis(scores_NE, experts, axis=-1)",
     "gates = jnp.take_along_axis(choice, experts, axis=-1)", [T_GATES]),
    ("bias update with the sign flipped", "dsv3_jax/model.py",
     "return bias + gamma * jnp.sign(load.mean(-1, keepdims=True) - load)",
     "return bias - gamma * jnp.sign(load.mean(-1, keepdims=True) - load)", [T_BIAS]),
    # MLA and RoPE
    ("softmax scale with mscale once, not squared", "dsv3_jax/config.py",
     "scale *= m * m", "scale *= m", [T_MLA]),
    ("YaRN cos/sin amplitude dropped", "dsv3_jax/layers/common.py",
     "return jnp.cos(angles) * amp, jnp.sin(angles) * amp", "return jnp.cos(angles), jnp.sin(angles)",
     [T_MLA]),
    ("attention mask strictly causal (no self)", "dsv3_jax/layers/mla.py",
     "causal = q_index[:, :, None] >= kv_index[:, None, :]",
     "causal = q_index[:, :, None] > kv_index[:, None, :]", [T_MLA]),
    # optimizer and schedules
    ("no gradient clipping", "dsv3_jax/optim.py",
     "optax.clip_by_global_norm(clip_norm),", "optax.identity(),", [T_ADAMW]),
    ("weight decay on norm scales", "dsv3_jax/optim.py",
     'return p.ndim > 1 and name not in ("scale", "bias")', 'return p.ndim > 1 and name != "bias"',
     [T_ADAMW]),
    ("Adam b2 = b1", "dsv3_jax/optim.py",
     "return optax.scale_by_adam(b1=b1, b2=b2, eps=eps)",
     "return optax.scale_by_adam(b1=b1, b2=b1, eps=eps)", [T_ADAMW]),
    ("BF16 second moment decays with b1", "dsv3_jax/optim.py",
     "nu = jax.tree.map(lambda v, g: (b2 * v.astype(jnp.float32) + (1 - b2) * g * g)",
     "nu = jax.tree.map(lambda v, g: (b1 * v.astype(jnp.float32) + (1 - b1) * g * g)", [T_BF16]),
    ("warm-up starts at 0 (off by one)", "dsv3_jax/optim.py",
     "warm = peak * (step + 1) / max(warmup_steps, 1)", "warm = peak * step / max(warmup_steps, 1)",
     [T_LR]),
    ("piecewise schedules switch one step late", "dsv3_jax/optim.py",
     "out = jnp.where(step >= s, v, out)", "out = jnp.where(step > s, v, out)", [T_PIECEWISE]),
    # the train step
    ("EMA decay inverted", "dsv3_jax/train.py",
     "lambda e, p: fns.ema_decay * e + (1 - fns.ema_decay) * p",
     "lambda e, p: (1 - fns.ema_decay) * e + fns.ema_decay * p", [T_EMA]),
    ("EMA of the old params", "dsv3_jax/train.py",
     'state["ema"], params)', 'state["ema"], state["params"])', [T_EMA]),
    ("host EMA: the new params weighted by d", "dsv3_jax/ema.py",
     "e += one_minus_d * new[k]", "e += d * new[k]", [T_HOST_EMA]),
    ("FIM: the suffix runs one token into <|fim_end|>", "dsv3_jax/fim.py",
     "suffix_end = i + 2 + (n - j)", "suffix_end = i + 3 + (n - j)", [T_FIM]),
    ("passkey rows: the key's loss mask one token early", "dsv3_jax/data.py",
     'out["loss_mask"][at] = is_answer[1:] if', 'out["loss_mask"][at] = is_answer[:-1] if',
     [T_PASSKEY]),
    ("passkey scores: the logits one position late", "dsv3_jax/long_context_eval.py",
     "logp = np.asarray(jax.nn.log_softmax(logits[:, -key_len - 1:-1], -1))",
     "logp = np.asarray(jax.nn.log_softmax(logits[:, -key_len:], -1))", [T_KEYSCORE]),
    # FP8 caching and dispatch (report §3.3.3)
    ("FP8 SwiGLU backward: gate and up caches swapped", "dsv3_jax/fp8.py",
     "(gate, like), (up, _) = _uncache_x(gate_c), _uncache_x(up_c)",
     "(gate, like), (up, _) = _uncache_x(up_c), _uncache_x(gate_c)", [T_SWIGLU8]),
    ("FP8 cached x: Wgrad reads the scales of the first tile only", "dsv3_jax/fp8.py",
     "return dequantize_1x128(q, res.scale)[:, :res.like.shape[1]], res.like",
     "return dequantize_1x128(q, res.scale[:, :1].repeat(res.scale.shape[1], 1))"
     "[:, :res.like.shape[1]], res.like", [T_XCACHE]),
    ("FP8 dispatch: scales not rounded to powers of 2", "dsv3_jax/layers/moe_ep.py",
     "q, scale = fp8.quantize_1x128_padded(x, pow2_scale=True)",
     "q, scale = fp8.quantize_1x128_padded(x, pow2_scale=False)", [T_EXCHANGE]),
    ("gradient accumulation zeroes the gradients", "dsv3_jax/train.py",
     "jax.tree.map(lambda x: x / n_micro, grads)", "jax.tree.map(lambda x: x * 0, grads)", [T_ACCUM]),
    # checkpoints and resume
    ("checkpoints only at the end", "dsv3_jax/train.py",
     "if done % c.train.checkpoint_every == 0 or last:\n            _check_finite",
     "if last:\n            _check_finite", [T_NAN]),
    ("restore ignores train.seed", "dsv3_jax/train.py",
     "if saved_seed != c.train.seed:", "if False:", [T_RESTORE]),
    ("restore rewinds the data position", "dsv3_jax/train.py",
     "data.train_iter.set_state(data_state)", "data.train_iter.set_state(dict(data_state, step=0))",
     [T_RESTORE]),
    ("init_from ignores init_router_bias=False", "dsv3_jax/train.py",
     "if not s.c.train.init_router_bias:", "if False:", [T_INIT_FROM]),
    ("schedule boundaries one step late (token clock)", "dsv3_jax/train_state.py",
     'return int(np.searchsorted(self.tokens_before, tokens, side="left"))',
     'return int(np.searchsorted(self.tokens_before, tokens, side="right"))', [T_TOKEN_CLOCK]),
    # sharding
    ("mesh check ignores the expert axis in the batch split", "dsv3_jax/sharding.py",
     "if global_batch % batch_ways:", 'if global_batch % (batch_ways // shape["expert"]):', [T_MESH]),
    ("two -1 mesh axes accepted", "dsv3_jax/sharding.py",
     "if len(fill) > 1:", "if len(fill) > 2:", [T_MESH]),
]


def copy_repo(dest: str) -> None:
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", ".pytest_cache")
    for name in COPY:
        src = os.path.join(ROOT, name)
        if os.path.isdir(src):
            shutil.copytree(src, os.path.join(dest, name), ignore=ignore)
        elif os.path.exists(src):
            shutil.copy2(src, os.path.join(dest, name))


def run_tests(where: str, tests: list[str], timeout: int) -> tuple[int, str]:
    env = dict(os.environ, PYTHONPATH=where, JAX_PLATFORMS="cpu")
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-m", "not slow", *tests]
    try:
        out = subprocess.run(cmd, cwd=where, env=env, capture_output=True, text=True,
                             timeout=timeout)
        return out.returncode, out.stdout[-2000:] + out.stderr[-2000:]
    except subprocess.TimeoutExpired:
        return -1, "timeout"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("-k", default="", help="comma-separated words: run mutations whose name has one")
    ap.add_argument("--baseline", action="store_true", help="first run the tests unmutated")
    ap.add_argument("--timeout", type=int, default=600, help="seconds per mutation")
    args = ap.parse_args(argv)
    words = [w for w in args.k.split(",") if w]
    chosen = [m for m in MUTATIONS if not words or any(w in m[0] for w in words)]
    rows, bad = [], 0
    with tempfile.TemporaryDirectory(prefix="dsv3_mutations_") as tmp:
        copy_repo(tmp)
        if args.baseline:
            tests = sorted({t for m in chosen for t in m[4]})
            rc, out = run_tests(tmp, tests, args.timeout * 3)
            print(f"baseline: {'pass' if rc == 0 else 'FAIL'}", flush=True)
            if rc != 0:
                print(out)
                return 1
        for name, path, old, new, tests in chosen:
            file = os.path.join(tmp, path)
            with open(file) as f:
                original = f.read()
            n = original.count(old)
            if n != 1:
                rows.append((name, f"OLD TEXT FOUND {n} TIMES", path))
                bad += 1
                print(f"{name}: old text found {n} times in {path}", flush=True)
                continue
            with open(file, "w") as f:
                f.write(original.replace(old, new))
            t0 = time.time()
            try:
                rc, out = run_tests(tmp, tests, args.timeout)
            finally:
                with open(file, "w") as f:
                    f.write(original)
            status = "killed" if rc not in (0, -1, 5) else {0: "SURVIVED", -1: "TIMEOUT",
                                                              5: "NO TESTS RAN"}[rc]
            bad += status != "killed"
            rows.append((name, status, ", ".join(t.split("::")[-1] for t in tests)))
            print(f"{status:9s} {time.time() - t0:5.0f}s  {name}", flush=True)
            if status != "killed":
                print(out)
    width = max(len(r[0]) for r in rows)
    print(f"\n{'mutation':{width}s}  result    killed by")
    for name, status, tests in rows:
        print(f"{name:{width}s}  {status:8s}  {tests}")
    print(f"\n{len(rows) - bad}/{len(rows)} killed")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
