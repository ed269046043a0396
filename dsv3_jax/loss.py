"""Next-token cross-entropy, and the output head fused with it.

  masked_ce(logits_BTV, targets_BT, mask_BT)                 # from materialised logits
  head_ce(h_BTD, w_DV, targets_BT, mask_BT, chunk=, dtype=)  # head + CE, chunked over the sequence

`head_ce` never holds [B, T, V] logits: it walks the sequence in chunks of `chunk` positions,
and since d CE / d logits = (softmax - onehot) * mask / n is known once the chunk's logits are,
the forward pass that takes gradients also forms dh and dW chunk by chunk and keeps them as the
VJP's residuals; the backward pass only scales them by the incoming cotangent. Same three GEMMs
as the unfused head, no recomputation, and the [chunk x V] block stays small (at V = 129,280 the
materialised float32 logits of a 4K-token sequence are 2 GiB). Called without differentiation it
computes only the loss. Chunks run along T, so a batch sharded over B stays sharded.
"""
from __future__ import annotations

import functools

import einops
import jax
import jax.numpy as jnp

from dsv3_jax.layers import tp
from dsv3_jax.layers.common import head_logits


def masked_ce(logits_BTV, targets_BT, mask_BT):
    """Mean next-token cross-entropy over positions with mask 1 (float32). With `tensor`
    manual (pipeline stages), the logits are this device's vocab columns (layers/tp.py)."""
    logits = logits_BTV.astype(jnp.float32)
    if tp.active():
        nll = tp.vocab_lse(logits) - tp.vocab_pick(logits, targets_BT)
    else:
        nll = (jax.nn.logsumexp(logits, -1)
               - jnp.take_along_axis(logits, targets_BT[..., None], -1)[..., 0])
    mask = mask_BT.astype(jnp.float32)
    return (nll * mask).sum() / jnp.maximum(mask.sum(), 1.0)


def head_ce(h_BTD, w_DV, targets_BT, mask_BT, *, chunk: int = 64, dtype=jnp.float32):
    """masked_ce(h . w, targets, mask) with the logits computed `chunk` positions at a time.

    The GEMMs run in `dtype` with float32 accumulation (as the model's head does); the softmax
    and the loss are float32. T is padded (mask 0) to a multiple of the chunk.
    """
    t = h_BTD.shape[1]
    chunk = max(1, min(chunk, t))
    pad = -t % chunk
    if pad:
        h_BTD = jnp.pad(h_BTD, ((0, 0), (0, pad), (0, 0)))
        targets_BT = jnp.pad(targets_BT, ((0, 0), (0, pad)))
        mask_BT = jnp.pad(mask_BT, ((0, 0), (0, pad)))
    with jax.named_scope("head_ce"):
        return _head_ce(h_BTD, w_DV, targets_BT, mask_BT.astype(jnp.float32), chunk,
                        jnp.dtype(dtype))


def _split(x, chunk):
    """[B, T, ...] -> [T/chunk, B, chunk, ...] (the scan axis first, B kept)."""
    return einops.rearrange(x, "b (n c) ... -> n b c ...", c=chunk)


def _nll(logits_BCV, t_BC):
    if tp.active():   # vocab-split logits (the custom VJP below never differentiates these)
        lse = tp.vocab_lse(logits_BCV)
        return lse, lse - tp.vocab_pick(logits_BCV, t_BC)
    lse = jax.nn.logsumexp(logits_BCV, -1)
    return lse, lse - jnp.take_along_axis(logits_BCV, t_BC[..., None], -1)[..., 0]


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _head_ce(h_BTD, w_DV, targets_BT, mask_BT, chunk, dtype):
    den = jnp.maximum(mask_BT.sum(), 1.0)

    def body(total, xs):
        h, t, m = xs
        _, nll = _nll(head_logits(h, w_DV, dtype), t)
        return total + (nll * m).sum(), None

    xs = (_split(h_BTD, chunk), _split(targets_BT, chunk), _split(mask_BT, chunk))
    total, _ = jax.lax.scan(body, jnp.zeros((), jnp.float32), xs)
    return total / den


def _head_ce_fwd(h_BTD, w_DV, targets_BT, mask_BT, chunk, dtype):
    den = jnp.maximum(mask_BT.sum(), 1.0)
    b, _, d = h_BTD.shape

    def body(carry, xs):
        total, dw_DV = carry
        h, t, m = xs
        logits = head_logits(h, w_DV, dtype)
        lse, nll = _nll(logits, t)
        # d loss / d logits = (softmax - onehot(target)) * mask / den
        g = jnp.exp(logits - lse[..., None])
        # the target's column (with `tensor` manual: its index in this device's columns,
        # one_hot of an index outside them is all zeros)
        local = tp.vocab_slice(t, g.shape[-1])[0] if tp.active() else t
        g = g - jax.nn.one_hot(local, g.shape[-1], dtype=g.dtype)
        g = (g * (m / den)[..., None]).astype(dtype).reshape(-1, g.shape[-1])
        h2 = h.reshape(-1, d).astype(dtype)
        dh = jnp.dot(g, w_DV.astype(dtype).T, preferred_element_type=jnp.float32)
        if tp.active():   # h reached every device's columns: its gradient is their sum
            dh = jax.lax.psum(dh, tp.AXIS)
        dw_DV = dw_DV + jnp.dot(h2.T, g, preferred_element_type=jnp.float32)
        return (total + (nll * m).sum(), dw_DV), dh.reshape(h.shape).astype(h_BTD.dtype)

    xs = (_split(h_BTD, chunk), _split(targets_BT, chunk), _split(mask_BT, chunk))
    init = (jnp.zeros((), jnp.float32), jnp.zeros(w_DV.shape, jnp.float32))
    (total, dw_DV), dh = jax.lax.scan(body, init, xs)
    dh_BTD = einops.rearrange(dh, "n b c d -> b (n c) d")
    return total / den, (dh_BTD, dw_DV.astype(w_DV.dtype), targets_BT, mask_BT)


def _head_ce_bwd(chunk, dtype, res, g):
    dh_BTD, dw_DV, targets_BT, mask_BT = res
    zero = lambda x: (jnp.zeros(x.shape, jax.dtypes.float0) if jnp.issubdtype(x.dtype, jnp.integer)
                      else jnp.zeros_like(x))
    return ((g * dh_BTD).astype(dh_BTD.dtype), (g * dw_DV).astype(dw_DV.dtype),
            zero(targets_BT), zero(mask_BT))


_head_ce.defvjp(_head_ce_fwd, _head_ce_bwd)
