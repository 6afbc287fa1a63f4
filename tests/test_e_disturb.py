"""E-disturb experiment end to end on a tiny config (the shipped config takes minutes)."""
import json

import pytest


@pytest.mark.slow
def test_e_disturb_tiny(tmp_path, load_script):
    mod = load_script("e_disturb")
    cfg = tmp_path / "e.yaml"
    cfg.write_text(
        "models: [mlp]\n"
        "placement: {cost_samples: 32, relaxed_steps: 5, objective_inferences: 1.0e6}\n"
        "base:\n"
        "  model: {name: mlp, hidden: [16], epochs: 3}\n"
        "  tile: {rows: 64, cols: 16, v_read: 0.45, ir_drop: first_order, r_wire: 5.0}\n"
        "  lifetime: {num_steps: 2, eval_every: 1, batch_size: 8, inferences_per_step: 1.0e6}\n"
        "  num_chips: 3\n  chunk_size: 3\n  eval_samples: 40\n  progress: false\n")
    out = tmp_path / "out"
    assert mod.main([str(cfg), "--out", str(out)]) == 0
    for f in ("results.json", "chips.csv", "e_disturb.png", "summary.md"):
        assert (out / f).exists(), f
    res = json.loads((out / "results.json").read_text())["models"]["mlp"]
    p = res["placements"]
    assert set(p) == {"identity", "random", "exact", "relaxed"}
    assert p["exact"]["linear_cost"] <= p["identity"]["linear_cost"] + 1e-9
    assert len(res["intervals"]["exact"]) == 3
