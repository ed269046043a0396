"""Rule-based answer verification: the format check, then an exact match."""
from __future__ import annotations

import re

_INT = re.compile(r"-?\d+")


def extract_answer(completion: str) -> str | None:
    """The answer if the completion has the required format, else None: the whole completion
    (surrounding whitespace aside) is one integer; nothing else before or after it."""
    text = completion.strip()
    return text if _INT.fullmatch(text) else None


def exact_answer(completion: str, gold) -> float:
    """1.0 if the completion is, in the required format, exactly the gold answer."""
    got = extract_answer(completion)
    if got is None:
        return 0.0
    return float(int(got) == int(gold))
