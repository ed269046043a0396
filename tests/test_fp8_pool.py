"""`experiments/fp8_vs_bf16.py --pool`: every stored seed of the FP8 vs BF16 comparison pooled into
one mean, on fabricated results.json files (no training): the statistics against NumPy, and
the refusals (runs whose configs differ beyond the init seed, a seed measured two ways)."""
import json

import numpy as np
import pytest

from experiments import fp8_vs_bf16 as exp


def _results(seeds, rng, **config_changes):
    """A results.json as the sweep writes it, with random losses for each seed."""
    configs, per_seed, curves = {}, {}, {}
    for s in seeds:
        for name, c in exp.configs(quick=False, noise=False, seed=s).items():
            c.update_from_flattened_dict(config_changes)
            configs[f"s{s}/{name}"] = json.loads(json.dumps(c.to_dict(), default=float))
        base, other = 5.4 + 0.02 * rng.standard_normal(2)
        per_seed[str(s)] = {
            "compare": {k: {"mean_base": float(base), "mean_other": float(other),
                            "rel_mean": abs(other - base) / base} for k in ("loss", "ce")},
            "val_relative_error": float(rng.uniform(0, 0.005)), "yardsticks": {}}
        curves[str(s)] = {"bf16": {"loss": (5.4 + 0.05 * rng.standard_normal(30)).tolist(),
                                   "val_loss": float(4.6 + 0.02 * rng.standard_normal())}}
    return {"config": {"size": "full", "seeds": list(seeds), "last": 20, "configs": configs},
            "provenance": {"date": "2026-12-02", "git_commit": "abc1234"},
            "per_seed": per_seed, "curves": curves}


def _write(path, out):
    path.mkdir(parents=True, exist_ok=True)
    (path / "results.json").write_text(json.dumps(out))


def test_pool_statistics_over_every_stored_seed(tmp_path):
    rng = np.random.default_rng()
    first, more = _results([0, 1], rng), _results([1, 2, 3], rng)
    more["per_seed"]["1"] = first["per_seed"]["1"]          # seed 1 stored twice, the same
    more["curves"]["1"] = first["curves"]["1"]
    _write(tmp_path, first)
    _write(tmp_path / "seeds_1_2_3_no_noise_last20", more)
    other_last = _results([4], rng)
    other_last["config"]["last"] = 50                       # another metric: not pooled
    _write(tmp_path / "seeds_4_no_noise_last50", other_last)
    p = exp.pool(tmp_path)
    assert p["seeds"] == [0, 1, 2, 3]
    rows = [first["per_seed"]["0"], first["per_seed"]["1"], more["per_seed"]["2"],
            more["per_seed"]["3"]]
    b = np.array([r["compare"]["loss"]["mean_base"] for r in rows])
    f = np.array([r["compare"]["loss"]["mean_other"] for r in rows])
    err, signed = np.abs(f - b) / b, (f - b) / b
    t = p["train_relative_error"]
    np.testing.assert_allclose([t["mean"], t["std"], t["sem"]],
                               [err.mean(), err.std(ddof=1), err.std(ddof=1) / 2], rtol=1e-12)
    np.testing.assert_allclose(p["train_signed_error"]["mean"], signed.mean(), rtol=1e-12)
    assert p["below_claim"] == (err.mean() < 0.0025)
    assert p["seeds_below_claim"] == int((err < 0.0025).sum())
    # BF16 vs BF16 from the next init: seeds (0, 1), (1, 2), (2, 3), from the stored curves
    curves = [first["curves"]["0"], first["curves"]["1"], more["curves"]["2"],
              more["curves"]["3"]]
    tail = np.array([np.mean(c["bf16"]["loss"][-20:]) for c in curves])
    val = np.array([c["bf16"]["val_loss"] for c in curves])
    assert p["bf16_other_init_pairs"] == [[0, 1], [1, 2], [2, 3]]
    np.testing.assert_allclose(p["bf16_other_init_train"]["values"],
                               np.abs(tail[1:] - tail[:-1]) / tail[:-1], rtol=1e-12)
    np.testing.assert_allclose(p["bf16_other_init_val"]["values"],
                               np.abs(val[1:] - val[:-1]) / val[:-1], rtol=1e-12)
    assert json.loads((tmp_path / "pooled.json").read_text())["seeds"] == [0, 1, 2, 3]
    assert "over 4 seeds" in exp.pool_report(p)


def test_pool_accepts_a_field_added_since_with_its_default(tmp_path):
    rng = np.random.default_rng()
    old = _results([0], rng)
    for c in old["config"]["configs"].values():
        del c["pipeline"]["split_w"]                        # recorded before the field existed
    _write(tmp_path, old)
    _write(tmp_path / "more", _results([1], rng))
    assert exp.pool(tmp_path)["seeds"] == [0, 1]


def test_pool_refuses_runs_that_differ_beyond_the_seed(tmp_path):
    rng = np.random.default_rng()
    _write(tmp_path, _results([0], rng))
    _write(tmp_path / "more", _results([1], rng, **{"optim.peak_lr": 3e-3}))
    with pytest.raises(ValueError, match="optim.peak_lr"):
        exp.pool(tmp_path)


def test_pool_refuses_a_seed_measured_two_ways(tmp_path):
    rng = np.random.default_rng()
    _write(tmp_path, _results([0], rng))
    _write(tmp_path / "again", _results([0], rng))
    with pytest.raises(ValueError, match="seed 0 is measured differently"):
        exp.pool(tmp_path)
