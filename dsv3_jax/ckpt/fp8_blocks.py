"""The official release's FP8 weight format: float8_e4m3fn weights with one float32 scale per
128x128 block (`<key>_scale_inv` [ceil(out/B0), ceil(in/B1)], partial edge blocks):
W = f32(W8) * S[i // B0, j // B1].
"""
from __future__ import annotations

import ml_dtypes
import numpy as np

from dsv3_jax.ckpt.errors import CheckpointError

FP8_MAX = 448.0                      # largest finite float8_e4m3fn
DEFAULT_BLOCK = (128, 128)


def scale_grid(shape: tuple[int, ...], block: tuple[int, int]) -> tuple[int, int]:
    return (-(-shape[0] // block[0]), -(-shape[1] // block[1]))


def dequantize_fp8(w8: np.ndarray, scale_inv: np.ndarray, block: tuple[int, int] = DEFAULT_BLOCK,
                   out: np.ndarray | None = None) -> np.ndarray:
    """W[i, j] = float32(W8[i, j]) * S[i // B0, j // B1]; edge blocks may be partial.

    Works one row-block at a time (memory: one f32 copy of the weight + a row-block of scales).
    """
    if w8.ndim != 2:
        raise ValueError(f"FP8 weights are 2-D, got shape {w8.shape}")
    grid = scale_grid(w8.shape, block)
    if tuple(scale_inv.shape) != grid:
        raise CheckpointError(f"scale_inv shape {tuple(scale_inv.shape)} does not match weight "
                              f"{tuple(w8.shape)} with block {tuple(block)} (expected {grid})")
    out = np.empty(w8.shape, np.float32) if out is None else out
    s = np.asarray(scale_inv, np.float32)
    b0, b1 = block
    cols = w8.shape[1]
    for bi in range(grid[0]):
        rows = slice(bi * b0, (bi + 1) * b0)
        out[rows] = w8[rows].astype(np.float32)
        out[rows] *= np.repeat(s[bi], b1)[None, :cols]
    return out


def quantize_fp8(w: np.ndarray, block: tuple[int, int] = DEFAULT_BLOCK) -> tuple[np.ndarray, np.ndarray]:
    """The release's weight format: per block S = amax / 448 (amax clamped >= 1e-4),
    W8 = e4m3(W / S); returns (W8 float8_e4m3fn, S float32 [ceil(r/B0), ceil(c/B1)])."""
    w = np.asarray(w, np.float32)
    r, c = w.shape
    gr, gc = scale_grid(w.shape, block)
    pad = np.zeros((gr * block[0], gc * block[1]), np.float32)
    pad[:r, :c] = w
    blocks = pad.reshape(gr, block[0], gc, block[1])
    amax = np.maximum(np.abs(blocks).max(axis=(1, 3)), 1e-4)
    s = (amax / FP8_MAX).astype(np.float32)
    q = (blocks / s[:, None, :, None]).reshape(pad.shape)[:r, :c]
    return q.astype(ml_dtypes.float8_e4m3fn), s

