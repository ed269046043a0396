"""Byte-level BPE tokenizer (HF `tokenizers`) for the stdlib corpus of `dsv3_jax.data`.

Byte-level BPE needs no `<unk>`: every byte has a token, so any text round-trips exactly
(`decode(encode(text).ids) == text`). No normalizer and no automatic BOS/EOS: the data pipeline
appends `<|eos|>` (EOS_ID) itself after every document; text that spells a special token is
encoded as ordinary text. The committed asset `assets/tokenizer.json` was trained on
the train split of the default corpus; regenerate it with `python scripts/retrain_tokenizer.py`.
"""
from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

PAD_ID, EOS_ID = 0, 1
SPECIAL_TOKENS = ("<|pad|>", "<|eos|>")  # ids 0, 1 in this order
VOCAB_SIZE = 8192
ASSET_PATH = Path(__file__).parent / "assets" / "tokenizer.json"


def train_tokenizer(texts: Iterable[str], vocab_size: int = VOCAB_SIZE,
                    save_path: str | Path | None = None) -> Tokenizer:
    """Trains a byte-level BPE on `texts` (deterministic for the same texts in the same order)."""
    if not 256 + len(SPECIAL_TOKENS) <= vocab_size <= 65536:  # uint16 token storage
        raise ValueError(f"vocab_size must be in [{256 + len(SPECIAL_TOKENS)}, 65536], "
                         f"got {vocab_size}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=2, special_tokens=list(SPECIAL_TOKENS),
        # All 256 byte symbols up front, so even bytes unseen in training stay encodable.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    _setup_special_tokens(tok)
    if save_path is not None:
        Path(save_path).parent.mkdir(parents=True, exist_ok=True)
        tok.save(str(save_path))
    return tok


def load_tokenizer(path: str | Path | None = None) -> Tokenizer:
    """Loads a tokenizer JSON (default: the committed asset) and checks its special-token ids."""
    path = Path(path) if path is not None else ASSET_PATH
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer file not found: {path} "
                                "(regenerate the default one with `python scripts/retrain_tokenizer.py`)")
    tok = Tokenizer.from_file(str(path))
    _setup_special_tokens(tok)
    return tok


def tokenizer_hash(tok: Tokenizer) -> str:
    """sha256 of the tokenizer's canonical JSON; keys the token cache."""
    return hashlib.sha256(tok.to_str().encode()).hexdigest()


def _setup_special_tokens(tok: Tokenizer) -> None:
    # Encode a literal "<|eos|>" in a document as plain text, never as the control token, so only
    # the pipeline places EOS (not persisted in the JSON, hence set on every load).
    tok.encode_special_tokens = True
    for want, name in enumerate(SPECIAL_TOKENS):
        if tok.token_to_id(name) != want:
            raise ValueError(f"tokenizer must map {name} to id {want}, got {tok.token_to_id(name)}")
    if tok.get_vocab_size() > 65536:
        raise ValueError(f"vocab size {tok.get_vocab_size()} does not fit the uint16 token cache")
