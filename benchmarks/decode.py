"""Decoding on CPU: naive vs absorbed MLA, latent-cache size, MTP speculative decoding.

  python benchmarks/decode.py                                    # tiny + small, /tmp/run_default
  python benchmarks/decode.py --presets tiny --contexts 256,1024 --checkpoint runs/tiny

1. tokens/s of one decode step against a cache filled to each context length, with W_UKV
   expanded over the whole cache (naive) or absorbed into the query and output (absorbed);
   random weights (speed does not depend on them). Expect absorbed >> naive from ~1k on: naive
   costs O(S C H (K+V)) per token, absorbed O(S (C+R) H).
2. Cache bytes per token: the latent (C + R per layer) vs an equal-width standard MHA cache
   (H (K + R + V) per layer: the per-head keys and values the naive form materialises).
3. With a trained checkpoint (MTP on): greedy generation, plain vs speculative (MTP draft),
   batch 1, per prompt: identical tokens, acceptance rate, tokens per main forward, speed-up;
   then the step anatomy: verify and draft each timed alone in plain steps, the speed-up they
   predict and its ceiling (every draft accepted).
"""
import argparse
import os
import time

import jax
import jax.numpy as jnp

from dsv3_jax import config, generate, kv_cache, model

PROMPTS = ["def ", "import os\nimport sys\n\n", "class Foo:\n    def __init__(self",
           "    for i in range(", "    return self.", "if __name__ == \"__main__\":\n"]


def filled_cache(cfg, batch, context, max_len, key, with_mtp=False):
    """A cache holding `context` tokens of random latents (values do not change the cost)."""
    cache = kv_cache.init_cache(cfg, batch, max_len, with_mtp=with_mtp)
    stacks = {}
    for name, kv in cache.stacks.items():
        k1, k2, key = jax.random.split(key, 3)
        stacks[name] = kv_cache.LatentKV(jax.random.normal(k1, kv.c_kv.shape, kv.c_kv.dtype),
                                         jax.random.normal(k2, kv.k_rope.shape, kv.k_rope.dtype))
    slot = jnp.arange(max_len, dtype=jnp.int32)
    positions = jnp.broadcast_to(jnp.where(slot < context, slot, -1), (batch, max_len))
    return kv_cache.KVCache(stacks, positions, jnp.full((batch,), context, jnp.int32))


def decode_tokens_per_s(cfg, variables, context, batch, steps, attn_impl, repeats):
    max_len = context + steps
    cache0 = filled_cache(cfg, batch, context, max_len, jax.random.key(1))
    _, step = generate.jitted_steps(cfg, generate.Sampling(), attn_impl, False)
    key = jax.random.key(0)
    active = jnp.ones((batch,), bool)

    def run():
        cache = jax.tree.map(jnp.copy, cache0)        # the step donates (updates in place)
        tok = jnp.zeros((batch,), jnp.int32)
        pos = jnp.full((batch,), context, jnp.int32)
        t0 = time.perf_counter()
        for i in range(steps):
            cache, tok, pos = step(variables, cache, tok, pos, active, key, i)
        jax.block_until_ready(tok)
        return time.perf_counter() - t0

    run()                                                 # compile
    return batch * steps / min(run() for _ in range(repeats))


def section_attention(args):
    print("\n== 1. decode tokens/s, naive vs absorbed MLA (random weights, batch "
          f"{args.batch}, {args.steps} steps, best of {args.repeats}) ==")
    print(f"{'preset':8} {'context':>8} {'naive tok/s':>12} {'absorbed tok/s':>15} {'speed-up':>9}")
    for preset in args.presets.split(","):
        cfg = config.preset(preset)
        variables = model.init(cfg, jax.random.key(0))
        for context in map(int, args.contexts.split(",")):
            naive = decode_tokens_per_s(cfg, variables, context, args.batch, args.steps, "naive",
                                        args.repeats)
            absorbed = decode_tokens_per_s(cfg, variables, context, args.batch, args.steps,
                                           "absorbed", args.repeats)
            print(f"{preset:8} {context:8d} {naive:12.1f} {absorbed:15.1f} "
                  f"{absorbed / naive:8.2f}x", flush=True)


def section_memory(args):
    print("\n== 2. cache per token (all layers, float32 / bfloat16 for the release) ==")
    print(f"{'preset':18} {'layers':>6} {'MLA values':>10} {'MHA values':>10} {'MLA bytes':>10} "
          f"{'MHA bytes':>11} {'ratio':>7}")
    shapes = [(p, config.preset(p), "float32") for p in args.presets.split(",")]
    shapes.append(("deepseek_v3_671b", config.deepseek_v3_671b(), "bfloat16"))
    for name, cfg, dtype in shapes:
        per_layer_mla = cfg.kv_lora_rank + cfg.qk_rope_head_dim
        per_layer_mha = kv_cache.mha_values_per_token_per_layer(cfg)
        layers = cfg.num_hidden_layers
        mla_bytes = kv_cache.latent_bytes(cfg, 1, 1, dtype=dtype)        # one token, all layers
        mha_bytes = layers * per_layer_mha * jnp.dtype(dtype).itemsize
        print(f"{name:18} {layers:6d} {per_layer_mla:10d} {per_layer_mha:10d} {mla_bytes:10,d} "
              f"{mha_bytes:11,d} {mha_bytes / mla_bytes:6.1f}x")


def default_checkpoint():
    for path in ("/tmp/run_default/checkpoints", "runs/tiny/checkpoints"):
        if os.path.isdir(path) and os.listdir(path):
            return path
    return None


def section_speculative(args):
    path = args.checkpoint or default_checkpoint()
    if path is None:
        print("\n== 3. speculative decoding: no checkpoint (train one: python -m dsv3_jax.train, "
              "then pass --checkpoint runs/tiny) ==")
        return
    from dsv3_jax import tokenizer as tok_lib
    cfg, variables, _ = generate.load_checkpoint(path)
    cfg = cfg.replace(moe_impl=args.moe_impl)      # how experts run, not what was trained
    tokenizer = tok_lib.load_tokenizer()
    print(f"\n== 3. MTP speculative decoding, greedy, batch 1, {args.new_tokens} new tokens, "
          f"{path} (D = {cfg.num_nextn_predict_layers}); plain and speculative runs alternate, "
          f"best of {args.repeats} ==")
    print(f"{'prompt':34} {'plain tok/s':>11} {'spec tok/s':>10} {'speed-up':>8} {'accept':>7} "
          f"{'tok/fwd':>7} {'step cost':>9} {'same':>5}")
    totals = {"plain_s": 0.0, "spec_s": 0.0, "tokens": 0, "accepted": 0.0, "row_steps": 0,
              "plain_steps": 0}

    def run(ids, speculative):
        return generate.generate(cfg, variables, [ids], args.new_tokens, speculative=speculative)

    for text in PROMPTS:
        ids = tokenizer.encode(text).ids
        run(ids, False), run(ids, True)                                  # compile
        best = {}
        for _ in range(args.repeats):                                   # alternate: fair under load
            for speculative in (False, True):
                g = run(ids, speculative)
                old = best.get(speculative)
                if old is None or g.stats["seconds"] < old.stats["seconds"]:
                    best[speculative] = g
        plain, spec = best[False], best[True]
        p, s = plain.stats, spec.stats
        # speed-up = tokens per forward / (speculative step time / plain step time)
        step_cost = (s["seconds"] / s["decode_steps"]) / (p["seconds"] / p["decode_steps"])
        print(f"{text[:32]!r:34} {p['tokens_per_s']:11.1f} {s['tokens_per_s']:10.1f} "
              f"{s['tokens_per_s'] / p['tokens_per_s']:7.2f}x {s['acceptance_rate']:7.1%} "
              f"{s['tokens_per_forward']:7.2f} {step_cost:8.2f}x "
              f"{str(spec.tokens == plain.tokens):>5}", flush=True)
        totals["plain_s"] += p["seconds"]
        totals["spec_s"] += s["seconds"]
        totals["tokens"] += p["generated_tokens"]
        totals["plain_steps"] += p["decode_steps"]
        totals["row_steps"] += s["decode_steps"]
        totals["accepted"] += s["acceptance_rate"] * s["decode_steps"]
    t = totals
    step_cost = (t["spec_s"] / t["row_steps"]) / (t["plain_s"] / t["plain_steps"])
    print(f"{'all prompts':34} {t['tokens'] / t['plain_s']:11.1f} "
          f"{t['tokens'] / t['spec_s']:10.1f} "
          f"{t['plain_s'] / t['spec_s']:7.2f}x {t['accepted'] / t['row_steps']:7.1%} "
          f"{1 + t['accepted'] / t['row_steps']:7.2f} {step_cost:8.2f}x")
    step_anatomy(cfg, variables, 1 + t["accepted"] / t["row_steps"], args.repeats)


def _ms_per_call(fn, *a, calls=200, repeats=3):
    jax.block_until_ready(fn(*a))                                       # compile
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(calls):
            out = fn(*a)
        jax.block_until_ready(out)
        best = min(best, (time.perf_counter() - t0) / calls)
    return best * 1e3


def step_anatomy(cfg, variables, tokens_per_forward, repeats):
    """Why the speed-up is what it is: a speculative step = the main model over W = D+1 tokens
    (verify) + the MTP draft over the same W, each timed alone against a 64-token cache and
    compared with a plain step. Speed-up = tokens per forward / (verify + draft) in plain steps;
    even with a free verify (= 1 plain step) and every draft accepted it cannot pass
    (D+1) / (1 + draft)."""
    w = cfg.num_nextn_predict_layers + 1
    cache = filled_cache(cfg, 1, 64, 256, jax.random.key(1), with_mtp=True)
    variables = jax.tree.map(jnp.asarray, variables)
    positions = 64 + jnp.arange(w, dtype=jnp.int32)[None]
    ids = jnp.ones((1, w), jnp.int32)

    @jax.jit
    def main_forward(variables, cache, ids, positions):
        ctx = kv_cache.step_context(cache, positions, "absorbed")
        out, _ = model.decode(cfg, variables, ids, positions, cache, ctx)
        return out.logits, out.hidden

    @jax.jit
    def draft(variables, cache, hidden, ids, positions):
        """The speculative step's own draft (every window token accepted, then ids[:, 0])."""
        ctx = kv_cache.step_context(cache, positions, "absorbed")
        return generate._mtp_chain(cfg, variables, cache, ctx, hidden, ids, positions,
                                   jnp.full((1,), w - 1, jnp.int32), ids[:, 0],
                                   jax.random.key(0), generate.Sampling())[0]

    _, step = generate.jitted_steps(cfg, generate.Sampling(), "absorbed", False)

    def plain_step(variables, cache):      # the step donates its cache: hand it a fresh copy
        return step(variables, jax.tree.map(jnp.copy, cache), ids[:, 0], positions[:, 0],
                    jnp.ones((1,), bool), jax.random.key(0), 0)[1]

    copy = jax.jit(lambda c: jax.tree.map(jnp.copy, c))
    t_copy = _ms_per_call(copy, cache, repeats=repeats)
    t_plain = _ms_per_call(plain_step, variables, cache, repeats=repeats) - t_copy
    t_verify = _ms_per_call(main_forward, variables, cache, ids, positions, repeats=repeats)
    hidden = main_forward(variables, cache, ids, positions)[1]
    t_draft = _ms_per_call(draft, variables, cache, hidden, ids, positions, repeats=repeats)
    v, c = t_verify / t_plain, t_draft / t_plain
    print(f"step anatomy (batch 1, 64 cached tokens): plain step {t_plain:.3f} ms; verify over "
          f"{w} tokens {t_verify:.3f} ms ({v:.2f} plain), MTP draft {t_draft:.3f} ms "
          f"({c:.2f} plain)\n  predicted speed-up {tokens_per_forward:.2f} / ({v:.2f} + {c:.2f}) "
          f"= {tokens_per_forward / (v + c):.2f}x; ceiling with a free verify and every draft "
          f"accepted: {w} / (1 + {c:.2f}) = {w / (1 + c):.2f}x")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--presets", default="tiny,small")
    ap.add_argument("--contexts", default="128,1024,2048")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--steps", type=int, default=16, help="decode steps timed per measurement")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--checkpoint", default=None,
                    help="trained run (MTP on) for section 3; default: /tmp/run_default, "
                         "runs/tiny")
    ap.add_argument("--new_tokens", type=int, default=128)
    ap.add_argument("--moe_impl", default="auto",
                    help="experts' implementation for section 3 (auto: gathered experts while "
                         "a step routes few tokens; sorted: the grouped-GEMM path)")
    ap.add_argument("--sections", default="1,2,3")
    args = ap.parse_args()
    print(f"jax {jax.__version__} on {jax.devices()[0].platform} ({os.cpu_count()} CPUs)")
    sections = args.sections.split(",")
    if "1" in sections:
        section_attention(args)
    if "2" in sections:
        section_memory(args)
    if "3" in sections:
        section_speculative(args)


if __name__ == "__main__":
    main()
