"""The host EMA (dsv3_jax/ema.py): the staged (pinned host) copy gives the EMA of the parameters
each donating step produced, and `update` returns before the step has finished."""
import jax
import jax.numpy as jnp
import numpy as np

from dsv3_jax import ema as ema_lib


def _slow_step(n_matmuls):
    """A donating 'train step' whose output depends on every input element."""
    def step(params):
        w = params["w"]
        for _ in range(n_matmuls):
            w = jnp.tanh(w @ w / w.shape[0]) + 0.01
        return {"w": w, "b": params["b"] * 0.9 + w[0]}
    return jax.jit(step, donate_argnums=0)


def test_staged_ema_equals_a_float64_reference_through_donating_steps():
    rng = np.random.default_rng(0)
    params = {"w": jnp.asarray(rng.normal(size=(64, 64)), jnp.float32),
              "b": jnp.asarray(rng.normal(size=(64,)), jnp.float32)}
    d = 0.8
    ema = ema_lib.HostEMA(d, params)
    assert ema.staged                                     # CPU has a pinned_host memory space
    ref = {k: np.asarray(v, np.float64) for k, v in params.items()}
    step = _slow_step(3)
    for _ in range(5):
        params = step(params)        # donates the previous params: the copy must be ordered
        ema.update(params)
        host = {k: np.asarray(v, np.float64) for k, v in params.items()}
        ref = {k: d * ref[k] + (1 - d) * host[k] for k in ref}
    out = ema.device_tree()
    ema.close()
    for k in ref:
        np.testing.assert_allclose(np.asarray(out[k]), ref[k], rtol=2e-6, atol=2e-6)
        assert out[k].sharding == params[k].sharding


def test_update_does_not_wait_for_the_step():
    params = {"w": jnp.eye(512, dtype=jnp.float32) + 0.5, "b": jnp.zeros((512,), jnp.float32)}
    ema = ema_lib.HostEMA(0.5, params)
    step = _slow_step(200)
    params = step(params)
    jax.block_until_ready(step(jax.tree.map(jnp.copy, params)))    # compiled, warm
    params = step(params)
    ema.update(params)                       # enqueued: the step is still running
    assert not params["w"].is_ready()
    ema.wait()
    assert params["w"].is_ready()
    ema.close()


def test_blocking_fallback_gives_the_same_ema():
    rng = np.random.default_rng(1)
    params = {"w": jnp.asarray(rng.normal(size=(32, 32)), jnp.float32),
              "b": jnp.asarray(rng.normal(size=(32,)), jnp.float32)}
    a, b = ema_lib.HostEMA(0.7, params), ema_lib.HostEMA(0.7, params, stage=False)
    assert a.staged and not b.staged
    step = _slow_step(2)
    for _ in range(3):
        params = step(params)
        a.update(params)
        b.update(params)
    for x, y in zip(jax.tree.leaves(a.device_tree()), jax.tree.leaves(b.device_tree())):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    a.close()
    b.close()
