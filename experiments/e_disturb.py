"""E-disturb (DESIGN.md §11, issue 4): read-disturb-aware placement vs identity and random.

For each model (digits MLP, LeNet-style CNN) on tiles with IR drop and D7 read disturb, four
placements of every layer's rows and columns in its tile grid are compared over the same chips
(same chip keys) with the lifetime loop of :mod:`nvjax.lifetime`:

* identity; random (seeded permutations);
* exact: alternating exact row/column assignments of the linear cost Σ c·a·D (criticality ×
  voltage-weighted reads × IR-drop position factor), :func:`nvjax.placement.exact_placement`;
* relaxed: Sinkhorn search on the *non-linear* objective (cross-entropy after n inferences of
  disturb through the simulator), started from the exact solution,
  :func:`nvjax.placement.relaxed_placement`.

Metrics per placement: reprogramming interval (inferences until the accuracy has been 1 % below
fresh for ``patience`` evaluations; chips that never reprogram are censored at the horizon), its
ratio to identity per chip (median and quartiles over chips), reprogrammings over the horizon,
accuracy vs inferences, and the linear cost. Writes ``results.json``, ``chips.csv``,
``e_disturb.png`` and ``summary.md`` into ``--out``.

    python experiments/e_disturb.py configs/e_disturb.yaml --out runs/e_disturb
"""
from __future__ import annotations

import dataclasses
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Literal, Optional, Tuple

import jax
import numpy as np

from nvjax import config as cfg_mod
from nvjax import lifetime as lt
from nvjax import models as models_mod
from nvjax import jobs
from nvjax import placement as pl
from nvjax.config import LifetimeRunConfig, load_yaml

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)
import _common  # noqa: E402


@dataclass(frozen=True)
class PlacementOptions:
    """How the optimized placements are found.

    Attributes:
        criticality: 'saliency' or 'hessian' (synapse criticality of the linear cost).
        cost_samples: training inputs used for criticality, read statistics and the objective.
        objective_inferences: n of the non-linear objective (inferences of disturb).
        relaxed_steps, learning_rate, tau_start, tau_end: Sinkhorn search.
        relaxed_start: 'uniform' (logits 0) or 'exact' (logits ``start_sharpness`` on the exact
            linear solution).
        random_seed: seed of the random placement.
        conv_disturb_rows: ``max_disturb_rows`` of the lifetime loop for conv models.
        objective_ir_mvm: the non-linear objective includes the IR-drop distortion of the MVM.
        conv_num_steps: lifetime steps for conv models (None: as the base config); their rows
            are read once per patch, so disturb acts tens of times faster than in the MLP.
    """
    criticality: str = "saliency"
    cost_samples: int = 256
    objective_inferences: float = 2e7
    relaxed_steps: int = 300
    learning_rate: float = 0.1
    tau_start: float = 1.0
    tau_end: float = 0.02
    relaxed_start: Literal["uniform", "exact"] = "uniform"
    start_sharpness: float = 3.0
    conv_disturb_rows: Optional[int] = 128
    objective_ir_mvm: bool = True
    conv_num_steps: Optional[int] = 30
    random_seed: int = 1

    def validate(self):
        if self.criticality not in ("saliency", "hessian"):
            raise ValueError(f"criticality must be 'saliency' or 'hessian', got {self.criticality!r}")
        if self.cost_samples < 1 or self.relaxed_steps < 1:
            raise ValueError("cost_samples and relaxed_steps must be >= 1")


@dataclass(frozen=True)
class EDisturbConfig:
    """Configuration of the E-disturb experiment (this script; ``configs/e_disturb.yaml``).

    Attributes:
        experiment: must be 'e_disturb' (lets a generic loader recognise the file).
        models: 'mlp' and/or 'lenet'.
        base: the lifetime run every placement is simulated with (see configs/lifetime.yaml).
        placement: how the optimized placements are found.
    """
    experiment: Literal["e_disturb"] = "e_disturb"
    models: Tuple[str, ...] = ("mlp", "lenet")
    base: LifetimeRunConfig = field(default_factory=LifetimeRunConfig)
    placement: PlacementOptions = field(default_factory=PlacementOptions)

    def validate(self):
        for m in self.models:
            if m not in ("mlp", "lenet"):
                raise ValueError(f"models: unknown model {m!r} (mlp, lenet)")




def load_config(path) -> EDisturbConfig:
    """Load and validate an :class:`EDisturbConfig` from a YAML file."""
    return load_yaml(path, EDisturbConfig)




def _first_intervals(rec, horizon):
    flags = np.asarray(rec.reprogrammed)
    since = np.asarray(rec.inferences_since)
    first = since[np.arange(flags.shape[0]), np.argmax(flags, axis=1)]
    return np.where(flags.any(axis=1), first, horizon), flags.any(axis=1)


def run_model(name, cfg: EDisturbConfig, out_dir, log=print):
    base = cfg.base
    mcfg = dataclasses.replace(base, model=dataclasses.replace(base.model, name=name))
    ds, x, y = _common.digits_split(name, base.seed, base.eval_samples)
    model_dir = os.path.join(out_dir, name)
    os.makedirs(model_dir, exist_ok=True)
    model, params, _ = jobs.get_model(mcfg, ds, model_dir)
    if name != "mlp":  # conv layers: one row vector per patch; cap the disturb-voltage rows
        steps = cfg.placement.conv_num_steps or base.lifetime.num_steps
        base = dataclasses.replace(base, lifetime=dataclasses.replace(
            base.lifetime, max_disturb_rows=cfg.placement.conv_disturb_rows, num_steps=steps))
    device = cfg_mod.make_device(base.device)
    disturb = cfg_mod.make_disturb(base.disturb, base.device)
    x_tr, y_tr = _common.first(cfg.placement.cost_samples, ds.x_train, ds.y_train)
    sw_acc = float(models_mod.accuracy(model, params, x, y))
    po = cfg.placement
    t0 = time.perf_counter()
    costs = pl.linear_costs(jax.random.key(base.seed), model, params, x_tr, y_tr, device,
                            base.tile, disturb, criticality=po.criticality)
    placements = {"identity": pl.identity_placement(params),
                  "random": pl.random_placement(jax.random.key(po.random_seed), params),
                  "exact": pl.exact_placement(costs)}
    t_exact = time.perf_counter() - t0
    t0 = time.perf_counter()
    placements["relaxed"], info = pl.relaxed_placement(
        jax.random.key(base.seed + 1), model, params, x_tr, y_tr, device, base.tile, disturb,
        po.objective_inferences,
        start=placements["exact"] if po.relaxed_start == "exact" else None,
        start_sharpness=po.start_sharpness, ir_mvm=po.objective_ir_mvm,
        steps=po.relaxed_steps, learning_rate=po.learning_rate, tau_start=po.tau_start,
        tau_end=po.tau_end)
    t_relaxed = time.perf_counter() - t0
    objective, names = pl.relaxed_objective(model, params, x_tr, y_tr, device, base.tile, disturb,
                                            po.objective_inferences, ir_mvm=po.objective_ir_mvm)
    obj = jax.jit(objective)

    def hard(p):
        mats = []
        for n in names:
            for perm in p[n]:
                mats.append(jax.nn.one_hot(np.asarray(perm), len(perm)))
        return float(obj(tuple(mats)))

    lc = base.lifetime
    horizon = float(lt.eval_inferences(lc)[-1])
    res = {"software_accuracy": sw_acc, "placements": {}, "time_exact_s": t_exact,
           "horizon_inferences": horizon, "inferences": lt.eval_inferences(lc).tolist(),
           "time_relaxed_s": t_relaxed, "layers": names}
    intervals = {}
    # built once: the placement is an argument of the simulation, so every placement reuses the
    # compiled chunks
    fns = lt.lifetime(model, params, device, base.tile, disturb, x, y, config=lc)
    fns_none = lt.lifetime(model, params, device, base.tile, disturb, x, y,
                           config=dataclasses.replace(lc, policy="none"))
    for pname, p in placements.items():
        t0 = time.perf_counter()
        rec = lt.run(fns, jax.random.key(base.seed), base.num_chips, placement=p,
                     chunk_size=base.chunk_size, progress=base.progress)
        first, hit = _first_intervals(rec, horizon)
        intervals[pname] = first
        counts = np.asarray(rec.reprogrammed).sum(axis=1)
        acc = np.asarray(rec.accuracy)
        # the same chips without reprogramming: accuracy vs inferences of the placement itself
        acc_none = np.asarray(lt.run(fns_none, jax.random.key(base.seed), base.num_chips,
                                     placement=p, chunk_size=base.chunk_size,
                                     progress=base.progress).accuracy)
        res["placements"][pname] = {
            "no_reprogramming_accuracy_mean": acc_none.mean(axis=0).tolist(),
            "no_reprogramming_accuracy_p50": np.percentile(acc_none, 50, axis=0).tolist(),
            "no_reprogramming_mean_over_horizon": float(acc_none.mean()),
            "no_reprogramming_final_mean": float(acc_none[:, -1].mean()),
            "no_reprogramming_final_sem": float(acc_none[:, -1].std() / np.sqrt(acc_none.shape[0])),
            "linear_cost": pl.placement_cost(costs, p), "objective": hard(p),
            "first_interval_median": float(np.median(first)),
            "first_interval_mean": float(first.mean()),
            "chips_reprogrammed": int(hit.sum()),
            "reprograms_mean": float(counts.mean()), "reprograms_std": float(counts.std()),
            "accuracy_p50": np.percentile(acc, 50, axis=0).tolist(),
            "accuracy_mean": acc.mean(axis=0).tolist(),
            "fresh_accuracy_mean": float(np.asarray(rec.fresh_accuracy)[:, 0].mean()),
            "simulate_s": time.perf_counter() - t0,
        }
        log(f"[{name}] {pname:>8}: linear cost {res['placements'][pname]['linear_cost']:.4g}, "
            f"objective {res['placements'][pname]['objective']:.4f}, first interval median "
            f"{np.median(first):.3g}, reprograms {counts.mean():.2f} ± {counts.std():.2f}")
    for pname in placements:
        r = intervals[pname] / intervals["identity"]
        res["placements"][pname]["interval_ratio_vs_identity"] = {
            "median": float(np.median(r)), "p25": float(np.percentile(r, 25)),
            "p75": float(np.percentile(r, 75)), "mean": float(r.mean())}
    res["intervals"] = {k: v.tolist() for k, v in intervals.items()}
    return res


def plot(path, results, cfg: EDisturbConfig):
    plt = _common.pyplot()
    fig, axes = plt.subplots(2, len(results), figsize=(6.0 * len(results), 7.6), squeeze=False)
    for k, (mname, res) in enumerate(results.items()):
        ax, ax2 = axes[0, k], axes[1, k]
        n = np.asarray(res["inferences"])
        for pname, r in res["placements"].items():
            ax.plot(n, 100 * np.asarray(r["no_reprogramming_accuracy_mean"]), label=pname)
            ax2.plot(n, 100 * np.asarray(r["accuracy_mean"]), label=(
                f"{pname}: interval {r['first_interval_median']:.3g}, "
                f"{r['reprograms_mean']:.2f} reprog."))
        ax.set_title(f"{mname}: mean accuracy over chips, no reprogramming", fontsize=9)
        ax2.set_title(f"{mname}: mean accuracy over chips, reprogrammed when 1 % below fresh",
                      fontsize=9)
        for a in (ax, ax2):
            a.set_xlabel("inferences served")
            a.set_ylabel("accuracy (%)")
            a.grid(alpha=0.3)
            a.legend(fontsize=7)
    _common.save_figure(fig, path, dpi=130)


def markdown(results, cfg: EDisturbConfig):
    b = cfg.base
    lc = b.lifetime
    lines = ["# E-disturb: read-disturb-aware placement", "",
             f"{b.num_chips} chips per placement (same chip keys), {b.device.kind}, tiles "
             f"{b.tile.rows}×{b.tile.cols}, IR drop {b.tile.ir_drop} (r_wire {b.tile.r_wire} Ω), "
             f"v_read {b.tile.v_read} V, steps of {lc.inferences_per_step:.3g} inferences "
             f"(horizon per model below); reprogram when accuracy is "
             f"{100 * lc.accuracy_drop:g} % below fresh for {lc.patience} evaluations. Interval = "
             "inferences to the first reprogramming (censored at the horizon).", ""]
    for mname, res in results.items():
        lines += [f"## {mname} (software accuracy {100 * res['software_accuracy']:.2f} %, horizon "
                  f"{res['horizon_inferences']:.3g} inferences)", "",
                  "| placement | linear cost | non-linear objective | interval median | "
                  "ratio vs identity (median [p25, p75]) | reprogrammings (mean ± std) | "
                  "accuracy at horizon, no reprogramming (mean ± s.e.) |",
                  "|---|---|---|---|---|---|---|"]
        for pname, r in res["placements"].items():
            q = r["interval_ratio_vs_identity"]
            lines.append(f"| {pname} | {r['linear_cost']:.4g} | {r['objective']:.4f} | "
                         f"{r['first_interval_median']:.3g} | {q['median']:.2f} [{q['p25']:.2f}, "
                         f"{q['p75']:.2f}] | {r['reprograms_mean']:.2f} ± {r['reprograms_std']:.2f} | "
                         f"{100 * r['no_reprogramming_final_mean']:.2f} ± "
                         f"{100 * r['no_reprogramming_final_sem']:.2f} % |")
        p = res["placements"]
        lines += ["", f"- exact vs identity on the linear cost: {p['exact']['linear_cost']:.4g} vs "
                  f"{p['identity']['linear_cost']:.4g} (never worse by construction: the identity "
                  "is one of the solver's starts).",
                  f"- relaxed (non-linear) vs exact (linear) on the accuracy-based interval: "
                  f"median {p['relaxed']['first_interval_median']:.3g} vs "
                  f"{p['exact']['first_interval_median']:.3g}; reprogrammings "
                  f"{p['relaxed']['reprograms_mean']:.2f} vs {p['exact']['reprograms_mean']:.2f}.",
                  f"- search time: exact {res['time_exact_s']:.1f} s, relaxed "
                  f"{res['time_relaxed_s']:.1f} s.", ""]
    return "\n".join(lines)


def run(cfg: EDisturbConfig, args):
    """Every model of the config (``--models`` overrides it); the outputs are rewritten after
    each model, so partial results survive."""
    if args.models:
        cfg = dataclasses.replace(cfg, models=tuple(args.models))
    results = {}
    for m in cfg.models:
        results[m] = run_model(m, cfg, args.out)
        write_all(args.out, cfg, results)
    return write_all(args.out, cfg, results)


def write_all(out, cfg, results):
    """results.json, chips.csv, e_disturb.png and summary.md; returns the summary's text."""
    _common.write_results(out, cfg, inferences=lt.eval_inferences(cfg.base.lifetime).tolist(),
                          models=results)
    _common.write_csv(os.path.join(out, "chips.csv"),
                      ["model", "placement", "chip", "first_interval"],
                      [[m, pname, c, f"{v:.6g}"] for m, res in results.items()
                       for pname, iv in res["intervals"].items() for c, v in enumerate(iv)])
    return _common.write_report(out, cfg, results, plot, markdown)


def main(argv=None):
    return _common.main(argv, __doc__, load_config, run, add_arguments=lambda ap: ap.add_argument(
        "--models", nargs="+", default=None))


if __name__ == "__main__":
    sys.exit(main())
