"""Rewards for RL (report §5.2.1): rule-based verifiers where the answer can be checked, and an
interface for model-based rewards.

A reward function maps a batch of (prompt text, completion text, problem record) to floats:

  class RewardFn(Protocol):
      def __call__(self, prompts: list[str], completions: list[str],
                   problems: list[dict]) -> list[float]

`exact_answer` (verifiers.py) and `python_tests` (sandbox.py: the code runs in a separate,
resource-limited process) are rule-based; a model-based reward (a reward model scoring the
completion) implements the same call, e.g. `ModelReward(score_fn)` below.
"""
from __future__ import annotations

from typing import Callable, Protocol

from dsv3_jax.rewards.sandbox import python_tests, run_python
from dsv3_jax.rewards.verifiers import exact_answer, extract_answer

__all__ = ["RewardFn", "ExactAnswer", "PythonTests", "ModelReward", "exact_answer",
           "extract_answer", "python_tests",
           "run_python"]


class RewardFn(Protocol):
    def __call__(self, prompts: list[str], completions: list[str],
                 problems: list[dict]) -> list[float]:
        ...


class ExactAnswer:
    """1 if the completion is exactly the problem's `answer` (format check included), else 0."""

    def __call__(self, prompts, completions, problems):
        return [exact_answer(c, p["answer"]) for c, p in zip(completions, problems)]


class PythonTests:
    """1 if prompt + completion passes the problem's `test` code in the sandbox, else 0."""

    def __init__(self, timeout: float = 5.0, memory_mb: int = 512):
        self.timeout, self.memory_mb = timeout, memory_mb

    def __call__(self, prompts, completions, problems):
        return [python_tests(p.get("prompt", q) + c, p["test"], p.get("entry_point"),
                             timeout=self.timeout, memory_mb=self.memory_mb)
                for q, c, p in zip(prompts, completions, problems)]


class ModelReward:
    """A model-based reward: score_fn(prompts, completions) -> floats (e.g. a reward model's
    scalar head); wrapped so the trainer calls every reward the same way."""

    def __init__(self, score_fn: Callable[[list[str], list[str]], list[float]]):
        self.score_fn = score_fn

    def __call__(self, prompts, completions, problems):
        return [float(x) for x in self.score_fn(prompts, completions)]


REWARDS = {"exact_answer": ExactAnswer, "python_tests": PythonTests}
