import jax
import numpy as np
import pytest

# Implicit rank promotion hides shape bugs; make it an error in every test.
jax.config.update("jax_numpy_rank_promotion", "raise")


@pytest.fixture
def rng(request):
    """A fresh NumPy generator per test (seeded from the test id, printed on failure)."""
    seed = np.random.SeedSequence().entropy % (2**31)
    print(f"[seed {seed}]")
    return np.random.default_rng(seed)
