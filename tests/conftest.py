import hashlib
import os

import jax
import numpy as np
import pytest

# Implicit rank promotion hides shape bugs; make it an error in every test.
jax.config.update("jax_numpy_rank_promotion", "raise")

SEED_ENV = "DSV3_TEST_SEED"


def seed_for(nodeid: str) -> int:
    """A stable seed from the test id (the same every run and on every machine)."""
    return int.from_bytes(hashlib.sha256(nodeid.encode()).digest()[:4], "little") % (2**31)


@pytest.fixture
def rng(request):
    """A NumPy generator seeded from the test id, so a failure replays as it failed; the seed is
    printed (shown on failure), and DSV3_TEST_SEED=<seed> overrides it (to replay a printed seed
    or to try another draw)."""
    env = os.environ.get(SEED_ENV)
    seed = int(env) if env else seed_for(request.node.nodeid)
    print(f"[seed {seed}: rerun with {SEED_ENV}={seed}]")
    return np.random.default_rng(seed)
