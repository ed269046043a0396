"""Long-context evaluation (report §4.3, Figure 8 in miniature): loss versus position on held-out
documents longer than the training context, and a passkey (needle-in-a-haystack) grid over
context length x needle depth.

  nll = loss_by_position(cfg, variables, docs, seq_len)          # [seq_len] mean NLL per position
  buckets = bucket_means(nll, (0, 256, 1024, 4096))
  acc = passkey_grid(cfg, variables, tokenizer, filler, lengths=(256, 1024, 4096),
                     depths=(0, .25, .5, .75, 1), trials=4)     # [lengths, depths] exact match

The passkey is code-flavoured (a Python-only tokenizer): `secret = "4 8 2 1 3"` planted at a
chosen depth of real validation code, the prompt ending in the needle's own opening
`secret = "` (as the classic passkey prompt ends in "The pass key is"); a trial counts
when the model's greedy continuation is exactly the 5 digits. Greedy exact match equals "the
argmax at every key position, given the right prefix, is the right token", so one forward
pass per prompt scores it (`key_scores`, no sampling loop). Both functions work on any ModelConfig, so an
`evaluate` CLI can call them with a loaded checkpoint. `passkey_digits` is the finer view: per
key position, how often the right digit is the argmax and its NLL given the true prefix.

  python -m dsv3_jax.long_context_eval --checkpoint DIR [--lengths 64,256 --trials 4]
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from dsv3_jax import model
from dsv3_jax.config import ModelConfig

NEEDLE = '\nsecret = "{}"\n'
MIN_LEN = 48            # passkey samples shorter than this leave too little filler to hide in
QUERY = '\nsecret = "'


@functools.partial(jax.jit, static_argnums=0)
def _logits(cfg: ModelConfig, variables, ids_BT):
    return model.forward(cfg, variables, ids_BT, with_mtp=False).logits


@functools.partial(jax.jit, static_argnums=0)
def _token_nll(cfg: ModelConfig, variables, ids_BT):
    logits = _logits(cfg, variables, ids_BT[:, :-1]).astype(jnp.float32)
    logp = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.take_along_axis(logp, ids_BT[:, 1:, None], axis=-1)[..., 0]


def long_documents(tokens: np.ndarray, offsets: np.ndarray, min_len: int) -> list[np.ndarray]:
    """The documents (EOS included) with at least min_len tokens."""
    return [tokens[a:b].astype(np.int32) for a, b in zip(offsets[:-1], offsets[1:])
            if b - a >= min_len]


def loss_by_position(cfg: ModelConfig, variables, docs: list[np.ndarray], seq_len: int,
                     batch: int = 1) -> np.ndarray:
    """Mean next-token NLL at each position 0..seq_len-1 over the first seq_len + 1 tokens of each
    document (documents shorter than that are skipped). [seq_len] float64."""
    rows = np.stack([d[:seq_len + 1] for d in docs if len(d) >= seq_len + 1])
    if not len(rows):
        raise ValueError(f"no document has {seq_len + 1} tokens")
    out = [np.asarray(_token_nll(cfg, variables, jnp.asarray(rows[i:i + batch])))
           for i in range(0, len(rows), batch)]
    return np.concatenate(out).astype(np.float64).mean(0)


def bucket_means(nll: np.ndarray, edges) -> dict[str, float]:
    """{"[a,b)": mean NLL of positions a..b-1} for consecutive edges within the curve."""
    return {f"[{a},{b})": float(nll[a:b].mean()) for a, b in zip(edges[:-1], edges[1:])
            if a < len(nll)}


def passkey_prompt(encode, filler: np.ndarray, length: int, depth: float, digits: str,
                   start: int) -> tuple[np.ndarray, np.ndarray]:
    """(prompt + answer token ids, exactly `length` long; answer positions mask). The needle sits
    after `depth` of the filler tokens (taken from filler[start:])."""
    needle = encode(NEEDLE.format(digits))
    query, answer = encode(QUERY), encode(digits)
    n_fill = length - len(needle) - len(query) - len(answer)
    if n_fill < 0:
        raise ValueError(f"length {length} is shorter than the needle and the query")
    fill = filler[start:start + n_fill]
    cut = int(round(depth * n_fill))
    ids = np.concatenate([fill[:cut], needle, fill[cut:], query, answer]).astype(np.int32)
    is_answer = np.zeros(length, bool)
    is_answer[length - len(answer):] = True
    return ids, is_answer


def random_passkey(rng: np.random.Generator, encode, filler: np.ndarray, length: int,
                   depth: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """A passkey prompt of `length` tokens (`passkey_prompt`) with a random 5-digit key, at a
    random place in `filler`, at `depth` (uniform when None). Draws from rng: the key, the
    depth (if drawn), the filler start."""
    digits = " ".join(str(d) for d in rng.integers(0, 10, 5))
    depth = float(rng.random()) if depth is None else depth
    start = int(rng.integers(0, max(1, len(filler) - length)))
    return passkey_prompt(encode, filler, length, depth, digits, start)


def passkey_grid(cfg: ModelConfig, variables, encode, filler: np.ndarray, lengths, depths,
                 trials: int = 4, seed: int = 0) -> np.ndarray:
    """Exact-match rate [len(lengths), len(depths)] of the greedy 5-digit answer. `encode`:
    text -> token ids (list/array); `filler`: a long token stream of real code. Greedy decoding
    reproduces the key iff every key token is the argmax given the true prefix (`key_scores`)."""
    rng = np.random.default_rng(seed)
    acc = np.zeros((len(lengths), len(depths)))
    for li, length in enumerate(lengths):
        rows = [random_passkey(rng, encode, filler, length, depth)[0]
                for depth in depths for _ in range(trials)]
        ok = key_scores(cfg, variables, np.stack(rows))[0].all(1)
        acc[li] = ok.reshape(len(depths), trials).mean(1)
    return acc


def passkey_digits(cfg: ModelConfig, variables, encode, filler: np.ndarray, length: int,
                   n: int = 32, seed: int = 0) -> dict:
    """Per key position (5 digits) over n passkey prompts of `length` tokens at uniform depths:
    the argmax accuracy and the mean NLL (nats; chance is ln 10 = 2.30) given the true prefix."""
    rng = np.random.default_rng(seed)
    rows = [random_passkey(rng, encode, filler, length)[0] for _ in range(n)]
    hit, nll = key_scores(cfg, variables, np.stack(rows))
    return {"length": length, "n": n, "accuracy": hit.mean(0).tolist(),
            "nll": nll.mean(0).tolist()}


def key_scores(cfg: ModelConfig, variables, ids: np.ndarray, key_len: int = 5,
               batch: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """([N, key_len] bool, [N, key_len] NLL): for the last key_len tokens of each row, whether
    each is the argmax given the true prefix, and its negative log-probability."""
    hit, nll = [], []
    for i in range(0, len(ids), batch):
        logits = _logits(cfg, variables, jnp.asarray(ids[i:i + batch])).astype(jnp.float32)
        logp = np.asarray(jax.nn.log_softmax(logits[:, -key_len - 1:-1], -1))
        key = ids[i:i + batch, -key_len:]
        hit.append(logp.argmax(-1) == key)
        nll.append(-np.take_along_axis(logp, key[..., None], -1)[..., 0])
    return np.concatenate(hit), np.concatenate(nll)


def induction_accuracy(cfg: ModelConfig, variables, n: int = 8, length: int = 60,
                       seed: int = 0, low: int = 100) -> float:
    """Copying from context at all: n random token sequences of `length` ids in [low, vocab),
    each followed by itself; the share of the second copy's tokens (after its first) that are
    the argmax given the true prefix. An induction head gets ~1, a model without one ~0."""
    seq = np.random.default_rng(seed).integers(low, cfg.vocab_size, (n, length))
    ids = np.concatenate([seq, seq], 1).astype(np.int32)
    pred = np.asarray(jnp.argmax(_logits(cfg, variables, jnp.asarray(ids)), -1))
    return float((pred[:, length:-1] == ids[:, length + 1:]).mean())


def main(argv=None) -> int:
    import argparse
    import json

    from dsv3_jax import data
    from dsv3_jax.generate import load_checkpoint
    ap = argparse.ArgumentParser(prog="python -m dsv3_jax.long_context_eval",
                                 description="passkey exact match and per-digit scores of a "
                                             "checkpoint, on validation code")
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--lengths", default="256,1024,4096")
    ap.add_argument("--trials", type=int, default=4, help="prompts per (length, depth)")
    a = ap.parse_args(argv)
    lengths = [int(x) for x in a.lengths.split(",")]
    cfg, variables, _ = load_checkpoint(a.checkpoint)
    variables = {"params": variables["params"], "router_bias": variables["router_bias"]}
    tok = data.load_tokenizer()
    vt, _ = data.tokenize_split(data.prepare_corpus(), "validation", tok)
    filler = vt[vt != data.EOS_ID]
    encode = lambda text: np.asarray(tok.encode(text).ids, np.int32)
    depths = (0.0, 0.25, 0.5, 0.75, 1.0)
    print(json.dumps({"induction_accuracy": induction_accuracy(cfg, variables)}))
    grid = passkey_grid(cfg, variables, encode, filler, lengths, depths, a.trials)
    for length, row in zip(lengths, grid):
        d = passkey_digits(cfg, variables, encode, filler, length, 8 * a.trials)
        print(json.dumps({"length": length, "exact_match_by_depth": dict(zip(depths, row)),
                          "digit_accuracy": [round(x, 3) for x in d["accuracy"]],
                          "digit_nll": [round(x, 3) for x in d["nll"]]}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
