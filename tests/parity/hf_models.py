"""Tiny random Hugging Face DeepseekV3 models (transformers is the parity oracle) and writers of
their checkpoints in the transformers and the official-release (FP8, sharded) layouts.

Written independently of dsv3_jax.convert: key names, expert unfusing, FP8 block quantization
and the safetensors files (the official `safetensors.torch` writer) all come from here, so a
conversion bug cannot cancel itself out.

Weights are drawn so activations stay O(1) (std 1/sqrt(fan_in), norms 1 +- 0.1, unit-std
embedding) and the routers' correction bias is random and non-zero: with transformers' default
init (std 0.02) a wrong scale or a router that ignores the bias barely moves the logits.
"""
from __future__ import annotations

import contextlib
import json
import math
import os

import numpy as np
import torch

from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

BASE = dict(vocab_size=128, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
            num_hidden_layers=3, first_k_dense_replace=1, n_routed_experts=8, n_shared_experts=2,
            num_experts_per_tok=2, n_group=4, topk_group=2, num_attention_heads=4,
            num_key_value_heads=4, q_lora_rank=48, kv_lora_rank=32, qk_nope_head_dim=16,
            qk_rope_head_dim=8, v_head_dim=16, max_position_embeddings=256,
            routed_scaling_factor=2.5, norm_topk_prob=True, rms_norm_eps=1e-6,
            num_nextn_predict_layers=1)

YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64,
        "beta_fast": 32, "beta_slow": 1, "mscale": 0.8, "mscale_all_dim": 0.9}
YARN_NO_MSCALE = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64,
                  "beta_fast": 32, "beta_slow": 1}


def hf_config(rope=None, rope_theta=10000.0, **overrides) -> DeepseekV3Config:
    kw = dict(BASE)
    kw.update(overrides)
    rp = {"rope_type": "default"} if rope is None else dict(rope)
    rp["rope_theta"] = rope_theta
    return DeepseekV3Config(rope_parameters=rp, attn_implementation="eager", **kw)


def randomize_(module: torch.nn.Module, seed: int, only_prefix: str = "",
               bias_std: float = 0.1) -> None:
    """O(1)-activation weights in place: linears std 1/sqrt(fan_in), norms 1 +- 0.1, embedding
    std 1, the correction bias N(0, bias_std)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if not name.startswith(only_prefix):
                continue
            if p.ndim == 1:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            elif name.endswith("embed_tokens.weight"):
                p.copy_(torch.randn(p.shape, generator=g))
            else:   # [out, in] linears; fused experts [E, 2F, D] / [E, D, F]: fan_in is last
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[-1]))
        for name, b in module.named_buffers():
            if name.startswith(only_prefix) and name.endswith("e_score_correction_bias"):
                b.copy_(bias_std * torch.randn(b.shape, generator=g))


def build(seed: int = 0, **config_kw) -> DeepseekV3ForCausalLM:
    cfg = hf_config(**config_kw)
    torch.manual_seed(seed)
    model = DeepseekV3ForCausalLM(cfg).eval()
    randomize_(model, seed)
    return model


def build_mtp(main: DeepseekV3ForCausalLM, seed: int = 1, num: int = 1):
    """transformers' MtpModel (modeling_layers) for `main`: its MTP block is an MoE decoder layer
    (get_mtp_config sets first_k_dense_replace = 0), embedding and head tied to `main`."""
    from transformers.modeling_layers import MtpModel
    mtp = MtpModel(main, num).eval()
    mtp.config._attn_implementation = "eager"
    randomize_(mtp, seed, only_prefix="layers.")
    return mtp


@torch.no_grad()
def logits(model, ids: np.ndarray) -> np.ndarray:
    return model(torch.as_tensor(ids)).logits.float().numpy()


@torch.no_grad()
def mtp_logits(main, mtp, ids: np.ndarray) -> np.ndarray:
    """Depth-1 MTP logits at every position i (meaningful for i + 1 < T): the shared head of
    MtpLayer(emb(t_{i+1}), main last_hidden_state_i) -- the main model's state after its final
    norm, as transformers' generate(use_mtp=True) feeds it."""
    t = torch.as_tensor(ids)
    b, n = t.shape
    hidden = main.model(t).last_hidden_state
    nxt = torch.cat([t[:, 1:], torch.zeros((b, 1), dtype=t.dtype)], dim=1)
    pos = torch.arange(n)[None].expand(b, n)
    h = mtp.forward_layer(0, hidden, pos, None, input_ids=nxt)
    return mtp._project_to_logits(h).float().numpy()


@contextlib.contextmanager
def capture_routing(*modules):
    """Records (router input [N, D], chosen experts [N, k]) of every DeepseekV3TopkRouter under
    `modules`, keyed by "<module index>:<router module name>"."""
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter
    records, handles = {}, []
    for mi, m in enumerate(modules):
        for name, sub in m.named_modules():
            if isinstance(sub, DeepseekV3TopkRouter):
                def hook(mod, args, out, key=f"{mi}:{name}"):
                    x = args[0].detach().reshape(-1, mod.hidden_dim).float().numpy()
                    records[key] = (x, out[2].detach().numpy())
                handles.append(sub.register_forward_hook(hook))
    try:
        yield records
    finally:
        for h in handles:
            h.remove()


# ----------------------------------------------------------------------------------------------
# state dicts in the on-disk (release) naming
# ----------------------------------------------------------------------------------------------

def _unfuse(prefix: str, sd: dict, out: dict) -> None:
    """transformers' in-memory fused experts -> one key per expert (gate rows first)."""
    gu = sd.pop(prefix + "mlp.experts.gate_up_proj")
    down = sd.pop(prefix + "mlp.experts.down_proj")
    f = gu.shape[1] // 2
    for e in range(gu.shape[0]):
        out[f"{prefix}mlp.experts.{e}.gate_proj.weight"] = gu[e, :f]
        out[f"{prefix}mlp.experts.{e}.up_proj.weight"] = gu[e, f:]
        out[f"{prefix}mlp.experts.{e}.down_proj.weight"] = down[e]


def release_state_dict(main, mtp=None) -> dict[str, np.ndarray]:
    """float32 tensors under the checkpoint key names; MTP module k as
    model.layers.{num_hidden_layers + k}.* with its copies of embedding and head."""
    sd = {k: v.detach().float().numpy().copy() for k, v in main.state_dict().items()}
    out = {}
    for i in range(main.config.num_hidden_layers):
        p = f"model.layers.{i}."
        if p + "mlp.experts.gate_up_proj" in sd:
            _unfuse(p, sd, out)
    out.update(sd)
    if mtp is not None:
        n = main.config.num_hidden_layers
        msd = {k: v.detach().float().numpy().copy() for k, v in mtp.state_dict().items()}
        for k in range(len(mtp.layers)):
            src, dst = f"layers.{k}.", f"model.layers.{n + k}."
            layer = {key[len(src):]: v for key, v in msd.items() if key.startswith(src)}
            block = {key[len("mtp_block."):]: v for key, v in layer.items()
                     if key.startswith("mtp_block.")}
            tmp = {}
            _unfuse("", block, tmp)
            block.update(tmp)
            out.update({dst + key: v for key, v in block.items()})
            out[dst + "enorm.weight"] = layer["enorm.weight"]
            out[dst + "hnorm.weight"] = layer["hnorm.weight"]
            out[dst + "eh_proj.weight"] = layer["eh_proj.weight"]
            out[dst + "shared_head.norm.weight"] = layer["post_norm.weight"]
            out[dst + "embed_tokens.weight"] = out["model.embed_tokens.weight"].copy()
            out[dst + "shared_head.head.weight"] = out["lm_head.weight"].copy()
    return out


def load_release_state_dict(main, mtp, sd: dict[str, np.ndarray]) -> None:
    """The inverse of release_state_dict: copies (e.g. dequantized) tensors into the modules."""
    n = main.config.num_hidden_layers
    with torch.no_grad():
        params = dict(main.named_parameters())
        params.update(dict(main.named_buffers()))
        mparams = {}
        if mtp is not None:
            mparams = dict(mtp.named_parameters())
            mparams.update(dict(mtp.named_buffers()))

        def put(dst: dict, name: str, value):
            dst[name].copy_(torch.as_tensor(np.ascontiguousarray(value), dtype=torch.float32))

        def fuse(idx: int, dst: dict, dst_prefix: str):
            e_n = main.config.n_routed_experts
            gate = [sd[f"model.layers.{idx}.mlp.experts.{e}.gate_proj.weight"] for e in range(e_n)]
            up = [sd[f"model.layers.{idx}.mlp.experts.{e}.up_proj.weight"] for e in range(e_n)]
            down = [sd[f"model.layers.{idx}.mlp.experts.{e}.down_proj.weight"] for e in range(e_n)]
            put(dst, dst_prefix + "mlp.experts.gate_up_proj",
                np.stack([np.concatenate([g, u]) for g, u in zip(gate, up)]))
            put(dst, dst_prefix + "mlp.experts.down_proj", np.stack(down))

        for key, v in sd.items():
            parts = key.split(".")
            if key.startswith("model.layers.") and int(parts[2]) >= n:
                if mtp is None:
                    continue
                k = int(parts[2]) - n
                rest = ".".join(parts[3:])
                if rest in ("embed_tokens.weight", "shared_head.head.weight") or \
                        ".experts." in rest:
                    continue
                if rest in ("enorm.weight", "hnorm.weight", "eh_proj.weight"):
                    put(mparams, f"layers.{k}.{rest}", v)
                elif rest == "shared_head.norm.weight":
                    put(mparams, f"layers.{k}.post_norm.weight", v)
                else:
                    put(mparams, f"layers.{k}.mtp_block.{rest}", v)
            elif ".experts." in key:
                continue
            else:
                put(params, key, v)
        for i in range(main.config.first_k_dense_replace, n):
            fuse(i, params, f"model.layers.{i}.")
        if mtp is not None:
            for k in range(len(mtp.layers)):
                fuse(n + k, mparams, f"layers.{k}.mtp_block.")


# ----------------------------------------------------------------------------------------------
# FP8 release format and writers
# ----------------------------------------------------------------------------------------------

def is_release_fp8(key: str, shape) -> bool:
    """Decoder linear weights are FP8 in the release; embedding, head, norms, router, eh_proj
    (and the MTP copies) are BF16."""
    module = key.split(".")[-2]
    return (len(shape) == 2 and ".layers." in key and key.endswith(".weight")
            and module in _FP8_MODULES)


_FP8_MODULES = {"q_proj", "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj",
                "gate_proj", "up_proj", "down_proj"}


def quantize_block_fp8(w: torch.Tensor, block: int = 128):
    """(W8 float8_e4m3fn, S float32 [ceil(r/B), ceil(c/B)], W_eff = W8 * S) per 128x128 block,
    S = amax/448; edge blocks are partial (amax over the real entries only)."""
    r, c = w.shape
    gr, gc = -(-r // block), -(-c // block)
    s = torch.empty(gr, gc)
    w8 = torch.empty(r, c, dtype=torch.float8_e4m3fn)
    eff = torch.empty(r, c)
    for i in range(gr):
        for j in range(gc):
            blk = w[i * block:(i + 1) * block, j * block:(j + 1) * block].float()
            s[i, j] = blk.abs().max().clamp(min=1e-4) / 448.0
            q = (blk / s[i, j]).to(torch.float8_e4m3fn)
            w8[i * block:(i + 1) * block, j * block:(j + 1) * block] = q
            eff[i * block:(i + 1) * block, j * block:(j + 1) * block] = q.float() * s[i, j]
    return w8, s, eff


def to_release_format(sd: dict[str, np.ndarray], block: int = 128):
    """(tensors to write (torch), effective float32 values the reader must reproduce)."""
    disk, eff = {}, {}
    for k, v in sd.items():
        t = torch.from_numpy(np.ascontiguousarray(v))
        if k.endswith("e_score_correction_bias"):
            disk[k], eff[k] = t.float(), v
        elif is_release_fp8(k, v.shape):
            w8, s, e = quantize_block_fp8(t, block)
            disk[k], disk[k + "_scale_inv"], eff[k] = w8, s, e.numpy()
        else:
            b = t.to(torch.bfloat16)
            disk[k], eff[k] = b, b.float().numpy()
    return disk, eff


def write_safetensors_dir(tensors: dict[str, torch.Tensor], path: str, config: dict | None,
                          num_shards: int = 1) -> None:
    """config.json + model.safetensors, or num_shards files + model.safetensors.index.json,
    through the official safetensors writer."""
    from safetensors.torch import save_file
    os.makedirs(path, exist_ok=True)
    keys = sorted(tensors)
    if config is not None:
        with open(os.path.join(path, "config.json"), "w") as f:
            json.dump(config, f, indent=2)
    if num_shards == 1:
        save_file({k: tensors[k].contiguous() for k in keys},
                  os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
        return
    weight_map = {}
    for i in range(num_shards):
        part = keys[i::num_shards]
        name = f"model-{i + 1:05d}-of-{num_shards:05d}.safetensors"
        save_file({k: tensors[k].contiguous() for k in part}, os.path.join(path, name),
                  metadata={"format": "pt"})
        weight_map.update({k: name for k in part})
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": 0}, "weight_map": weight_map}, f, indent=2)


def release_config(hf_cfg: DeepseekV3Config, rope_scaling: dict | None, rope_theta: float,
                   block: int = 128) -> dict:
    """config.json in the style of the official release (rope_scaling with `type`, top-level
    rope_theta, quantization_config, the release's extra fields, no head_dim)."""
    c = hf_cfg
    d = dict(architectures=["DeepseekV3ForCausalLM"], model_type="deepseek_v3",
             vocab_size=c.vocab_size, hidden_size=c.hidden_size,
             intermediate_size=c.intermediate_size, moe_intermediate_size=c.moe_intermediate_size,
             num_hidden_layers=c.num_hidden_layers, num_nextn_predict_layers=c.num_mtp_layers,
             first_k_dense_replace=c.first_k_dense_replace, moe_layer_freq=1,
             n_routed_experts=c.n_routed_experts, n_shared_experts=c.n_shared_experts,
             num_experts_per_tok=c.num_experts_per_tok, n_group=c.n_group,
             topk_group=c.topk_group, topk_method="noaux_tc", scoring_func="sigmoid",
             norm_topk_prob=c.norm_topk_prob, routed_scaling_factor=c.routed_scaling_factor,
             aux_loss_alpha=0.001, seq_aux=True, num_attention_heads=c.num_attention_heads,
             num_key_value_heads=c.num_key_value_heads, q_lora_rank=c.q_lora_rank,
             kv_lora_rank=c.kv_lora_rank, qk_nope_head_dim=c.qk_nope_head_dim,
             qk_rope_head_dim=c.qk_rope_head_dim, v_head_dim=c.v_head_dim,
             rope_theta=rope_theta, rope_scaling=rope_scaling,
             max_position_embeddings=c.max_position_embeddings, rms_norm_eps=c.rms_norm_eps,
             hidden_act="silu", attention_bias=False, attention_dropout=0.0,
             tie_word_embeddings=False, bos_token_id=0, eos_token_id=1, ep_size=1,
             pretraining_tp=1, initializer_range=0.02, torch_dtype="bfloat16", use_cache=True,
             transformers_version="4.46.3",
             quantization_config={"activation_scheme": "dynamic", "fmt": "e4m3",
                                  "quant_method": "fp8", "weight_block_size": [block, block]})
    return d
