"""E-biased (experiments/e_biased.py): the physical range of s from the D2 ReRAM fit, the
noise-aware QAT forward pass, the ratio statistics and verdicts, the strict config, and the script
end to end on a tiny config."""
import csv
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nvjax import devices as dev_mod
from nvjax.config import ConfigError

# Wan et al., Nature 608, 504 (2022) as fitted in DESIGN.md D2: σ(ĝ) = Σ c_i ĝ^i µS, g_max = 40 µS
C_1S = [0.348, 16.030, -43.853, 45.393, -16.815]
C_1D = [0.701, 22.086, -50.773, 47.095, -16.458]


def poly(c, x):
    return sum(ci * x ** i for i, ci in enumerate(c))


def test_d2_ratios_match_the_published_polynomial(load_script):
    mod = load_script("e_biased")
    # K = 2, 1 s, by hand: σ(0) = 0.348, σ(1) = 0.348 + 16.030 − 43.853 + 45.393 − 16.815 = 1.103
    assert poly(C_1S, 0.0) == pytest.approx(0.348) and poly(C_1S, 1.0) == pytest.approx(1.103)
    for k in (2, 4):
        g = np.linspace(0, 1, 2 ** k)
        r = mod.d2_ratios(k)
        for name, c in (("1 s", C_1S), ("1 day", C_1D)):
            s = poly(c, g)
            np.testing.assert_allclose(r[name]["level_sigma"], s / 40.0, rtol=1e-5)
            assert r[name]["mean"] == pytest.approx(s[1:-1].mean() / s[[0, -1]].mean(), rel=1e-5)
            assert r[name]["max"] == pytest.approx(s[1:-1].max() / s[[0, -1]].mean(), rel=1e-5)
        assert r["bound"] == max(r["1 s"]["mean"], r["1 day"]["mean"])
    # (2.292 + 1.673)/2 / ((0.348 + 1.103)/2) for K = 2 at 1 s
    assert mod.d2_ratios(2)["bound"] == pytest.approx(3.965 / 1.451, rel=1e-3)
    assert mod.d2_ratios(2)["1 day"]["smallest_sigma_levels"] == [0, 3]
    assert mod.d2_ratios(4)["1 day"]["smallest_sigma_levels"] == [0, 1]   # σ(1/15) < σ(1)


def test_sweep_points_label_unphysical_strengths(tmp_path, load_script):
    mod = load_script("e_biased")
    p = tmp_path / "c.yaml"
    p.write_text("experiment: e_biased\nstrengths: [1.0, 2.0]\nstress_strengths: [6.0]\n"
                 "d2_table_times: [86400.0]\n")
    cfg = mod.load_config(str(p))
    pts = mod.sweep_points(cfg, mod.CellOptions(2, 2))
    assert [q["key"] for q in pts] == ["s=1", "s=2", "s=2.73", "s=6", "D2 t=86400s"]
    assert [q["physical"] for q in pts] == [True, True, True, False, True]
    s1d = poly(C_1D, np.linspace(0, 1, 4))
    assert pts[-1]["s"] == pytest.approx(s1d[1:3].mean() / s1d[[0, 3]].mean(), rel=1e-5)
    dev = mod.make_device(cfg, mod.CellOptions(2, 2), pts[-1])
    np.testing.assert_allclose(np.asarray(dev.sigma), s1d / 40.0, rtol=1e-5)
    dev = mod.make_device(cfg, mod.CellOptions(2, 2), pts[1])
    np.testing.assert_allclose(np.asarray(dev.sigma), [0.1, 0.2, 0.2, 0.1], rtol=1e-6)


def test_noisy_quantized_is_straight_through_with_the_closed_form_spread(load_script):
    """Zero σ: exactly the QAT weights, identity gradient. Uniform σ: the read-back error of an
    8-bit weight on 2-bit slices has σ_W = σ·max|W|·sqrt(Σ 16^i)/Σ 4^i (DESIGN.md D3) per
    stack, √2 times that with both stacks."""
    mod = load_script("e_biased")
    w = jax.random.uniform(jax.random.key(0), (200, 100), minval=-0.5, maxval=0.5)
    w = w.at[0, 0].set(1.0)                                   # max|W| = 1
    params = {"Dense_0": {"kernel": w, "bias": jnp.zeros(100)}}
    dev0 = dev_mod.levels(bits=2, sigma=0.0)
    out = mod.noisy_quantized(jax.random.key(1), dev0, params, bits=8, slice_bits=2)
    np.testing.assert_allclose(out["Dense_0"]["kernel"], np.round(w * 255) / 255, atol=1e-6)
    c = jax.random.normal(jax.random.key(2), w.shape)
    dev = dev_mod.levels(bits=2, sigma=0.01)
    g = jax.grad(lambda w_: jnp.sum(c * mod.noisy_quantized(
        jax.random.key(1), dev, {"Dense_0": {"kernel": w_, "bias": jnp.zeros(100)}},
        bits=8, slice_bits=2)["Dense_0"]["kernel"]))(w)
    np.testing.assert_allclose(g, c, rtol=1e-6)
    out = mod.noisy_quantized(jax.random.key(1), dev, params, bits=8, slice_bits=2)
    err = np.asarray(out["Dense_0"]["kernel"]) - np.round(np.asarray(w) * 255) / 255
    sigma_w = np.sqrt(2) * 0.01 * np.sqrt(1 + 16 + 256 + 4096) / 85
    assert np.std(err) == pytest.approx(sigma_w, rel=0.03)       # 20 000 draws: ±0.5 % (1σ)


def test_ratio_to_the_strongest_baseline_by_hand(load_script):
    mod = load_script("e_biased")
    b, q, n = np.array([0.9, 0.8]), np.array([0.6, 0.4]), np.array([0.3, 0.5])
    np.testing.assert_allclose(mod.ratio_to(b, q), [1.5, 2.0])
    np.testing.assert_allclose(mod.ratio_to(b, q, n), [1.5, 1.6])


def test_point_statistics_paired_ratios(load_script):
    """biased always right, QAT right on the even images, noise-aware QAT on images 0..2 of 8:
    means 1, 1/2, 3/8 -> ratios 2 (vs QAT and strongest) and 8/3 (vs noise-aware); resampling
    the images moves them, resampling the chips (all alike) does not."""
    mod = load_script("e_biased")
    chips, images = 5, 8
    correct = np.zeros((chips, 3, images), np.uint8)
    correct[:, 0, ::2] = 1
    correct[:, 1, :3] = 1
    correct[:, 2] = 1
    st = mod.point_statistics(correct, ["QAT", "noise-aware QAT", "biased p=1"], 400, 0)
    r = st["ratio"]["biased p=1"]
    assert r["vs_qat"]["value"] == pytest.approx(2.0)
    assert r["vs_strongest"]["value"] == pytest.approx(2.0)
    assert r["vs_noise_aware"]["value"] == pytest.approx(8 / 3)
    assert st["accuracy"]["QAT"]["value"] == pytest.approx(0.5)
    # the binomial spread of the image resample: sd(QAT accuracy) ≈ sqrt(0.25/8)
    assert st["accuracy"]["QAT"]["bootstrap_std"] == pytest.approx(np.sqrt(0.25 / 8), rel=0.15)
    assert st["accuracy"]["biased p=1"]["bootstrap_std"] == 0.0
    assert r["vs_strongest"]["ci95"][1] <= r["vs_qat"]["ci95"][1] + 1e-12


def _results(points):
    """A results tree with one model and K = 2: ``points`` = {key: (physical, kind, ratios)}
    with ratios {against: (value, lo, hi)}."""
    d2 = {"1 s": {"mean": 2.7, "smallest_sigma_levels": [0, 3]},
          "1 day": {"mean": 2.2, "smallest_sigma_levels": [0, 3]}, "bound": 2.7}
    pts = {}
    for key, (phys, kind, ratios) in points.items():
        pts[key] = {"physical": phys, "kind": kind, "ratio": {"biased p=1": {
            a: {"value": v, "ci95": [lo, hi]} for a, (v, lo, hi) in ratios.items()}}}
    return {"mlp": {"cells": {"2": {"points": pts, "d2": d2}}}}


def test_verdicts_ignore_unphysical_points(load_script):
    mod = load_script("e_biased")
    r = lambda v, lo, hi: {"vs_strongest": (v, lo, hi), "vs_qat": (v, lo, hi)}  # noqa: E731
    res = _results({"s=2": (True, "s", r(1.3, 1.2, 1.4)),
                    "s=6": (False, "s", r(3.0, 2.8, 3.2)),
                    "D2 t=86400s": (True, "d2", r(1.0, 0.98, 1.01))})
    best = mod.best_ratio(res)
    assert best[0]["value"] == 1.3 and best[1:] == ("mlp", "2", "s=2", "biased p=1")
    assert mod.best_ratio(res, physical=False)[0]["value"] == 3.0
    rows = mod.claims(res)
    assert [c["verdict"] for c in rows] == ["partly", "partly", "not reproduced", "reproduced"]
    assert rows[0]["ci"] == [1.2, 1.4]
    lines = mod.regime(res)
    assert lines[0].startswith("In short: over the physical points, the best biased arm reaches "
                               "1.00× [0.98, 1.01] (mlp, K = 2, D2 t=86400s) to 1.30× [1.20, 1.40]")
    assert "3.00× [2.80, 3.20], mlp, K = 2, s=6" in lines[0]
    assert mod.ratio_verdict({"ci95": [2.0, 2.5]}) == "reproduced"
    assert mod.ratio_verdict({"ci95": [0.9, 1.5]}) == "not reproduced"


def test_selection_aware_max_by_hand(load_script):
    """Two cells on 2 chips × 2 images, both baselines right on image 0 only (accuracy w_i0/2
    under weights w); cell A's biased arm right on chip 0 (w_c0/2), cell B's on chip 1 and on
    (chip 0, image 1): (w_c0·w_i1 + 2·w_c1)/4. Full data: A 1/2 → ratio 1, B 3/4 → 1.5 (B is
    selected). Three fixed resamples: identity → (1, 1.5); chip 0 twice → (2, 1); chip 1 twice →
    (0, 2). The re-selected max is (1.5, 2, 2) (A wins the second), B's own is (1.5, 1, 2)."""
    mod = load_script("e_biased")
    base = np.array([[1, 0], [1, 0]])
    a = np.array([[1, 1], [0, 0]])
    b = np.array([[0, 1], [1, 1]])
    w_c = np.array([[1.0, 1.0], [2.0, 0.0], [0.0, 2.0]])
    w_i = np.array([[1.0, 1.0], [1.0, 1.0], [1.0, 1.0]])
    labels = ["QAT", "noise-aware QAT", "biased"]
    cands = []
    for name, arm in (("A", a), ("B", b)):
        rr = mod.resampled_ratios(np.stack([base, base, arm], 1), labels, w_c, w_i)
        cands.append((name, *rr["biased"]["vs_strongest"]))
    np.testing.assert_allclose(cands[0][2], [1.0, 2.0, 0.0])
    np.testing.assert_allclose(cands[1][2], [1.5, 1.0, 2.0])
    sel = mod.select_max(cands)
    assert sel["cell"] == "B" and sel["value"] == pytest.approx(1.5)
    np.testing.assert_allclose(sel["resamples"], [1.5, 2.0, 2.0])
    assert sel["selected_wins"] == pytest.approx(2 / 3)
    # numpy's linear quantiles of 3 values: position 0.05 and 1.95 of the sorted values: the
    # percentile interval [1.525, 2] sits above the estimate 1.5 (the resampled max is biased up)
    assert sel["ci95_percentile"] == pytest.approx([1.5 + 0.05 * 0.5, 2.0])
    # the basic interval reflects it about the estimate: [2·1.5 − 2, 2·1.5 − 1.525]
    assert sel["ci95"] == pytest.approx([1.0, 1.475])
    own = np.quantile(cands[1][2], [0.025, 0.975])          # B alone: [1.025, 1.975]
    assert own == pytest.approx([1.025, 1.975]) and sel["ci95_percentile"][0] > own[0]

    # across models: the per-resample max of each model's max, on one shared resampling
    def model(value, resamples, seed=7):
        return {"test_images": 2, "selection": {
            "seed": seed, "num_chips": 2, "resamples": 3,
            "strongest": {"value": value, "cell": "K = 2, s=2, biased p=1",
                          "resamples": resamples, "cells": 4}}}
    res = {"mlp": model(1.5, [1.5, 2.0, 2.0]), "lenet": model(1.2, [3.0, 1.0, 1.0])}
    m = mod.selected_max(res, "strongest")
    assert m["model"] == "mlp" and m["value"] == 1.5 and m["cells"] == 8
    q = np.quantile([3.0, 2.0, 2.0], [0.025, 0.975])        # max of the two per resample
    assert m["ci95_percentile"] == pytest.approx(list(q))
    assert m["ci95"] == pytest.approx([3.0 - q[1], 3.0 - q[0]])
    res["lenet"]["selection"]["seed"] = 8                    # different resamplings: no max
    assert mod.selected_max(res, "strongest") is None
    assert mod.selected_max({"mlp": {"test_images": 2}}, "strongest") is None


def test_claim_rows_use_the_selection_aware_interval(load_script):
    mod = load_script("e_biased")
    r = lambda v, lo, hi: {"vs_strongest": (v, lo, hi), "vs_qat": (v, lo, hi)}  # noqa: E731
    res = _results({"s=2": (True, "s", r(1.3, 1.2, 1.4)),
                    "D2 t=86400s": (True, "d2", r(1.0, 0.98, 1.01))})
    res["mlp"]["test_images"] = 10
    sel = {"value": 1.3, "cell": "K = 2, s=2, biased p=1", "resamples": [1.35, 1.45, 1.5],
           "cells": 2}
    res["mlp"]["selection"] = {"seed": 1, "num_chips": 5, "resamples": 3, "strongest": sel,
                               "qat": sel}
    rows = mod.claims(res)
    assert rows[0]["value"] == 1.3
    q = np.quantile([1.35, 1.45, 1.5], [0.025, 0.975])
    assert rows[0]["ci"] == pytest.approx([2.6 - q[1], 2.6 - q[0]])     # basic: 2·1.3 − q
    assert "re-selects the best cell in every resample" in rows[0]["why"]
    assert "own CI is [1.200, 1.400]" in rows[0]["why"]
    assert rows[2]["ci"] == [0.98, 1.01]                     # no d2 selection data: fallback
    assert "without the selection" in rows[2]["why"]


@pytest.mark.parametrize("text,needle", [
    ("strengths: [0.5]", "strengths"),
    ("stress_strengths: [0.0]", "stress_strengths"),
    ("sigma: 0.0", "sigma"),
    ("cells: [{bits: 1}]", "cells"),
    ("d2_table_times: [0.0]", "d2_table_times"),
    ("strengths: []\nd2_strength: false", "strengths"),
    ("finetune: {epochs: 0}", "finetune"),
])
def test_bad_config_values_name_the_key(tmp_path, text, needle, load_script):
    mod = load_script("e_biased")
    p = tmp_path / "bad.yaml"
    p.write_text("experiment: e_biased\n" + text + "\n")
    with pytest.raises(ConfigError, match=needle):
        mod.load_config(str(p))


TINY = """
experiment: e_biased
models: [mlp]
model_epochs: 3
model_cache_dir: {cache}
cells: [{{bits: 2, favorable: 2}}]
sigma: 0.1
strengths: [1.0]
d2_strength: true
stress_strengths: [6.0]
d2_table_times: [86400.0]
fractions: [1.0]
finetune: {{epochs: 1, batch_size: 256}}
num_chips: 4
chunk_size: 4
eval_samples: 40
bootstrap: 20
progress: false
"""


@pytest.mark.slow
def test_biased_main_tiny(tmp_path, model_cache, load_script):
    mod = load_script("e_biased")
    cfg = tmp_path / "b.yaml"
    cfg.write_text(TINY.format(cache=model_cache))
    out = tmp_path / "out"
    assert mod.main([str(cfg), "--out", str(out)]) == 0
    for f in ("results.json", "results.csv", "e_biased.png", "summary.md"):
        assert (out / f).stat().st_size > 0, f
    res = json.loads((out / "results.json").read_text())
    assert len(res["claims"]) == 4 and "## Claims" in (out / "summary.md").read_text()
    c = res["models"]["mlp"]["cells"]["2"]
    assert c["favorable_levels"] == [0, 3] and c["codebook_size"] == 16
    assert list(c["points"]) == ["s=1", "s=2.73", "s=6", "D2 t=86400s"]
    assert [e["physical"] for e in c["points"].values()] == [True, True, False, True]
    for e in c["points"].values():
        assert set(e["accuracy"]) == {"QAT", "noise-aware QAT", "biased p=1"}
        lo, hi = e["ratio"]["biased p=1"]["vs_strongest"]["ci95"]
        assert lo <= e["ratio"]["biased p=1"]["vs_strongest"]["value"] <= hi
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4 * 3 * 4                                  # points × arms × chips
    acc = np.array([float(r["accuracy"]) for r in rows])
    np.testing.assert_allclose(acc * 40, np.round(acc * 40), atol=1e-4)   # counts out of 40
