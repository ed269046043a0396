"""Fill-in-the-Middle (report §4.1; DeepSeekCoder's PSM format) for pre-training and scoring.

A document's tokens (its trailing <|eos|> set aside) are cut at two points into prefix, middle
and suffix, and rearranged as

  <|fim_begin|> prefix <|fim_hole|> suffix <|fim_end|> middle <|eos|>

so next-token prediction on it teaches the model to write a middle from its two sides; the other
documents stay as they are. The report applies it at a rate of 0.1 (`data.fim_rate`). The cut is
made on the tokens of the document cache (both points uniform over the token boundaries), not on
characters: the stream never re-tokenizes, and a middle always starts at a token boundary.

Special tokens: appended after the pre-trained vocabulary (8192 tokens) and after the three chat
tokens of `dsv3_jax.chat` (8192-8194), so one id means one thing in every stage: <|fim_begin|>
8195, <|fim_hole|> 8196, <|fim_end|> 8197. A model trained with FIM needs model.vocab_size >= 8198
(8256, the chat vocabulary, holds both). `fim_tokenizer` adds them to the pre-training tokenizer
(no other change, so text encodes as in pre-training).
"""
from __future__ import annotations

import numpy as np

FIM_TOKENS = ("<|fim_begin|>", "<|fim_hole|>", "<|fim_end|>")
FIM_BEGIN_ID, FIM_HOLE_ID, FIM_END_ID = 8195, 8196, 8197
MIN_VOCAB = FIM_END_ID + 1
SPECIALS = 3          # tokens a FIM document gains


def fim_tokenizer(path=None):
    """The pre-training tokenizer with the chat and FIM special tokens at their fixed ids."""
    from dsv3_jax import chat, tokenizer as tok_lib
    tok = tok_lib.load_tokenizer(path)
    tok.add_special_tokens(list(chat.CHAT_TOKENS) + list(FIM_TOKENS))
    for want, name in zip((FIM_BEGIN_ID, FIM_HOLE_ID, FIM_END_ID), FIM_TOKENS):
        if tok.token_to_id(name) != want:
            raise ValueError(f"FIM token {name} got id {tok.token_to_id(name)}, not {want}")
    tok.encode_special_tokens = True      # text spelling "<|fim_hole|>" stays text
    return tok


def psm(doc: np.ndarray, i: int, j: int, eos_id: int) -> np.ndarray:
    """The reference transform of one document `doc` (ending with eos_id), cut at body positions
    0 <= i <= j <= len(body): begin, prefix, hole, suffix, end, middle, eos."""
    body = np.asarray(doc[:-1])
    if doc[-1] != eos_id or not 0 <= i <= j <= len(body):
        raise ValueError(f"psm: need a document ending in eos and 0 <= i <= j <= {len(body)}")
    return np.concatenate([[FIM_BEGIN_ID], body[:i], [FIM_HOLE_ID], body[j:], [FIM_END_ID],
                           body[i:j], [eos_id]]).astype(doc.dtype)


def choose(rng: np.random.Generator, lengths: np.ndarray, rate: float):
    """One epoch's FIM decisions: exactly round(rate * docs) documents (so every epoch has the
    same length), each with two sorted cut points uniform over its body's token boundaries.
    Returns (fim [docs] bool, i [docs], j [docs]) (i = j = 0 where not FIM)."""
    n_docs = len(lengths)
    fim = np.zeros(n_docs, bool)
    fim[rng.choice(n_docs, int(round(rate * n_docs)), replace=False)] = True
    body = lengths - 1
    cuts = np.sort(rng.integers(0, body[:, None] + 1, (n_docs, 2)), axis=1)
    return fim, np.where(fim, cuts[:, 0], 0), np.where(fim, cuts[:, 1], 0)


def token_at(tokens: np.ndarray, start: np.ndarray, length: np.ndarray, i: np.ndarray,
             j: np.ndarray, t: np.ndarray) -> np.ndarray:
    """Token t of the PSM form of the FIM documents starting at tokens[start] (length tokens,
    eos last; cut at i <= j): the vectorised `psm`, elementwise."""
    n = length - 1                                # body length
    suffix_end = i + 2 + (n - j)                  # index of <|fim_end|>
    src = np.select(
        [t <= i, t < suffix_end, t <= n + 2],
        [start + t - 1, start + j + (t - i - 2), start + i + (t - suffix_end - 1)],
        start + n)                                # t = n + 3: the eos
    out = tokens[np.clip(src, 0, len(tokens) - 1)].astype(np.int64)
    out = np.where(t == 0, FIM_BEGIN_ID, out)
    out = np.where(t == i + 1, FIM_HOLE_ID, out)
    return np.where(t == suffix_end, FIM_END_ID, out)


def prompt(tok, prefix: str, suffix: str) -> list[int]:
    """The PSM prompt the model completes with the middle: begin prefix hole suffix end."""
    return ([FIM_BEGIN_ID] + tok.encode(prefix).ids + [FIM_HOLE_ID] + tok.encode(suffix).ids
            + [FIM_END_ID])


def score(cfg, variables, prompt_ids: list[int], middle_ids: list[int]) -> tuple[float, int]:
    """(sum of log p(middle token | prompt, middle so far), count) under the main head: how well
    the model fills the hole with `middle_ids` (end it with <|eos|> to score stopping too)."""
    import jax
    import jax.numpy as jnp
    from dsv3_jax import model
    ids = jnp.asarray([list(prompt_ids) + list(middle_ids)], jnp.int32)
    out = model.forward(cfg, variables, ids, with_mtp=False)
    logp = jax.nn.log_softmax(out.logits[0].astype(jnp.float32), axis=-1)
    first = len(prompt_ids) - 1                   # the position that predicts middle[0]
    picked = logp[first:first + len(middle_ids)][jnp.arange(len(middle_ids)),
                                                 jnp.asarray(middle_ids)]
    return float(picked.sum()), len(middle_ids)
