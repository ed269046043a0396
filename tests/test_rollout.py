"""The jitted rollout: its per-token log-probabilities equal a teacher-forced forward of the
sampled tokens; greedy equals the host-loop generator; stop tokens end rows."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsv3_jax import config, generate, model
from dsv3_jax.objectives import grpo
from dsv3_jax.rollout import repeat, rollout

MICRO = dict(vocab_size=64, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
             num_hidden_layers=2, n_routed_experts=8, num_experts_per_tok=2, n_group=2,
             topk_group=1, num_attention_heads=2, num_key_value_heads=2, q_lora_rank=32,
             kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
             num_nextn_predict_layers=0)


@pytest.fixture(scope="module")
def micro():
    cfg = config.tiny(**MICRO)
    return cfg, model.init(cfg, jax.random.key(0))


def teacher_forced(cfg, variables, rows, temperature):
    """Log-probabilities of each row's tokens from one forward over the right-padded rows."""
    t = max(map(len, rows))
    seq = np.zeros((len(rows), t), np.int32)
    for i, r in enumerate(rows):
        seq[i, :len(r)] = r
    batch = {"inputs": jnp.asarray(seq[:, :-1]), "targets": jnp.asarray(seq[:, 1:]),
             "positions": jnp.broadcast_to(jnp.arange(t - 1), (len(rows), t - 1)),
             "segment_ids": jnp.ones((len(rows), t - 1), jnp.int32)}
    fn = jax.jit(grpo.sequence_logps, static_argnums=(0, 3))
    return np.asarray(fn(cfg, variables, batch, temperature)[0])


def test_rollout_logps_equal_teacher_forced_forward(micro):
    cfg, variables = micro
    temperature = 0.7
    rng = np.random.default_rng(0)
    prompts = repeat([list(rng.integers(2, 64, n)) for n in (3, 9, 17)], 2)
    r = rollout(cfg, variables, prompts, 10, temperature=temperature, seed=3, eos_id=1)
    assert r.tokens.shape == (6, 10) and (r.lengths >= 1).all()
    assert len({tuple(t) for t in r.tokens}) > 3          # a group's samples differ
    comps = [r.tokens[i, :int(r.lengths[i])].tolist() for i in range(len(prompts))]
    logp = teacher_forced(cfg, variables, [p + c for p, c in zip(prompts, comps)], temperature)
    for i, (p, comp) in enumerate(zip(prompts, comps)):
        n = len(comp)
        np.testing.assert_allclose(r.logps[i, :n], logp[i, len(p) - 1:len(p) - 1 + n], atol=1e-5)
        assert (r.logps[i, n:] == 0).all() and (r.tokens[i, n:] == 0).all()
        assert r.finished[i] == (comp[-1] == 1)


def test_greedy_rollout_equals_generate(micro):
    cfg, variables = micro
    rng = np.random.default_rng(1)
    prompts = [list(rng.integers(2, 64, n)) for n in (4, 11)]
    r = rollout(cfg, variables, prompts, 8, temperature=0.0, eos_id=None)
    g = generate.generate(cfg, variables, prompts, 8)
    assert r.tokens.tolist() == g.tokens


def test_stop_token_ends_a_row(micro):
    cfg, variables = micro
    prompts = [[5, 6, 7]] * 8
    free = rollout(cfg, variables, prompts, 12, seed=0, eos_id=None)
    stop = int(free.tokens[0, 2])                # a token row 0 samples at its third step
    r = rollout(cfg, variables, prompts, 12, seed=0, eos_id=None, stop_ids=(stop,))
    n = int(r.lengths[0])
    assert n <= 3 and r.tokens[0, n - 1] == stop and r.finished[0]
    assert (r.tokens[0, n:] == 0).all()
