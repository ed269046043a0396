"""Hugging Face / official-release checkpoint directories <-> our variables.

  cfg, variables = load_hf(path)          # transformers 5 or the official FP8 release layout
  save_hf(cfg, variables, path)           # the HF layout that transformers' from_pretrained loads

Reading is lazy, tensor by tensor: the safetensors files are memory-mapped and every tensor is
copied (transposed, dequantized, cast) straight into the preallocated, layer-stacked NumPy arrays
of the variables, so host memory peaks near params + the largest tensor. The key layout lives in
ckpt.layout, the FP8 block format in ckpt.fp8_blocks.
"""
from __future__ import annotations

import json
import logging
import math
import os

import jax
import ml_dtypes
import numpy as np

from dsv3_jax.ckpt.errors import CheckpointError
from dsv3_jax.ckpt.fp8_blocks import DEFAULT_BLOCK, dequantize_fp8, scale_grid
from dsv3_jax.ckpt.layout import (CONFIG_NAME, FUSED_RE, IGNORED_RE, LAYER_RE, MTP_SHARED, Slot,
                                  assign, get, hf_config_dict, hf_config_to_fields,
                                  read_config_json, slots as layout_slots, stack_index,
                                  stack_path, sub, to_dict)
from dsv3_jax.ckpt.safetensors_io import (FP8_DTYPES, INDEX_NAME, SINGLE_NAME, SafetensorsDir,
                                          write_safetensors)
from dsv3_jax.config import ConfigError, ModelConfig

log = logging.getLogger(__name__)

DEFAULT_MAX_SHARD_BYTES = 5 * 2**30  # transformers' default shard size (5 GB)


def _format_problems(path: str, missing: list[str], unexpected: list[str], misshaped: list[str],
                     limit: int = 100) -> str:
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
    d = read_config_json(path)
    fields = hf_config_to_fields(d)
    fields.update(overrides)
    fields["param_dtype"] = param_dtype
    cfg = ModelConfig.from_dict(fields)
    qc = d.get("quantization_config") or {}
    block = tuple(qc.get("weight_block_size") or DEFAULT_BLOCK)
    if len(block) != 2:
        raise ConfigError(f"weight_block_size must have 2 entries, got {block}")

    files = SafetensorsDir(path)
    try:
        keys = set(files.keys())
        L = cfg.num_hidden_layers
        layer_of = {k: int(m.group(1)) for k in keys if (m := LAYER_RE.match(k))}
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

        slots = layout_slots(cfg, num_mtp)
        by_key = {s.key: s for s in slots}
        missing, unexpected, misshaped = [], [], []
        fused: dict[str, tuple[int, str]] = {}     # key -> (layer, gate_up_proj | down_proj)
        covered = set()                             # per-expert keys provided by a fused tensor
        scales: dict[str, str] = {}                 # weight key -> its scale key

        for k in sorted(keys):
            if k in by_key:
                continue
            if IGNORED_RE.search(k):
                continue
            layer = layer_of.get(k)
            if layer is not None and layer >= L:
                rest = LAYER_RE.match(k).group(2)
                if layer < L + num_mtp and rest in MTP_SHARED:
                    continue                          # shared embedding/head copies
                if mtp == "skip":
                    continue                          # MTP tensors, not wanted
            if k.endswith("_scale_inv") and k[:-len("_scale_inv")] in by_key:
                scales[k[:-len("_scale_inv")]] = k
                continue
            m = FUSED_RE.match(k)
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
            if files.dtype(s.key) in FP8_DTYPES:
                if s.key not in scales:
                    missing.append(f"{s.key}_scale_inv (the FP8 weight's block scales)")
                elif len(got) != 2:
                    misshaped.append(f"{s.key}: FP8 weight must be 2-D, got {got}")
                else:
                    want = scale_grid(got, block)
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
        variables = to_dict(variables)
        for s in slots:
            if s.key in covered:
                continue
            dest = get(variables, s.path)
            w = files.get(s.key)
            if s.key in scales:
                w = dequantize_fp8(w, files.get(scales[s.key]), block)
            assign(dest, s, w)
            del w
        for k, (i, kind) in fused.items():
            w = files.get(k)                                  # [E, 2F, D] or [E, D, F]
            base = ("params",) + stack_path(cfg, i) + ("moe", "experts")
            idx = stack_index(cfg, i)
            f = cfg.moe_intermediate_size
            if kind == "gate_up_proj":
                sub(get(variables, base + ("gate",)), idx)[...] = w[:, :f, :].transpose(0, 2, 1)
                sub(get(variables, base + ("up",)), idx)[...] = w[:, f:, :].transpose(0, 2, 1)
            else:
                sub(get(variables, base + ("down",)), idx)[...] = w.transpose(0, 2, 1)
            del w
    finally:
        files.close()
    return cfg, variables


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
        a = get(variables, p)
        key = id(a)
        if key not in host:
            host[key] = np.asarray(a)
        return host[key]

    num_mtp = cfg.num_nextn_predict_layers
    slots = layout_slots(cfg, num_mtp)
    # check shapes up front, all at once
    problems = []
    for s in slots:
        try:
            a = get(variables, s.path)
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

    def producer(s: Slot, dt):
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
        src_dt = get(variables, s.path).dtype
        dt = np.float32 if s.key.endswith("e_score_correction_bias") else (out_dtype or src_dt)
        item(s.key, s.hf_shape, dt, producer(s, dt))
        if write_mtp_shared and s.key.endswith("shared_head.norm.weight"):
            hf = s.key[:-len("shared_head.norm.weight")]
            emb = Slot(hf + "embed_tokens.weight", ("params", "embed"), (), (cfg.vocab_size,
                        cfg.hidden_size), False)
            head = Slot(hf + "shared_head.head.weight", ("params", "lm_head"), (),
                         (cfg.vocab_size, cfg.hidden_size), True)
            for extra in (emb, head):
                edt = out_dtype or get(variables, extra.path).dtype
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
    cfg_dtype = dtype or str(np.dtype(get(variables, ("params", "embed")).dtype))
    with open(os.path.join(path, CONFIG_NAME), "w") as f:
        json.dump(hf_config_dict(cfg, dtype=cfg_dtype), f, indent=2)
