"""Rollouts for RL: the whole sampling loop (prefill, then a `lax.while_loop` of decode steps
against the MLA latent cache) in one jitted program, no host round trip per token.

  r = rollout(cfg, variables, prompts, max_new_tokens, temperature=1.0, seed=0, eos_id=EOS)
  r.tokens [N, max_new] int32 (pad 0 after the end), r.logps [N, max_new] float32 (0 after the
  end), r.lengths [N] tokens generated (the stopping token included), r.finished [N] (stopped
  at a stop token rather than at max_new).

logps are log softmax(logits / temperature) of the sampled tokens: exactly the distribution
they were drawn from (no top-k / top-p, so the "old" log-probabilities of GRPO's ratio are the
policy's own). temperature 0 is greedy (logps then those of softmax(logits)). Repeat each prompt
G times for a GRPO group (`repeat`).

  python -m dsv3_jax.rollout --checkpoint DIR [--prompts 64 --new 32]   # host loop vs jitted
"""
from __future__ import annotations

import dataclasses
import functools
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from dsv3_jax import kv_cache, model
from dsv3_jax.config import ModelConfig


@dataclasses.dataclass
class Rollout:
    tokens: np.ndarray
    logps: np.ndarray
    lengths: np.ndarray
    finished: np.ndarray
    seconds: float

    @property
    def tokens_per_s(self) -> float:
        return float(self.lengths.sum()) / max(self.seconds, 1e-9)


def _sample(logits_BV, key, temperature: float):
    logits = logits_BV.astype(jnp.float32)
    if temperature == 0.0:
        tok = jnp.argmax(logits, -1).astype(jnp.int32)
        logp_V = jax.nn.log_softmax(logits, -1)
    else:
        logp_V = jax.nn.log_softmax(logits / temperature, -1)
        tok = jax.random.categorical(key, logp_V, axis=-1).astype(jnp.int32)
    return tok, jnp.take_along_axis(logp_V, tok[:, None], -1)[:, 0]


@functools.partial(jax.jit, static_argnames=("cfg", "max_new", "max_len", "temperature",
                                             "stop_ids", "pad_id"))
def _rollout(variables, ids_BP, positions_BP, key, *, cfg: ModelConfig, max_new: int,
             max_len: int, temperature: float, stop_ids: tuple, pad_id: int):
    b, p = ids_BP.shape
    cache = kv_cache.init_cache(cfg, b, max_len)
    last_B = jnp.argmax(positions_BP, axis=1)
    ctx = kv_cache.step_context(cache, positions_BP)
    out, stacks = model.decode(cfg, variables, ids_BP, positions_BP, cache, ctx,
                               logits_index=last_B[:, None])
    cache = kv_cache.commit(cache, ctx, stacks, jnp.full((b,), p, jnp.int32))
    tok, lp = _sample(out.logits[:, 0], jax.random.fold_in(key, 0), temperature)
    stops = jnp.asarray(stop_ids, jnp.int32)

    def is_stop(t):
        return (t[:, None] == stops[None, :]).any(-1)

    tokens = jnp.full((b, max_new), pad_id, jnp.int32).at[:, 0].set(tok)
    logps = jnp.zeros((b, max_new), jnp.float32).at[:, 0].set(lp)
    pos = positions_BP.max(1) + 1
    state = (1, cache, tok, pos, is_stop(tok), jnp.ones((b,), jnp.int32), tokens, logps)

    def cond(s):
        i, _, _, _, done, *_ = s
        return (i < max_new) & ~done.all()

    def body(s):
        i, cache, tok, pos, done, lengths, tokens, logps = s
        ctx = kv_cache.step_context(cache, pos[:, None])
        out, stacks = model.decode(cfg, variables, tok[:, None], pos[:, None], cache, ctx)
        cache = kv_cache.commit(cache, ctx, stacks, (~done).astype(jnp.int32))
        nxt, lp = _sample(out.logits[:, 0], jax.random.fold_in(key, i), temperature)
        nxt = jnp.where(done, pad_id, nxt)
        lp = jnp.where(done, 0.0, lp)
        tokens = tokens.at[:, i].set(nxt)
        logps = logps.at[:, i].set(lp)
        lengths = lengths + (~done).astype(jnp.int32)
        done = done | is_stop(nxt)
        return i + 1, cache, nxt, pos + 1, done, lengths, tokens, logps

    _, _, _, _, done, lengths, tokens, logps = jax.lax.while_loop(cond, body, state)
    return tokens, logps, lengths, done


def rollout(cfg: ModelConfig, variables, prompts: list[list[int]], max_new_tokens: int, *,
            temperature: float = 1.0, seed: int = 0, eos_id: int | None = 1,
            stop_ids: tuple = (), pad_id: int = 0, bucket: int = 16) -> Rollout:
    """Samples one continuation per prompt (left-padded to a bucketed width) in one program."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("need at least one prompt, and no empty prompt")
    width = -(-max(len(p) for p in prompts) // bucket) * bucket
    positions = kv_cache.prompt_positions([len(p) for p in prompts], width, "left")
    ids = np.zeros((len(prompts), width), np.int32)
    ids[positions >= 0] = np.concatenate([np.asarray(p, np.int32) for p in prompts])
    stops = tuple(int(s) for s in stop_ids) + ((int(eos_id),) if eos_id is not None else ())
    max_len = -(-(width + max_new_tokens) // 64) * 64
    t0 = time.perf_counter()
    out = _rollout(variables, jnp.asarray(ids), jnp.asarray(positions), jax.random.key(seed),
                   cfg=cfg, max_new=int(max_new_tokens), max_len=max_len,
                   temperature=float(temperature), stop_ids=stops or (-1,), pad_id=int(pad_id))
    tokens, logps, lengths, done = jax.device_get(out)
    return Rollout(np.asarray(tokens), np.asarray(logps), np.asarray(lengths),
                   np.asarray(done), time.perf_counter() - t0)


def repeat(prompts: list[list[int]], group: int) -> list[list[int]]:
    """Each prompt `group` times in a row (a GRPO group is consecutive rows)."""
    return [p for p in prompts for _ in range(group)]


def _bench(argv=None) -> None:
    """Rollout tokens/s: the host-loop generator (`generate.generate`) vs this jitted loop."""
    import argparse

    from dsv3_jax import generate as gen_lib
    ap = argparse.ArgumentParser()
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args(argv)
    cfg, variables, _ = gen_lib.load_checkpoint(a.checkpoint)
    rng = np.random.default_rng(0)
    prompts = [list(rng.integers(2, 8000, 12)) for _ in range(a.prompts)]
    sampling = gen_lib.Sampling(temperature=1.0)
    # eos_id=None: every row runs to the end, so both loops make the same number of tokens
    gen_lib.generate(cfg, variables, prompts, a.new, sampling=sampling)            # compile
    rollout(cfg, variables, prompts, a.new, eos_id=None)                          # compile
    host = jitted = 0.0
    for rep in range(a.repeats):       # alternated, best of each: the machine's load varies
        t0 = time.perf_counter()
        g = gen_lib.generate(cfg, variables, prompts, a.new, sampling=sampling, seed=rep)
        host = max(host, sum(map(len, g.tokens)) / (time.perf_counter() - t0))
        jitted = max(jitted, rollout(cfg, variables, prompts, a.new, eos_id=None,
                                     seed=rep).tokens_per_s)
    print(f"{a.prompts} prompts x {a.new} new tokens (best of {a.repeats}): host loop "
          f"{host:,.0f} tok/s, jitted rollout {jitted:,.0f} tok/s ({jitted / host:.2f}x)")


if __name__ == "__main__":
    _bench(sys.argv[1:])
