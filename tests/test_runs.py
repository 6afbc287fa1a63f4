"""Runs that cannot mix or lie (issue 14): manifests, weights tied to their config, resume with
another chunk size, the memory check before the first chunk, corrupt files, multi-process
agreement and start-up.

One tiny reliability run (MLP 64-8-10 on 64 × 64 tiles, 12 chips, 60 test digits) is made once
per module; the other tests copy its output folder and change one thing. Expectations come from
outside the code under test: the uninterrupted run's ``results.csv`` byte for byte, the chunk
files a resume must leave behind, byte counts of the arrays a chunk must hold, and what each
process of a multi-process run prints.
"""
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nvjax import config as cfg_mod
from nvjax import crossbar
from nvjax import data as data_mod
from nvjax import irdrop
from nvjax import jobs
from nvjax import lifetime as lifetime_mod
from nvjax import layers
from nvjax import models as models_mod
from nvjax import sweep
from nvjax.sweep import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

BASE = {"seed": 0, "progress": False,
        "model": {"name": "mlp", "hidden": [8], "epochs": 2, "params_path": None},
        "device": {"kind": "pcm", "params": {"g_max": 5.0}},
        "tile": {"rows": 64, "cols": 64},
        "sweep": {"num_instances": 12, "chunk_size": 8, "t_read_s": [1.0, 86400.0],
                  "eval_samples": 60, "compile": "fast"}}


def _config(base=BASE, schema=cfg_mod.RunConfig, **changes):
    """``base`` with ``section__key=value`` (or ``key=value``) changes, as a config object."""
    d = json.loads(json.dumps(base))
    for name, value in changes.items():
        section, _, key = name.partition("__")
        if key:
            d[section][key] = value
        else:
            d[section] = value
    return cfg_mod.from_dict(d, schema)


def _quiet(_):
    pass


@pytest.fixture(scope="module")
def ref(tmp_path_factory):
    """The uninterrupted reference run (chunk size 8): (folder, results.csv text, summary)."""
    out = str(tmp_path_factory.mktemp("runs") / "ref")
    summary = jobs.reliability(_config(), out, log=_quiet)
    with open(os.path.join(out, "results.csv")) as f:
        text = f.read()
    assert text.count("\n") == 1 + 12 * 2
    return out, text, summary


def _copy(ref_out, dst, drop=()):
    shutil.copytree(ref_out, dst)
    for name in ("results.csv", "summary.json") + tuple(drop):
        os.remove(os.path.join(dst, name))
    return str(dst)


def _chunks(out):
    return sorted(os.listdir(os.path.join(out, "chunks")))


# ---------------------------------------------------------------------------------------------
# Resume with another chunk size


@pytest.mark.slow  # compiles and runs sweeps
def test_resume_with_a_smaller_and_a_larger_chunk_size_is_bit_identical(ref, tmp_path):
    ref_out, ref_csv, ref_summary = ref
    assert _chunks(ref_out) == ["p0-0-8.npz", "p0-8-12.npz"]
    assert ref_summary["chunks"]["total"] == 2 and ref_summary["chunks"]["loaded"] == 0
    # interrupted after chunk [0, 8); resumed with the smaller chunk size 3
    out = _copy(ref_out, tmp_path / "smaller", drop=("chunks/p0-8-12.npz",))
    summary = jobs.reliability(_config(sweep__chunk_size=3), out, log=_quiet)
    with open(os.path.join(out, "results.csv")) as f:
        assert f.read() == ref_csv
    assert _chunks(out) == ["p0-0-8.npz", "p0-11-12.npz", "p0-8-11.npz"]
    assert (summary["chunks"]["loaded"], summary["chunks"]["total"]) == (1, 3)
    # now [0, 8) is lost and [8, 12) sits in two files of chunk size 3: resumed with the larger
    # chunk size 8 (the size of the reference run, whose compiled chunk is reused)
    os.remove(os.path.join(out, "chunks", "p0-0-8.npz"))
    summary = jobs.reliability(_config(sweep__chunk_size=8), out, log=_quiet)
    with open(os.path.join(out, "results.csv")) as f:
        assert f.read() == ref_csv
    assert _chunks(out) == ["p0-0-8.npz", "p0-11-12.npz", "p0-8-11.npz"]
    assert (summary["chunks"]["loaded"], summary["chunks"]["total"]) == (2, 3)
    assert summary["points"] == json.loads(json.dumps(ref_summary["points"]))


def _toy(key, w):
    """Integer-valued draws: no float rounding can differ between compilations."""
    return jnp.floor(8 * jax.random.uniform(key, (3,))) @ w


def test_chunk_files_are_keyed_by_instance_range(tmp_path):
    """Whatever chunk size wrote the files, a rerun loads the ranges it finds (parts of a file
    too) and computes only the gaps, in chunks that end where the next file begins."""
    key, w = jax.random.key(7), jnp.arange(6.0).reshape(3, 2)
    ref = sweep.run_instances(_toy, key, 10, w, chunk_size=10)
    inner = sweep.compile_chunk(_toy)
    calls = []

    def counting(sweep_key, idx, *args):
        calls.append((int(idx[0]), len(idx)))
        return inner(sweep_key, idx, *args)
    counting.mesh = inner.mesh
    ck = str(tmp_path / "ck")

    def run(chunk, start=0, n=10):
        calls.clear()
        return sweep.run_instances(_toy, key, n, w, chunk_size=chunk, compiled=counting,
                                   checkpoint_dir=ck, checkpoint_name="p0", start=start)
    np.testing.assert_array_equal(run(4), ref)
    assert calls == [(0, 4), (4, 4), (8, 4)]
    os.remove(os.path.join(ck, "p0-4-8.npz"))
    np.testing.assert_array_equal(run(3), ref)
    assert calls == [(4, 3), (7, 3)]           # [4, 7) and [7, 8): stops at the next file
    assert sorted(os.listdir(ck)) == ["p0-0-4.npz", "p0-4-7.npz", "p0-7-8.npz", "p0-8-10.npz"]
    np.testing.assert_array_equal(run(16), ref)
    assert calls == []                         # everything loaded
    np.testing.assert_array_equal(run(16, start=5, n=4), ref[5:9])   # parts of files
    assert calls == []
    np.save(os.path.join(ck, "p0-10-x.npy"), np.zeros(2))  # other files are ignored
    np.testing.assert_array_equal(run(16, n=12)[:10], ref)
    assert calls == [(10, 12)]


# ---------------------------------------------------------------------------------------------
# Manifests: output folders and weights


def test_another_config_in_an_output_folder_is_refused_before_training(ref, tmp_path):
    ref_out = ref[0]
    out = _copy(ref_out, tmp_path / "run")
    with open(os.path.join(out, "manifest.json")) as f:
        manifest = f.read()
    for change, diff in (({"seed": 1}, "config.seed: 0 -> 1"),
                         ({"model__hidden": [16]}, "config.model.hidden: [8] -> [16]"),
                         ({"sweep__num_instances": 13}, "config.sweep.num_instances: 12 -> 13")):
        t0 = time.perf_counter()
        with pytest.raises(UserError) as e:
            jobs.reliability(_config(**change), out, log=_quiet)
        assert time.perf_counter() - t0 < 5  # refused before training and compiling
        msg = str(e.value)
        assert diff in msg and os.path.join(out, "manifest.json") in msg
        assert "another output folder" in msg and "delete" in msg
    with open(os.path.join(out, "manifest.json")) as f:
        assert f.read() == manifest  # untouched
    with open(os.path.join(out, "manifest.json"), "w") as f:
        f.write("{not json")
    with pytest.raises(UserError, match=r"manifest\.json .*corrupt"):
        jobs.reliability(_config(), out, log=_quiet)


def test_weights_are_tied_to_the_model_config(ref, tmp_path):
    ref_out = ref[0]
    ds = data_mod.digits(seed=0, flatten=True)
    weights = os.path.join(ref_out, "params.msgpack")
    side = weights + ".manifest.json"
    with open(side) as f:
        info = json.load(f)
    assert info["trained_for"]["model"] == {"name": "mlp", "hidden": [8], "epochs": 2}
    assert info["trained_for"]["training"]["seed"] == 0
    original = models_mod.load_params(weights)
    assert info["params_sha256"] == jobs.params_sha256(original)
    # the output folder's weights, asked for by another model config (the run manifest is
    # bypassed here: get_model alone must refuse)
    for change, diff in (({"model__epochs": 3}, "model.epochs: 2 -> 3"),
                         ({"model__hidden": [16]}, "model.hidden: [8] -> [16]"),
                         ({"seed": 5}, "split_seed: 0 -> 5")):
        with pytest.raises(UserError) as e:
            jobs.get_model(_config(**change), ds, ref_out)
        assert diff in str(e.value) and weights in str(e.value) and "retrain" in str(e.value)
    # a user's params_path with a manifest beside it: the same rule
    mine = str(tmp_path / "w.msgpack")
    shutil.copy(weights, mine)
    shutil.copy(side, mine + ".manifest.json")
    with pytest.raises(UserError, match=re.escape(mine) + r".*model\.hidden: \[8\] -> \[16\]"):
        jobs.get_model(_config(model__hidden=[16], model__params_path=mine), ds, None)
    model, params, trained = jobs.get_model(_config(model__params_path=mine), ds, None)
    assert not trained and jobs.params_sha256(params) == info["params_sha256"]
    # weights changed behind the manifest's back
    models_mod.save_params(mine, jax.tree_util.tree_map(lambda a: a * 2, original))
    with pytest.raises(UserError, match=r"changed after they were written"):
        jobs.get_model(_config(model__params_path=mine), ds, None)
    with open(mine + ".manifest.json", "w") as f:
        f.write("[1, 2")
    with pytest.raises(UserError, match=re.escape(mine + ".manifest.json") + ".*corrupt"):
        jobs.get_model(_config(model__params_path=mine), ds, None)
    # an output folder's weights without a manifest (an older nvjax) are not reused
    old = tmp_path / "old"
    old.mkdir()
    shutil.copy(weights, old / "params.msgpack")
    with pytest.raises(UserError, match=r"params\.msgpack has no manifest .*delete it to retrain"):
        jobs.get_model(_config(), ds, str(old))
    # a user's weights without a manifest: only shapes can be checked, and the log says so
    bare = str(tmp_path / "bare.msgpack")
    shutil.copy(weights, bare)
    with pytest.raises(UserError, match=re.escape(bare) + r" does not hold parameters of the "
                                        r"configured model \(model\.name mlp, model\.hidden "
                                        r"\[16\]\).*Dense_0"):
        jobs.get_model(_config(model__hidden=[16], model__params_path=bare), ds, None)
    said = []
    _, params, trained = jobs.get_model(_config(model__params_path=bare), ds, None, log=said.append)
    assert not trained and jobs.params_sha256(params) == info["params_sha256"]
    assert len(said) == 1 and bare in said[0] and "no manifest" in said[0]
    # corrupt and wrong files are named
    with open(bare, "wb") as f:
        f.write(b"\x93garbage")
    with pytest.raises(UserError, match=re.escape(bare) + " is corrupt"):
        jobs.get_model(_config(model__params_path=bare), ds, None)


def test_lifetime_output_folders_are_guarded(ref, tmp_path, monkeypatch):
    """``nvjax lifetime`` claims its folder like ``nvjax run``: another config there is refused
    before any training, a run folder is not a lifetime folder, and chunk_size may change."""
    ref_out = ref[0]

    class Stop(Exception):
        pass

    def stop(*a, **k):
        raise Stop
    monkeypatch.setattr(lifetime_mod, "lifetime", lambda *a, **k: None)
    monkeypatch.setattr(lifetime_mod, "run", stop)  # the simulation itself is tested elsewhere
    base = {"seed": 0, "progress": False,
            "model": {**BASE["model"], "params_path": os.path.join(ref_out, "params.msgpack")},
            "device": {"kind": "pcm"}, "tile": BASE["tile"],
            "lifetime": {"num_steps": 2, "batch_size": 4}, "num_chips": 2, "chunk_size": 2,
            "eval_samples": 60}
    out = str(tmp_path / "life")
    with pytest.raises(Stop):
        jobs.run_lifetime(_config(base, cfg_mod.LifetimeRunConfig), out, log=_quiet)
    with open(os.path.join(out, "manifest.json")) as f:
        manifest = json.load(f)
    assert manifest["job"] == "nvjax lifetime" and "params_sha256" in manifest
    with pytest.raises(Stop):  # the same run again, with another chunk size: accepted
        jobs.run_lifetime(_config(base, cfg_mod.LifetimeRunConfig, chunk_size=1), out, log=_quiet)
    for change, diff in (({"num_chips": 3}, "config.num_chips: 2 -> 3"),
                         ({"lifetime": {"num_steps": 4, "batch_size": 4}},
                          "config.lifetime.num_steps: 2 -> 4")):
        with pytest.raises(UserError) as e:
            jobs.run_lifetime(_config(base, cfg_mod.LifetimeRunConfig, **change), out, log=_quiet)
        assert diff in str(e.value) and "another output folder" in str(e.value)
    with pytest.raises(UserError, match=r"job: 'nvjax run \(reliability\)' -> 'nvjax lifetime'"):
        jobs.run_lifetime(_config(base, cfg_mod.LifetimeRunConfig), ref_out, log=_quiet)
    with pytest.raises(UserError, match=r"job: 'nvjax lifetime' -> 'nvjax run \(reliability\)'"):
        jobs.reliability(_config(), out, log=_quiet)


# ---------------------------------------------------------------------------------------------
# Corrupt chunk files


def test_a_corrupt_chunk_file_is_named(ref, tmp_path):
    ref_out = ref[0]
    out = _copy(ref_out, tmp_path / "run")
    path = os.path.join(out, "chunks", "p0-8-12.npz")
    with open(path, "rb") as f:
        data = f.read()
    for bad in (data[: len(data) // 2], b"not a zip file"):
        with open(path, "wb") as f:
            f.write(bad)
        with pytest.raises(UserError) as e:
            jobs.reliability(_config(), out, log=_quiet)
        msg = str(e.value)
        assert f"chunk file {path} is corrupt" in msg and "delete it" in msg
    os.remove(path)  # as the message says: the rerun recomputes it
    jobs.reliability(_config(), out, log=_quiet)
    with open(os.path.join(out, "results.csv")) as f:
        assert f.read() == ref[1]


# ---------------------------------------------------------------------------------------------
# Memory


def _size(n_bytes, unit):
    return float(n_bytes) * {"MB": 1e6, "GB": 1e9}[unit]


@pytest.mark.slow  # compiles and runs sweeps
def test_memory_estimate_refuses_an_absurd_chunk_size(ref):
    ref_out, _, ref_summary = ref
    n = 10 ** 7
    cfg = _config(model__params_path=os.path.join(ref_out, "params.msgpack"),
                  sweep__num_instances=n, sweep__chunk_size=n)
    with pytest.raises(UserError) as e:
        jobs.reliability(cfg, None, log=_quiet)
    msg = str(e.value)
    m = re.search(r"sweep\.chunk_size = 10000000: one chunk of 10000000 instances needs about "
                  r"([\d.]+) (MB|GB) .*of the ([\d.]+) (MB|GB) available .*set sweep\.chunk_size "
                  r"to at most (\d+)", msg)
    assert m, msg
    need, free, fits = _size(m[1], m[2]), _size(m[3], m[4]), int(m[5])
    # independent lower bound: a chunk holds every instance's programmed tiles at once
    model, params, _ = jobs.get_model(cfg, data_mod.digits(seed=0, flatten=True), None)
    x = jnp.zeros((60, 64))
    tiles = jax.eval_shape(jobs.accuracy_instance(model).prepare, jax.random.key(0),
                           cfg_mod.make_device(cfg.device), layers.strip_params(params),
                           cfg.tile, x, jnp.zeros(60, jnp.int32), jnp.ones(2))
    state_bytes = sum(np.prod(t.shape) * t.dtype.itemsize for t in jax.tree_util.tree_leaves(tiles))
    assert need >= 0.99 * n * state_bytes
    assert need > 0.9 * free
    assert 1 <= fits and fits * need / n <= 0.9 * free * 1.01
    # the reference run recorded its own (small) estimate, of the same per-instance size
    small = ref_summary["chunks"]["memory_estimate_bytes"]
    assert 8 * state_bytes <= small <= 8 * need / n * 2 + 1e6
    assert ref_summary["chunks"]["memory_available_bytes"] > 0


# ---------------------------------------------------------------------------------------------
# Several processes


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith("NVJAX_")}
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra)
    return env


def _start(args, **env):
    return subprocess.Popen([sys.executable] + args, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=ROOT, env=_env(**env))


def _wait(proc, timeout=120):
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"timed out:\n{out}\n{err}")
    return proc.returncode, out, err


_LONE = r"""
import sys
from nvjax import config, jobs
cfg = config.from_dict({"progress": False, "distributed": {
    "coordinator_address": sys.argv[1], "num_processes": 2, "process_id": 1,
    "startup_timeout_s": 2}}, config.RunConfig)
try:
    jobs.reliability(cfg, None)
except jobs.UserError as e:
    print(e, file=sys.stderr)
    sys.exit(2)
"""


_TOY_PAIR = r"""
import json, os, sys
import jax, jax.numpy as jnp, numpy as np
from nvjax import sweep
addr, pid, ck = sys.argv[1], int(sys.argv[2]), sys.argv[3]
sweep.init_distributed(addr, 2, pid, initialization_timeout_s=120)

def toy(key, w):
    return jnp.floor(8 * jax.random.uniform(key, (3,))) @ w
key, w = jax.random.key(7), jnp.arange(6.0).reshape(3, 2)
run = lambda chunk: sweep.run_instances(toy, key, 10, w, chunk_size=chunk, checkpoint_dir=ck,
                                        checkpoint_name="p0", stats=stats)
stats = {}
a = run(4)
if pid == 0:
    os.remove(os.path.join(ck, "p0-4-8.npz"))
sweep.broadcast(np.zeros(1))  # a collective: the file is gone before anyone goes on
stats = {}
b = run(3)
resumed = dict(stats)
if pid == 0:
    with open(os.path.join(ck, "p0-4-7.npz"), "wb") as f:
        f.write(b"junk")
sweep.broadcast(np.zeros(1))
try:
    run(3)
    err = None
except sweep.UserError as e:
    err = str(e)
print(json.dumps({"a": a.tolist(), "b": b.tolist(), "stats": resumed, "err": err,
                  "files": sorted(os.listdir(ck))}))
"""


@pytest.mark.slow  # subprocesses (seconds each; all run side by side)
def test_processes_agree_or_stop_together_and_a_lone_one_times_out(tmp_path):
    """Two processes started with different seeds stop before any work with the same error,
    naming the key; a process whose peer never comes gives up within the start-up timeout
    (option ``distributed.startup_timeout_s`` or ``$NVJAX_STARTUP_TIMEOUT_S``) naming the
    coordinator, whether it is process 0 (which hosts it) or another."""
    cfgs = []
    for seed in (3, 4):
        p = tmp_path / f"seed{seed}.yaml"
        p.write_text(f"seed: {seed}\nprogress: false\nmodel: {{hidden: [8], epochs: 1}}\n"
                     "sweep: {num_instances: 4, chunk_size: 2, t_read_s: [1.0]}\n")
        cfgs.append(str(p))
    port = _free_port()
    pair = [_start(["-m", "nvjax.cli", "run", cfgs[i], "--out", str(tmp_path / f"out{i}")],
                   NVJAX_COORDINATOR=f"127.0.0.1:{port}", NVJAX_NUM_PROCESSES="2",
                   NVJAX_PROCESS_ID=str(i)) for i in range(2)]
    lone0_addr = f"127.0.0.1:{_free_port()}"
    lone0 = _start(["-m", "nvjax.cli", "run", cfgs[0], "--out", str(tmp_path / "lone0")],
                   NVJAX_COORDINATOR=lone0_addr, NVJAX_NUM_PROCESSES="2", NVJAX_PROCESS_ID="0",
                   NVJAX_STARTUP_TIMEOUT_S="2")
    lone1_addr = f"127.0.0.1:{_free_port()}"
    t0 = time.monotonic()
    lone1 = _start(["-c", _LONE, lone1_addr])
    toy_addr, ck = f"127.0.0.1:{_free_port()}", str(tmp_path / "ck")
    toys = [_start(["-c", _TOY_PAIR, toy_addr, str(i), ck]) for i in range(2)]

    code, _, err = _wait(lone1)
    assert code == 2
    assert (f"process 1 could not reach the coordinator {lone1_addr} (process 0) within 2 s"
            in err), err
    code, _, err = _wait(lone0)
    assert code == 2 and "Traceback" not in err, err
    assert (f"process(es) 1 of 2 had not reached the coordinator {lone0_addr}" in err
            and "NVJAX_STARTUP_TIMEOUT_S" in err), err
    assert time.monotonic() - t0 < 60  # not JAX's 300 s

    results = [_wait(p) for p in pair]
    want = ("the processes of this multi-process run were started with different settings, so "
            "their results cannot be combined: process 1 differs from process 0 in "
            "config.seed: 3 -> 4")
    for code, out, err in results:
        assert code != 0 and want in err, err
        assert "mean %" not in out
    lines = [[ln for ln in err.splitlines() if want in ln] for _, _, err in results]
    assert lines[0][-1].split(want)[1] == lines[1][-1].split(want)[1]  # the same message
    assert not os.path.exists(tmp_path / "out0" / "manifest.json")  # stopped before any work

    # two processes resume a sweep with another chunk size, and stop together on a corrupt file
    want = sweep.run_instances(_toy, jax.random.key(7), 10, jnp.arange(6.0).reshape(3, 2),
                               chunk_size=10).tolist()
    got = []
    for p in toys:
        code, out, err = _wait(p)
        assert code == 0, err
        got.append(json.loads([ln for ln in out.splitlines() if ln.startswith("{")][-1]))
    for g in got:
        assert g["a"] == want and g["b"] == want
        assert (g["stats"]["loaded"], g["stats"]["chunks"]) == (2, 4)
        assert g["files"] == ["p0-0-4.npz", "p0-4-7.npz", "p0-7-8.npz", "p0-8-10.npz"]
        assert g["err"] == got[0]["err"] and "p0-4-7.npz is corrupt" in g["err"]


# ---------------------------------------------------------------------------------------------
# IR drop: failed solves are refused, the first-order form is checked


@pytest.mark.slow  # compiles and runs sweeps
def test_a_failed_ir_solve_is_counted_never_resumed_and_refused(ref, tmp_path):
    """With one solver iteration (tolerance 1e-4) no IR-drop solve converges: every instance's
    accuracy is NaN, summary.json counts them (valid JSON, no NaN statistics), no chunk file is
    written (a rerun cannot "resume" NaNs), the figure is drawn, and the job stops with an error
    saying what to change."""
    cfg = _config(model__params_path=os.path.join(ref[0], "params.msgpack"),
                  device__params={"g_max": 25.0},
                  tile={"rows": 64, "cols": 64, "ir_drop": "solver", "r_wire": 2.0,
                        "ir_max_iter": 1},
                  sweep={"num_instances": 4, "chunk_size": 2, "t_read_s": [1.0],
                         "eval_samples": 30, "compile": "fast"})
    out = str(tmp_path / "nan")
    with pytest.raises(UserError) as e:
        jobs.reliability(cfg, out, log=_quiet)
    msg = str(e.value)
    assert "did not converge for 4 of 4 chip instances" in msg, msg
    assert "raise tile.ir_max_iter" in msg and "tile.r_wire" in msg and "tile.rows" in msg
    assert "tile.ir_max_iter = 1 " in msg and os.path.join(out, "summary.json") in msg
    with open(os.path.join(out, "summary.json")) as f:
        text = f.read()
    assert "NaN" not in text
    summary = json.loads(text)
    assert summary["ir_unconverged_instances"] == 4
    (point,) = summary["points"]
    assert point["ir_unconverged_instances"] == 4 and point["n"] == 0 and point["mean"] is None
    with open(os.path.join(out, "results.csv")) as f:
        rows = f.read().splitlines()[1:]
    assert len(rows) == 4 and all(r.endswith(",nan") for r in rows)
    assert os.path.getsize(os.path.join(out, "accuracy_vs_time.png")) > 0
    assert not os.path.isdir(os.path.join(out, "chunks")) or not _chunks(out)
    assert "-" in jobs.format_table(summary)  # no crash on a point without finite accuracy


def test_accuracy_figure_with_failed_instances(tmp_path):
    """NaN accuracies (failed IR-drop solves) are left out of the bands; all-NaN draws an empty
    figure saying so (matplotlib used to fail with "Data cannot be log-scaled")."""
    points = [({"g_max": 5.0}, None), ({"g_max": 25.0}, None)]
    times = [1.0, 86400.0]
    mixed = np.array([[0.9, np.nan], [0.8, 0.7], [np.nan, np.nan]])
    for i, results in enumerate(([mixed, np.full((3, 2), np.nan)],
                                 [np.full((3, 2), np.nan)] * 2)):
        path = str(tmp_path / f"f{i}.png")
        jobs.plot_accuracy_vs_time(path, points, times, results, 0.95)
        assert os.path.getsize(path) > 0


@pytest.mark.slow
def test_first_order_ir_drop_is_checked_before_the_sweep(ref, tmp_path, monkeypatch):
    """Inside the jitted sweep the first-order form's validity cannot be estimated, so the job
    checks it once, before the sweep, on the ideal target conductances of every layer: a
    RuntimeWarning with the numbers where it is off by more than 5 % (confirmed here against the
    solver on the first layer's tiles), nothing where it is valid or unused."""
    class Stop(Exception):
        pass

    def stop(*a, **k):
        raise Stop
    monkeypatch.setattr(sweep, "run_instances", stop)
    params_path = os.path.join(ref[0], "params.msgpack")

    def run(**tile):
        cfg = _config(model__params_path=params_path, device__params={"g_max": 25.0},
                      tile={"rows": 64, "cols": 64, **tile})
        with pytest.raises(Stop):
            jobs.reliability(cfg, None, log=_quiet)
        return cfg

    with pytest.warns(RuntimeWarning) as got:
        cfg = run(ir_drop="first_order", r_wire=50.0)
    (w,) = [str(x.message) for x in got if "first-order" in str(x.message)]
    assert "tile.ir_drop: first_order" in w and "64×64, r_wire = 50 Ω" in w and "Dense_0" in w
    assert "tile.ir_drop: solver" in w
    with pytest.warns(RuntimeWarning, match=r"tile\.ir_predistort: 4 .*r_wire = 50 Ω"):
        run(ir_drop="solver", ir_predistort=4, r_wire=50.0)
    # independent: the first-order cell voltages of Dense_0's first tile against the solver
    w0 = layers.kernels(models_mod.load_params(params_path))["Dense_0"]
    gp, _, _ = crossbar.tile(w0, cfg_mod.make_device(cfg.device), config=cfg.tile)
    g = crossbar.tile_grid(gp, cfg.tile)[0, 0]
    v_in = jax.random.uniform(jax.random.key(0), (64,), maxval=0.2)
    exact = irdrop.voltages(g, v_in, 50.0, max_iter=2000)
    assert bool(exact.converged)
    v1 = irdrop.voltages_first_order(g, v_in, 50.0)
    v = exact.v_cell
    assert float(jnp.max(jnp.abs(v1 - v)) / jnp.max(jnp.abs(v))) > 0.05
    for tile in ({"ir_drop": "first_order", "r_wire": 0.01}, {"ir_drop": "none", "r_wire": 50.0},
                 {"ir_drop": "solver", "r_wire": 50.0}):
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)
            run(**tile)


@pytest.mark.slow  # compiles a lifetime loop with the solver (about a minute on 2 cores)
def test_lifetime_with_failed_ir_solves_is_refused(ref, tmp_path):
    """``nvjax lifetime`` with IR-drop solves that cannot converge (one iteration): the summary
    counts the failed evaluation points, the files and figure are written, and the job stops
    with an error saying what to change."""
    base = {"seed": 0, "progress": False,
            "model": {**BASE["model"], "params_path": os.path.join(ref[0], "params.msgpack")},
            "device": {"kind": "pcm", "params": {"g_max": 25.0}},
            "tile": {"rows": 64, "cols": 64, "ir_drop": "solver", "r_wire": 2.0,
                     "ir_max_iter": 1},
            "lifetime": {"num_steps": 2, "batch_size": 4}, "num_chips": 2, "chunk_size": 2,
            "eval_samples": 30}
    out = str(tmp_path / "life")
    with pytest.raises(UserError) as e:
        jobs.run_lifetime(_config(base, cfg_mod.LifetimeRunConfig), out, log=_quiet)
    msg = str(e.value)
    with open(os.path.join(out, "summary.json")) as f:
        summary = json.load(f)
    bad = summary["ir_unconverged_points"]
    assert bad > 0
    assert f"did not converge at {bad} of " in msg and "raise tile.ir_max_iter" in msg, msg
    with open(os.path.join(out, "results.csv")) as f:
        assert sum(",nan," in row for row in f) >= bad
    assert os.path.getsize(os.path.join(out, "lifetime.png")) > 0


@pytest.mark.slow  # two subprocesses
def test_a_bad_out_folder_stops_every_process(tmp_path):
    """Only process 0 creates the output folder; when it cannot, every process of the run stops
    with the same one-line error (the others used to wait for it forever)."""
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    cfg = tmp_path / "run.yaml"
    cfg.write_text("seed: 0\nprogress: false\nmodel: {hidden: [8], epochs: 1}\n"
                   "sweep: {num_instances: 2, chunk_size: 2, t_read_s: [1.0]}\n")
    out = str(blocker / "out")
    port = _free_port()
    procs = [_start(["-m", "nvjax.cli", "run", str(cfg), "--out", out],
                    NVJAX_COORDINATOR=f"127.0.0.1:{port}", NVJAX_NUM_PROCESSES="2",
                    NVJAX_PROCESS_ID=str(i), NVJAX_STARTUP_TIMEOUT_S="60") for i in range(2)]
    lines = []
    for p in procs:
        code, out_text, err = _wait(p, timeout=90)
        assert code == 2 and "Traceback" not in err, err
        (line,) = [ln for ln in err.splitlines() if "error:" in ln]
        lines.append(line)
    assert lines[0] == lines[1] and f"--out {out}: cannot create or write" in lines[0]
