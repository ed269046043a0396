"""Long-context evaluation: the passkey's one-forward scoring against the KV-cache decoder's
greedy continuation, the passkey prompt's layout, and loss by position against a direct NLL."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsv3_jax import config, long_context_eval as lce, model
from dsv3_jax.rollout import rollout


@pytest.fixture(scope="module")
def tiny():
    cfg = config.tiny(num_hidden_layers=2, num_nextn_predict_layers=0, vocab_size=512)
    return cfg, model.init(cfg, jax.random.key(0))


def test_key_hits_equal_greedy_decoding(tiny, rng):
    """A row's key tokens are all argmax hits (the passkey's exact match) iff the KV-cache
    decoder's greedy continuation of the prompt is the key."""
    cfg, variables = tiny
    prompts = rng.integers(2, cfg.vocab_size, (6, 20))
    r = rollout(cfg, variables, [p.tolist() for p in prompts], 5, temperature=0.0, eos_id=None)
    ids = np.concatenate([prompts, r.tokens[:, :5]], 1).astype(np.int32)
    assert lce.key_scores(cfg, variables, ids)[0].all()
    wrong = ids.copy()
    k = rng.integers(20, 25, len(ids))                   # one key token changed per row
    wrong[np.arange(len(ids)), k] = (wrong[np.arange(len(ids)), k] + 1) % cfg.vocab_size
    wrong[:2] = ids[:2]                                  # two rows stay right
    assert lce.key_scores(cfg, variables, wrong)[0].all(1).tolist() == [True] * 2 + [False] * 4


def test_passkey_prompt_layout(rng):
    encode = lambda text: np.array([1000 + ord(c) for c in text], np.int32)
    filler = rng.integers(0, 900, 5000).astype(np.int32)
    for depth in (0.0, 0.4, 1.0):
        ids, is_answer = lce.passkey_prompt(encode, filler, 300, depth, "1 2 3 4 5", 77)
        text = "".join(chr(t - 1000) if t >= 1000 else "." for t in ids)
        assert len(ids) == 300 and is_answer.sum() == 9 and text.endswith('secret = "1 2 3 4 5')
        needle = text.index('\nsecret = "1 2 3 4 5"\n')
        n_fill = 300 - 22 - 11 - 9
        assert needle == round(depth * n_fill)
        np.testing.assert_array_equal(ids[ids < 1000], filler[77:77 + n_fill])


def test_loss_by_position_is_the_mean_token_nll(tiny, rng):
    cfg, variables = tiny
    docs = [rng.integers(2, cfg.vocab_size, n).astype(np.int32) for n in (40, 25, 33, 10)]
    got = lce.loss_by_position(cfg, variables, docs, 24, batch=2)
    rows = np.stack([d[:25] for d in docs if len(d) >= 25])
    logits = np.asarray(model.forward(cfg, variables, jnp.asarray(rows[:, :-1]),
                                      with_mtp=False).logits, np.float64)
    top = logits.max(-1, keepdims=True)
    logp = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
    want = -np.take_along_axis(logp, rows[:, 1:, None], -1)[..., 0].mean(0)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_key_scores_against_float64(tiny, rng):
    cfg, variables = tiny
    ids = rng.integers(2, cfg.vocab_size, (5, 30)).astype(np.int32)
    hit, nll = lce.key_scores(cfg, variables, ids, key_len=5, batch=2)
    logits = np.asarray(model.forward(cfg, variables, jnp.asarray(ids), with_mtp=False).logits,
                        np.float64)[:, -6:-1]
    top = logits.max(-1, keepdims=True)
    logp = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
    np.testing.assert_allclose(nll, -np.take_along_axis(logp, ids[:, -5:, None], -1)[..., 0],
                               rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(hit, logp.argmax(-1) == ids[:, -5:])
    ids[:, -5] = logp[:, 0].argmax(-1)      # the argmax as the key's first token: a hit there
    assert lce.key_scores(cfg, variables, ids)[0][:, 0].all()


def test_induction_accuracy_counts_copied_tokens(tiny, monkeypatch):
    """A stand-in model whose logits put the argmax on the token `length` places back (a perfect
    induction head) scores 1; one that always predicts token 0 (never drawn) scores 0."""
    cfg, variables = tiny

    def copier(back):
        def logits(cfg_, variables_, ids):
            src = jnp.roll(ids, back - 1, axis=1) if back else jnp.zeros_like(ids)
            return jax.nn.one_hot(src, cfg.vocab_size)
        return logits
    monkeypatch.setattr(lce, "_logits", copier(60))
    assert lce.induction_accuracy(cfg, variables, length=60) == 1.0
    monkeypatch.setattr(lce, "_logits", copier(0))
    assert lce.induction_accuracy(cfg, variables, length=60) == 0.0
