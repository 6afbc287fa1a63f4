"""Scaling of the Monte Carlo driver (issue 7): devices, processes, resume.

Acceptance tests, each against an independent reference run:

* sharded = single device: the same script in two processes, one with
  ``XLA_FLAGS=--xla_force_host_platform_device_count=4`` (set before JAX is imported, hence
  subprocesses) and one with a single CPU device; results bit-identical.
* two processes = one process: ``nvjax run`` as two local processes joined by
  ``jax.distributed`` on 127.0.0.1 gives the same ``results.csv`` as one process.
* resume = uninterrupted: ``nvjax run`` killed with SIGKILL after its first chunk file, then
  rerun, gives the same ``results.csv`` as an uninterrupted run.
"""
import glob
import json
import os
import signal
import socket
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh

from nvjax import config as cfg_mod
from nvjax import jobs
from nvjax import models as models_mod
from nvjax import sweep
from nvjax import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_INSTANCES = 40


_CACHE = {}  # the subprocesses share a persistent compilation cache (speed only)


def _env(**extra):
    env = {k: v for k, v in os.environ.items()
           if k != "XLA_FLAGS" and not k.startswith("NVJAX_")}
    env["JAX_PLATFORMS"] = "cpu"
    if "dir" in _CACHE:
        env["JAX_COMPILATION_CACHE_DIR"] = _CACHE["dir"]
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra)
    return env


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _config_text(params_path, chunk_size):
    return (f"seed: 3\nprogress: false\n"
            f"model: {{name: mlp, hidden: [8], params_path: {params_path}}}\n"
            f"device: {{kind: pcm, params: {{g_max: 5.0}}}}\n"
            f"sweep: {{num_instances: {NUM_INSTANCES}, chunk_size: {chunk_size}, "
            f"t_read_s: [1.0, 86400.0], eval_samples: 60}}\n")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Random (untrained) MLP weights and two configs that differ only in chunk size."""
    d = tmp_path_factory.mktemp("scale")
    _CACHE["dir"] = str(d / "jax_cache")
    params = models_mod.MLP(features=(8, 10)).init(jax.random.key(0), jnp.zeros((1, 64)))
    params_path = str(d / "params.msgpack")
    models_mod.save_params(params_path, params)
    cfgs = {}
    for chunk in (1, 8):
        p = d / f"c{chunk}.yaml"
        p.write_text(_config_text(params_path, chunk))
        cfgs[chunk] = str(p)
    return d, cfgs


def _cli(config, out, **env):
    return subprocess.Popen([sys.executable, "-m", "nvjax.cli", "run", config, "--out", out],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=ROOT, env=_env(**env))


def _finish(proc, timeout=300):
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"timed out:\n{out}\n{err}")
    assert proc.returncode == 0, f"exit {proc.returncode}\n{out}\n{err}"
    return out


@pytest.fixture(scope="module")
def reference(setup, sharded_job):
    """An uninterrupted one-process, one-device ``nvjax run`` (chunk size 1)."""
    d, cfgs = setup
    out = str(d / "reference")
    _finish(_cli(cfgs[1], out))
    with open(os.path.join(out, "results.csv")) as f:
        csv_text = f.read()
    with open(os.path.join(out, "summary.json")) as f:
        points = json.load(f)["points"]
    assert csv_text.count("\n") == 1 + NUM_INSTANCES * 2
    return out, csv_text, points


def _same_results(out, reference):
    _, csv_text, points = reference
    with open(os.path.join(out, "results.csv")) as f:
        assert f.read() == csv_text  # every instance's accuracy, byte for byte
    with open(os.path.join(out, "summary.json")) as f:
        assert json.load(f)["points"] == points


# ---------------------------------------------------------------------------------------------
# 1. Devices

_SHARD_SCRIPT = r"""
import json, sys
import numpy as np, jax, jax.numpy as jnp
from nvjax import cli, sweep

def small(key, w):  # normal draws and a tiny matmul
    a, b = jax.random.split(key)
    return {"z": jax.random.normal(a, (4, 3)) @ w, "u": jax.random.uniform(b, ())}

w, key = jnp.arange(6.0).reshape(3, 2), jax.random.key(5)
sharded = sweep.run_instances(small, key, 13, w, chunk_size=5)  # batches of 8 on 4 devices
alone = sweep.run_instances(small, key, 13, w, chunk_size=5,
                            mesh=sweep.instance_mesh(jax.devices()[:1]))
committed = sweep.run_instances(small, key, 13, jax.device_put(w, jax.devices()[1]), chunk_size=5)
compiled = sweep.compile_chunk(small)
spread = len(compiled(key, np.arange(8), w)["z"].sharding.device_set)
info = {"devices": jax.device_count(), "mesh": compiled.mesh.size, "spread": spread,
        "equal": all(np.array_equal(sharded[k], alone[k]) and np.array_equal(committed[k], alone[k])
                     for k in ("z", "u")),
        "varied": bool(sharded["z"].std() > 0)}
with open(sys.argv[1], "w") as f:
    json.dump(info, f)
sys.exit(cli.main(["run", sys.argv[2], "--out", sys.argv[3]]))  # a real chip sweep
"""


@pytest.fixture(scope="module")
def sharded_job(setup):
    """Started before the reference run, so that the two run side by side."""
    d, cfgs = setup
    (d / "shard.py").write_text(_SHARD_SCRIPT)
    out = str(d / "sharded")
    proc = subprocess.Popen(
        [sys.executable, str(d / "shard.py"), str(d / "shard.json"), cfgs[8], out],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
        env=_env(XLA_FLAGS="--xla_force_host_platform_device_count=4"))
    yield proc, str(d / "shard.json"), out
    if proc.poll() is None:
        proc.kill()
        proc.communicate()


@pytest.mark.slow  # subprocesses that compile a chip sweep
def test_sharded_equals_single_device(sharded_job, reference):
    proc, info_path, out = sharded_job
    stdout = _finish(proc)
    with open(info_path) as f:
        info = json.load(f)
    # normal draws + matmul: 4 devices (each holding a shard) = one device of the same process
    assert info == {"devices": 4, "mesh": 4, "spread": 4, "equal": True, "varied": True}
    # a real chip sweep (deploy + apply, chunks of 8 over 4 devices) = the one-device reference
    assert "on 4 device(s), 1 process(es)" in stdout
    _same_results(out, reference)


def test_explicit_mesh_in_process():
    f = lambda key, w: jax.random.normal(key, (3,)) @ w  # noqa: E731
    w = jnp.ones((3, 2))
    key = jax.random.key(1)
    ref = sweep.run_instances(f, key, 9, w, chunk_size=4)
    mesh = sweep.instance_mesh(jax.devices()[:1])
    assert mesh.axis_names == ("instances",)
    c = sweep.compile_chunk(f, mesh=mesh)
    assert c.mesh is mesh
    np.testing.assert_array_equal(sweep.run_instances(f, key, 9, w, chunk_size=4, mesh=mesh), ref)
    np.testing.assert_array_equal(sweep.run_instances(f, key, 9, w, chunk_size=4, compiled=c), ref)
    with pytest.raises(ValueError, match="multiple of the 1 mesh devices|1-D"):
        c(key, np.zeros((2, 2), np.uint32), w)
    with pytest.raises(ValueError, match="mesh differs"):
        other = Mesh(np.array(jax.devices()[:1]), ("x",))
        sweep.run_instances(f, key, 9, w, compiled=c, mesh=other)
    with pytest.raises(TypeError, match="mesh must be a jax.sharding.Mesh"):
        sweep.compile_chunk(f, mesh="cpu")


# ---------------------------------------------------------------------------------------------
# 2. Hosts


@pytest.mark.slow  # subprocesses that compile a chip sweep
def test_two_processes_equal_one_process(setup, reference, tmp_path):
    _, cfgs = setup
    port = _free_port()
    outs = [str(tmp_path / f"proc{i}") for i in range(2)]
    procs = [_cli(cfgs[8], outs[i], NVJAX_COORDINATOR=f"127.0.0.1:{port}",
                  NVJAX_NUM_PROCESSES="2", NVJAX_PROCESS_ID=str(i)) for i in range(2)]
    stdout = [_finish(p) for p in procs]
    assert "2 process(es)" in stdout[0] and "mean %" not in stdout[1]  # process 0 reports
    _same_results(outs[0], reference)  # chunk size 8 over 2 processes = chunk size 1 on one
    assert not os.path.exists(outs[1])  # process 0 gathers and writes
    with open(os.path.join(outs[0], "summary.json")) as f:
        assert json.load(f)["chunks"]["processes"] == 2


def test_init_distributed_settings(monkeypatch):
    for k in (sweep.ENV_COORDINATOR, sweep.ENV_NUM_PROCESSES, sweep.ENV_PROCESS_ID):
        monkeypatch.delenv(k, raising=False)
    assert sweep.init_distributed() is False  # nothing configured: one process
    assert sweep.init_distributed(num_processes=1) is False
    with pytest.raises(ValueError, match=r"missing: coordinator_address \(NVJAX_COORDINATOR\)"):
        sweep.init_distributed(num_processes=2, process_id=0)
    monkeypatch.setenv(sweep.ENV_COORDINATOR, "127.0.0.1:1")
    monkeypatch.setenv(sweep.ENV_NUM_PROCESSES, "2")
    with pytest.raises(ValueError, match=r"missing: process_id \(NVJAX_PROCESS_ID\)"):
        sweep.init_distributed()
    with pytest.raises(ValueError, match=r"process_id \(NVJAX_PROCESS_ID\) must be in \[0, 2\)"):
        sweep.init_distributed(process_id=2)
    monkeypatch.setenv(sweep.ENV_PROCESS_ID, "one")
    with pytest.raises(ValueError, match="NVJAX_PROCESS_ID must be an integer, got 'one'"):
        sweep.init_distributed()
    with pytest.raises(ValueError, match="'host:port'"):
        sweep.init_distributed("localhost", 2, 0)


def test_cli_distributed_flags_are_checked(tmp_path, monkeypatch, capsys):
    for k in (sweep.ENV_COORDINATOR, sweep.ENV_NUM_PROCESSES, sweep.ENV_PROCESS_ID):
        monkeypatch.delenv(k, raising=False)
    cfg = tmp_path / "c.yaml"
    cfg.write_text("progress: false\n")
    out = str(tmp_path / "o")
    assert cli.main(["run", str(cfg), "--out", out, "--num-processes", "2",
                     "--process-id", "0"]) == 2
    assert "missing: coordinator_address (NVJAX_COORDINATOR)" in capsys.readouterr().err
    assert cli.main(["run", str(cfg), "--out", out, "--num-processes", "2", "--process-id", "2",
                     "--coordinator", "127.0.0.1:1"]) == 2
    assert "process_id must be < num_processes (2)" in capsys.readouterr().err
    assert not os.path.exists(out)


@pytest.mark.parametrize("text,needle", [
    ("distributed: {num_processes: 2, process_id: 2}\n", "process_id must be < num_processes"),
    ("distributed: {num_processes: 0}\n", "num_processes must be >= 1"),
    ("distributed: {coordinator_address: nohost}\n", "'host:port'"),
    ("distributed: {coordinator: 'a:1'}\n", "distributed.coordinator"),
])
def test_distributed_config_is_strict(tmp_path, text, needle):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    with pytest.raises(cfg_mod.ConfigError, match="distributed") as e:
        cfg_mod.load(str(p))
    assert needle in str(e.value)


# ---------------------------------------------------------------------------------------------
# 3. Resume


@pytest.mark.slow  # subprocesses that compile a chip sweep
def test_resume_after_sigkill_equals_uninterrupted(setup, reference, tmp_path):
    _, cfgs = setup
    out = str(tmp_path / "killed")
    chunks = os.path.join(out, "chunks")
    proc = _cli(cfgs[1], out)
    deadline = time.monotonic() + 300
    while not glob.glob(os.path.join(chunks, "*.npz")):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "no chunk file appeared"
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    finished = len(glob.glob(os.path.join(chunks, "*.npz")))
    print(f"killed after {finished} of {NUM_INSTANCES} chunks")
    assert 1 <= finished < NUM_INSTANCES, finished  # killed mid-way
    assert not os.path.exists(os.path.join(out, "results.csv"))
    stdout = _finish(_cli(cfgs[1], out))
    assert f"{finished} of {NUM_INSTANCES} chunks resumed" in stdout
    _same_results(out, reference)
    assert len(glob.glob(os.path.join(chunks, "p0-*.npz"))) == NUM_INSTANCES
    # the folder now belongs to this run: another config is refused, naming the difference
    cfg = cfg_mod.load(cfgs[1])
    other = cfg_mod.from_dict({**cfg_mod.to_dict(cfg), "seed": 4}, cfg_mod.RunConfig)
    with pytest.raises(ValueError, match=r"different run \(config\.seed: 3 -> 4"):
        jobs.reliability(other, out, log=lambda s: None)


def test_rerun_skips_finished_chunks(tmp_path):
    f = lambda key, w: {"a": jax.random.normal(key, (3,)) @ w,  # noqa: E731
                        "n": jax.random.randint(key, (), 0, 100)}
    w = jnp.ones((3, 2))
    key = jax.random.key(7)
    inner = sweep.compile_chunk(f)
    calls = []

    def counting(sweep_key, idx, *args):
        calls.append(int(idx[0]))
        return inner(sweep_key, idx, *args)
    counting.mesh = inner.mesh
    ref = sweep.run_instances(f, key, 10, w, chunk_size=3)
    ckpt = str(tmp_path / "ck")
    run = lambda: sweep.run_instances(f, key, 10, w, chunk_size=3, compiled=counting,  # noqa: E731
                                      checkpoint_dir=ckpt, checkpoint_name="p0")
    first = run()
    assert calls == [0, 3, 6, 9]
    assert sorted(os.listdir(ckpt)) == ["p0-0-3.npz", "p0-3-6.npz", "p0-6-9.npz", "p0-9-10.npz"]
    calls.clear()
    again = run()
    assert calls == []  # nothing recomputed
    os.remove(os.path.join(ckpt, "p0-3-6.npz"))
    third = run()
    assert calls == [3]
    for res in (first, again, third):
        for k in ("a", "n"):
            np.testing.assert_array_equal(res[k], ref[k])
            assert res[k].dtype == ref[k].dtype
    np.savez(os.path.join(ckpt, "p0-6-9.npz"), leaf0=np.zeros((2, 2), np.float32))
    with pytest.raises(ValueError, match="p0-6-9.npz does not hold this sweep's results"):
        run()


def test_open_checkpoint(tmp_path):
    d = str(tmp_path / "run")
    m = {"config": {"seed": 1, "sweep": {"num_instances": 10}}, "v": "1"}
    assert sweep.open_checkpoint(d, m) is False
    assert sweep.open_checkpoint(d, m) is True
    bad = {"config": {"seed": 1, "sweep": {"num_instances": 20}}, "v": "1"}
    with pytest.raises(ValueError, match=r"config\.sweep\.num_instances: 10 -> 20"):
        sweep.open_checkpoint(d, bad)
    with open(os.path.join(d, "manifest.json")) as f:
        assert json.load(f) == m  # untouched
