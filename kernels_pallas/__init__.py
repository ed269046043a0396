"""Pallas kernels of the model (FP8 GEMMs, MoE dispatch) and the grouped-GEMM layout they share."""
import contextlib

import jax

_FORCED: list[bool] = []


def interpret_default() -> bool:
    """The one rule for running a Pallas kernel in interpret mode when the caller does not say:
    the Mosaic GPU and Triton kernels compile only for a GPU, so every other backend interprets
    (inside `interpret_mode(v)`: v, e.g. to lower the GPU path for CUDA on a CPU machine)."""
    if _FORCED:
        return _FORCED[-1]
    return jax.default_backend() != "gpu"


@contextlib.contextmanager
def interpret_mode(interpret: bool):
    """Within the block (at trace time), interpret_default() returns `interpret`."""
    _FORCED.append(bool(interpret))
    try:
        yield
    finally:
        _FORCED.pop()
