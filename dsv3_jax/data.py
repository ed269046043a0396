"""Training data: a real, offline corpus packed into fixed-length rows for next-token prediction.

Corpus. The CPython standard library's own `.py` sources, found at run time with
`sysconfig.get_paths()["stdlib"]`, so every machine with Python has it and needs no network.
Excluded: site-/dist-packages, `__pycache__`, test directories (`test`, `tests`, `idle_test`: large
and full of deliberately odd files), `pydoc_data/` (a 750 KB generated dump of the docs),
`_sysconfigdata*.py` (build paths of this machine) and the generated charmap tables in `encodings/`.
Files are sorted by path; one file is one document. The optional config `stdlib_docs` adds the
Python documentation sources (`/usr/share/doc/python3.X/html/_sources/**/*.rst.txt`, Debian package
`python3.X-doc`) as English prose. The corpus is identical on machines with the same Python build
(same version and distribution; Debian patches its stdlib); `corpus_fingerprint()` is a sha256 over
the file names and contents and is stored in the dataset info. License: the sources and docs are
under the PSF License Agreement (Python Software Foundation License Version 2).

Pipeline. (1) `StdlibCorpus`, a tensorflow-datasets builder, writes the documents once into a TFDS
data dir as ArrayRecord (readable without TensorFlow through `builder.as_data_source()`), split by a
hash of the file path into train and ~2% validation. (2) Each split is tokenized once with the
byte-level BPE of `dsv3_jax.tokenizer` into a flat uint16 array with `<|eos|>` after every document,
plus an int64 array of document offsets; both are cached next to the TFDS data, keyed by corpus
fingerprint and tokenizer hash. (3) `PackedBatches` cuts rows out of the stream of documents.

Packing. Each epoch is the documents in an order shuffled from (seed, epoch); epochs are
concatenated into one endless token stream, and global row r is stream[r*T : r*T + T] with targets
stream[r*T+1 : r*T+T+1]. Every stream token is thus predicted exactly once per epoch and no token is
dropped. A document longer than what is left of a row continues in the next row as a new segment
whose positions restart at 0: the model cannot attend across rows anyway, and restarting keeps
positions in [0, T), the range the model sees at inference. With `document_masking=False` (the
report's pre-training choice, §4.1) a row is one attention span: segment ids are 1 on every real
token (0 on padding) and positions run 0..T-1, so documents see the ones before them in the row;
the loss mask is the same either way (no target is the first token of the next document). SFT
uses masking. Batch step s holds global rows
[s*B, (s+1)*B), so a batch is a pure function of (seed, step): the iterator state is just the step.

Retrieval samples. With `passkey_rate` p > 0, each global row is, with probability p (drawn from
(seed, row)), replaced by passkey samples (`long_context_eval.random_passkey`: a 5-digit key
planted at a uniform depth of training code, the sample ending in the query and the key):
seq_len // passkey_len samples of passkey_len tokens (0: one of the whole row), each its own
segment whatever document_masking says, the rest of the row padding; the loss is on every token
(`passkey_loss="all"`) or on the key only ("answer"). The long-context stage's way to teach
retrieval to a model too small to have learned it (the evaluation uses validation code and
other keys).
"""
from __future__ import annotations

import hashlib
import os
import sys
import sysconfig
import warnings
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds

from dsv3_jax import fim
from dsv3_jax.errors import UserError
from dsv3_jax.tokenizer import EOS_ID, PAD_ID, Tokenizer, load_tokenizer, tokenizer_hash



class DataError(UserError):
    """Data that cannot be used as given (batching, seeds, a stored position, an empty split)."""


DATASET_NAME = "dsv3_stdlib_corpus"
DEFAULT_DATA_DIR = "~/.cache/dsv3_jax/tfds"
VAL_PER_MILLE = 20  # ~2% of documents go to validation
MAX_CORPUS_BYTES = 32 << 20  # guard: stop adding files past this (sorted order, so deterministic)
_SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test",
              "pydoc_data"}
_CHARMAP_HEADER = '""" Python Character Mapping Codec'  # gencodec.py output in encodings/


# ---------------------------------------------------------------------------------------- corpus
def _docs_root() -> Path:
    return Path(f"/usr/share/doc/python{sys.version_info.major}.{sys.version_info.minor}"
                "/html/_sources")


def _walk(root: Path, suffix: str):
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in _SKIP_DIRS]
        for f in filenames:
            p = Path(dirpath, f)
            if f.endswith(suffix) and not p.is_symlink():  # symlinks point at machine config
                yield p.relative_to(root).as_posix(), p


def corpus_documents(include_docs: bool = False) -> list[tuple[str, str]]:
    """The corpus as sorted (name, text) pairs; names are 'stdlib/<relpath>' or 'docs/<relpath>'."""
    sources = [("stdlib", Path(sysconfig.get_paths()["stdlib"]), ".py")]
    if include_docs:
        sources.append(("docs", _docs_root(), ".rst.txt"))
    files = []
    for prefix, root, suffix in sources:
        found = sorted((f"{prefix}/{rel}", p) for rel, p in _walk(root, suffix))
        if not found:
            hint = " (install the Debian package python3.X-doc)" if prefix == "docs" else ""
            raise FileNotFoundError(f"no {suffix} corpus files found under {root}{hint}")
        files += found
    docs, total = [], 0
    for name, path in sorted(files):
        if name.startswith("stdlib/_sysconfigdata"):
            continue
        try:
            text = path.read_bytes().decode("utf-8")
        except UnicodeDecodeError:
            continue  # none in the stdlib proper; skipping keeps the tokenizer input clean text
        if name.startswith("stdlib/encodings/") and text.startswith(_CHARMAP_HEADER):
            continue  # generated lookup tables, no language to learn
        if total + len(text) > MAX_CORPUS_BYTES:
            break
        docs.append((name, text))
        total += len(text)
    return docs


def _fingerprint(docs) -> str:
    h = hashlib.sha256()
    for name, text in docs:
        data = text.encode()
        h.update(f"{name}\0{len(data)}\0".encode())
        h.update(data)
    return h.hexdigest()


def corpus_fingerprint(include_docs: bool = False) -> str:
    """sha256 over the corpus file names and contents (changes with the Python build)."""
    return _fingerprint(corpus_documents(include_docs))


def is_validation(name: str) -> bool:
    """Deterministic ~2% split by a hash of the document name (stable as files come and go)."""
    h = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "little")
    return h % 1000 < VAL_PER_MILLE


# ------------------------------------------------------------------------------------------ TFDS
class StdlibCorpus(tfds.core.GeneratorBasedBuilder):
    """CPython stdlib sources (+ optional Python docs), one document per file."""

    name = DATASET_NAME
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Stdlib .py sources, optional docs; sha256-of-path validation split."}
    BUILDER_CONFIGS = [
        tfds.core.BuilderConfig(name="stdlib", description="CPython stdlib .py sources."),
        tfds.core.BuilderConfig(name="stdlib_docs", description="stdlib + Python docs (.rst.txt)."),
    ]
    # Nothing is downloaded, so there is no checksums file to look up; the lookup would also import
    # `importlib_resources`, which TFDS 4.9.10 uses without declaring it as a dependency.
    _checksums_path = None

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self, description=__doc__.split("\n\n")[1],
            features=tfds.features.FeaturesDict({"name": tfds.features.Text(),
                                                 "text": tfds.features.Text()}),
            license="PSF License Agreement (Python Software Foundation License Version 2)",
            metadata=tfds.core.MetadataDict())

    def _split_generators(self, dl_manager):
        docs = corpus_documents(include_docs=self.builder_config.name == "stdlib_docs")
        # Saved with the dataset info, so the prepared data says which corpus it holds.
        self.info.metadata.update(corpus_fingerprint=_fingerprint(docs),
                                  python_version=sys.version.split()[0])
        val = [d for d in docs if is_validation(d[0])]
        train = [d for d in docs if not is_validation(d[0])]
        return {"train": self._generate_examples(train), "validation": self._generate_examples(val)}

    def _generate_examples(self, docs):
        for name, text in docs:
            yield name, {"name": name, "text": text}


def resolve_data_dir(data_dir: str | os.PathLike | None = None) -> Path:
    """Argument, else $DSV3_DATA_DIR, else ~/.cache/dsv3_jax/tfds."""
    return Path(data_dir or os.environ.get("DSV3_DATA_DIR") or DEFAULT_DATA_DIR).expanduser()


def prepare_corpus(data_dir=None, config: str = "stdlib") -> StdlibCorpus:
    """Builds the TFDS dataset once (a no-op when already prepared) and returns its builder.

    With several processes on one shared data dir, run this (`python -m dsv3_jax.data`) once
    before launching them, rather than letting them all build at the same time.
    """
    builder = StdlibCorpus(data_dir=str(resolve_data_dir(data_dir)), config=config,
                           file_format="array_record")  # readable without TensorFlow
    if builder.is_prepared():
        _warn_if_stale(builder)
    else:
        # try_download_gcs=False: never fetch anything; the corpus is local by construction.
        builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
            try_download_gcs=False))
    return builder


def _warn_if_stale(builder: StdlibCorpus) -> None:
    try:
        current = corpus_fingerprint(include_docs=builder.builder_config.name == "stdlib_docs")
    except FileNotFoundError:
        return  # a copied data dir is usable without the corpus files
    stored = builder.info.metadata.get("corpus_fingerprint")
    if stored != current:
        warnings.warn(f"{builder.data_dir} was prepared from another corpus ({stored} vs this "
                      f"machine's {current}); using it as is. Delete it to re-prepare.")


def load_split_texts(builder: StdlibCorpus, split: str) -> list[tuple[str, str]]:
    """(name, text) of one split, sorted by name, read through TFDS's random-access source."""
    source = builder.as_data_source(split=split)
    records = source.__getitems__(range(len(source)))
    docs = sorted((r["name"].decode(), r["text"].decode()) for r in records)
    if not docs:
        raise DataError(f"split {split!r} of {builder.data_dir} is empty")
    return docs


# ---------------------------------------------------------------------------------- token cache
def tokenize_split(builder: StdlibCorpus, split: str, tokenizer: Tokenizer):
    """(tokens uint16 [N], offsets int64 [D+1]); doc d is tokens[offsets[d]:offsets[d+1]] and ends
    with EOS. Cached on disk next to the TFDS data, keyed by corpus fingerprint + tokenizer hash."""
    key = "-".join([builder.builder_config.name, str(builder.version),
                    builder.info.metadata["corpus_fingerprint"][:16],
                    tokenizer_hash(tokenizer)[:16]])
    # builder.data_dir is <data_dir>/<name>/<config>/<version>; the cache goes in <data_dir>.
    cache = Path(builder.data_dir).parents[2] / "dsv3_tokens" / key
    tok_path, off_path = cache / f"{split}.tokens.npy", cache / f"{split}.offsets.npy"
    if tok_path.exists() and off_path.exists():
        return np.load(tok_path), np.load(off_path)
    texts = [text for _, text in load_split_texts(builder, split)]
    encodings = tokenizer.encode_batch_fast(texts)  # parallel, in Rust
    lengths = np.array([len(e.ids) + 1 for e in encodings], np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    tokens = np.empty(offsets[-1], np.uint16)
    for start, e in zip(offsets[:-1], encodings):
        tokens[start:start + len(e.ids)] = e.ids
    tokens[offsets[1:] - 1] = EOS_ID
    cache.mkdir(parents=True, exist_ok=True)
    for path, arr in ((tok_path, tokens), (off_path, offsets)):
        tmp = path.with_suffix(f".{os.getpid()}.tmp.npy")
        np.save(tmp, arr)
        os.replace(tmp, path)  # atomic: concurrent writers or a crash never leave a torn file
    return tokens, offsets


def unigram_entropy(tokens: np.ndarray) -> float:
    """Entropy of the token frequencies in nats/token: the loss of the best context-free model."""
    counts = np.bincount(np.asarray(tokens).ravel())
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


# -------------------------------------------------------------------------------------- packing
class _Stream:
    """Token stream = concatenated epochs of documents. Shuffled per epoch from (seed, epoch) when
    seed is given (endless), else documents in stored order, once (finite). With fim_rate > 0
    (seeded streams only) each epoch puts round(fim_rate * docs) documents, drawn anew from
    (seed, epoch), in FIM's PSM form (`dsv3_jax.fim`): 3 tokens longer each, so every epoch has
    the same length."""

    def __init__(self, tokens: np.ndarray, offsets: np.ndarray, seed: int | None,
                 fim_rate: float = 0.0):
        self.tokens, self.offsets, self.seed = tokens, np.asarray(offsets, np.int64), seed
        self.lengths = np.diff(self.offsets)
        self.n_docs = len(self.lengths)
        if self.n_docs == 0 or self.lengths.min() <= 0 or len(tokens) != int(self.offsets[-1]):
            raise ValueError("offsets must describe non-empty documents covering all tokens")
        if not 0.0 <= fim_rate <= 1.0 or (fim_rate and seed is None):
            raise ValueError(f"fim_rate must be in [0, 1] (seeded streams only), got {fim_rate}")
        self.fim_rate = float(fim_rate)
        n_fim = int(round(self.fim_rate * self.n_docs))
        self.n_tokens = int(self.offsets[-1]) + fim.SPECIALS * n_fim     # tokens per epoch
        self._epochs: dict[int, tuple] = {}

    def _epoch(self, epoch: int):
        if epoch not in self._epochs:
            if len(self._epochs) > 4:
                self._epochs.clear()
            cuts = None
            if self.seed is None:
                order = np.arange(self.n_docs)
            else:
                seq = np.random.SeedSequence([self.seed, epoch])
                order = np.random.Generator(np.random.PCG64(seq)).permutation(self.n_docs)
                if self.fim_rate:
                    rng = np.random.Generator(np.random.PCG64(
                        np.random.SeedSequence([self.seed, epoch, 1])))
                    cuts = fim.choose(rng, self.lengths, self.fim_rate)
            lengths = self.lengths + (fim.SPECIALS * cuts[0] if cuts else 0)
            self._epochs[epoch] = (order, np.cumsum(lengths[order]), lengths, cuts)
        return self._epochs[epoch]

    def lookup(self, pos: np.ndarray):
        """Token at each stream position, the document instance it belongs to (unique across
        epochs) and whether the position exists (always, unless finite)."""
        epoch, off = np.divmod(pos, self.n_tokens)
        valid = np.ones(pos.shape, bool) if self.seed is not None else epoch == 0
        tok = np.full(pos.shape, PAD_ID, np.int32)
        inst = np.full(pos.shape, -1, np.int64)
        for e in np.unique(epoch[valid]):
            m = valid & (epoch == e)
            order, ends, lengths, cuts = self._epoch(int(e))
            rank = np.searchsorted(ends, off[m], side="right")
            doc = order[rank]
            t = off[m] - (ends[rank] - lengths[doc])          # index within the document
            tok[m] = self.tokens[self.offsets[doc] + np.minimum(t, self.lengths[doc] - 1)]
            if cuts is not None:
                is_fim, i, j = (c[doc] for c in cuts)
                psm = fim.token_at(self.tokens, self.offsets[doc], self.lengths[doc], i, j, t)
                tok[m] = np.where(is_fim, psm, tok[m])
            inst[m] = e * self.n_docs + rank
        return tok, inst, valid


def _pack_rows(stream: _Stream, rows: np.ndarray, seq_len: int,
               document_masking: bool = True) -> dict[str, np.ndarray]:
    pos = rows[:, None] * seq_len + np.arange(seq_len + 1)  # T inputs + the next token as target
    tok, inst, valid = stream.lookup(pos)
    x_inst, y_inst, x_valid = inst[:, :-1], inst[:, 1:], valid[:, :-1]
    idx = np.arange(seq_len)
    starts = np.concatenate([np.ones_like(x_inst[:, :1], bool), x_inst[:, 1:] != x_inst[:, :-1]], 1)
    segment_ids = np.cumsum(starts, 1) * x_valid  # padding only trails, so cumsum stays 1, 2, ...
    positions = (idx - np.maximum.accumulate(np.where(starts, idx, 0), 1)) * x_valid
    if not document_masking:   # one attention span per row (padding still segment 0)
        segment_ids, positions = x_valid.astype(np.int64), idx[None] * x_valid
    return {"inputs": tok[:, :-1].copy(), "targets": tok[:, 1:].copy(),  # not views of one array
            "segment_ids": segment_ids.astype(np.int32), "positions": positions.astype(np.int32),
            # No loss on padding or where the target is the first token of the next document.
            "loss_mask": (x_valid & valid[:, 1:] & (x_inst == y_inst)).astype(np.float32)}


_PASSKEY_SALT = 0x9A55


def _check_batching(seq_len, global_batch, process_index, process_count):
    for name, v in (("seq_len", seq_len), ("global_batch", global_batch),
                    ("process_count", process_count)):
        if not isinstance(v, (int, np.integer)) or v <= 0:
            raise DataError(f"{name} must be a positive int, got {v!r}")
    if global_batch % process_count:
        raise DataError(f"global_batch={global_batch} is not divisible by "
                         f"process_count={process_count}")
    if not 0 <= process_index < process_count:
        raise DataError(f"process_index={process_index} not in [0, {process_count})")


class PackedBatches:
    """Endless iterator of this process's rows of each global batch (see the module docstring).

    State is {"step", "seed", "seq_len", "global_batch"} (JSON-serialisable and the same on every
    process); `set_state(get_state())` resumes with exactly the next batch. `batch(step)` gives
    random access.
    """

    def __init__(self, tokens, offsets, seq_len: int, global_batch: int, seed: int,
                 process_index: int = 0, process_count: int = 1, document_masking: bool = True,
                 fim_rate: float = 0.0, passkey_rate: float = 0.0, encode=None,
                 passkey_len: int = 0, passkey_loss: str = "all"):
        _check_batching(seq_len, global_batch, process_index, process_count)
        if not 0.0 <= passkey_rate <= 1.0 or (passkey_rate and encode is None):
            raise DataError(f"passkey_rate must be in [0, 1] (with a tokenizer), got "
                            f"{passkey_rate!r}")
        from dsv3_jax.long_context_eval import MIN_LEN
        if (passkey_len and not MIN_LEN <= passkey_len <= seq_len
                or passkey_loss not in ("all", "answer")):
            raise DataError(f"passkey_len must be 0 (the row) or in [{MIN_LEN}, seq_len="
                            f"{seq_len}] and passkey_loss 'all' or 'answer', got "
                            f"{passkey_len!r}, {passkey_loss!r}")
        if passkey_rate and not passkey_len and seq_len < MIN_LEN:
            raise DataError(f"passkey samples need rows of {MIN_LEN} tokens or more, got "
                            f"seq_len={seq_len}")
        self.passkey_rate, self._encode = float(passkey_rate), encode
        self.passkey_len, self.passkey_loss = int(passkey_len or seq_len), passkey_loss
        self._filler = tokens[tokens != EOS_ID] if passkey_rate else None
        if not isinstance(seed, (int, np.integer)) or seed < 0:
            raise DataError(f"seed must be a non-negative int, got {seed!r}")
        self._stream = _Stream(tokens, offsets, int(seed), fim_rate)
        self.seq_len, self.global_batch, self.seed = int(seq_len), int(global_batch), int(seed)
        self.local_batch = self.global_batch // process_count
        self._first_row = process_index * self.local_batch  # contiguous slice of the global batch
        self.step = 0
        self.document_masking = bool(document_masking)

    def batch(self, step: int) -> dict[str, np.ndarray]:
        rows = step * self.global_batch + self._first_row + np.arange(self.local_batch)
        out = _pack_rows(self._stream, rows, self.seq_len, self.document_masking)
        if self.passkey_rate:
            for i, row in enumerate(rows):
                sample = self._passkey_row(int(row))
                if sample is not None:
                    for k, v in sample.items():
                        out[k][i] = v
        return out

    def _passkey_row(self, row: int) -> dict[str, np.ndarray] | None:
        """Global row `row`'s passkey samples, or None if the row stays code."""
        from dsv3_jax.long_context_eval import random_passkey
        rng = np.random.default_rng([self.seed, _PASSKEY_SALT, row])
        if rng.random() >= self.passkey_rate:
            return None
        n = self.passkey_len
        out = {"inputs": np.zeros(self.seq_len, np.int32),
               "targets": np.zeros(self.seq_len, np.int32),
               "segment_ids": np.zeros(self.seq_len, np.int32),
               "positions": np.zeros(self.seq_len, np.int32),
               "loss_mask": np.zeros(self.seq_len, np.float32)}
        for k in range(self.seq_len // n):
            ids, is_answer = random_passkey(rng, self._encode, self._filler, n + 1)
            at = slice(k * n, (k + 1) * n)
            out["inputs"][at], out["targets"][at] = ids[:-1], ids[1:]
            out["segment_ids"][at], out["positions"][at] = k + 1, np.arange(n)
            out["loss_mask"][at] = is_answer[1:] if self.passkey_loss == "answer" else 1.0
        return out

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        out = self.batch(self.step)
        self.step += 1
        return out

    def get_state(self) -> dict:
        return {"step": self.step, "seed": self.seed, "seq_len": self.seq_len,
                "global_batch": self.global_batch, "fim_rate": self._stream.fim_rate,
                "passkey_rate": self.passkey_rate, "passkey_len": self.passkey_len,
                "passkey_loss": self.passkey_loss}

    def set_state(self, state: dict) -> None:
        """Resume at state["step"]; the stream's settings must be the ones that saved it (a
        state without a setting, from an older checkpoint, accepts this run's)."""
        mine = self.get_state()
        for k in ("seed", "seq_len", "global_batch", "fim_rate", "passkey_rate", "passkey_len",
                  "passkey_loss"):
            if state.get(k, mine[k]) != mine[k]:
                raise DataError(f"the checkpoint's data position was saved with {k}="
                                f"{state[k]}, this run has data.{k}={mine[k]}: use the config "
                                f"that wrote the checkpoint, or another --workdir")
        if not isinstance(state.get("step"), (int, np.integer)) or state["step"] < 0:
            raise DataError(f"bad iterator state {state!r}")
        self.step = int(state["step"])


def validation_batches(tokens, offsets, seq_len: int, global_batch: int,
                       num_batches: int | None = None, process_index: int = 0,
                       process_count: int = 1,
                       document_masking: bool = True) -> list[dict[str, np.ndarray]]:
    """The first num_batches*global_batch rows of the unshuffled validation stream (this process's
    slice of each batch). None = enough batches to cover the stream once; rows past its end are
    padding (loss_mask 0)."""
    _check_batching(seq_len, global_batch, process_index, process_count)
    stream = _Stream(tokens, offsets, None)
    if num_batches is None:
        rows_needed = -(-(stream.n_tokens - 1) // seq_len)  # every row has at least one target
        num_batches = -(-rows_needed // global_batch)
    local = global_batch // process_count
    return [_pack_rows(stream, s * global_batch + process_index * local + np.arange(local), seq_len,
                       document_masking) for s in range(num_batches)]


# ----------------------------------------------------------------------------------- entry point
def make_datasets(seq_len: int, global_batch: int, seed: int, process_index: int = 0,
                  process_count: int = 1, data_dir=None, config: str = "stdlib",
                  tokenizer_path=None, document_masking: bool = True, fim_rate: float = 0.0,
                  passkey_rate: float = 0.0, passkey_len: int = 0, passkey_loss: str = "all"):
    """Prepares (once) and returns (train_iter, val_batches_fn, tokenizer, info).

    train_iter: `PackedBatches`, yields this process's [global_batch/process_count, seq_len] slice.
    val_batches_fn(num_batches=None): list of validation batches (same format, fixed rows).
    Batch: dict of numpy arrays inputs/targets/segment_ids/positions int32, loss_mask float32.
    info: sizes, ids, fingerprints and the train stream's unigram entropy (nats/token).
    """
    _check_batching(seq_len, global_batch, process_index, process_count)
    builder = prepare_corpus(data_dir, config)
    tokenizer = load_tokenizer(tokenizer_path)
    train_tok, train_off = tokenize_split(builder, "train", tokenizer)
    val_tok, val_off = tokenize_split(builder, "validation", tokenizer)
    train_iter = PackedBatches(train_tok, train_off, seq_len, global_batch, seed, process_index,
                               process_count, document_masking, fim_rate, passkey_rate,
                               encode=lambda text: np.asarray(tokenizer.encode(text).ids,
                                                              np.int32),
                               passkey_len=passkey_len, passkey_loss=passkey_loss)

    def val_batches_fn(num_batches: int | None = None):
        return validation_batches(val_tok, val_off, seq_len, global_batch, num_batches,
                                  process_index, process_count, document_masking)

    info = {"vocab_size": tokenizer.get_vocab_size(), "pad_id": PAD_ID, "eos_id": EOS_ID,
            "train_tokens": len(train_tok), "train_docs": len(train_off) - 1,
            "val_tokens": len(val_tok), "val_docs": len(val_off) - 1,
            "steps_per_epoch": len(train_tok) / (seq_len * global_batch),
            "unigram_entropy": unigram_entropy(train_tok),
            "corpus_fingerprint": builder.info.metadata["corpus_fingerprint"],
            "tokenizer_sha256": tokenizer_hash(tokenizer), "data_dir": str(builder.data_dir)}
    return train_iter, val_batches_fn, tokenizer, info


if __name__ == "__main__":  # Prepare the default data dir once and report timings.
    import time

    t0 = time.perf_counter()
    it, val_fn, _, info = make_datasets(seq_len=512, global_batch=8, seed=0)
    t1 = time.perf_counter()
    next(it), val_fn(1)
    print(f"make_datasets {t1 - t0:.2f}s, first batches {time.perf_counter() - t1:.3f}s")
    print(info)
