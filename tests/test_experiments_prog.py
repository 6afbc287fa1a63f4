"""The E-rowprog and E-swim experiment scripts: end to end on tiny configs, strict configs, and
SWIM's fast composition equal to selective write-verify mask by mask."""
import csv
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nvjax import data as data_mod
from nvjax import devices
from nvjax import programming as pr
from nvjax.config import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def rowprog(load_script):
    return load_script("e_rowprog")


@pytest.fixture(scope="module")
def swim(load_script):
    return load_script("e_swim")


def _write(path, text):
    path.write_text(text)
    return str(path)


# ------------------------------------------------------------------------------ strict configs
def test_shipped_configs_load_strictly(rowprog, swim):
    c1 = rowprog.load_config(os.path.join(ROOT, "configs", "e_rowprog.yaml"))
    assert isinstance(c1, rowprog.ERowprogConfig) and c1.experiment == "e_rowprog"
    assert c1.accuracy.num_chips >= 16 and set(c1.accuracy.models) == {"mlp", "lstm"}
    assert {"gaussian", "uniform", "laplace", "mlp", "lstm"} <= set(c1.distributions)
    assert len(c1.variability) >= 2
    c2 = swim.load_config(os.path.join(ROOT, "configs", "e_swim.yaml"))
    assert isinstance(c2, swim.ESwimConfig) and c2.experiment == "e_swim"
    assert c2.num_chips >= 1000 and "mlp" in c2.models
    assert set(c2.fractions) >= {0.0, 0.01, 0.03, 0.1, 0.3, 1.0}
    assert set(c2.rankings) == {"swim", "magnitude", "random"}
    assert any(c.nonuniform != 1.0 for c in c2.cells) and any(c.nonuniform == 1.0
                                                              for c in c2.cells)


@pytest.mark.parametrize("script,text,needle", [
    ("e_rowprog", "num_chip: 3\n", "unknown key 'num_chip'"),
    ("e_rowprog", "program: {n_fin: 3}\n", "unknown key 'program.n_fin'"),
    ("e_rowprog", "variability: [{name: a, sigma_gain: 0.1, sigma_gmax: 1.0, x: 1}]\n",
     "unknown key 'variability[0].x'"),
    ("e_rowprog", "num_chips: '8'\n", "key 'num_chips': expected int"),
    ("e_rowprog", "distributions: [cauchy]\n", "distributions"),
    ("e_rowprog", "accuracy: {variability: nope}\n", "accuracy.variability"),
    ("e_rowprog", "program: {eps: -1.0}\n", "eps"),
    ("e_swim", "fraction: [0.1]\n", "unknown key 'fraction'"),
    ("e_swim", "cells: [{name: u, sigma: 0.1, nonuniform: 1.0, bits: 2}]\n",
     "unknown key 'cells[0].bits'"),
    ("e_swim", "fractions: [1.5]\n", "fractions"),
    ("e_swim", "rankings: [swim, hessian]\n", "rankings"),
    ("e_swim", "method: fast\n", "method"),
])
def test_bad_configs_raise(rowprog, swim, tmp_path, script, text, needle):
    mod = rowprog if script == "e_rowprog" else swim
    path = _write(tmp_path / "bad.yaml", text)
    with pytest.raises(ConfigError) as e:
        mod.load_config(path)
    assert needle in str(e.value) and "bad.yaml" in str(e.value)


# ------------------------------------------------------------------------------ E-rowprog
ROWPROG_TINY = """\
experiment: e_rowprog
seed: 0
num_chips: 2
rows: 8
cols: 32
distributions: [gaussian, mlp]
variability:
  - {{name: none, sigma_gain: 0.0, sigma_gmax: 0.0}}
  - {{name: default, sigma_gain: 0.1, sigma_gmax: 1.0}}
budget_scales: [0.2, 1.0]
eps_values: [0.25, 0.6]
pareto_budget_scales: [0.5, 1.0]
pareto_step_scales: [1.0, 2.0]
accuracy: {{models: [mlp], budget_scales: [0.1, 1.0], num_chips: 2, eval_samples: 60}}
model_epochs: 3
model_cache_dir: {cache}
progress: false
"""


@pytest.mark.slow
def test_rowprog_main_tiny(rowprog, tmp_path, model_cache):
    cfg = _write(tmp_path / "rp.yaml", ROWPROG_TINY.format(cache=model_cache))
    out = tmp_path / "out"
    assert rowprog.main([cfg, "--out", str(out)]) == 0
    for f in ("results.json", "results.csv", "e_rowprog.png", "summary.md"):
        assert (out / f).stat().st_size > 0, f
    res = json.loads((out / "results.json").read_text())
    assert set(res["budget"]) == {"gaussian", "mlp"}
    for dist in ("gaussian", "mlp"):
        for var in ("none", "default"):
            pts = res["budget"][dist][var]
            assert [p["budget_scale"] for p in pts] == [0.2, 1.0]
            # same chips at every budget: a larger budget never fails more (row_program's
            # failed set shrinks with later-phase budgets; all three grow here)
            assert pts[1]["pfail"] <= pts[0]["pfail"] + 0.05
            assert 0.0 <= pts[1]["pfail"] < 0.1
        eps = res["eps"][dist]
        assert eps[1]["pfail"] <= eps[0]["pfail"]              # looser ε, fewer failures
        front = res["pareto"][dist]["front"]
        assert 1 <= len(front) <= 4
        times = [p["mean_row_time"] for p in front]
        assert times == sorted(times)
    acc = res["accuracy"]["mlp"]["points"]
    assert len(acc) == 2 and acc[0]["pfail"] > acc[1]["pfail"]
    assert all(0.0 <= p["accuracy"]["mean"] <= 1.0 for p in acc)
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    # budget 2 dists × 2 var × 2 budgets, eps 2 × 2, pareto 2 × 4, accuracy 2; × 2 chips
    assert len(rows) == 2 * (8 + 4 + 8 + 2)
    assert {r["sweep"] for r in rows} == {"budget", "eps", "pareto", "accuracy"}
    assert all(r["accuracy"] != "" for r in rows if r["sweep"] == "accuracy")


@pytest.mark.slow
def test_rowprog_stack_layers_and_weights_map_back(rowprog):
    """Stacked layers program like the whole; padding is masked; weights come back in units."""
    # stacked shape [8, 32] and 2 chips, as the tiny config's Gaussian set: compiled once
    w1 = jax.random.normal(jax.random.key(0), (5, 32))
    w2 = 0.1 * jax.random.normal(jax.random.key(1), (3, 20))
    target, valid, spans = rowprog.stack_layers([("a", w1), ("b", w2)], 20.0)
    assert target.shape == (8, 32) and int(valid.sum()) == 160 + 60
    assert float(jnp.max(jnp.abs(target[:5]))) == pytest.approx(20.0)
    assert float(jnp.max(jnp.abs(target[5:, :20]))) == pytest.approx(20.0)
    assert np.all(np.asarray(target[5:, 20:]) == 0)
    keys = jax.random.split(jax.random.key(2), 2)
    cfg = pr.RowProgramConfig(n_coarse=60, n_correct=20, n_fine=60)
    stats, weights = rowprog.program_chips(keys, devices.pulse_pcm(), [("a", w1), ("b", w2)], cfg,
                                           20.0)
    assert weights[0].shape == (2, 5, 32) and weights[1].shape == (2, 3, 20)
    assert stats["pfail"].shape == (2,)
    # a weight counts as a success iff its mapped-back error is within ε/κ (pooled over layers)
    ok = sum(np.sum(np.abs(np.asarray(wb) - np.asarray(w)[None])
                    <= cfg.eps / float(kappa) * (1 + 1e-4), axis=(1, 2))
             for w, wb, (_, _, _, kappa) in zip((w1, w2), weights, spans))
    np.testing.assert_allclose(ok / 220.0, 1.0 - stats["pfail"], atol=1.5 / 220)
    assert np.all(stats["max_row_time"] >= stats["mean_row_time"])
    assert np.all(stats["mean_pulses"] > 0)


# ------------------------------------------------------------------------------ E-swim
SWIM_TINY = """\
experiment: e_swim
seed: 0
models: [mlp]
model_epochs: 3
model_cache_dir: {cache}
cells:
  - {{name: uniform, sigma: 0.1}}
  - {{name: nonuniform, sigma: 0.05, nonuniform: 4.0}}
tol: 0.03
max_cycles: 4
fractions: [0.0, 0.1, 1.0]
hessian_probes: 4
hessian_samples: 64
num_chips: 3
chunk_size: 2
eval_samples: 40
progress: false
"""


@pytest.mark.slow
def test_swim_main_tiny(swim, tmp_path, model_cache):
    cfg = _write(tmp_path / "sw.yaml", SWIM_TINY.format(cache=model_cache))
    out = tmp_path / "out"
    assert swim.main([cfg, "--out", str(out)]) == 0
    for f in ("results.json", "results.csv", "e_swim.png", "summary.md"):
        assert (out / f).stat().st_size > 0, f
    res = json.loads((out / "results.json").read_text())
    m = res["models"]["mlp"]
    assert set(m["variants"]) == {"uniform", "nonuniform"}
    for v in m["variants"].values():
        pts = {(q["ranking"], q["p"]): q for q in v["points"]}
        assert len(pts) == 3 * 3
        for r in ("swim", "magnitude", "random"):
            assert pts[(r, 1.0)]["norm_cycles_mean"] == pytest.approx(1.0)
            # p = 0 and p = 1 do not depend on the ranking
            assert pts[(r, 0.0)]["accuracy"] == pts[("swim", 0.0)]["accuracy"]
            assert pts[(r, 1.0)]["accuracy"] == pts[("swim", 1.0)]["accuracy"]
            c0, c1 = pts[(r, 0.0)]["norm_cycles_mean"], pts[(r, 0.1)]["norm_cycles_mean"]
            # one shot is 1 cycle per cell, full write-verify 1..max_cycles (4)
            assert 1 / 4 <= c0 <= 1.0 and c0 < c1 < 1.0
        # a random 10 % of the weights get full write-verify, the others one shot: in expectation
        # (1 − p)·c(0) + p·c(1) of the full cost (cycles independent of a random mask)
        c0 = pts[("random", 0.0)]["norm_cycles_mean"]
        assert pts[("random", 0.1)]["norm_cycles_mean"] == pytest.approx(0.9 * c0 + 0.1, abs=0.02)
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 * 9 * 3
    acc = np.array([float(r["accuracy"]) for r in rows])
    np.testing.assert_allclose(acc * 40, np.round(acc * 40), atol=1e-4)   # counts out of 40


@pytest.mark.slow
def test_swim_compose_equals_selective_write_verify(swim, trained_model):
    """The fast path (where(mask, full, one shot)) is selective_write_verify bit for bit."""
    cfg = swim.ESwimConfig(models=("mlp",), fractions=(0.05,), rankings=("swim", "random"),
                           max_cycles=4, tol=0.03, num_chips=1)
    model, params = trained_model("mlp", epochs=3)
    ds = data_mod.digits(seed=0)
    device = swim.make_device(cfg.cells[1], cfg.slice_bits)
    w_k = swim.kernels(params)
    targets = {p: swim.encode(w, cfg, device) for p, w in w_k.items()}
    names = ["/".join(p) for p in w_k]
    scores = {n: jnp.abs(w_k[p]) + 0.0 for n, p in zip(names, w_k)}
    outs = {}
    for method in ("compose", "direct"):
        fn = swim.make_instance(model, params, cfg, targets, ds.x_test[:20], ds.y_test[:20],
                                method)
        outs[method] = fn(jax.random.key(5), device, scores, scores)   # eager: compiles less
    for k in ("accuracy", "norm_cycles"):
        np.testing.assert_array_equal(np.asarray(outs["compose"][k]),
                                      np.asarray(outs["direct"][k]))
    # and a mask of the composition equals selective_write_verify directly
    gt = targets[next(iter(targets))][0]
    mask = jnp.broadcast_to(jax.random.bernoulli(jax.random.key(1), 0.3, gt.shape[2:]), gt.shape)
    k = jax.random.key(9)
    full = pr.write_verify(k, device, gt, tol=0.03, max_cycles=4)
    shot = pr.one_shot(k, device, gt)
    sel = pr.selective_write_verify(k, device, gt, mask, tol=0.03, max_cycles=4)
    np.testing.assert_array_equal(np.asarray(jnp.where(mask, full.g, shot.g)), np.asarray(sel.g))
    np.testing.assert_array_equal(np.asarray(jnp.where(mask, full.cycles, 1)),
                                  np.asarray(sel.cycles))


@pytest.mark.slow
def test_swim_weight_sigma_closed_form(swim):
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
