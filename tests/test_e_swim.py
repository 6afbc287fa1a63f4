"""The E-swim experiment script: its config, the exact law of write-verify against the library's
loop, the fast composition against selective write-verify, the bootstrap of 1st percentiles, and
a tiny run end to end."""
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from nvjax import data as data_mod
from nvjax import devices
from nvjax import programming as pr
from nvjax.config import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def swim(load_script):
    return load_script("e_swim")


def _write(path, text):
    path.write_text(text)
    return str(path)


# ------------------------------------------------------------------------------ config
def test_shipped_config(swim):
    cfg = swim.load_config(os.path.join(ROOT, "configs", "e_swim.yaml"))
    assert cfg.experiment == "e_swim" and cfg.num_chips >= 1000 and "mlp" in cfg.models
    assert {0.0, 0.1, 1.0} <= set(cfg.fractions) and cfg.claim_p == 0.1
    assert {"swim_gn", "magnitude", "random"} <= set(cfg.rankings)
    assert cfg.claim_ranking in ("swim_gn", "swim_abs_hessian")        # never the signed H_ii
    assert any(c.nonuniform != 1.0 for c in cfg.cells)
    # the claims' write-verify: ~100 cycles per σ = 0.1 cell (1/P(|N(0, σ²)| ≤ tol)), so that
    # 1/(p + (1 − p)/C) is within 10 % of the paper's 1/p at p = 0.1; the cap rarely binds
    q = 2 * stats.norm.cdf(cfg.tol / 0.1) - 1
    assert 90 <= 1 / q <= 110
    assert 1 / (0.1 + 0.9 * q) >= 9.0
    assert (1 - q) ** cfg.max_cycles < 1e-4
    # the sweep reaches write-verify as cheap as ~2.5 cycles per cell
    assert 1 / (2 * stats.norm.cdf(max(cfg.sweep_tols) / 0.1) - 1) < 3


@pytest.mark.parametrize("text,needle", [
    ("fraction: [0.1]\n", "unknown key 'fraction'"),
    ("cells: [{name: u, sigma: 0.1, nonuniform: 1.0, bits: 2}]\n", "unknown key 'cells[0].bits'"),
    ("fractions: [1.5]\n", "fractions"),
    ("fractions: [0.0, 0.1]\n", "fractions must include 1.0"),
    ("fractions: [0.0, 0.2, 1.0]\n", "claim_p"),
    ("rankings: [swim, hessian]\n", "rankings"),
    ("claim_ranking: magnitude\n", "claim_ranking"),
    ("rankings: [magnitude, random]\n", "claim_ranking"),
    ("tol: 0.0\n", "tol"),
    ("sweep_tols: [0.00125]\n", "sweep_tols"),
    ("max_loss: 2.0\n", "max_loss"),
    ("bootstrap: 0\n", "bootstrap"),
    ("method: fast\n", "method"),
])
def test_bad_configs_raise(swim, tmp_path, text, needle):
    with pytest.raises(ConfigError) as e:
        swim.load_config(_write(tmp_path / "bad.yaml", text))
    assert needle in str(e.value) and "bad.yaml" in str(e.value)


def test_arms_count(swim):
    cfg = swim.ESwimConfig(fractions=(0.0, 0.1, 0.3, 1.0), sweep_tols=(0.05, 0.02),
                           rankings=("swim_gn", "magnitude", "random"))
    unique, table = swim.arms(cfg)
    # one shot + a full write-verify per tolerance + 3 rankings × 2 p at tol, 1 ranking × 2 p
    # at each of the 2 sweep tolerances
    assert len(unique) == 1 + 3 + 3 * 2 + 2 * 2
    assert table[(0, "random", 0.0)] == table[(2, "swim_gn", 0.0)] == 0
    assert unique[table[(1, "swim_gn", 1.0)]] == (1, "-", 1.0)
    assert (1, "magnitude", 0.1) not in table
    assert len(set(table.values())) == len(unique)


# ------------------------------------------------------------------------------ encoding
def test_weight_sigma_closed_form(swim):
    """Uniform σ: σ_W = σ·(w_step/Δ)·sqrt(2·Σ_s 4^(sK)) for every weight (both stacks noisy)."""
    cfg = swim.ESwimConfig()
    device = swim.make_device(swim.CellVariant("u", 0.1), cfg.slice_bits)
    w = jax.random.normal(jax.random.key(0), (5, 7))
    gt, w_step = swim.encode(w, cfg, device)
    assert gt.shape == (2, 4, 5, 7)
    sig = swim.weight_sigma(gt, w_step, cfg, device)
    lvl = 1.0 / 3.0
    expect = 0.1 * float(w_step) / lvl * np.sqrt(2 * sum(4.0 ** (2 * s) for s in range(4)))
    np.testing.assert_allclose(np.asarray(sig), expect, rtol=1e-5)
    # σ_W relative to max|W| for one stack matches DESIGN.md's closed form 0.7776·σ (M=8, K=2)
    one_stack = expect / np.sqrt(2) / float(jnp.max(jnp.abs(w)))
    assert one_stack == pytest.approx(0.7776 * 0.1, rel=1e-3)
    # decode of the noiseless targets is the 8-bit quantized weight
    wq = swim.decode(gt, w_step, cfg, device)
    assert float(jnp.max(jnp.abs(wq - w))) <= float(w_step) / 2 + 1e-6


# ------------------------------------------------------------------------------ write-verify
def test_write_verify_law_matches_library_loop(swim):
    """Cycles, converged fraction and error law of write_verify_law = pr.write_verify's (two
    independent samples; KS at a fixed seed), with a cap that binds for the σ = 0.2 levels."""
    dev = devices.levels(bits=2, sigma=0.05, nonuniform=4.0)
    gt = jnp.tile(jnp.array([0.0, 1 / 3, 2 / 3, 1.0], jnp.float32), 20000)
    tol, cap = 0.02, 12
    ref = pr.write_verify(jax.random.key(1), dev, gt, tol=tol, max_cycles=cap)
    shot = pr.one_shot(jax.random.key(2), dev, gt).g
    g, c = swim.write_verify_law(jax.random.key(3), dev, gt, shot, (tol, 0.05), cap)
    assert g.shape == (2,) + gt.shape and c.dtype == jnp.int32
    for lvl, sigma in enumerate((0.05, 0.2, 0.2, 0.05)):
        sl = slice(lvl, None, 4)
        e_ref, e_law = np.asarray(ref.g - gt)[sl], np.asarray(g[0] - gt)[sl]
        c_ref, c_law = np.asarray(ref.cycles)[sl], np.asarray(c[0])[sl]
        q = 2 * stats.norm.cdf(tol / sigma) - 1
        mean_c = (1 - (1 - q) ** cap) / q                        # truncated geometric
        assert c_law.mean() == pytest.approx(mean_c, rel=0.03)
        assert c_ref.mean() == pytest.approx(mean_c, rel=0.03)
        assert np.mean(np.abs(e_law) <= tol) == pytest.approx(1 - (1 - q) ** cap, abs=0.01)
        assert stats.ks_2samp(e_ref, e_law).pvalue > 1e-3
        assert stats.ks_2samp(c_ref, c_law).pvalue > 1e-3
        assert c_law.min() >= 1 and c_law.max() <= cap


def test_write_verify_law_keeps_a_good_first_draw(swim):
    dev = devices.levels(bits=2, sigma=0.1)
    gt = jnp.full((5000,), 1 / 3, jnp.float32)
    shot = pr.one_shot(jax.random.key(0), dev, gt).g
    g, c = swim.write_verify_law(jax.random.key(1), dev, gt, shot, (0.05,), 1000)
    good = np.abs(np.asarray(shot - gt)) <= 0.05
    assert 0.3 < good.mean() < 0.5                             # P(|N(0, 0.1²)| ≤ 0.05) = 0.38
    np.testing.assert_array_equal(np.asarray(g[0])[good], np.asarray(shot)[good])
    np.testing.assert_array_equal(np.asarray(c[0])[good], 1)
    assert np.all(np.asarray(c[0])[~good] >= 2)
    assert np.all(np.abs(np.asarray(g[0] - gt)) <= 0.05 + 1e-6)   # the cap (1000) never binds
    # max_cycles = 1 is one shot
    g1, c1 = swim.write_verify_law(jax.random.key(1), dev, gt, shot, (0.05,), 1)
    np.testing.assert_array_equal(np.asarray(g1[0]), np.asarray(shot))
    np.testing.assert_array_equal(np.asarray(c1[0]), 1)


def test_expected_cycles_closed_form(swim):
    assert swim.expected_cycles(0.1, 0.1 * 1.959964) == pytest.approx(1 / 0.95, rel=1e-5)
    assert swim.expected_cycles(0.1, 0.02, 1) == pytest.approx(1.0)
    assert swim.expected_cycles(0.0, 0.01) == 1.0


@pytest.mark.slow
def test_compose_equals_direct_selective_write_verify(swim, trained_model):
    """The fast path (where(mask, full, one shot)) is selective_write_verify bit for bit."""
    cfg = swim.ESwimConfig(models=("mlp",), fractions=(0.0, 0.1, 1.0), tol=0.03,
                           sweep_tols=(0.05,), rankings=("swim_gn", "random"), max_cycles=4,
                           num_chips=1)
    model, params = trained_model("mlp", epochs=3)
    ds = data_mod.digits(seed=0)
    device = swim.make_device(cfg.cells[1], cfg.slice_bits)
    w_k = swim.kernels(params)
    targets = {p: swim.encode(w, cfg, device) for p, w in w_k.items()}
    names = ["/".join(p) for p in w_k]
    scores = {"swim_gn": {n: jnp.abs(w_k[p]) + 0.0 for n, p in zip(names, w_k)}}
    masks = swim.fixed_masks(cfg, scores, names)
    outs = {}
    for method in ("compose", "direct"):
        fn = swim.make_instance(model, params, cfg, targets, ds.x_test[:20], ds.y_test[:20],
                                method)
        outs[method] = fn(jax.random.key(5), device, masks)
    for k in ("correct", "cycles"):
        np.testing.assert_array_equal(np.asarray(outs["compose"][k]),
                                      np.asarray(outs["direct"][k]))


# ------------------------------------------------------------------------------ statistics
def test_percentile_bootstrap(swim):
    # value: the 1st percentile of per-chip accuracies, as numpy computes it
    rng = np.random.default_rng(0)
    m = (rng.random((300, 50)) < rng.random((300, 1))).astype(np.uint8)
    vals, res = swim.percentile_bootstrap([m, m[::-1]], 1.0, 200, 0)
    assert vals[0] == pytest.approx(np.percentile(m.mean(1), 1.0))
    assert vals[1] == pytest.approx(vals[0]) and res.shape == (2, 200)
    # identical chips: only the images vary, and every chip's resampled accuracy is the same
    # binomial mean over I images: std sqrt(a(1 − a)/I)
    row = (np.arange(400) % 5 != 0).astype(np.uint8)                # a = 0.8
    same = np.tile(row, (30, 1))
    _, r = swim.percentile_bootstrap([same], 1.0, 2000, 1)
    assert r[0].std() == pytest.approx(math.sqrt(0.8 * 0.2 / 400), rel=0.1)
    assert r[0].mean() == pytest.approx(0.8, abs=0.003)


def test_first_within(swim):
    gaps = np.array([[0.05, 0.0, 0.02], [0.009, 0.02, 0.02], [0.0, 0.0, 0.0]])
    np.testing.assert_array_equal(swim.first_within(gaps, 0.01), [1, 0, 2])


# ------------------------------------------------------------------------------ end to end
SWIM_TINY = """\
experiment: e_swim
seed: 0
models: [mlp]
model_epochs: 3
model_cache_dir: {cache}
cells:
  - {{name: uniform, sigma: 0.1}}
  - {{name: nonuniform, sigma: 0.05, nonuniform: 4.0}}
tol: 0.01
sweep_tols: [0.05]
max_cycles: 200
fractions: [0.0, 0.1, 1.0]
rankings: [swim_gn, magnitude, random]
hessian_probes: 4
hessian_samples: 64
num_chips: 4
chunk_size: 2
eval_samples: 40
bootstrap: 50
progress: false
"""


@pytest.mark.slow
def test_main_tiny(swim, tmp_path, model_cache):
    cfg = _write(tmp_path / "sw.yaml", SWIM_TINY.format(cache=model_cache))
    out = tmp_path / "out"
    assert swim.main([cfg, "--out", str(out)]) == 0
    for f in ("results.json", "results.csv", "e_swim.png", "summary.md"):
        assert (out / f).stat().st_size > 0, f
    res = json.loads((out / "results.json").read_text())
    assert res["claims"] and all(c["verdict"] in ("reproduced", "partly", "not reproduced")
                                 for c in res["claims"])
    assert "## Claims" in (out / "summary.md").read_text()
    m = res["models"]["mlp"]
    n_cells = m["num_cells"]
    assert n_cells == 8 * m["num_weights"]
    for name, v in m["variants"].items():
        pts = {(q["tol"], q["ranking"], q["p"]): q for q in v["points"]}
        assert len(pts) == 3 * 2 + 1 * 2                       # (rankings × p > 0) + sweep
        for (tol, r, p), q in pts.items():
            a = q["accuracy"]["mean"]
            assert abs(a * 160 - round(a * 160)) < 1e-6          # mean of 4 chips × 40 images
            if p == 1.0:
                assert q["saving"]["value"] == pytest.approx(1.0)
                assert q["gap_mean"]["value"] == 0.0
        # full write-verify's cycles per cell ≈ 1/P(|σξ| ≤ tol), averaged over the cells' σ
        for s in v["sweep"]:
            assert 1.0 < s["cycles_per_cell"] < 200
        # a random 10 % of the weights verified: (0.9·N + 0.1·Σ full) / Σ full of the cost
        c = next(s["cycles_per_cell"] for s in v["sweep"] if s["tol"] == 0.01)
        assert pts[(0.01, "random", 0.1)]["norm_cycles_mean"] == pytest.approx(0.9 / c + 0.1,
                                                                              rel=0.1)
    # --from-results rewrites the report without simulating
    (out / "summary.md").unlink()
    assert swim.main([cfg, "--out", str(out), "--from-results"]) == 0
    assert (out / "summary.md").stat().st_size > 0
