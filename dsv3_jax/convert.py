"""Checkpoint conversion: Hugging Face / official-release safetensors <-> our variables <-> orbax.

Public API
  cfg, variables = load_hf(path)               # HF (transformers 5) or official FP8 release layout
  save_hf(cfg, variables, path)                # HF layout that transformers' from_pretrained loads
  save_orbax(cfg, variables, path)             # path/variables (orbax) + path/config.json (ours)
  cfg, variables = load_orbax(path)
  dequantize_fp8(w8, scale_inv, block)         # the release's 128x128 block format -> float32
  quantize_fp8(w, block)                       # the inverse (amax/448 per block; for tests/tools)
  hf_config_to_fields(d) / hf_config_dict(cfg) # config.json <-> ModelConfig fields

CLI
  python -m dsv3_jax.convert --from-hf DIR --to CKPT_DIR
  python -m dsv3_jax.convert --from-orbax CKPT_DIR --to-hf DIR [--max-shard-bytes N]

Reading is lazy, tensor by tensor: the safetensors files are memory-mapped and every tensor is
copied (transposed, dequantized, cast) straight into the preallocated, layer-stacked NumPy arrays
of the variables, so host memory peaks near params + the largest tensor. The safetensors format
(8-byte little-endian header length, a JSON header, raw little-endian data) is parsed here
directly because safetensors' NumPy backend cannot return BF16 or FP8 tensors and we do not want
torch as a dependency; nothing is ever unpickled.

Layouts read (both detected per key, mixed freely):
  * transformers 5 `save_pretrained`: `rope_parameters`, float weights, routed experts one per key
    `model.layers.{i}.mlp.experts.{e}.{gate,up,down}_proj.weight` (also accepted: the in-memory
    fused `mlp.experts.gate_up_proj` [E, 2F, D] (gate rows first) and `mlp.experts.down_proj`
    [E, D, F]).
  * the official release: `rope_scaling` {type: yarn} + top-level `rope_theta`,
    `quantization_config.weight_block_size`, float8_e4m3fn weights each with a float32
    `<key>_scale_inv` [ceil(out/B0), ceil(in/B1)] (partial edge blocks):
    W = f32(W8) * S[i // B0, j // B1].
  * MTP module k at `model.layers.{num_hidden_layers + k}.*` (enorm, hnorm, eh_proj,
    shared_head.norm, the decoder block); its `embed_tokens` / `shared_head.head` copies are shared
    with the main model and are ignored on load (save_hf writes copies, like the release).

A config.json written by transformers carries `head_dim` = qk_rope_head_dim (and `qk_head_dim`);
neither is read as an attention head size.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import re
import shutil
import struct
import sys
from typing import Any, Callable, Iterable

import jax
import ml_dtypes
import numpy as np

from dsv3_jax.config import ConfigError, ModelConfig
from dsv3_jax.errors import UserError

log = logging.getLogger(__name__)

FP8_MAX = 448.0                      # largest finite float8_e4m3fn
DEFAULT_BLOCK = (128, 128)
DEFAULT_MAX_SHARD_BYTES = 5 * 2**30  # transformers' default shard size (5 GB)
ORBAX_SUBDIR = "variables"
CONFIG_NAME = "config.json"
INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"

# Fields of ModelConfig that are ours, not the release's: never read from a config.json.
_OUR_FIELDS = ("dtype", "param_dtype", "remat", "scan_unroll", "attn_causal_blocks",
               "train_attention", "attn_block_size", "moe_impl",
               "moe_tile_m",
               "moe_ep_capacity_factor", "gemm_impl", "fp8")
_ROPE_KEYS = ("factor", "original_max_position_embeddings", "beta_fast", "beta_slow", "mscale",
              "mscale_all_dim", "attention_factor", "truncate")


class CheckpointError(UserError):
    """A checkpoint that does not fit its config. Carries every problem, found in one pass."""

    def __init__(self, message: str, missing=(), unexpected=(), misshaped=()):
        super().__init__(message)
        self.missing = list(missing)
        self.unexpected = list(unexpected)
        self.misshaped = list(misshaped)


# ----------------------------------------------------------------------------------------------
# safetensors, read lazily (memory-mapped) and written tensor by tensor
# ----------------------------------------------------------------------------------------------

_ST_DTYPES = {
    "F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16), "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2), "I64": np.dtype("<i8"), "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"), "I8": np.dtype("i1"), "U8": np.dtype("u1"), "BOOL": np.dtype("?"),
}
_NP_TO_ST = {v: k for k, v in _ST_DTYPES.items()}
_FP8_DTYPES = (_ST_DTYPES["F8_E4M3"], _ST_DTYPES["F8_E5M2"])


def _st_name(dtype) -> str:
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
        self.metadata = header.pop("__metadata__", None) or {}
        self.entries: dict[str, dict] = header
        self.data_start = 8 + n
        for name, e in header.items():
            if e["dtype"] not in _ST_DTYPES:
                raise CheckpointError(f"{path}: tensor {name} has unsupported dtype {e['dtype']}")
            b, end = e["data_offsets"]
            want = math.prod(e["shape"]) * _ST_DTYPES[e["dtype"]].itemsize
            if end - b != want or self.data_start + end > size:
                raise CheckpointError(f"{path}: tensor {name} has inconsistent data offsets")
        self._mm = None

    def keys(self):
        return self.entries.keys()

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.entries[name]["shape"])

    def dtype(self, name: str) -> np.dtype:
        return _ST_DTYPES[self.entries[name]["dtype"]]

    def get(self, name: str) -> np.ndarray:
        """A read-only memory-mapped view (no copy until the caller converts it)."""
        e = self.entries[name]
        shape, dt = tuple(e["shape"]), _ST_DTYPES[e["dtype"]]
        if math.prod(shape) == 0:
            return np.zeros(shape, dt)
        if self._mm is None:
            self._mm = np.memmap(self.path, dtype=np.uint8, mode="r")
        b, end = e["data_offsets"]
        return self._mm[self.data_start + b:self.data_start + end].view(dt).reshape(shape)

    def close(self):
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


class _CheckpointFiles:
    """The tensors of a checkpoint directory: one model.safetensors or an index + shards."""

    def __init__(self, path: str):
        self.path = path
        index = os.path.join(path, INDEX_NAME)
        single = os.path.join(path, SINGLE_NAME)
        if os.path.isfile(index):
            with open(index) as f:
                weight_map = json.load(f).get("weight_map")
            if not isinstance(weight_map, dict):
                raise CheckpointError(f"{index}: no 'weight_map'")
            names = sorted(set(weight_map.values()))
        elif os.path.isfile(single):
            weight_map, names = None, [SINGLE_NAME]
        else:
            others = sorted(n for n in os.listdir(path) if n.endswith((".bin", ".pt", ".pth")))
            hint = (f" (found {others[:3]}: pickle-based weights are not read; re-save them as "
                    "safetensors)") if others else ""
            raise FileNotFoundError(f"no {SINGLE_NAME} or {INDEX_NAME} in {path}{hint}")
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

    def shape(self, k):
        return self.where[k].shape(k)

    def dtype(self, k):
        return self.where[k].dtype(k)

    def get(self, k):
        return self.where[k].get(k)

    def close(self):
        for f in self.files.values():
            f.close()


# ----------------------------------------------------------------------------------------------
# FP8 block format
# ----------------------------------------------------------------------------------------------

def _scale_grid(shape, block) -> tuple[int, int]:
    return (-(-shape[0] // block[0]), -(-shape[1] // block[1]))


def dequantize_fp8(w8: np.ndarray, scale_inv: np.ndarray, block=DEFAULT_BLOCK,
                   out: np.ndarray | None = None) -> np.ndarray:
    """W[i, j] = float32(W8[i, j]) * S[i // B0, j // B1]; edge blocks may be partial.

    Works one row-block at a time (memory: one f32 copy of the weight + a row-block of scales).
    """
    if w8.ndim != 2:
        raise ValueError(f"FP8 weights are 2-D, got shape {w8.shape}")
    grid = _scale_grid(w8.shape, block)
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


def quantize_fp8(w: np.ndarray, block=DEFAULT_BLOCK) -> tuple[np.ndarray, np.ndarray]:
    """The release's weight format: per block S = amax / 448 (amax clamped >= 1e-4),
    W8 = e4m3(W / S); returns (W8 float8_e4m3fn, S float32 [ceil(r/B0), ceil(c/B1)])."""
    w = np.asarray(w, np.float32)
    r, c = w.shape
    gr, gc = _scale_grid(w.shape, block)
    pad = np.zeros((gr * block[0], gc * block[1]), np.float32)
    pad[:r, :c] = w
    blocks = pad.reshape(gr, block[0], gc, block[1])
    amax = np.maximum(np.abs(blocks).max(axis=(1, 3)), 1e-4)
    s = (amax / FP8_MAX).astype(np.float32)
    q = (blocks / s[:, None, :, None]).reshape(pad.shape)[:r, :c]
    return q.astype(ml_dtypes.float8_e4m3fn), s


# ----------------------------------------------------------------------------------------------
# config.json <-> ModelConfig
# ----------------------------------------------------------------------------------------------

def _release_fields() -> list[str]:
    return [f.name for f in dataclasses.fields(ModelConfig) if f.name not in _OUR_FIELDS]


def hf_config_to_fields(d: dict[str, Any]) -> dict[str, Any]:
    """ModelConfig keyword arguments from a config.json (transformers 5 or the release).

    Unknown keys (head_dim, qk_head_dim, quantization_config, ep_size, torch_dtype, ...) are
    ignored; `head_dim` in particular is transformers' rope dim, not a head size.
    """
    out: dict[str, Any] = {}
    for name in _release_fields():
        if name in ("rope_scaling", "rope_theta"):
            continue
        if name in d and (d[name] is not None or name == "q_lora_rank"):
            out[name] = d[name]
    if "num_nextn_predict_layers" not in out and d.get("num_mtp_layers") is not None:
        out["num_nextn_predict_layers"] = d["num_mtp_layers"]
    for tok in ("bos_token_id", "eos_token_id"):
        if isinstance(out.get(tok), list):
            out[tok] = out[tok][0] if out[tok] else None
        if tok in out and out[tok] is None:
            del out[tok]
    # RoPE: transformers 5 nests everything in rope_parameters; the release has rope_scaling
    # (type: yarn) + a top-level rope_theta.
    params = d.get("rope_parameters") or None
    scaling = d.get("rope_scaling") or None
    if params is not None and not isinstance(params, dict):
        raise ConfigError(f"rope_parameters must be a dict, got {params!r}")
    if params is not None and any(isinstance(v, dict) for v in params.values()):
        raise ConfigError("per-layer-type rope_parameters are not supported")
    rope = params if params is not None else scaling
    theta = d.get("rope_theta")
    if theta is None and rope is not None:
        theta = rope.get("rope_theta")
    if theta is not None:
        out["rope_theta"] = float(theta)
    if rope is None:
        out["rope_scaling"] = None
    else:
        kind = rope.get("rope_type") or rope.get("type") or "default"
        prf = rope.get("partial_rotary_factor", 1.0)
        if prf not in (None, 1, 1.0):
            raise ConfigError(f"partial_rotary_factor={prf} is not supported")
        if kind == "default":
            out["rope_scaling"] = None
        elif kind != "yarn":
            raise ConfigError(f"unsupported rope type {kind!r}; only 'yarn' (or none) is supported")
        else:
            rs = {k: rope[k] for k in _ROPE_KEYS if rope.get(k) is not None}
            max_pos = d.get("max_position_embeddings")
            if "original_max_position_embeddings" not in rs:   # transformers' default
                if max_pos is None:
                    raise ConfigError("yarn rope needs original_max_position_embeddings")
                rs["original_max_position_embeddings"] = max_pos
            if "factor" not in rs:                              # transformers' default
                if max_pos is None:
                    raise ConfigError("yarn rope needs a factor")
                rs["factor"] = max_pos / rs["original_max_position_embeddings"]
            for k in ("beta_fast", "beta_slow"):                # transformers: `or` defaults
                if not rs.get(k):
                    rs.pop(k, None)
            rs["type"] = "yarn"
            out["rope_scaling"] = rs
    return out


def hf_config_dict(cfg: ModelConfig, dtype: str = "float32") -> dict[str, Any]:
    """A config.json that transformers 5 loads as DeepseekV3Config (release fields kept)."""
    d: dict[str, Any] = {"architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3"}
    for name in _release_fields():
        if name not in ("rope_scaling", "rope_theta"):
            d[name] = getattr(cfg, name)
    rope: dict[str, Any] = {"rope_theta": cfg.rope_theta}
    if cfg.yarn:
        rope["rope_type"] = "yarn"
        for k in _ROPE_KEYS:
            v = cfg.rope_scaling.get(k)
            if v is not None and not (k == "truncate" and v is True):
                rope[k] = v
    else:
        rope["rope_type"] = "default"
    d["rope_parameters"] = rope
    d["dtype"] = dtype
    d["use_cache"] = True
    return dict(sorted(d.items()))


# ----------------------------------------------------------------------------------------------
# The key layout: HF key <-> (variables path, leading index)
# ----------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class _Slot:
    key: str                     # HF key
    path: tuple[str, ...]        # path in our variables tree
    index: tuple[int, ...]       # leading (layer[, expert]) index into the array at `path`
    hf_shape: tuple[int, ...]    # shape on disk ([out, in] for linear weights)
    linear: bool                 # stored transposed: ours[index].reshape(in, out) = hf.T
    num_in: int = 1              # how many leading dims of ours[index] are input dims


def _block_slots(cfg: ModelConfig, hf: str, path: tuple, idx: tuple, moe: bool,
                 bias_path: tuple | None) -> list[_Slot]:
    d, h = cfg.hidden_size, cfg.num_attention_heads
    qk, c, r, k, v = (cfg.qk_head_dim, cfg.kv_lora_rank, cfg.qk_rope_head_dim, cfg.qk_nope_head_dim,
                      cfg.v_head_dim)
    a = path + ("attn",)
    s = []

    def lin(key, sub, out_in, num_in=1):
        s.append(_Slot(hf + key, sub, idx, out_in, True, num_in))

    def vec(key, sub, n):
        s.append(_Slot(hf + key, sub, idx, (n,), False))

    vec("input_layernorm.weight", path + ("attn_norm", "scale"), d)
    vec("post_attention_layernorm.weight", path + ("ffn_norm", "scale"), d)
    if cfg.q_lora_rank is None:
        lin("self_attn.q_proj.weight", a + ("q_proj", "kernel"), (h * qk, d))
    else:
        q = cfg.q_lora_rank
        lin("self_attn.q_a_proj.weight", a + ("q_a", "kernel"), (q, d))
        vec("self_attn.q_a_layernorm.weight", a + ("q_norm", "scale"), q)
        lin("self_attn.q_b_proj.weight", a + ("q_b", "kernel"), (h * qk, q))
    lin("self_attn.kv_a_proj_with_mqa.weight", a + ("kv_a", "kernel"), (c + r, d))
    vec("self_attn.kv_a_layernorm.weight", a + ("kv_norm", "scale"), c)
    lin("self_attn.kv_b_proj.weight", a + ("kv_b", "kernel"), (h * (k + v), c))
    lin("self_attn.o_proj.weight", a + ("o_proj", "kernel"), (d, h * v), num_in=2)
    if not moe:
        i = cfg.intermediate_size
        m = path + ("mlp",)
        lin("mlp.gate_proj.weight", m + ("gate", "kernel"), (i, d))
        lin("mlp.up_proj.weight", m + ("up", "kernel"), (i, d))
        lin("mlp.down_proj.weight", m + ("down", "kernel"), (d, i))
        return s
    f, e_n = cfg.moe_intermediate_size, cfg.n_routed_experts
    m = path + ("moe",)
    lin("mlp.gate.weight", m + ("router",), (e_n, d))
    s.append(_Slot(hf + "mlp.gate.e_score_correction_bias", bias_path, idx, (e_n,), False))
    for e in range(e_n):
        for name, shape in (("gate", (f, d)), ("up", (f, d)), ("down", (d, f))):
            s.append(_Slot(f"{hf}mlp.experts.{e}.{name}_proj.weight", m + ("experts", name),
                           idx + (e,), shape, True))
    if cfg.n_shared_experts:
        fs = f * cfg.n_shared_experts
        lin("mlp.shared_experts.gate_proj.weight", m + ("shared", "gate", "kernel"), (fs, d))
        lin("mlp.shared_experts.up_proj.weight", m + ("shared", "up", "kernel"), (fs, d))
        lin("mlp.shared_experts.down_proj.weight", m + ("shared", "down", "kernel"), (d, fs))
    return s


def _slots(cfg: ModelConfig, num_mtp: int) -> list[_Slot]:
    """Every tensor of the HF layout (experts one per key) in file order."""
    d, vocab = cfg.hidden_size, cfg.vocab_size
    P = ("params",)
    s = [_Slot("model.embed_tokens.weight", P + ("embed",), (), (vocab, d), False)]
    for i in range(cfg.num_hidden_layers):
        moe = i >= cfg.num_dense_layers
        stack = "moe_layers" if moe else "dense_layers"
        j = i - cfg.num_dense_layers if moe else i
        s += _block_slots(cfg, f"model.layers.{i}.", P + (stack, "block"), (j,), moe,
                          ("router_bias", stack, "block", "moe", "bias"))
    s.append(_Slot("model.norm.weight", P + ("final_norm", "scale"), (), (d,), False))
    s.append(_Slot("lm_head.weight", P + ("lm_head",), (), (vocab, d), True))
    for k in range(num_mtp):
        hf, m = f"model.layers.{cfg.num_hidden_layers + k}.", P + (f"mtp_{k}",)
        s.append(_Slot(hf + "enorm.weight", m + ("enorm", "scale"), (), (d,), False))
        s.append(_Slot(hf + "hnorm.weight", m + ("hnorm", "scale"), (), (d,), False))
        s.append(_Slot(hf + "eh_proj.weight", m + ("eh_proj", "kernel"), (), (d, 2 * d), True))
        s += _block_slots(cfg, hf, m + ("block",), (), True,
                          ("router_bias", f"mtp_{k}", "block", "moe", "bias"))
        s.append(_Slot(hf + "shared_head.norm.weight", m + ("norm", "scale"), (), (d,), False))
    return s


_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.*)$")
_FUSED_RE = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(gate_up_proj|down_proj)$")
_MTP_SHARED = ("embed_tokens.weight", "shared_head.head.weight")
_IGNORED_RE = re.compile(r"(^|\.)rotary_emb\.inv_freq$")


def _get(tree: dict, path: tuple[str, ...]):
    for p in path:
        tree = tree[p]
    return tree


def _assign(dest: np.ndarray, slot: _Slot, w: np.ndarray) -> None:
    """ours[index] <- the HF tensor w (transposed for linear weights), cast on the way."""
    view = dest[slot.index] if slot.index else dest
    if slot.linear:
        n_in = math.prod(view.shape[:slot.num_in])
        view.reshape(n_in, -1)[...] = w.T
    else:
        view.reshape(w.shape)[...] = w


def _format_problems(path, missing, unexpected, misshaped, limit=100) -> str:
    parts = [f"checkpoint {path} does not match its config: {len(missing)} missing, "
             f"{len(unexpected)} unexpected, {len(misshaped)} misshaped tensors"]
    for title, items in (("missing", missing), ("unexpected", unexpected),
                         ("misshaped", misshaped)):
        if items:
            parts.append(f"{title} ({len(items)}):")
            parts += [f"  {x}" for x in items[:limit]]
            if len(items) > limit:
                parts.append(f"  ... and {len(items) - limit} more")
    return "\n".join(parts)


def _read_config_json(path: str) -> dict:
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint directory {path} does not exist")
    if not os.path.isdir(path):
        raise NotADirectoryError(f"{path} is not a directory")
    cfg_path = os.path.join(path, CONFIG_NAME)
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"no {CONFIG_NAME} in {path}")
    with open(cfg_path) as f:
        try:
            return json.load(f)
        except ValueError as e:
            raise ConfigError(f"{cfg_path} is not valid JSON: {e}") from None


def load_hf(path: str, *, mtp: str = "auto", param_dtype: str = "float32",
            **overrides) -> tuple[ModelConfig, dict]:
    """(cfg, variables) from a Hugging Face / official-release checkpoint directory.

    mtp: "auto"    load the MTP modules the config declares; a checkpoint that holds none of
                   their tensors (transformers' save_pretrained drops them) loads with
                   num_nextn_predict_layers = 0 and a warning;
         "require" the declared MTP modules must be there;
         "skip"    ignore MTP tensors; num_nextn_predict_layers = 0.
    param_dtype: dtype of the returned parameter arrays (router biases stay float32).
    overrides: ModelConfig fields of ours (dtype, moe_impl, remat, ...) or release fields to force.

    Variables are NumPy arrays, layer-stacked as `dsv3_jax.model.init` lays them out.
    Raises CheckpointError listing every missing, unexpected and misshaped tensor at once.
    """
    from dsv3_jax.model import abstract_variables

    if mtp not in ("auto", "require", "skip"):
        raise ValueError(f"mtp must be 'auto', 'require' or 'skip', got {mtp!r}")
    d = _read_config_json(path)
    fields = hf_config_to_fields(d)
    fields.update(overrides)
    fields["param_dtype"] = param_dtype
    cfg = ModelConfig(**fields)
    qc = d.get("quantization_config") or {}
    block = tuple(qc.get("weight_block_size") or DEFAULT_BLOCK)
    if len(block) != 2:
        raise ConfigError(f"weight_block_size must have 2 entries, got {block}")

    files = _CheckpointFiles(path)
    try:
        keys = set(files.keys())
        L = cfg.num_hidden_layers
        layer_of = {k: int(m.group(1)) for k in keys if (m := _LAYER_RE.match(k))}
        num_mtp = cfg.num_nextn_predict_layers
        if mtp == "skip":
            num_mtp = 0
        elif mtp == "auto" and num_mtp and not any(n >= L for n in layer_of.values()):
            log.warning("%s: the config declares %d MTP module(s) but the checkpoint holds none of "
                        "their tensors; loading without MTP (num_nextn_predict_layers=0)", path,
                        num_mtp)
            num_mtp = 0
        if num_mtp != cfg.num_nextn_predict_layers:
            cfg = cfg.replace(num_nextn_predict_layers=num_mtp)

        slots = _slots(cfg, num_mtp)
        by_key = {s.key: s for s in slots}
        missing, unexpected, misshaped = [], [], []
        fused: dict[str, tuple[int, str]] = {}     # key -> (layer, gate_up_proj | down_proj)
        covered = set()                             # per-expert keys provided by a fused tensor
        scales: dict[str, str] = {}                 # weight key -> its scale key

        for k in sorted(keys):
            if k in by_key:
                continue
            if _IGNORED_RE.search(k):
                continue
            layer = layer_of.get(k)
            if layer is not None and layer >= L:
                rest = _LAYER_RE.match(k).group(2)
                if layer < L + num_mtp and rest in _MTP_SHARED:
                    continue                          # shared embedding/head copies
                if mtp == "skip":
                    continue                          # MTP tensors, not wanted
            if k.endswith("_scale_inv") and k[:-len("_scale_inv")] in by_key:
                scales[k[:-len("_scale_inv")]] = k
                continue
            m = _FUSED_RE.match(k)
            if m and f"model.layers.{m.group(1)}.mlp.gate.weight" in by_key:   # an MoE layer
                i, kind = int(m.group(1)), m.group(2)
                e_n, f, dd = cfg.n_routed_experts, cfg.moe_intermediate_size, cfg.hidden_size
                want = (e_n, 2 * f, dd) if kind == "gate_up_proj" else (e_n, dd, f)
                if files.shape(k) != want:
                    misshaped.append(f"{k}: checkpoint {files.shape(k)} vs expected {want}")
                fused[k] = (i, kind)
                names = ("gate", "up") if kind == "gate_up_proj" else ("down",)
                covered.update(f"model.layers.{i}.mlp.experts.{e}.{n}_proj.weight"
                               for e in range(e_n) for n in names)
                continue
            unexpected.append(f"{k} {files.shape(k)}")

        for s in slots:
            if s.key in covered:
                if s.key in keys:
                    unexpected.append(f"{s.key} (also provided by a fused experts tensor)")
                continue
            if s.key not in keys:
                missing.append(f"{s.key} {s.hf_shape}")
                continue
            got = files.shape(s.key)
            if got != s.hf_shape:
                misshaped.append(f"{s.key}: checkpoint {got} vs expected {s.hf_shape}")
            if files.dtype(s.key).kind not in "fV":          # V: ml_dtypes' bf16 / fp8
                misshaped.append(f"{s.key}: dtype {files.dtype(s.key)} is not a float type")
            if files.dtype(s.key) in _FP8_DTYPES:
                if s.key not in scales:
                    missing.append(f"{s.key}_scale_inv (the FP8 weight's block scales)")
                elif len(got) != 2:
                    misshaped.append(f"{s.key}: FP8 weight must be 2-D, got {got}")
                else:
                    want = _scale_grid(got, block)
                    if files.shape(scales[s.key]) != want:
                        misshaped.append(f"{scales[s.key]}: checkpoint "
                                         f"{files.shape(scales[s.key])} vs expected {want} "
                                         f"(block {block})")
            elif s.key in scales:
                unexpected.append(f"{scales[s.key]} (scale of a weight that is not FP8, "
                                  f"{files.dtype(s.key)})")
        if missing or unexpected or misshaped:
            raise CheckpointError(_format_problems(path, missing, unexpected, misshaped),
                                  missing, unexpected, misshaped)

        # ---- all checks passed: copy tensor by tensor into preallocated stacked arrays ----
        abstract = abstract_variables(cfg)
        variables = jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), abstract)
        variables = _to_dict(variables)
        for s in slots:
            if s.key in covered:
                continue
            dest = _get(variables, s.path)
            w = files.get(s.key)
            if s.key in scales:
                w = dequantize_fp8(w, files.get(scales[s.key]), block)
            _assign(dest, s, w)
            del w
        for k, (i, kind) in fused.items():
            w = files.get(k)                                  # [E, 2F, D] or [E, D, F]
            base = ("params",) + _stack_path(cfg, i) + ("moe", "experts")
            idx = _stack_index(cfg, i)
            f = cfg.moe_intermediate_size
            if kind == "gate_up_proj":
                _sub(_get(variables, base + ("gate",)), idx)[...] = w[:, :f, :].transpose(0, 2, 1)
                _sub(_get(variables, base + ("up",)), idx)[...] = w[:, f:, :].transpose(0, 2, 1)
            else:
                _sub(_get(variables, base + ("down",)), idx)[...] = w.transpose(0, 2, 1)
            del w
    finally:
        files.close()
    return cfg, variables


def _stack_path(cfg: ModelConfig, i: int) -> tuple[str, ...]:
    if i >= cfg.num_hidden_layers:
        return (f"mtp_{i - cfg.num_hidden_layers}", "block")
    return ("moe_layers" if i >= cfg.num_dense_layers else "dense_layers", "block")


def _stack_index(cfg: ModelConfig, i: int) -> tuple[int, ...]:
    if i >= cfg.num_hidden_layers:
        return ()
    return (i - cfg.num_dense_layers,) if i >= cfg.num_dense_layers else (i,)


def _sub(a: np.ndarray, idx: tuple[int, ...]) -> np.ndarray:
    return a[idx] if idx else a


def _to_dict(tree):
    if isinstance(tree, dict) or hasattr(tree, "items"):
        return {k: _to_dict(v) for k, v in tree.items()}
    return tree


# ----------------------------------------------------------------------------------------------
# save_hf
# ----------------------------------------------------------------------------------------------

def save_hf(cfg: ModelConfig, variables: dict, path: str, *,
            max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, dtype: str | None = None,
            write_mtp_shared: bool = True) -> None:
    """Writes the Hugging Face layout: config.json + model.safetensors, or shards
    model-0000i-of-0000n.safetensors with model.safetensors.index.json when the tensors exceed
    max_shard_bytes. Linear weights [out, in]; experts one per key; MTP module k as
    model.layers.{num_hidden_layers + k}.* with copies of the shared embedding and head when
    write_mtp_shared (the release's layout). dtype: cast weights (e.g. "bfloat16"); the
    correction bias always stays float32. transformers' from_pretrained loads the main model
    (it reports the MTP tensors as unused)."""
    if max_shard_bytes <= 0:
        raise ValueError("max_shard_bytes must be positive")
    params = variables.get("params") if isinstance(variables, dict) else None
    if params is None:
        raise ValueError("variables must be a dict with 'params' (and 'router_bias')")
    os.makedirs(path, exist_ok=True)
    host: dict[int, np.ndarray] = {}

    def leaf(p):
        a = _get(variables, p)
        key = id(a)
        if key not in host:
            host[key] = np.asarray(a)
        return host[key]

    num_mtp = cfg.num_nextn_predict_layers
    slots = _slots(cfg, num_mtp)
    # check shapes up front, all at once
    problems = []
    for s in slots:
        try:
            a = _get(variables, s.path)
        except (KeyError, TypeError):
            problems.append(f"missing variable {'/'.join(s.path)}")
            continue
        lead = len(s.index)
        per = tuple(a.shape[lead:])
        if math.prod(per) != math.prod(s.hf_shape) or len(a.shape) < lead:
            problems.append(f"{'/'.join(s.path)}: shape {tuple(a.shape)} does not fit {s.key} "
                            f"{s.hf_shape}")
    if problems:
        raise CheckpointError("variables do not match the config:\n  " + "\n  ".join(
            sorted(set(problems))))

    out_dtype = None if dtype is None else np.dtype(ml_dtypes.bfloat16 if dtype == "bfloat16"
                                                    else dtype)
    items = []

    def item(key, shape, dt, fn):
        items.append((key, tuple(shape), np.dtype(dt), fn))

    def producer(s: _Slot, dt):
        def fn():
            a = leaf(s.path)
            view = a[s.index] if s.index else a
            if s.linear:
                n_in = math.prod(view.shape[:s.num_in])
                w = view.reshape(n_in, -1).T
            else:
                w = view.reshape(s.hf_shape)
            return np.ascontiguousarray(w, dtype=dt)
        return fn

    for s in slots:
        src_dt = _get(variables, s.path).dtype
        dt = np.float32 if s.key.endswith("e_score_correction_bias") else (out_dtype or src_dt)
        item(s.key, s.hf_shape, dt, producer(s, dt))
        if write_mtp_shared and s.key.endswith("shared_head.norm.weight"):
            hf = s.key[:-len("shared_head.norm.weight")]
            emb = _Slot(hf + "embed_tokens.weight", ("params", "embed"), (), (cfg.vocab_size,
                        cfg.hidden_size), False)
            head = _Slot(hf + "shared_head.head.weight", ("params", "lm_head"), (),
                         (cfg.vocab_size, cfg.hidden_size), True)
            for extra in (emb, head):
                edt = out_dtype or _get(variables, extra.path).dtype
                item(extra.key, extra.hf_shape, edt, producer(extra, edt))

    # shards: consecutive items, each shard <= max_shard_bytes (a bigger tensor gets its own)
    shards, cur, cur_bytes = [], [], 0
    for it in items:
        n = math.prod(it[1]) * it[2].itemsize
        if cur and cur_bytes + n > max_shard_bytes:
            shards.append(cur)
            cur, cur_bytes = [], 0
        cur.append(it)
        cur_bytes += n
    if cur:
        shards.append(cur)

    for name in os.listdir(path):        # stale weights of an earlier save would confuse loaders
        if name == INDEX_NAME or (name.startswith("model") and name.endswith(".safetensors")):
            os.remove(os.path.join(path, name))
    if len(shards) == 1:
        write_safetensors(os.path.join(path, SINGLE_NAME), shards[0])
    else:
        weight_map, total = {}, 0
        for i, shard in enumerate(shards, start=1):
            fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            total += write_safetensors(os.path.join(path, fname), shard)
            weight_map.update({it[0]: fname for it in shard})
        with open(os.path.join(path, INDEX_NAME), "w") as f:
            json.dump({"metadata": {"total_size": total},
                       "weight_map": dict(sorted(weight_map.items()))}, f, indent=2)
    cfg_dtype = dtype or str(np.dtype(_get(variables, ("params", "embed")).dtype))
    with open(os.path.join(path, CONFIG_NAME), "w") as f:
        json.dump(hf_config_dict(cfg, dtype=cfg_dtype), f, indent=2)


# ----------------------------------------------------------------------------------------------
# orbax
# ----------------------------------------------------------------------------------------------

def save_orbax(cfg: ModelConfig, variables: dict, path: str, *, overwrite: bool = False) -> None:
    """path/variables: an orbax (StandardCheckpointer) checkpoint of the variables;
    path/config.json: our ModelConfig as JSON."""
    import orbax.checkpoint as ocp

    path = os.path.abspath(path)
    if os.path.exists(path) and not os.path.isdir(path):
        raise NotADirectoryError(f"{path} exists and is not a directory")
    if os.path.isdir(path) and os.listdir(path):
        if not overwrite:
            raise FileExistsError(f"{path} is not empty (pass overwrite=True / --overwrite)")
        shutil.rmtree(path)
    os.makedirs(path, exist_ok=True)
    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(os.path.join(path, ORBAX_SUBDIR), _to_dict(variables))
        ckpt.wait_until_finished()
    with open(os.path.join(path, CONFIG_NAME), "w") as f:
        json.dump(cfg.to_dict(), f, indent=2, sort_keys=True)


def load_orbax(path: str, **overrides) -> tuple[ModelConfig, dict]:
    """(cfg, variables) from a directory written by save_orbax, checked against the config first."""
    import orbax.checkpoint as ocp

    from dsv3_jax.checkpoint import describe_mismatch
    from dsv3_jax.model import abstract_variables

    path = os.path.abspath(path)
    d = _read_config_json(path)
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ConfigError(f"{os.path.join(path, CONFIG_NAME)}: unknown ModelConfig fields "
                          f"{unknown} (is this a Hugging Face directory? use --from-hf)")
    d.update(overrides)
    cfg = ModelConfig(**d)
    vdir = os.path.join(path, ORBAX_SUBDIR)
    if not os.path.isdir(vdir):
        raise FileNotFoundError(f"no orbax checkpoint at {vdir}")
    abstract = _to_dict(abstract_variables(cfg))
    with ocp.StandardCheckpointer() as ckpt:
        stored = ckpt.metadata(vdir)
        stored = getattr(stored, "item_metadata", stored)
        stored = getattr(stored, "tree", stored)
        problems = describe_mismatch(stored, abstract)
        if problems:
            raise CheckpointError(f"orbax checkpoint {vdir} does not match {CONFIG_NAME} "
                                  f"({len(problems)} problems):\n  " + "\n  ".join(problems))
        variables = ckpt.restore(vdir, abstract)
    return cfg, _to_dict(variables)


# ----------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------

def main(argv: Iterable[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m dsv3_jax.convert",
        description="Convert DeepSeek-V3 checkpoints: Hugging Face / official FP8 safetensors "
                    "<-> orbax (variables + our config.json).")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--from-hf", metavar="DIR", help="HF or official-release checkpoint directory")
    src.add_argument("--from-orbax", metavar="CKPT_DIR", help="directory written by --to")
    p.add_argument("--to", metavar="CKPT_DIR", help="output orbax directory (with --from-hf)")
    p.add_argument("--to-hf", metavar="DIR", help="output HF directory (with --from-orbax)")
    p.add_argument("--mtp", choices=("auto", "require", "skip"), default="auto",
                   help="MTP modules on --from-hf (default: auto)")
    p.add_argument("--param-dtype", default="float32", help="dtype of the loaded parameters")
    p.add_argument("--dtype", default=None, help="--to-hf: cast weights (e.g. bfloat16)")
    p.add_argument("--max-shard-bytes", type=int, default=DEFAULT_MAX_SHARD_BYTES,
                   help="--to-hf: largest safetensors shard (default 5 GiB)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --to directory")
    args = p.parse_args(None if argv is None else list(argv))
    if args.from_hf and (not args.to or args.to_hf):
        p.error("--from-hf needs --to CKPT_DIR (and no --to-hf)")
    if args.from_orbax and (not args.to_hf or args.to):
        p.error("--from-orbax needs --to-hf DIR (and no --to)")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        if args.from_hf:
            cfg, variables = load_hf(args.from_hf, mtp=args.mtp, param_dtype=args.param_dtype)
            save_orbax(cfg, variables, args.to, overwrite=args.overwrite)
            dest = args.to
        else:
            cfg, variables = load_orbax(args.from_orbax)
            if os.path.exists(args.to_hf) and not os.path.isdir(args.to_hf):
                raise NotADirectoryError(f"{args.to_hf} exists and is not a directory")
            if os.path.isdir(args.to_hf) and os.listdir(args.to_hf) and not args.overwrite:
                raise FileExistsError(f"{args.to_hf} is not empty (pass --overwrite)")
            save_hf(cfg, variables, args.to_hf, max_shard_bytes=args.max_shard_bytes,
                    dtype=args.dtype)
            dest = args.to_hf
    except (OSError, ValueError) as e:     # CheckpointError and ConfigError are ValueErrors
        print(f"error: {e}", file=sys.stderr)
        return 1
    from dsv3_jax.params import count_params
    n = count_params(cfg)
    print(f"wrote {dest}: {n['total']:,} main-model parameters"
          + (f" + {n['mtp']:,} MTP" if n["mtp"] else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
