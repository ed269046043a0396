"""Fill-in-the-Middle (dsv3_jax/fim.py, report §4.1): the PSM transform's invariants, the packed
stream at a FIM rate, and scoring a model on FIM prompts."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsv3_jax import config, data, fim, model
from dsv3_jax.tokenizer import EOS_ID

SPECIAL = {fim.FIM_BEGIN_ID, fim.FIM_HOLE_ID, fim.FIM_END_ID}


def random_docs(rng, n=60, vocab=300):
    lengths = rng.integers(1, 40, n)            # 1: a document that is only its eos
    docs = [np.concatenate([rng.integers(2, vocab, k - 1), [EOS_ID]]).astype(np.uint16)
            for k in lengths]
    return docs, np.concatenate(docs), np.concatenate([[0], np.cumsum(lengths)])


def undo(out: np.ndarray) -> np.ndarray:
    """PSM back to the document, from the markers alone."""
    b, h, e = (int(np.flatnonzero(out == t)[0]) for t in (fim.FIM_BEGIN_ID, fim.FIM_HOLE_ID,
                                                          fim.FIM_END_ID))
    assert b == 0 and h < e and out[-1] == EOS_ID
    return np.concatenate([out[1:h], out[e + 1:-1], out[h + 1:e], [EOS_ID]])


def test_psm_is_a_rearrangement_with_three_markers(rng):
    docs, _, _ = random_docs(rng)
    for doc in docs:
        n = len(doc) - 1
        i, j = sorted(rng.integers(0, n + 1, 2))
        out = fim.psm(doc, i, j, EOS_ID)
        assert len(out) == len(doc) + 3
        assert sorted(out[~np.isin(out, list(SPECIAL))]) == sorted(doc)
        assert [t for t in out if t in SPECIAL] == [fim.FIM_BEGIN_ID, fim.FIM_HOLE_ID,
                                                     fim.FIM_END_ID]
        np.testing.assert_array_equal(undo(out), doc)
        # the middle follows <|fim_end|> and ends in eos: what the model learns to write
        np.testing.assert_array_equal(out[len(out) - (j - i) - 1:], np.r_[doc[i:j], EOS_ID])
    with pytest.raises(ValueError):                     # no eos at the end
        fim.psm(np.array([5, 6], np.uint16), 0, 0, EOS_ID)
    with pytest.raises(ValueError):                     # cut points out of order
        fim.psm(np.array([5, 6, 7, EOS_ID], np.uint16), 2, 1, EOS_ID)


def test_token_at_is_the_vectorised_psm(rng):
    docs, tokens, offsets = random_docs(rng)
    for d, doc in enumerate(docs):
        n = len(doc) - 1
        i, j = sorted(rng.integers(0, n + 1, 2))
        t = np.arange(len(doc) + 3)
        got = fim.token_at(tokens, np.full_like(t, offsets[d]), np.full_like(t, len(doc)),
                           np.full_like(t, i), np.full_like(t, j), t)
        np.testing.assert_array_equal(got, fim.psm(doc, i, j, EOS_ID))


@pytest.mark.parametrize("rate", [0.1, 0.5, 1.0])
def test_stream_puts_exactly_the_rate_in_psm_form_each_epoch(rate, rng):
    """Per epoch: the stream is the shuffled documents with round(rate * docs) of them in PSM
    form (each undoes to its document), every document once, epochs of equal length; another
    epoch draws other documents and cuts; rate 0 is the plain stream, bit for bit."""
    docs, tokens, offsets = random_docs(rng)
    stream = data._Stream(tokens, offsets, seed=3, fim_rate=rate)
    k = int(round(rate * len(docs)))
    assert stream.n_tokens == len(tokens) + 3 * k
    seen_fim = []
    for epoch in (0, 1):
        pos = epoch * stream.n_tokens + np.arange(stream.n_tokens)
        tok, inst, _ = stream.lookup(pos)
        pieces = [tok[inst == v] for v in np.unique(inst)]
        assert len(pieces) == len(docs)
        is_fim = [fim.FIM_BEGIN_ID in p for p in pieces]
        assert sum(is_fim) == k
        restored = sorted(tuple(undo(p)) if f else tuple(p) for p, f in zip(pieces, is_fim))
        assert restored == sorted(tuple(d) for d in docs)
        seen_fim.append({tuple(undo(p)) for p, f in zip(pieces, is_fim) if f})
    if 0 < k < len(docs):
        assert seen_fim[0] != seen_fim[1]
    # rate 0: each epoch is the documents concatenated in the seeded shuffle's order (an
    # independent rebuild of the plain stream)
    plain = data._Stream(tokens, offsets, 3, 0.0)
    want = np.concatenate([np.concatenate([docs[d] for d in np.random.Generator(
        np.random.PCG64(np.random.SeedSequence([3, e]))).permutation(len(docs))])
        for e in range(2)])
    np.testing.assert_array_equal(plain.lookup(np.arange(len(want)))[0], want)


def test_packed_rows_learn_the_middle_after_fim_end(rng):
    """In packed rows the loss covers the PSM document's own tokens (markers, middle, eos) and
    never a target in the next document; the validation stream has no FIM."""
    docs, tokens, offsets = random_docs(rng, n=40)
    it = data.PackedBatches(tokens, offsets, seq_len=32, global_batch=4, seed=1, fim_rate=1.0)
    b = it.batch(0)
    assert np.isin(b["inputs"], list(SPECIAL)).any()
    val = data.validation_batches(tokens, offsets, 32, 4, 2)
    assert not np.isin(np.concatenate([v["inputs"] for v in val]), list(SPECIAL)).any()


def test_fim_needs_room_in_the_vocabulary():
    from dsv3_jax import train_config
    from dsv3_jax.config import ConfigError
    from experiments.configs import tiny
    c = tiny.get_config()
    c.data.fim_rate = 0.1
    with pytest.raises(ConfigError, match="model.vocab_size=8256"):
        train_config.validate(c)
    c.model.vocab_size = 8256
    train_config.validate(c)


def test_fim_tokenizer_ids_and_text():
    tok = fim.fim_tokenizer()
    assert [tok.token_to_id(t) for t in fim.FIM_TOKENS] == [8195, 8196, 8197]
    ids = fim.prompt(tok, "def f(x):\n    return ", "\n")
    assert ids[0] == fim.FIM_BEGIN_ID and ids[-1] == fim.FIM_END_ID
    assert fim.FIM_HOLE_ID in ids
    assert fim.FIM_HOLE_ID not in tok.encode("<|fim_hole|>").ids     # text stays text
    assert tok.decode(tok.encode("x = 1").ids) == "x = 1"


def test_score_is_the_log_likelihood_of_the_middle(rng):
    """fim.score sums the main head's log-probabilities of the middle tokens after the prompt:
    the float64 NumPy log-softmax of the forward's logits at the same positions."""
    cfg = config.tiny(vocab_size=8256, num_hidden_layers=2, dtype="float32")
    variables = model.init(cfg, jax.random.key(int(rng.integers(1 << 30))))
    tok = fim.fim_tokenizer()
    p = fim.prompt(tok, "def add(a, b):\n    return ", "\n\nprint(add(1, 2))\n")
    middle = tok.encode("a + b").ids + [EOS_ID]
    got, n = fim.score(cfg, variables, p, middle)
    logits = np.asarray(model.forward(cfg, variables, jnp.asarray([p + middle]),
                                      with_mtp=False).logits[0], np.float64)
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1,
                                                                            keepdims=True)) \
        - logits.max(-1, keepdims=True)
    want = sum(logp[len(p) - 1 + k, t] for k, t in enumerate(middle))
    assert n == len(middle)
    assert got == pytest.approx(want, rel=1e-5)
    other, _ = fim.score(cfg, variables, p, middle[::-1])
    assert other != got
