"""The E-rowprog experiment script: end to end on tiny configs and strict configs (E-swim's
tests are in test_e_swim.py)."""
import csv
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nvjax import devices
from nvjax import programming as pr
from nvjax.config import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def rowprog(load_script):
    return load_script("e_rowprog")


def _write(path, text):
    path.write_text(text)
    return str(path)


# ------------------------------------------------------------------------------ strict configs
def test_shipped_configs_load_strictly(rowprog):
    c1 = rowprog.load_config(os.path.join(ROOT, "configs", "e_rowprog.yaml"))
    assert isinstance(c1, rowprog.ERowprogConfig) and c1.experiment == "e_rowprog"
    assert c1.accuracy.num_chips >= 16 and set(c1.accuracy.models) == {"mlp", "lstm"}
    assert {"gaussian", "uniform", "laplace", "mlp", "lstm"} <= set(c1.distributions)
    assert len(c1.variability) >= 2


@pytest.mark.parametrize("script,text,needle", [
    ("e_rowprog", "num_chip: 3\n", "unknown key 'num_chip'"),
    ("e_rowprog", "program: {n_fin: 3}\n", "unknown key 'program.n_fin'"),
    ("e_rowprog", "variability: [{name: a, sigma_gain: 0.1, sigma_gmax: 1.0, x: 1}]\n",
     "unknown key 'variability[0].x'"),
    ("e_rowprog", "num_chips: '8'\n", "key 'num_chips': expected int"),
    ("e_rowprog", "distributions: [cauchy]\n", "distributions"),
    ("e_rowprog", "accuracy: {variability: nope}\n", "accuracy.variability"),
    ("e_rowprog", "program: {eps: -1.0}\n", "eps"),
])
def test_bad_configs_raise(rowprog, tmp_path, script, text, needle):
    mod = rowprog
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
claims: {{seeds: [1, 2], num_chips: 2, n_boot: 50}}
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
    # budget 2 dists × 2 var × 2 budgets, eps 2 × 2, pareto 2 × 4, seeds 2 × 2, accuracy 2;
    # × 2 chips
    assert len(rows) == 2 * (8 + 4 + 8 + 4 + 2)
    assert {r["sweep"] for r in rows} == {"budget", "eps", "pareto", "seeds", "accuracy"}
    # claim rows: budget, 98–99 %, variability, MLP accuracy (one synthetic set: no distribution
    # row; no budget scale 0.5: no trade-off row)
    assert len(res["claims"]) == 4 and "## Claims" in (out / "summary.md").read_text()
    for c in res["claims"]:
        assert c["verdict"] in ("reproduced", "partly", "not reproduced")
        assert c["ci"] is None or c["ci"][0] <= c["ci"][1], c
    for dist in ("gaussian", "mlp"):
        s = res["seeds"][dist]
        assert len(s["pfail_per_seed"]) == 2 and s["bounds"][0] <= s["pfail"] <= s["bounds"][1]
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
