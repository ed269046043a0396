"""benchmarks/gpu_suite.py in its CI form (--interpret --small), and the GPU image's missing
packages: model, kernels and the suite import and run without ml-collections, clu and
tensorflow-datasets."""
import json
import os
import pathlib
import subprocess
import sys
import textwrap

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
ENV = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}


@pytest.mark.slow   # ~75 s: every section in interpret mode; the kernels' own interpret tests
                    # and test_lowering's suite lowering stay in the default tier
def test_suite_interpret_small_runs_every_section(tmp_path):
    proc = subprocess.run([sys.executable, "benchmarks/gpu_suite.py", "--interpret", "--small",
                           "--out", str(tmp_path)], cwd=ROOT, env=ENV, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    doc = json.loads((tmp_path / "gpu_suite.json").read_text())
    sections = doc["sections"]
    assert set(sections) == {"env", "correctness", "gemm", "grouped", "dispatch", "train",
                             "decode"}
    assert all(s["status"] == "ok" for s in sections.values()), sections
    kernels = {e["kernel"].split()[0] for e in sections["correctness"]["entries"]}
    assert {"fp8_gemm", "fp8_grouped_gemm", "fp8_group_wgrad", "fp8_dot",
            "moe_dispatch"} <= kernels
    checked = [e for e in sections["correctness"]["entries"] if not e.get("skipped")]
    for e in checked:
        assert e["ok"] and e["reference"] and e["max_rel_err"] <= e.get("tol", 1.0), e
    assert "attention blockwise (fwd + VJP)" in {e["kernel"] for e in checked}
    assert {e["case"] for e in sections["train"]["entries"]} == {"bf16", "fp8 (pallas)"}
    assert all(e["tokens_per_s"] > 0 for e in sections["train"]["entries"])
    assert "| correctness |" in (tmp_path / "gpu_suite.md").read_text()


BLOCKED = textwrap.dedent("""
    import sys
    for name in ("ml_collections", "clu", "tensorflow_datasets", "tensorflow"):
        sys.modules[name] = None              # import raises ImportError
    sys.path.insert(0, "benchmarks")
    import jax, jax.numpy as jnp
    from dsv3_jax import config, model, fp8, loss, optim, params, generate, kv_cache
    from dsv3_jax.layers import moe, mla
    from kernels_pallas import fp8_gemm, grouped_gemm, moe_dispatch
    import fp8_gemm_gpu, moe_dispatch_gpu, decode, gpu_suite
    cfg = gpu_suite.model_config(True)
    v = model.init(cfg, jax.random.key(0))
    out = model.forward(cfg, v, jnp.zeros((1, 8), jnp.int32))
    assert out.logits.shape == (1, 8, cfg.vocab_size)
    print("IMPORT OK")
""")


def test_model_kernels_and_suite_need_no_ml_collections_clu_or_tfds():
    proc = subprocess.run([sys.executable, "-c", BLOCKED], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=300)
    assert "IMPORT OK" in proc.stdout, proc.stderr[-3000:]
