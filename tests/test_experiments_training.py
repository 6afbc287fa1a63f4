"""The E-hwmodel and E-biased experiment scripts end to end on tiny configs, and their strict
configs."""
import csv
import json

import pytest

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


def test_hwmodel_main_tiny(tmp_path, model_cache, load_script):
    mod = load_script("e_hwmodel")
    cfg = tmp_path / "hw.yaml"
    cfg.write_text(HW_TINY.format(cache=model_cache))
    out = tmp_path / "out"
    assert mod.main([str(cfg), "--out", str(out)]) == 0
    for f in ("results.json", "results.csv", "e_hwmodel.png", "summary.md"):
        assert (out / f).stat().st_size > 0, f
    res = json.loads((out / "results.json").read_text())
    m = res["models"]["mlp"]
    for name in ("stuck", "ir"):
        e = m["nonidealities"][name]
        assert set(e["accuracy"]) == set(mod.VARIANTS)
        a = e["accuracy"]
        # R is the documented formula of the chip means
        r = (a["hwaware_corrected"]["mean"] - a["nonideal"]["mean"]) / \
            (m["software_accuracy"] - a["nonideal"]["mean"])
        assert e["R"]["hwaware_corrected"]["R"] == pytest.approx(r)
    # IR drop is deterministic and pre-distortion + calibration undo it: the corrected chip is
    # at least as close to the software accuracy as the raw one
    ir = m["nonidealities"]["ir"]["accuracy"]
    sw = m["software_accuracy"]
    assert abs(ir["corrected"]["mean"] - sw) <= abs(ir["nonideal"]["mean"] - sw) + 1e-9
    with open(out / "results.csv") as f:
        assert len(list(csv.DictReader(f))) == 2 * 6
    assert "Paper claim" in (out / "summary.md").read_text()


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
    e = c["strengths"]["6"]
    r = e["accuracy"]["biased p=1"]["mean"] / e["accuracy"]["conventional"]["mean"]
    assert e["ratio"]["biased p=1"]["ratio"] == pytest.approx(r)
    assert res["best_ratio"]["ratio"] >= r - 1e-12
    with open(out / "results.csv") as f:
        assert len(list(csv.DictReader(f))) == 2 * 3 * 6


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
