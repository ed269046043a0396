"""GRPO (eqs. 26-28) against a float64 NumPy implementation written from the equations."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsv3_jax.objectives import grpo


def np_advantages(r, g, eps=grpo.STD_EPS):
    out = []
    for grp in np.asarray(r, np.float64).reshape(-1, g):
        out.extend((grp - grp.mean()) / (grp.std(ddof=1) + eps))
    return np.array(out)


def np_objective(logp, old, ref, adv, mask, eps, beta):
    """J of eq. 26 output by output, token by token, and dJ/dlogp by hand."""
    n, t = logp.shape
    j, grad = 0.0, np.zeros((n, t))
    for i in range(n):
        toks = [k for k in range(t) if mask[i, k]]
        for k in toks:
            rho = np.exp(logp[i, k] - old[i, k])
            unc, clp = rho * adv[i], np.clip(rho, 1 - eps, 1 + eps) * adv[i]
            kl = np.exp(ref[i, k] - logp[i, k]) - (ref[i, k] - logp[i, k]) - 1
            j += (min(unc, clp) - beta * kl) / len(toks) / n
            d_surr = rho * adv[i] if unc <= clp else 0.0
            d_kl = 1 - np.exp(ref[i, k] - logp[i, k])
            grad[i, k] = (d_surr - beta * d_kl) / len(toks) / n
    return j, grad


@pytest.mark.parametrize("beta", [0.0, 0.04, 0.5])
def test_loss_and_gradient_match_float64_reference(beta):
    rng = np.random.default_rng(0)
    g, q, t = 4, 3, 7
    n = g * q
    logp = -rng.uniform(0.05, 3.0, (n, t))
    old = logp + rng.normal(0, 0.3, (n, t))       # ratios well outside 1 ± ε on both sides
    ref = logp + rng.normal(0, 0.5, (n, t))
    mask = (rng.uniform(size=(n, t)) < 0.8).astype(np.float64)
    mask[:, 0] = 1
    rewards = rng.integers(0, 2, n).astype(np.float64)
    adv = np_advantages(rewards, g)
    eps = 0.2
    ratio = np.exp(logp - old)
    # both sides of the clip are exercised, with each sign of the advantage
    assert ((ratio > 1 + eps) & (adv[:, None] > 0) & (mask > 0)).any()
    assert ((ratio < 1 - eps) & (adv[:, None] < 0) & (mask > 0)).any()

    adv_jax = grpo.group_advantages(jnp.asarray(rewards, jnp.float32), g)
    np.testing.assert_allclose(adv_jax, adv, rtol=1e-5, atol=1e-6)

    def f(lp):
        return grpo.grpo_token_loss(lp, jnp.asarray(old, jnp.float32),
                                    jnp.asarray(ref, jnp.float32), jnp.asarray(adv, jnp.float32),
                                    jnp.asarray(mask, jnp.float32), epsilon=eps, beta=beta)
    (loss, aux), gr = jax.value_and_grad(f, has_aux=True)(jnp.asarray(logp, jnp.float32))
    j_ref, g_ref = np_objective(logp, old, ref, adv, mask, eps, beta)
    np.testing.assert_allclose(float(loss), -j_ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(gr), -g_ref, rtol=1e-4, atol=1e-6)
    kl_ref = np.mean([((np.exp(ref[i] - logp[i]) - (ref[i] - logp[i]) - 1) * mask[i]).sum()
                      / mask[i].sum() for i in range(n)])
    np.testing.assert_allclose(float(aux["kl"]), kl_ref, rtol=1e-5)
    assert 0 < float(aux["clip_frac"]) < 1


def test_kl_term_alone_and_on_policy_ratio():
    """With old = π_θ (μ = 1) the surrogate's value is Σ A / n (0 per group), and β·k3 is ≥ 0,
    0 exactly where π_ref = π_θ."""
    rng = np.random.default_rng(1)
    logp = jnp.asarray(-rng.uniform(0.1, 2, (4, 5)), jnp.float32)
    adv = grpo.group_advantages(jnp.asarray([1.0, 0, 0, 1]), 4)
    mask = jnp.ones((4, 5))
    loss, aux = grpo.grpo_token_loss(logp, logp, logp, adv, mask, epsilon=0.2, beta=1.0)
    assert abs(float(loss)) < 1e-6 and float(aux["kl"]) == 0.0
    assert float(aux["clip_frac"]) == 0.0


def test_equal_rewards_give_zero_advantage_not_nan():
    r = jnp.asarray([1.0, 1, 1, 1, 0, 0, 0, 0, 0.5, 1, 0, 0.5])
    a = np.asarray(grpo.group_advantages(r, 4))
    assert np.isfinite(a).all()
    np.testing.assert_array_equal(a[:8], 0.0)
    np.testing.assert_allclose(a[8:], np_advantages(np.asarray(r)[8:], 4), rtol=1e-5)
    with pytest.raises(ValueError):
        grpo.group_advantages(r, 1)


def test_reinforce_identity_on_a_toy_policy():
    """μ = 1, β = 0: the gradient is -1/n Σ_i A_i/|o_i| Σ_t ∇ log π (REINFORCE with the group
    baseline) on a softmax policy over 3 tokens."""
    theta = jnp.asarray([0.2, -0.1, 0.4])
    toks = jnp.asarray([[0, 1], [2, 2], [1, 0], [2, 1]])
    adv = grpo.group_advantages(jnp.asarray([1.0, 0, 0, 1]), 4)
    mask = jnp.ones((4, 2))

    def logp_of(th):
        return jax.nn.log_softmax(th)[toks]

    def loss(th):
        lp = logp_of(th)
        return grpo.grpo_token_loss(lp, jax.lax.stop_gradient(lp), jax.lax.stop_gradient(lp),
                                    adv, mask, epsilon=0.2, beta=0.0)[0]
    want = jax.grad(lambda th: -(adv[:, None] * logp_of(th)).sum() / 2 / 4)(theta)
    np.testing.assert_allclose(jax.grad(loss)(theta), want, rtol=1e-5, atol=1e-7)


@pytest.mark.slow   # ~35 s of CPU: three rollout + update programs compile
def test_grpo_entry_point_runs_from_a_checkpoint(tmp_path):
    """Three GRPO steps of a micro model: rollouts, rewards, ref log-probs, updates, metrics,
    checkpoint; the router biases stay frozen (balance.gamma = 0)."""
    import json

    from dsv3_jax import ckpt, config, model
    from dsv3_jax import grpo as grpo_main
    from dsv3_jax.chat import CHAT_VOCAB
    micro = dict(hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
                 num_hidden_layers=2, n_routed_experts=4, num_experts_per_tok=2, n_group=2,
                 topk_group=1, num_attention_heads=2, num_key_value_heads=2, q_lora_rank=16,
                 kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8,
                 num_nextn_predict_layers=0)
    cfg = config.tiny(vocab_size=CHAT_VOCAB, **micro)
    v = model.init(cfg, jax.random.key(0))
    v["router_bias"] = jax.tree.map(lambda b: b + 0.01, v["router_bias"])
    ckpt.save_orbax(cfg, v, str(tmp_path / "sft"))
    args = ["grpo", "--config", "experiments/configs/grpo_tiny.py:quick",
            f"--config.train.init_from={tmp_path / 'sft'}", f"--workdir={tmp_path / 'run'}",
            "--config.train.async_checkpoint=False", "--config.grpo.max_new_tokens=4"]
    args += [f"--config.model.{k}={val}" for k, val in micro.items()]
    assert grpo_main.main(args) == 0
    lines = [json.loads(x) for x in open(tmp_path / "run" / "metrics.jsonl")]
    assert [x["step"] for x in lines] == [1, 2, 3]
    for k in ("reward_mean", "reward_std", "accuracy", "kl", "clip_frac", "entropy",
              "response_length", "rollout_tokens_per_s", "update_tokens_per_s", "frac_zero_std"):
        assert all(np.isfinite(x[k]) for x in lines), k
    assert lines[0]["kl"] < 1e-6          # the policy starts at the reference
    _, after = ckpt.load_variables(str(tmp_path / "run"))
    np.testing.assert_array_equal(jax.tree.leaves(after["router_bias"])[0],
                                  jax.tree.leaves(v["router_bias"])[0])


@pytest.mark.slow   # a subprocess with 8 fake devices compiles the sharded programs (~1 min)
def test_grpo_runs_on_a_data_x_expert_mesh(tmp_path):
    """The GRPO entry point on 8 fake CPU devices, mesh data 4 x expert 2 (rollout, reference
    forward and update all sharded)."""
    import json
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    micro = dict(hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
                 num_hidden_layers=2, n_routed_experts=4, num_experts_per_tok=2, n_group=2,
                 topk_group=1, num_attention_heads=2, num_key_value_heads=2, q_lora_rank=16,
                 kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8,
                 num_nextn_predict_layers=0)
    args = [sys.executable, "-m", "dsv3_jax.grpo", "--config",
            "experiments/configs/grpo_tiny.py:quick", f"--workdir={tmp_path / 'run'}",
            "--config.mesh.data=4", "--config.mesh.expert=2", "--config.train.steps=2",
            "--config.grpo.max_new_tokens=4", "--config.train.async_checkpoint=False"]
    args += [f"--config.model.{k}={v}" for k, v in micro.items()]
    sys.path.insert(0, os.path.join(root, "tests", "multidevice"))
    import devices                 # tests/multidevice/devices.py
    env = devices.env(8)
    out = subprocess.run(args, capture_output=True, text=True, env=env, cwd=root, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "expert" in out.stdout
    lines = [json.loads(x) for x in open(tmp_path / "run" / "metrics.jsonl")]
    assert [x["step"] for x in lines] == [1, 2] and all(np.isfinite(x["loss"]) for x in lines)
