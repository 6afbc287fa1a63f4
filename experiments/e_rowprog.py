"""E-rowprog (DESIGN.md §11, paper E): row-parallel pulse programming, Pfail vs pulse budget.

Reproduces the claims of Mackin et al., "Weight programming in DNN analog hardware accelerators
in the presence of NVM variability", Adv. Electron. Mater. (2019): with row-parallel programming
of F-weighted MSP/LSP PCM pairs, 98–99 % of the weights reach their target, largely independent
of the target distribution and tolerant of device-to-device variability. The programming scheme
is :func:`nvjax.programming.row_program` (D4 pulse response; the phases are *our
reconstruction*, see that function), every run is a ``jax.vmap`` over chip keys.

Sweeps (each point over ``num_chips`` chips; chip ``c`` of target set ``d`` uses the key
``fold_in(fold_in(k_chips, d), c)`` for all its layers, stacked into one matrix, at every budget
and variability level — common random numbers, so curves are smooth):

* **budget**: Pfail vs pulse budget. A budget scale ``s`` multiplies the three per-phase budgets
  of ``program`` (``n_coarse, n_correct, n_fine`` → ``round(s·n)``); for every target set
  (Gaussian, uniform, Laplacian synthetic matrices [rows, cols]; the digits MLP and LSTM kernels
  from :func:`nvjax.models.get_trained`, each kernel in its crossbar layout
  :func:`nvjax.layers.kernel_matrix` and scaled by :func:`nvjax.programming.weight_scale`) and
  every device-variability level (``sigma_gain``, ``sigma_gmax`` of
  :func:`nvjax.devices.pulse_pcm`);
* **eps**: Pfail vs tolerance ε at the default budget (nominal variability);
* **pareto**: budget scale × step scale grid, Pfail vs mean row time (pulses of the slowest weight
  of a row), non-dominated front per target set (:func:`nvjax.programming.pareto_front`);
* **accuracy**: MLP and LSTM test accuracy vs Pfail — every kernel programmed with
  :func:`row_program` at budget scales that span a range of Pfail, the programmed weights mapped
  back (``result.w / κ``, reshaped like the kernel; biases stay digital), accuracy on the digits
  test split per chip.

Writes ``results.json`` (config, versions, timings, all summaries), ``results.csv`` (one row per
chip and sweep point), ``e_rowprog.png`` and ``summary.md`` into ``--out``.

    python experiments/e_rowprog.py configs/e_rowprog.yaml --out runs/e_rowprog
"""
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Literal, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from nvjax import layers
from nvjax import devices
from nvjax import models as models_mod
from nvjax import programming as pr
from nvjax import sweep
from nvjax.config import load_yaml

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)
import _common  # noqa: E402

SYNTHETIC = ("gaussian", "uniform", "laplace")
MODELS = ("mlp", "lstm")
CLAIM = "98–99 % of weights reach target (Pfail 1–2 %), largely independent of the target " \
        "distribution and tolerant of device variability (Mackin et al. 2019)"


# --------------------------------------------------------------------------------------------
# Configuration (frozen dataclasses, loaded strictly)
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Variability:
    """One device-to-device variability level of the D4 pulse model (our model).

    Attributes:
        name: label used in tables and plots.
        sigma_gain: std of the per-device gain m_d on the mean SET step.
        sigma_gmax: std of the per-device ceiling G_max,d, µS.
    """
    name: str
    sigma_gain: float
    sigma_gmax: float

    def validate(self):
        if self.sigma_gain < 0 or self.sigma_gmax < 0:
            raise ValueError(f"sigma_gain and sigma_gmax must be >= 0, got {self.sigma_gain}, "
                             f"{self.sigma_gmax}")


@dataclass(frozen=True)
class ProgramOptions:
    """The default (budget scale 1) :class:`nvjax.programming.RowProgramConfig`."""
    factor: float = 2.0
    msp_share: float = 0.8
    eps: float = 0.25
    step_scale: float = 1.0
    n_coarse: int = 30
    n_correct: int = 10
    n_fine: int = 25
    t_pulse: float = 1.0

    def validate(self):
        self.make()          # RowProgramConfig's own checks, reported with this section's path

    def make(self, *, budget_scale: float = 1.0, step_scale: Optional[float] = None,
             eps: Optional[float] = None) -> pr.RowProgramConfig:
        """The RowProgramConfig with the three phase budgets scaled by ``budget_scale``."""
        return pr.RowProgramConfig(
            factor=self.factor, msp_share=self.msp_share,
            eps=self.eps if eps is None else eps,
            step_scale=self.step_scale if step_scale is None else step_scale,
            n_coarse=int(round(budget_scale * self.n_coarse)),
            n_correct=int(round(budget_scale * self.n_correct)),
            n_fine=int(round(budget_scale * self.n_fine)), t_pulse=self.t_pulse)


@dataclass(frozen=True)
class AccuracyOptions:
    """Accuracy vs Pfail: every kernel of each model programmed at each budget scale.

    Attributes:
        models: models of :func:`nvjax.models.get_trained` ('mlp', 'lstm').
        budget_scales: budget scales (multiplying the ``program`` budgets) giving a Pfail range.
        num_chips: chips per point (>= 1; the claim check wants >= 16).
        variability: name of the variability level to use (one of ``variability``).
        eval_samples: test images evaluated (None: the whole digits test split).
    """
    models: Tuple[Literal["mlp", "lstm"], ...] = MODELS
    budget_scales: Tuple[float, ...] = (0.05, 0.1, 0.2, 0.3, 0.5, 1.0, 2.0)
    num_chips: int = 16
    variability: str = "default"
    eval_samples: Optional[int] = None


@dataclass(frozen=True)
class ERowprogConfig:
    """E-rowprog run configuration.

    Attributes:
        experiment: must be 'e_rowprog' (lets a generic loader recognise the file).
        seed: root seed (targets, chips, model training).
        num_chips: chips (vmapped keys) per point of the budget, eps and Pareto sweeps.
        rows, cols: shape of the synthetic target matrices (a row = weights programmed at once).
        w_max_uS: max|W*| of every target set (µS-equivalent, :func:`weight_scale`).
        distributions: target sets: 'gaussian', 'uniform', 'laplace', 'mlp', 'lstm'.
        variability: device-variability levels.
        program: the default programming options (budget scale 1).
        budget_scales: budget sweep.
        eps_values: tolerance sweep at budget scale 1 (first variability level named
            ``accuracy.variability``).
        pareto_budget_scales, pareto_step_scales: the Pareto grid (nominal variability).
        accuracy: accuracy vs Pfail options.
        model_epochs: training epochs (None: the defaults of :func:`get_trained`).
        model_cache_dir: where trained models are cached (None: ``<out>/models``).
        progress: show progress bars.
    """
    experiment: Literal["e_rowprog"] = "e_rowprog"
    seed: int = 0
    num_chips: int = 8
    rows: int = 64
    cols: int = 256
    w_max_uS: float = 20.0
    distributions: Tuple[Literal["gaussian", "uniform", "laplace", "mlp", "lstm"], ...] = \
        SYNTHETIC + MODELS
    variability: Tuple[Variability, ...] = (Variability("default", 0.1, 1.0),)
    program: ProgramOptions = field(default_factory=ProgramOptions)
    budget_scales: Tuple[float, ...] = (0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0)
    eps_values: Tuple[float, ...] = (0.1, 0.15, 0.25, 0.4, 0.6)
    pareto_budget_scales: Tuple[float, ...] = (0.2, 0.3, 0.5, 0.75, 1.0, 1.5)
    pareto_step_scales: Tuple[float, ...] = (0.75, 1.0, 1.5, 2.0)
    accuracy: AccuracyOptions = field(default_factory=AccuracyOptions)
    model_epochs: Optional[int] = None
    model_cache_dir: Optional[str] = None
    progress: bool = True

    def validate(self):
        _common.check_at_least_one(self, "num_chips", "rows", "cols")
        if self.w_max_uS <= 0:
            raise ValueError(f"w_max_uS must be > 0, got {self.w_max_uS}")
        if not self.distributions:
            raise ValueError("distributions must not be empty")
        if len(set(self.distributions)) != len(self.distributions):
            raise ValueError(f"distributions has duplicates: {self.distributions}")
        if not self.variability:
            raise ValueError("variability must list at least one level")
        names = _common.check_unique_names("variability", self.variability)
        if self.accuracy.variability not in names:
            raise ValueError(f"accuracy.variability {self.accuracy.variability!r} is not one of "
                             f"the variability names {names}")
        for name in ("budget_scales", "eps_values", "pareto_budget_scales", "pareto_step_scales"):
            vals = getattr(self, name)
            if not vals or any(v <= 0 for v in vals):
                raise ValueError(f"{name} must be a non-empty list of values > 0, got {vals}")
        acc = self.accuracy
        _common.check_at_least_one(acc, "num_chips", prefix="accuracy.")
        if any(v <= 0 for v in acc.budget_scales):
            raise ValueError(f"accuracy.budget_scales must be > 0, got {acc.budget_scales}")
        _common.check_at_least_one(acc, "eval_samples", prefix="accuracy.")
        _common.check_at_least_one(self, "model_epochs")
        for s in self.budget_scales + self.pareto_budget_scales + acc.budget_scales:
            self.program.make(budget_scale=s)
        for s in self.pareto_step_scales:
            self.program.make(step_scale=s)
        for e in self.eps_values:
            self.program.make(eps=e)


def load_config(path) -> ERowprogConfig:
    """Strictly load an E-rowprog YAML file (unknown or ill-typed keys raise ConfigError)."""
    return load_yaml(path, ERowprogConfig)


# --------------------------------------------------------------------------------------------
# Targets
# --------------------------------------------------------------------------------------------
def _kernels(params):
    """Layer name → kernel in crossbar layout [n_in, n_out] (chip.layer_names order)."""
    inner = params["params"] if set(params) == {"params"} else params
    out = {}
    for name in layers.layer_names(inner):
        node = inner
        for part in name.split("/"):
            node = node[part]
        out[name] = layers.kernel_matrix(node["kernel"])
    return out


def synthetic_target(key, dist, rows, cols):
    """Raw synthetic weights [rows, cols] of a distribution (scaled later by weight_scale)."""
    if dist == "gaussian":
        return jax.random.normal(key, (rows, cols))
    if dist == "uniform":
        return jax.random.uniform(key, (rows, cols), minval=-1.0, maxval=1.0)
    if dist == "laplace":
        return jax.random.laplace(key, (rows, cols))
    raise ValueError(f"unknown synthetic distribution {dist!r}")


def target_sets(cfg: ERowprogConfig, out_dir, models):
    """Target set name → list of (layer name, raw weights [n_in, n_out]); raw, not yet scaled."""
    (k_targets,) = _common.fold_keys(cfg.seed, 0)
    sets = {}
    for d, dist in enumerate(cfg.distributions):
        if dist in SYNTHETIC:
            sets[dist] = [("W", synthetic_target(jax.random.fold_in(k_targets, d), dist,
                                                 cfg.rows, cfg.cols))]
        else:
            _, params = models[dist]
            sets[dist] = list(_kernels(params).items())
    return sets


# --------------------------------------------------------------------------------------------
# Programming many chips
# --------------------------------------------------------------------------------------------
def stack_layers(layers, w_max_uS):
    """Scale each layer to max|W*| = ``w_max_uS`` and stack all layers into one target matrix.

    Layers are concatenated along rows, columns zero-padded to the widest layer, so one
    :func:`row_program` call (one compilation) programs a whole model; padded entries are masked
    out of every statistic (rows stay rows of one layer, so row times are per layer row).

    Returns:
        (target [R, C] float32, valid [R, C] bool, spans: list of (row0, rows, cols, κ)).
    """
    width = max(int(w.shape[1]) for _, w in layers)
    blocks, masks, spans, r0 = [], [], [], 0
    for _, w in layers:
        kappa = pr.weight_scale(w, w_max_uS=w_max_uS)
        n_in, n_out = w.shape
        blocks.append(jnp.pad((w * kappa).astype(jnp.float32), ((0, 0), (0, width - n_out))))
        masks.append(np.pad(np.ones((n_in, n_out), bool), ((0, 0), (0, width - n_out))))
        spans.append((r0, n_in, n_out, kappa))
        r0 += n_in
    return jnp.concatenate(blocks, axis=0), jnp.asarray(np.concatenate(masks, axis=0)), spans


def program_chips(keys, device, layers, config: pr.RowProgramConfig, w_max_uS):
    """Program every layer of a target set on each chip (vmap of :func:`row_program` over keys).

    The layers are stacked by :func:`stack_layers` (one call per chip, key ``keys[c]``).

    Returns:
        (stats, weights): stats = dict of per-chip NumPy arrays [chips]: ``pfail`` (over all real
        weights), ``mean_pulses`` per weight, ``mean_row_time`` and ``max_row_time`` (pulses of
        the slowest weight of each layer row × t_pulse), ``rms_err_rel`` (rms |W − W*| /
        w_max_uS); weights = per layer the programmed weights in the model's units
        (``result.w / κ``), [chips, n_in, n_out].
    """
    target, valid, spans = stack_layers(layers, w_max_uS)
    res = jax.vmap(lambda k: pr.row_program(k, device, target, config=config))(keys)
    n_w = int(np.sum(np.asarray(valid)))
    failed = np.asarray(jnp.sum(res.failed & valid, axis=(1, 2)), np.float64)
    pulses = np.asarray(jnp.sum(jnp.where(valid, res.pulses, 0), axis=(1, 2)), np.float64)
    sq_err = np.asarray(jnp.sum(jnp.where(valid, jnp.square(res.w - target), 0.0), axis=(1, 2)),
                        np.float64)
    row_time = np.asarray(jnp.max(jnp.where(valid, res.pulses, 0), axis=2), np.float64) \
        * config.t_pulse
    stats = {"pfail": failed / n_w, "mean_pulses": pulses / n_w,
             "mean_row_time": row_time.mean(axis=1), "max_row_time": row_time.max(axis=1),
             "rms_err_rel": np.sqrt(sq_err / n_w) / w_max_uS}
    weights = [res.w[:, r0:r0 + n_in, :n_out] / kappa for r0, n_in, n_out, kappa in spans]
    return stats, weights


def _device(v: Variability):
    return devices.pulse_pcm(sigma_gain=v.sigma_gain, sigma_gmax=v.sigma_gmax)


def _chip_keys(root, index, n):
    base = jax.random.fold_in(root, index)
    return jax.vmap(lambda i: jax.random.fold_in(base, i))(jnp.arange(n, dtype=jnp.uint32))


def _summ(stats):
    out = {}
    for k, v in stats.items():
        v = np.asarray(v, np.float64)
        out[k] = float(v.mean())
        out[k + "_std"] = float(v.std(ddof=1)) if v.size > 1 else 0.0
    return out


def _accuracy_fn(model, x, y):
    x, y = jnp.asarray(x), jnp.asarray(y)

    @jax.jit
    def acc(params_batched):
        def one(p):
            return jnp.mean(jnp.argmax(model.apply(p, x), -1) == y)
        return jax.vmap(one)(params_batched)
    return acc


def _with_kernels(params, names, kernels_batched, n):
    """Params batched over chips [n, ...]: kernels replaced, every other leaf broadcast."""
    from flax.traverse_util import flatten_dict, unflatten_dict
    flat = flatten_dict(params)
    inner_prefix = ("params",) if set(params) == {"params"} else ()
    out = {}
    for path, leaf in flat.items():
        out[path] = jnp.broadcast_to(leaf, (n,) + leaf.shape)
    for name, kb in zip(names, kernels_batched):
        path = inner_prefix + tuple(name.split("/")) + ("kernel",)
        if flat[path].ndim != 2:
            raise NotImplementedError(f"layer {name!r}: only Dense kernels [n_in, n_out] are "
                                      "mapped back (conv kernels would need kernel_matrix's "
                                      "inverse)")
        out[path] = kb.reshape((n,) + flat[path].shape).astype(flat[path].dtype)
    return unflatten_dict(out)


# --------------------------------------------------------------------------------------------
# The experiment
# --------------------------------------------------------------------------------------------
def run(cfg: ERowprogConfig, out_dir, log=print):
    timings = {}
    t_start = time.perf_counter()
    needed = sorted(set(d for d in cfg.distributions if d in MODELS) | set(cfg.accuracy.models))
    models = {m: _common.trained_model(m, cfg, out_dir) for m in needed}
    timings["models_s"] = time.perf_counter() - t_start
    sets = target_sets(cfg, out_dir, models)
    k_chips, k_acc = _common.fold_keys(cfg.seed, 1, 2)
    var_by_name = {v.name: v for v in cfg.variability}
    nominal = var_by_name[cfg.accuracy.variability]
    n_points = (len(sets) * (len(cfg.variability) * len(cfg.budget_scales) + len(cfg.eps_values)
                             + len(cfg.pareto_budget_scales) * len(cfg.pareto_step_scales))
                + len(cfg.accuracy.models) * len(cfg.accuracy.budget_scales))
    bar = None
    if cfg.progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=n_points, desc="programming points", unit="pt", file=sys.stderr,
                   dynamic_ncols=True)
    rows = []       # CSV rows

    def tick():
        if bar is not None:
            bar.update(1)

    def record(sweep_name, dist, var, cfg_r, budget_scale, stats, extra=None):
        for c in range(len(stats["pfail"])):
            row = {"sweep": sweep_name, "target": dist, "variability": var.name,
                   "budget_scale": budget_scale, "n_coarse": cfg_r.n_coarse,
                   "n_correct": cfg_r.n_correct, "n_fine": cfg_r.n_fine,
                   "step_scale": cfg_r.step_scale, "eps": cfg_r.eps, "chip": c}
            row.update({k: float(v[c]) for k, v in stats.items()})
            if extra:
                row.update({k: float(v[c]) for k, v in extra.items()})
            rows.append(row)

    # 1. Pfail vs budget, per target set and variability level
    t0 = time.perf_counter()
    budget = {}
    for d, (dist, layers) in enumerate(sets.items()):
        keys = _chip_keys(k_chips, d, cfg.num_chips)
        budget[dist] = {}
        for var in cfg.variability:
            pts = []
            for s in cfg.budget_scales:
                cfg_r = cfg.program.make(budget_scale=s)
                stats, _ = program_chips(keys, _device(var), layers, cfg_r, cfg.w_max_uS)
                record("budget", dist, var, cfg_r, s, stats)
                pts.append({"budget_scale": s, "budget_per_weight": cfg_r.n_coarse +
                            cfg_r.n_correct + cfg_r.n_fine, **_summ(stats)})
                tick()
            budget[dist][var.name] = pts
    timings["budget_s"] = time.perf_counter() - t0

    # 2. Pfail vs eps at the default budget (nominal variability)
    t0 = time.perf_counter()
    eps_sweep = {}
    for d, (dist, layers) in enumerate(sets.items()):
        keys = _chip_keys(k_chips, d, cfg.num_chips)
        pts = []
        for e in cfg.eps_values:
            cfg_r = cfg.program.make(eps=e)
            stats, _ = program_chips(keys, _device(nominal), layers, cfg_r, cfg.w_max_uS)
            record("eps", dist, nominal, cfg_r, 1.0, stats)
            pts.append({"eps": e, **_summ(stats)})
            tick()
        eps_sweep[dist] = pts
    timings["eps_s"] = time.perf_counter() - t0

    # 3. Pareto grid (budget scale × step scale), nominal variability
    t0 = time.perf_counter()
    pareto = {}
    for d, (dist, layers) in enumerate(sets.items()):
        keys = _chip_keys(k_chips, d, cfg.num_chips)
        pts = []
        for s in cfg.pareto_budget_scales:
            for st in cfg.pareto_step_scales:
                cfg_r = cfg.program.make(budget_scale=s, step_scale=st)
                stats, _ = program_chips(keys, _device(nominal), layers, cfg_r, cfg.w_max_uS)
                record("pareto", dist, nominal, cfg_r, s, stats)
                pts.append({"budget_scale": s, "step_scale": st, **_summ(stats)})
                tick()
        arr = np.array([[p["pfail"], p["mean_row_time"]] for p in pts])
        front, idx = pr.pareto_front(arr, return_index=True)
        pareto[dist] = {"points": pts, "front_index": idx.tolist(),
                        "front": [pts[i] for i in idx]}
    timings["pareto_s"] = time.perf_counter() - t0

    # 4. Accuracy vs Pfail (MLP, LSTM)
    t0 = time.perf_counter()
    accuracy = {}
    for m, mname in enumerate(cfg.accuracy.models):
        model, params = models[mname]
        _, x, y = _common.digits_split(mname, cfg.seed, cfg.accuracy.eval_samples)
        sw = float(models_mod.accuracy(model, params, x, y))
        acc_fn = _accuracy_fn(model, x, y)
        layers = list(_kernels(params).items())
        names = [n for n, _ in layers]
        n = cfg.accuracy.num_chips
        keys = _chip_keys(k_acc, m, n)
        pts = []
        for s in cfg.accuracy.budget_scales:
            cfg_r = cfg.program.make(budget_scale=s)
            stats, weights = program_chips(keys, _device(nominal), layers, cfg_r, cfg.w_max_uS)
            acc = np.asarray(acc_fn(_with_kernels(params, names, weights, n)), np.float64)
            record("accuracy", mname, nominal, cfg_r, s, stats, {"accuracy": acc})
            pts.append({"budget_scale": s, **_summ(stats),
                        "accuracy": sweep.summarize(acc)})
            tick()
        accuracy[mname] = {"software_accuracy": sw, "points": pts}
        log(f"[{mname}] software accuracy {100 * sw:.2f} %; " + ", ".join(
            f"Pfail {100 * p['pfail']:.2f} % → {100 * p['accuracy']['mean']:.2f} %" for p in pts))
    timings["accuracy_s"] = time.perf_counter() - t0
    if bar is not None:
        bar.close()
    timings["total_s"] = time.perf_counter() - t_start
    return {"budget": budget, "eps": eps_sweep, "pareto": pareto, "accuracy": accuracy,
            "timings": timings}, rows


# --------------------------------------------------------------------------------------------
# Outputs
# --------------------------------------------------------------------------------------------
def _default_point(pts, key="budget_scale", value=1.0):
    for p in pts:
        if abs(p[key] - value) < 1e-12:
            return p
    return None


def plot(path, res, cfg: ERowprogConfig):
    plt = _common.pyplot()
    fig, axes = plt.subplots(2, 3, figsize=(16, 9.5))
    dists = list(res["budget"])
    colors = {d: f"C{i}" for i, d in enumerate(dists)}
    styles = ["-", "--", ":", "-."]
    nominal = cfg.accuracy.variability
    floor = 0.5 / (cfg.num_chips * cfg.rows * cfg.cols)     # show Pfail = 0 on a log axis
    # (a) Pfail vs budget, nominal variability
    ax = axes[0, 0]
    for d in dists:
        pts = res["budget"][d][nominal]
        ax.plot([p["budget_per_weight"] for p in pts],
                [max(p["pfail"], floor) * 100 for p in pts], "o-", color=colors[d], label=d)
    ax.set_title(f"(a) Pfail vs pulse budget, variability '{nominal}'", fontsize=10)
    # (b) every variability level: colour = target set, line style = variability level
    ax = axes[0, 1]
    for d in dists:
        for j, var in enumerate(cfg.variability):
            pts = res["budget"][d][var.name]
            ax.plot([p["budget_per_weight"] for p in pts],
                    [max(p["pfail"], floor) * 100 for p in pts], styles[j % len(styles)],
                    color=colors[d], label=d if j == 0 else None)
    for j, var in enumerate(cfg.variability):
        ax.plot([], [], styles[j % len(styles)], color="k",
                label=f"{var.name} (σ_gain {var.sigma_gain:g}, σ_Gmax {var.sigma_gmax:g})")
    ax.set_title("(b) Pfail vs budget, every variability level", fontsize=10)
    for ax in axes[0, :2]:
        ax.set_xlabel("pulse budget per weight (n_coarse + n_correct + n_fine)")
        ax.set_ylabel("Pfail (%)")
        ax.set_yscale("log")
        ax.axhspan(1.0, 2.0, color="green", alpha=0.12, lw=0, label="paper: 1–2 %")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    # (c) Pfail at the default budget: grouped bars
    ax = axes[0, 2]
    width = 0.8 / len(cfg.variability)
    for j, var in enumerate(cfg.variability):
        vals = [100 * (_default_point(res["budget"][d][var.name]) or {"pfail": np.nan})["pfail"]
                for d in dists]
        ax.bar(np.arange(len(dists)) + j * width, vals, width, label=var.name)
    ax.axhspan(1.0, 2.0, color="green", alpha=0.12, lw=0, label="paper: 1–2 %")
    ax.set_xticks(np.arange(len(dists)) + 0.4 - width / 2)
    ax.set_xticklabels(dists)
    ax.set_ylabel("Pfail (%) at the default budget")
    ax.set_title("(c) Pfail at the default budget (scale 1)", fontsize=10)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3, axis="y")
    # (d) eps sweep
    ax = axes[1, 0]
    for d in dists:
        pts = res["eps"][d]
        ax.plot([p["eps"] for p in pts], [max(p["pfail"], floor) * 100 for p in pts], "o-",
                color=colors[d], label=d)
    ax.set_xlabel("tolerance ε (µS-equivalent; max|W*| = %g)" % cfg.w_max_uS)
    ax.set_ylabel("Pfail (%)")
    ax.set_yscale("log")
    ax.set_title("(d) Pfail vs tolerance at the default budget", fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    # (e) Pareto
    ax = axes[1, 1]
    for d in dists:
        pts = res["pareto"][d]["points"]
        ax.scatter([p["mean_row_time"] for p in pts], [max(p["pfail"], floor) * 100 for p in pts],
                   s=10, color=colors[d], alpha=0.35)
        fr = res["pareto"][d]["front"]
        ax.plot([p["mean_row_time"] for p in fr], [max(p["pfail"], floor) * 100 for p in fr],
                "o-", color=colors[d], label=f"{d} front")
    ax.set_xlabel("mean row programming time (pulses of the slowest weight)")
    ax.set_ylabel("Pfail (%)")
    ax.set_yscale("log")
    ax.set_title("(e) Pfail–speed trade-off (budget × step scale)", fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    # (f) accuracy vs Pfail
    ax = axes[1, 2]
    for k, (m, r) in enumerate(res["accuracy"].items()):
        pts = sorted(r["points"], key=lambda p: p["pfail"])
        pf = [100 * max(p["pfail"], floor) for p in pts]
        line, = ax.plot(pf, [100 * p["accuracy"]["mean"] for p in pts], "o-", label=f"{m} mean")
        ax.plot(pf, [100 * p["accuracy"]["min"] for p in pts], "v:", color=line.get_color(),
                label=f"{m} worst chip")
        ax.axhline(100 * r["software_accuracy"], color=line.get_color(), ls="--", lw=1,
                   label=f"{m} software")
    ax.set_xscale("log")
    ax.set_xlabel("Pfail (%)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"(f) accuracy vs Pfail ({cfg.accuracy.num_chips} chips per point)",
                 fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    _common.save_figure(fig, path)


def markdown(res, cfg: ERowprogConfig):
    p = cfg.program
    nominal = cfg.accuracy.variability
    dists = list(res["budget"])
    lines = [
        "# E-rowprog: row-parallel pulse programming (Mackin et al. 2019)", "",
        f"Paper claim: {CLAIM}.", "",
        f"Setup: D4 PCM pulse response, F = {p.factor:g}, θ = {p.msp_share:g}, ε = {p.eps:g} "
        f"µS-equivalent with max|W*| = {cfg.w_max_uS:g} µS-equivalent per layer "
        f"(ε = {100 * p.eps / cfg.w_max_uS:.2f} % of full scale); default budgets (scale 1): "
        f"n_coarse = {p.n_coarse}, n_correct = {p.n_correct}, n_fine = {p.n_fine}. Synthetic "
        f"targets {cfg.rows}×{cfg.cols}; 'mlp'/'lstm' = every kernel of the trained digits "
        f"model in its crossbar layout, each scaled to max|W*| = {cfg.w_max_uS:g}. "
        f"{cfg.num_chips} chips per point. The phase scheme and the device-variability model are "
        "our reconstruction (DESIGN.md §3 D4, §6), not the paper's code.", "",
        "## Pfail (%) at the default budget (mean ± std over chips)", "",
        "| target | " + " | ".join(f"{v.name} (σ_gain {v.sigma_gain:g}, σ_Gmax "
                                   f"{v.sigma_gmax:g} µS)" for v in cfg.variability) + " |",
        "|---|" + "---|" * len(cfg.variability)]
    for d in dists:
        cells = []
        for v in cfg.variability:
            q = _default_point(res["budget"][d][v.name])
            cells.append("n/a" if q is None else
                         f"{100 * q['pfail']:.2f} ± {100 * q['pfail_std']:.2f}")
        lines.append(f"| {d} | " + " | ".join(cells) + " |")
    q_all = [_default_point(res["budget"][d][v.name]) for d in dists for v in cfg.variability]
    q_all = [q for q in q_all if q is not None]
    if q_all:
        pf = np.array([q["pfail"] for q in q_all]) * 100
        qn = [_default_point(res["budget"][d][nominal]) for d in dists]
        pn = np.array([q["pfail"] for q in qn if q is not None]) * 100
        lines += ["", f"- At variability '{nominal}', Pfail spans {pn.min():.2f}–{pn.max():.2f} % "
                  f"over the target sets (success {100 - pn.max():.2f}–{100 - pn.min():.2f} %; "
                  f"paper 98–99 %). Over every variability level: {pf.min():.2f}–"
                  f"{pf.max():.2f} %."]
    lines += ["", "## Pfail vs pulse budget (variability '%s')" % nominal, "",
              "| budget scale | pulses/weight budget | " + " | ".join(dists) + " |",
              "|---|---|" + "---|" * len(dists)]
    for i, s in enumerate(cfg.budget_scales):
        b = res["budget"][dists[0]][nominal][i]["budget_per_weight"]
        lines.append(f"| {s:g} | {b} | " + " | ".join(
            f"{100 * res['budget'][d][nominal][i]['pfail']:.2f} % "
            f"({res['budget'][d][nominal][i]['mean_pulses']:.1f} p/w, "
            f"row {res['budget'][d][nominal][i]['mean_row_time']:.1f})" for d in dists) + " |")
    lines += ["", "(p/w: mean SET pulses per weight; row: mean row time = pulses of the slowest "
              "weight of a row.)", "", "## Pfail vs tolerance ε at the default budget", "",
              "| ε | " + " | ".join(dists) + " |", "|---|" + "---|" * len(dists)]
    for i, e in enumerate(cfg.eps_values):
        lines.append(f"| {e:g} | " + " | ".join(
            f"{100 * res['eps'][d][i]['pfail']:.2f} %" for d in dists) + " |")
    lines += ["", "## Pareto front (Pfail vs mean row time; budget scale × step scale)", "",
              f"Row time = pulses of the slowest weight of a row, so it grows with the row width "
              f"(synthetic rows hold {cfg.cols} weights; the model kernels' rows hold their "
              "n_out weights: MLP 64 and 10, LSTM 128, 128 and 10).", ""]
    for d in dists:
        fr = res["pareto"][d]["front"]
        lines.append(f"- {d}: " + "; ".join(
            f"({100 * q['pfail']:.2f} %, {q['mean_row_time']:.1f} pulses; s={q['budget_scale']:g},"
            f" step {q['step_scale']:g})" for q in fr))
    lines += ["", "## Accuracy vs Pfail (%d chips per point, variability '%s')"
              % (cfg.accuracy.num_chips, nominal), ""]
    for m, r in res["accuracy"].items():
        lines += [f"### {m} (software accuracy {100 * r['software_accuracy']:.2f} %)", "",
                  "| budget scale | Pfail % | rms error / w_max | accuracy mean % | std % | "
                  "worst chip % |", "|---|---|---|---|---|---|"]
        for q in r["points"]:
            a = q["accuracy"]
            lines.append(f"| {q['budget_scale']:g} | {100 * q['pfail']:.2f} | "
                         f"{q['rms_err_rel']:.4f} | {100 * a['mean']:.2f} | {100 * a['std']:.2f} "
                         f"| {100 * a['min']:.2f} |")
        lines.append("")
    t = res["timings"]
    lines += ["Timings: " + ", ".join(f"{k} {v:.1f}" for k, v in t.items()), ""]
    return "\n".join(lines)


CSV_FIELDS = ["sweep", "target", "variability", "budget_scale", "n_coarse", "n_correct",
              "n_fine", "step_scale", "eps", "chip", "pfail", "mean_pulses", "mean_row_time",
              "max_row_time", "rms_err_rel", "accuracy"]


def run_and_write(cfg: ERowprogConfig, args):
    """All four sweeps; writes results.json, results.csv, the figure and summary."""
    res, rows = run(cfg, args.out)
    _common.write_results(args.out, cfg, claim=CLAIM, **res)
    _common.write_csv(os.path.join(args.out, "results.csv"), CSV_FIELDS,
                      ({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()}
                       for r in rows))
    return _common.write_report(args.out, cfg, res, plot, markdown)


def main(argv=None):
    return _common.main(argv, __doc__, load_config, run_and_write)


if __name__ == "__main__":
    sys.exit(main())
