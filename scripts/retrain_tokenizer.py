"""Retrain the committed byte-level BPE (dsv3_jax/assets/tokenizer.json) on the default corpus's
train split:  python scripts/retrain_tokenizer.py

Changing the asset changes every token id: checkpoints trained with the old one no longer match
(the trainer records the tokenizer's sha256 in each checkpoint's metadata).
"""
import time

from dsv3_jax import data
from dsv3_jax.tokenizer import ASSET_PATH, tokenizer_hash, train_tokenizer

if __name__ == "__main__":
    t0 = time.perf_counter()
    texts = [text for _, text in data.load_split_texts(data.prepare_corpus(), "train")]
    tok = train_tokenizer(texts, save_path=ASSET_PATH)
    print(f"trained on {len(texts)} docs in {time.perf_counter() - t0:.1f}s -> {ASSET_PATH} "
          f"(vocab {tok.get_vocab_size()}, sha256 {tokenizer_hash(tok)[:16]})")
