"""The benchmark's bookkeeping: draw counts, the JSON contract, subprocess plumbing, CLI parsing.

The timings themselves are not tested (they belong to the machine); every heavy measurement is
replaced by a stub, except one NumPy instance and one failing child process. The draw count of
the machine limit is checked against the random draws the benchmark's own instance function
makes (its jaxpr), not against a second hand formula.
"""
import json
import subprocess
import sys

import jax
import jax.extend as jex
import numpy as np
import pytest

from nvjax import bench, cli, prng


def _random_draws(jaxpr, out=None, loops=None):
    """Shapes of the ``random_bits`` draws of a jaxpr and of its sub-jaxprs (jit, custom_jvp,
    scan, cond, ...), each given in 32-bit words as ``(shape, bit_width)``; draws inside a
    ``while`` loop (bound management's re-reads, as many as the data need) go to ``loops``
    when it is given."""
    out = [] if out is None else out
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "random_bits":
            out.append((tuple(eqn.outvars[0].aval.shape), int(eqn.params["bit_width"])))
        target = loops if (loops is not None and eqn.primitive.name == "while") else out
        for p in eqn.params.values():
            for sub in (p if isinstance(p, (list, tuple)) else (p,)):
                if isinstance(sub, jex.core.ClosedJaxpr):
                    _random_draws(sub.jaxpr, target, loops)
                elif isinstance(sub, jex.core.Jaxpr):
                    _random_draws(sub, target, loops)
    return out


@pytest.fixture(scope="module")
def workload():
    return bench.workload_model()


@pytest.mark.parametrize("name", list(bench.WORKLOADS))
def test_draw_count_is_what_the_instance_draws(workload, name):
    """normals_per_instance / draw_shapes (the machine limit's random part) equal the random
    numbers the timed instance function (chip.deploy + chip.apply) actually draws."""
    cfg = bench.WORKLOADS[name]
    model, params, x = workload
    fn = bench.workload_instance(model, cfg)
    jaxpr = jax.make_jaxpr(lambda k, p, xs: fn(k, p, xs))(prng.key(0, "threefry"), params, x)
    rereads = []
    draws = _random_draws(jaxpr.jaxpr, loops=rereads)
    assert draws, "no random_bits in the traced instance"
    assert all(bits == 32 for _, bits in draws + rereads)   # one 32-bit word per normal
    words = sum(int(np.prod(s)) for s, _ in draws)
    assert bench.normals_per_instance(cfg) == words
    assert sorted(bench.draw_shapes(cfg)) == sorted(s for s, _ in draws)
    # bound management re-reads draw each layer's output noise again, nothing else
    noise = sorted(s for s in bench.draw_shapes(cfg) if len(s) == 3)
    assert sorted(s for s, _ in rereads) == (noise if cfg.bound_management != "none" else [])


def test_numpy_instance_runs_and_is_finite(workload):
    _, params, x = workload
    ws = [np.asarray(params[f"Dense_{i}"]["kernel"]) for i in range(3)]
    bs = [np.asarray(params[f"Dense_{i}"]["bias"]) for i in range(3)]
    for cfg in bench.WORKLOADS.values():
        out = bench.numpy_instance(np.random.default_rng(0), ws, bs, np.asarray(x)[:50], cfg)
        assert out.shape == (10,) and np.all(np.isfinite(out))


def _fake_subprocess(monkeypatch, stdout="", returncode=0, stderr=""):
    """Replace subprocess.run; returns the list of (cmd, env) it was called with."""
    calls = []

    def run(cmd, capture_output=False, text=False, env=None, timeout=None):
        calls.append((cmd, env))
        return subprocess.CompletedProcess(cmd, returncode, stdout, stderr)
    monkeypatch.setattr(subprocess, "run", run)
    return calls


def test_subprocess_forces_the_device_count(monkeypatch):
    """XLA_FLAGS of the child: the forced device count replaces the parent's, other flags stay;
    the child's last stdout line is the result."""
    calls = _fake_subprocess(monkeypatch, stdout='log line\n{"instances_per_s": 7.0}\n')
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_foo=1 --xla_force_host_platform_device_count=8")
    spec = {"workload": "pcm-ideal-io", "instances": 4, "chunk_size": 4}
    assert bench.measure_in_subprocess(spec, num_devices=4) == {"instances_per_s": 7.0}
    cmd, env = calls[-1]
    assert env["XLA_FLAGS"].split() == ["--xla_cpu_foo=1",
                                        "--xla_force_host_platform_device_count=4"]
    assert cmd[1:4] == ["-m", "nvjax.bench", "--child"] and json.loads(cmd[4]) == spec
    monkeypatch.delenv("XLA_FLAGS")
    bench.measure_in_subprocess(spec, num_devices=2)
    assert calls[-1][1]["XLA_FLAGS"] == "--xla_force_host_platform_device_count=2"
    bench.measure_in_subprocess(spec)                      # None: the parent's flags, unchanged
    assert "XLA_FLAGS" not in calls[-1][1]


def test_device_scaling_rounds_to_whole_chunks_and_reports_speedup(monkeypatch):
    calls = _fake_subprocess(monkeypatch, stdout='{"instances_per_s": 10.0}')
    rows = bench.device_scaling("pcm-ideal-io", (1, 2), instances=5, chunk_size=4,
                                log=lambda s: None)
    specs = [json.loads(cmd[4]) for cmd, _ in calls]
    # 1 device: chunk 4, 5 -> 8 instances; 2 devices: chunk 8, 5 -> 8 instances
    assert [(s["chunk_size"], s["instances"]) for s in specs] == [(4, 8), (8, 8)]
    assert [r["num_devices"] for r in rows] == [1, 2]
    assert [r["speedup"] for r in rows] == [1.0, 1.0]


def test_failed_subprocess_is_reported(monkeypatch):
    _fake_subprocess(monkeypatch, returncode=1, stderr="Traceback\nKeyError: 'x'\n")
    r = bench.measure_in_subprocess({"workload": "x", "instances": 1, "chunk_size": 1})
    assert r == {"error": "Traceback KeyError: 'x'"}


def _stub_measurements(monkeypatch):
    def rate(config, instances, chunk_size=4, *, vmap_width=None, generator="threefry", repeat=1):
        return {"instances_per_s": 50.0 if generator == "philox" else 20.0, "compile_s": 1.0,
                "run_s": 1.0, "rss_after_compile_mb": 400.0, "peak_rss_mb": 410.0,
                "num_devices": 1}

    def limit(config, *, generator="threefry", chunks=(2,), t_matmul=None):
        nps = 300e6 if generator == "philox" else 100e6
        n = 10 ** 6
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
        # 1 / (10^6 / 3e8 + 2e-3) = 1 / (5.333e-3) instances/s
        assert r["limit_instances_per_s"] == pytest.approx(1 / (1e6 / 3e8 + 2e-3))
        assert r["fraction_of_limit"] == pytest.approx(50.0 * (1e6 / 3e8 + 2e-3))
        assert set(r["generators"]) == set(bench.GENERATORS)
        assert r["speedup_vs_numpy"] == pytest.approx(5.0)
    assert res["pcm-default-io"]["chunk_size"] == bench.CHUNK_SIZES["pcm-default-io"]
    json.loads(json.dumps(res))
    text = bench.format_report(res)
    assert "pcm-ideal-io" in text and "philox*" in text


def test_run_peak_memory_growth_from_1e3(monkeypatch):
    """Growth of the peak RSS from the first count >= 1000 to the last; failed rows skipped."""
    _stub_measurements(monkeypatch)
    rows = [{"instances": 10, "peak_rss_mb": 100.0, "instances_per_s": 1.0,
             "rss_after_compile_mb": 90.0},
            {"instances": 1000, "peak_rss_mb": 500.0, "instances_per_s": 1.0,
             "rss_after_compile_mb": 90.0},
            {"instances": 10000, "peak_rss_mb": 520.0, "instances_per_s": 1.0,
             "rss_after_compile_mb": 90.0},
            {"instances": 100000, "error": "x"}]
    seen = []

    def vs_count(workload, counts, **kw):
        seen.append(tuple(counts))
        return [dict(r) for r in rows if r["instances"] in counts]
    monkeypatch.setattr(bench, "rate_vs_count", vs_count)
    res = bench.run(instances=8, workloads=("pcm-ideal-io",), counts=(10, 1000, 10000, 100000),
                    numpy_baseline=False, log=lambda s: None)
    assert res["pcm-ideal-io"]["peak_rss_growth_from_1e3"] == pytest.approx(520 / 500 - 1)
    assert "+4.0%" in bench.format_report(res)
    res = bench.run(instances=8, workloads=("pcm-ideal-io",), counts=(10, 1000),
                    numpy_baseline=False, log=lambda s: None)
    assert res["pcm-ideal-io"]["peak_rss_growth_from_1e3"] is None   # one count >= 1000
    assert seen == [(10, 1000, 10000, 100000), (10, 1000)]


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


def test_cli_bench_parses_lists_and_widths(monkeypatch, capsys):
    got = {}

    def run(**kw):
        got.update(kw)
        return {}
    monkeypatch.setattr(bench, "run", run)
    assert cli.main(["bench", "--json", "--counts", "10,100,1e3", "--devices", "none",
                     "--aihwkit-threads", "3", "--vmap-width", "2"]) == 0
    assert got["counts"] == (10, 100, 1000) and got["num_devices"] == ()
    assert got["aihwkit_threads"] == (3,) and got["vmap_width"] == 2
    assert cli.main(["bench", "--json", "--vmap-width", "none"]) == 0
    assert got["vmap_width"] is None                       # 'none': the whole chunk vmapped
    assert got["counts"] == (10, 100, 1000, 10000) and got["num_devices"] == (1, 2, 4)
    capsys.readouterr()


@pytest.mark.parametrize("args,needle", [
    (["--counts", "10,x"], "comma-separated integers"),
    (["--devices", "0"], "positive integers"),
    (["--vmap-width", "0"], "vmap width"),
    (["--vmap-width", "two"], "vmap width"),
])
def test_cli_bench_rejects_bad_lists(monkeypatch, capsys, args, needle):
    monkeypatch.setattr(bench, "run", lambda **kw: pytest.fail("bench.run was called"))
    with pytest.raises(SystemExit) as e:
        cli.main(["bench", "--json"] + args)
    assert e.value.code == 2
    assert needle in capsys.readouterr().err


_FAKE_AIHWKIT = """\
import json, sys
n = int(sys.argv[1])
if n == 3:
    sys.exit("no torch here")
print("warming up")
print(json.dumps({"pcm-ideal-io": {"instances_per_s": 5.0 * n, "backend": "torch",
                                   "all": {"torch": 5.0 * n, "cuda": 1.0}},
                  "pcm-default-io": {"instances_per_s": 9.0 / n, "backend": "rpu"}}))
"""


def test_aihwkit_rates_with_a_stand_in_script(tmp_path):
    """The script's JSON per thread count is merged: the fastest back-end and thread count per
    workload, every (back-end, threads) rate kept; failures are reported, a missing script is
    None."""
    script = tmp_path / "aihwkit_mc.py"
    script.write_text(_FAKE_AIHWKIT)
    res = bench.aihwkit_rates(sys.executable, threads=(1, 2), script=str(script))
    assert res["pcm-ideal-io"] == {"instances_per_s": 10.0, "backend": "torch", "threads": 2,
                                   "all": {"torch@1t": 5.0, "cuda@1t": 1.0,
                                           "torch@2t": 10.0, "cuda@2t": 1.0}}
    assert res["pcm-default-io"] == {"instances_per_s": 9.0, "backend": "rpu", "threads": 1,
                                     "all": {"rpu@1t": 9.0, "rpu@2t": 4.5}}
    # one thread count failing, the other working: the working one is kept
    res = bench.aihwkit_rates(sys.executable, threads=(3, 1), script=str(script))
    assert res["pcm-ideal-io"]["threads"] == 1 and "error" not in res
    # every run failing: one message per thread count
    res = bench.aihwkit_rates(sys.executable, threads=(3,), script=str(script))
    assert res == {"error": ["3 threads: no torch here"]}
    res = bench.aihwkit_rates(str(tmp_path / "no-python"), threads=(1, 2), script=str(script))
    assert len(res["error"]) == 2 and all("threads:" in e for e in res["error"])
    assert bench.aihwkit_rates(sys.executable, script=str(tmp_path / "missing.py")) is None


def test_run_reports_aihwkit_next_to_nvjax(monkeypatch, tmp_path):
    _stub_measurements(monkeypatch)
    script = tmp_path / "aihwkit_mc.py"
    script.write_text(_FAKE_AIHWKIT)
    real = bench.aihwkit_rates
    monkeypatch.setattr(bench, "aihwkit_rates",
                        lambda py, threads: real(py, threads, script=str(script)))
    res = bench.run(instances=8, numpy_baseline=False, aihwkit_python=sys.executable,
                    aihwkit_threads=(1, 2), log=lambda s: None)
    assert res["pcm-ideal-io"]["speedup_vs_aihwkit"] == pytest.approx(50.0 / 10.0)
    assert res["pcm-default-io"]["aihwkit_threads"] == 1
    res = bench.run(instances=8, numpy_baseline=False, aihwkit_python=sys.executable,
                    aihwkit_threads=(3,), log=lambda s: None)
    assert res["pcm-ideal-io"]["aihwkit_error"] == ["3 threads: no torch here"]


def test_child_failure_is_reported():
    """A real child process (fails fast on the unknown workload)."""
    r = bench.measure_in_subprocess({"workload": "no-such-workload", "instances": 1,
                                     "chunk_size": 1}, timeout=120)
    assert "error" in r and "no-such-workload" in r["error"]


def test_child_entry_point(monkeypatch, capsys):
    seen = {}

    def rate(config, instances, chunk_size, **kw):
        seen.update(config=config, instances=instances, chunk_size=chunk_size, **kw)
        return {"instances_per_s": 1.0}
    monkeypatch.setattr(bench, "nvjax_rate", rate)
    assert bench.main(["--child", json.dumps({"workload": "pcm-default-io", "instances": 3,
                                              "chunk_size": 1, "generator": "philox"})]) == 0
    assert json.loads(capsys.readouterr().out) == {"instances_per_s": 1.0, "instances": 3}
    assert seen["config"] == bench.WORKLOADS["pcm-default-io"]
    assert (seen["instances"], seen["chunk_size"], seen["generator"]) == (3, 1, "philox")


def test_network_workloads_are_routed_with_aihwkit_beside(monkeypatch):
    """Network workloads: timed by network_rate with every generator, the one with the most
    instances/s in the headline (not the one drawing normals fastest), aihwkit's network
    script beside them, a table of their own in the report."""
    _stub_measurements(monkeypatch)
    calls = []
    # threefry runs the ResNet faster, philox the transformer
    rate = {("resnet-pcm-ideal-io", "threefry"): 3.0, ("resnet-pcm-ideal-io", "philox"): 2.5,
            ("transformer-pcm-default-io", "threefry"): 1.0,
            ("transformer-pcm-default-io", "philox"): 4.0}

    def net_rate(name, instances, *, generator, t_matmul, **kw):
        calls.append((name, instances, generator, t_matmul))
        r = rate[name, generator]
        return {"instances_per_s": r, "limit_instances_per_s": 12.0, "fraction_of_limit": r / 12,
                "chip_forward_s": 0.5, "software_forward_s": 0.25, "chip_over_software": 2.0,
                "compile_s": 1.0, "generator": generator}
    monkeypatch.setattr(bench, "network_rate", net_rate)
    monkeypatch.setattr(bench, "normals_time",
                        lambda n, g, **kw: {"philox": 1.0, "threefry": 2.0}[g] * n)

    def aihwkit(python, threads, script=None):
        if script is None:
            return {"pcm-ideal-io": {"instances_per_s": 10.0, "backend": "x", "threads": 1}}
        assert script.endswith("aihwkit_workloads.py")
        return {"resnet-pcm-ideal-io": {"instances_per_s": 1.5, "backend": "torch",
                                        "threads": 2}}
    monkeypatch.setattr(bench, "aihwkit_rates", aihwkit)
    res = bench.run(instances=8, workloads=("pcm-ideal-io", "resnet-pcm-ideal-io",
                                            "transformer-pcm-default-io"),
                    numpy_baseline=False, aihwkit_python=sys.executable, network_instances=5,
                    log=lambda s: None)
    assert sorted(c[:3] for c in calls) == sorted(
        (n, 5, g) for n in ("resnet-pcm-ideal-io", "transformer-pcm-default-io")
        for g in bench.GENERATORS)
    assert calls[0][3] == 2e-3                           # the run's one matmul measurement
    assert res["resnet-pcm-ideal-io"]["generator"] == "threefry"
    assert res["transformer-pcm-default-io"]["generator"] == "philox"
    assert res["resnet-pcm-ideal-io"]["generators"]["philox"]["instances_per_s"] == 2.5
    assert res["resnet-pcm-ideal-io"]["speedup_vs_aihwkit"] == pytest.approx(2.0)
    assert "aihwkit_instances_per_s" not in res["transformer-pcm-default-io"]
    assert res["pcm-ideal-io"]["speedup_vs_aihwkit"] == pytest.approx(5.0)
    text = bench.format_report(res)
    assert "network workload" in text and "transformer-pcm-default-io" in text
    assert "pcm-ideal-io" in text.split("network workload")[1]      # the MLP table follows
    # without network_instances, the transformer is timed on NETWORK_INSTANCES instances
    calls.clear()
    bench.run(instances=8, workloads=("transformer-pcm-default-io",), numpy_baseline=False,
              generators=("philox",), log=lambda s: None)
    assert calls[0][1] == bench.NETWORK_INSTANCES["transformer"]


def test_network_workload_inputs():
    model, variables, x = bench.network_workload("transformer")
    assert x.shape == (bench.NETWORK_BATCH, 16, 12)
    np.testing.assert_array_equal(np.asarray(x).sum(-1), 1.0)          # one-hot tokens
    assert set(variables) == {"params"}
    with pytest.raises(ValueError, match="network"):
        bench.network_workload("vgg")
    with pytest.raises(ValueError, match="unknown network workload"):
        bench.network_rate("mlp-pcm-ideal-io", 1)
