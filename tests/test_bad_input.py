"""Bad input, tried as a new user would: every case is refused with a clear error, never a wrong
number (issue 14, "Bad input").

* configs: ``nvjax run`` / ``nvjax lifetime`` in-process (``cli.main``) exit 2 with one line
  ``nvjax <cmd>: error: <message>`` naming the key, no traceback, before any work (the output
  folder is not even created), and the loader raises ``ConfigError``;
* the command line: paths, corrupt files, an output folder holding another run, options, Ctrl-C
  (a subprocess interrupted with SIGINT: exit 130);
* the Python API: device factories, ``devices.read``, ``TileConfig``, ``crossbar.mvm``,
  ``chip.apply``, disturb presets and ``LifetimeConfig`` raise the documented error type naming
  the argument.

The missing-key rule (every key has a documented default; the resolved config is printed with
the defaults marked) is checked at the end.
"""
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import pytest

import nvjax
from nvjax import chip as chip_mod
from nvjax import cli
from nvjax import config as cfg_mod
from nvjax import crossbar as xb
from nvjax import data as data_mod
from nvjax import devices as D
from nvjax import disturb as R
from nvjax import lifetime as L
from nvjax import models

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NAN, INF = float("nan"), float("inf")


def _is_user_error(e) -> bool:
    """The error is (a subclass of) ``nvjax._checks.UserError``: what the CLI reports as one line."""
    return any(c.__name__ == "UserError" for c in type(e).__mro__)


def _error_line(rc, err, cmd):
    """The single ``nvjax <cmd>: error: ...`` line of a refused command (exit 2, no traceback)."""
    assert rc == 2, f"exit {rc}, stderr:\n{err}"
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ln.startswith(f"nvjax {cmd}: error: ")]
    assert len(lines) == 1, f"expected one error line, stderr:\n{err}"
    return lines[0]


def _cli(capsys, *argv):
    rc = cli.main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


# --------------------------------------------------------------------------------------------
# Configs: every case fails at validation, before any work, naming the key
# --------------------------------------------------------------------------------------------
TEST_SPLIT = str(len(data_mod.digits().y_test))  # what eval_samples may use (450)

RUN_CASES = [  # (id, YAML text, words the message must contain)
    ("g_max_nan", "device: {params: {g_max: .nan}}", ["g_max", "finite"]),
    ("g_max_zero", "device: {params: {g_max: 0.0}}", ["g_max", "> 0"]),
    ("g_max_negative", "device: {params: {g_max: -25.0}}", ["g_max", "> 0"]),
    ("read_q_negative", "device: {params: {read_q: -0.5}}", ["read_q", ">= 0"]),
    ("t0_zero", "device: {params: {t0: 0.0}}", ["t0"]),
    ("stuck_sum_above_1", "device: {p_stuck_min: 0.7, p_stuck_max: 0.7}",
     ["p_stuck_min + p_stuck_max", "1"]),
    ("stuck_nan", "device: {p_stuck_min: .nan}", ["p_stuck_min"]),
    ("stuck_above_1", "device: {p_stuck_max: 1.5}", ["p_stuck_max"]),
    ("reram_g_min_above_g_max", "device: {kind: reram, params: {g_min: 50.0}}", ["g_min"]),
    ("levels_bits", "device: {kind: levels, params: {bits: 9}}", ["bits"]),
    ("levels_sigma_negative", "device: {kind: levels, params: {sigma: -0.1}}", ["sigma"]),
    ("flash_slope_zero", "device: {kind: flash, params: {n_slope: 0.0}}", ["n_slope"]),
    ("malformed_table_length", "device: {params: {prog_coeff: [1.0, 2.0]}}", ["prog_coeff", "3"]),
    ("malformed_list_for_number", "device: {params: {g_max: [25.0, 30.0]}}", ["g_max", "number"]),
    ("malformed_grid_table", "sweep: {device_grid: {nu_mu: [0.1, 0.2]}}", ["nu_mu"]),
    ("unknown_device_param", "device: {params: {gmax: 25.0}}", ["gmax"]),
    ("adc_bound_inf", "tile: {adc_bound: .inf}", ["tile.adc_bound", "finite"]),
    ("out_noise_nan", "tile: {out_noise: .nan}", ["tile.out_noise", "finite"]),
    ("out_noise_negative", "tile: {out_noise: -0.1}", ["out_noise"]),
    ("r_wire_nan", "tile: {r_wire: .nan}", ["tile.r_wire"]),
    ("v_read_zero", "tile: {v_read: 0.0}", ["v_read"]),
    ("adc_bits_range", "tile: {adc_bits: 30}", ["adc_bits"]),
    ("ir_omega_above_1", "tile: {ir_omega: 1.5}", ["ir_omega"]),
    ("t_read_nan", "sweep: {t_read_s: [1.0, .nan]}", ["t_read_s[1]", "finite"]),
    ("t_read_negative", "sweep: {t_read_s: [-1.0]}", ["t_read_s"]),
    ("t_read_inf", "sweep: {t_read_s: [.inf]}", ["t_read_s[0]"]),
    ("grid_nan", "sweep: {device_grid: {read_q: [0.01, .nan]}}", ["device_grid.read_q[1]"]),
    ("grid_bad_second_value", "sweep: {device_grid: {g_max: [25.0, -1.0]}}",
     ["device_grid.g_max[1]", "g_max"]),
    ("grid_stuck_combination", "sweep: {device_grid: {p_stuck_min: [0.6], p_stuck_max: [0.6]}}",
     ["p_stuck_min + p_stuck_max"]),
    ("eval_samples_too_many", "sweep: {eval_samples: 100000}",
     ["sweep.eval_samples", "100000", TEST_SPLIT]),
    ("eval_samples_zero", "sweep: {eval_samples: 0}", ["eval_samples"]),
    ("num_instances_zero", "sweep: {num_instances: 0}", ["num_instances"]),
    ("seed_too_large", "seed: 4294967296", ["seed", "2**32"]),
    ("seed_negative", "seed: -1", ["seed"]),
    ("prng_unknown", "prng: mersenne", ["prng"]),
    ("hidden_zero", "model: {hidden: [0]}", ["hidden"]),
    ("wrong_type", "sweep: {num_instances: '10'}", ["sweep.num_instances", "int"]),
    ("unknown_key", "sweeps: {num_instances: 10}", ["sweeps", "did you mean"]),
    ("process_id_out_of_range", "distributed: {num_processes: 2, process_id: 2}", ["process_id"]),
]

LIFETIME_CASES = [
    ("v_ref_nan", "disturb: {params: {v_ref: .nan}}", ["disturb.params.v_ref"]),
    ("kappa_nan", "disturb: {params: {kappa: .nan}}", ["disturb.params.kappa"]),
    ("v0_negative", "disturb: {params: {v0: -0.05}}", ["v0", "> 0"]),
    ("n_ref_zero", "disturb: {params: {n_ref: 0.0}}", ["n_ref"]),
    ("unknown_disturb_param", "disturb: {params: {vref: 0.2}}", ["vref"]),
    ("r_wire_nan", "tile: {r_wire: .nan}", ["tile.r_wire"]),
    ("inferences_inf", "lifetime: {inferences_per_step: .inf}",
     ["lifetime.inferences_per_step", "finite"]),
    ("rate_zero", "lifetime: {inference_rate_hz: 0.0}", ["inference_rate_hz"]),
    ("accuracy_drop_nan", "lifetime: {accuracy_drop: .nan}", ["accuracy_drop"]),
    ("eval_samples_too_many", "eval_samples: 100000", ["eval_samples", TEST_SPLIT]),
    ("batch_above_test_split", "lifetime: {batch_size: 1000}", ["batch_size", TEST_SPLIT]),
    ("g_inf_outside_range", "disturb: {params: {g_inf: 80.0}}", ["g_inf"]),
    ("seed_too_large", "seed: 5000000000", ["seed"]),
]


def _write(tmp_path, text, name="c.yaml"):
    p = tmp_path / name
    p.write_text(text + "\n")
    return str(p)


@pytest.mark.parametrize("text,needles", [c[1:] for c in RUN_CASES], ids=[c[0] for c in RUN_CASES])
def test_run_config_refused(tmp_path, capsys, text, needles):
    path = _write(tmp_path, text)
    with pytest.raises(cfg_mod.ConfigError) as e:
        cfg_mod.load(path)
    assert _is_user_error(e.value) and path in str(e.value)
    out = tmp_path / "out"
    line = _error_line(*_cli(capsys, "run", path, "--out", str(out))[::2], "run")
    assert path in line
    for n in needles:
        assert n in line, f"{n!r} not in {line!r}"
    assert not out.exists()  # refused before any work


@pytest.mark.parametrize("text,needles", [c[1:] for c in LIFETIME_CASES],
                         ids=[c[0] for c in LIFETIME_CASES])
def test_lifetime_config_refused(tmp_path, capsys, text, needles):
    path = _write(tmp_path, text if text.startswith("lifetime") else text + "\nlifetime: {}")
    with pytest.raises(cfg_mod.ConfigError):
        cfg_mod.load_lifetime(path)
    out = tmp_path / "out"
    line = _error_line(*_cli(capsys, "lifetime", path, "--out", str(out))[::2], "lifetime")
    for n in needles:
        assert n in line, f"{n!r} not in {line!r}"
    assert not out.exists()


def test_config_file_missing_or_not_yaml(tmp_path, capsys):
    missing = str(tmp_path / "nope.yaml")
    line = _error_line(*_cli(capsys, "run", missing, "--out", str(tmp_path / "o"))[::2], "run")
    assert missing in line and "not found" in line
    bad = _write(tmp_path, "sweep: [unclosed", "bad.yaml")
    line = _error_line(*_cli(capsys, "lifetime", bad, "--out", str(tmp_path / "o"))[::2],
                       "lifetime")
    assert bad in line and "YAML" in line


# --------------------------------------------------------------------------------------------
# The command line: options, paths, files, runs
# --------------------------------------------------------------------------------------------
def test_out_under_a_file_or_a_file(tmp_path, capsys):
    path = _write(tmp_path, "seed: 1")
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    line = _error_line(*_cli(capsys, "run", path, "--out", str(a_file / "sub"))[::2], "run")
    assert "--out" in line and str(a_file / "sub") in line
    line = _error_line(*_cli(capsys, "lifetime", _write(tmp_path, "lifetime: {}", "l.yaml"),
                             "--out", str(a_file))[::2], "lifetime")
    assert "--out" in line and "not a folder" in line


def test_option_out_of_range(tmp_path, capsys):
    path = _write(tmp_path, "seed: 1")
    line = _error_line(*_cli(capsys, "run", path, "--out", str(tmp_path / "o"),
                             "--num-processes", "2", "--process-id", "5")[::2], "run")
    assert "process_id" in line


@pytest.mark.parametrize("argv,needle", [
    (["bench", "--instances", "0"], "--instances"),
    (["bench", "--repeat", "-1"], "--repeat"),
])
def test_bench_options_refused_by_the_parser(capsys, argv, needle):
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and "nvjax bench: error:" in err and needle in err
    assert "Traceback" not in err


def test_bench_unknown_workload(capsys):
    line = _error_line(*_cli(capsys, "bench", "--workloads", "resnet-io")[::2], "bench")
    assert "--workloads" in line and "resnet-io" in line


def test_params_path_corrupt_or_a_folder(tmp_path, capsys):
    bad = tmp_path / "weights.msgpack"
    bad.write_bytes(b"not a msgpack file")
    path = _write(tmp_path, f"model: {{params_path: '{bad}'}}\nprogress: false")
    line = _error_line(*_cli(capsys, "run", path, "--out", str(tmp_path / "o"))[::2], "run")
    assert str(bad) in line
    path = _write(tmp_path, f"model: {{params_path: '{tmp_path}'}}", "d.yaml")
    line = _error_line(*_cli(capsys, "run", path, "--out", str(tmp_path / "o2"))[::2], "run")
    assert "model.params_path" in line or "params_path" in line


@pytest.fixture
def started_run(tmp_path, monkeypatch, capsys):
    """An output folder of a tiny run interrupted at its first chunk (training stubbed, and the
    Monte Carlo engine interrupted: what is tested is what a rerun does with the folder)."""
    def train(key, model, ds, *, epochs, **kw):
        return model.init(key, jnp.asarray(ds.x_train[:1])), {}  # variables, as train returns

    def run_instances(*args, **kwargs):
        raise KeyboardInterrupt
    text = ("model: {hidden: [8], epochs: 1}\nprogress: false\n"
            "sweep: {num_instances: 2, chunk_size: 2, t_read_s: [1.0], eval_samples: 20}")
    path = _write(tmp_path, text, "a.yaml")
    out = tmp_path / "run"
    with monkeypatch.context() as m:
        m.setattr(models, "train", train)
        m.setattr(nvjax.sweep, "run_instances", run_instances)
        assert cli.main(["run", path, "--out", str(out)]) == 130
    capsys.readouterr()
    assert (out / "manifest.json").exists()
    return tmp_path, text, out


def test_changed_config_in_existing_out(started_run, capsys):
    tmp_path, text, out = started_run
    path = _write(tmp_path, text.replace("num_instances: 2", "num_instances: 3"), "b.yaml")
    line = _error_line(*_cli(capsys, "run", path, "--out", str(out))[::2], "run")
    assert "num_instances" in line and str(out) in line


def test_corrupt_chunk_file(started_run, capsys):
    tmp_path, text, out = started_run
    os.makedirs(out / "chunks", exist_ok=True)
    chunk = out / "chunks" / "p0-0-2.npz"   # the chunk of instances [0, 2) of point 0
    chunk.write_bytes(b"\x00 truncated")
    line = _error_line(*_cli(capsys, "run", str(tmp_path / "a.yaml"), "--out", str(out))[::2],
                       "run")
    assert str(chunk) in line


def test_ctrl_c_exits_130_with_a_resume_hint(tmp_path):
    """SIGINT during a run (here: while the weights train) ends it with exit status 130 and one
    line, no traceback."""
    path = _write(tmp_path, "model: {epochs: 1000}\nprogress: false")
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    p = subprocess.Popen([sys.executable, "-m", "nvjax.cli", "run", path, "--out",
                          str(tmp_path / "o")], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, cwd=ROOT, env=env)
    try:
        t0 = time.time()
        while time.time() - t0 < 120:  # the resolved config is printed inside the command
            line = p.stdout.readline()
            if not line or "resolved" in line:
                break
        time.sleep(1.0)
        p.send_signal(signal.SIGINT)
        out, err = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 130, err
    assert "Traceback" not in err
    assert "nvjax run: interrupted; rerun the same command to resume" in err


# --------------------------------------------------------------------------------------------
# The Python API
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("make,needle", [
    (lambda: D.pcm(g_max=NAN), "g_max"),
    (lambda: D.pcm(g_max=0.0), "g_max"),
    (lambda: D.pcm(g_max=-25.0), "g_max"),
    (lambda: D.pcm(read_q=-0.5), "read_q"),
    (lambda: D.pcm(t_read=0.0), "t_read"),
    (lambda: D.pcm(nu_mu=(0.1, 0.2)), "nu_mu"),
    (lambda: D.pcm(p_stuck_min=0.7, p_stuck_max=0.7), "p_stuck_min + p_stuck_max"),
    (lambda: D.pcm(p_stuck_min=NAN), "p_stuck_min"),
    (lambda: D.reram(g_max=INF), "g_max"),
    (lambda: D.levels(sigma=NAN), "sigma"),
    (lambda: D.levels(bits=2, g_min=1.0, g_max=1.0), "g_min"),
    (lambda: D.flash(sigma_vth=-0.01), "sigma_vth"),
    (lambda: D.ideal(g_max=NAN), "g_max"),
    (lambda: D.pulse_pcm(g_hi=NAN), "g_hi"),
    (lambda: xb.TileConfig(r_wire=NAN), "r_wire"),
    (lambda: xb.TileConfig(adc_bound=INF), "adc_bound"),
    (lambda: xb.TileConfig(out_noise=NAN), "out_noise"),
    (lambda: xb.TileConfig(v_read=-0.2), "v_read"),
    (lambda: R.pcm_disturb(v_ref=NAN), "v_ref"),
    (lambda: R.pcm_disturb(kappa=NAN), "kappa"),
    (lambda: R.reram_disturb(v0=0.0), "v0"),
    (lambda: L.LifetimeConfig(inferences_per_step=INF), "inferences_per_step"),
    (lambda: L.LifetimeConfig(accuracy_drop=NAN), "accuracy_drop"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_python_entry_points_refuse_bad_numbers(make, needle):
    with pytest.raises(ValueError) as e:
        make()
    assert _is_user_error(e.value)
    assert needle in str(e.value)


@pytest.fixture(scope="module")
def pcm_state():
    return jax.jit(lambda k: D.program(k, D.pcm(), jnp.full((4,), 10.0)))(jax.random.key(0))


@pytest.mark.parametrize("t", [NAN, INF, -1.0])
def test_read_refuses_bad_time(pcm_state, t):
    with pytest.raises(ValueError, match=r"read\(t\)") as e:
        D.read(jax.random.key(1), D.pcm(), pcm_state, t)
    assert _is_user_error(e.value)


def test_read_with_another_device_kind_names_both(pcm_state):
    with pytest.raises(TypeError) as e:
        D.read(jax.random.key(1), D.reram(), pcm_state, 1.0)
    assert "pcm" in str(e.value) and "reram" in str(e.value)
    ideal_state = D.program(jax.random.key(0), D.ideal(), jnp.full((4,), 10.0))
    with pytest.raises(TypeError) as e:
        D.read(jax.random.key(1), D.pcm(), ideal_state, 1.0)
    assert "ideal" in str(e.value) and "pcm" in str(e.value)


@pytest.fixture(scope="module")
def small_tiles():
    """Tiles of a PCM layer built with 8 × 8 tiles (programmed in one compiled call)."""
    w = jax.random.normal(jax.random.key(0), (20, 6))
    cfg = xb.TileConfig(rows=8, cols=8)
    program = jax.jit(lambda k, w: xb.program_tiles(k, D.pcm(), w, config=cfg))
    return w, cfg, program(jax.random.key(1), w)


def test_mvm_with_another_config_is_refused(small_tiles):
    w, cfg, tiles = small_tiles
    x = jnp.ones((2, 20))
    with pytest.raises(ValueError) as e:
        xb.mvm(jax.random.key(2), D.pcm(), tiles, x, 1.0)  # default 256 × 256 tiles
    assert _is_user_error(e.value) and "rows" in str(e.value) and "cols" in str(e.value)
    with pytest.raises(ValueError, match="per_column_scale"):
        xb.read_weights(jax.random.key(2), D.pcm(), tiles, 1.0,
                        config=cfg.replace(per_column_scale=True))
    # read-out options may differ from the build config, also under jit
    mvm = jax.jit(lambda t, x: xb.mvm(jax.random.key(2), D.pcm(), t, x, 1.0,
                                      config=cfg.replace(drift_compensation=False, adc_bits=8)))
    assert mvm(tiles, x)[0].shape == (2, 6)


def test_mvm_with_another_device_kind_names_both(small_tiles):
    _, cfg, tiles = small_tiles
    with pytest.raises(TypeError) as e:
        xb.mvm(jax.random.key(2), D.ideal(), tiles, jnp.ones((20,)), 1.0, config=cfg)
    assert "pcm" in str(e.value) and "ideal" in str(e.value)
    with pytest.raises(TypeError, match="reram"):
        xb.mvm(jax.random.key(2), D.reram(), tiles, jnp.ones((20,)), 1.0,
               config=cfg.replace(read_noise=False))


@pytest.mark.parametrize("t", [NAN, INF, -1.0])
def test_mvm_refuses_bad_time(small_tiles, t):
    _, cfg, tiles = small_tiles
    with pytest.raises(ValueError, match=r"mvm\(t\)") as e:
        xb.mvm(jax.random.key(2), D.pcm(), tiles, jnp.ones((20,)), t, config=cfg)
    assert _is_user_error(e.value)


def test_chip_apply_refuses_nan_time():
    model = models.MLP(features=(3,))
    params = model.init(jax.random.key(0), jnp.ones((1, 5)))["params"]
    chip = chip_mod.deploy(jax.random.key(1), model, params, D.ideal())
    with pytest.raises(ValueError, match=r"\(t\)") as e:
        chip_mod.apply(jax.random.key(2), chip, jnp.ones((2, 5)), NAN)
    assert _is_user_error(e.value)


# --------------------------------------------------------------------------------------------
# Missing keys: one rule for every command
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cmd,job,text", [
    ("run", "reliability", "seed: 3"),
    ("lifetime", "run_lifetime", "lifetime: {num_steps: 4}"),
])
def test_missing_keys_take_defaults_and_are_printed(tmp_path, monkeypatch, capsys, cmd, job, text):
    """A key (or a whole section) left out takes its documented default; the command prints the
    resolved config with those keys marked '# default' before it starts."""
    seen = {}

    def stub(cfg, out):
        seen["cfg"] = cfg
        raise KeyboardInterrupt  # stop right after the start: nothing more to test here
    monkeypatch.setattr(nvjax.jobs, job, stub)
    path = _write(tmp_path, text)
    rc, out, err = _cli(capsys, cmd, path, "--out", str(tmp_path / "o"))
    assert rc == 130 and "interrupted" in err and "Traceback" not in err
    default = (cfg_mod.RunConfig if cmd == "run" else cfg_mod.LifetimeRunConfig)()
    assert seen["cfg"].tile == default.tile and seen["cfg"].device == default.device
    assert "tile:  # default (whole section)" in out
    assert "  rows: 256  # default" in out
    first = text.split(":")[0]
    assert any(ln.startswith(f"{first}:") and "# default" not in ln for ln in out.splitlines())
