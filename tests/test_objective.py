"""The pre-training objective against a float64 NumPy recomputation from the model's outputs and
the raw token stream: L = CE + λ/D · Σ_k CE_k + α · Σ_layers L_bal, on packed multi-document rows
with MTP depth 2. The targets of the reference are derived here from the stream (depth k at
position i predicts the stream's token i+k+1 of the same document instance), not from the
batch's `targets` or from layers/mtp.py."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsv3_jax import config, model
from dsv3_jax.layers import mtp
from dsv3_jax.objectives import pretrain


def packed_stream(rng, rows, t, vocab, pad_tail=7):
    """A stream of document instances cut into rows of t inputs (+1 target) as the data pipeline
    lays them out: row r covers stream positions r*t ... r*t+t. Documents are 1-12 tokens (some
    shorter than the MTP depth), the stream's end is padding. Returns (tok, inst, valid) [rows,
    t+1]: token, document instance (distinct per document) and validity of each position."""
    n = rows * t + 1
    lengths = []
    while sum(lengths) < n:
        lengths.append(int(rng.integers(1, 13)))
    inst = np.repeat(np.arange(1, len(lengths) + 1), lengths)[:n]
    tok = rng.integers(1, vocab, n)
    valid = np.ones(n, bool)
    valid[n - pad_tail:] = False
    tok[~valid], inst[~valid] = 0, 0
    pos = np.arange(rows)[:, None] * t + np.arange(t + 1)
    return tok[pos], inst[pos], valid[pos]


def batch_from_stream(tok, inst, valid):
    """The packed batch: segment ids renumbered per row, positions restart at each document start
    (and at each row start), no loss on padding or across a document boundary."""
    x_inst, x_valid = inst[:, :-1], valid[:, :-1]
    rows, t = x_inst.shape
    seg = np.zeros((rows, t), np.int32)
    positions = np.zeros((rows, t), np.int32)
    for r in range(rows):
        s, p = 0, 0
        for i in range(t):
            if i == 0 or x_inst[r, i] != x_inst[r, i - 1]:
                s, p = s + 1, 0
            seg[r, i], positions[r, i] = (s, p) if x_valid[r, i] else (0, 0)
            p += 1
    mask = x_valid & valid[:, 1:] & (x_inst == inst[:, 1:])
    return {"inputs": tok[:, :-1].astype(np.int32), "targets": tok[:, 1:].astype(np.int32),
            "positions": positions, "segment_ids": seg, "loss_mask": mask.astype(np.float32)}


def targets_from_stream(tok, inst, valid, k):
    """Depth k (0 = the main head) at input position i predicts stream token i+k+1, counted only
    when that token exists in the row and belongs to the same document instance as token i."""
    rows, t1 = tok.shape
    t = t1 - 1
    target = np.zeros((rows, t), np.int64)
    mask = np.zeros((rows, t), bool)
    for r in range(rows):
        for i in range(t):
            j = i + k + 1
            if j <= t and valid[r, i] and valid[r, j] and inst[r, j] == inst[r, i]:
                target[r, i], mask[r, i] = tok[r, j], True
    return target, mask


def ce64(logits, target, mask):
    """Mean next-token cross-entropy over masked positions, float64."""
    logits = np.asarray(logits, np.float64)
    m = logits.max(-1, keepdims=True)
    lse = (np.log(np.exp(logits - m).sum(-1, keepdims=True)) + m)[..., 0]
    nll = lse - np.take_along_axis(logits, target[..., None], -1)[..., 0]
    return (nll * mask).sum() / max(mask.sum(), 1)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_mtp_targets_match_the_stream(k, rng):
    tok, inst, valid = packed_stream(rng, 4, 20, 50)
    batch = batch_from_stream(tok, inst, valid)
    target, mask = mtp.mtp_targets({n: jnp.asarray(v) for n, v in batch.items()}, k)
    want_t, want_m = targets_from_stream(tok, inst, valid, k)
    np.testing.assert_array_equal(np.asarray(mask), want_m.astype(np.float32))
    np.testing.assert_array_equal(np.where(want_m, np.asarray(target), 0), want_t)
    # the main head's targets (k = 0) are the batch's own
    t0, m0 = targets_from_stream(tok, inst, valid, 0)
    np.testing.assert_array_equal(batch["loss_mask"], m0.astype(np.float32))
    np.testing.assert_array_equal(np.where(m0, batch["targets"], 0), t0)


DEPTH, LAMBDA, ALPHA = 2, 0.3, 0.05


@pytest.fixture(scope="module")
def depth2():
    cfg = config.tiny(vocab_size=97, num_hidden_layers=2, hidden_size=32, intermediate_size=64,
                      moe_intermediate_size=16, q_lora_rank=16, kv_lora_rank=16,
                      num_nextn_predict_layers=DEPTH)
    return cfg, model.init(cfg, jax.random.key(0))


def test_total_loss_matches_float64_recomputation(depth2, rng):
    """Both CE paths: from materialised logits (ce_chunk 0) and the fused head + CE the trainer
    uses (ce_chunk 8), against the reference built from the model's logits."""
    cfg, variables = depth2
    # a random non-zero bias: the routed set, and so the balance term, depends on it
    bias = jax.tree.map(lambda b: jnp.asarray(0.05 * rng.standard_normal(b.shape), b.dtype),
                        variables["router_bias"])
    params = variables["params"]
    tok, inst, valid = packed_stream(rng, 3, 24, cfg.vocab_size)
    batch = {k: jnp.asarray(v) for k, v in batch_from_stream(tok, inst, valid).items()}
    objs = [pretrain.Pretrain(cfg=cfg, mtp_weight=lambda step: jnp.float32(LAMBDA), alpha=ALPHA,
                              ce_chunk=chunk) for chunk in (0, 8)]

    @jax.jit
    def losses_and_outputs(p, b, x):   # one compilation: XLA shares the forward passes
        out = model.forward(cfg, {"params": p, "router_bias": b}, x["inputs"],
                            positions=x["positions"], segment_ids=x["segment_ids"])
        return [pretrain.compute_loss(p, b, x, obj, 0) for obj in objs], out

    with jax.default_matmul_precision("highest"):
        results, out = losses_and_outputs(params, bias, batch)
    ce = ce64(out.logits, *targets_from_stream(tok, inst, valid, 0))
    mtp_ces = [ce64(out.mtp_logits[k - 1], *targets_from_stream(tok, inst, valid, k))
               for k in range(1, DEPTH + 1)]
    balance = (np.asarray(out.router.balance_loss, np.float64).sum()
               + np.asarray(out.mtp_router.balance_loss, np.float64).sum())
    assert out.mtp_router.balance_loss.shape == (DEPTH,) and balance > 0
    want = ce + LAMBDA / DEPTH * sum(mtp_ces) + ALPHA * balance
    for loss, aux in results:
        # float32 logits and log-sum-exps of ~4.6 nats: ~1e-6 relative; the terms the test must
        # tell apart (λ/D vs λ, a shifted target, α·balance ~ 0.05) are far larger
        np.testing.assert_allclose(float(loss), want, rtol=1e-5)
        np.testing.assert_allclose(float(aux["ce"]), ce, rtol=1e-5)
        np.testing.assert_allclose(float(aux["mtp_ce"]), np.mean(mtp_ces), rtol=1e-5)
        np.testing.assert_allclose(float(aux["balance"]), balance, rtol=1e-5)
        np.testing.assert_array_equal(aux["counts"], out.router.counts)
        np.testing.assert_array_equal(aux["mtp_counts"], out.mtp_router.counts)
