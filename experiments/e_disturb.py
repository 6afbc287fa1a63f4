"""E-disturb v2 (DESIGN.md §7.3, §11; issue 15): read-disturb-aware placement, paired statistics.

Scenario (``configs/e_disturb.yaml``; every parameter's source is in the config's comments):
256 × 256 tiles with wire resistance per segment, real input drives, and spare physical rows and
columns: a layer's logical rows and columns may sit anywhere in its tile grid (the rows and
columns it does not use stay empty, zero conductance). Placements of every layer:

* identity (the logical block in the top-left corner of its tiles);
* random (uniformly random rows and columns of the grid);
* exact: alternating exact row/column assignments of Σ C·D^(2β), C the Fisher-based weight
  factors (:func:`nvjax.placement.fisher_costs`), D the position factors from the real drives
  recomputed for each candidate layout (:func:`nvjax.placement.alternating_placement`);
* relaxed: Sinkhorn search on the simulator's own Monte Carlo expected loss over the horizon,
  with soft position factors (the weights never blur), started from exact
  (:func:`nvjax.placement.horizon_placement`);
* local_search: swap search from exact on the hard objective, for the relaxed search's time.

Every placement is simulated with :mod:`nvjax.lifetime` on the *same chips* (same chip keys).
Per chip: horizon-mean accuracy (mean over the evaluation points), accuracy at fixed fractions of
the horizon, reprogramming count, first reprogramming interval (right-censored at the horizon).
Differences against identity are paired per chip: mean, bootstrap 95 % CI and Wilcoxon p
(:mod:`nvjax.stats`); intervals by Kaplan–Meier. An IR-off control (the same tiles without wire
resistance, ``r_wire = 0``, identity vs exact) must show no effect. The cost is checked against the simulator:
Spearman rank correlation between the linear cost and the held-out Monte Carlo objective over
identity, several random and the optimised placements, and between the linear cost and the
lifetime horizon-mean accuracy over the simulated arms.

Writes ``results.json`` (``models.<m>.placements.<p>.horizon_mean_accuracy_diff`` {mean, ci95, p},
``reprogram_count_diff`` {mean, ci95}, ``ir_off_control``), ``chips.csv``, ``e_disturb.png`` and
``summary.md`` into ``--out``.

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
from scipy import stats as sp_stats

import jax.numpy as jnp

from nvjax import config as cfg_mod
from nvjax import crossbar as xb
from nvjax import jobs
from nvjax import layers
from nvjax import lifetime as lt
from nvjax import models as models_mod
from nvjax import placement as pl
from nvjax import stats
from nvjax import sweep
from nvjax.config import LifetimeRunConfig, load_yaml

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)
import _common  # noqa: E402

PLACEMENTS = ("identity", "random", "exact", "relaxed", "local_search")


@dataclass(frozen=True)
class PlacementOptions:
    """How the placements are found and checked.

    Attributes:
        cost_samples: training inputs for the Fisher diagonal, the read statistics and the
            Monte Carlo objective.
        factor_rows: input row vectors (evenly spaced among them) whose IR drop is solved for the
            position factors.
        alternating_rounds: rounds of the exact placement (factors recomputed per layout).
        relaxed_steps, learning_rate, tau_start, tau_end, start_sharpness: the Sinkhorn search.
        relaxed_chips: Monte Carlo chips per step of the relaxed search (fresh keys each step).
        horizon_points: points of the horizon the objective averages the loss over.
        local_search_chips: fixed chips of the hard objective (local search, and the hard
            comparison of exact, relaxed and local search).
        local_search_time_s: the local search's time budget (None: the relaxed search's time,
            the equal-time comparison; a number only to shorten test runs).
        check_chips: held-out chips of the rank check of the cost.
        num_random: random placements in the rank check (the first one is the 'random' arm).
        random_seed: seed of the random placements.
        conv_disturb_rows: ``max_disturb_rows`` of the lifetime loop for conv models.
    """
    cost_samples: int = 256
    factor_rows: int = 64
    alternating_rounds: int = 2
    relaxed_steps: int = 100
    learning_rate: float = 0.1
    tau_start: float = 0.3
    tau_end: float = 0.03
    start_sharpness: float = 3.0
    relaxed_chips: int = 2
    horizon_points: int = 4
    local_search_chips: int = 4
    local_search_time_s: Optional[float] = None
    check_chips: int = 32
    num_random: int = 3
    random_seed: int = 1
    conv_disturb_rows: Optional[int] = 128

    def validate(self):
        for name in ("cost_samples", "factor_rows", "relaxed_steps", "relaxed_chips",
                     "horizon_points", "local_search_chips", "check_chips", "num_random"):
            if getattr(self, name) < 1:
                raise ValueError(f"placement.{name} must be >= 1, got {getattr(self, name)}")
        if self.alternating_rounds < 0:
            raise ValueError("placement.alternating_rounds must be >= 0")


@dataclass(frozen=True)
class EDisturbConfig:
    """Configuration of the E-disturb experiment (this script; ``configs/e_disturb.yaml``).

    Attributes:
        experiment: must be 'e_disturb'.
        models: 'mlp' and/or 'lenet' (the MLP's widths are ``base.model.hidden``).
        base: the lifetime run every placement is simulated with.
        placement: how the placements are found and checked.
        eval_all_digits: evaluate on all 1797 digits (training and test images; the accuracy
            *changes* are what is compared) instead of the test split only.
        fixed_horizons: fractions of the horizon where the accuracy is also compared.
    """
    experiment: Literal["e_disturb"] = "e_disturb"
    models: Tuple[str, ...] = ("mlp",)
    base: LifetimeRunConfig = field(default_factory=LifetimeRunConfig)
    placement: PlacementOptions = field(default_factory=PlacementOptions)
    eval_all_digits: bool = True
    fixed_horizons: Tuple[float, ...] = (0.25, 0.5, 1.0)

    def validate(self):
        for m in self.models:
            if m not in ("mlp", "lenet"):
                raise ValueError(f"models: unknown model {m!r} (mlp, lenet)")
        for f in self.fixed_horizons:
            if not 0 < f <= 1:
                raise ValueError(f"fixed_horizons: fractions in (0, 1], got {f}")


def load_config(path) -> EDisturbConfig:
    """Load and validate an :class:`EDisturbConfig` from a YAML file."""
    return load_yaml(path, EDisturbConfig)


def _per_chip(rec, horizon, fixed_idx):
    acc = np.asarray(rec.accuracy, np.float64)
    flags = np.asarray(rec.reprogrammed)
    since = np.asarray(rec.inferences_since)
    hit = flags.any(axis=1)
    first = np.where(hit, since[np.arange(flags.shape[0]), np.argmax(flags, axis=1)], horizon)
    return {"horizon_mean_accuracy": acc.mean(axis=1), "reprogram_count": flags.sum(axis=1),
            "first_interval": first, "reprogrammed": hit,
            "fixed": {f: acc[:, i] for f, i in fixed_idx.items()}, "accuracy": acc}


def _diff(a, b, seed):
    d = stats.paired_difference(a, b, seed=seed)
    return {"mean": d["mean"], "ci95": list(d["ci95"]), "p": d["p"], "sd": d["sd"], "n": d["n"]}


def _first_order_check(model, params, x, device, tile):
    """Per layer: the largest error of the first-order cell voltages against the converged
    solver on real drives (identity layout), relative to the largest IR loss (V)."""
    out = {}
    if tile.ir_drop != "first_order":
        return out
    solver = tile.replace(ir_drop="solver", ir_max_iter=1000)
    inputs = layers.layer_inputs(model, params, x)
    for name, kern in layers.kernels(params).items():
        gp, _, _ = xb.tile(kern, device, config=tile)
        rows = inputs[name]
        v = tile.v_read * rows / xb.input_scale(rows, config=tile)
        v_fo = xb.cell_voltages(gp, v, config=tile)
        v_so = xb.cell_voltages(gp, v, config=solver)
        loss = jnp.max(jnp.abs(v[:, :, None] - v_so))   # the largest IR loss, V
        out[name] = {"max_ir_loss_v": float(loss),
                     "first_order_error_of_loss": float(jnp.max(jnp.abs(v_fo - v_so)) / loss)}
    return out


def run_model(name, cfg: EDisturbConfig, out_dir, log=print):
    base = cfg.base
    po = cfg.placement
    mcfg = dataclasses.replace(base, model=dataclasses.replace(base.model, name=name))
    ds, _, _ = _common.digits_split(name, base.seed)
    model_dir = os.path.join(out_dir, name)
    os.makedirs(model_dir, exist_ok=True)
    model, params, _ = jobs.get_model(mcfg, ds, model_dir)
    if cfg.eval_all_digits:
        x = np.concatenate([ds.x_train, ds.x_test])
        y = np.concatenate([ds.y_train, ds.y_test])
    else:
        x, y = ds.x_test, ds.y_test
    lc = base.lifetime
    if name != "mlp":
        lc = dataclasses.replace(lc, max_disturb_rows=po.conv_disturb_rows)
    device = cfg_mod.make_device(base.device)
    disturb = cfg_mod.make_disturb(base.disturb, base.device)
    tile = base.tile
    x_tr, y_tr = _common.first(po.cost_samples, ds.x_train, ds.y_train)
    x_f = x_tr[np.linspace(0, len(x_tr) - 1, min(po.factor_rows, len(x_tr))).astype(int)]
    shapes = {n: k.shape for n, k in layers.kernels(params).items()}
    horizon = float(lt.eval_inferences(lc)[-1])
    beta = float(disturb.beta)
    res = {"software_accuracy": float(models_mod.accuracy(model, params, x, y)),
           "horizon_inferences": horizon, "inferences": lt.eval_inferences(lc).tolist(),
           "layers": list(shapes), "evaluation_images": int(len(x))}

    def factors(p, attenuation=False):
        return pl.drive_position_factors(model, params, x_f, device, tile, disturb, p,
                                         max_rows=po.factor_rows, with_attenuation=attenuation)

    res["first_order_check"] = _first_order_check(model, params, x_f[:16], device, tile)

    # --- placements ---------------------------------------------------------------------------
    t0 = time.perf_counter()
    costs = pl.fisher_costs(model, params, x_tr, device, tile, disturb)
    ident = pl.identity_placement(params, tile)
    randoms = [pl.random_placement(jax.random.key(po.random_seed + k), params, tile)
               for k in range(po.num_random)]
    exact, alt = pl.alternating_placement(model, params, x_f, device, tile, disturb, costs,
                                          start=ident, rounds=po.alternating_rounds,
                                          max_rows=po.factor_rows, log=log)
    t_exact = time.perf_counter() - t0
    f_exact = factors(exact, attenuation=True)
    obj, names = pl.horizon_objective(model, params, x_tr, y_tr, device, tile, disturb, f_exact,
                                      horizon=horizon, num_points=po.horizon_points,
                                      num_chips=po.relaxed_chips,
                                      inference_rate_hz=lc.inference_rate_hz)
    t0 = time.perf_counter()
    relaxed, rinfo = pl.horizon_placement(jax.random.key(base.seed + 1), obj, names, shapes, exact,
                                          steps=po.relaxed_steps, learning_rate=po.learning_rate,
                                          tau_start=po.tau_start, tau_end=po.tau_end,
                                          start_sharpness=po.start_sharpness,
                                          eval_key=jax.random.key(base.seed + 3))
    t_relaxed = time.perf_counter() - t0
    obj_hard, _ = pl.horizon_objective(model, params, x_tr, y_tr, device, tile, disturb, f_exact,
                                       horizon=horizon, num_points=po.horizon_points,
                                       num_chips=po.local_search_chips,
                                       inference_rate_hz=lc.inference_rate_hz)
    hard_key = jax.random.key(base.seed + 3)
    local, linfo = pl.swap_local_search(jax.random.key(base.seed + 2), obj_hard, names, shapes,
                                        exact, eval_key=hard_key,
                                        time_budget_s=(t_relaxed if po.local_search_time_s is None
                                                       else po.local_search_time_s))
    hard = jax.jit(lambda mats: obj_hard(hard_key, mats))
    placements = {"identity": ident, "random": randoms[0], "exact": exact, "relaxed": relaxed,
                  "local_search": local}
    res["search"] = {
        "time_exact_s": t_exact, "time_relaxed_s": t_relaxed,
        "time_local_search_s": linfo["seconds"], "local_search_evals": linfo["evals"],
        "alternating_history": alt["history"],
        "relaxed_loss_history": np.asarray(rinfo["search"].loss_history)[
            :: max(1, po.relaxed_steps // 50)].tolist(),
        "relaxed_kept": rinfo["kept"],
        "hard_objective": {k: float(hard(pl.hard_matrices(placements[k], names, shapes)))
                           for k in ("exact", "relaxed", "local_search")},
        "hard_objective_note": ("Monte Carlo expected loss over the horizon on "
                                f"{po.local_search_chips} fixed chips with the exact layout's "
                                "position factors (the local search's own objective)")}
    log(f"[{name}] search: exact {t_exact:.1f} s, relaxed {t_relaxed:.1f} s, local search "
        f"{linfo['seconds']:.1f} s ({linfo['evals']} evaluations); hard objective "
        f"{res['search']['hard_objective']}")

    # --- does the cost rank placements as the simulator does? -----------------------------------
    check = dict(placements)
    for k, r in enumerate(randoms[1:], 1):
        check[f"random_{k}"] = r
    check_keys = jax.random.split(jax.random.key(base.seed + 4), po.check_chips)
    one, _ = pl.horizon_objective(model, params, x_tr, y_tr, device, tile, disturb, f_exact,
                                  horizon=horizon, num_points=po.horizon_points, num_chips=1,
                                  inference_rate_hz=lc.inference_rate_hz)
    per_chip = jax.jit(jax.vmap(one, (0, None, None)))   # compiled once: factors are arguments
    rank = {}
    for pname, p in check.items():
        f = f_exact if pname == "exact" else factors(p, attenuation=True)
        lin = pl.self_consistent_cost(costs, {n: d for n, (d, _) in f.items()}, p, beta)
        per = np.asarray(per_chip(check_keys, pl.hard_matrices(p, names, shapes), f))
        rank[pname] = {"linear_cost": lin, "objective_mean": float(per.mean()),
                       "objective_sem": float(per.std(ddof=1) / np.sqrt(per.size)),
                       "per_chip": per}
    lin = np.array([v["linear_cost"] for v in rank.values()])
    objv = np.array([v["objective_mean"] for v in rank.values()])
    rho = sp_stats.spearmanr(lin, objv)
    res["cost_check"] = {
        "placements": {k: {kk: vv for kk, vv in v.items() if kk != "per_chip"}
                       for k, v in rank.items()},
        "spearman_cost_vs_objective": {"rho": float(rho.statistic), "p": float(rho.pvalue)},
        "objective_diff_vs_identity": {
            k: _diff(v["per_chip"], rank["identity"]["per_chip"], base.seed)
            for k, v in rank.items() if k != "identity"}}

    # --- lifetime, same chips for every placement -----------------------------------------------
    inf = lt.eval_inferences(lc)
    fixed_idx = {f: int(np.argmin(np.abs(inf - f * horizon))) for f in cfg.fixed_horizons}
    res["fixed_horizon_inferences"] = {str(f): float(inf[i]) for f, i in fixed_idx.items()}

    def record(key, placement, tile_cfg):
        # the tile config is an argument: its physics (r_wire) is traced, so the IR-off control
        # (r_wire = 0) runs through the same compiled chunk as the arms
        fns = lt.lifetime(model, params, device, tile_cfg, disturb, x, y, config=lc)
        return fns.simulate(key, placement)[1]

    def run_arm(p, tile_cfg):
        p = {n: tuple(jnp.asarray(a, jnp.int32) for a in rc) for n, rc in p.items()}
        rec = sweep.run_instances(record, jax.random.key(base.seed), base.num_chips, p, tile_cfg,
                                  chunk_size=base.chunk_size, progress=base.progress,
                                  desc="chips")
        return lt.LifetimeRecord(*rec)

    chips = {}
    for pname, p in placements.items():
        t0 = time.perf_counter()
        rec = run_arm(p, tile)
        chips[pname] = _per_chip(rec, horizon, fixed_idx)
        chips[pname]["simulate_s"] = time.perf_counter() - t0
        log(f"[{name}] {pname:>12}: horizon-mean accuracy "
            f"{100 * chips[pname]['horizon_mean_accuracy'].mean():.2f} %, reprogrammings "
            f"{chips[pname]['reprogram_count'].mean():.2f} ({chips[pname]['simulate_s']:.0f} s)")
    tile_off = tile.replace(r_wire=0.0)       # no wire resistance: no IR drop, same program
    off = {}
    for pname in placements:
        off[pname] = _per_chip(run_arm(placements[pname], tile_off), horizon, fixed_idx)

    ref = chips["identity"]
    out = {}
    for pname, c in chips.items():
        km = stats.kaplan_meier(c["first_interval"], c["reprogrammed"])
        entry = {
            "horizon_mean_accuracy": float(c["horizon_mean_accuracy"].mean()),
            "reprogram_count_mean": float(c["reprogram_count"].mean()),
            "first_interval_km_median": km["median"],
            "chips_reprogrammed": int(c["reprogrammed"].sum()),
            "linear_cost": rank[pname]["linear_cost"],
            "objective_mean": rank[pname]["objective_mean"],
            "accuracy_mean": c["accuracy"].mean(axis=0).tolist(),
            "simulate_s": c["simulate_s"]}
        if pname != "identity":
            entry["horizon_mean_accuracy_diff"] = _diff(c["horizon_mean_accuracy"],
                                                        ref["horizon_mean_accuracy"], base.seed)
            entry["reprogram_count_diff"] = _diff(c["reprogram_count"].astype(float),
                                                  ref["reprogram_count"].astype(float), base.seed)
            entry["accuracy_diff_at"] = {str(f): _diff(c["fixed"][f], ref["fixed"][f], base.seed)
                                         for f in cfg.fixed_horizons}
            entry["first_interval_km_median_diff"] = stats.km_median_difference(
                c["first_interval"], c["reprogrammed"], ref["first_interval"], ref["reprogrammed"],
                seed=base.seed)
        out[pname] = entry
    res["placements"] = out
    res["relaxed_vs_exact"] = {"horizon_mean_accuracy_diff": _diff(
        chips["relaxed"]["horizon_mean_accuracy"], chips["exact"]["horizon_mean_accuracy"],
        base.seed)}
    res["relaxed_vs_random"] = {"horizon_mean_accuracy_diff": _diff(
        chips["relaxed"]["horizon_mean_accuracy"], chips["random"]["horizon_mean_accuracy"],
        base.seed)}
    res["ir_off_control"] = {
        "horizon_mean_accuracy_diff": _diff(off["exact"]["horizon_mean_accuracy"],
                                            off["identity"]["horizon_mean_accuracy"], base.seed),
        "reprogram_count_diff": _diff(off["exact"]["reprogram_count"].astype(float),
                                      off["identity"]["reprogram_count"].astype(float), base.seed),
        "note": "exact vs identity, the same tiles with r_wire = 0 (every arm: by_placement)",
        "by_placement": {p: _diff(off[p]["horizon_mean_accuracy"],
                                  off["identity"]["horizon_mean_accuracy"], base.seed)
                         for p in placements if p != "identity"}}
    lin = [out[p]["linear_cost"] for p in placements]
    hm = [out[p]["horizon_mean_accuracy"] for p in placements]
    rho = sp_stats.spearmanr(lin, hm)
    res["cost_check"]["spearman_cost_vs_lifetime_accuracy"] = {
        "rho": float(rho.statistic), "p": float(rho.pvalue), "placements": list(placements),
        "note": "expected negative: a lower cost should mean a higher accuracy"}
    res["chips"] = {p: {"horizon_mean_accuracy": c["horizon_mean_accuracy"].tolist(),
                        "reprogram_count": c["reprogram_count"].tolist(),
                        "first_interval": c["first_interval"].tolist(),
                        "reprogrammed": c["reprogrammed"].tolist()} for p, c in chips.items()}
    return res


def plot(path, results, cfg: EDisturbConfig):
    plt = _common.pyplot()
    fig, axes = plt.subplots(2, len(results), figsize=(6.5 * len(results), 8.0), squeeze=False)
    for k, (mname, res) in enumerate(results.items()):
        ax, ax2 = axes[0, k], axes[1, k]
        n = np.asarray(res["inferences"])
        colors = {}
        for pname, r in res["placements"].items():
            colors[pname] = ax.plot(n, 100 * np.asarray(r["accuracy_mean"]), label=pname)[0] \
                .get_color()
        ax.set_title(f"{mname}: mean accuracy over chips (reprogrammed when 1 % below fresh)",
                     fontsize=9)
        ax.set_xlabel("inferences served")
        ax.set_ylabel("accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        rows = [(p, r["horizon_mean_accuracy_diff"]) for p, r in res["placements"].items()
                if "horizon_mean_accuracy_diff" in r]
        rows.append(("IR-off control", res["ir_off_control"]["horizon_mean_accuracy_diff"]))
        for i, (p, d) in enumerate(rows):
            lo, hi = d["ci95"]
            ax2.errorbar([100 * d["mean"]], [i], xerr=[[100 * (d["mean"] - lo)],
                                                       [100 * (hi - d["mean"])]], fmt="o",
                         color=colors.get(p, "k"))
        ax2.axvline(0.0, color="k", lw=0.8)
        ax2.set_yticks(range(len(rows)))
        ax2.set_yticklabels([r[0] for r in rows])
        ax2.set_xlabel("horizon-mean accuracy − identity, same chips (points, 95 % CI)")
        ax2.grid(alpha=0.3)
    _common.save_figure(fig, path, dpi=130)


def _fmt(d, scale=100.0, unit=""):
    lo, hi = d["ci95"]
    p = f", p = {d['p']:.2g}" if "p" in d else ""
    return f"{scale * d['mean']:+.2f}{unit} [{scale * lo:+.2f}, {scale * hi:+.2f}]{p}"


def claims(results, cfg: EDisturbConfig):
    """The claim rows (:func:`_common.claim`) of paper A (Paul et al., arXiv 2201.11527):
    read-disturb-aware placement postpones reprogramming against identity and random placement,
    and the relaxed (gradient) search matches the exact solver; plus the IR-off control.
    Evidence: the first model's paired per-chip differences, with bootstrap 95 % CIs over
    chips only: the evaluation images (the 1797 digits, the 256 cost images among them) are the
    same for every placement but their sampling error does not cancel in the differences, and
    it is not in these CIs (the lifetime runs keep per-chip accuracies, not per-image
    correctness)."""
    res = next(iter(results.values()))
    pl_ = res["placements"]
    ex = pl_["exact"]
    chips = res["chips"]
    n = len(chips["exact"]["reprogram_count"])

    def ci(d, scale=1.0):
        return [scale * d["ci95"][0], scale * d["ci95"][1]]

    def excludes_zero(d):
        return d["ci95"][0] > 0 or d["ci95"][1] < 0
    # exact - random, paired on the same chips
    vs_rand = stats.paired_difference(np.asarray(chips["exact"]["reprogram_count"], float),
                                      np.asarray(chips["random"]["reprogram_count"], float),
                                      seed=cfg.base.seed)
    c_id, a_id = ex["reprogram_count_diff"], ex["horizon_mean_accuracy_diff"]
    rows = [
        _common.claim(
            "optimised placement postpones reprogramming vs identity",
            "longer reprogramming interval than the unoptimised mapping",
            f"exact − identity: {c_id['mean']:+.2f} reprogrammings per chip "
            f"[{c_id['ci95'][0]:+.2f}, {c_id['ci95'][1]:+.2f}]; horizon-mean accuracy (points) "
            f"{_fmt(a_id)}; {n} chips",
            "reproduced" if c_id["ci95"][1] < 0 else "not reproduced",
            "fewer reprogrammings, CI excludes 0" if c_id["ci95"][1] < 0 else
            f"inconclusive, CI includes 0: identity itself reprograms only "
            f"{pl_['identity']['reprogram_count_mean']:.2f} times per chip over the horizon, "
            "too few to detect a difference on these chips",
            value=c_id["mean"], ci=ci(c_id)),
        _common.claim(
            "optimised placement postpones reprogramming vs random",
            "longer reprogramming interval than a random mapping",
            f"exact − random: {vs_rand['mean']:+.2f} reprogrammings per chip "
            f"[{vs_rand['ci95'][0]:+.2f}, {vs_rand['ci95'][1]:+.2f}], Wilcoxon p = "
            f"{vs_rand['p']:.2g}",
            "reproduced" if vs_rand["ci95"][1] < 0 else "not reproduced",
            f"CI excludes 0, but random is the weaker baseline: it reprograms more than "
            f"identity too (reprogrammings per chip: random "
            f"{pl_['random']['reprogram_count_mean']:.2f}, identity "
            f"{pl_['identity']['reprogram_count_mean']:.2f}, exact "
            f"{ex['reprogram_count_mean']:.2f})" if vs_rand["ci95"][1] < 0 else "CI includes 0",
            value=vs_rand["mean"], ci=[vs_rand["ci95"][0], vs_rand["ci95"][1]]),
    ]
    rve = res["relaxed_vs_exact"]["horizon_mean_accuracy_diff"]
    rows.append(_common.claim(
        "relaxed (gradient) search reaches the exact solver's quality",
        "not the paper's (DESIGN.md §7.3): relaxed search started from exact, on the "
        "simulator's MC objective",
        f"relaxed − exact horizon-mean accuracy (points): {_fmt(rve)}",
        "partly" if rve["ci95"][1] < 0 and rve["ci95"][0] > -0.5 / 100 else
        ("not reproduced" if rve["ci95"][1] < 0 else "reproduced"),
        "a small but significant loss (CI within 0.5 points): it lowers its own Monte Carlo "
        "objective (a few fixed chips) below exact's yet loses accuracy on the simulated "
        "chips; over-fitting those chips is a likely cause, not tested" if rve["ci95"][1] < 0
        else "no loss against exact within the CI",
        value=100 * rve["mean"], ci=ci(rve, 100.0), kind="extension"))
    ir = res["ir_off_control"]
    by = ir.get("by_placement") or {"exact": ir["horizon_mean_accuracy_diff"]}
    moved = [k for k, d in by.items() if excludes_zero(d)]
    rows.append(_common.claim(
        "control: without wire resistance placement has no effect",
        "(our control, not a paper claim)",
        "− identity (points): " + "; ".join(f"{k} {_fmt(d)}" for k, d in by.items()),
        "reproduced" if not moved else "not reproduced",
        "every CI includes 0" if not moved else f"an effect without IR drop: {moved}",
        value=100 * by.get("exact", next(iter(by.values())))["mean"], kind="control"))
    return rows


def markdown(results, cfg: EDisturbConfig):
    b = cfg.base
    lc = b.lifetime
    n_chips = sorted({len(r["chips"]["identity"]["horizon_mean_accuracy"])
                      for r in results.values()})
    lines = ["# E-disturb v2: read-disturb-aware placement, paired over chips", "",
             f"{'/'.join(map(str, n_chips))} chips per placement (the same chip keys for every placement), "
             f"{b.device.kind}, tiles {b.tile.rows}×{b.tile.cols}, IR drop {b.tile.ir_drop} "
             f"(r_wire {b.tile.r_wire} Ω per segment), v_read {b.tile.v_read} V, spare rows and "
             f"columns (each layer may use its whole tile grid), {lc.num_steps} steps of "
             f"{lc.inferences_per_step:.3g} inferences, reprogram when the accuracy is "
             f"{100 * lc.accuracy_drop:g} % below fresh for {lc.patience} evaluations. "
             "Differences are against identity on the same chips: mean [bootstrap 95 % CI], "
             "Wilcoxon signed-rank p.", "", "## Claims", "",
             _common.claims_table(claims(results, cfg))]
    for mname, res in results.items():
        s = res["search"]
        lines += [f"## {mname} (software accuracy {100 * res['software_accuracy']:.2f} % on "
                  f"{res['evaluation_images']} images, horizon {res['horizon_inferences']:.3g} "
                  "inferences)", "",
                  "| placement | linear cost | MC objective (held-out chips) | horizon-mean "
                  "accuracy | − identity (points) | reprogrammings | − identity | KM median "
                  "first interval |", "|---|---|---|---|---|---|---|---|"]
        for pname, r in res["placements"].items():
            d = r.get("horizon_mean_accuracy_diff")
            c = r.get("reprogram_count_diff")
            km = r["first_interval_km_median"]
            lines.append(
                f"| {pname} | {r['linear_cost']:.4g} | {r['objective_mean']:.4f} | "
                f"{100 * r['horizon_mean_accuracy']:.2f} % | {_fmt(d) if d else '—'} | "
                f"{r['reprogram_count_mean']:.2f} | {_fmt(c, 1.0) if c else '—'} | "
                f"{'censored' if km is None else f'{km:.3g}'} |")
        ir = res["ir_off_control"]["horizon_mean_accuracy_diff"]
        cc = res["cost_check"]
        by = res["ir_off_control"].get("by_placement", {})
        lines += ["",
                  "- IR-off control (the same chips and placements without wire resistance, "
                  "− identity): " + "; ".join(f"{k} {_fmt(v)}" for k, v in by.items())
                  + "." if by else
                  f"- IR-off control (exact − identity without wire resistance): {_fmt(ir)}.",
                  "- p-values are per comparison (4 arms × several metrics, no multiplicity "
                  "correction: read p > 0.01 as no evidence). The cost samples (256 training "
                  "images) are part of the 1797 evaluation images.",
                  f"- relaxed − exact: {_fmt(res['relaxed_vs_exact']['horizon_mean_accuracy_diff'])}"
                  f"; relaxed − random: "
                  f"{_fmt(res['relaxed_vs_random']['horizon_mean_accuracy_diff'])}.",
                  f"- cost vs simulator: Spearman ρ(linear cost, held-out MC objective) = "
                  f"{cc['spearman_cost_vs_objective']['rho']:.2f} over "
                  f"{len(cc['placements'])} placements; ρ(linear cost, lifetime horizon-mean "
                  f"accuracy) = {cc['spearman_cost_vs_lifetime_accuracy']['rho']:.2f} over "
                  f"{len(res['placements'])}.",
                  f"- search: exact {s['time_exact_s']:.1f} s, relaxed {s['time_relaxed_s']:.1f} s,"
                  f" local search {s['time_local_search_s']:.1f} s ({s['local_search_evals']} "
                  f"evaluations); hard objective ({s['hard_objective_note']}): "
                  + ", ".join(f"{k} {v:.4f}" for k, v in s["hard_objective"].items()) + ".", ""]
    return "\n".join(lines)


def run(cfg: EDisturbConfig, args):
    """Every model of the config (``--models``, ``--num-chips`` override it); the outputs are
    rewritten after each model, so partial results survive."""
    if args.models:
        cfg = dataclasses.replace(cfg, models=tuple(args.models))
    if args.num_chips:
        cfg = dataclasses.replace(cfg, base=dataclasses.replace(cfg.base,
                                                                num_chips=args.num_chips))
    t0 = time.perf_counter()
    results = {}
    for m in cfg.models:
        results[m] = run_model(m, cfg, args.out)
        write_all(args.out, cfg, results, time.perf_counter() - t0)
    return write_all(args.out, cfg, results, time.perf_counter() - t0)


def write_all(out, cfg, results, total_s):
    """results.json, chips.csv, e_disturb.png and summary.md; returns the summary's text."""
    _common.write_results(out, cfg, claims=claims(results, cfg), models=results,
                          total_s=total_s)
    rows = []
    for m, res in results.items():
        for pname, c in res["chips"].items():
            for i in range(len(c["horizon_mean_accuracy"])):
                rows.append([m, pname, i, f"{c['horizon_mean_accuracy'][i]:.6g}",
                             c["reprogram_count"][i], f"{c['first_interval'][i]:.6g}",
                             int(c["reprogrammed"][i])])
    _common.write_csv(os.path.join(out, "chips.csv"),
                      ["model", "placement", "chip", "horizon_mean_accuracy", "reprogram_count",
                       "first_interval", "first_interval_observed"], rows)
    return _common.write_report(out, cfg, results, plot, markdown,
                                footer=_common.run_time(total_s))


def _add_arguments(ap):
    ap.add_argument("--models", nargs="+", default=None)
    ap.add_argument("--num-chips", type=int, default=None,
                    help="chips per placement (overrides base.num_chips)")


def main(argv=None):
    return _common.main(argv, __doc__, load_config, run, add_arguments=_add_arguments,
                        from_results=(plot, markdown), claims=claims)


if __name__ == "__main__":
    sys.exit(main())
