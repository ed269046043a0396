"""The MLA latent cache (spec §2, detailed spec §1.2): per token and layer only the normalised
latent c_kv [C] and the rotated shared rope key k_rope [R] are kept, C + R values (576 at the
release's shapes) instead of the H * (K + R + V) of the per-head keys and values they expand to.

Layout: one `LatentKV` per stack of scanned layers, [L, B, S, C] and [L, B, S, R], stacked on the
layer axis so it is scanned together with the layers' parameters. All stacks of a model (dense
layers, MoE layers, MTP modules) fill the same slots in lock-step, so they share one bookkeeping:
`positions` [B, S] (the RoPE position of the token in each slot, -1 for an empty or padding slot)
and `length` [B] (slots in use; the next token goes into slot `length`).

A step writes T new tokens per row at slots [length, length + T):

  ctx = step_context(cache, positions_BT, attn_impl)   # where they go, what each may attend to
  ... the model's layers write their latents at ctx.write_index_B and attend (model.decode) ...
  cache = commit(cache, ctx, num_kept_B)                # keep the first n new tokens of each row

Masks do the rest: a token attends to the slots at or before its own that hold a token
(position >= 0). Left padding, right padding and the rejected draft tokens of speculative
decoding all become slots with position -1, so a batch of prompts of different lengths, or rows
that accepted different numbers of draft tokens, need no re-packing.
"""
from __future__ import annotations

import flax
import jax
import jax.numpy as jnp
import numpy as np

from dsv3_jax.config import ModelConfig

ATTN_IMPLS = ("absorbed", "naive")


@flax.struct.dataclass
class LatentKV:
    """One stack of layers' latent cache."""
    c_kv: jax.Array       # [L, B, S, C] RMSNorm(c_kv), as the up-projection kv_b consumes it
    k_rope: jax.Array     # [L, B, S, R] shared rope key, already rotated at its position


@flax.struct.dataclass
class KVCache:
    stacks: dict          # name of the model's layer stack ("dense_layers", "moe_layers",
                          # "mtp_0", ...) -> LatentKV
    positions: jax.Array  # [B, S] int32 RoPE position per slot; -1 = empty or padding
    length: jax.Array     # [B] int32 slots in use (written and kept) per row

    @property
    def batch(self) -> int:
        return self.positions.shape[0]

    @property
    def max_len(self) -> int:
        return self.positions.shape[1]

    @property
    def nbytes(self) -> int:
        """Bytes of the cached latents: layers * B * S * (C + R) * itemsize."""
        return sum(x.nbytes for x in jax.tree.leaves(self.stacks))

    @property
    def bookkeeping_nbytes(self) -> int:
        """Bytes of positions and lengths, shared by all layers (B * (S + 1) int32)."""
        return self.positions.nbytes + self.length.nbytes


@flax.struct.dataclass
class StepContext:
    """Where one step's T new tokens go and what they attend to; shared by every layer."""
    write_index_B: jax.Array      # [B] slot of each row's first new token
    kv_positions_BS: jax.Array    # [B, S] the cache's positions with the new tokens written in
    mask_B1TS: jax.Array          # [B, 1, T, S] new token t of row b may attend to slot s
    attn_impl: str = flax.struct.field(pytree_node=False, default="absorbed")


def stack_layers(cfg: ModelConfig, with_mtp: bool) -> dict[str, int]:
    """Layers per cached stack, named as the model's submodules."""
    stacks = {}
    if cfg.num_dense_layers:
        stacks["dense_layers"] = cfg.num_dense_layers
    if cfg.num_moe_layers:
        stacks["moe_layers"] = cfg.num_moe_layers
    if with_mtp:
        stacks.update({f"mtp_{k}": 1 for k in range(cfg.num_nextn_predict_layers)})
    return stacks


def init_cache(cfg: ModelConfig, batch: int, max_len: int, *, dtype=None,
               with_mtp: bool = False) -> KVCache:
    """An empty, preallocated cache; with_mtp adds one single-layer stack per MTP module
    (speculative decoding drafts with them, and they attend to their own past)."""
    dtype = jnp.dtype(dtype or cfg.dtype)
    stacks = {name: LatentKV(jnp.zeros((n, batch, max_len, cfg.kv_lora_rank), dtype),
                             jnp.zeros((n, batch, max_len, cfg.qk_rope_head_dim), dtype))
              for name, n in stack_layers(cfg, with_mtp).items()}
    return KVCache(stacks, jnp.full((batch, max_len), -1, jnp.int32),
                   jnp.zeros((batch,), jnp.int32))


def latent_bytes(cfg: ModelConfig, batch: int, max_len: int, *, dtype=None,
                 with_mtp: bool = False) -> int:
    """The formula: cached layers * batch * max_len * (kv_lora_rank + qk_rope_head_dim) * bytes."""
    layers = sum(stack_layers(cfg, with_mtp).values())
    itemsize = jnp.dtype(dtype or cfg.dtype).itemsize
    return layers * batch * max_len * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * itemsize


def mha_values_per_token_per_layer(cfg: ModelConfig) -> int:
    """What an equal-width standard multi-head cache keeps: every head's key (K + R) and value (V),
    i.e. what the naive MLA formulation materialises from the latent."""
    return cfg.num_attention_heads * (cfg.qk_head_dim + cfg.v_head_dim)


def step_context(cache: KVCache, positions_BT: jax.Array,
                 attn_impl: str = "absorbed") -> StepContext:
    """Slots and masks for T new tokens per row at rope positions positions_BT (-1 = padding)."""
    if attn_impl not in ATTN_IMPLS:
        raise ValueError(f"unknown attn_impl {attn_impl!r}; expected one of {ATTN_IMPLS}")
    b, t = positions_BT.shape
    s = cache.max_len
    slots_BT = cache.length[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]
    rows_B1 = jnp.arange(b)[:, None]
    # mode="drop": a write past max_len is lost rather than clamped onto the last slot (the
    # generator sizes the cache so that this never happens for tokens it keeps).
    kv_pos = cache.positions.at[rows_B1, slots_BT].set(positions_BT.astype(jnp.int32), mode="drop")
    slot_S = jnp.arange(s, dtype=jnp.int32)
    # Causal by slot, not by position: slots past a token's own hold stale draft tokens or
    # padding, never its past.
    mask_BTS = (kv_pos >= 0)[:, None, :] & (slot_S[None, None, :] <= slots_BT[:, :, None])
    return StepContext(cache.length, kv_pos, mask_BTS[:, None], attn_impl)


def write(kv: LatentKV, write_index_B: jax.Array, c_kv_BTC: jax.Array,
          k_rope_BTR: jax.Array) -> LatentKV:
    """One layer's cache [B, S, ...] with T new tokens per row written at write_index_B."""
    b, t = c_kv_BTC.shape[:2]
    rows_B1 = jnp.arange(b)[:, None]
    slots_BT = write_index_B[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]
    return LatentKV(
        kv.c_kv.at[rows_B1, slots_BT].set(c_kv_BTC.astype(kv.c_kv.dtype), mode="drop"),
        kv.k_rope.at[rows_B1, slots_BT].set(k_rope_BTR.astype(kv.k_rope.dtype), mode="drop"))


def commit(cache: KVCache, ctx: StepContext, stacks: dict, num_kept_B: jax.Array) -> KVCache:
    """The cache after a step: the layers' new latents, and the first num_kept_B of the step's
    tokens kept per row. The rest (rejected drafts) become empty slots, overwritten next step."""
    stacks = {**cache.stacks, **stacks}
    length = cache.length + num_kept_B.astype(jnp.int32)
    slot_S = jnp.arange(cache.max_len, dtype=jnp.int32)
    positions = jnp.where(slot_S[None, :] < length[:, None], ctx.kv_positions_BS, -1)
    return KVCache(stacks, positions, length)


def prompt_positions(lengths: list[int], width: int, padding: str) -> np.ndarray:
    """[B, width] rope positions of a batch of prompts padded to `width`, -1 on padding."""
    if padding not in ("left", "right"):
        raise ValueError(f"padding must be 'left' or 'right', got {padding!r}")
    pos = np.full((len(lengths), width), -1, np.int32)
    for i, n in enumerate(lengths):
        if padding == "left":
            pos[i, width - n:] = np.arange(n)
        else:
            pos[i, :n] = np.arange(n)
    return pos
