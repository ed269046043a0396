"""dsv3_jax.convert (HF / official-release safetensors <-> variables <-> orbax) and
dsv3_jax.params (parameter counts). Parity of the converted models with transformers lives in
tests/parity/test_hf_parity.py; these tests need neither torch nor transformers."""
import json
import os
import subprocess
import sys
import tracemalloc

import jax
import ml_dtypes
import numpy as np
import pytest

from dsv3_jax import ckpt, config, convert, model
from dsv3_jax.config import ConfigError
from dsv3_jax.params import count_params

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def small_cfg(**kw):
    base = dict(vocab_size=96, hidden_size=32, intermediate_size=48, moe_intermediate_size=16,
                num_hidden_layers=3, first_k_dense_replace=1, n_routed_experts=8, n_group=2,
                topk_group=1, num_experts_per_tok=2, num_attention_heads=2, num_key_value_heads=2,
                q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4,
                v_head_dim=8, num_nextn_predict_layers=1,
                rope_scaling={"type": "yarn", "factor": 4.0,
                              "original_max_position_embeddings": 64})
    base.update(kw)
    return config.tiny(**base)


def random_variables(cfg, seed=0):
    """Random values in the model's variable layout, without compiling init."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda a: rng.standard_normal(a.shape).astype(a.dtype),
                        dict(model.abstract_variables(cfg)))


def assert_trees_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    jax.tree.map(np.testing.assert_array_equal, a, b)


def read_all(path):
    """{key: array} of a checkpoint directory (through our reader)."""
    files = convert.SafetensorsDir(path)
    out = {k: np.array(files.get(k)) for k in files.keys()}
    files.close()
    return out


def write_dir(path, tensors, cfg_json, shards=1):
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg_json, f)
    keys = sorted(tensors)
    groups = [keys[i::shards] for i in range(shards)]
    weight_map = {}
    for i, g in enumerate(groups):
        name = "model.safetensors" if shards == 1 else f"part-{i}.safetensors"
        convert.write_safetensors(os.path.join(path, name), [
            (k, tensors[k].shape, tensors[k].dtype, lambda k=k: tensors[k]) for k in g])
        weight_map.update({k: name for k in g})
    if shards > 1:
        with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {}, "weight_map": weight_map}, f)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A small model with MTP, written by save_hf (single file)."""
    cfg = small_cfg()
    v = random_variables(cfg)
    path = str(tmp_path_factory.mktemp("hf"))
    convert.save_hf(cfg, v, path)
    return cfg, v, path


# ----------------------------------------------------------------------------------------------
# round trips, layouts
# ----------------------------------------------------------------------------------------------

def test_save_load_round_trip_is_exact(saved):
    cfg, v, path = saved
    cfg2, v2 = convert.load_hf(path, mtp="require")
    assert cfg2 == cfg
    assert_trees_equal(v2, v)


def test_save_hf_writes_the_release_key_layout(saved):
    cfg, _, path = saved
    with open(os.path.join(path, "model.safetensors"), "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    assert header["__metadata__"] == {"format": "pt"}
    assert header["model.layers.1.self_attn.q_b_proj.weight"]["shape"] == [2 * 12, 16]  # [out, in]
    assert header["model.layers.1.mlp.experts.7.down_proj.weight"]["shape"] == [32, 16]
    assert header["model.layers.2.mlp.gate.e_score_correction_bias"]["dtype"] == "F32"
    mtp = f"model.layers.{cfg.num_hidden_layers}."
    for k in ("enorm.weight", "hnorm.weight", "eh_proj.weight", "shared_head.norm.weight",
              "embed_tokens.weight", "shared_head.head.weight", "self_attn.kv_b_proj.weight",
              "mlp.experts.0.gate_proj.weight", "mlp.shared_experts.up_proj.weight"):
        assert mtp + k in header, k
    assert header[mtp + "eh_proj.weight"]["shape"] == [32, 64]
    with open(os.path.join(path, "config.json")) as f:
        d = json.load(f)
    assert d["rope_parameters"]["rope_type"] == "yarn" and "rope_scaling" not in d


def test_sharded_index_equals_single_file(saved, tmp_path):
    cfg, v, _ = saved
    sharded = str(tmp_path / "sharded")
    convert.save_hf(cfg, v, sharded, max_shard_bytes=4096)
    names = os.listdir(sharded)
    assert "model.safetensors.index.json" in names and "model.safetensors" not in names
    assert len([n for n in names if n.endswith(".safetensors")]) > 3
    with open(os.path.join(sharded, "model.safetensors.index.json")) as f:
        index = json.load(f)
    assert set(index["weight_map"].values()) == {n for n in names if n.endswith(".safetensors")}
    cfg2, v2 = convert.load_hf(sharded)
    assert cfg2 == cfg
    assert_trees_equal(v2, v)


def test_sharded_index_naming_a_missing_shard_is_a_clear_error(saved, tmp_path):
    cfg, v, _ = saved
    d = str(tmp_path / "broken")
    convert.save_hf(cfg, v, d, max_shard_bytes=20000)
    victim = sorted(n for n in os.listdir(d) if n.endswith(".safetensors"))[1]
    os.remove(os.path.join(d, victim))
    with pytest.raises(convert.CheckpointError, match=victim):
        convert.load_hf(d)


def test_files_are_readable_by_the_safetensors_library(saved):
    from safetensors import safe_open
    _, _, path = saved
    ours = read_all(path)
    with safe_open(os.path.join(path, "model.safetensors"), "numpy") as f:
        assert set(f.keys()) == set(ours)
        for k in f.keys():
            np.testing.assert_array_equal(f.get_tensor(k), ours[k])


def test_fused_expert_tensors_load_like_per_expert_ones(saved, tmp_path):
    """transformers' in-memory names: mlp.experts.gate_up_proj [E, 2F, D] (gate rows first) and
    mlp.experts.down_proj [E, D, F]."""
    cfg, v, path = saved
    t = read_all(path)
    for i in range(cfg.num_dense_layers, cfg.num_hidden_layers + 1):
        p = f"model.layers.{i}.mlp.experts."
        e_n = cfg.n_routed_experts
        gate = [t.pop(f"{p}{e}.gate_proj.weight") for e in range(e_n)]
        up = [t.pop(f"{p}{e}.up_proj.weight") for e in range(e_n)]
        down = [t.pop(f"{p}{e}.down_proj.weight") for e in range(e_n)]
        t[p + "gate_up_proj"] = np.stack([np.concatenate([g, u]) for g, u in zip(gate, up)])
        t[p + "down_proj"] = np.stack(down)
    d = str(tmp_path / "fused")
    with open(os.path.join(path, "config.json")) as f:
        write_dir(d, t, json.load(f))
    cfg2, v2 = convert.load_hf(d, mtp="require")
    assert_trees_equal(v2, v)


def test_bfloat16_weights_and_mtp_modes(saved, tmp_path):
    cfg, v, path = saved
    t = read_all(path)
    t = {k: (a.astype(ml_dtypes.bfloat16) if "norm" in k else a) for k, a in t.items()}
    with open(os.path.join(path, "config.json")) as f:
        cj = json.load(f)
    d = str(tmp_path / "bf16")
    write_dir(d, t, cj)
    _, v2 = convert.load_hf(d)
    np.testing.assert_array_equal(v2["params"]["final_norm"]["scale"],
                                  v["params"]["final_norm"]["scale"].astype(ml_dtypes.bfloat16)
                                  .astype(np.float32))
    # MTP tensors present but unwanted
    cfg_skip, v_skip = convert.load_hf(d, mtp="skip")
    assert cfg_skip.num_nextn_predict_layers == 0 and "mtp_0" not in v_skip["params"]
    # no MTP tensors at all (what transformers' save_pretrained writes)
    mtp_prefix = f"model.layers.{cfg.num_hidden_layers}."
    no_mtp = {k: a for k, a in t.items() if not k.startswith(mtp_prefix)}
    d2 = str(tmp_path / "nomtp")
    write_dir(d2, no_mtp, cj)
    cfg_auto, v_auto = convert.load_hf(d2)
    assert cfg_auto.num_nextn_predict_layers == 0 and "mtp_0" not in v_auto["params"]
    assert "mtp_0" not in v_auto["router_bias"]
    with pytest.raises(convert.CheckpointError, match="missing") as e:
        convert.load_hf(d2, mtp="require")
    assert any("model.layers.3.eh_proj.weight" in m for m in e.value.missing)


# ----------------------------------------------------------------------------------------------
# errors
# ----------------------------------------------------------------------------------------------

def test_missing_unexpected_and_misshaped_keys_in_one_error(saved, tmp_path):
    cfg, _, path = saved
    t = read_all(path)
    del t["model.layers.1.self_attn.kv_b_proj.weight"]
    del t["model.layers.2.mlp.experts.5.up_proj.weight"]
    t["model.layers.0.self_attn.bogus.weight"] = np.zeros((3, 3), np.float32)
    t["model.layers.9.mlp.gate.weight"] = np.zeros((8, 32), np.float32)          # no such layer
    t["model.norm.weight"] = np.zeros((31,), np.float32)
    t["model.layers.2.mlp.gate.weight"] = np.zeros((32, 8), np.float32)          # transposed
    d = str(tmp_path / "bad")
    with open(os.path.join(path, "config.json")) as f:
        write_dir(d, t, json.load(f), shards=2)
    with pytest.raises(convert.CheckpointError) as e:
        convert.load_hf(d)
    msg = str(e.value)
    print(msg)
    assert "2 missing, 2 unexpected, 2 misshaped" in msg
    for needle in ("model.layers.1.self_attn.kv_b_proj.weight",
                   "model.layers.2.mlp.experts.5.up_proj.weight",
                   "model.layers.0.self_attn.bogus.weight", "model.layers.9.mlp.gate.weight",
                   "model.norm.weight: checkpoint (31,) vs expected (32,)",
                   "model.layers.2.mlp.gate.weight: checkpoint (32, 8) vs expected (8, 32)"):
        assert needle in msg
    assert len(e.value.missing) == 2 and len(e.value.unexpected) == 2
    assert len(e.value.misshaped) == 2


def test_fp8_weight_without_scale_and_scale_with_wrong_grid(tmp_path):
    cfg = small_cfg(num_nextn_predict_layers=0, hidden_size=160)
    v = random_variables(cfg)
    src = str(tmp_path / "src")
    convert.save_hf(cfg, v, src)
    t = read_all(src)
    w8, s = convert.quantize_fp8(t["model.layers.0.self_attn.q_a_proj.weight"])   # [16, 160]
    t["model.layers.0.self_attn.q_a_proj.weight"] = w8                           # no scale
    w8, s = convert.quantize_fp8(t["model.layers.1.self_attn.kv_a_proj_with_mqa.weight"])
    t["model.layers.1.self_attn.kv_a_proj_with_mqa.weight"] = w8
    t["model.layers.1.self_attn.kv_a_proj_with_mqa.weight_scale_inv"] = s[:, :1]  # want (1, 2)
    d = str(tmp_path / "fp8")
    with open(os.path.join(src, "config.json")) as f:
        write_dir(d, t, json.load(f))
    with pytest.raises(convert.CheckpointError) as e:
        convert.load_hf(d)
    assert "q_a_proj.weight_scale_inv" in str(e.value)
    assert ("kv_a_proj_with_mqa.weight_scale_inv: checkpoint (1, 1) vs expected (1, 2)"
            in str(e.value))


def test_bad_paths_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        convert.load_hf(str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match="config.json"):
        convert.load_hf(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "deepseek_v3"}))
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04")
    with pytest.raises(FileNotFoundError, match="pickle"):
        convert.load_hf(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        convert.load_orbax(str(tmp_path / "nope"))


def test_no_pickle_in_the_converter():
    import glob
    for path in glob.glob(os.path.join(os.path.dirname(ckpt.__file__), "*.py")):
        src = open(path).read()
        assert "torch.load" not in src and "allow_pickle=True" not in src, path
        assert "import pickle" not in src, path


# ----------------------------------------------------------------------------------------------
# FP8 block format
# ----------------------------------------------------------------------------------------------

def dequant_reference(w8, s, b0, b1):
    out = np.zeros(w8.shape, np.float64)
    for i in range(w8.shape[0]):
        for j in range(w8.shape[1]):
            out[i, j] = float(w8[i, j]) * float(s[i // b0, j // b1])
    return out


@pytest.mark.parametrize("shape,block", [((300, 200), (128, 128)), ((144, 160), (128, 128)),
                                         ((128, 256), (128, 128)), ((37, 50), (16, 32))])
def test_fp8_dequant_partial_edge_blocks_vs_numpy_reference(shape, block, rng):
    w8 = (rng.standard_normal(shape) * 100).astype(ml_dtypes.float8_e4m3fn)
    grid = (-(-shape[0] // block[0]), -(-shape[1] // block[1]))
    s = rng.uniform(1e-3, 1.0, grid).astype(np.float32)
    got = convert.dequantize_fp8(w8, s, block)
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, dequant_reference(w8, s, *block).astype(np.float32))
    with pytest.raises(convert.CheckpointError, match="scale_inv shape"):
        convert.dequantize_fp8(w8, s[:, :-1] if grid[1] > 1 else s[:-1], block)


def test_fp8_quantize_matches_release_semantics(rng):
    w = rng.standard_normal((300, 200)).astype(np.float32)
    w[130:, 150:] *= 50                                    # one partial block with a large amax
    w8, s = convert.quantize_fp8(w)
    assert w8.dtype == ml_dtypes.float8_e4m3fn and s.shape == (3, 2)
    np.testing.assert_allclose(s[2, 1], np.abs(w[256:, 128:]).max() / 448.0, rtol=1e-6)
    np.testing.assert_allclose(s[0, 0], np.abs(w[:128, :128]).max() / 448.0, rtol=1e-6)
    assert float(np.abs(w8.astype(np.float32)).max()) == 448.0
    back = convert.dequantize_fp8(w8, s)
    np.testing.assert_allclose(back, w, rtol=0.07, atol=float(s.max()) * 2 ** -9 * 448)


def test_fp8_checkpoint_loads_dequantized(saved, tmp_path):
    """Release-style: FP8 decoder weights + scales, a release config.json (rope_scaling, type)."""
    cfg, v, path = saved
    t = read_all(path)
    want = {}
    for k in list(t):
        if k.endswith(("_proj.weight", "kv_a_proj_with_mqa.weight")) and "eh_proj" not in k:
            w8, s = convert.quantize_fp8(t[k], (8, 8))          # small blocks, partial edges
            t[k], t[k + "_scale_inv"] = w8, s
            want[k] = dequant_reference(w8, s, 8, 8).astype(np.float32)
    cj = {k: getattr(cfg, k) for k in ("vocab_size", "hidden_size", "intermediate_size",
                                       "moe_intermediate_size", "num_hidden_layers",
                                       "num_nextn_predict_layers", "first_k_dense_replace",
                                       "n_routed_experts", "n_shared_experts",
                                       "num_experts_per_tok", "n_group", "topk_group",
                                       "num_attention_heads", "num_key_value_heads", "q_lora_rank",
                                       "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim",
                                       "v_head_dim", "max_position_embeddings")}
    cj.update(rope_theta=10000, rope_scaling={"type": "yarn", "factor": 4,
                                              "original_max_position_embeddings": 64},
              quantization_config={"quant_method": "fp8", "weight_block_size": [8, 8]},
              topk_method="noaux_tc", scoring_func="sigmoid", ep_size=1, torch_dtype="bfloat16")
    d = str(tmp_path / "fp8")
    write_dir(d, t, cj, shards=2)
    cfg2, v2 = convert.load_hf(d, mtp="require")
    assert cfg2.rope_scaling == cfg.rope_scaling
    np.testing.assert_array_equal(
        v2["params"]["moe_layers"]["block"]["moe"]["experts"]["down"][1, 3],
        want["model.layers.2.mlp.experts.3.down_proj.weight"].T)
    q_b = want["model.layers.3.self_attn.q_b_proj.weight"].T.reshape(16, 2, 12)
    np.testing.assert_array_equal(v2["params"]["mtp_0"]["block"]["attn"]["q_b"]["kernel"], q_b)
    np.testing.assert_array_equal(v2["params"]["embed"], v["params"]["embed"])


# ----------------------------------------------------------------------------------------------
# config.json
# ----------------------------------------------------------------------------------------------

def test_config_from_transformers_and_release_json():
    hf = {"head_dim": 64, "qk_head_dim": 192, "qk_rope_head_dim": 64, "qk_nope_head_dim": 128,
          "num_mtp_layers": 2, "rope_parameters": {"rope_type": "default", "rope_theta": 5e5},
          "eos_token_id": [1, 2], "some_future_key": 3, "dtype": "bfloat16", "q_lora_rank": None}
    f = convert.hf_config_to_fields(hf)
    assert "head_dim" not in f and "dtype" not in f and "some_future_key" not in f
    assert f["num_nextn_predict_layers"] == 2 and f["rope_theta"] == 5e5
    assert f["rope_scaling"] is None and f["eos_token_id"] == 1 and f["q_lora_rank"] is None
    rel = {"rope_theta": 10000, "rope_scaling": {"type": "yarn", "factor": 40, "beta_fast": 32,
                                                 "beta_slow": 1, "mscale": 1.0,
                                                 "mscale_all_dim": 1.0,
                                                 "original_max_position_embeddings": 4096}}
    cfg = config.ModelConfig.from_dict(convert.hf_config_to_fields(rel))
    assert cfg.rope_scaling == config.deepseek_v3_671b().rope_scaling
    # transformers' defaults for a yarn dict without factor / original_max_position_embeddings
    f = convert.hf_config_to_fields({"max_position_embeddings": 4096, "rope_parameters": {
        "rope_type": "yarn", "original_max_position_embeddings": 1024, "rope_theta": 1e4}})
    assert f["rope_scaling"]["factor"] == 4.0
    with pytest.raises(ConfigError, match="rope type"):
        convert.hf_config_to_fields({"rope_parameters": {"rope_type": "llama3", "factor": 8}})


def test_config_dict_round_trip_and_transformers_reads_it():
    cfg = config.deepseek_v3_671b()
    d = json.loads(json.dumps(convert.hf_config_dict(cfg)))
    assert config.ModelConfig.from_dict(convert.hf_config_to_fields(d)) == cfg
    transformers = pytest.importorskip("transformers")
    hc = transformers.DeepseekV3Config(**{k: v for k, v in d.items()
                                          if k not in ("architectures", "model_type")})
    assert hc.rope_parameters["rope_type"] == "yarn" and hc.rope_parameters["factor"] == 40
    assert hc.num_mtp_layers == 1 and hc.head_dim == 64 and hc.q_lora_rank == 1536


# ----------------------------------------------------------------------------------------------
# laziness
# ----------------------------------------------------------------------------------------------

def test_reader_is_memory_mapped(saved):
    _, _, path = saved
    f = convert.SafetensorsFile(os.path.join(path, "model.safetensors"))
    a = f.get("lm_head.weight")
    base = a
    while getattr(base, "base", None) is not None:
        base = base.base
    assert isinstance(base, (np.memmap, __import__("mmap").mmap))
    f.close()


def test_load_peak_memory_is_params_plus_one_tensor(tmp_path):
    """Host allocations while loading stay near the params' size plus one tensor: reading every
    tensor first (or materialising whole files) would double them."""
    cfg = small_cfg(num_hidden_layers=10, n_routed_experts=32, num_nextn_predict_layers=0,
                    vocab_size=64, hidden_size=64, moe_intermediate_size=32)
    v = random_variables(cfg)
    d = str(tmp_path / "big")
    convert.save_hf(cfg, v, d, max_shard_bytes=500_000)
    params_bytes = sum(a.nbytes for a in jax.tree.leaves(v))          # 7.6 MB
    convert.load_hf(d)                                                  # warm caches / imports
    tracemalloc.start()
    _, v2 = convert.load_hf(d)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    print(f"params {params_bytes} B, peak {peak} B")
    assert peak < 1.3 * params_bytes
    del v2


# ----------------------------------------------------------------------------------------------
# CLI and orbax
# ----------------------------------------------------------------------------------------------

def run_cli(*args):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
               JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, "-m", "dsv3_jax.convert", *args], capture_output=True,
                          text=True, cwd=ROOT, env=env, timeout=300)


def test_cli_orbax_round_trip(saved, tmp_path):
    cfg, v, path = saved
    ckpt, back = str(tmp_path / "ckpt"), str(tmp_path / "back")
    r = run_cli("--from-hf", path, "--to", ckpt)
    assert r.returncode == 0, r.stderr[-3000:]
    assert os.path.isdir(os.path.join(ckpt, "variables"))
    with open(os.path.join(ckpt, "config.json")) as f:
        assert config.ModelConfig.from_dict(json.load(f)) == cfg
    cfg_o, v_o = convert.load_orbax(ckpt)
    assert cfg_o == cfg
    assert_trees_equal(jax.tree.map(np.asarray, v_o), v)
    r = run_cli("--from-orbax", ckpt, "--to-hf", back, "--max-shard-bytes", "50000")
    assert r.returncode == 0, r.stderr[-3000:]
    assert os.path.exists(os.path.join(back, "model.safetensors.index.json"))
    cfg_b, v_b = convert.load_hf(back, mtp="require")
    assert cfg_b == cfg
    assert_trees_equal(v_b, v)
    # a non-empty destination needs --overwrite
    r = run_cli("--from-hf", path, "--to", ckpt)
    assert r.returncode == 2 and "--overwrite" in r.stderr


def test_cli_bad_paths(saved, tmp_path):
    _, _, path = saved
    r = run_cli("--from-hf", str(tmp_path / "missing"), "--to", str(tmp_path / "out"))
    assert r.returncode == 2 and "does not exist" in r.stderr and "Traceback" not in r.stderr
    r = run_cli("--from-orbax", path, "--to-hf", str(tmp_path / "out"))   # an HF dir
    assert r.returncode == 2 and "--from-hf" in r.stderr and "Traceback" not in r.stderr
    r = run_cli("--from-hf", path)
    assert r.returncode == 2 and "--to" in r.stderr


def test_orbax_checkpoint_of_another_config_is_a_clear_error(saved, tmp_path):
    cfg, v, _ = saved
    ckpt = str(tmp_path / "ckpt")
    convert.save_orbax(cfg, v, ckpt)
    with open(os.path.join(ckpt, "config.json")) as f:
        d = json.load(f)
    d["num_hidden_layers"] = 4
    with open(os.path.join(ckpt, "config.json"), "w") as f:
        json.dump(d, f)
    with pytest.raises(convert.CheckpointError, match="shape mismatch"):
        convert.load_orbax(ckpt)


# ----------------------------------------------------------------------------------------------
# dsv3_jax.params
# ----------------------------------------------------------------------------------------------

def test_param_counts_of_the_release():
    n = count_params(config.deepseek_v3_671b())
    assert n["total"] == 671_026_419_200
    assert n["activated"] == 37_552_297_472 and round(n["activated"] / 1e9, 2) == 37.55
    assert n["mtp"] == 11_610_068_224 and round(n["mtp"] / 1e9, 1) == 11.6
    assert n["router_bias"] == 59 * 256
    assert n["as_released"] == n["total"] + n["mtp"] + 2 * 129280 * 7168
    assert sum(n["breakdown"].values()) == n["total"]
    assert n["breakdown"]["routed_experts"] == 58 * 256 * 3 * 7168 * 2048


def test_param_counts_cli_json():
    env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
    r = subprocess.run([sys.executable, "-m", "dsv3_jax.params", "--preset", "deepseek_v3_671b",
                        "--json"], capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["total"] == 671_026_419_200 and out["activated"] == 37_552_297_472


def test_param_counts_match_real_arrays():
    cfg = small_cfg()
    v = random_variables(cfg)
    n = count_params(cfg)
    mtp = sum(a.size for a in jax.tree.leaves(v["params"]["mtp_0"])) + cfg.n_routed_experts
    assert n["total_with_mtp"] == sum(a.size for a in jax.tree.leaves(v))
    assert n["mtp"] == mtp
