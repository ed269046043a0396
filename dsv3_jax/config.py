"""Model shapes: one frozen, validated dataclass with the fields of the release's config.json.

Field names are those of the released `config.json` (and Hugging Face's `DeepseekV3Config`), so a
checkpoint's config maps 1:1. Knobs that the release does not have (compute dtype, remat policy,
MoE implementation, FP8) follow, marked "ours". Presets are functions.
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import math
from typing import Any

from dsv3_jax.errors import UserError

_DTYPES = ("float32", "bfloat16", "float16", "float64")
_REMAT = ("none", "full", "selective")
_MOE_IMPLS = ("auto", "sorted", "gather", "dense")
_GEMM_IMPLS = ("jnp", "pallas")
TRAIN_ATTENTION = ("reference", "blockwise", "pallas", "auto")   # layers/attention.py


class ConfigError(UserError):
    """A model config that cannot describe a working model."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    # ---- fields of the released config.json (names as there) ----
    vocab_size: int = 129280
    hidden_size: int = 7168
    intermediate_size: int = 18432          # dense FFN width (first_k_dense_replace layers)
    moe_intermediate_size: int = 2048       # width of each routed and shared expert
    num_hidden_layers: int = 61
    num_nextn_predict_layers: int = 1       # MTP depth D
    first_k_dense_replace: int = 3
    moe_layer_freq: int = 1
    n_routed_experts: int = 256
    n_shared_experts: int = 1
    num_experts_per_tok: int = 8
    n_group: int = 8
    topk_group: int = 4
    topk_method: str = "noaux_tc"
    scoring_func: str = "sigmoid"
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 2.5
    aux_loss_alpha: float = 0.0001          # the report's alpha (the release's json says 0.001)
    seq_aux: bool = True
    num_attention_heads: int = 128
    num_key_value_heads: int = 128
    q_lora_rank: int | None = 1536          # None: V2-Lite style direct query projection
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None   # {"type": "yarn", "factor": 40, ...} or None
    rope_interleave: bool = True            # released weights rotate adjacent pairs
    max_position_embeddings: int = 163840
    rms_norm_eps: float = 1e-6
    hidden_act: str = "silu"
    attention_bias: bool = False
    attention_dropout: float = 0.0
    tie_word_embeddings: bool = False
    initializer_range: float = 0.006        # the report's init std (HF's json says 0.02)
    bos_token_id: int = 0
    eos_token_id: int = 1
    # ---- ours ----
    dtype: str = "float32"                  # compute dtype of activations
    param_dtype: str = "float32"            # master weights
    remat: str = "none"                     # none | full | selective (norms + MLA up-projections)
    # Layers per iteration of the scanned stacks (capped at each stack's depth). 1 keeps compile
    # time flat in depth; unrolling drops the stacked per-layer residual buffers (their zero
    # fill and copies), ~11% of a tiny-model train step on CPU.
    scan_unroll: int = 1
    # Training self-attention in this many causal query blocks (each skips the keys after it):
    # (n-1)/2n of the score work saved; unrolled, so keep n small (the plain-jnp path).
    attn_causal_blocks: int = 1
    # Training/prefill self-attention (layers/attention.py): reference (materialised [B,H,T,S]
    # scores) | blockwise (flash attention in jnp, memory T x block) | pallas (tokamax's Hopper
    # kernel) | auto (reference below 1024 tokens, then pallas on a GPU with tokamax, else
    # blockwise). Decoding keeps its own formulation (generate's attn_impl).
    train_attention: str = "auto"
    attn_block_size: int = 256              # blockwise: query and key block (tokens)
    # auto: gather for few routed slots (decode), else sorted; sorted: dropless grouped GEMM;
    # gather: each slot's expert weights gathered (cost x slots); dense: every expert (reference)
    moe_impl: str = "auto"
    moe_tile_m: int | None = None           # rows per grouped-GEMM tile; None: from token count
    moe_ep_capacity_factor: float = 2.0     # EP all-to-all rows per destination (x even share);
                                            # overflow: worst-case buffers (0 = always those)
    gemm_impl: str = "jnp"                  # jnp | pallas: MoE dispatch + FP8 GEMM kernels
    fp8: bool = False                       # route Linear layers through the FP8 recipe
    # FP8 (report §3.3.3): cache Linear inputs for Wgrad as FP8 1x128 tiles (the attention
    # output projection's input stays in the compute dtype) and the MoE SwiGLU inputs in FP8,
    # recomputing its output in the backward pass
    fp8_cache_activations: bool = True
    # FP8 (report §3.3.3): expert parallelism sends the dispatched rows (and, backward, the
    # gradient before the down-projections) as FP8 with power-of-2 1x128 scales; the routed
    # experts' GEMMs use power-of-2 scales on every mesh, so dispatch adds no rounding
    fp8_dispatch: bool = True

    def __post_init__(self):
        object.__setattr__(self, "rope_scaling", _normalise_rope_scaling(self.rope_scaling))
        self.validate()
        # jit hashes static configs on every call: compute it once (frozen, so it cannot go stale)
        object.__setattr__(self, "_hash", hash(json.dumps(self.to_dict(), sort_keys=True)))

    # ---- derived shapes ----
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def num_dense_layers(self) -> int:
        return min(self.first_k_dense_replace, self.num_hidden_layers)

    @property
    def num_moe_layers(self) -> int:
        return self.num_hidden_layers - self.num_dense_layers

    @property
    def yarn(self) -> bool:
        return self.rope_scaling is not None and self.rope_scaling["type"] == "yarn"

    def __hash__(self):  # rope_scaling is a dict; hash the JSON form so configs can be jit-static
        return self._hash

    def replace(self, **kw) -> "ModelConfig":
        return dataclasses.replace(self, **kw)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any], *, strict: bool = True,
                  where: str = "model config") -> "ModelConfig":
        """The one dict -> ModelConfig constructor. strict: unknown keys are a ConfigError
        naming each (with the closest field); otherwise they are ignored."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown and strict:
            hints = []
            for k in unknown:
                close = difflib.get_close_matches(k, sorted(known), n=1)
                hints.append(f"{k!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
            raise ConfigError(f"{where} has unknown keys: {', '.join(hints)}")
        return cls(**{k: v for k, v in d.items() if k in known})

    # ---- validation ----
    def validate(self) -> None:
        errors = []
        def need(cond, msg):
            if not cond:
                errors.append(msg)

        for name in ("vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size",
                                  "num_attention_heads", "kv_lora_rank", "qk_nope_head_dim", "v_head_dim",
                                  "n_group", "topk_group"):
            need(isinstance(getattr(self, name), int) and getattr(self, name) > 0,
                      f"{name} must be a positive int, got {getattr(self, name)!r}")
        need(self.num_hidden_layers >= 1, f"num_hidden_layers must be >= 1, got {self.num_hidden_layers}")
        need(self.first_k_dense_replace >= 0, "first_k_dense_replace must be >= 0")
        need(self.num_nextn_predict_layers >= 0, "num_nextn_predict_layers must be >= 0")
        need(self.moe_layer_freq == 1, "moe_layer_freq != 1 is not supported (every layer after "
                  "first_k_dense_replace is MoE, as in the release)")
        need(self.q_lora_rank is None or self.q_lora_rank > 0,
                  f"q_lora_rank must be None or positive, got {self.q_lora_rank}")
        need(self.qk_rope_head_dim > 0 and self.qk_rope_head_dim % 2 == 0,
                  f"qk_rope_head_dim must be positive and even for RoPE, got {self.qk_rope_head_dim}")
        need(self.num_key_value_heads == self.num_attention_heads,
                  "MLA has as many key/value heads as query heads: num_key_value_heads must equal "
                  f"num_attention_heads ({self.num_key_value_heads} != {self.num_attention_heads})")
        need(self.hidden_act == "silu", f"hidden_act must be 'silu' (SwiGLU), got {self.hidden_act!r}")
        need(not self.attention_bias, "attention_bias=True is not supported (the release has none)")
        need(not self.tie_word_embeddings, "tie_word_embeddings=True is not supported")
        need(self.scoring_func == "sigmoid", f"scoring_func must be 'sigmoid', got {self.scoring_func!r}")
        need(self.topk_method == "noaux_tc", f"topk_method must be 'noaux_tc', got {self.topk_method!r}")
        if self.num_moe_layers > 0 or self.num_nextn_predict_layers > 0:
            e, g = self.n_routed_experts, self.n_group
            need(isinstance(e, int) and e > 0, f"n_routed_experts must be positive, got {e}")
            need(self.n_shared_experts >= 0, "n_shared_experts must be >= 0")
            if isinstance(e, int) and e > 0 and g > 0:
                need(e % g == 0, f"n_routed_experts ({e}) must be divisible by n_group ({g})")
                need(self.topk_group <= g, f"topk_group ({self.topk_group}) > n_group ({g})")
                per_group = e // g if e % g == 0 else 0
                need(per_group >= 2 or g == 1, f"group-limited routing scores a group by its top-2 "
                          f"experts: need >= 2 experts per group, got {per_group}")
                kept = per_group * min(self.topk_group, g)
                need(0 < self.num_experts_per_tok <= kept,
                          f"num_experts_per_tok ({self.num_experts_per_tok}) must be in [1, experts in the "
                          f"kept groups = topk_group*n_routed_experts/n_group = {kept}]")
        need(self.dtype in _DTYPES, f"unknown dtype {self.dtype!r}; expected one of {_DTYPES}")
        need(self.param_dtype in _DTYPES, f"unknown param_dtype {self.param_dtype!r}")
        need(self.attn_causal_blocks >= 1,
             f"attn_causal_blocks must be >= 1, got {self.attn_causal_blocks}")
        need(self.train_attention in TRAIN_ATTENTION, f"unknown train_attention "
             f"{self.train_attention!r}; expected one of {TRAIN_ATTENTION}")
        need(isinstance(self.attn_block_size, int) and self.attn_block_size >= 8
             and self.attn_block_size % 8 == 0,
             f"attn_block_size must be a positive multiple of 8, got {self.attn_block_size}")
        need(self.scan_unroll >= 1, f"scan_unroll must be >= 1, got {self.scan_unroll}")
        need(self.remat in _REMAT, f"unknown remat {self.remat!r}; expected one of {_REMAT}")
        need(self.moe_impl in _MOE_IMPLS, f"unknown moe_impl {self.moe_impl!r}; expected {_MOE_IMPLS}")
        need(self.gemm_impl in _GEMM_IMPLS, f"unknown gemm_impl {self.gemm_impl!r}; expected {_GEMM_IMPLS}")
        need(self.moe_tile_m is None or (self.moe_tile_m > 0 and self.moe_tile_m % 8 == 0),
                  f"moe_tile_m must be None or a positive multiple of 8, got {self.moe_tile_m}")
        need(self.moe_ep_capacity_factor >= 0, "moe_ep_capacity_factor must be >= 0")
        if self.fp8:   # the routed experts reach FP8 only through the grouped GEMM (sorted)
            need(self.moe_impl in ("auto", "sorted"),
                 f"fp8=True needs moe_impl 'auto' or 'sorted' (the grouped GEMM); "
                 f"{self.moe_impl!r} would run the routed experts in the compute dtype")
        need(self.rms_norm_eps > 0, "rms_norm_eps must be > 0")
        need(self.rope_theta > 0, "rope_theta must be > 0")
        if self.rope_scaling is not None:
            rs = self.rope_scaling
            need(rs["factor"] >= 1, f"rope_scaling.factor must be >= 1, got {rs['factor']}")
            need(rs["original_max_position_embeddings"] > 0,
                      "rope_scaling.original_max_position_embeddings must be > 0")
            need(rs["beta_fast"] > rs["beta_slow"] > 0, "rope_scaling needs beta_fast > beta_slow > 0")
        if errors:
            raise ConfigError("invalid ModelConfig:\n  - " + "\n  - ".join(errors))


def _normalise_rope_scaling(rs: dict[str, Any] | None) -> dict[str, Any] | None:
    """Accepts the release's `rope_scaling` and HF 5's `rope_parameters`; returns one form."""
    if rs is None:
        return None
    rs = dict(rs)
    kind = rs.pop("type", None) or rs.pop("rope_type", None) or "default"
    rs.pop("rope_theta", None)
    if kind == "default":
        return None
    if kind != "yarn":
        raise ConfigError(f"unsupported rope scaling type {kind!r}; only 'yarn' (or none) is supported")
    allowed = {"factor", "original_max_position_embeddings", "beta_fast", "beta_slow", "mscale",
                          "mscale_all_dim", "attention_factor", "truncate"}
    unknown = set(rs) - allowed
    if unknown:
        raise ConfigError(f"unknown rope_scaling keys {sorted(unknown)}; allowed {sorted(allowed)}")
    if "factor" not in rs or "original_max_position_embeddings" not in rs:
        raise ConfigError("yarn rope_scaling needs 'factor' and 'original_max_position_embeddings'")
    out = {"type": "yarn", "beta_fast": 32.0, "beta_slow": 1.0, "mscale": None,
                  "mscale_all_dim": None, "attention_factor": None, "truncate": True}
    out.update(rs)
    for k in ("factor", "beta_fast", "beta_slow"):
        out[k] = float(out[k])
    out["original_max_position_embeddings"] = int(out["original_max_position_embeddings"])
    return out


def yarn_get_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN's attention temperature sqrt(1/t) = 0.1 ln(s) + 1 (times mscale), 1 when s <= 1."""
    if scale <= 1:
        return 1.0
    return 0.1 * mscale * math.log(scale) + 1.0


def softmax_scale(cfg: ModelConfig) -> float:
    """1/sqrt(d_h + d_r), times mscale(factor, mscale_all_dim)^2 under YaRN (as the release)."""
    scale = cfg.qk_head_dim ** -0.5
    if cfg.yarn and cfg.rope_scaling["mscale_all_dim"]:
        m = yarn_get_mscale(cfg.rope_scaling["factor"], cfg.rope_scaling["mscale_all_dim"])
        scale *= m * m
    return scale


# ----------------------------------------------------------------------------------------------
# Presets
# ----------------------------------------------------------------------------------------------

def deepseek_v3_671b(**kw) -> ModelConfig:
    """The released DeepSeek-V3 (671B total, 37B active), config.json values."""
    base = dict(rope_scaling={"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096,
                                                        "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0})
    base.update(kw)
    return ModelConfig.from_dict(base)


def deepseek_v2_lite(**kw) -> ModelConfig:
    """DeepSeek-V2-Lite shapes (15.7B): no query LoRA, one routing group; V3 (sigmoid) routing."""
    base = dict(vocab_size=102400, hidden_size=2048, intermediate_size=10944,
                            moe_intermediate_size=1408, num_hidden_layers=27, num_nextn_predict_layers=0,
                            first_k_dense_replace=1, n_routed_experts=64, n_shared_experts=2,
                            num_experts_per_tok=6, n_group=1, topk_group=1, routed_scaling_factor=1.0,
                            norm_topk_prob=False, num_attention_heads=16, num_key_value_heads=16,
                            q_lora_rank=None, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64,
                            v_head_dim=128, max_position_embeddings=163840,
                            rope_scaling={"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096,
                                                        "beta_fast": 32, "beta_slow": 1, "mscale": 0.707,
                                                        "mscale_all_dim": 0.707})
    base.update(kw)
    return ModelConfig.from_dict(base)


def small(**kw) -> ModelConfig:
    """~100M-total-parameter MoE for single-GPU experiments (and slow CPU runs)."""
    base = dict(vocab_size=8192, hidden_size=512, intermediate_size=1536, moe_intermediate_size=256,
                            num_hidden_layers=8, num_nextn_predict_layers=1, first_k_dense_replace=1,
                            n_routed_experts=32, n_shared_experts=1, num_experts_per_tok=4, n_group=4,
                            topk_group=2, num_attention_heads=8, num_key_value_heads=8, q_lora_rank=192,
                            kv_lora_rank=128, qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64,
                            max_position_embeddings=4096, initializer_range=0.02)
    base.update(kw)
    return ModelConfig.from_dict(base)


def tiny(**kw) -> ModelConfig:
    """Trains on two CPU cores in minutes; every DeepSeek-V3 feature is on."""
    base = dict(vocab_size=8192, hidden_size=256, intermediate_size=768, moe_intermediate_size=128,
                            num_hidden_layers=4, num_nextn_predict_layers=1, first_k_dense_replace=1,
                            n_routed_experts=16, n_shared_experts=1, num_experts_per_tok=4, n_group=4,
                            topk_group=2, num_attention_heads=4, num_key_value_heads=4, q_lora_rank=96,
                            kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32,
                            max_position_embeddings=2048, initializer_range=0.02)
    base.update(kw)
    return ModelConfig.from_dict(base)


PRESETS = {"tiny": tiny, "small": small, "deepseek_v2_lite": deepseek_v2_lite,
                      "deepseek_v3_671b": deepseek_v3_671b}


def preset(name: str, **kw) -> ModelConfig:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name](**kw)
