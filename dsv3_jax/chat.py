"""The chat template, conversations from JSONL, and SFT packing with per-sample masking.

Template (ids; <|user|> <|assistant|> <|end|> are special tokens added to the tokenizer):

  <|user|> {user text} <|end|> <|assistant|> {assistant text} <|end|> <|user|> ...

Loss only on assistant tokens: the mask is 1 on the assistant's text and its <|end|> (what the
model must produce, including when to stop), 0 on the roles, the user's text and padding.

Special tokens: the pre-trained tokenizer has exactly 8192 tokens (= model.vocab_size). The three
chat tokens are added after them (ids 8192-8194), as `tokenizer.add_special_tokens` +
`resize_token_embeddings` do in HF; the chat model's vocabulary is 8256 (a multiple of 64) and
`resize_vocab` grows a pre-trained checkpoint's embedding and head (new rows = the mean of the
old ones). Reusing rare BPE ids as markers would keep the shape but could collide with text.

Digits: the chat tokenizer splits every digit into its own token (a `Digits(individual_digits)`
pre-tokenizer before the byte-level one; the released DeepSeek-V3 tokenizer also splits numbers
in its pre-tokenizer). The stdlib BPE merges digits irregularly ("987654" -> 9|87|65|4, " 46"
-> "Ġ4"|"6"), so the same digit would have a different token at a different place; one token per
digit gives every number the same, aligned structure. Decoding is unchanged (byte-level).
`digits="reversed"` (config `sft.digits`) also writes every number least-significant digit
first in token space, the order that makes addition carry-local for small transformers (Lee et
al. 2023, "Teaching Arithmetic to Small Transformers"); the text in and out is unchanged. The
choice is recorded in the checkpoint (data_info `chat_digits`) and read back by `evaluate` and
`grpo` (`checkpoint_digits`). `digits="place"` writes numbers least-significant digit first with
a token per (digit, place): `PlaceDigits`; the new tokens start from their digit's pre-trained
embedding and head rows (`new_token_rows`).

Packing (report §5.1 "sample masking"): whole samples are packed into rows of seq_len, each its
own segment (positions restart, attention never crosses segments: `segment_ids`), no loss where
the target is in another sample.
"""
from __future__ import annotations

import json
import os
import re

import numpy as np
from tokenizers import pre_tokenizers

from dsv3_jax import tokenizer as tok_lib
from dsv3_jax.config import ConfigError

CHAT_TOKENS = ("<|user|>", "<|assistant|>", "<|end|>")
USER_ID, ASSISTANT_ID, END_ID = 8192, 8193, 8194
CHAT_VOCAB = 8256
ROLE_IDS = {"user": USER_ID, "assistant": ASSISTANT_ID}
DIGIT_ORDERS = ("split", "reversed", "place")
# digits="place": digit d at place p (0 = units) of its number is token PLACE_BASE + 10 p + d; places
# >= PLACES share the last place's tokens (ids 8200-8249: past the FIM ids 8195-8197, within
# CHAT_VOCAB)
PLACE_BASE, PLACES = 8200, 5


def chat_tokenizer(path=None, digits: str = "split"):
    """The pre-trained tokenizer + chat tokens + one token per digit; digits="reversed" also
    writes every number least-significant digit first in token space (`ReversedDigits`)."""
    if digits not in DIGIT_ORDERS:
        raise ConfigError(f"sft.digits must be one of {DIGIT_ORDERS}, got {digits!r}")
    tok = tok_lib.load_tokenizer(path)
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.add_special_tokens(list(CHAT_TOKENS))
    for want, name in zip((USER_ID, ASSISTANT_ID, END_ID), CHAT_TOKENS):
        if tok.token_to_id(name) != want:
            raise ValueError(f"chat token {name} got id {tok.token_to_id(name)}, not {want}")
    tok.encode_special_tokens = True      # text spelling "<|end|>" stays text
    if digits == "place":
        return PlaceDigits(tok)
    return ReversedDigits(tok) if digits == "reversed" else tok


def reverse_digit_runs(text: str) -> str:
    """Every maximal run of ASCII digits written backwards ("x=473, 12" -> "x=374, 21"); its own
    inverse, since the runs stay where they are."""
    return re.sub("[0-9]+", lambda m: m.group(0)[::-1], text)


class _DigitFormat:
    """A chat tokenizer whose numbers are written another way in token space (`digits` names
    the way); everything but encode/decode is the wrapped tokenizer's."""

    digits = "split"

    def __init__(self, tok):
        self._tok = tok

    def __getattr__(self, name):
        return getattr(self._tok, name)


class ReversedDigits(_DigitFormat):
    """The chat tokenizer with every number least-significant digit first in token space: text
    in and text out are unchanged (encode reverses each digit run, decode reverses it back), so
    "What is 473 + 511?" is fed as ... 3|7|4 ... 1|1|5 and the answer 984 is generated 4, 8, 9."""

    digits = "reversed"

    def encode(self, text, *a, **kw):
        return self._tok.encode(reverse_digit_runs(text), *a, **kw)

    def decode(self, ids, *a, **kw):
        return reverse_digit_runs(self._tok.decode(ids, *a, **kw))


class _Ids:
    def __init__(self, ids):
        self.ids = ids


class PlaceDigits(_DigitFormat):
    """The chat tokenizer with place-value digit tokens: every number least-significant digit
    first, each digit a token of its own place (units, tens, hundreds, ...), so "What is 473 +
    51?" is fed as ... 3@0 7@1 4@2 ... 1@0 5@1 and the answer 524 is generated 4@0 2@1 5@2. A
    digit's token says which power of ten it carries, which the causal model cannot otherwise
    see at that token (a number's length is known only at its end); it is the token-space form of
    per-digit place embeddings (McLeish et al. 2024, "Abacus embeddings"). Text in and out is
    unchanged; the other text is the split tokenizer's tokens."""

    digits = "place"

    def encode(self, text, *a, **kw):
        ids = []
        for part in re.split("([0-9]+)", text):
            if part.isdigit() and part.isascii():
                ids += [place_id(int(d), p) for p, d in enumerate(reversed(part))]
            elif part:
                ids += self._tok.encode(part, *a, **kw).ids
        return _Ids(ids)

    def decode(self, ids, *a, **kw):
        out, text_ids, run = [], [], []
        for i in list(ids) + [None]:
            if i is not None and PLACE_BASE <= i < PLACE_BASE + 10 * PLACES:
                if text_ids:
                    out.append(self._tok.decode(text_ids, *a, **kw))
                    text_ids = []
                run.append(str((i - PLACE_BASE) % 10))
                continue
            if run:
                out.append("".join(reversed(run)))
                run = []
            if i is not None:
                text_ids.append(i)
        if text_ids:
            out.append(self._tok.decode(text_ids, *a, **kw))
        return "".join(out)


def place_id(digit: int, place: int) -> int:
    return PLACE_BASE + 10 * min(place, PLACES - 1) + digit


def new_token_rows(digits: str) -> dict[int, int]:
    """{new id: pre-trained id whose embedding and head rows it starts from}: each place-value
    digit token starts as its digit's token (other new tokens start as the mean row)."""
    if digits != "place":
        return {}
    tok = tok_lib.load_tokenizer()
    return {place_id(d, p): tok.token_to_id(str(d)) for p in range(PLACES) for d in range(10)}


def digits_of(tok) -> str:
    return getattr(tok, "digits", "split")


def checkpoint_digits(path: str) -> str:
    """The digit order a chat checkpoint was trained with (its data_info's `chat_digits`;
    "split" for other formats and for runs that did not record one)."""
    from dsv3_jax.ckpt import load
    if not path:
        return "split"
    return load.data_info(os.path.expanduser(path)).get("chat_digits", "split")


def render(tok, messages: list[dict], add_generation_prompt: bool = False):
    """(ids, mask) of a conversation; with add_generation_prompt, ends with <|assistant|> for the
    model to continue (mask then all 0)."""
    ids, mask = [], []
    for m in messages:
        role = m["role"]
        if role not in ROLE_IDS:
            raise ValueError(f"unknown role {role!r} (user, assistant)")
        body = tok.encode(m["content"]).ids + [END_ID]
        learn = 1 if role == "assistant" else 0
        ids += [ROLE_IDS[role]] + body
        mask += [0] + [learn] * len(body)
    if add_generation_prompt:
        ids.append(ASSISTANT_ID)
        mask.append(0)
    return ids, mask


def prompt_ids(tok, user_text: str) -> list[int]:
    return render(tok, [{"role": "user", "content": user_text}], add_generation_prompt=True)[0]


def read_jsonl(path: str) -> list[list[dict]]:
    """Conversations from JSONL: one {"messages": [{"role", "content"}, ...]} per line."""
    out = []
    with open(path) as f:
        for i, line in enumerate(f, 1):
            if line.strip():
                rec = json.loads(line)
                msgs = rec["messages"] if isinstance(rec, dict) else rec
                out.append(msgs)
    return out


def pack(samples: list[tuple[list[int], list[int]]], seq_len: int) -> dict[str, np.ndarray]:
    """Samples (ids, mask) packed in order into rows (a sample never split; one longer than
    seq_len + 1 is truncated). Returns [rows, seq_len] inputs/targets/positions/segment_ids
    (int32) and loss_mask (float32)."""
    rows, cur = [], []
    for ids, mask in samples:
        ids, mask = ids[:seq_len + 1], mask[:seq_len + 1]
        if cur and sum(len(s[0]) for s in cur) + len(ids) > seq_len + 1:
            rows.append(cur)
            cur = []
        cur.append((ids, mask))
    if cur:
        rows.append(cur)
    n, width = len(rows), seq_len + 1
    tok = np.zeros((n, width), np.int32)
    seg = np.zeros((n, width), np.int32)
    pos = np.zeros((n, width), np.int32)
    lm = np.zeros((n, width), np.float32)
    for r, row in enumerate(rows):
        o = 0
        for k, (ids, mask) in enumerate(row, 1):
            tok[r, o:o + len(ids)] = ids
            seg[r, o:o + len(ids)] = k
            pos[r, o:o + len(ids)] = np.arange(len(ids))
            lm[r, o:o + len(ids)] = mask
            o += len(ids)
    same = (seg[:, 1:] == seg[:, :-1]) & (seg[:, :-1] > 0)
    return {"inputs": tok[:, :-1].copy(), "targets": tok[:, 1:].copy(),
            "positions": pos[:, :-1].copy(), "segment_ids": seg[:, :-1].copy(),
            "loss_mask": (lm[:, 1:] * same).astype(np.float32)}


def resize_vocab(variables: dict, vocab: int, copy_rows: dict[int, int] | None = None) -> dict:
    """A checkpoint's variables with the embedding [V, D] and head [D, V] grown to `vocab`
    (new entries: the mean of the existing ones, or for new id i in copy_rows a copy of
    entry copy_rows[i])."""
    p = dict(variables["params"])
    emb, head = np.asarray(p["embed"]), np.asarray(p["lm_head"])
    old = emb.shape[0]
    if vocab < old:
        raise ValueError(f"cannot shrink the vocabulary from {old} to {vocab}")
    p["embed"] = np.concatenate([emb, np.repeat(emb.mean(0, keepdims=True), vocab - old, 0)])
    p["lm_head"] = np.concatenate([head, np.repeat(head.mean(1, keepdims=True), vocab - old, 1)],
                                  1)
    for new, src in (copy_rows or {}).items():
        if not old <= new < vocab or not 0 <= src < old:
            raise ValueError(f"copy_rows: new id {new} must be in [{old}, {vocab}), source {src} "
                             f"in [0, {old})")
        p["embed"][new], p["lm_head"][:, new] = emb[src], head[:, src]
    return dict(variables, params=p)
