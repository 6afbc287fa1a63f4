"""The E-hwmodel and E-biased experiment scripts end to end on tiny configs, their strict configs,
and their statistics (R and the biased/conventional ratio with bootstrap spreads) on small cases
whose bootstrap distribution is known exactly."""
import csv
import itertools
import json

import numpy as np
import pytest

from nvjax import data as data_mod
from nvjax import models as models_mod
from nvjax.config import ConfigError

HW_TINY = """
experiment: e_hwmodel
models: [mlp]
model_epochs: 3
model_cache_dir: {cache}
tile_rows: 32
tile_cols: 32
nonidealities:
  - {{name: stuck, device: ideal, p_stuck: 0.2}}
  - {{name: ir, device: ideal, ir_drop: first_order, r_wire: 50.0}}
hwaware: {{epochs: 1, batch_size: 256, calib_samples: 16}}
correction: {{tol: 0.05, max_rounds: 2, ir_predistort: 4}}
calib_samples: 32
num_chips: 6
chunk_size: 3
eval_samples: 60
bootstrap: 20
progress: false
"""

BIASED_TINY = """
experiment: e_biased
models: [mlp]
model_epochs: 3
model_cache_dir: {cache}
cells: [{{bits: 2, favorable: 2}}]
sigma: 0.1
strengths: [1.0, 6.0]
fractions: [0.5, 1.0]
finetune: {{epochs: 1, batch_size: 256}}
num_chips: 6
chunk_size: 3
eval_samples: 60
bootstrap: 20
progress: false
"""


@pytest.mark.slow
def test_hwmodel_main_tiny(tmp_path, model_cache, trained_model, load_script):
    mod = load_script("e_hwmodel")
    cfg = tmp_path / "hw.yaml"
    cfg.write_text(HW_TINY.format(cache=model_cache))
    out = tmp_path / "out"
    assert mod.main([str(cfg), "--out", str(out)]) == 0
    for f in ("results.json", "results.csv", "e_hwmodel.png", "summary.md"):
        assert (out / f).stat().st_size > 0, f
    res = json.loads((out / "results.json").read_text())
    m = res["models"]["mlp"]
    # the software accuracy is the trained model's on the first 60 test images
    model, params = trained_model("mlp", epochs=3)
    ds = data_mod.digits(seed=0, flatten=True)
    sw = float(models_mod.accuracy(model, params, ds.x_test[:60], ds.y_test[:60]))
    assert m["software_accuracy"] == pytest.approx(sw)
    for name in ("stuck", "ir"):
        e = m["nonidealities"][name]
        assert set(e["accuracy"]) == set(mod.VARIANTS)
        assert set(e["R"]) == set(mod.VARIANTS) - {"nonideal"}
    # IR drop is deterministic and pre-distortion + calibration undo it: the corrected chip is
    # at least as close to the software accuracy as the raw one
    ir = m["nonidealities"]["ir"]["accuracy"]
    assert abs(ir["corrected"]["mean"] - sw) <= abs(ir["nonideal"]["mean"] - sw) + 1e-9
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 * 6
    # every chip's accuracy is a count of correct images out of 60
    accs = np.array([[float(r[f"acc_{v}"]) for v in mod.VARIANTS] for r in rows])
    np.testing.assert_allclose(accs * 60, np.round(accs * 60), atol=1e-4)


def test_hwmodel_bootstrap_r_exact_distribution(load_script):
    """R = (mitigated − non-ideal)/(ideal − non-ideal) of the chip means; with 2 chips the
    bootstrap resamples (same chips for both arms) have 4 equally likely outcomes."""
    mod = load_script("e_hwmodel")
    a_non, a_mit = np.array([0.5, 0.7]), np.array([0.8, 0.8])
    r, sd, ci = mod.bootstrap_r(1.0, a_non, a_mit, 20000, 0)
    assert r == pytest.approx((0.8 - 0.6) / (1.0 - 0.6))
    outcomes = [(0.8 - np.mean(a_non[list(i)])) / (1.0 - np.mean(a_non[list(i)]))
                for i in itertools.product(range(2), repeat=2)]   # R ∈ {0.6, 0.5, 0.5, 1/3}
    assert sd == pytest.approx(np.std(outcomes), rel=0.02)
    assert ci == pytest.approx([1 / 3, 0.6])
    # no gain on any chip: R = 0 in every paired resample (an unpaired resample would spread)
    r, sd, ci = mod.bootstrap_r(0.9, np.array([0.3, 0.5, 0.7]), np.array([0.3, 0.5, 0.7]), 500, 1)
    assert (r, sd, ci) == (0.0, 0.0, [0.0, 0.0])
    # full recovery: R = 1 whatever the non-ideal chips
    r, sd, _ = mod.bootstrap_r(0.9, np.array([0.3, 0.5, 0.7]), np.full(3, 0.9), 500, 1)
    assert r == pytest.approx(1.0) and sd == pytest.approx(0.0, abs=1e-12)


@pytest.mark.slow
def test_biased_main_tiny(tmp_path, model_cache, load_script):
    mod = load_script("e_biased")
    cfg = tmp_path / "b.yaml"
    cfg.write_text(BIASED_TINY.format(cache=model_cache))
    out = tmp_path / "out"
    assert mod.main([str(cfg), "--out", str(out)]) == 0
    for f in ("results.json", "results.csv", "e_biased.png", "summary.md"):
        assert (out / f).stat().st_size > 0, f
    res = json.loads((out / "results.json").read_text())
    c = res["models"]["mlp"]["cells"]["2"]
    assert c["favorable_levels"] == [0, 3] and c["codebook_size"] == 16
    assert set(c["strengths"]) == {"1", "6"}
    for e in c["strengths"].values():
        assert set(e["ratio"]) == {"biased p=0.5", "biased p=1"}
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 * 3 * 6
    acc = np.array([float(r["accuracy"]) for r in rows])
    np.testing.assert_allclose(acc * 60, np.round(acc * 60), atol=1e-4)   # counts out of 60


def test_biased_bootstrap_ratio_exact_distribution(load_script):
    """ratio = mean(biased)/mean(conventional); 2 chips: resampled biased means 0.2, 0.3, 0.3,
    0.4 over a constant conventional 0.2, so ratios 1, 1.5, 1.5, 2 (std sqrt(1/8))."""
    mod = load_script("e_biased")
    r, sd, ci = mod.bootstrap_ratio(np.array([0.2, 0.4]), np.array([0.2, 0.2]), 20000, 0)
    assert r == pytest.approx(1.5)
    assert sd == pytest.approx(np.sqrt(1 / 8), rel=0.02)
    assert ci == pytest.approx([1.0, 2.0])


def test_biased_best_ratio_skips_weak_conventional_arms(load_script):
    mod = load_script("e_biased")

    def point(conv, ratios):
        return {"accuracy": {"conventional": {"mean": conv}},
                "ratio": {k: {"ratio": v} for k, v in ratios.items()}}
    results = {"mlp": {"cells": {"2": {"strengths": {
        "1": point(0.9, {"biased p=0.5": 1.05, "biased p=1": 1.1}),
        "8": point(0.12, {"biased p=0.5": 3.0, "biased p=1": 2.0})}}}},
        "lenet": {"cells": {"4": {"strengths": {
            "2": point(0.5, {"biased p=1": 1.4}),
            "4": point(0.3, {"biased p=0.5": 1.2})}}}}}
    best = mod.best_ratio(results)
    assert best[0]["ratio"] == 3.0 and best[1:] == ("mlp", "2", "8", "biased p=0.5")
    best = mod.best_ratio(results, 0.4)
    assert best[0]["ratio"] == 1.4 and best[1:] == ("lenet", "4", "2", "biased p=1")
    assert mod.best_ratio(results, 0.95) is None


@pytest.mark.parametrize("script,text,needle", [
    ("e_hwmodel", "experiment: e_hwmodel\nnonidealities: []\n", "nonidealities"),
    ("e_hwmodel", "experiment: e_hwmodel\nnonidealities: [{name: a, device: flash}]\n", "device"),
    ("e_biased", "experiment: e_biased\ncells: [{bits: 3}]\n", "multiple"),
    ("e_biased", "experiment: e_biased\nfractions: [0.0]\n", "fractions"),
])
def test_bad_configs_raise(tmp_path, script, text, needle, load_script):
    mod = load_script(script)
    p = tmp_path / "bad.yaml"
    p.write_text(text)
    with pytest.raises(ConfigError, match=needle):
        mod.load_config(str(p))
