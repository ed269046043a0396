"""Data pipeline: real TFDS build of the stdlib corpus, tokenizer, token cache, packing."""
import json

import numpy as np
import pytest

from dsv3_jax import data
from dsv3_jax.tokenizer import EOS_ID, PAD_ID, load_tokenizer, tokenizer_hash, train_tokenizer

KEYS = ("inputs", "targets", "segment_ids", "positions", "loss_mask")


@pytest.fixture(scope="session")
def real(tmp_path_factory):
    """The real pipeline, built once into a fresh data dir (~4 s)."""
    data_dir = tmp_path_factory.mktemp("tfds")
    builder = data.prepare_corpus(data_dir)
    return data_dir, builder


def synthetic(rng, n_docs=40, max_len=30):
    """Token = 100 * doc + position in doc, so every token says where it came from."""
    lengths = rng.integers(1, max_len, n_docs)
    lengths[:3] = 1, 2, 3 * max_len  # tiny documents and one far longer than a row
    tokens = np.concatenate([100 * d + np.arange(n) for d, n in enumerate(lengths)])
    tokens = tokens.astype(np.uint16)
    assert len(lengths) * 100 < 2**16 and lengths.max() < 100
    return tokens, np.concatenate([[0], np.cumsum(lengths)])


def check_packing(batch, seq_len):
    x, y, seg, pos, mask = (batch[k] for k in KEYS)
    assert x.dtype == y.dtype == seg.dtype == pos.dtype == np.int32 and mask.dtype == np.float32
    assert all(batch[k].shape == x.shape and x.shape[1] == seq_len for k in KEYS)
    # Trained exactly where the target is the next token of the same document.
    np.testing.assert_array_equal(mask, ((y == x + 1) & (seg > 0)).astype(np.float32))
    # Inside a row, segments agree with documents; a target never crosses a segment boundary.
    live = seg[:, 1:] > 0
    np.testing.assert_array_equal((seg[:, 1:] == seg[:, :-1])[live],
                                  (x[:, 1:] == x[:, :-1] + 1)[live])
    assert not np.any((mask[:, :-1] > 0) & (seg[:, 1:] != seg[:, :-1]))
    # Segments are 1, 2, 3, ...; positions restart at 0 at every segment start and count up.
    starts = np.concatenate([np.ones_like(seg[:, :1], bool), seg[:, 1:] != seg[:, :-1]], 1)
    assert np.all(seg[:, 0] == 1) and np.all(np.diff(seg, axis=1)[seg[:, 1:] > 0] <= 1)
    np.testing.assert_array_equal(pos == 0, starts | (seg == 0))
    run = np.where(seg > 0, x % 100 - pos, 0)  # constant within a segment
    assert np.all((run[:, 1:] == run[:, :-1]) | starts[:, 1:])


def test_packing_invariants_and_epochs(rng):
    tokens, offsets = synthetic(rng)
    seq_len, batch = 16, 4
    it = data.PackedBatches(tokens, offsets, seq_len, batch, seed=3)
    epoch_rows = -(-len(tokens) // seq_len)
    batches = [next(it) for _ in range(2 * epoch_rows // batch + 2)]
    for b in batches:
        check_packing(b, seq_len)
        assert b["loss_mask"].mean() > 0.5
    # Rows tile the stream: epoch 0 holds every token exactly once, in documents kept intact,
    # and each stream token is the target of the previous one.
    stream = np.concatenate([b["inputs"].ravel() for b in batches])
    np.testing.assert_array_equal(np.sort(stream[:len(tokens)]), np.sort(tokens))
    for b, nxt in zip(batches[:-1], batches[1:]):
        assert b["targets"][-1, -1] == nxt["inputs"][0, 0]
    docs0 = stream[:len(tokens)] // 100
    docs1 = stream[len(tokens):2 * len(tokens)] // 100
    order0 = docs0[np.r_[True, docs0[1:] != docs0[:-1]]]
    order1 = docs1[np.r_[True, docs1[1:] != docs1[:-1]]]
    assert sorted(order0) == list(range(len(offsets) - 1))  # each document once per epoch
    assert not np.array_equal(order0, order1)  # reshuffled per epoch
    assert not np.array_equal(order0, np.arange(len(order0)))  # shuffled at all


def test_packing_without_document_masking(rng):
    """document_masking=False (the report's pre-training packing): the same tokens and loss
    mask, one attention span per row (segment 1, 0 only on padding) and positions 0..T-1."""
    tokens, offsets = synthetic(rng)
    masked = data.PackedBatches(tokens, offsets, 16, 4, seed=2)
    open_ = data.PackedBatches(tokens, offsets, 16, 4, seed=2, document_masking=False)
    several = False
    for step in range(12):
        a, b = masked.batch(step), open_.batch(step)
        for k in ("inputs", "targets", "loss_mask"):
            np.testing.assert_array_equal(a[k], b[k])
        several |= bool((a["segment_ids"].max(1) > 1).any())
        np.testing.assert_array_equal(b["segment_ids"], (a["segment_ids"] > 0).astype(np.int32))
        np.testing.assert_array_equal(b["positions"],
                                      np.arange(16)[None] * (a["segment_ids"] > 0))
    assert several                                      # some rows do hold several documents
    val = data.validation_batches(tokens, offsets, 16, 4, 2, document_masking=False)
    assert all(set(np.unique(v["segment_ids"])) <= {0, 1} for v in val)


def test_passkey_rows(rng):
    """passkey_rate: a row is, with that probability from (seed, row), a whole passkey sample
    (the key planted once in the filler, the row ending in the query and the same key; loss on
    every token); every other row is the plain packing's, and a batch is still a pure function
    of (seed, step)."""
    from dsv3_jax import long_context_eval as lce
    tokens, offsets = synthetic(rng, n_docs=300)
    encode = lambda text: np.array([60000 + ord(ch) for ch in text], np.int32)
    plain = data.PackedBatches(tokens, offsets, 64, 8, seed=4)
    mixed = data.PackedBatches(tokens, offsets, 64, 8, seed=4, passkey_rate=0.3, encode=encode)
    again = data.PackedBatches(tokens, offsets, 64, 8, seed=4, passkey_rate=0.3, encode=encode)
    query = encode(lce.QUERY)
    n_key = n_rows = 0
    for step in range(40):
        a, b = plain.batch(step), mixed.batch(step)
        assert all(np.array_equal(b[k], again.batch(step)[k]) for k in KEYS)
        full = np.concatenate([b["inputs"], b["targets"][:, -1:]], 1)
        for r in range(8):
            n_rows += 1
            if np.array_equal(b["inputs"][r], a["inputs"][r]):
                assert all(np.array_equal(a[k][r], b[k][r]) for k in KEYS)
                continue
            n_key += 1
            np.testing.assert_array_equal(b["targets"][r, :-1], b["inputs"][r, 1:])
            assert (b["segment_ids"][r] == 1).all() and (b["loss_mask"][r] == 1).all()
            np.testing.assert_array_equal(b["positions"][r], np.arange(64))
            text = "".join(chr(t - 60000) if t >= 60000 else "#" for t in full[r])
            key = text[-9:]                              # "d d d d d"
            assert all(ch.isdigit() for ch in key[::2]) and set(key[1::2]) == {" "}
            assert text.count(lce.NEEDLE.format(key)) == 1
            assert np.array_equal(full[r, -9 - len(query):-9], query)
            filler = full[r][full[r] < 60000]                # the code around the needle
            assert len(filler) == 65 - len(encode(lce.NEEDLE.format(key))) - len(query) - 9
            assert (np.diff(filler.astype(int)) != 0).all()
    assert 0.2 < n_key / n_rows < 0.4
    with pytest.raises(ValueError, match="passkey_rate"):
        data.PackedBatches(tokens, offsets, 64, 8, seed=4, passkey_rate=0.3)


def test_short_passkey_samples_and_answer_loss(rng):
    """passkey_len packs seq_len // passkey_len samples per passkey row (own segments, positions
    from 0, the remainder padding); passkey_loss="answer" keeps the loss on the 5 key tokens."""
    from dsv3_jax import long_context_eval as lce
    tokens, offsets = synthetic(rng, n_docs=300)
    encode = lambda text: np.array([60000 + ord(ch) for ch in text], np.int32)
    it = data.PackedBatches(tokens, offsets, 160, 4, seed=1, passkey_rate=1.0, encode=encode,
                            passkey_len=50, passkey_loss="answer")
    b = it.batch(3)
    for r in range(4):
        seg, pos, lm = b["segment_ids"][r], b["positions"][r], b["loss_mask"][r]
        np.testing.assert_array_equal(seg, np.repeat([1, 2, 3, 0], [50, 50, 50, 10]))
        np.testing.assert_array_equal(pos[:150], np.tile(np.arange(50), 3))
        assert (pos[150:] == 0).all() and (lm[150:] == 0).all()
        keys = []
        for k in range(3):
            x, y = b["inputs"][r, 50 * k:50 * k + 50], b["targets"][r, 50 * k:50 * k + 50]
            text = "".join(chr(t - 60000) if t >= 60000 else "#" for t in np.r_[x, y[-1:]])
            key = text[-9:]
            assert text.count(lce.NEEDLE.format(key)) == 1 and text.endswith(lce.QUERY + key)
            np.testing.assert_array_equal(lm[50 * k:50 * k + 50], np.arange(50) >= 41)
            np.testing.assert_array_equal(y[41:], encode(key))
            keys.append(key)
        assert len(set(keys)) == 3
    for bad in (65, 20):                  # longer than the row; too short to hide a key in
        with pytest.raises(ValueError, match="passkey_len"):
            data.PackedBatches(tokens, offsets, 64, 8, seed=4, passkey_rate=0.3, encode=encode,
                               passkey_len=bad)
    # a resumed stream must mix in the same samples
    other = data.PackedBatches(tokens, offsets, 160, 4, seed=1, passkey_rate=0.5, encode=encode,
                               passkey_len=50, passkey_loss="answer")
    with pytest.raises(ValueError, match="passkey_rate"):
        other.set_state(it.get_state())
    again = data.PackedBatches(tokens, offsets, 160, 4, seed=1, passkey_rate=1.0, encode=encode,
                               passkey_len=50, passkey_loss="answer")
    it.step = 3
    again.set_state(json.loads(json.dumps(it.get_state())))
    got = next(again)
    assert all(np.array_equal(got[k], b[k]) for k in KEYS)
    # two processes' slices of a step are the one-process batch: the draws follow the global row
    mixed = dict(passkey_rate=0.5, encode=encode, passkey_len=50)
    whole = data.PackedBatches(tokens, offsets, 160, 4, seed=1, **mixed).batch(5)
    parts = [data.PackedBatches(tokens, offsets, 160, 4, seed=1, process_index=i,
                                process_count=2, **mixed).batch(5) for i in (0, 1)]
    for k in KEYS:
        np.testing.assert_array_equal(np.concatenate([q[k] for q in parts]), whole[k])


def test_determinism_and_seeds(rng):
    tokens, offsets = synthetic(rng)
    make = lambda seed: data.PackedBatches(tokens, offsets, 16, 4, seed=seed)
    a, b, c = make(7), make(7), make(8)
    for _ in range(5):
        ba, bb, bc = next(a), next(b), next(c)
        assert all(np.array_equal(ba[k], bb[k]) for k in KEYS)
    assert not np.array_equal(ba["inputs"], bc["inputs"])


def test_resume_is_exact(rng):
    tokens, offsets = synthetic(rng)
    it = data.PackedBatches(tokens, offsets, 16, 4, seed=5)
    for _ in range(7):
        next(it)
    state = json.loads(json.dumps(it.get_state()))
    expected = [next(it) for _ in range(3)]
    resumed = data.PackedBatches(tokens, offsets, 16, 4, seed=5)
    resumed.set_state(state)
    for want in expected:
        got = next(resumed)
        assert all(np.array_equal(want[k], got[k]) for k in KEYS)
    with pytest.raises(ValueError, match="seed"):
        data.PackedBatches(tokens, offsets, 16, 4, seed=6).set_state(state)


def test_bad_arguments(rng):
    tokens, offsets = synthetic(rng)
    for kwargs, match in [(dict(seq_len=0), "seq_len"),
                          (dict(global_batch=6, process_count=4), "divisible"),
                          (dict(process_index=2, process_count=2), "process_index"),
                          (dict(seed=-1), "seed"), (dict(global_batch=2.0), "global_batch")]:
        args = dict(seq_len=8, global_batch=4, seed=0) | kwargs
        with pytest.raises(ValueError, match=match):
            data.PackedBatches(tokens, offsets, **args)
    with pytest.raises(ValueError, match="offsets"):
        data.PackedBatches(tokens[:-1], offsets, 8, 4, 0)


def test_unigram_entropy():
    assert data.unigram_entropy(np.array([5, 5, 5])) == 0.0
    assert np.isclose(data.unigram_entropy(np.arange(8).repeat(3)), np.log(8))


def test_tokenizer_training_is_deterministic():
    texts = ["def f(x):\n    return x + 1\n", "class A:\n    pass\n"] * 20
    a, b = (train_tokenizer(texts, vocab_size=300) for _ in range(2))
    assert tokenizer_hash(a) == tokenizer_hash(b)
    assert a.token_to_id("<|pad|>") == PAD_ID and a.token_to_id("<|eos|>") == EOS_ID
    with pytest.raises(ValueError, match="vocab_size"):
        train_tokenizer(texts, vocab_size=100)


def test_missing_files(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="tokenizer"):
        load_tokenizer(tmp_path / "nope.json")
    monkeypatch.setattr(data.sysconfig, "get_paths", lambda: {"stdlib": str(tmp_path)})
    with pytest.raises(FileNotFoundError, match="corpus files"):
        data.prepare_corpus(tmp_path / "tfds")
    monkeypatch.setenv("DSV3_DATA_DIR", str(tmp_path / "env"))
    assert data.resolve_data_dir() == tmp_path / "env"
    assert data.resolve_data_dir(tmp_path / "arg") == tmp_path / "arg"


def test_real_builder_and_split(real):
    data_dir, builder = real
    assert builder.info.metadata["corpus_fingerprint"] == data.corpus_fingerprint()
    train, val = (data.load_split_texts(builder, s) for s in ("train", "validation"))
    train_names, val_names = {n for n, _ in train}, {n for n, _ in val}
    assert not train_names & val_names  # disjoint by document
    assert all(data.is_validation(n) for n in val_names)
    assert 0.005 < len(val) / (len(train) + len(val)) < 0.05
    assert "stdlib/json/decoder.py" in train_names | val_names
    assert not any("/test/" in n or "site-packages" in n for n in train_names | val_names)
    assert data.prepare_corpus(data_dir).info.splits["train"].num_examples == len(train)  # reused


def test_tokenizer_roundtrip_on_stdlib(real):
    tok = load_tokenizer()
    assert tok.get_vocab_size() == 8192
    texts = [t for _, t in data.load_split_texts(real[1], "validation")]
    texts += ["naïve café 日本語 \t\r\n  trailing  ", "a literal <|eos|> stays text"]
    for text in texts:
        ids = tok.encode(text).ids
        assert EOS_ID not in ids and tok.decode(ids) == text


def test_make_datasets_real(real):
    data_dir, _ = real
    seq_len, gbatch = 64, 8
    it, val_fn, tok, info = data.make_datasets(seq_len, gbatch, seed=1, data_dir=data_dir)
    assert info["vocab_size"] == 8192 and info["val_docs"] > 0 and 4 < info["unigram_entropy"] < 9
    # Token cache: one EOS per document, at its end; documents decode back to the corpus text.
    builder = data.prepare_corpus(data_dir)
    tokens, offsets = data.tokenize_split(builder, "validation", tok)
    assert tokens.dtype == np.uint16 and (tokens == EOS_ID).sum() == len(offsets) - 1
    assert np.all(tokens[offsets[1:] - 1] == EOS_ID)
    first_doc = data.load_split_texts(builder, "validation")[0][1]
    assert tok.decode(tokens[offsets[0]:offsets[1]].tolist()) == first_doc

    b = next(it)
    x, y, seg, mask = b["inputs"], b["targets"], b["segment_ids"], b["loss_mask"]
    assert x.shape == (gbatch, seq_len) and np.array_equal(x[:, 1:], y[:, :-1])
    assert np.all(mask[x == EOS_ID] == 0)  # EOS ends its document: never predict across
    assert np.all(seg > 0) and np.all(mask[x != EOS_ID] == 1)

    # Multi-host: local slices concatenate to the global batch, for train and validation.
    glob = [it.batch(s) for s in (0, 5)]
    val = val_fn()
    for P in (2, 4):
        parts = [data.make_datasets(seq_len, gbatch, 1, p, P, data_dir=data_dir) for p in range(P)]
        for s, g in zip((0, 5), glob):
            for k in KEYS:
                local = [pi[0].batch(s)[k] for pi in parts]
                np.testing.assert_array_equal(np.concatenate(local), g[k])
        pv = [pi[1]() for pi in parts]
        for i, g in enumerate(val):
            for k in KEYS:
                np.testing.assert_array_equal(np.concatenate([v[i][k] for v in pv]), g[k])

    # Validation: fixed, unshuffled prefix of the validation stream, padded at the very end.
    assert all(np.array_equal(a[k], b[k]) for a, b in zip(val, val_fn()) for k in KEYS)
    flat = np.concatenate([v["inputs"].ravel() for v in val])
    np.testing.assert_array_equal(flat[:len(tokens)], tokens)
    assert np.all(flat[len(tokens):] == PAD_ID) and len(val_fn(2)) == 2
    last = val[-1]
    assert last["loss_mask"][-1, -1] == 0 and last["segment_ids"][-1, -1] == 0
    for v in val:
        check_boundaries_by_eos(v)


def check_boundaries_by_eos(b):
    """On real tokens: a segment starts exactly after an EOS (or at a row start)."""
    x, seg, pos, mask = b["inputs"], b["segment_ids"], b["positions"], b["loss_mask"]
    live = seg[:, 1:] > 0
    new = seg[:, 1:] != seg[:, :-1]
    np.testing.assert_array_equal(new[live], (x[:, :-1] == EOS_ID)[live])
    assert np.all(pos[:, 1:][new] == 0)
    assert np.all(mask[(x == EOS_ID) | (seg == 0)] == 0)


def test_stale_corpus_warns(real, monkeypatch):
    monkeypatch.setattr(data, "corpus_fingerprint", lambda include_docs=False: "0" * 64)
    with pytest.warns(UserWarning, match="another corpus"):
        data.prepare_corpus(real[0])
