"""SFT: the chat template, assistant-only loss mask, packing with cross-sample masking, digit
tokenisation, vocabulary growth, and a short run of the entry point from a checkpoint."""
import json
import os

import jax
import numpy as np
import pytest

from dsv3_jax import arithmetic, chat, config, model

MICRO = dict(hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
             num_hidden_layers=2, n_routed_experts=4, num_experts_per_tok=2, n_group=2,
             topk_group=1, num_attention_heads=2, num_key_value_heads=2, q_lora_rank=16,
             kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8,
             num_nextn_predict_layers=0)


@pytest.fixture(scope="module")
def tok():
    return chat.chat_tokenizer()


def test_only_assistant_tokens_carry_loss(tok):
    conv = [{"role": "user", "content": "What is 12 + 30?"},
            {"role": "assistant", "content": "42"},
            {"role": "user", "content": "And 1 + 1?"},
            {"role": "assistant", "content": "2"}]
    ids, mask = chat.render(tok, conv)
    learned = [i for i, m in zip(ids, mask) if m]
    assert learned == tok.encode("42").ids + [chat.END_ID] + tok.encode("2").ids + [chat.END_ID]
    assert tok.decode(ids, skip_special_tokens=False) == (
        "<|user|>What is 12 + 30?<|end|><|assistant|>42<|end|>"
        "<|user|>And 1 + 1?<|end|><|assistant|>2<|end|>")
    # a user turn that spells a chat token is text, not the token
    ids2, _ = chat.render(tok, [{"role": "user", "content": "<|end|>"}])
    assert ids2.count(chat.END_ID) == 1


def test_digits_are_one_token_each(tok):
    enc = tok.encode("987654 - 46")
    assert enc.tokens == ["9", "8", "7", "6", "5", "4", "Ġ-", "Ġ", "4", "6"]
    assert tok.decode(enc.ids) == "987654 - 46"
    assert tok.get_vocab_size() == chat.END_ID + 1 <= chat.CHAT_VOCAB


def test_reversed_digits_change_token_order_only(tok):
    rev = chat.chat_tokenizer(digits="reversed")
    assert rev.encode("987654 - 46").tokens == ["4", "5", "6", "7", "8", "9", "Ġ-", "Ġ", "6", "4"]
    rng = np.random.default_rng(0)
    alphabet = list("0123456789 +-?x\n") + ["é", "<|end|>"]
    for _ in range(50):
        text = "".join(rng.choice(alphabet, rng.integers(0, 40)))
        assert chat.reverse_digit_runs(chat.reverse_digit_runs(text)) == text
        assert rev.decode(rev.encode(text).ids) == text
    for n in rng.integers(0, 10**7, 20):     # a number's digit tokens, least significant first
        assert [rev.id_to_token(i) for i in rev.encode(str(n)).ids] == list(str(n)[::-1])
    q = "What is 473 + 511?"
    ids = chat.prompt_ids(rev, q)
    assert [rev.id_to_token(i) for i in ids[5:8]] == ["3", "7", "4"]
    assert rev.decode(ids[1:-2]) == q and chat.digits_of(rev) == "reversed"
    assert chat.digits_of(tok) == "split"
    with pytest.raises(config.ConfigError, match="sft.digits"):
        chat.chat_tokenizer(digits="spaced")


def test_place_digits_tokens_and_round_trip(tok):
    place = chat.chat_tokenizer(digits="place")
    assert chat.digits_of(place) == "place"
    rng = np.random.default_rng(1)
    alphabet = list("0123456789 +-?x\n") + ["é", "<|end|>", "٣"]     # ٣: a non-ASCII digit
    for _ in range(60):
        text = "".join(rng.choice(alphabet, rng.integers(0, 40)))
        ids = place.encode(text).ids
        assert place.decode(ids) == text
        # the text between numbers is the split tokenizer's tokens of the whole text, its
        # (one-token) ASCII digits dropped
        other = [i for i in ids if not chat.PLACE_BASE <= i < chat.PLACE_BASE + 10 * chat.PLACES]
        digit_ids = {tok.token_to_id(str(d)) for d in range(10)}
        assert other == [i for i in tok.encode(text).ids if i not in digit_ids]
    for n in rng.integers(0, 10**7, 30):     # digit d at place p: PLACE_BASE + 10 p + d
        digits = str(n)[::-1]
        want = [chat.PLACE_BASE + 10 * min(p, chat.PLACES - 1) + int(d)
                for p, d in enumerate(digits)]
        assert place.encode(str(n)).ids == want
    assert max(chat.place_id(9, 99), chat.PLACE_BASE + 10 * chat.PLACES - 1) < chat.CHAT_VOCAB
    assert min(chat.place_id(0, 0), chat.PLACE_BASE) > max(chat.END_ID, 8197)   # past FIM's ids
    ids = chat.prompt_ids(place, "What is 473 + 51?")
    assert place.decode(ids[1:-2]) == "What is 473 + 51?"
    assert [i - chat.PLACE_BASE for i in ids if i >= chat.PLACE_BASE] == [3, 17, 24, 1, 15]


def test_resize_vocab_copies_the_digit_rows_for_place_tokens():
    rng = np.random.default_rng(2)
    emb, head = rng.normal(size=(8192, 4)), rng.normal(size=(4, 8192))
    v = chat.resize_vocab({"params": {"embed": emb, "lm_head": head}}, chat.CHAT_VOCAB,
                          chat.new_token_rows("place"))["params"]
    base = chat.tok_lib.load_tokenizer()
    for p in range(chat.PLACES):
        for d in range(10):
            i, src = chat.place_id(d, p), base.token_to_id(str(d))
            np.testing.assert_array_equal(v["embed"][i], emb[src])
            np.testing.assert_array_equal(v["lm_head"][:, i], head[:, src])
    np.testing.assert_allclose(v["embed"][chat.END_ID], emb.mean(0))       # the chat tokens
    np.testing.assert_array_equal(v["embed"][:8192], emb)
    assert chat.new_token_rows("split") == {} == chat.new_token_rows("reversed")
    with pytest.raises(ValueError, match="copy_rows"):
        chat.resize_vocab({"params": {"embed": emb, "lm_head": head}}, 8256, {8300: 1})


def test_packing_masks_across_samples(tok):
    convs = arithmetic.conversations(arithmetic.problems(0, 9, "train"))
    samples = [chat.render(tok, c) for c in convs]
    rows = chat.pack(samples, 48)
    assert len(rows["inputs"]) < len(samples)                      # several samples per row
    # reference: walk every row's samples by hand
    n_learned = sum(sum(m[1:]) for _, m in samples)
    assert rows["loss_mask"].sum() == n_learned
    for r in range(len(rows["inputs"])):
        seg, tgt, lm = rows["segment_ids"][r], rows["targets"][r], rows["loss_mask"][r]
        inp, pos = rows["inputs"][r], rows["positions"][r]
        for t in range(len(seg)):
            if lm[t]:
                # the target is an assistant token of the same sample
                assert seg[t] > 0 and (t + 1 == len(seg) or seg[t + 1] == seg[t] or tgt[t] in
                                       (chat.END_ID,))
                assert tgt[t] not in (chat.USER_ID, chat.ASSISTANT_ID)
            if seg[t] == 0:
                assert lm[t] == 0 and inp[t] == 0
        starts = np.flatnonzero(np.diff(seg, prepend=-1) != 0)
        for s in starts:
            if seg[s]:
                assert pos[s] == 0 and inp[s] == chat.USER_ID
                if s > 0:
                    assert lm[s - 1] == 0       # predicting the next sample's first token
    assert set(np.unique(rows["loss_mask"])) <= {0.0, 1.0}


def test_resize_vocab_keeps_old_rows():
    v = {"params": {"embed": np.arange(12.0).reshape(4, 3), "lm_head": np.ones((3, 4))},
         "router_bias": {}}
    out = chat.resize_vocab(v, 6)
    assert out["params"]["embed"].shape == (6, 3) and out["params"]["lm_head"].shape == (3, 6)
    np.testing.assert_array_equal(out["params"]["embed"][:4], v["params"]["embed"])
    np.testing.assert_allclose(out["params"]["embed"][5], v["params"]["embed"].mean(0))


def test_arithmetic_splits_are_disjoint():
    tr = {(p["a"], p["op"], p["b"]) for p in arithmetic.problems(1, 3000, "train")}
    ev = {(p["a"], p["op"], p["b"]) for p in arithmetic.problems(1, 3000, "eval")}
    assert not tr & ev
    p = arithmetic.problems(1000, 1, "eval")[0]
    assert p["answer"] == (p["a"] + p["b"] if p["op"] == "+" else p["a"] - p["b"])


def test_balanced_lengths_draw_digit_counts_uniformly_and_stay_off_held_out():
    probs = arithmetic.problems(4, 6000, "train", "balanced")
    ev = {(p["a"], p["op"], p["b"]) for p in arithmetic.problems(1, 3000, "eval")}
    assert not {(p["a"], p["op"], p["b"]) for p in probs} & ev
    for key in ("a", "b"):
        n_digits = np.array([len(str(p[key])) for p in probs])
        share = np.bincount(n_digits, minlength=4)[1:] / len(probs)
        np.testing.assert_allclose(share, 1 / 3, atol=0.03)      # 3 sigma is 0.018
        ones = [p[key] for p in probs if p[key] < 10]
        assert set(ones) == set(range(10))                       # 0 is a one-digit number
    for p in probs:
        assert p["answer"] == (p["a"] + p["b"] if p["op"] == "+" else p["a"] - p["b"])
    # "uniform" is the evaluation's distribution, unchanged
    assert arithmetic.problems(1, 50, "train") == arithmetic.problems(1, 50, "train", "uniform")
    with pytest.raises(ValueError, match="lengths"):
        arithmetic.problems(1, 5, "train", "skewed")


@pytest.mark.parametrize("digits", ["reversed", "place"])
def test_sft_entry_point_from_a_checkpoint(tmp_path, digits):
    from dsv3_jax import ckpt, sft
    base_cfg = config.tiny(vocab_size=8192, **MICRO)
    ckpt.save_orbax(base_cfg, model.init(base_cfg, jax.random.key(0)), str(tmp_path / "base"))
    data = tmp_path / "train.jsonl"
    with open(data, "w") as f:
        for conv in arithmetic.conversations(arithmetic.problems(3, 40, "train")):
            f.write(json.dumps({"messages": conv}) + "\n")
    args = ["sft", "--config", "experiments/configs/sft_tiny.py:quick",
            f"--config.train.init_from={tmp_path / 'base'}", f"--workdir={tmp_path / 'run'}",
            f"--config.sft.train_jsonl={data}", f"--config.sft.val_jsonl={data}",
            "--config.sft.epochs=1", "--config.data.seq_len=64", "--config.data.global_batch=4",
            "--config.train.sample_tokens=2", "--config.train.async_checkpoint=False",
            f"--config.sft.digits={digits}"]
    args += [f"--config.model.{k}={v}" for k, v in MICRO.items()]
    assert sft.main(args) == 0
    res = json.load(open(tmp_path / "run" / "result.json"))
    assert res["step"] >= 2 and np.isfinite(res["val_loss"])
    # the final greedy sample asks through the chat template
    assert res["sample"].startswith("<|user|>What is 12 + 34?<|end|><|assistant|>"), res["sample"]
    lines = [json.loads(x) for x in open(tmp_path / "run" / "metrics.jsonl")]
    assert any("ce" in x for x in lines)
    cfg, v = ckpt.load_variables(str(tmp_path / "run"))
    assert cfg.vocab_size == chat.CHAT_VOCAB and v["params"]["embed"].shape[0] == chat.CHAT_VOCAB
    tag = "_place" if digits == "place" else ""
    assert os.path.isdir(tmp_path / "run" / f"init_vocab{chat.CHAT_VOCAB}{tag}")
    # the digit order travels with the checkpoint (evaluate and GRPO read it); other formats
    # and the pre-trained run are "split"
    assert chat.checkpoint_digits(str(tmp_path / "run")) == digits
    assert chat.checkpoint_digits(str(tmp_path / "base")) == "split"


def test_bad_sft_lengths_is_a_config_error():
    from dsv3_jax import sft
    from experiments.configs import sft_tiny
    c = sft_tiny.get_config()
    c.sft.lengths = "skewed"
    with pytest.raises(config.ConfigError, match="sft.lengths"):
        sft.conversations(c, "train")
