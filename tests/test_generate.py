"""Generation: sampling, batched greedy decoding, MTP speculative decoding (lossless greedy, the
distribution-preserving rejection rule, consistent caches after partial acceptance), EOS, the
trainer's greedy_generate, the command line, and greedy tokens equal to Hugging Face's."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dsv3_jax import config, generate, kv_cache, model
from dsv3_jax.generate import Sampling

fwd = jax.jit(model.forward, static_argnums=0, static_argnames="with_mtp")

MICRO = dict(vocab_size=64, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
             num_hidden_layers=2, n_routed_experts=8, num_experts_per_tok=2, n_group=2,
             topk_group=1, num_attention_heads=2, num_key_value_heads=2, q_lora_rank=32,
             kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16)


def counting_batch(rng, b, t):
    """Sequences 2 + (a + k i) mod 60 with a per-row stride k in {1, 2, 3}: main model and MTP
    modules learn them in a few dozen steps, imperfectly enough that some drafts are rejected."""
    a, k = rng.integers(0, 60, (b, 1)), rng.integers(1, 4, (b, 1))
    return (2 + (a + k * np.arange(t)[None]) % 60).astype(np.int32)


def train_counting_model(depth: int, steps: int = 25, seed: int = 0):
    """main CE + mean MTP CE (report eq. 25 with lambda 1) with Adam; a stand-in for a trained
    checkpoint that takes seconds."""
    cfg = config.tiny(num_nextn_predict_layers=depth, **MICRO)
    v = model.init(cfg, jax.random.key(seed))
    opt = optax.adam(3e-3)

    @jax.jit
    def step(params, opt_state, ids):
        def loss(p):
            out = model.forward(cfg, {"params": p, "router_bias": v["router_bias"]}, ids[:, :-1])
            def ce(logits, targets):
                lp = jax.nn.log_softmax(logits)
                return -jnp.take_along_axis(lp, targets[..., None], -1).mean()
            mtp = [ce(out.mtp_logits[k, :, :-(k + 1)], ids[:, k + 2:]) for k in range(depth)]
            return ce(out.logits, ids[:, 1:]) + sum(mtp) / depth
        grads = jax.grad(loss)(params)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    rng = np.random.default_rng(seed)
    params, opt_state = v["params"], opt.init(v["params"])
    for _ in range(steps):
        params, opt_state = step(params, opt_state, jnp.asarray(counting_batch(rng, 16, 33)))
    return cfg, {"params": params, "router_bias": v["router_bias"]}


@pytest.fixture(scope="module")
def counting():
    return train_counting_model(depth=1)


def prompts_for(rng, vocab=64):
    """On-distribution counting prompts and off-distribution random ones, of different lengths."""
    counting_prompts = [list(counting_batch(rng, 1, n)[0]) for n in (3, 6, 9)]
    random_prompts = [list(rng.integers(2, vocab, n)) for n in (2, 5, 11)]
    return counting_prompts + random_prompts


# ----------------------------------------------------------------------------------------------
# Sampling
# ----------------------------------------------------------------------------------------------

def test_token_probs_temperature_top_k_top_p():
    logits = jnp.log(jnp.asarray([[0.5, 0.2, 0.15, 0.1, 0.05]]))
    np.testing.assert_allclose(generate.token_probs(logits, Sampling(1.0)), np.exp(logits),
                               rtol=1e-6)
    p = generate.token_probs(logits, Sampling(1.0, top_k=2))
    np.testing.assert_allclose(p, [[5 / 7, 2 / 7, 0, 0, 0]], rtol=1e-6)
    # top_p 0.8: 0.5 + 0.2 = 0.7 < 0.8, so 0.15 joins; 0.85 >= 0.8 stops
    p = generate.token_probs(logits, Sampling(1.0, top_p=0.8))
    np.testing.assert_allclose(p, [[0.5 / 0.85, 0.2 / 0.85, 0.15 / 0.85, 0, 0]], rtol=1e-6)
    t = generate.token_probs(logits, Sampling(0.5))
    np.testing.assert_allclose(t, np.exp(2 * logits) / np.exp(2 * logits).sum(), rtol=1e-6)
    np.testing.assert_array_equal(generate.token_probs(logits, Sampling()), [[1, 0, 0, 0, 0]])
    with pytest.raises(ValueError):
        Sampling(top_p=0.0)


def test_rejection_rule_preserves_the_target_distribution(rng):
    """Draft x ~ q kept with prob min(1, p(x)/q(x)), else a draw from norm(max(0, p - q)): the
    emitted token is distributed as p (and the bonus after an accept as the next p)."""
    v, n = 6, 200_000
    p = rng.dirichlet(np.ones(v) * 0.7, size=2).astype(np.float32)      # [W=2, V]
    q = rng.dirichlet(np.ones(v) * 0.7, size=1).astype(np.float32)      # [D=1, V]
    key = jax.random.key(int(rng.integers(1 << 30)))
    k_draft, k_rule = jax.random.split(key)
    drafts = jax.random.categorical(k_draft, jnp.log(q[0]), shape=(n,))[:, None]
    a, nxt = jax.jit(generate.speculative_accept)(
        drafts.astype(jnp.int32), jnp.broadcast_to(q, (n, 1, v)), jnp.broadcast_to(p, (n, 2, v)),
        k_rule)
    a, nxt, drafts = np.asarray(a), np.asarray(nxt), np.asarray(drafts[:, 0])
    first = np.where(a == 1, drafts, nxt)
    freq = np.bincount(first, minlength=v) / n
    sigma = np.sqrt(p[0] * (1 - p[0]) / n)
    assert (np.abs(freq - p[0]) < 5 * sigma + 1e-4).all(), (freq, p[0])
    accept_rate = np.minimum(p[0], q[0]).sum()          # P(accept) = sum_x min(p(x), q(x))
    assert abs(a.mean() - accept_rate) < 5 * np.sqrt(accept_rate * (1 - accept_rate) / n)
    bonus = np.bincount(nxt[a == 1], minlength=v) / (a == 1).sum()
    assert np.abs(bonus - p[1]).max() < 0.01


def test_speculative_sampling_is_lossless_end_to_end(rng):
    """8192 rows of one prompt, two new tokens drawn with temperature and top-k, plain and
    speculative: both empirical joints of (t1, t2) match the model's exact one, computed with
    full forwards; t2 is where the speculative step's rejection rule acts."""
    cfg = config.tiny(**dict(MICRO, vocab_size=8))
    v = model.init(cfg, jax.random.key(int(rng.integers(1 << 30))))
    # logits spread over several nats, so p (main) and q (MTP draft) differ a lot
    v = {"params": jax.tree.map(lambda a: a * 4.0 if a.ndim > 1 else a, v["params"]),
         "router_bias": v["router_bias"]}
    sampling = Sampling(temperature=0.9, top_k=6)
    prompt = list(rng.integers(0, 8, 3))
    n = 8192
    probs = jax.jit(generate.token_probs, static_argnums=1)
    with jax.default_matmul_precision("highest"):
        p1 = probs(fwd(cfg, v, jnp.asarray([prompt]), with_mtp=False).logits[:, -1], sampling)[0]
        seqs = jnp.asarray([prompt + [t] for t in range(8)], jnp.int32)
        p2 = probs(fwd(cfg, v, seqs, with_mtp=False).logits[:, -1], sampling)
    exact = np.asarray(p1)[:, None] * np.asarray(p2)                     # [t1, t2]
    for speculative in (False, True):
        gen = generate.generate(cfg, v, [prompt] * n, 2, sampling=sampling, speculative=speculative,
                                seed=int(rng.integers(1 << 30)), bucket=1)
        toks = np.asarray(gen.tokens)
        counts = np.zeros((8, 8))
        np.add.at(counts, (toks[:, 0], toks[:, 1]), 1)
        expected = exact * n
        cells = expected > 5
        assert counts[~cells].sum() <= max(20, 3 * expected[~cells].sum())
        chi2 = ((counts[cells] - expected[cells]) ** 2 / expected[cells]).sum()
        dof = cells.sum() - 1
        assert chi2 < dof + 6 * np.sqrt(2 * dof), (speculative, chi2, dof)
        if speculative:   # both branches of the rule were taken many times
            assert 0.2 < gen.stats["acceptance_rate"] < 0.9, gen.stats


def test_seed_reproduces_samples(counting, rng):
    cfg, v = counting
    prompts = prompts_for(rng)[:3]
    s = Sampling(temperature=1.0, top_p=0.9)
    a = generate.generate(cfg, v, prompts, 8, sampling=s, seed=3).tokens
    assert generate.generate(cfg, v, prompts, 8, sampling=s, seed=3).tokens == a
    assert generate.generate(cfg, v, prompts, 8, sampling=s, seed=4).tokens != a


# ----------------------------------------------------------------------------------------------
# Greedy decoding
# ----------------------------------------------------------------------------------------------

def full_recompute_greedy(cfg, variables, prompt, n):
    """The oracle: argmax of a full forward over the whole sequence, one token at a time (a fixed
    buffer, read at the last filled position: causal attention ignores what follows)."""
    buf = np.zeros((1, len(prompt) + n), np.int32)
    buf[0, :len(prompt)] = prompt
    for i in range(len(prompt), len(prompt) + n):
        logits = fwd(cfg, variables, jnp.asarray(buf), with_mtp=False).logits
        buf[0, i] = int(jnp.argmax(logits[0, i - 1]))
    return buf[0, len(prompt):].tolist()


def test_greedy_generate_equals_full_recompute(counting, rng):
    """The trainer's greedy_generate (same signature as before the cache existed)."""
    cfg, v = counting
    prompt = list(rng.integers(2, 64, 4))
    with jax.default_matmul_precision("highest"):
        assert generate.greedy_generate(cfg, v, prompt, 6) == full_recompute_greedy(cfg, v,
                                                                                    prompt, 6)


@pytest.mark.parametrize("padding", ["left", "right"])
def test_batched_greedy_equals_each_prompt_alone(counting, padding, rng):
    cfg, v = counting
    prompts = prompts_for(rng)
    batched = generate.generate(cfg, v, prompts, 10, padding=padding).tokens
    alone = [generate.generate(cfg, v, [p], 10).tokens[0] for p in prompts[::2]]
    assert batched[::2] == alone


def test_eos_stops_a_row_and_is_not_returned(counting, rng):
    cfg, v = counting
    prompts = prompts_for(rng)[:3]
    free = generate.generate(cfg, v, prompts, 12).tokens
    eos = free[0][4]
    stopped = generate.generate(cfg, v, prompts, 12, eos_id=eos).tokens
    for row, new in zip(free, stopped):
        assert new == (row[:row.index(eos)] if eos in row else row)
    assert generate.generate(cfg, v, prompts, 12, eos_id=eos, speculative=True).tokens == stopped


# ----------------------------------------------------------------------------------------------
# MTP speculative decoding
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("depth", [1, 2])
def test_greedy_speculative_equals_greedy_plain(depth, counting, rng):
    """Token for token, on batched prompts of different lengths, both attention forms; drafts are
    accepted often enough, and rejected sometimes, that both branches run."""
    cfg, v = counting if depth == 1 else train_counting_model(depth=2)
    prompts = prompts_for(rng)
    plain = generate.generate(cfg, v, prompts, 20)
    for attn_impl in ("absorbed", "naive")[:3 - depth]:
        spec = generate.generate(cfg, v, prompts, 20, speculative=True, attn_impl=attn_impl)
        assert spec.tokens == plain.tokens
        assert spec.stats["decode_steps"] < plain.stats["decode_steps"]
        assert 0.3 < spec.stats["acceptance_rate"] < 1.0, spec.stats
        assert spec.stats["tokens_per_forward"] == pytest.approx(
            1 + depth * spec.stats["acceptance_rate"])
    single = generate.generate(cfg, v, prompts[-1:], 20, speculative=True)
    assert single.tokens == plain.tokens[-1:]


def test_caches_stay_consistent_after_partial_acceptance(counting, rng):
    """Step by step with sampling (so the draft distribution q comes back): after every verify,
    with rows accepting different numbers of drafts, the MTP's distribution for the next draft
    equals the MTP head of a full forward over the committed sequence, which needs both the main
    model's and the MTP module's caches rewound to exactly the accepted tokens."""
    cfg, v = counting
    sampling = Sampling(temperature=1.0)
    prompts = prompts_for(rng)[:4]
    b, width, full_len = len(prompts), 12, 32
    positions = kv_cache.prompt_positions([len(p) for p in prompts], width, "left")
    ids = np.zeros((b, width), np.int32)
    ids[positions >= 0] = np.concatenate(prompts)
    prefill, step = generate.jitted_steps(cfg, sampling, "absorbed", True)
    key = jax.random.key(int(rng.integers(1 << 30)))

    def mtp_probs_of_full_forward(committed):
        """MTP depth 1 at each row's last main position (it embeds the newest token); rows are
        right-padded into one batch (segment 0), which causal attention never sees."""
        buf, seg = np.zeros((b, full_len), np.int32), np.zeros((b, full_len), np.int32)
        for r, c in enumerate(committed):
            buf[r, :len(c)], seg[r, :len(c)] = c, 1
        out = fwd(cfg, v, jnp.asarray(buf), segment_ids=jnp.asarray(seg))
        last = jnp.asarray([len(c) - 2 for c in committed])
        return generate.token_probs(out.mtp_logits[0, jnp.arange(b), last], sampling)

    with jax.default_matmul_precision("highest"):
        cache = kv_cache.init_cache(cfg, b, 64, with_mtp=True)
        cache, tok, drafts, q = prefill(v, cache, jnp.asarray(ids), jnp.asarray(positions), key)
        committed = [list(p) + [int(t)] for p, t in zip(prompts, np.asarray(tok))]
        window = jnp.concatenate([tok[:, None], drafts], 1)
        pos = jnp.asarray([len(p) for p in prompts], jnp.int32)
        kept = set()
        for i in range(6):
            np.testing.assert_allclose(q[:, 0], mtp_probs_of_full_forward(committed), atol=2e-5)
            cache, emitted, window, q, pos = step(v, cache, window, q, pos,
                                                  jnp.ones((b,), bool), key, i + 1)
            for r in range(b):
                new = [int(t) for t in np.asarray(emitted[r]) if t >= 0]
                kept.add(len(new))
                committed[r] += new
            np.testing.assert_array_equal(pos, [len(c) - 1 for c in committed])
            np.testing.assert_array_equal(cache.length, [width - len(p) + len(c) - 1
                                                         for p, c in zip(prompts, committed)])
    assert kept == {1, 2}, kept                  # rows took both paths


def test_speculative_needs_mtp_modules(counting):
    cfg, v = counting
    cfg0 = cfg.replace(num_nextn_predict_layers=0)
    v0 = {"params": {k: x for k, x in v["params"].items() if not k.startswith("mtp_")},
          "router_bias": {k: x for k, x in v["router_bias"].items() if not k.startswith("mtp_")}}
    with pytest.raises(ValueError, match="MTP"):
        generate.generate(cfg0, v0, [[3, 4]], 4, speculative=True)


# ----------------------------------------------------------------------------------------------
# The command line, on a real trainer workdir
# ----------------------------------------------------------------------------------------------

def run_cli(capsys, checkpoint, *extra):
    generate.main(["--checkpoint", str(checkpoint), "--prompt", "def f(x):", "--max_new_tokens",
                   "6", *extra])
    return capsys.readouterr()


def test_cli_streams_tokens_from_an_orbax_checkpoint(counting, tmp_path, capsys):
    """A checkpoint in the trainer's layout (ckpt.Checkpointer: items state/data/meta,
    meta["config"]["model"]); greedy, then speculative sampling."""
    from dsv3_jax.ckpt import Checkpointer
    cfg, v = counting
    cfg = cfg.replace(vocab_size=8192)                 # the packaged tokenizer's vocabulary
    v = model.init(cfg, jax.random.key(0))
    ckpt = Checkpointer(str(tmp_path / "checkpoints"), async_save=False)
    ckpt.save(7, {"step": jnp.asarray(7), **v}, {"step": 7},
              {"config": {"model": dataclasses.asdict(cfg)}, "step": 7})
    ckpt.close()
    for extra in ([], ["--speculative", "--temperature", "0.8", "--top_k", "50"]):
        out = run_cli(capsys, tmp_path, *extra)
        assert out.out.startswith("def f(x):") and len(out.out) > len("def f(x):\n"), out.out
        assert "decode steps" in out.err
    loaded_cfg, loaded, _ = generate.load_checkpoint(str(tmp_path / "checkpoints" / "7"))
    assert loaded_cfg == cfg
    jax.tree.map(np.testing.assert_array_equal, loaded, v)


@pytest.mark.slow
def test_cli_on_a_real_trainer_workdir(tmp_path, capsys):
    from dsv3_jax import train
    from experiments.configs import tiny
    c = tiny.get_config("quick")
    for k, val in dict(num_hidden_layers=2, hidden_size=64, intermediate_size=128,
                       moe_intermediate_size=32, q_lora_rank=32, kv_lora_rank=32).items():
        c.model[k] = val
    c.data.seq_len, c.data.global_batch, c.data.eval_batches = 64, 4, 1
    c.train.steps, c.train.eval_every, c.train.checkpoint_every = 2, 100, 100
    c.train.sample_tokens = 1
    train.run(c, str(tmp_path))
    capsys.readouterr()
    for extra in ([], ["--speculative"]):
        out = run_cli(capsys, tmp_path, *extra)
        assert out.out.startswith("def f(x):"), out.out


# ----------------------------------------------------------------------------------------------
# Against Hugging Face transformers
# ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def hf_checkpoint(tmp_path_factory):
    """A tiny random DeepseekV3ForCausalLM saved with save_pretrained; weights ~ N(0, 1/fan_in)
    so activations stay O(1) and the logits are far from ties; random router biases."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    hf_cfg = transformers.DeepseekV3Config(
        vocab_size=96, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
        num_hidden_layers=3, first_k_dense_replace=1, n_routed_experts=8, num_experts_per_tok=2,
        n_group=2, topk_group=1, n_shared_experts=1, num_attention_heads=4, num_key_value_heads=4,
        q_lora_rank=32, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
        routed_scaling_factor=2.5, rope_interleave=True, max_position_embeddings=256,
        num_mtp_layers=0, eos_token_id=None, bos_token_id=None, pad_token_id=0)
    torch.manual_seed(0)
    hf = transformers.DeepseekV3ForCausalLM(hf_cfg).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif "embed_tokens" in name:
                p.normal_(0.0, 1.0)
            elif p.ndim >= 2:
                p.normal_(0.0, 1.0 / p.shape[-1] ** 0.5)
        for name, buf in hf.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buf.copy_(0.1 * torch.randn_like(buf))
        hf.lm_head.weight.mul_(3.0)
    path = tmp_path_factory.mktemp("hf_tiny")
    hf.save_pretrained(path)
    return path, hf


def test_greedy_tokens_equal_transformers_generate(hf_checkpoint, rng):
    import torch
    path, hf = hf_checkpoint
    cfg, v, _ = generate.load_checkpoint(str(path))            # through convert.load_hf
    prompts = [list(rng.integers(1, 96, n)) for n in (3, 8, 13)]
    new = 12
    want, gaps = [], []
    with torch.no_grad():
        for p in prompts:
            out = hf.generate(torch.tensor([p]), max_new_tokens=new, do_sample=False,
                              attention_mask=torch.ones(1, len(p), dtype=torch.long),
                              output_logits=True, return_dict_in_generate=True)
            want.append(out.sequences[0, len(p):].tolist())
            top2 = torch.stack(out.logits)[:, 0].topk(2, dim=-1).values
            gaps.append(float((top2[:, 0] - top2[:, 1]).min()))
    assert min(gaps) > 1e-3, gaps        # no near-tie that float noise could flip
    with jax.default_matmul_precision("highest"):
        got = generate.generate(cfg, v, prompts, new).tokens
        got_naive = generate.generate(cfg, v, prompts, new, attn_impl="naive",
                                      padding="right").tokens
    assert got == want
    assert got_naive == want


def test_loads_a_converted_orbax_directory(hf_checkpoint, tmp_path):
    """convert.save_orbax's layout (variables/ + config.json) goes through load_checkpoint too."""
    from dsv3_jax import convert
    path, _ = hf_checkpoint
    cfg, v, _ = generate.load_checkpoint(str(path))
    convert.save_orbax(cfg, v, str(tmp_path / "ckpt"))
    cfg2, v2, _ = generate.load_checkpoint(str(tmp_path / "ckpt"))
    assert cfg2 == cfg
    assert generate.generate(cfg2, v2, [[5, 6, 7]], 4).tokens == generate.generate(
        cfg, v, [[5, 6, 7]], 4).tokens
