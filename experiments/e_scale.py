"""E-scale: PCM accuracy over time for a ResNet-style CNN and a transformer, 1000 chips each.

Not a paper reproduction: the scale check of the realistic workloads. For every model of the
config (``resnet``: :class:`nvjax.models.ResNet`, ResNet-20 with BatchNorm, on 32×32×3
procedural images; ``transformer``: :class:`nvjax.models.Transformer` on procedural token
sequences; both trained with :func:`nvjax.models.get_trained`, data :func:`nvjax.models.dataset`),
``num_chips`` chip instances of D1 PCM (``devices.pcm``, programming noise, drift, read noise;
global drift compensation; every conv and dense on differential-pair crossbars, BatchNorm,
pooling, softmax, LayerNorm and residuals digital) are programmed once and read at every time
of ``t_read_s``: the sweep of ``nvjax run`` (:func:`nvjax.jobs.accuracy_instance` under
:func:`nvjax.sweep.run_instances`, chunked: the programmed state exists only for the running
chunk, so memory does not grow with the chip count).

Reported per model and read time: the accuracy mean, 1st and 50th percentile over chips, each
with a bootstrap 95 % CI over chips (the test images are fixed, so the CIs are over chips only;
the evaluated images' own sampling error is stated beside them), the software accuracy on the
same images, the sweep's wall time and chips/s, and the process's peak resident memory after
the model (``ru_maxrss``, which only grows: the second model's value covers both).

Writes ``results.json``, ``chips.csv`` (one row per model, chip and read time), ``e_scale.png``
and ``summary.md`` into ``--out``.

    python experiments/e_scale.py configs/e_scale.yaml --out runs/e_scale
"""
import math
import os
import resource
import sys
import time
from dataclasses import dataclass
from typing import Literal, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from nvjax import crossbar as xb
from nvjax import devices as dev_mod
from nvjax import jobs
from nvjax import models as models_mod
from nvjax import sweep
from nvjax.config import load_yaml

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)
import _common  # noqa: E402

DAY_S = 86400.0


@dataclass(frozen=True)
class ModelOptions:
    """One model of the run.

    Attributes:
        name: 'resnet' or 'transformer' (:data:`nvjax.models.MODELS`).
        eval_samples: test inputs evaluated per chip and read time (the first of the test split;
            None: all 1200).
        chunk_size: chips per compiled call (memory grows with it, not with ``num_chips``).
        vmap_width: chips vmapped at once inside a chunk (None: the whole chunk; 1: one after
            the other, which keeps a large network's working set in cache on CPU).
        epochs: training epochs (None: the :func:`nvjax.models.get_trained` default).
    """
    name: Literal["resnet", "transformer"]
    eval_samples: Optional[int] = None
    chunk_size: int = 8
    vmap_width: Optional[int] = None
    epochs: Optional[int] = None

    def validate(self):
        _common.check_at_least_one(self, "eval_samples", "chunk_size", "vmap_width", "epochs",
                                   prefix=f"models[{self.name}].")


@dataclass(frozen=True)
class EScaleConfig:
    """E-scale run configuration.

    Attributes:
        experiment: must be 'e_scale'.
        seed: root seed (data split, training, chips).
        models: the models, in order.
        model_cache_dir: folder of trained models (None: ``<out>/models``).
        g_max_uS: PCM g_max, µS.
        tile_rows, tile_cols: crossbar tile size.
        num_chips: chip instances per model.
        t_read_s: read times after programming, s.
        bootstrap: bootstrap resamples for the CIs.
        progress: progress bars.
    """
    experiment: Literal["e_scale"] = "e_scale"
    seed: int = 0
    models: Tuple[ModelOptions, ...] = (
        ModelOptions("resnet", eval_samples=128, chunk_size=4, vmap_width=1),
        ModelOptions("transformer", eval_samples=256, chunk_size=50))
    model_cache_dir: Optional[str] = None
    g_max_uS: float = 25.0
    tile_rows: int = 256
    tile_cols: int = 256
    num_chips: int = 1000
    t_read_s: Tuple[float, ...] = (1.0, 3600.0, DAY_S, 30 * DAY_S, 365 * DAY_S)
    bootstrap: int = 1000
    progress: bool = True

    def validate(self):
        _common.check_unique_names("models", self.models)
        _common.check_at_least_one(self, "tile_rows", "tile_cols", "num_chips", "bootstrap")
        _common.check_distinct("t_read_s", self.t_read_s)
        if any(t <= 0 for t in self.t_read_s):
            raise ValueError(f"t_read_s must be > 0 s, got {self.t_read_s}")
        if not self.g_max_uS > 0:
            raise ValueError(f"g_max_uS must be > 0, got {self.g_max_uS}")


def load_config(path) -> EScaleConfig:
    """Strictly load an E-scale YAML file (unknown or ill-typed keys raise ConfigError)."""
    return load_yaml(path, EScaleConfig)


def _peak_rss_mb() -> float:
    """The process's peak resident set so far, MB (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _percentile_ci(acc, q, n, seed):
    """The q-th percentile of ``acc`` [chips] and its bootstrap 95 % CI over chips."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, acc.size, size=(n, acc.size))
    boot = np.percentile(acc[idx], q, axis=1)
    return float(np.percentile(acc, q)), [float(v) for v in np.percentile(boot, [2.5, 97.5])]


def run_model(opts: ModelOptions, cfg: EScaleConfig, out_dir):
    """One model: train (or load), sweep ``num_chips`` chips, summarize.

    Returns:
        ``(result dict, csv rows)``.
    """
    name = opts.name
    cache = cfg.model_cache_dir or os.path.join(out_dir, "models")
    os.makedirs(cache, exist_ok=True)
    t0 = time.perf_counter()
    model, variables = models_mod.get_trained(name, cache_dir=cache, seed=cfg.seed,
                                              epochs=opts.epochs)
    train_s = time.perf_counter() - t0
    ds = models_mod.dataset(name, seed=cfg.seed)
    x, y = _common.first(opts.eval_samples, ds.x_test, ds.y_test)
    software = float(models_mod.accuracy(model, variables, x, y))
    device = dev_mod.pcm(g_max=cfg.g_max_uS)
    tile = xb.TileConfig(rows=cfg.tile_rows, cols=cfg.tile_cols)
    times = jnp.asarray(cfg.t_read_s, jnp.float32)
    fn = jobs.accuracy_instance(model)
    compiled = sweep.compile_chunk(fn, vmap_width=opts.vmap_width)
    (k_chips,) = _common.fold_keys(cfg.seed, 1)
    args = (device, variables, tile, jnp.asarray(x), jnp.asarray(y), times)
    t1 = time.perf_counter()     # the first chunk alone: compilation + one chunk
    sweep.run_instances(fn, k_chips, min(opts.chunk_size, cfg.num_chips), *args,
                        chunk_size=opts.chunk_size, compiled=compiled)
    first_s = time.perf_counter() - t1
    stats = {}
    t2 = time.perf_counter()
    acc = np.asarray(sweep.run_instances(fn, k_chips, cfg.num_chips, *args,
                                         chunk_size=opts.chunk_size, compiled=compiled,
                                         progress=cfg.progress, desc=f"{name} chips",
                                         stats=stats), np.float64)          # [chips, T]
    sweep_s = time.perf_counter() - t2
    n_img = int(len(y))
    per_time = []
    for j, t in enumerate(cfg.t_read_s):
        a = acc[:, j]
        mean, _, mean_ci = _common.bootstrap(lambda m: m, [a], cfg.bootstrap, cfg.seed + j)
        p1, p1_ci = _percentile_ci(a, 1, cfg.bootstrap, cfg.seed + j)
        p50, p50_ci = _percentile_ci(a, 50, cfg.bootstrap, cfg.seed + j)
        per_time.append({"t_read_s": float(t), "mean": mean, "mean_ci95": mean_ci,
                         "p1": p1, "p1_ci95": p1_ci, "p50": p50, "p50_ci95": p50_ci,
                         "std": float(a.std(ddof=1)) if a.size > 1 else 0.0,
                         "min": float(a.min()), "max": float(a.max())})
    weights = int(sum(np.size(a) for a in jax.tree.leaves(variables["params"])))
    res = {"software_accuracy": software, "evaluation_images": n_img,
           # binomial standard error of an accuracy measured on these images (what chips
           # cannot average away: the same images are read on every chip)
           "image_sampling_se": math.sqrt(max(software * (1 - software), 1e-12) / n_img),
           "weights": weights, "num_chips": cfg.num_chips, "chunk_size": opts.chunk_size,
           "vmap_width": opts.vmap_width, "train_or_load_s": train_s,
           "compile_and_first_chunk_s": first_s, "sweep_s": sweep_s,
           "chips_per_s": cfg.num_chips / sweep_s, "peak_rss_mb_after": _peak_rss_mb(),
           "memory_estimate_mb": (stats["memory_estimate_bytes"] / 2 ** 20
                                  if stats.get("memory_estimate_bytes") else None),
           "per_time": per_time}
    rows = [{"model": name, "chip": c, "t_read_s": f"{t:g}", "accuracy": f"{acc[c, j]:.6f}"}
            for c in range(acc.shape[0]) for j, t in enumerate(cfg.t_read_s)]
    return res, rows


def image_se(accuracy: float, num_inputs: int) -> float:
    """Binomial standard error of an accuracy measured on ``num_inputs`` test inputs: the
    sampling error of the test set itself, which averaging over chips does not remove."""
    return math.sqrt(max(accuracy * (1.0 - accuracy), 0.0) / num_inputs)


def plot(path, results, cfg: EScaleConfig):
    plt = _common.pyplot()
    fig, axes = plt.subplots(1, len(results), figsize=(5.2 * len(results), 4), squeeze=False)
    for ax, (name, r) in zip(axes[0], results.items()):
        t = [p["t_read_s"] for p in r["per_time"]]
        for key, style, label in (("mean", "-o", "mean"), ("p50", "--s", "median"),
                                  ("p1", ":^", "1st percentile")):
            v = np.array([100 * p[key] for p in r["per_time"]])
            ci = np.array([[100 * c for c in p[f"{key}_ci95"]] for p in r["per_time"]])
            ax.plot(t, v, style, label=label)
            ax.fill_between(t, ci[:, 0], ci[:, 1], alpha=0.2)
        ax.axhline(100 * r["software_accuracy"], color="k", lw=0.8, label="software")
        ax.set_xscale("log")
        ax.set_xticks(t)
        ax.set_xticklabels([_common.time_label(v) for v in t])
        ax.set_xlabel("time after programming")
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(f"{name}: {r['weights']:,} weights, {r['num_chips']} PCM chips")
        ax.legend(fontsize=8)
    _common.save_figure(fig, path)


def markdown(results, cfg: EScaleConfig):
    lines = ["# E-scale: PCM accuracy over time at realistic scale", "",
             f"{cfg.num_chips} chips per model, D1 PCM (g_max {cfg.g_max_uS:g} µS, programming "
             f"noise, drift, read noise, global drift compensation), differential pairs on "
             f"{cfg.tile_rows}×{cfg.tile_cols} tiles, ideal DAC/ADC; every chip programmed once "
             "and read at each time. Accuracy over chips: mean, median and 1st percentile with "
             "bootstrap 95 % CIs over chips. The test inputs are the same on every chip, so "
             "the chips cannot average away their sampling error: the last column gives it "
             "(binomial standard error at that time's mean accuracy over the evaluated inputs); "
             "it applies to every number of a row alike.", ""]
    for name, r in results.items():
        lines += [f"## {name} ({r['weights']:,} weights; software accuracy "
                  f"{100 * r['software_accuracy']:.2f} % on {r['evaluation_images']} test "
                  "inputs)", "",
                  "| read time | mean % [95 % CI] | median % [CI] | 1st percentile % [CI] | "
                  "± input SE (points) |", "|---|---|---|---|---|"]
        for p in r["per_time"]:
            def f(k):
                lo, hi = p[f"{k}_ci95"]
                return f"{100 * p[k]:.2f} [{100 * lo:.2f}, {100 * hi:.2f}]"
            se = image_se(p["mean"], r["evaluation_images"])
            lines.append(f"| {_common.time_label(p['t_read_s'])} | {f('mean')} | {f('p50')} | "
                         f"{f('p1')} | {100 * se:.1f} |")
        mem = ("" if r["memory_estimate_mb"] is None
               else f"; XLA's estimate for one chunk {r['memory_estimate_mb']:.0f} MB")
        lines += ["", f"Sweep: {r['num_chips']} chips in {r['sweep_s']:.0f} s "
                      f"({r['chips_per_s']:.2f} chips/s, {len(r['per_time'])} reads of "
                      f"{r['evaluation_images']} inputs each, chunks of {r['chunk_size']}; "
                      f"compile + first chunk {r['compile_and_first_chunk_s']:.0f} s, training or "
                      f"loading {r['train_or_load_s']:.0f} s); process peak resident memory "
                      f"after this model {r['peak_rss_mb_after']:.0f} MB{mem}.", ""]
    return "\n".join(lines)


def run(cfg: EScaleConfig, args):
    """Every model; writes results.json, chips.csv, the figure and summary."""
    t0 = time.perf_counter()
    results, rows = {}, []
    for opts in cfg.models:
        results[opts.name], r = run_model(opts, cfg, args.out)
        rows += r
    total = time.perf_counter() - t0
    _common.write_results(args.out, cfg, total_s=total, peak_rss_mb=_peak_rss_mb(),
                          models=results)
    _common.write_csv(os.path.join(args.out, "chips.csv"),
                      ["model", "chip", "t_read_s", "accuracy"], rows)
    return _common.write_report(args.out, cfg, results, plot, markdown, _common.run_time(total))


def main(argv=None):
    return _common.main(argv, __doc__, load_config, run, from_results=(plot, markdown))


if __name__ == "__main__":
    sys.exit(main())
