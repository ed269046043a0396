"""safetensors files, read lazily (memory-mapped) and written tensor by tensor.

The format (8-byte little-endian header length, a JSON header, raw little-endian data) is parsed
here directly because safetensors' NumPy backend cannot return BF16 or FP8 tensors and we do not
want torch as a dependency; nothing is ever unpickled.

  SafetensorsFile(path)      one file: header parsed eagerly, tensors memory-mapped on demand
  SafetensorsDir(path)       a checkpoint directory: model.safetensors, or an index + shards
  write_safetensors(path, items)   (name, shape, dtype, producer) items, one tensor at a time
"""
from __future__ import annotations

import json
import math
import os
import struct
from typing import Any, Callable

import ml_dtypes
import numpy as np

from dsv3_jax.ckpt.errors import CheckpointError, CheckpointNotFoundError

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"

ST_DTYPES = {
    "F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16), "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2), "I64": np.dtype("<i8"), "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"), "I8": np.dtype("i1"), "U8": np.dtype("u1"), "BOOL": np.dtype("?"),
}
_NP_TO_ST = {v: k for k, v in ST_DTYPES.items()}
FP8_DTYPES = (ST_DTYPES["F8_E4M3"], ST_DTYPES["F8_E5M2"])


def _st_name(dtype: Any) -> str:
    dt = np.dtype(dtype)
    if dt not in _NP_TO_ST:
        raise ValueError(f"dtype {dt} cannot be stored in safetensors")
    return _NP_TO_ST[dt]


class SafetensorsFile:
    """One .safetensors file: header parsed eagerly, tensors memory-mapped on demand."""

    def __init__(self, path: str):
        self.path = path
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) != 8:
                raise CheckpointError(f"{path}: not a safetensors file (shorter than 8 bytes)")
            n = struct.unpack("<Q", raw)[0]
            if n > size - 8:
                raise CheckpointError(f"{path}: not a safetensors file (header length {n} > file)")
            try:
                header = json.loads(f.read(n))
            except ValueError as e:
                raise CheckpointError(f"{path}: corrupt safetensors header: {e}") from None
        if not isinstance(header, dict) or not all(
                isinstance(e, dict) and {"dtype", "shape", "data_offsets"} <= e.keys()
                for k, e in header.items() if k != "__metadata__"):
            raise CheckpointError(f"{path}: corrupt safetensors header (entries need dtype, "
                                  "shape and data_offsets)")
        self.metadata = header.pop("__metadata__", None) or {}
        self.entries: dict[str, dict] = header
        self.data_start = 8 + n
        for name, e in header.items():
            if e["dtype"] not in ST_DTYPES:
                raise CheckpointError(f"{path}: tensor {name} has unsupported dtype {e['dtype']}")
            b, end = e["data_offsets"]
            want = math.prod(e["shape"]) * ST_DTYPES[e["dtype"]].itemsize
            if self.data_start + end > size:
                raise CheckpointError(f"{path}: truncated safetensors file (tensor {name} ends at "
                                      f"byte {self.data_start + end}, the file has {size})")
            if end - b != want:
                raise CheckpointError(f"{path}: tensor {name} has inconsistent data offsets")
        self._mm = None

    def keys(self):
        return self.entries.keys()

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.entries[name]["shape"])

    def dtype(self, name: str) -> np.dtype:
        return ST_DTYPES[self.entries[name]["dtype"]]

    def get(self, name: str) -> np.ndarray:
        """A read-only memory-mapped view (no copy until the caller converts it)."""
        e = self.entries[name]
        shape, dt = tuple(e["shape"]), ST_DTYPES[e["dtype"]]
        if math.prod(shape) == 0:
            return np.zeros(shape, dt)
        if self._mm is None:
            self._mm = np.memmap(self.path, dtype=np.uint8, mode="r")
        b, end = e["data_offsets"]
        return self._mm[self.data_start + b:self.data_start + end].view(dt).reshape(shape)

    def close(self) -> None:
        self._mm = None


def write_safetensors(path: str, items: list[tuple[str, tuple, np.dtype, Callable[[], np.ndarray]]],
                      metadata: dict[str, str] | None = None) -> int:
    """Writes (name, shape, dtype, producer) items; each producer runs only when its turn comes,
    so at most one tensor is materialised at a time. Returns the number of data bytes."""
    header: dict[str, Any] = {"__metadata__": dict(metadata or {"format": "pt"})}
    offset = 0
    for name, shape, dt, _ in items:
        nbytes = math.prod(shape) * np.dtype(dt).itemsize
        header[name] = {"dtype": _st_name(dt), "shape": list(shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    hb = json.dumps(header, separators=(",", ":")).encode()
    hb += b" " * (-len(hb) % 8)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(hb)))
        f.write(hb)
        for name, shape, dt, produce in items:
            arr = np.ascontiguousarray(produce())
            if arr.shape != tuple(shape) or arr.dtype != np.dtype(dt):
                raise AssertionError(f"{name}: produced {arr.shape} {arr.dtype}, declared "
                                     f"{shape} {dt}")
            if arr.size:
                f.write(arr.reshape(-1).view(np.uint8).data)
    os.replace(tmp, path)
    return offset


class SafetensorsDir:
    """The tensors of a checkpoint directory: one model.safetensors or an index + shards."""

    def __init__(self, path: str):
        self.path = path
        index = os.path.join(path, INDEX_NAME)
        single = os.path.join(path, SINGLE_NAME)
        if os.path.isfile(index):
            with open(index) as f:
                try:
                    weight_map = json.load(f).get("weight_map")
                except (ValueError, AttributeError) as e:
                    raise CheckpointError(f"{index}: not a JSON object: {e}") from None
            if not isinstance(weight_map, dict):
                raise CheckpointError(f"{index}: no 'weight_map'")
            names = sorted(set(weight_map.values()))
        elif os.path.isfile(single):
            weight_map, names = None, [SINGLE_NAME]
        else:
            others = sorted(n for n in os.listdir(path) if n.endswith((".bin", ".pt", ".pth")))
            hint = (f" (found {others[:3]}: pickle-based weights are not read; re-save them as "
                    "safetensors)") if others else ""
            raise CheckpointNotFoundError(f"no {SINGLE_NAME} or {INDEX_NAME} in {path}{hint}")
        self.files: dict[str, SafetensorsFile] = {}
        missing_files = [n for n in names if not os.path.isfile(os.path.join(path, n))]
        if missing_files:
            raise CheckpointError(f"{path}: the index names shard files that do not exist: "
                                  f"{missing_files}")
        for n in names:
            self.files[n] = SafetensorsFile(os.path.join(path, n))
        self.where: dict[str, SafetensorsFile] = {}
        if weight_map is None:
            for k in self.files[SINGLE_NAME].keys():
                self.where[k] = self.files[SINGLE_NAME]
        else:
            absent = []
            for k, n in weight_map.items():
                if k in self.files[n].entries:
                    self.where[k] = self.files[n]
                else:
                    absent.append(f"{k} (index says {n})")
            if absent:
                raise CheckpointError(f"{path}: {len(absent)} tensors listed in the index are not "
                                      "in their shard: " + ", ".join(absent[:20]))

    def keys(self):
        return self.where.keys()

    def shape(self, k: str) -> tuple[int, ...]:
        return self.where[k].shape(k)

    def dtype(self, k: str) -> np.dtype:
        return self.where[k].dtype(k)

    def get(self, k: str) -> np.ndarray:
        return self.where[k].get(k)

    def close(self) -> None:
        for f in self.files.values():
            f.close()

