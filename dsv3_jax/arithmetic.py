"""The demonstration task: "What is A + B?" / "What is A - B?" (0 <= A, B < 1000); the answer is
the number alone.

Problems come from a seed. Held-out problems are a fixed 10% of the whole problem space (by a
hash of (A, op, B)): evaluation draws only from it and training (SFT, GRPO) never does, so the
two are disjoint whatever seeds they use; the default seeds differ as well.

`lengths="balanced"` (training data only; config `sft.lengths`) draws each operand's number of
digits uniformly from 1, 2, 3 before its value, instead of the value uniformly from 0..999 (where
1% of operands have one digit): the balanced sampling of Lee et al. 2023. Problems whose
operands are single digits are decided by the units digits alone.
"""
from __future__ import annotations

import hashlib

import numpy as np

TRAIN_SEED, RL_SEED, EVAL_SEED = 1, 2, 1000


def question(a: int, op: str, b: int) -> str:
    return f"What is {a} {op} {b}?"


def _held_out(a: int, op: str, b: int) -> bool:
    return hashlib.sha256(f"{a}{op}{b}".encode()).digest()[0] < 26     # ~10% of problems


LENGTHS = ("uniform", "balanced")


def problems(seed: int, n: int, split: str, lengths: str = "uniform") -> list[dict]:
    """n problems {question, answer, a, op, b} of split 'train' or 'eval', from `seed`;
    lengths: "uniform" (A, B uniform in 0..999) or "balanced" (digit counts uniform in 1..3)."""
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    if lengths not in LENGTHS:
        raise ValueError(f"lengths must be one of {LENGTHS}, got {lengths!r}")
    rng = np.random.default_rng([seed, 0 if split == "train" else 1])
    lows, highs = np.array([0, 10, 100]), np.array([10, 100, 1000])   # 1, 2, 3 digits
    out = []
    while len(out) < n:
        if lengths == "balanced":
            k = rng.integers(0, 3, 2)      # each operand's digit count - 1
            a, b = (int(x) for x in rng.integers(lows[k], highs[k]))
        else:
            a, b = (int(x) for x in rng.integers(0, 1000, 2))
        op = "+" if rng.random() < 0.5 else "-"
        if _held_out(a, op, b) != (split == "eval"):
            continue
        ans = a + b if op == "+" else a - b
        out.append({"question": question(a, op, b), "answer": ans, "a": a, "op": op, "b": b})
    return out


def conversations(probs: list[dict]) -> list[list[dict]]:
    return [[{"role": "user", "content": p["question"]},
             {"role": "assistant", "content": str(p["answer"])}] for p in probs]


def few_shot_prefix(k: int = 3, seed: int = 7) -> str:
    """A plain-text few-shot prompt for a base model (no chat tokens): Q/A lines."""
    return "".join(f"# {p['question']}\n# {p['answer']}\n" for p in problems(seed, k, "train"))
