"""loss.head_ce (head + CE fused over sequence chunks) against float64 NumPy."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsv3_jax import loss


def numpy_ce_and_grads(h, w, t, m):
    """Loss and its gradients in float64: d/dlogits = (softmax - onehot) * mask / n."""
    h64, w64 = h.astype(np.float64), w.astype(np.float64)
    logits = h64 @ w64
    lse = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    nll = lse - np.take_along_axis(logits, t[..., None], -1)[..., 0]
    den = max(m.sum(), 1.0)
    g = np.exp(logits - lse[..., None])
    np.put_along_axis(g, t[..., None], np.take_along_axis(g, t[..., None], -1) - 1.0, -1)
    g *= (m / den)[..., None]
    return (nll * m).sum() / den, g @ w64.T, np.einsum("btd,btv->dv", h64, g)


@pytest.mark.parametrize("b,t,chunk", [(2, 24, 8), (3, 20, 7), (1, 5, 64)])
def test_head_ce_value_and_grads_match_float64(b, t, chunk, rng):
    d, v = 16, 50
    h = rng.standard_normal((b, t, d)).astype(np.float32)
    w = (rng.standard_normal((d, v)) * 0.3).astype(np.float32)
    tg = rng.integers(0, v, (b, t)).astype(np.int32)
    m = (rng.random((b, t)) > 0.25).astype(np.float32)
    want, dh_want, dw_want = numpy_ce_and_grads(h, w, tg, m)
    f = jax.jit(jax.value_and_grad(
        lambda h, w: loss.head_ce(h, w, jnp.asarray(tg), jnp.asarray(m), chunk=chunk),
        argnums=(0, 1)))
    with jax.default_matmul_precision("highest"):
        got, (dh, dw) = f(jnp.asarray(h), jnp.asarray(w))
        plain = loss.masked_ce(jnp.asarray(h) @ jnp.asarray(w), jnp.asarray(tg), jnp.asarray(m))
        primal = loss.head_ce(jnp.asarray(h), jnp.asarray(w), jnp.asarray(tg), jnp.asarray(m),
                              chunk=chunk)                    # the undifferentiated path
    np.testing.assert_allclose(got, want, rtol=1e-5)
    np.testing.assert_allclose(primal, want, rtol=1e-5)
    np.testing.assert_allclose(plain, want, rtol=1e-5)
    np.testing.assert_allclose(dh, dh_want, atol=1e-6 * np.abs(dh_want).max() + 1e-9, rtol=1e-4)
    np.testing.assert_allclose(dw, dw_want, atol=1e-6 * np.abs(dw_want).max() + 1e-9, rtol=1e-4)


def test_head_ce_scales_with_the_incoming_cotangent(rng):
    h = jnp.asarray(rng.standard_normal((2, 8, 4)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((4, 11)), jnp.float32)
    tg = jnp.asarray(rng.integers(0, 11, (2, 8)), jnp.int32)
    m = jnp.ones((2, 8), jnp.float32)
    g1 = jax.grad(lambda h: loss.head_ce(h, w, tg, m, chunk=4))(h)
    g3 = jax.grad(lambda h: 3.0 * loss.head_ce(h, w, tg, m, chunk=4))(h)
    np.testing.assert_allclose(g3, 3.0 * g1, rtol=1e-6)
