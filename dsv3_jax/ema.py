"""Parameter EMA in host memory (report §3.2.3): "the EMA parameters are stored in CPU memory and
are updated asynchronously after each training step", so they cost no device memory.

Each process keeps, in NumPy float32, one copy of every distinct shard of the parameters that
its devices hold (a replicated parameter: one copy; a sharded one: this process's slices). After
each step the trainer hands over the new parameters and goes on at once: `update` only enqueues
a device-to-host copy of them into the `pinned_host` memory space (`jax.device_put`, ordered
before the next step, which donates and overwrites those buffers), and a worker thread waits for
that copy and applies ema = d * ema + (1 - d) * params while the device computes the next step.
The main loop never waits for a step to finish, and the device holds no second copy. Where a
backend has no pinned host memory the copy is a blocking fetch instead (`staged` is False).
`device_tree` builds the EMA back on the devices, with the parameters' shardings, only when it is
needed: to evaluate it (eval.ema) and to write it into a checkpoint (the same "ema" entry an
on-device EMA writes, so checkpoints do not depend on where the EMA lived).
"""
from __future__ import annotations

import concurrent.futures

import jax
import numpy as np


def _key(index, shape) -> tuple:
    """A shard's index (a tuple of slices) as hashable (start, stop) pairs."""
    return tuple(s.indices(n)[:2] for s, n in zip(index, shape))


def _pinned_host(sharding):
    """The sharding in the pinned_host memory space, or None where its devices have none."""
    try:
        if not all(any(m.kind == "pinned_host" for m in d.addressable_memories())
                   for d in sharding.addressable_devices):
            return None
        return sharding.with_memory_kind("pinned_host")
    except (AttributeError, NotImplementedError, ValueError):   # no memory kinds here
        return None


def _host_shards(x: jax.Array, copy: bool = False) -> dict:
    """{shard key: float32 array} of the distinct shards on this process's devices (copy: a
    writable copy; else possibly a read-only view of a host buffer)."""
    out = {}
    for shard in x.addressable_shards:
        k = _key(shard.index, x.shape)
        if k not in out:
            out[k] = (np.array if copy else np.asarray)(shard.data, np.float32)
    return out


class HostEMA:
    """The EMA of a parameter tree, in host memory; `update` after each step."""

    def __init__(self, decay: float, params, stage: bool = True):
        """stage: copy through pinned host memory where the backend has it (False: the
        blocking copy, for comparison)."""
        if not 0.0 < decay < 1.0:
            raise ValueError(f"HostEMA decay must be in (0, 1), got {decay}")
        self.decay = float(decay)
        leaves, self.treedef = jax.tree.flatten(params)
        self.avals = [(x.shape, x.dtype, x.sharding) for x in leaves]
        self.host = [_host_shards(x, copy=True) for x in leaves]
        staging = [_pinned_host(x.sharding) for x in leaves] if stage else [None]
        self.staging = None if any(s is None for s in staging) else staging
        self.staged = self.staging is not None
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="host-ema")
        self._pending: list[concurrent.futures.Future] = []

    def update(self, params) -> None:
        """ema = d * ema + (1 - d) * params. Staged: enqueues the copy of params to pinned host
        memory and returns (the worker waits for it); else copies them now, blocking until the
        step that produced them is done. Waits only for the previous update."""
        leaves = jax.tree.leaves(params)
        if self.staged:
            copies = jax.device_put(leaves, self.staging)
            fetch = lambda: [_host_shards(x) for x in copies]
        else:
            fetched = [_host_shards(x) for x in leaves]
            fetch = lambda: fetched
        # at most two updates in flight (the worker applies them in order): the loop may queue
        # the next step while the worker still waits for the one before
        if len(self._pending) == 2:
            self._pending.pop(0).result()
        self._pending.append(self._pool.submit(lambda: self._apply(fetch())))

    def _apply(self, fetched) -> None:
        d, one_minus_d = np.float32(self.decay), np.float32(1.0 - self.decay)
        for host, new in zip(self.host, fetched):
            for k, e in host.items():      # in place: d * e + (1 - d) * p, rounded as XLA does
                e *= d
                e += one_minus_d * new[k]

    def wait(self) -> None:
        """Until the last update has been applied (re-raises its error, if any)."""
        while self._pending:
            self._pending.pop(0).result()

    def device_tree(self):
        """The EMA as device arrays with the parameters' shardings and dtypes."""
        self.wait()
        leaves = []
        for (shape, dtype, sharding), host in zip(self.avals, self.host):
            leaves.append(jax.make_array_from_callback(
                shape, sharding, lambda idx, h=host, s=shape: h[_key(idx, s)].astype(dtype)))
        return jax.tree.unflatten(self.treedef, leaves)

    def nbytes(self) -> int:
        return sum(a.nbytes for host in self.host for a in host.values())

    def close(self) -> None:
        self.wait()
        self._pool.shutdown()


# ----------------------------------------------------------------------------------------------
# The trainer's side
# ----------------------------------------------------------------------------------------------

def off_device(c, state: dict, state_sharding: dict, stack):
    """(HostEMA or None, state, state_sharding): with train.ema_on_host the restored or fresh
    EMA (state["ema"]) moves to the host and the step no longer carries it."""
    if not (c.train.ema_decay and c.train.ema_on_host):
        return None, state, state_sharding
    ema = HostEMA(c.train.ema_decay, state["ema"])
    stack.callback(ema.close)
    drop = lambda d: {k: v for k, v in d.items() if k != "ema"}
    return ema, drop(state), drop(state_sharding)


def params_of(state: dict, ema: HostEMA | None):
    """The EMA parameters on the devices: from the host EMA, else the state's own."""
    return ema.device_tree() if ema is not None else state["ema"]


def checkpointed(state: dict, ema: HostEMA | None) -> dict:
    """The state as checkpointed: a host EMA goes in as the state's "ema" entry."""
    return state if ema is None else dict(state, ema=ema.device_tree())
