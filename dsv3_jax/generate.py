"""Text generation: prefill + token-by-token decoding against the MLA latent cache, sampling, and
MTP speculative decoding (spec §2 "inference cache", §4, detailed spec §7).

  python -m dsv3_jax.generate --checkpoint runs/tiny --prompt "def "            # streams tokens
  python -m dsv3_jax.generate --checkpoint runs/tiny --prompt "def " --speculative
  python -m dsv3_jax.generate --checkpoint HF_DIR --prompt "..." --temperature 0.7 --top_p 0.9

--checkpoint takes a trainer workdir (or its checkpoints/ or a step dir; the packaged tokenizer), a
Hugging Face / official safetensors dir (its tokenizer.json) or a ckpt.save_orbax dir
(dsv3_jax.ckpt.load_variables reads them all).

Library API:
  gen = generate(cfg, variables, prompts, max_new_tokens, sampling=Sampling(...), seed=0,
                 eos_id=None, speculative=False, attn_impl="absorbed", on_tokens=None)
  gen.tokens [[int]] per prompt (EOS not included); gen.stats: steps, tokens/s, acceptance...
  greedy_generate(cfg, variables, prompt_ids, max_new_tokens, eos_id)   # the trainer's sample
  prefill, step = jitted_steps(cfg, sampling, attn_impl, speculative)    # the loop's pieces

Speculative decoding with the D MTP modules as the draft. After each step the main model has
cached positions < N, the last committed token t_N is not cached yet, and the chain of MTP
modules at position N-1 has proposed d_{N+1..N+D} (module k consumes h^{k-1}_{N-1} and the token
k places ahead: t_N for k = 1, then the drafts). One step:
  1. verify: one main forward over [t_N, d_{N+1}, ..., d_{N+D}] at positions N..N+D;
  2. accept the longest prefix of drafts the main model agrees with (greedy: equal to its argmax;
     sampling: draft x kept with probability min(1, p(x)/q(x)), the first rejected one resampled
     from norm(max(0, p - q)); Leviathan et al. 2023), and take one more token from the main model
     (the correction, or a bonus after D accepts): a + 1 tokens per main forward;
  3. run each MTP module over the same D+1 positions with the committed tokens (plus, beyond
     them, this step's new drafts), which fills its cache at those positions and proposes the
     next D drafts from the last accepted position;
  4. keep the first a + 1 slots of every cache (main and MTP), drop the rest.
Every cache therefore holds the same positions after each step. With D > 1, module k >= 2 keeps
cache entries computed from draft tokens that are not rewritten after they are accepted or not;
that only changes how good the draft is, never the output, which the verify step fixes.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import sys
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from dsv3_jax import ckpt, errors, kv_cache, model
from dsv3_jax.ckpt import load as ckpt_load
from dsv3_jax.config import ModelConfig
from dsv3_jax.errors import UserError


# ----------------------------------------------------------------------------------------------
# Sampling
# ----------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Sampling:
    """How the next token is drawn from the logits; temperature 0 is greedy (argmax)."""
    temperature: float = 0.0
    top_k: int = 0          # keep the k most likely tokens (0: all)
    top_p: float = 1.0      # keep the smallest set of most likely tokens with mass >= top_p

    def __post_init__(self):
        if self.temperature < 0 or self.top_k < 0 or not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"need temperature >= 0, top_k >= 0, 0 < top_p <= 1; got {self}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def token_probs(logits_NV: jax.Array, sampling: Sampling) -> jax.Array:
    """The float32 distribution a token is drawn from: temperature, then top-k, then top-p.
    Greedy gives the one-hot of the argmax, so the speculative rule below covers it exactly."""
    logits = logits_NV.astype(jnp.float32)
    v = logits.shape[-1]
    if sampling.greedy:
        return jax.nn.one_hot(jnp.argmax(logits, -1), v, dtype=jnp.float32)
    logits = logits / sampling.temperature
    if 0 < sampling.top_k < v:
        kth = jax.lax.top_k(logits, sampling.top_k)[0][..., -1:]
        logits = jnp.where(logits >= kth, logits, -jnp.inf)
    probs = jax.nn.softmax(logits, -1)
    if sampling.top_p < 1.0:
        order = jnp.argsort(-probs, axis=-1)
        sorted_p = jnp.take_along_axis(probs, order, -1)
        # keep a token while the mass before it is < top_p (the most likely one always)
        keep_sorted = (jnp.cumsum(sorted_p, -1) - sorted_p) < sampling.top_p
        keep = jnp.zeros_like(keep_sorted).at[
            jnp.arange(probs.shape[0])[:, None], order].set(keep_sorted)
        probs = jnp.where(keep, probs, 0.0)
        probs = probs / probs.sum(-1, keepdims=True)
    return probs


def next_token(logits_NV: jax.Array, key: jax.Array, sampling: Sampling):
    """(token [N], the distribution it was drawn from [N, V], or None when greedy)."""
    if sampling.greedy:
        return jnp.argmax(logits_NV, -1).astype(jnp.int32), None
    probs = token_probs(logits_NV, sampling)
    return jax.random.categorical(key, jnp.log(probs), axis=-1).astype(jnp.int32), probs


def speculative_accept(drafts_BD: jax.Array, q_BDV: jax.Array, p_BWV: jax.Array, key: jax.Array):
    """Speculative sampling (Leviathan et al. 2023; Chen et al. 2023) over D drafts: p_BWV
    (W = D+1) are the main model's distributions at the draft positions and one more, q_BDV the
    distributions the drafts were drawn from. Draft j is kept with probability
    min(1, p_j(d_j) / q_j(d_j)) while all before it were; the first rejected one is replaced by a
    draw from norm(max(0, p_j - q_j)), or after D accepts a bonus token is drawn from p_D.
    Returns (accepted count a [B], that next token [B]): the tokens are distributed exactly as
    if drawn from p one at a time."""
    b, d = drafts_BD.shape
    k_accept, k_draw = jax.random.split(key)
    p_d = jnp.take_along_axis(p_BWV[:, :d], drafts_BD[..., None], -1)[..., 0]
    q_d = jnp.take_along_axis(q_BDV, drafts_BD[..., None], -1)[..., 0]
    # u < p/q without the division (q_d > 0: the draft was drawn from q)
    ok_BD = jax.random.uniform(k_accept, (b, d)) * q_d < p_d
    a_B = jnp.sum(jnp.cumprod(ok_BD.astype(jnp.int32), axis=1), axis=1)
    residual = jnp.maximum(p_BWV[:, :d] - q_BDV, 0.0)
    cand_BWV = jnp.concatenate([residual, p_BWV[:, d:]], axis=1)
    dist = jnp.take_along_axis(cand_BWV, a_B[:, None, None], 1)[:, 0]
    mass = dist.sum(-1, keepdims=True)
    # A zero residual means p_j == q_j, where rejection has probability 0: guard the 0/0 only.
    p_a = jnp.take_along_axis(p_BWV, a_B[:, None, None], 1)[:, 0]
    dist = jnp.where(mass > 0, dist / jnp.where(mass > 0, mass, 1.0), p_a)
    return a_B, jax.random.categorical(k_draw, jnp.log(dist), axis=-1).astype(jnp.int32)


def _accept(drafts_BD, q_BDV, logits_BWV, key, sampling: Sampling):
    """The verify decision. Greedy: keep drafts while they equal the main model's argmax, then
    take its argmax (the limit of the rule above with one-hot p and q, without V-wide work)."""
    b, w, v = logits_BWV.shape
    if sampling.greedy:
        target_BW = jnp.argmax(logits_BWV, -1).astype(jnp.int32)
        ok_BD = drafts_BD == target_BW[:, :-1]
        a_B = jnp.sum(jnp.cumprod(ok_BD.astype(jnp.int32), axis=1), axis=1)
        return a_B, jnp.take_along_axis(target_BW, a_B[:, None], 1)[:, 0]
    p_BWV = token_probs(logits_BWV.reshape(b * w, v), sampling).reshape(b, w, v)
    return speculative_accept(drafts_BD, q_BDV, p_BWV, key)


# ----------------------------------------------------------------------------------------------
# Jitted steps (cfg, sampling and attn_impl static; the cache is donated and updated in place)
# ----------------------------------------------------------------------------------------------

def _mtp_chain(cfg, variables, cache, ctx, hidden_BTD, window_BT, positions_BT, last_B, next_B,
               key, sampling):
    """Every MTP module over the step's T positions. Module k at window index j consumes
    h^{k-1}_j and the token k places ahead: the committed window tokens up to index last (their
    last valid one), then `next` at last + 1, then the drafts of modules 1..k-1 at last.
    Returns the D drafts at index last [B, D], their distributions [B, D, V] (None when greedy)
    and the stacks."""
    b, t = window_BT.shape
    depth = cfg.num_nextn_predict_layers
    rows = jnp.arange(b)
    stream = jnp.concatenate([window_BT, jnp.zeros((b, depth + 1), jnp.int32)], axis=1)
    stream = stream.at[rows, last_B + 1].set(next_B)
    h, drafts, qs, stacks = hidden_BTD, [], [], {}
    for k in range(depth):
        ids = jax.lax.dynamic_slice_in_dim(stream, k + 1, t, axis=1)
        logits, h, stack = model.decode_mtp(cfg, variables, k, h, ids, positions_BT, cache, ctx,
                                            logits_index=last_B[:, None])
        stacks.update(stack)
        d, q = next_token(logits[:, 0], jax.random.fold_in(key, k), sampling)
        stream = stream.at[rows, last_B + 2 + k].set(d)
        drafts.append(d)
        qs.append(q)
    return jnp.stack(drafts, 1), (None if sampling.greedy else jnp.stack(qs, 1)), stacks


def _prefill(variables, cache, ids_BT, positions_BT, key, *, cfg: ModelConfig, sampling,
             attn_impl, speculative):
    """All prompt tokens at once; returns the cache, the first new token and (speculative) the
    first drafts with their distributions."""
    b, t = ids_BT.shape
    last_B = jnp.argmax(positions_BT, axis=1)          # the last prompt token (any padding side)
    ctx = kv_cache.step_context(cache, positions_BT, attn_impl)
    out, stacks = model.decode(cfg, variables, ids_BT, positions_BT, cache, ctx,
                               logits_index=last_B[:, None])
    k_tok, k_draft = jax.random.split(key)
    tok, _ = next_token(out.logits[:, 0], k_tok, sampling)
    drafts = q = None
    if speculative:
        drafts, q, mtp_stacks = _mtp_chain(cfg, variables, cache, ctx, out.hidden, ids_BT,
                                           positions_BT, last_B, tok, k_draft, sampling)
        stacks.update(mtp_stacks)
    cache = kv_cache.commit(cache, ctx, stacks, jnp.full((b,), t, jnp.int32))
    return cache, tok, drafts, q


def _decode_step(variables, cache, tok_B, pos_B, active_B, key, step, *, cfg: ModelConfig,
                 sampling, attn_impl):
    """One token per row at pos_B (finished rows recompute their slot and keep nothing).
    Returns (cache, next token, its position)."""
    key = jax.random.fold_in(key, step)
    positions = pos_B[:, None]
    ctx = kv_cache.step_context(cache, positions, attn_impl)
    out, stacks = model.decode(cfg, variables, tok_B[:, None], positions, cache, ctx)
    nxt, _ = next_token(out.logits[:, 0], key, sampling)
    cache = kv_cache.commit(cache, ctx, stacks, active_B.astype(jnp.int32))
    return cache, nxt, pos_B + 1


def _speculative_step(variables, cache, window_BW, q_BDV, pos_B, active_B, key, step, *,
                      cfg: ModelConfig, sampling, attn_impl):
    """Verify window = [t_N, d_{N+1..N+D}] at positions pos..pos+D, accept, redraft (module doc).
    Returns (cache, emitted [B, W]: the a+1 new tokens, then -1; next window, next draft
    distributions, next position)."""
    key = jax.random.fold_in(key, step)
    b, w = window_BW.shape
    positions = pos_B[:, None] + jnp.arange(w, dtype=jnp.int32)[None, :]
    ctx = kv_cache.step_context(cache, positions, attn_impl)
    out, stacks = model.decode(cfg, variables, window_BW, positions, cache, ctx)
    k_accept, k_draft = jax.random.split(key)
    a_B, new_B = _accept(window_BW[:, 1:], q_BDV, out.logits, k_accept, sampling)
    drafts, q, mtp_stacks = _mtp_chain(cfg, variables, cache, ctx, out.hidden, window_BW,
                                       positions, a_B, new_B, k_draft, sampling)
    stacks.update(mtp_stacks)
    cache = kv_cache.commit(cache, ctx, stacks, jnp.where(active_B, a_B + 1, 0))
    index_W = jnp.arange(w, dtype=jnp.int32)[None, :]
    emitted = jnp.concatenate([window_BW[:, 1:], new_B[:, None]], axis=1)
    emitted = jnp.where(index_W < a_B[:, None], emitted,
                        jnp.where(index_W == a_B[:, None], new_B[:, None], -1))
    window = jnp.concatenate([new_B[:, None], drafts], axis=1)
    return cache, emitted, window, q, pos_B + a_B + 1


@functools.lru_cache(maxsize=32)
def jitted_steps(cfg: ModelConfig, sampling: Sampling, attn_impl: str, speculative: bool):
    """(prefill, step) jitted for one (model, sampling, attention) setting and built once, so the
    per-token calls hash no static arguments; the cache is donated (XLA updates it in place).
      prefill(variables, cache, ids_BT, positions_BT, key) -> cache, token, drafts, draft probs
      step (plain):       (variables, cache, tok_B, pos_B, active_B, key, step)
                          -> cache, next token, its position
      step (speculative): (variables, cache, window_BW, q_BDV, pos_B, active_B, key, step)
                          -> cache, emitted [B, D+1] (-1 padded), next window, q, position"""
    def jit(fn, **kw):
        return jax.jit(functools.partial(fn, cfg=cfg, sampling=sampling, attn_impl=attn_impl,
                                         **kw), donate_argnames=("cache",))
    return (jit(_prefill, speculative=speculative),
            jit(_speculative_step if speculative else _decode_step))


# ----------------------------------------------------------------------------------------------
# The host loop
# ----------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Generation:
    tokens: list[list[int]]           # new tokens per prompt, without the EOS that ended it
    stats: dict                       # decode_steps, tokens_per_forward, acceptance_rate, ...


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def generate(cfg: ModelConfig, variables, prompts: list[list[int]], max_new_tokens: int, *,
             sampling: Sampling = Sampling(), seed: int = 0, eos_id: int | None = None,
             padding: str = "left", speculative: bool = False, attn_impl: str = "absorbed",
             cache_dtype=None, bucket: int = 16,
             on_tokens: Callable[[int, list[int]], None] | None = None) -> Generation:
    """Continues each prompt by up to max_new_tokens tokens, stopping a row at eos_id.

    Prompts are padded to a common width (left or right; `bucket` rounds widths to limit
    recompiles), prefilled in one forward, then decoded one token per main forward, or a + 1
    per forward with `speculative` (MTP draft, lossless: see the module doc). on_tokens(row, ids)
    streams each row's new tokens as they are committed. stats: decode_steps (main forwards after
    the prefill), seconds (prefill included), generated_tokens, tokens_per_s, cache_bytes,
    tokens_per_forward, and with `speculative` acceptance_rate (accepted / proposed drafts) and
    acceptance_by_depth.
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("need at least one prompt, and no empty prompt")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    depth = cfg.num_nextn_predict_layers
    if speculative and depth == 0:
        raise ValueError("speculative decoding drafts with the MTP modules, and this model has "
                         "none (num_nextn_predict_layers = 0)")
    variables = jax.tree.map(jnp.asarray, variables)       # once, not a host copy per step
    b = len(prompts)
    width = _round_up(max(len(p) for p in prompts), bucket)
    positions = kv_cache.prompt_positions([len(p) for p in prompts], width, padding)
    ids = np.zeros((b, width), np.int32)
    ids[positions >= 0] = np.concatenate([np.asarray(p, np.int32) for p in prompts])
    # Kept slots: at most prompt width + new tokens; a verify step writes D+1 slots past them.
    max_len = _round_up(width + max_new_tokens + (depth + 1 if speculative else 0), 64)
    if max_len > cfg.max_position_embeddings:
        print(f"warning: {max_len} cache slots exceed max_position_embeddings "
              f"({cfg.max_position_embeddings})", file=sys.stderr)
    cache = kv_cache.init_cache(cfg, b, max_len, dtype=cache_dtype, with_mtp=speculative)
    prefill, step_fn = jitted_steps(cfg, sampling, attn_impl, speculative)
    key = jax.random.key(seed)

    out: list[list[int]] = [[] for _ in range(b)]
    done = np.zeros(b, bool)

    def emit(row: int, new):
        """Appends a row's new tokens up to EOS (excluded) or max_new_tokens; streams them."""
        fresh = []
        for tok in map(int, new):
            if eos_id is not None and tok == eos_id:
                done[row] = True
                break
            fresh.append(tok)
            if len(out[row]) + len(fresh) == max_new_tokens:
                done[row] = True
                break
        out[row].extend(fresh)
        if on_tokens is not None and fresh:
            on_tokens(row, fresh)

    t0 = time.perf_counter()
    cache, tok, drafts, q = prefill(variables, cache, jnp.asarray(ids), jnp.asarray(positions),
                                    key)
    for r, t in enumerate(np.asarray(tok)):
        emit(r, [t])
    pos = jnp.asarray([len(p) for p in prompts], jnp.int32)    # position of the pending token
    window = jnp.concatenate([tok[:, None], drafts], 1) if speculative else None
    steps = row_steps = accepted = 0
    accepted_at = np.zeros(depth, np.int64)                   # drafts accepted at depth j
    active_np = None
    while not done.all():
        steps += 1
        if active_np is None or (active_np != ~done).any():   # re-sent only when a row stops
            active_np = ~done
            active = jnp.asarray(active_np)
        rows = np.flatnonzero(~done)
        if speculative:
            cache, emitted, window, q, pos = step_fn(variables, cache, window, q, pos, active, key,
                                                     steps)
            emitted = np.asarray(emitted)
            for r in rows:
                new = emitted[r][emitted[r] >= 0]
                emit(r, new)
                accepted += len(new) - 1
                accepted_at[:len(new) - 1] += 1
        else:
            cache, tok, pos = step_fn(variables, cache, tok, pos, active, key, steps)
            tok_np = np.asarray(tok)
            for r in rows:
                emit(r, [tok_np[r]])
        row_steps += len(rows)
    seconds = time.perf_counter() - t0

    generated = sum(len(o) for o in out)
    stats = {"decode_steps": steps, "seconds": seconds, "generated_tokens": generated,
             "tokens_per_s": generated / max(seconds, 1e-9), "cache_bytes": cache.nbytes}
    if speculative:
        drafted = row_steps * depth
        stats.update(
            # tokens one verify forward yields per row: accepted drafts + the main model's token
            tokens_per_forward=(accepted + row_steps) / max(row_steps, 1),
            acceptance_rate=accepted / max(drafted, 1),
            # P(draft j accepted): j = 1 is the paper's "second token" (85-90% at 671B)
            acceptance_by_depth=[float(x) / max(row_steps, 1) for x in accepted_at])
    else:
        stats["tokens_per_forward"] = 1.0
    return Generation(out, stats)


def sample_text(cfg: ModelConfig, state: dict, tokenizer, prompt_ids: list[int], stop_id: int,
                max_new_tokens: int) -> str:
    """A finished run's greedy sample, decoded with its special tokens. Single-process only: a
    multi-process run is told to sample from its checkpoint instead."""
    if jax.process_count() > 1:
        return "(skipped in a multi-process run: python -m dsv3_jax.generate --checkpoint ...)"
    ids = greedy_generate(cfg, {"params": state["params"], "router_bias": state["router_bias"]},
                          prompt_ids, max_new_tokens, eos_id=stop_id)
    return tokenizer.decode(prompt_ids + ids, skip_special_tokens=False)


def greedy_generate(cfg: ModelConfig, variables, prompt_ids: list[int], max_new_tokens: int,
                    eos_id: int | None = None) -> list[int]:
    """Greedy continuation of one prompt; stops at eos_id (not returned) or after max_new_tokens."""
    if not prompt_ids:
        raise ValueError("prompt_ids must not be empty")
    if max_new_tokens <= 0:
        return []
    return generate(cfg, variables, [list(prompt_ids)], max_new_tokens, eos_id=eos_id).tokens[0]


# ----------------------------------------------------------------------------------------------
# Checkpoints and the command line
# ----------------------------------------------------------------------------------------------

def load_checkpoint(path: str, use_ema: bool = False):
    """(cfg, variables as jax arrays, tokenizer.json path or None) from any checkpoint format
    `dsv3_jax.ckpt.load_variables` reads: a trainer workdir / checkpoints dir / step dir (the
    packaged tokenizer; a warning when the run trained with another), an orbax export or a
    Hugging Face / official-release safetensors directory (its tokenizer.json, if any)."""
    cfg, variables = ckpt.load_variables(path, use_ema)
    variables = jax.tree.map(jnp.asarray, variables)
    if ckpt.detect_format(path) != ckpt_load.TRAINER:
        tok = os.path.join(path, "tokenizer.json")
        return cfg, variables, (tok if os.path.isfile(tok) else None)
    from dsv3_jax import tokenizer as tok_lib
    want = ckpt_load.data_info(path).get("tokenizer_sha256")
    if want and want != tok_lib.tokenizer_hash(tok_lib.load_tokenizer()):
        print("warning: the packaged tokenizer differs from the one this run trained with; "
              "pass --tokenizer", file=sys.stderr)
    return cfg, variables, None


def check_tokenizer(tokenizer, cfg: ModelConfig, where: str) -> None:
    """A tokenizer whose ids reach past the model's vocabulary cannot drive it: a UserError."""
    n = tokenizer.get_vocab_size(with_added_tokens=True)
    if n > cfg.vocab_size:
        raise UserError(f"the tokenizer {where} has {n} tokens but the checkpoint's vocabulary "
                        f"has {cfg.vocab_size}: pass the tokenizer the model was trained with "
                        "(--tokenizer)")


class _TextStream:
    """Prints a row's text as tokens arrive (decodes the whole row, prints the new suffix, so a
    character split over byte-level tokens appears once complete)."""

    def __init__(self, tokenizer, prompt_ids):
        self.tokenizer, self.ids = tokenizer, list(prompt_ids)
        self.printed = tokenizer.decode(self.ids)

    def __call__(self, row, new_ids):
        self.ids.extend(new_ids)
        text = self.tokenizer.decode(self.ids)
        if text.startswith(self.printed) and not text.endswith("\ufffd"):
            sys.stdout.write(text[len(self.printed):])
            sys.stdout.flush()
            self.printed = text


@errors.cli
def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True,
                    help="trainer workdir / checkpoints dir / step dir, or a safetensors dir")
    ap.add_argument("--prompt", action="append", required=True, help="repeat for a batch")
    ap.add_argument("--tokenizer", default=None, help="tokenizer.json (default: the run's)")
    ap.add_argument("--max_new_tokens", type=int, default=128)
    ap.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    ap.add_argument("--top_k", type=int, default=0)
    ap.add_argument("--top_p", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--speculative", action="store_true", help="MTP draft + verify")
    ap.add_argument("--attn_impl", default="absorbed", choices=kv_cache.ATTN_IMPLS)
    ap.add_argument("--ema", action="store_true", help="use the EMA parameters of the run")
    args = ap.parse_args(argv)

    from tokenizers import Tokenizer
    from dsv3_jax import tokenizer as tok_lib
    cfg, variables, tok_path = load_checkpoint(args.checkpoint, args.ema)
    if args.tokenizer or tok_path:
        where = args.tokenizer or tok_path
        if not os.path.isfile(where):
            raise UserError(f"tokenizer {where} does not exist")
        tokenizer = Tokenizer.from_file(where)
        eos_id = cfg.eos_token_id
    else:
        where = "(the packaged one)"
        tokenizer, eos_id = tok_lib.load_tokenizer(), tok_lib.EOS_ID
    check_tokenizer(tokenizer, cfg, where)
    prompts = [tokenizer.encode(p).ids or [eos_id] for p in args.prompt]
    sampling = Sampling(args.temperature, args.top_k, args.top_p)
    stream = None
    if len(prompts) == 1:
        stream = _TextStream(tokenizer, prompts[0])
        sys.stdout.write(stream.printed)
    gen = generate(cfg, variables, prompts, args.max_new_tokens, sampling=sampling,
                   seed=args.seed, eos_id=eos_id, speculative=args.speculative,
                   attn_impl=args.attn_impl, on_tokens=stream)
    if stream is None:
        for p, new in zip(prompts, gen.tokens):
            print(tokenizer.decode(p + new) + "\n" + "-" * 40)
    else:
        sys.stdout.write(tokenizer.decode(stream.ids)[len(stream.printed):] + "\n")
    s = gen.stats
    extra = (f", {s['tokens_per_forward']:.2f} tokens per main forward, acceptance "
             f"{s['acceptance_rate']:.1%}") if args.speculative else ""
    print(f"[{s['generated_tokens']} tokens in {s['seconds']:.2f}s incl. compile, "
          f"{s['decode_steps']} decode steps{extra}]", file=sys.stderr)


if __name__ == "__main__":
    main()
