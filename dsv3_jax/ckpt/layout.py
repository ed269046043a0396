"""The Hugging Face / official-release checkpoint layout: config.json <-> ModelConfig fields, and
the table of every tensor key <-> (path in our variables, leading layer/expert index).

Layouts (both detected per key, mixed freely):
  * transformers 5 `save_pretrained`: `rope_parameters`, float weights, routed experts one per key
    `model.layers.{i}.mlp.experts.{e}.{gate,up,down}_proj.weight` (also accepted: the in-memory
    fused `mlp.experts.gate_up_proj` [E, 2F, D] (gate rows first) and `mlp.experts.down_proj`
    [E, D, F]).
  * the official release: `rope_scaling` {type: yarn} + top-level `rope_theta`,
    `quantization_config.weight_block_size`, FP8 weights with block scales (ckpt.fp8_blocks).
  * MTP module k at `model.layers.{num_hidden_layers + k}.*` (enorm, hnorm, eh_proj,
    shared_head.norm, the decoder block); its `embed_tokens` / `shared_head.head` copies are shared
    with the main model.

A config.json written by transformers carries `head_dim` = qk_rope_head_dim (and `qk_head_dim`);
neither is read as an attention head size.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from typing import Any

import numpy as np

from dsv3_jax.ckpt.errors import CheckpointNotFoundError
from dsv3_jax.config import ConfigError, ModelConfig

CONFIG_NAME = "config.json"

# Fields of ModelConfig that are ours, not the release's: never read from a config.json.
_OUR_FIELDS = ("dtype", "param_dtype", "remat", "scan_unroll", "attn_causal_blocks",
               "train_attention", "attn_block_size", "moe_impl", "moe_tile_m",
               "moe_ep_capacity_factor", "gemm_impl", "fp8")
_ROPE_KEYS = ("factor", "original_max_position_embeddings", "beta_fast", "beta_slow", "mscale",
              "mscale_all_dim", "attention_factor", "truncate")


# ----------------------------------------------------------------------------------------------
# config.json <-> ModelConfig
# ----------------------------------------------------------------------------------------------

def release_fields() -> list[str]:
    return [f.name for f in dataclasses.fields(ModelConfig) if f.name not in _OUR_FIELDS]


def hf_config_to_fields(d: dict[str, Any]) -> dict[str, Any]:
    """ModelConfig keyword arguments from a config.json (transformers 5 or the release).

    Unknown keys (head_dim, qk_head_dim, quantization_config, ep_size, torch_dtype, ...) are
    ignored; `head_dim` in particular is transformers' rope dim, not a head size.
    """
    out: dict[str, Any] = {}
    for name in release_fields():
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
    for name in release_fields():
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


def read_config_json(path: str) -> dict:
    """The parsed config.json of a checkpoint directory (CheckpointNotFoundError without one)."""
    if not os.path.exists(path):
        raise CheckpointNotFoundError(f"checkpoint directory {path} does not exist")
    if not os.path.isdir(path):
        raise CheckpointNotFoundError(f"{path} is not a directory")
    cfg_path = os.path.join(path, CONFIG_NAME)
    if not os.path.isfile(cfg_path):
        raise CheckpointNotFoundError(f"no {CONFIG_NAME} in {path}")
    with open(cfg_path) as f:
        try:
            return json.load(f)
        except ValueError as e:
            raise ConfigError(f"{cfg_path} is not valid JSON: {e}") from None


# ----------------------------------------------------------------------------------------------
# The key layout: HF key <-> (variables path, leading index)
# ----------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Slot:
    key: str                     # HF key
    path: tuple[str, ...]        # path in our variables tree
    index: tuple[int, ...]       # leading (layer[, expert]) index into the array at `path`
    hf_shape: tuple[int, ...]    # shape on disk ([out, in] for linear weights)
    linear: bool                 # stored transposed: ours[index].reshape(in, out) = hf.T
    num_in: int = 1              # how many leading dims of ours[index] are input dims


def _block_slots(cfg: ModelConfig, hf: str, path: tuple, idx: tuple, moe: bool,
                 bias_path: tuple | None) -> list[Slot]:
    d, h = cfg.hidden_size, cfg.num_attention_heads
    qk, c, r, k, v = (cfg.qk_head_dim, cfg.kv_lora_rank, cfg.qk_rope_head_dim, cfg.qk_nope_head_dim,
                      cfg.v_head_dim)
    a = path + ("attn",)
    s = []

    def lin(key, sub, out_in, num_in=1):
        s.append(Slot(hf + key, sub, idx, out_in, True, num_in))

    def vec(key, sub, n):
        s.append(Slot(hf + key, sub, idx, (n,), False))

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
    s.append(Slot(hf + "mlp.gate.e_score_correction_bias", bias_path, idx, (e_n,), False))
    for e in range(e_n):
        for name, shape in (("gate", (f, d)), ("up", (f, d)), ("down", (d, f))):
            s.append(Slot(f"{hf}mlp.experts.{e}.{name}_proj.weight", m + ("experts", name),
                           idx + (e,), shape, True))
    if cfg.n_shared_experts:
        fs = f * cfg.n_shared_experts
        lin("mlp.shared_experts.gate_proj.weight", m + ("shared", "gate", "kernel"), (fs, d))
        lin("mlp.shared_experts.up_proj.weight", m + ("shared", "up", "kernel"), (fs, d))
        lin("mlp.shared_experts.down_proj.weight", m + ("shared", "down", "kernel"), (d, fs))
    return s


def slots(cfg: ModelConfig, num_mtp: int) -> list[Slot]:
    """Every tensor of the HF layout (experts one per key) in file order."""
    d, vocab = cfg.hidden_size, cfg.vocab_size
    P = ("params",)
    s = [Slot("model.embed_tokens.weight", P + ("embed",), (), (vocab, d), False)]
    for i in range(cfg.num_hidden_layers):
        moe = i >= cfg.num_dense_layers
        stack = "moe_layers" if moe else "dense_layers"
        j = i - cfg.num_dense_layers if moe else i
        s += _block_slots(cfg, f"model.layers.{i}.", P + (stack, "block"), (j,), moe,
                          ("router_bias", stack, "block", "moe", "bias"))
    s.append(Slot("model.norm.weight", P + ("final_norm", "scale"), (), (d,), False))
    s.append(Slot("lm_head.weight", P + ("lm_head",), (), (vocab, d), True))
    for k in range(num_mtp):
        hf, m = f"model.layers.{cfg.num_hidden_layers + k}.", P + (f"mtp_{k}",)
        s.append(Slot(hf + "enorm.weight", m + ("enorm", "scale"), (), (d,), False))
        s.append(Slot(hf + "hnorm.weight", m + ("hnorm", "scale"), (), (d,), False))
        s.append(Slot(hf + "eh_proj.weight", m + ("eh_proj", "kernel"), (), (d, 2 * d), True))
        s += _block_slots(cfg, hf, m + ("block",), (), True,
                          ("router_bias", f"mtp_{k}", "block", "moe", "bias"))
        s.append(Slot(hf + "shared_head.norm.weight", m + ("norm", "scale"), (), (d,), False))
    return s


LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.*)$")
FUSED_RE = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(gate_up_proj|down_proj)$")
MTP_SHARED = ("embed_tokens.weight", "shared_head.head.weight")
IGNORED_RE = re.compile(r"(^|\.)rotary_emb\.inv_freq$")


def get(tree: dict, path: tuple[str, ...]) -> Any:
    for p in path:
        tree = tree[p]
    return tree


def assign(dest: np.ndarray, slot: Slot, w: np.ndarray) -> None:
    """ours[index] <- the HF tensor w (transposed for linear weights), cast on the way."""
    view = dest[slot.index] if slot.index else dest
    if slot.linear:
        n_in = math.prod(view.shape[:slot.num_in])
        view.reshape(n_in, -1)[...] = w.T
    else:
        view.reshape(w.shape)[...] = w


def stack_path(cfg: ModelConfig, i: int) -> tuple[str, ...]:
    if i >= cfg.num_hidden_layers:
        return (f"mtp_{i - cfg.num_hidden_layers}", "block")
    return ("moe_layers" if i >= cfg.num_dense_layers else "dense_layers", "block")


def stack_index(cfg: ModelConfig, i: int) -> tuple[int, ...]:
    if i >= cfg.num_hidden_layers:
        return ()
    return (i - cfg.num_dense_layers,) if i >= cfg.num_dense_layers else (i,)


def sub(a: np.ndarray, idx: tuple[int, ...]) -> np.ndarray:
    return a[idx] if idx else a


def to_dict(tree: Any) -> Any:
    if isinstance(tree, dict) or hasattr(tree, "items"):
        return {k: to_dict(v) for k, v in tree.items()}
    return tree
