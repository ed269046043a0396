"""The batch-wise auxiliary balance loss (report §4.5.3) next to the sequence-wise one (eqs. 17-20),
and `balance.loss` choosing between them in the pre-training objective."""
import jax
import jax.numpy as jnp
import numpy as np

from dsv3_jax import config, model, train_config
from dsv3_jax.layers import moe
from dsv3_jax.objectives import pretrain


def batch_wise_reference(experts_BTK, scores_BTE, valid_BT, e, k):
    """sum_i f_i P_i with every valid token of the batch as one sequence (float64 NumPy)."""
    n = valid_BT.sum()
    f = e / (k * n) * np.bincount(experts_BTK[valid_BT].ravel(), minlength=e)
    s = scores_BTE[valid_BT]
    p = (s / s.sum(-1, keepdims=True)).mean(0)
    return (f * p).sum()


def test_batch_balance_loss_matches_numpy(rng):
    """Padding and an all-padding row count for nothing; one row: batch-wise = sequence-wise."""
    cfg = config.tiny()
    b, t, e, k = 3, 20, cfg.n_routed_experts, cfg.num_experts_per_tok
    s = 1 / (1 + np.exp(-rng.standard_normal((b * t, e))))
    bias = 0.3 * rng.standard_normal(e)
    r = moe.route(jnp.asarray(s, jnp.float32), jnp.asarray(bias, jnp.float32), cfg)
    valid = rng.random((b, t)) > 0.3
    valid[2] = False
    stats = moe.router_stats(r, jnp.asarray(valid), cfg)
    ex = np.asarray(r.experts_NP).reshape(b, t, k)
    want = batch_wise_reference(ex, s.reshape(b, t, e), valid, e, k)
    np.testing.assert_allclose(stats.batch_balance_loss, want, rtol=1e-5)
    # a single row: the batch is that sequence
    one = moe.router_stats(moe.route(jnp.asarray(s[:t], jnp.float32), jnp.zeros(e), cfg),
                           jnp.asarray(valid[:1]), cfg)
    np.testing.assert_allclose(one.batch_balance_loss, one.balance_loss, rtol=1e-6)


def test_objective_uses_the_configured_scope(rng):
    """balance.loss="batch" swaps the summed per-layer term and nothing else; default unchanged."""
    c = train_config.base_config()
    c.model = train_config.model_block("tiny", num_hidden_layers=2)
    cfg = train_config.validate(c)
    assert c.balance.loss == "sequence"
    variables = model.init(cfg, jax.random.key(0))
    ids = jnp.asarray(rng.integers(0, cfg.vocab_size, (2, 16)), jnp.int32)
    batch = {"inputs": ids, "targets": jnp.roll(ids, -1, 1),
             "loss_mask": jnp.ones((2, 16), jnp.float32),
             "positions": jnp.broadcast_to(jnp.arange(16, dtype=jnp.int32), (2, 16)),
             "segment_ids": jnp.ones((2, 16), jnp.int32)}
    seq = pretrain.make(c, cfg)
    c.balance.loss = "batch"
    bat = pretrain.make(c, cfg)
    assert seq.balance_loss == "sequence" and bat.balance_loss == "batch"
    l_seq, a_seq = seq.loss(variables["params"], variables["router_bias"], batch, 0)
    l_bat, a_bat = bat.loss(variables["params"], variables["router_bias"], batch, 0)
    out = model.forward(cfg, variables, ids, positions=batch["positions"],
                        segment_ids=batch["segment_ids"])
    np.testing.assert_allclose(a_seq["balance"], out.router.balance_loss.sum()
                               + out.mtp_router.balance_loss.sum(), rtol=1e-6)
    np.testing.assert_allclose(a_bat["balance"], out.router.batch_balance_loss.sum()
                               + out.mtp_router.batch_balance_loss.sum(), rtol=1e-6)
    np.testing.assert_allclose(l_bat - l_seq, c.balance.alpha * (a_bat["balance"] - a_seq["balance"]),
                               atol=1e-6)
    assert a_seq["ce"] == a_bat["ce"]


def test_unknown_scope_is_a_config_error():
    import pytest
    c = train_config.base_config()
    c.model = train_config.model_block("tiny")
    c.balance.loss = "token"
    with pytest.raises(config.ConfigError, match="balance.loss"):
        train_config.validate(c)
