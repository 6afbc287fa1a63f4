"""E-hwmodel: the k-fold split over the digits, R and its bootstrap over chips and images on
cases whose answer is known (closed forms, hand-computed cases), the verdict rule, the strict
config, and the script end to end on a tiny config."""
import csv
import json
import os

import jax
import numpy as np
import pytest

from nvjax import data as data_mod
from nvjax import models as models_mod
from nvjax.config import ConfigError

HW_TINY = """
experiment: e_hwmodel
models: [mlp]
model_epochs: 30
folds: 2
num_images: 300
tile_rows: 32
tile_cols: 32
nonidealities:
  - {name: ir, group: analog, evidence: false, device: ideal, ir_drop: first_order, r_wire: 400.0}
hwaware: {epochs: 1, batch_size: 64, calib_samples: 16, alone: false}
correction: {tol: 0.05, max_rounds: 2, ir_predistort: 4}
calib_samples: 32
num_chips: 4
chunk_size: 4
bootstrap: 50
min_loss_points: 0.5
progress: false
"""


def test_digit_folds_stratified_and_complete(load_script):
    mod = load_script("e_hwmodel")
    x, y, fold = mod.digit_folds(4, 0)
    assert x.shape == (1797, 64) and y.shape == (1797,)
    sizes = np.bincount(fold, minlength=4)
    assert sizes.sum() == 1797 and sizes.max() - sizes.min() <= 1      # 450, 449, 449, 449
    for c in range(10):                                                # each class dealt evenly
        per = np.bincount(fold[y == c], minlength=4)
        assert per.max() - per.min() <= 1
    # the same images as the library's digits (a permutation of them)
    ds = data_mod.digits(seed=0, flatten=True)
    assert np.bincount(y).tolist() == np.bincount(np.concatenate([ds.y_train, ds.y_test])).tolist()


def test_folds_train_never_sees_its_test_images(load_script):
    mod = load_script("e_hwmodel")
    cfg = mod.EHwmodelConfig(folds=3, num_images=300, models=("lenet",),
                             nonidealities=(mod.NonIdeality(name="a", group="analog"),))
    f = mod.Folds("lenet", cfg)
    assert f.x.shape == (300, 8, 8, 1)
    seen = np.zeros(300, int)
    for k, test in enumerate(f.test_idx):
        assert not set(test) & set(f.train_idx[k])
        seen[test] += 1
    assert (seen == 1).all()                                           # every image tested once
    # scatter puts fold k's column j back at image test_idx[k][j] and drops the padding
    per_fold = np.stack([np.where(np.arange(f.test_pad.shape[1]) < len(t), t, -1)
                         for t in f.test_idx])
    np.testing.assert_array_equal(f.scatter(per_fold), np.arange(300))


def test_r_hand_computed_and_paired(load_script):
    mod = load_script("e_hwmodel")
    rng = np.random.default_rng(0)
    sw = np.ones(40)
    non = (rng.random((5, 40)) < 0.6).astype(float)
    # R = (mit - non)/(sw - non) on the means
    mit = np.where(rng.random((5, 40)) < 0.5, 1.0, non)
    r = mod.r_stats(sw, non, mit, 200, 0)
    assert r["R"] == pytest.approx((mit.mean() - non.mean()) / (1 - non.mean()))
    # full recovery: R = 1 in every paired resample; no gain: R = 0 in every resample
    full = mod.r_stats(sw, non, np.ones_like(non), 200, 0)
    assert full["R"] == 1.0 and full["ci95"] == pytest.approx([1.0, 1.0]) and full["ci_includes_1"]
    none = mod.r_stats(sw, non, non, 200, 0)
    assert none["R"] == 0.0 and none["ci95"] == pytest.approx([0.0, 0.0])
    assert not none["ci_includes_1"]


def _rows(n_img, correct_upto):
    """A 0/1 row of ``n_img`` images, correct on the first ``correct_upto``."""
    return (np.arange(n_img) < correct_upto).astype(float)


def test_r_uses_the_stronger_software_reference(load_script):
    """Hand-computed: 30 images; plain software right on images 0-23 (0.8), the fine-tuned
    model's own software on 0-26 (0.9), the non-ideal chips on 0-14 (chips 0, 1) or 0-8
    (chips 2, 3): 0.4 on average; the mitigated chips right on 0-23 (0.8).
    Against plain software R = (0.8 - 0.4)/(0.8 - 0.4) = 1; against the stronger reference
    R = (0.8 - 0.4)/(0.9 - 0.4) = 0.8."""
    mod = load_script("e_hwmodel")
    sw, ft = _rows(30, 24), _rows(30, 27)
    non = np.stack([_rows(30, 15), _rows(30, 15), _rows(30, 9), _rows(30, 9)])
    mit = np.tile(_rows(30, 24), (4, 1))
    assert mod.r_stats(sw, non, mit, 200, 0)["R"] == pytest.approx(1.0)
    assert mod.r_stats(sw, non, mit, 200, 0, [ft])["R"] == pytest.approx(0.8)
    # the reference is the stronger whichever order the software arms come in
    assert mod.r_stats(ft, non, mit, 200, 0, [sw])["R"] == pytest.approx(0.8)
    # a mitigated chip that equals the fine-tuned model's software on every image: R = 1 in
    # every paired resample (images 24-26 always count for both), where plain software gives
    # (0.9 - 0.4)/(0.8 - 0.4) = 1.25
    same = np.tile(ft, (4, 1))
    full = mod.r_stats(sw, non, same, 200, 0, [ft])
    assert full["R"] == pytest.approx(1.0) and full["ci95"] == pytest.approx([1.0, 1.0])
    assert mod.r_stats(sw, non, same, 200, 0)["R"] == pytest.approx(1.25)
    # a weaker fine-tuned model (right on 0-19 only, a subset of the software's images) is
    # below the software in every resample: R and its CI are those of plain software
    weak = mod.r_stats(sw, non, mit, 200, 0, [_rows(30, 20)])
    plain = mod.r_stats(sw, non, mit, 200, 0)
    assert weak["R"] == pytest.approx(1.0)
    assert weak["ci95"] == pytest.approx(plain["ci95"])
    # mean over cells with the same rule: cells R = 0.8 (stronger reference) and 1.25 (plain)
    m = mod.mean_r_stats([([sw, ft], non, mit), (sw, non, same)], 200, 0)
    assert m["R"] == pytest.approx((0.8 + 1.25) / 2)


def test_accuracy_ci_includes_the_images_sampling_error(load_script):
    """Identical chips: the spread is the test set's alone, sqrt(p(1-p)/N) (binomial)."""
    mod = load_script("e_hwmodel")
    rng = np.random.default_rng(1)
    n_img = 1000
    row = (rng.random(n_img) < 0.9).astype(float)
    s = mod.accuracy_stats(np.tile(row, (8, 1)), 2000, 0)
    p = row.mean()
    assert s["mean"] == pytest.approx(p)
    assert s["bootstrap_std"] == pytest.approx(np.sqrt(p * (1 - p) / n_img), rel=0.08)
    assert s["chip_std"] == 0.0


def test_mean_r_is_the_mean_of_cell_rs(load_script):
    mod = load_script("e_hwmodel")
    rng = np.random.default_rng(2)
    sw = np.ones(50)
    non = (rng.random((6, 50)) < 0.5).astype(float)
    cells = [(sw, non, np.ones_like(non)), (sw, non, non)]              # R = 1 and R = 0
    m = mod.mean_r_stats(cells, 300, 0)
    assert m["R"] == pytest.approx(0.5) and m["cells"] == 2
    assert m["ci95"] == pytest.approx([0.5, 0.5])                      # exact in every resample
    assert np.isnan(mod.mean_r_stats([], 10, 0)["R"])


def test_verdict_rule(load_script):
    mod = load_script("e_hwmodel")

    def stat(r, lo, hi, above):
        return {"R": r, "ci95": [lo, hi], "cells_ci_above_0.9": above}
    assert mod.verdict(stat(0.93, 0.91, 0.95, 3), 3) == "reproduced"
    assert mod.verdict(stat(0.85, 0.8, 0.91, 2), 3) == "partly"         # one cell falls short
    assert mod.verdict(stat(0.7, 0.65, 0.75, 1), 3) == "partly"
    assert mod.verdict(stat(0.3, 0.2, 0.4, 0), 3) == "not reproduced"


@pytest.mark.parametrize("text,needle", [
    ("nonidealities: [{name: a, device: ideal}]", "group"),
    ("nonidealities: [{name: a, group: digital}]", "group"),
    ("folds: 1\nnonidealities: [{name: a, group: analog}]", "folds"),
    ("num_images: 15\nnonidealities: [{name: a, group: analog}]", "num_images"),
    ("min_loss_points: -1\nnonidealities: [{name: a, group: analog}]", "min_loss_points"),
    ("hwaware: {epochs: 0}\nnonidealities: [{name: a, group: analog}]", "epochs"),
    ("nonidealities: [{name: a, group: analog, p_stuck: 2}]", "p_stuck"),
])
def test_bad_config_names_the_key(tmp_path, text, needle, load_script):
    mod = load_script("e_hwmodel")
    p = tmp_path / "bad.yaml"
    p.write_text("experiment: e_hwmodel\n" + text + "\n")
    with pytest.raises(ConfigError, match=needle):
        mod.load_config(str(p))


def test_shipped_config_loads(load_script):
    mod = load_script("e_hwmodel")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cfg = mod.load_config(os.path.join(root, "configs", "e_hwmodel.yaml"))
    assert cfg.folds == 4 and cfg.num_images is None
    groups = {n.name: (n.group, n.evidence) for n in cfg.nonidealities}
    assert groups["ir-drop"] == ("analog", False)
    assert groups["levels-1bit"][0] == groups["adc-4bit"][0] == "quantization"
    # HW-aware training alone runs in the quantization cells only
    assert [n.name for n in cfg.nonidealities if mod.runs_alone(cfg, n)] == \
        ["levels-1bit", "adc-4bit"]


def test_variants_per_cell(load_script):
    mod = load_script("e_hwmodel")
    a = mod.NonIdeality(name="a", group="analog")
    q = mod.NonIdeality(name="q", group="quantization", hwaware_alone=True)
    off = mod.NonIdeality(name="o", group="analog", hwaware_alone=False)
    cfg = mod.EHwmodelConfig(nonidealities=(a, q), hwaware=mod.HWAwareOptions(alone=False))
    assert mod.variants(cfg, a) == ("nonideal", "corrected", "hwaware_corrected")
    assert mod.variants(cfg, q) == ("nonideal", "corrected", "hwaware", "hwaware_corrected")
    assert mod.variants(cfg) == mod.variants(cfg, q)                   # measured in some cell
    cfg_on = mod.EHwmodelConfig(nonidealities=(a, off), hwaware=mod.HWAwareOptions(alone=True))
    assert mod.runs_alone(cfg_on, a) and not mod.runs_alone(cfg_on, off)


@pytest.mark.slow
def test_hwmodel_main_tiny(tmp_path, load_script):
    mod = load_script("e_hwmodel")
    cfg = tmp_path / "hw.yaml"
    cfg.write_text(HW_TINY)
    out = tmp_path / "out"
    assert mod.main([str(cfg), "--out", str(out)]) == 0
    for f in ("results.json", "results.csv", "e_hwmodel.png", "summary.md"):
        assert (out / f).stat().st_size > 0, f
    res = json.loads((out / "results.json").read_text())
    m = res["models"]["mlp"]
    assert m["images"] == 300
    assert m["software_accuracy"] > 0.5                  # trained per fold, well above chance
    e = m["nonidealities"]["ir"]
    # without hwaware.alone: no HW-aware-alone variant
    assert set(e["accuracy"]) == {"nonideal", "corrected", "hwaware_corrected"}
    assert set(e["R"]) == {"corrected", "hwaware_corrected"}
    sw = m["software_accuracy"]
    ir = e["accuracy"]
    # IR drop is deterministic and pre-distortion + calibration undo it
    assert abs(ir["corrected"]["mean"] - sw) <= abs(ir["nonideal"]["mean"] - sw) + 1e-9
    assert [c["claim"] for c in res["claims"]] == ["... and to IR drop"]
    assert [c["kind"] for c in res["claims"]] == ["construction"]     # reported, not evidence
    ref = e["reference"]
    assert ref["accuracy"] == max(ref["software"], *ref["finetuned"].values())
    assert "## Claims" in (out / "summary.md").read_text()
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4
    accs = np.array([[float(r[f"acc_{v}"]) for v in e["accuracy"]] for r in rows])
    np.testing.assert_allclose(accs * 300, np.round(accs * 300), atol=1e-3)   # counts of 300


@pytest.mark.slow
def test_instance_variants_share_the_chip_draw(load_script):
    """Common random numbers: with ``hwaware.alone`` the raw path is vmapped over (params,
    params_hw); given params_hw = params its row must equal the non-ideal row, and the other
    rows must equal those of the run without it (same keys, same chips)."""
    mod = load_script("e_hwmodel")
    ni = mod.NonIdeality(name="v", group="analog", device="pcm", prog_scale=4.0, pcm_drift=False)
    base = dict(folds=2, num_images=40, tile_rows=16, tile_cols=16, calib_samples=8,
                nonidealities=(ni,), correction=mod.CorrectionOptions(max_rounds=1))
    model = models_mod.MODELS["mlp"][0]()
    f = mod.Folds("mlp", mod.EHwmodelConfig(**base))
    x, y = f.test()
    params = jax.vmap(lambda k: model.init(k, x[0, :1]))(jax.random.split(jax.random.key(3), 2))
    args = (mod.make_device(ni), params, params, params, x, y, f.calibration(8))
    outs = {}
    for alone in (True, False):
        cfg = mod.EHwmodelConfig(**base, hwaware=mod.HWAwareOptions(alone=alone))
        fn = jax.jit(mod.make_instance(model, cfg, ni))
        outs[alone] = np.asarray(fn(jax.random.key(5), *args))
    assert outs[True].shape == (2, 4, x.shape[1]) and outs[False].shape == (2, 3, x.shape[1])
    np.testing.assert_array_equal(outs[True][:, 2], outs[True][:, 0])      # hwaware == nonideal
    np.testing.assert_array_equal(outs[True][:, [0, 1, 3]], outs[False])
