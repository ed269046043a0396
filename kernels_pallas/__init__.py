"""Pallas kernels of the model (FP8 GEMMs, MoE dispatch) and the grouped-GEMM layout they share."""
import jax


def interpret_default() -> bool:
    """The one rule for running a Pallas kernel in interpret mode when the caller does not say:
    the Mosaic GPU and Triton kernels compile only for a GPU, so every other backend interprets."""
    return jax.default_backend() != "gpu"
