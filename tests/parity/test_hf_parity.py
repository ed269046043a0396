"""Parity with Hugging Face transformers' DeepseekV3ForCausalLM (the oracle), end to end through
the checkpoint converter: tiny random HF models are saved to disk (transformers' save_pretrained,
or the official release's FP8 sharded layout), loaded with `dsv3_jax.convert.load_hf`, and our
full float32 logits, routed experts and MTP logits are compared with transformers'.

Tolerance: max |ours - ref| <= 1e-4 * max(1, max |ref|) (two correct f32 implementations differ
by a few 1e-6 here; see /work/shared/research/parity_notes.md). Weights keep activations O(1)
and the routers' correction bias is random, so a wrong scale, rope or bias handling fails.
"""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from dsv3_jax import convert, model  # noqa: E402
from dsv3_jax.layers.moe import route  # noqa: E402

from . import hf_models as H  # noqa: E402

REL_TOL = 1e-4
B, T = 2, 24

fwd = jax.jit(model.forward, static_argnums=0)

# name -> (HF config kwargs, save_pretrained kwargs)
CASES = {
    # q-LoRA, YaRN with mscale/mscale_all_dim, group-limited routing, two shared experts
    "qlora_yarn_mscale_groups": (dict(rope=H.YARN, n_group=4, topk_group=2, n_shared_experts=2),
                                 {}),
    # no q-LoRA (direct q_proj), plain RoPE with rotate-half layout, one routing group
    "direct_q_rope_halves_one_group": (dict(rope=None, q_lora_rank=None, n_group=1, topk_group=1,
                                            n_shared_experts=1, rope_interleave=False,
                                            rope_theta=500.0), {}),
    # YaRN without mscale (transformers scales cos/sin, not the softmax); 2 dense layers;
    # transformers writes sharded files with an index
    "yarn_no_mscale_sharded": (dict(rope=H.YARN_NO_MSCALE, n_group=2, topk_group=1,
                                    num_hidden_layers=4, first_k_dense_replace=2,
                                    n_shared_experts=2, num_experts_per_tok=3),
                               dict(max_shard_size="100KB")),
}


def tolerance(ref) -> float:
    return REL_TOL * max(1.0, float(np.abs(ref).max()))


def max_err(ours, ref) -> float:
    return float(np.abs(np.asarray(ours, np.float64) - np.asarray(ref, np.float64)).max())


def token_ids(vocab: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, (B, T), dtype=np.int64)


def our_forward(cfg, variables, ids):
    with jax.default_matmul_precision("highest"):
        return fwd(cfg, jax.tree.map(jnp.asarray, variables), jnp.asarray(ids, jnp.int32))


def our_experts(cfg, w_DE, bias_E, x_ND) -> np.ndarray:
    """Our router (dsv3_jax.layers.moe.route) on transformers' captured router input."""
    logits = jnp.dot(jnp.asarray(x_ND), jnp.asarray(w_DE), precision=jax.lax.Precision.HIGHEST)
    return np.asarray(route(jax.nn.sigmoid(logits), jnp.asarray(bias_E), cfg).experts_NP)


def router_params(cfg, variables, record_key: str):
    """(router kernel [D, E], bias [E]) of the layer a capture_routing key names."""
    module, name = record_key.split(":")
    parts = name.split(".")
    p, rb = variables["params"], variables["router_bias"]
    if module == "0":                               # main model: model.layers.{i}.mlp.gate
        j = int(parts[2]) - cfg.num_dense_layers
        return (p["moe_layers"]["block"]["moe"]["router"][j],
                rb["moe_layers"]["block"]["moe"]["bias"][j])
    k = int(parts[1])                               # MtpModel: layers.{k}.mtp_block.mlp.gate
    return p[f"mtp_{k}"]["block"]["moe"]["router"], rb[f"mtp_{k}"]["block"]["moe"]["bias"]


def check_routing(cfg, variables, records) -> dict:
    """Every MoE layer's chosen experts equal transformers' (as sets per token). Also checks the
    test can see a router that ignores the bias: zeroing it must change many tokens' experts."""
    assert records, "no router was captured"
    changed = total = 0
    for key, (x, hf_idx) in records.items():
        w, bias = router_params(cfg, variables, key)
        ours = our_experts(cfg, w, bias, x)
        np.testing.assert_array_equal(np.sort(ours, -1), np.sort(hf_idx, -1), err_msg=key)
        unbiased = our_experts(cfg, w, np.zeros_like(bias), x)
        changed += int((np.sort(unbiased, -1) != np.sort(hf_idx, -1)).any(-1).sum())
        total += len(x)
    assert changed / total > 0.2, f"bias changes only {changed}/{total} tokens: test too weak"
    return {"layers": len(records), "tokens": total, "bias_sensitive": changed / total}


_cache: dict = {}


def hf_case(name, tmp_path_factory):
    """HF model -> save_pretrained -> load_hf; HF logits and router captures (cached per case)."""
    if name not in _cache:
        cfg_kw, save_kw = CASES[name]
        hf = H.build(seed=len(_cache), **cfg_kw)
        ids = token_ids(hf.config.vocab_size, seed=len(_cache))
        with H.capture_routing(hf) as records:
            ref = H.logits(hf, ids)
        path = str(tmp_path_factory.mktemp(name))
        hf.save_pretrained(path, **save_kw)
        cfg, variables = convert.load_hf(path)
        _cache[name] = dict(hf=hf, ids=ids, ref=ref, records=dict(records), cfg=cfg,
                            variables=variables, path=path)
    return _cache[name]


@pytest.mark.parametrize("name", list(CASES))
def test_logits_and_routing_match_transformers(name, tmp_path_factory):
    c = hf_case(name, tmp_path_factory)
    cfg_kw, save_kw = CASES[name]
    cfg = c["cfg"]
    assert cfg.num_nextn_predict_layers == 0       # save_pretrained drops MTP weights
    assert cfg.rope_interleave == cfg_kw.get("rope_interleave", True)
    assert (cfg.q_lora_rank is None) == (cfg_kw.get("q_lora_rank", 1) is None)
    out = our_forward(cfg, c["variables"], c["ids"])
    err, tol = max_err(out.logits, c["ref"]), tolerance(c["ref"])
    stats = check_routing(cfg, c["variables"], c["records"])
    print(f"[parity {name}] max|dlogits|={err:.3g} (tol {tol:.3g}, max|ref|="
          f"{np.abs(c['ref']).max():.3g}) routing {stats}")
    assert err <= tol


def test_what_transformers_writes(tmp_path_factory):
    """transformers 5 save_pretrained: experts one per key (fused only in memory), no MTP
    tensors, `head_dim` = qk_rope_head_dim in config.json; sharded with an index on request."""
    c = hf_case("yarn_no_mscale_sharded", tmp_path_factory)
    path = c["path"]
    with open(os.path.join(path, "model.safetensors.index.json")) as f:
        keys = set(json.load(f)["weight_map"])
    assert len([f for f in os.listdir(path) if f.endswith(".safetensors")]) > 1
    assert "model.layers.2.mlp.experts.0.gate_proj.weight" in keys
    assert not any("gate_up_proj" in k for k in keys)
    assert not any(k.startswith("model.layers.4.") for k in keys)
    with open(os.path.join(path, "config.json")) as f:
        d = json.load(f)
    assert d["head_dim"] == d["qk_rope_head_dim"] != c["cfg"].qk_head_dim
    assert "rope_parameters" in d and "rope_scaling" not in d


# ----------------------------------------------------------------------------------------------
# MTP (HF layout, float32) and round trip through save_hf -> transformers' from_pretrained
# ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def mtp_case(tmp_path_factory):
    """Main model + transformers' MtpModel, written with the MTP module as
    model.layers.{num_hidden_layers}.* (two shards + index, float32), loaded with load_hf."""
    hf = H.build(seed=11, rope=H.YARN, n_group=4, topk_group=2, n_shared_experts=2)
    mtp = H.build_mtp(hf, seed=12)
    # transformers builds the MTP block from get_mtp_config(): first_k_dense_replace = 0, so it
    # is an MoE layer like ours (and the release's layer 61).
    assert type(mtp.layers[0].mtp_block.mlp).__name__ == "DeepseekV3MoE"
    ids = token_ids(hf.config.vocab_size, seed=5)
    with H.capture_routing(hf, mtp) as records:
        ref = H.logits(hf, ids)
        ref_mtp = H.mtp_logits(hf, mtp, ids)
    path = str(tmp_path_factory.mktemp("mtp"))
    hf.config.save_pretrained(path)
    sd = H.release_state_dict(hf, mtp)
    H.write_safetensors_dir({k: torch.from_numpy(v) for k, v in sd.items()}, path, None,
                            num_shards=2)
    cfg, variables = convert.load_hf(path, mtp="require")
    return dict(hf=hf, mtp=mtp, ids=ids, ref=ref, ref_mtp=ref_mtp, records=dict(records),
                cfg=cfg, variables=variables, path=path)


def test_mtp_logits_match_transformers_mtp_layer(mtp_case):
    c = mtp_case
    cfg = c["cfg"]
    assert cfg.num_nextn_predict_layers == 1
    out = our_forward(cfg, c["variables"], c["ids"])
    err, tol = max_err(out.logits, c["ref"]), tolerance(c["ref"])
    ref_mtp = c["ref_mtp"][:, :T - 1]                      # positions with a next token
    err_mtp, tol_mtp = max_err(out.mtp_logits[0][:, :T - 1], ref_mtp), tolerance(ref_mtp)
    stats = check_routing(cfg, c["variables"], c["records"])
    assert any(k.startswith("1:") for k in c["records"])   # the MTP block's router was compared
    print(f"[parity mtp] main max|d|={err:.3g} (tol {tol:.3g}); mtp max|d|={err_mtp:.3g} "
          f"(tol {tol_mtp:.3g}); routing {stats}")
    assert err <= tol
    assert err_mtp <= tol_mtp


def test_save_hf_round_trip_through_transformers(mtp_case, tmp_path):
    """save_hf (sharded) -> transformers from_pretrained gives our logits; load_hf gives back
    the same arrays bit for bit (MTP included)."""
    from transformers import DeepseekV3ForCausalLM
    c = mtp_case
    cfg, variables = c["cfg"], c["variables"]
    out_dir = str(tmp_path / "hf")
    convert.save_hf(cfg, variables, out_dir, max_shard_bytes=300_000)
    assert os.path.exists(os.path.join(out_dir, "model.safetensors.index.json"))
    reloaded = DeepseekV3ForCausalLM.from_pretrained(out_dir, attn_implementation="eager").eval()
    ref = H.logits(reloaded, c["ids"])
    ours = our_forward(cfg, variables, c["ids"]).logits
    err, tol = max_err(ours, ref), tolerance(ref)
    print(f"[parity round-trip] max|d|={err:.3g} (tol {tol:.3g})")
    assert err <= tol
    np.testing.assert_array_equal(ref, c["ref"])           # exactly the original HF weights
    cfg2, v2 = convert.load_hf(out_dir, mtp="require")
    assert cfg2 == cfg
    jax.tree.map(np.testing.assert_array_equal, v2, jax.tree.map(np.asarray, variables))


# ----------------------------------------------------------------------------------------------
# The official release layout: FP8 128x128 blocks (partial edge blocks), BF16 rest, sharded,
# release-style config.json; reference = transformers with the DEQUANTIZED weights
# ----------------------------------------------------------------------------------------------

FP8_RELEASE = dict(hidden_size=160, intermediate_size=200, moe_intermediate_size=136,
                   q_lora_rank=144, kv_lora_rank=136, qk_rope_head_dim=8, num_attention_heads=2,
                   num_key_value_heads=2, qk_nope_head_dim=16, v_head_dim=16, num_hidden_layers=2,
                   first_k_dense_replace=1, n_routed_experts=8, n_group=4, topk_group=2,
                   n_shared_experts=1, num_experts_per_tok=2)
FP8_ROPE = {"type": "yarn", "factor": 4, "original_max_position_embeddings": 64, "beta_fast": 32,
            "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0}


def test_official_fp8_release_layout(tmp_path):
    rope_hf = {"rope_type": "yarn", **{k: v for k, v in FP8_ROPE.items() if k != "type"}}
    hf = H.build(seed=21, rope=rope_hf, **FP8_RELEASE)
    mtp = H.build_mtp(hf, seed=22)
    disk, eff = H.to_release_format(H.release_state_dict(hf, mtp), block=128)
    # kv_a_proj_with_mqa is [144, 160]: partial blocks in both directions
    kv_a_scale = disk["model.layers.0.self_attn.kv_a_proj_with_mqa.weight_scale_inv"]
    assert tuple(kv_a_scale.shape) == (2, 2)
    assert disk["model.layers.1.mlp.experts.0.gate_proj.weight"].dtype == torch.float8_e4m3fn
    H.load_release_state_dict(hf, mtp, eff)            # the oracle runs the dequantized weights
    ids = token_ids(hf.config.vocab_size, seed=9)
    with H.capture_routing(hf, mtp) as records:
        ref = H.logits(hf, ids)
        ref_mtp = H.mtp_logits(hf, mtp, ids)[:, :T - 1]
    path = str(tmp_path / "release")
    H.write_safetensors_dir(disk, path, H.release_config(hf.config, FP8_ROPE, 10000.0),
                            num_shards=3)

    cfg, variables = convert.load_hf(path, mtp="require")
    assert cfg.yarn and cfg.rope_scaling["mscale_all_dim"] == 1.0 and cfg.aux_loss_alpha == 0.001
    # the dequantized weights arrive exactly (f32(W8) * S is exact in float32)
    np.testing.assert_array_equal(
        variables["params"]["dense_layers"]["block"]["attn"]["kv_a"]["kernel"][0],
        eff["model.layers.0.self_attn.kv_a_proj_with_mqa.weight"].T)
    out = our_forward(cfg, variables, ids)
    err, tol = max_err(out.logits, ref), tolerance(ref)
    err_mtp, tol_mtp = max_err(out.mtp_logits[0][:, :T - 1], ref_mtp), tolerance(ref_mtp)
    stats = check_routing(cfg, variables, dict(records))
    print(f"[parity fp8-release] main max|d|={err:.3g} (tol {tol:.3g}); mtp max|d|={err_mtp:.3g}"
          f" (tol {tol_mtp:.3g}); routing {stats}")
    assert err <= tol
    assert err_mtp <= tol_mtp
