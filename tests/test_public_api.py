"""The stable public surface (DESIGN.md §12): every public module's ``__all__``, pinned name by
name, and the promised signatures of devices, mapping and the command line.

A change to a public module's ``__all__`` must be made here too, on purpose.
"""
import inspect
import json
import os

import jax
import numpy as np
import pytest

import nvjax
from nvjax import cli, devices, mapping

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

#: Every public module of the package and the names it exports.
PUBLIC = {
    "bench": {"GENERATORS", "WORKLOADS", "NETWORK_WORKLOADS", "network_workload",
              "network_rate", "aihwkit_rates", "device_scaling", "draw_shapes",
              "format_report", "machine_limit", "main", "measure_in_subprocess",
              "normals_per_instance", "numpy_instance", "numpy_rate", "nvjax_rate",
              "rate_vs_count", "run", "workload_instance", "workload_model"},
    "chip": {"Chip", "Trace", "apply", "apply_traced", "deploy", "effective_params",
             "with_tiles"},
    "cli": {"main"},
    "config": {"AUTO_OPTIMIZE_INSTANCES", "ConfigError", "DeviceConfig", "DistributedConfig",
               "DisturbConfig", "LifetimeRunConfig", "ModelConfig", "RunConfig", "SweepConfig",
               "device_points", "from_dict", "load", "load_any", "load_lifetime", "load_yaml",
               "make_device", "make_disturb", "to_dict"},
    "correction": {"calibrate", "correct", "fit_gain_offset", "recovered_fraction",
                   "reprogram"},
    "crossbar": {"PHYSICS_FIELDS", "TileConfig", "Tiles", "cell_voltages", "input_scale",
                 "ir_transfer", "ir_transfer_tiles", "mvm", "conv_mvm", "conv_supported", "num_row_tiles", "predistort_ir",
                 "program_tiles", "quantize_symmetric", "read_weights", "reference_sum", "tile",
                 "tile_grid", "untile_grid", "bound_management_passes", "BM_MAX_FACTOR",
                 "BM_MAX_RES", "CONV_BLOCK_OUTPUTS"},
    "data": {"Dataset", "digits", "mnist", "procedural", "procedural_images",
             "procedural_sequences"},
    "devices": {"CellState", "DEVICE_TYPES", "Device", "DeviceVariation", "Flash", "Ideal",
                "Levels", "PCM", "PulsePCM", "ReRAM", "StuckAt", "apply_faults",
                "check_conductances", "check_device", "check_pulse_device", "draw_devices",
                "drift", "flash", "g_range", "ideal", "levels", "pcm", "program",
                "programming_sigma", "pulse_pcm", "read", "reram", "reset",
                "reset_from_normals", "set_pulse", "variation_from_normals"},
    "disturb": {"DisturbParams", "accumulate", "accumulate_batch", "check_params",
                "disturbed_conductance", "draw_spread", "pcm_disturb", "reads_to_failure",
                "reram_disturb"},
    "encoding": {"Sliced", "favorable_codebook", "from_msp_lsp", "from_pair", "from_slices",
                 "level_values", "msp_lsp_scale", "pair_scale", "project_to_codebook",
                 "quantize_levels", "quantize_weights", "to_msp_lsp", "to_pair", "to_slices"},
    "irdrop": {"IRDropResult", "coupling", "first_order_error", "check_first_order", "first_order_transfer", "voltages", "voltages_first_order",
               "wire_voltages"},
    "jobs": {"accuracy_instance", "format_lifetime_report", "format_table", "get_model",
             "init_distributed", "make_model", "params_sha256", "plot_accuracy_vs_time",
             "plot_lifetime", "reliability", "run_lifetime", "versions", "write_lifetime",
             "write_results"},
    "layers": {"CROSSBAR_LAYERS", "as_rows", "inverse_permutation", "kernel_matrix", "kernels",
               "layer_inputs", "layer_names", "matrix_to_kernel", "module_name",
               "strip_params", "split_variables", "variables", "NNXModel", "from_nnx", "is_nnx",
               "conv_geometry", "im2col", "window_slices"},
    "lifetime": {"Lifetime", "LifetimeConfig", "LifetimeRecord", "LifetimeState",
                 "eval_inferences", "lifetime", "reprogram_events", "run", "summarize"},
    "mapping": {"RelaxedInfo", "assign", "assignment_cost", "bottleneck_assign",
                "crossbar_assign", "crossbar_cost", "log_sinkhorn", "relaxed_assign",
                "relaxed_crossbar_assign", "relaxed_permutations", "sinkhorn", "sort_and_pair"},
    "models": {"LSTMClassifier", "LeNet", "MLP", "ResNet", "Transformer", "MODELS", "dataset",
               "accuracy", "get_trained",
               "load_params", "predict", "save_params", "train"},
    "placement": {"exact_placement", "identity_placement", "layer_reads", "linear_costs",
                  "placement_cost", "position_factor", "random_placement", "relaxed_objective",
                  "relaxed_placement", "physical_shape", "complete_permutation",
                  "disturb_error_factor", "drive_position_factors", "fisher_costs",
                  "alternating_placement", "self_consistent_cost", "horizon_objective",
                  "hard_matrices", "horizon_placement", "swap_local_search"},
    "prng": {"IMPLS", "PHILOX", "impl_name", "key", "mulhi32", "mulhi32_halves", "philox4x32"},
    "programming": {"ParetoSweep", "RowProgramConfig", "RowProgramResult", "WriteVerifyResult",
                    "magnitude_scores", "normalized_cycles", "one_shot", "pareto_front",
                    "pareto_sweep", "random_scores", "row_program", "selective_write_verify",
                    "swim_mask", "weight_scale", "write_verify"},
    "sensitivity": {"activation_stats", "criticality_mc", "fisher_diag", "hessian_diag", "importance",
                    "kernel_criticality", "loss_fn", "saliency", "swim_sensitivity"},
    "stats": {"bootstrap_ci", "kaplan_meier", "km_median_difference", "paired_difference",
              "two_way_bootstrap_ci", "two_way_bootstrap"},
    "sweep": {"ENV_COORDINATOR", "ENV_NUM_PROCESSES", "ENV_PROCESS_ID", "Staged", "broadcast",
              "compile_ahead", "compile_chunk", "init_distributed", "instance_keys", "instance_mesh",
              "limit_malloc_arenas", "open_checkpoint", "run_instances", "summarize"},
    "training": {"ChipNoise", "WeightNoise", "favorable_codebook", "favorable_levels",
                 "noisy_forward", "perturb", "quantize", "round_ste", "sliced_read",
                 "straight_through", "top_mask", "train", "weight_codes"},
}


def test_top_level_surface():
    assert nvjax.__all__.count("__version__") == 1
    assert set(nvjax.__all__) == set(PUBLIC) - {"cli"} | {"__version__"}
    assert isinstance(nvjax.__version__, str)
    # the submodules load on first use and are the real modules
    for name in set(nvjax.__all__) - {"__version__"}:
        assert getattr(nvjax, name).__name__ == f"nvjax.{name}"
    with pytest.raises(AttributeError):
        getattr(nvjax, "no_such_module")


def test_every_public_module_is_pinned():
    files = {f[:-3] for f in os.listdir(os.path.join(ROOT, "nvjax"))
             if f.endswith(".py") and not f.startswith("_")}
    assert files == set(PUBLIC)


@pytest.mark.parametrize("name", sorted(PUBLIC))
def test_module_all(name):
    mod = getattr(nvjax, name) if name != "cli" else cli
    exported = list(mod.__all__)
    assert len(exported) == len(set(exported)), f"duplicates in nvjax.{name}.__all__"
    assert all(not n.startswith("_") for n in exported)
    missing = [n for n in exported if not hasattr(mod, n)]
    assert not missing, f"nvjax.{name}.__all__ names missing attributes: {missing}"
    assert set(exported) == PUBLIC[name]


def _params(f):
    return list(inspect.signature(f).parameters.values())


def _positional(f):
    return [p.name for p in _params(f)
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]


def test_device_constructors():
    """pcm/reram/flash(**overrides), levels(...), ideal(): callable without arguments, and every
    option a keyword."""
    for f in (devices.pcm, devices.reram, devices.flash, devices.levels, devices.ideal):
        assert _positional(f) == [], f.__name__
        assert all(p.default is not p.empty or p.kind == p.VAR_KEYWORD for p in _params(f))
        assert isinstance(f(), devices.Device)
    for f in (devices.pcm, devices.reram, devices.flash):
        assert _params(f)[-1].kind == inspect.Parameter.VAR_KEYWORD, f.__name__
    assert devices.pcm(g_max=20.0).g_max == 20.0


def test_program_and_read():
    assert _positional(devices.program) == ["key", "device", "g_target"]
    assert _positional(devices.read) == ["key", "device", "state", "t"]
    for f in (devices.program, devices.read):
        assert all(p.default is p.empty for p in _params(f))
    g_t = np.array([[0.0, 5.0], [10.0, 25.0]], np.float32)
    d = devices.ideal()
    state = devices.program(jax.random.key(0), d, g_t)
    np.testing.assert_array_equal(np.asarray(state.g), g_t)      # ideal device: exact
    g = devices.read(jax.random.key(1), d, state, 3600.0)
    np.testing.assert_array_equal(np.asarray(g), g_t)


def test_mapping_contract():
    assert _positional(mapping.assign) == ["cost"]
    assert _positional(mapping.relaxed_assign) == ["key", "cost"]
    assert _params(mapping.relaxed_assign)[-1].kind == inspect.Parameter.VAR_KEYWORD
    cost = np.array([[3.0, 1.0], [1.0, 3.0]])
    assert mapping.assign(cost).tolist() == [1, 0]
    assert mapping.relaxed_assign(jax.random.key(0), cost, steps=100).tolist() == [1, 0]


def test_console_script():
    tomllib = pytest.importorskip("tomllib")                 # Python >= 3.11
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        assert tomllib.load(f)["project"]["scripts"] == {"nvjax": "nvjax.cli:main"}


def test_cli_run_config_out(monkeypatch, tmp_path, capsys):
    """``nvjax run CONFIG --out DIR`` runs the reliability job on CONFIG into DIR (the job itself
    is stubbed: it is tested in test_runtime / test_sweep)."""
    seen = {}

    def reliability(cfg, out):
        seen.update(cfg=cfg, out=out)
        return {"timings": {"sweep_s": 1.0, "instances_per_s": 2.0},
                "chunks": {"devices": 1, "processes": 1, "loaded": 0, "total": 1}}
    monkeypatch.setattr(nvjax.jobs, "reliability", reliability)
    monkeypatch.setattr(nvjax.jobs, "format_table", lambda summary: "TABLE")
    config = os.path.join(ROOT, "configs", "quickstart.yaml")
    out = tmp_path / "run"
    assert cli.main(["run", config, "--out", str(out), "--no-progress"]) == 0
    assert seen["out"] == str(out) and out.is_dir()
    assert seen["cfg"] == nvjax.config.from_dict(
        {**nvjax.config.to_dict(nvjax.config.load(config)), "progress": False},
        nvjax.config.RunConfig)
    assert "TABLE" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        cli.main(["run", config])                      # --out is required
    assert e.value.code == 2 and "--out" in capsys.readouterr().err


def test_cli_bench_json_last_line(monkeypatch, capsys):
    """``nvjax bench --json``: the last stdout line is one JSON object with an entry per workload
    (measurements stubbed; test_bench covers the measurement code)."""
    fake = {w: {"instances_per_s": 1.0, "limit_instances_per_s": 2.0}
            for w in ("pcm-ideal-io", "pcm-default-io")}
    monkeypatch.setattr(nvjax.bench, "run", lambda **kw: fake)
    assert cli.main(["bench", "--json"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == fake
