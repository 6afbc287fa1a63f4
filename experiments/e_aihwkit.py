"""E-aihwkit (issue 14): digits MLP and LeNet accuracy vs time on D1 PCM, nvjax beside aihwkit 1.2.

The trained digits models (:func:`nvjax.models.get_trained`: MLP 64-64-10 and the LeNet-style
CNN) are deployed on D1 PCM (g_max = 25 µS, differential pairs, abs-max → g_max per layer,
global drift compensation, ideal periphery: a default :class:`nvjax.crossbar.TileConfig`) and
evaluated on the digits test split at each time after programming (default 1 s, 1 h, 1 day,
1 year): accuracy mean and 1st percentile over chips.

Sides:

* nvjax with ``devices.pcm(convention=c)`` for each convention ``c`` of the config ('aihwkit':
  aihwkit 1.2's conventions; 'physical': nvjax's default two-device model, see
  :class:`nvjax.devices.PCM`). Chip ``i`` uses ``fold_in(k_chips, i)``: it is programmed once
  (:func:`nvjax.chip.deploy`) and read at every time with its own read-noise key
  (:func:`nvjax.chip.apply`); run with :func:`nvjax.sweep.run_instances`. Always runs.
* aihwkit 1.2 (``PCMLikeNoiseModel(g_max=25)`` + ``GlobalDriftCompensation``,
  ``forward.is_perfect``, one tile per layer; see ``experiments/aihwkit_fixture.py``), run in a
  subprocess with aihwkit's own Python on the same trained weights and test images (written to
  a temporary ``.npz``): ``program_analog_weights()`` once per chip, then
  ``drift_analog_weights(t)`` and a forward pass per time. Runs when an aihwkit Python is found:
  the config key ``aihwkit_python``, else the environment variable ``NVJAX_AIHWKIT_PYTHON``,
  else ``~/.cache/nvjax-aihwkit/bin/python`` if it exists (``aihwkit_python: none`` skips it).

Writes ``results.json`` (config, versions, per model and side and time the accuracy summary over
chips), ``results.csv`` (one row per model, side, time and chip), ``e_aihwkit.png`` and
``summary.md`` into ``--out``. Resumable: finished nvjax chunks and finished aihwkit sides are
kept in ``--out/chunks`` (claimed by the config, :func:`nvjax.sweep.open_checkpoint`), so the
same command run again computes only what is missing.

    python experiments/e_aihwkit.py configs/e_aihwkit.yaml --out runs/e_aihwkit
"""
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Literal, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from flax.traverse_util import flatten_dict

from nvjax import chip as chip_mod
from nvjax import devices as dev_mod
from nvjax import sweep
from nvjax.config import load_yaml, to_dict

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)
import _common  # noqa: E402

FIXTURE_SCRIPT = os.path.join(_HERE, "aihwkit_fixture.py")
DEFAULT_AIHWKIT_PYTHON = os.path.join(os.path.expanduser("~"), ".cache", "nvjax-aihwkit", "bin",
                                      "python")
AIHWKIT_ENV = "NVJAX_AIHWKIT_PYTHON"
CLAIM = "nvjax with devices.pcm(convention='aihwkit') reproduces aihwkit 1.2's " \
        "PCMLikeNoiseModel + GlobalDriftCompensation (issue 14)"


@dataclass(frozen=True)
class EAihwkitConfig:
    """E-aihwkit run configuration.

    Attributes:
        experiment: must be 'e_aihwkit'.
        seed: root seed (chips, model training, the aihwkit side's torch seed).
        models: digits models of :func:`nvjax.models.get_trained` ('mlp', 'lenet').
        model_epochs: training epochs (None: get_trained defaults).
        model_cache_dir: cache of trained models (None: ``<out>/models``).
        times_s: read times after programming, s (> 0; aihwkit treats t = 0 as "no drift").
        num_chips: chips per model and side.
        chunk_size: nvjax chips per compiled chunk.
        eval_samples: test images evaluated (None: the whole digits test split).
        conventions: nvjax PCM conventions to run ('aihwkit', 'physical').
        aihwkit_python: aihwkit's Python executable; None: ``$NVJAX_AIHWKIT_PYTHON`` or
            ``~/.cache/nvjax-aihwkit/bin/python``; 'none': do not run aihwkit.
        aihwkit_threads: torch threads of the aihwkit side.
        progress: progress bars.
    """
    experiment: Literal["e_aihwkit"] = "e_aihwkit"
    seed: int = 0
    models: Tuple[Literal["mlp", "lenet"], ...] = ("mlp", "lenet")
    model_epochs: Optional[int] = None
    model_cache_dir: Optional[str] = None
    times_s: Tuple[float, ...] = (1.0, 3600.0, 86400.0, 365.0 * 86400.0)
    num_chips: int = 1000
    chunk_size: int = 100
    eval_samples: Optional[int] = None
    conventions: Tuple[Literal["aihwkit", "physical"], ...] = ("aihwkit", "physical")
    aihwkit_python: Optional[str] = None
    aihwkit_threads: int = 2
    progress: bool = True

    def validate(self):
        _common.check_distinct("models", self.models)
        _common.check_distinct("conventions", self.conventions)
        _common.check_at_least_one(self, "model_epochs", "num_chips", "chunk_size",
                                   "eval_samples", "aihwkit_threads")
        if not self.times_s or any(not (math.isfinite(t) and t > 0) for t in self.times_s):
            raise ValueError(f"times_s must be a non-empty list of finite times > 0 s, got "
                             f"{list(self.times_s)}")
        _common.check_distinct("times_s", self.times_s)


def load_config(path) -> EAihwkitConfig:
    """Strictly load an E-aihwkit YAML file (unknown or ill-typed keys raise ConfigError)."""
    return load_yaml(path, EAihwkitConfig)


def aihwkit_python(cfg: EAihwkitConfig) -> Optional[str]:
    """The aihwkit Python to use, or None (see :class:`EAihwkitConfig`)."""
    if cfg.aihwkit_python is not None:
        return None if cfg.aihwkit_python.lower() == "none" else cfg.aihwkit_python
    path = os.environ.get(AIHWKIT_ENV) or DEFAULT_AIHWKIT_PYTHON
    return path if os.path.exists(path) else None


# --------------------------------------------------------------------------------------------
# nvjax side
# --------------------------------------------------------------------------------------------
def make_instance(model):
    """``fn(key, device, params, x, y, times) -> {'accuracy': [T]}``: one chip programmed once
    and read at every time (a ``lax.map`` over times: one batch of images in memory at once)."""
    def fn(key, device, params, x, y, times):
        chip = chip_mod.deploy(jax.random.fold_in(key, 0), model, params, device)

        def at(args):
            j, t = args
            logits = chip_mod.apply(jax.random.fold_in(key, 1 + j), chip, x, t)
            return jnp.mean((jnp.argmax(logits, axis=-1) == y).astype(jnp.float32))
        return {"accuracy": jax.lax.map(at, (jnp.arange(times.shape[0]), times))}
    return fn


def run_nvjax(name, tr, cfg: EAihwkitConfig, convention, k_chips, ckpt):
    """Accuracy ``[chips, T]`` of nvjax with ``pcm(convention=convention)`` and the wall time."""
    fn = make_instance(tr.model)
    t0 = time.perf_counter()
    out = sweep.run_instances(fn, k_chips, cfg.num_chips, dev_mod.pcm(convention=convention),
                              tr.params, jnp.asarray(tr.x), jnp.asarray(tr.y),
                              jnp.asarray(cfg.times_s, jnp.float32), chunk_size=cfg.chunk_size,
                              progress=cfg.progress, desc=f"{name} nvjax/{convention}",
                              checkpoint_dir=ckpt, checkpoint_name=f"{name}-nvjax-{convention}",
                              return_loaded=True)
    out, loaded = out
    return np.asarray(out["accuracy"], np.float64), time.perf_counter() - t0, loaded


# --------------------------------------------------------------------------------------------
# aihwkit side
# --------------------------------------------------------------------------------------------
def run_aihwkit(python, name, tr, cfg: EAihwkitConfig, log=print):
    """Accuracy ``[chips, T]`` of aihwkit (subprocess), its version and wall time."""
    with tempfile.TemporaryDirectory(prefix="e_aihwkit-") as tmp:
        npz, res = os.path.join(tmp, f"{name}.npz"), os.path.join(tmp, f"{name}.json")
        arrays = {"x": np.asarray(tr.x, np.float32), "y": np.asarray(tr.y)}
        for path, leaf in flatten_dict(tr.params.get("params", tr.params)).items():
            arrays["/".join(path)] = np.asarray(leaf, np.float32)
        np.savez(npz, **arrays)
        cmd = [python, FIXTURE_SCRIPT, "--accuracy", npz, "--out", res,
               "--instances", str(cfg.num_chips), "--seed", str(cfg.seed),
               "--threads", str(cfg.aihwkit_threads), "--times", *map(repr, cfg.times_s)]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        dt = time.perf_counter() - t0
        if proc.returncode != 0:
            raise RuntimeError(f"e_aihwkit: the aihwkit side failed ({python}, exit "
                               f"{proc.returncode}):\n{proc.stderr[-3000:]}")
        doc = _common.read_json(res)
    log(f"[{name}] aihwkit {doc['aihwkit_version']}: {cfg.num_chips} chips in {dt:.1f} s")
    return np.asarray(doc["accuracy"], np.float64).T, doc["aihwkit_version"], dt


# --------------------------------------------------------------------------------------------
# The experiment
# --------------------------------------------------------------------------------------------
def checkpoint(cfg: EAihwkitConfig, out_dir):
    """``out_dir/chunks``, claimed for this config (keys that do not change results ignored)."""
    ckpt = os.path.join(out_dir, "chunks")
    manifest = {"config": to_dict(cfg)}
    for k in ("aihwkit_python", "aihwkit_threads", "progress", "chunk_size", "model_cache_dir"):
        manifest["config"].pop(k, None)
    sweep.open_checkpoint(ckpt, manifest)
    return ckpt


def run_model(name, cfg: EAihwkitConfig, out_dir, log=print):
    tr = _common.load_trained(name, cfg, out_dir)
    log(f"[{name}] software accuracy {100 * tr.software_accuracy:.2f} % on {len(tr.y)} images")
    (k_chips,) = _common.fold_keys(cfg.seed, 1)
    ckpt = checkpoint(cfg, out_dir)
    sides, rows, timings = {}, [], {}
    for conv in cfg.conventions:
        acc, dt, loaded = run_nvjax(name, tr, cfg, conv, k_chips, ckpt)
        sides[f"nvjax/{conv}"] = acc
        timings[f"nvjax/{conv}_s"] = dt
        if loaded:   # resumed: dt is (mostly) the time to load finished chunks
            timings[f"nvjax/{conv}_loaded_chunks"] = loaded
        log(f"[{name}] nvjax/{conv}: {cfg.num_chips} chips in {dt:.1f} s")
    python = aihwkit_python(cfg)
    version = None
    if python is not None:
        done = os.path.join(ckpt, f"{name}-aihwkit.json")
        if os.path.exists(done):
            doc = _common.read_json(done)
            acc, version, dt = np.asarray(doc["accuracy"]), doc["version"], doc["seconds"]
        else:
            acc, version, dt = run_aihwkit(python, name, tr, cfg, log)
            tmp = done + ".tmp"
            _common.write_json(tmp, {"accuracy": acc.tolist(), "version": version,
                                     "seconds": dt})
            os.replace(tmp, done)
        sides["aihwkit"] = acc
        timings["aihwkit_s"] = dt
    else:
        log(f"[{name}] aihwkit side skipped (no aihwkit Python: set aihwkit_python or "
            f"${AIHWKIT_ENV})")
    res = {"software_accuracy": tr.software_accuracy, "num_images": int(len(tr.y)),
           "aihwkit_version": version, "timings": timings, "sides": {}}
    for side, acc in sides.items():
        res["sides"][side] = [{"t_s": t, "accuracy": sweep.summarize(acc[:, j])}
                              for j, t in enumerate(cfg.times_s)]
        for j, t in enumerate(cfg.times_s):
            rows += [[name, side, f"{t:g}", c, f"{acc[c, j]:.6g}"] for c in range(acc.shape[0])]
    return res, rows


def _diff(res, side, ref, j):
    """Mean accuracy difference side − ref at time index j and its standard error."""
    a, b = res["sides"][side][j]["accuracy"], res["sides"][ref][j]["accuracy"]
    return a["mean"] - b["mean"], math.sqrt(a["std"] ** 2 / a["n"] + b["std"] ** 2 / b["n"])


def _time_label(t):
    return _common.time_label(t, (("year", 365 * 86400.0), ("day", 86400.0), ("h", 3600.0),
                                  ("s", 1.0)))


def plot(path, results, cfg: EAihwkitConfig):
    plt = _common.pyplot()
    fig, axes = plt.subplots(1, len(results), figsize=(5.6 * len(results), 4.3), squeeze=False)
    ts = np.asarray(cfg.times_s)
    for ax, (mname, res) in zip(axes[0], results.items()):
        for k, (side, pts) in enumerate(res["sides"].items()):
            color = "k" if side == "aihwkit" else f"C{k}"
            ax.plot(ts, [100 * p["accuracy"]["mean"] for p in pts], "o-", color=color,
                    label=f"{side} mean")
            ax.plot(ts, [100 * p["accuracy"]["p1"] for p in pts], "v--", color=color,
                    label=f"{side} 1st percentile")
        ax.axhline(100 * res["software_accuracy"], color="gray", ls=":", lw=1, label="software")
        ax.set_xscale("log")
        ax.set_xticks(ts, [_time_label(t) for t in ts])
        ax.set_xlabel("time after programming")
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(f"{mname} on D1 PCM, {cfg.num_chips} chips per side", fontsize=9)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    _common.save_figure(fig, path)


def markdown(results, cfg: EAihwkitConfig):
    lines = ["# E-aihwkit: D1 PCM accuracy vs time, nvjax beside aihwkit 1.2", "",
             f"Check: {CLAIM}.", "",
             "Setup: trained digits models, every Dense/Conv kernel on D1 PCM differential pairs "
             "(g_max 25 µS, abs-max per layer → g_max), global drift compensation, ideal "
             f"periphery, one tile per layer on the aihwkit side; {cfg.num_chips} chips per side, "
             "each programmed once and read at every time. Accuracy on the digits test split "
             "(mean / 1st percentile over chips, %). Δ = nvjax − aihwkit mean accuracy, "
             "points ± 1 standard error.", ""]
    for mname, res in results.items():
        sides = list(res["sides"])
        ver = res["aihwkit_version"]
        lines += [f"## {mname} (software {100 * res['software_accuracy']:.2f} %, "
                  f"{res['num_images']} test images"
                  + (f", aihwkit {ver})" if ver else "; aihwkit not run)"), ""]
        head = "| time | " + " | ".join(f"{s} mean / p1" for s in sides)
        has_ref = "aihwkit" in sides
        conv_sides = [s for s in sides if s != "aihwkit"]
        if has_ref:
            head += " | " + " | ".join(f"Δ {s}" for s in conv_sides)
        lines += [head + " |", "|---|" + "---|" * (len(sides) + (len(conv_sides) if has_ref else 0))]
        for j, t in enumerate(cfg.times_s):
            cells = [f"{100 * res['sides'][s][j]['accuracy']['mean']:.2f} / "
                     f"{100 * res['sides'][s][j]['accuracy']['p1']:.2f}" for s in sides]
            if has_ref:
                for s in conv_sides:
                    d, se = _diff(res, s, "aihwkit", j)
                    cells.append(f"{100 * d:+.2f} ± {100 * se:.2f}")
            lines.append(f"| {_time_label(t)} | " + " | ".join(cells) + " |")
        lines += ["", "Timings: " + ", ".join(f"{k} {v:.1f} s" if k.endswith("_s") else f"{k} {v}"
                                          for k, v in res["timings"].items()), ""]
        if any(k.endswith("_loaded_chunks") for k in res["timings"]):
            lines += ["(A resumed run: the nvjax sides with loaded chunks were computed by an "
                      "earlier run of the same config; their time here is the loading time.)", ""]
    return "\n".join(lines)


def run(cfg: EAihwkitConfig, args):
    """Every model; writes results.json, results.csv, the figure and summary."""
    results, rows, total = _common.run_models(run_model, cfg, args.out)
    _common.write_results(args.out, cfg, claim=CLAIM, total_s=total, models=results)
    _common.write_csv(os.path.join(args.out, "results.csv"),
                      ["model", "side", "t_s", "chip", "accuracy"], rows)
    return _common.write_report(args.out, cfg, results, plot, markdown,
                                "\n" + _common.run_time(total))


def main(argv=None):
    return _common.main(argv, __doc__, load_config, run, from_results=(plot, markdown))


if __name__ == "__main__":
    sys.exit(main())
