"""The benchmark's bookkeeping: draw counts, the JSON contract, subprocess plumbing, CLI parsing.

The timings themselves are not tested (they belong to the machine); every heavy measurement is
replaced by a stub, except one NumPy instance and one failing child process.
"""
import json

import numpy as np
import pytest

from nvjax import bench, cli


def test_normals_per_instance_hand_count():
    weights = 784 * 256 + 256 * 128 + 128 * 10
    assert bench._normals_per_instance(bench.WORKLOADS["pcm-ideal-io"]) == 6 * weights
    # output noise: batch × row tiles × columns per layer (784 rows = 4 tiles of 256)
    noise = 1000 * (4 * 256 + 1 * 128 + 1 * 10)
    assert bench._normals_per_instance(bench.WORKLOADS["pcm-default-io"]) == 6 * weights + noise


@pytest.mark.parametrize("name", list(bench.WORKLOADS))
def test_draw_shapes_cover_every_normal(name):
    cfg = bench.WORKLOADS[name]
    shapes = bench._draw_shapes(cfg)
    assert sum(int(np.prod(s)) for s in shapes) == bench._normals_per_instance(cfg)


def test_numpy_instance_runs_and_is_finite():
    _, params, x = bench.workload_model()
    ws = [np.asarray(params[f"Dense_{i}"]["kernel"]) for i in range(3)]
    bs = [np.asarray(params[f"Dense_{i}"]["bias"]) for i in range(3)]
    for cfg in bench.WORKLOADS.values():
        out = bench.numpy_instance(np.random.default_rng(0), ws, bs, np.asarray(x)[:50], cfg)
        assert out.shape == (10,) and np.all(np.isfinite(out))


def test_force_devices_flags_replaces_an_existing_count():
    assert bench._force_devices_flags("", 2) == "--xla_force_host_platform_device_count=2"
    flags = bench._force_devices_flags(
        "--xla_cpu_foo=1 --xla_force_host_platform_device_count=8", 4)
    assert flags.split() == ["--xla_cpu_foo=1", "--xla_force_host_platform_device_count=4"]


def test_peak_growth_from_1e3():
    rows = [{"instances": 10, "peak_rss_mb": 100.0}, {"instances": 1000, "peak_rss_mb": 500.0},
            {"instances": 10000, "peak_rss_mb": 520.0}, {"instances": 100000, "error": "x"}]
    assert bench._peak_growth(rows) == pytest.approx(0.04)
    assert bench._peak_growth(rows[:2]) is None


def _stub_measurements(monkeypatch):
    def rate(config, instances, chunk_size=4, *, vmap_width=None, generator="threefry", repeat=1):
        return {"instances_per_s": 50.0 if generator == "philox" else 20.0, "compile_s": 1.0,
                "run_s": 1.0, "rss_after_compile_mb": 400.0, "peak_rss_mb": 410.0,
                "num_devices": 1}

    def limit(config, *, generator="threefry", chunks=(2,), t_matmul=None):
        nps = 300e6 if generator == "philox" else 100e6
        n = bench._normals_per_instance(config)
        return {"normals_per_instance": n, "normals_per_s": nps,
                "matmul_flops_per_instance": 1, "matmul_flops_per_s": 1e11,
                "t_normals_s": n / nps, "t_matmul_s": t_matmul,
                "limit_instances_per_s": 1.0 / (n / nps + t_matmul)}
    monkeypatch.setattr(bench, "nvjax_rate", rate)
    monkeypatch.setattr(bench, "machine_limit", limit)
    monkeypatch.setattr(bench, "matmul_time", lambda *a, **k: 2e-3)
    monkeypatch.setattr(bench, "numpy_rate", lambda cfg, instances=6: 10.0)


def test_run_json_contract_with_stubbed_measurements(monkeypatch):
    _stub_measurements(monkeypatch)
    res = bench.run(instances=8, log=lambda s: None)
    assert set(res) == {"pcm-ideal-io", "pcm-default-io"}
    for r in res.values():
        assert r["generator"] == "philox"  # the generator with the higher normal throughput
        assert r["instances_per_s"] == 50.0
        assert r["fraction_of_limit"] == pytest.approx(50.0 / r["limit_instances_per_s"])
        assert set(r["generators"]) == set(bench.GENERATORS)
        assert r["speedup_vs_numpy"] == pytest.approx(5.0)
    assert res["pcm-default-io"]["chunk_size"] == bench.CHUNK_SIZES["pcm-default-io"]
    json.loads(json.dumps(res))
    text = bench.format_report(res)
    assert "pcm-ideal-io" in text and "philox*" in text


def test_run_rejects_unknown_names():
    with pytest.raises(ValueError, match="unknown workload"):
        bench.run(workloads=("nope",), log=lambda s: None)
    with pytest.raises(ValueError, match="unknown generator"):
        bench.run(generators=("nope",), log=lambda s: None)


def test_cli_json_last_line(monkeypatch, capsys):
    _stub_measurements(monkeypatch)
    assert cli.main(["bench", "--json", "--counts", "none", "--devices", "none",
                     "--no-numpy", "--instances", "4"]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    res = json.loads(last)
    for name in ("pcm-ideal-io", "pcm-default-io"):
        assert {"instances_per_s", "limit_instances_per_s"} <= set(res[name])


def test_cli_list_parsing():
    assert cli._int_list("10,100,1e3") == (10, 100, 1000)
    assert cli._int_list("none") == ()
    with pytest.raises(Exception):
        cli._int_list("10,x")
    assert cli._vmap_width("none") == 0 and cli._vmap_width("2") == 2


def test_aihwkit_missing_python_is_reported():
    res = bench.aihwkit_rates("/nonexistent/python", threads=(1,))
    assert res is None or "error" in res  # None when the shared script is not there


def test_child_failure_is_reported():
    r = bench.measure_in_subprocess({"workload": "no-such-workload", "instances": 1,
                                     "chunk_size": 1}, timeout=120)
    assert "error" in r and "no-such-workload" in r["error"]


def test_child_entry_point(monkeypatch, capsys):
    monkeypatch.setattr(bench, "nvjax_rate", lambda *a, **k: {"instances_per_s": 1.0})
    assert bench._main(["--child", json.dumps({"workload": "pcm-ideal-io", "instances": 3,
                                               "chunk_size": 1})]) == 0
    assert json.loads(capsys.readouterr().out) == {"instances_per_s": 1.0, "instances": 3}
