"""E-swim (DESIGN.md §11, paper C): selective write-verify, accuracy vs verified fraction p.

Reproduces the claim of Yan, Hu, Shi, "SWIM: Selective write-verify for computing-in-memory
neural accelerators", DAC 2022: write-verifying only the fraction p ≈ 0.1 of the weights with the
highest sensitivity ``½·H_ii·σ_i²`` keeps the accuracy within ~1 % of full write-verify at up to
~10× fewer write cycles; magnitude and random rankings need a larger p.

Deployment (our choice, documented): every Dense/Conv kernel is quantized to ``bits``-bit
sign-magnitude codes (max|W| per layer) and bit-sliced onto ``slice_bits``-bit D3 per-level
Gaussian cells (:func:`nvjax.devices.levels`, levels in [0, 1] µS) with a positive and a
negative stack (:func:`nvjax.encoding.to_slices`, ``signed='pair'``): 8-bit weights on 2-bit
cells use 2 × 4 cells per weight. Decoding is the linear shift-and-add of
:func:`nvjax.encoding.from_slices`. Biases stay digital. A weight is verified or not as a whole:
its mask covers all its cells. Per-weight programming σ_i (weight units) from the level σ of its
cells: ``σ_i = (w_step/Δ)·sqrt(Σ_stacks Σ_s 4^(s·K)·σ_ℓ(cell)²)`` with Δ the level spacing
(every cell, including the level-0 cells of the unused stack, carries its level's noise).
Sensitivity ``½·H_ii·σ_i²`` with ``H_ii`` from :func:`nvjax.sensitivity.hessian_diag` on the
training split (:func:`nvjax.sensitivity.swim_sensitivity`); baselines:
:func:`nvjax.programming.magnitude_scores` (|w|, one global ranking over all layers) and
:func:`nvjax.programming.random_scores` (drawn per chip). Masks:
:func:`nvjax.programming.swim_mask` (global top fraction p over all kernels).

Per chip, cells are programmed by :func:`nvjax.programming.selective_write_verify` semantics.
With ``method: compose`` (default, fast) each chip runs full write-verify and one shot once, with
the same key, and the selective result of every mask is ``where(mask, full, one_shot)``; by the
documented key scheme of :mod:`nvjax.programming` this *is* ``selective_write_verify(key, ...,
mask)`` bit for bit (a cell's draw sequence does not depend on the mask). ``method: direct``
calls :func:`selective_write_verify` for each mask (slow; the tests check both agree exactly).
Normalized write cycles = Σ cycles / Σ cycles of full write-verify, per chip (one-shot cells
count one cycle).

Chip ``i`` uses ``fold_in(k_chips, i)`` (:func:`nvjax.sweep.run_instances`, chunked, vmapped,
progress bar); every cell variant, ranking and p uses the same chips (common random numbers).
Writes ``results.json``, ``results.csv`` (one row per model, cell variant, ranking, p and chip),
``e_swim.png`` and ``summary.md`` into ``--out``.

    python experiments/e_swim.py configs/e_swim.yaml --out runs/e_swim
"""
import os
import sys
import time
from dataclasses import dataclass
from typing import Literal, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

from nvjax import devices as dev_mod
from nvjax import encoding as enc
from nvjax import models as models_mod
from nvjax import programming as pr
from nvjax import sensitivity as sens
from nvjax import sweep
from nvjax.config import load_yaml

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)
import _common  # noqa: E402

RANKINGS = ("swim", "magnitude", "random")
CLAIM = "write-verifying p ≈ 0.1 of the weights (SWIM ranking) keeps accuracy within ~1 % of " \
        "full write-verify at up to ~10× fewer write cycles (Yan, Hu, Shi, DAC 2022)"


# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CellVariant:
    """One D3 per-level Gaussian cell population (:func:`nvjax.devices.levels`).

    Attributes:
        name: label.
        sigma: σ of every level, relative to the conductance range (before ``nonuniform``).
        nonuniform: factor s multiplying σ of the mid-range levels (1: uniform).
    """
    name: str
    sigma: float
    nonuniform: float = 1.0

    def validate(self):
        if self.sigma < 0:
            raise ValueError(f"sigma must be >= 0, got {self.sigma}")
        if self.nonuniform <= 0:
            raise ValueError(f"nonuniform must be > 0, got {self.nonuniform}")


@dataclass(frozen=True)
class ESwimConfig:
    """E-swim run configuration.

    Attributes:
        experiment: must be 'e_swim' (lets a generic loader recognise the file).
        seed: root seed (chips, Hessian probes, model training).
        models: digits models of :func:`nvjax.models.get_trained` ('mlp', 'lenet').
        model_epochs: training epochs (None: get_trained defaults).
        model_cache_dir: cache of trained models (None: ``<out>/models``).
        bits: M, bits of the sign-magnitude weight codes.
        slice_bits: K, bits per cell (the cell has 2^K levels).
        cells: the cell variants.
        tol: write-verify tolerance, relative to the conductance range (µS on [0, 1] µS).
        max_cycles: write-verify cycle cap per cell.
        fractions: verified fractions p in [0, 1].
        rankings: 'swim', 'magnitude', 'random'.
        hessian_probes: Hutchinson probes for diag(H).
        hessian_samples: training images for the Hessian (None: the whole training split).
        num_chips: chips per cell variant (>= 1; the claim check wants >= 1000).
        chunk_size: chips per compiled chunk.
        eval_samples: test images evaluated (None: the whole digits test split).
        method: 'compose' (fast, exact) or 'direct' (selective_write_verify per mask).
        progress: progress bars.
    """
    experiment: Literal["e_swim"] = "e_swim"
    seed: int = 0
    models: Tuple[Literal["mlp", "lenet"], ...] = ("mlp",)
    model_epochs: Optional[int] = None
    model_cache_dir: Optional[str] = None
    bits: int = 8
    slice_bits: int = 2
    cells: Tuple[CellVariant, ...] = (CellVariant("uniform", 0.1, 1.0),
                                      CellVariant("nonuniform", 0.05, 4.0))
    tol: float = 0.02
    max_cycles: int = 30
    fractions: Tuple[float, ...] = (0.0, 0.01, 0.03, 0.1, 0.3, 1.0)
    rankings: Tuple[Literal["swim", "magnitude", "random"], ...] = RANKINGS
    hessian_probes: int = 256
    hessian_samples: Optional[int] = None
    num_chips: int = 1000
    chunk_size: int = 125
    eval_samples: Optional[int] = None
    method: Literal["compose", "direct"] = "compose"
    progress: bool = True

    def validate(self):
        _common.check_distinct("models", self.models)
        _common.check_at_least_one(self, "model_epochs")
        if not (1 <= self.slice_bits <= 8) or self.bits < 1 or self.bits % self.slice_bits:
            raise ValueError(f"bits ({self.bits}) must be a positive multiple of slice_bits "
                             f"({self.slice_bits}, 1..8)")
        if not self.cells:
            raise ValueError("cells must list at least one cell variant")
        _common.check_unique_names("cell variant", self.cells)
        if self.tol < 0:
            raise ValueError(f"tol must be >= 0, got {self.tol}")
        _common.check_at_least_one(self, "max_cycles")
        if not self.fractions or any(not 0.0 <= p <= 1.0 for p in self.fractions):
            raise ValueError(f"fractions must be a non-empty list of values in [0, 1], got "
                             f"{self.fractions}")
        if len(set(self.fractions)) != len(self.fractions):
            raise ValueError(f"fractions has duplicates: {self.fractions}")
        _common.check_distinct("rankings", self.rankings)
        _common.check_at_least_one(self, "hessian_probes", "num_chips", "chunk_size",
                                   "hessian_samples", "eval_samples")


def load_config(path) -> ESwimConfig:
    """Strictly load an E-swim YAML file (unknown or ill-typed keys raise ConfigError)."""
    return load_yaml(path, ESwimConfig)


def make_device(cell: CellVariant, slice_bits: int):
    return dev_mod.levels(bits=slice_bits, sigma=cell.sigma, nonuniform=cell.nonuniform)


# --------------------------------------------------------------------------------------------
# Encoding
# --------------------------------------------------------------------------------------------
def kernels(params):
    """Flat path → kernel of every Dense/Conv layer (order of ``flatten_dict``)."""
    return {path: leaf for path, leaf in flatten_dict(params).items() if path[-1] == "kernel"}


def encode(w, cfg: ESwimConfig, device):
    """Kernel → target conductances [2 (stacks +, −), S slices, *kernel shape] and w_step."""
    g_min, g_max = dev_mod.g_range(device)
    s = enc.to_slices(w, bits=cfg.bits, slice_bits=cfg.slice_bits, g_min=g_min, g_max=g_max,
                      signed="pair")
    return jnp.stack([s.g_pos, s.g_neg]), s.w_step


def decode(g, w_step, cfg: ESwimConfig, device):
    """Conductances [2, S, ...] → weights (linear shift-and-add)."""
    g_min, g_max = dev_mod.g_range(device)
    return enc.from_slices(enc.Sliced(g[0], g[1], w_step), bits=cfg.bits,
                           slice_bits=cfg.slice_bits, g_min=g_min, g_max=g_max, signed="pair")


def weight_sigma(g_target, w_step, cfg: ESwimConfig, device):
    """Programming-noise std of each weight (weight units) from its cells' level σ."""
    g_min, g_max = dev_mod.g_range(device)
    lvl = (g_max - g_min) / (2 ** cfg.slice_bits - 1)
    sig = dev_mod.programming_sigma(device, g_target)              # [2, S, ...] µS
    s = jnp.arange(g_target.shape[1])
    w4 = (4.0 ** (cfg.slice_bits * s)).reshape((1, -1) + (1,) * (g_target.ndim - 2))
    return w_step / lvl * jnp.sqrt(jnp.sum(w4 * jnp.square(sig), axis=(0, 1)))


def _points(cfg: ESwimConfig):
    """(ranking, p) of the table, and the unique masks to evaluate (p = 0 and 1 are shared)."""
    table = [(r, p) for r in cfg.rankings for p in cfg.fractions]
    unique = []
    for r, p in table:
        u = ("-", p) if p in (0.0, 1.0) else (r, p)
        if u not in unique:
            unique.append(u)
    index = [unique.index(("-", p) if p in (0.0, 1.0) else (r, p)) for r, p in table]
    return table, unique, index


def make_instance(model, params, cfg: ESwimConfig, targets, x, y, method: str):
    """``fn(key, device, swim_sc, mag_sc) -> {accuracy, norm_cycles} [U]``.

    ``targets``: path → (g_target [2, S, ...], w_step); scores: dicts path-string → [kernel
    shape]. ``U`` = the unique masks of :func:`_points`.
    """
    _, unique, _ = _points(cfg)
    paths = list(targets)
    names = ["/".join(p) for p in paths]
    flat = flatten_dict(params)
    x, y = jnp.asarray(x), jnp.asarray(y)

    def fn(key, device, swim_sc, mag_sc):
        k_prog, k_rand = jax.random.split(key)
        lkeys = [jax.random.fold_in(k_prog, l) for l in range(len(paths))]
        full, shot = {}, {}
        for k, path, name in zip(lkeys, paths, names):
            gt = targets[path][0]
            full[name] = pr.write_verify(k, device, gt, tol=cfg.tol, max_cycles=cfg.max_cycles)
            shot[name] = pr.one_shot(k, device, gt).g
        full_cycles = sum(jnp.sum(full[n].cycles) for n in names).astype(jnp.float32)
        scores = {"swim": swim_sc, "magnitude": mag_sc,
                  "random": {n: pr.random_scores(jax.random.fold_in(k_rand, l),
                                                 targets[p][0].shape[2:])
                             for l, (p, n) in enumerate(zip(paths, names))}}
        accs, cycles = [], []
        for rank, p in unique:
            masks = pr.swim_mask(scores["swim" if rank == "-" else rank], p)
            new = dict(flat)
            total = 0.0
            for k, path, name in zip(lkeys, paths, names):
                gt, w_step = targets[path]
                cm = jnp.broadcast_to(masks[name], gt.shape)
                if method == "compose":
                    g = jnp.where(cm, full[name].g, shot[name])
                    c = jnp.where(cm, full[name].cycles, 1)
                else:
                    r = pr.selective_write_verify(k, device, gt, cm, tol=cfg.tol,
                                                  max_cycles=cfg.max_cycles)
                    g, c = r.g, r.cycles
                new[path] = decode(g, w_step, cfg, device).astype(flat[path].dtype)
                total = total + jnp.sum(c)
            logits = model.apply(unflatten_dict(new), x)
            accs.append(jnp.mean(jnp.argmax(logits, -1) == y))
            cycles.append(total.astype(jnp.float32) / full_cycles)
        return {"accuracy": jnp.stack(accs), "norm_cycles": jnp.stack(cycles),
                "full_cycles_per_cell": full_cycles / sum(targets[p][0].size for p in paths)}
    return fn


# --------------------------------------------------------------------------------------------
# The experiment
# --------------------------------------------------------------------------------------------
def run_model(name, cfg: ESwimConfig, out_dir, log=print):
    timings = {}
    t0 = time.perf_counter()
    model, params, ds, x, y, sw = _common.load_trained(name, cfg, out_dir)
    xh, yh = _common.first(cfg.hessian_samples, ds.x_train, ds.y_train)
    timings["model_s"] = time.perf_counter() - t0

    k_chips, k_hess = _common.fold_keys(cfg.seed, 1, 2)
    t0 = time.perf_counter()
    hdiag = sens.hessian_diag(k_hess, sens.loss_fn(model, xh, yh), params,
                              num_probes=cfg.hessian_probes, batch=min(32, cfg.hessian_probes))
    timings["hessian_s"] = time.perf_counter() - t0
    h_k = kernels(hdiag)
    w_k = kernels(params)
    names = ["/".join(p) for p in w_k]
    mag = pr.magnitude_scores({n: w_k[p] for n, p in zip(names, w_k)})
    n_weights = int(sum(w.size for w in w_k.values()))
    neg_h = float(sum(jnp.sum(h < 0) for h in h_k.values())) / n_weights

    table, unique, index = _points(cfg)
    dev0 = make_device(cfg.cells[0], cfg.slice_bits)
    targets = {p: encode(w, cfg, dev0) for p, w in w_k.items()}
    flat = flatten_dict(params)
    quant = dict(flat)
    for p, (gt, ws) in targets.items():
        quant[p] = decode(gt, ws, cfg, dev0)
    q_acc = float(models_mod.accuracy(model, unflatten_dict(quant), x, y))
    log(f"[{name}] software accuracy {100 * sw:.2f} %, {cfg.bits}-bit quantized "
        f"{100 * q_acc:.2f} %; {n_weights} weights on {2 * cfg.bits // cfg.slice_bits} cells each")

    fn = make_instance(model, params, cfg, targets, x, y, cfg.method)
    compiled = sweep.compile_chunk(fn)
    variants = {}
    rows = []
    for cell in cfg.cells:
        device = make_device(cell, cfg.slice_bits)
        sig = {n: weight_sigma(targets[p][0], targets[p][1], cfg, device)
               for n, p in zip(names, w_k)}
        swim_sc = sens.swim_sensitivity({n: h_k[p] for n, p in zip(names, w_k)}, sig)
        t0 = time.perf_counter()
        out = sweep.run_instances(fn, k_chips, cfg.num_chips, device, swim_sc, mag,
                                  chunk_size=cfg.chunk_size, progress=cfg.progress,
                                  desc=f"{name} {cell.name} chips", compiled=compiled)
        dt = time.perf_counter() - t0
        acc = np.asarray(out["accuracy"], np.float64)[:, index]        # [chips, table]
        cyc = np.asarray(out["norm_cycles"], np.float64)[:, index]
        pts = []
        for j, (r, p) in enumerate(table):
            pts.append({"ranking": r, "p": p, "accuracy": sweep.summarize(acc[:, j]),
                        "norm_cycles_mean": float(cyc[:, j].mean()),
                        "norm_cycles_std": float(cyc[:, j].std())})
            for c in range(acc.shape[0]):
                rows.append([name, cell.name, r, p, c, f"{acc[c, j]:.6g}", f"{cyc[c, j]:.6g}"])
        sig_all = np.concatenate([np.ravel(np.asarray(s)) for s in sig.values()])
        variants[cell.name] = {
            "sigma": cell.sigma, "nonuniform": cell.nonuniform,
            "level_sigma": np.asarray(device.sigma).tolist(),
            "full_wv_cycles_per_cell_mean": float(np.mean(out["full_cycles_per_cell"])),
            "weight_sigma_mean": float(np.mean(sig_all)),
            "points": pts, "simulate_s": dt}
        log(f"[{name} {cell.name}] {cfg.num_chips} chips in {dt:.1f} s; full write-verify "
            f"{variants[cell.name]['full_wv_cycles_per_cell_mean']:.2f} cycles per cell")
    timings["simulate_s"] = sum(v["simulate_s"] for v in variants.values())
    return {"software_accuracy": sw, "quantized_accuracy": q_acc, "num_weights": n_weights,
            "hessian_negative_fraction": neg_h, "variants": variants, "timings": timings}, rows


def _point(res_v, ranking, p):
    for q in res_v["points"]:
        if q["ranking"] == ranking and q["p"] == p:
            return q
    return None


def plot(path, results, cfg: ESwimConfig):
    plt = _common.pyplot()
    n_cols = len(cfg.cells) + 1
    fig, axes = plt.subplots(len(results), n_cols, figsize=(5.2 * n_cols, 4.3 * len(results)),
                             squeeze=False)
    ps = np.asarray(cfg.fractions)
    styles = ["-", "--", ":", "-."]
    for i, (mname, res) in enumerate(results.items()):
        for j, cell in enumerate(cfg.cells):
            ax = axes[i, j]
            v = res["variants"][cell.name]
            for k, r in enumerate(cfg.rankings):
                qs = [_point(v, r, p) for p in ps]
                line, = ax.plot(ps, [100 * q["accuracy"]["mean"] for q in qs], "o-",
                                color=f"C{k}", label=f"{r} mean")
                ax.plot(ps, [100 * q["accuracy"]["p1"] for q in qs], "v--", color=f"C{k}",
                        label=f"{r} 1st percentile")
            ax.axhline(100 * res["quantized_accuracy"], color="k", ls=":", lw=1,
                       label="quantized, no noise")
            ax.set_xscale("symlog", linthresh=0.01)
            ax.set_xlim(0.0, 1.15)
            ax.set_xlabel("verified fraction p")
            ax.set_ylabel("test accuracy (%)")
            ax.set_title(f"{mname}, {cell.name} cells (σ {cell.sigma:g}, ×{cell.nonuniform:g} "
                         f"mid levels), {cfg.num_chips} chips", fontsize=9)
            ax.grid(alpha=0.3, which="both")
            ax.legend(fontsize=7)
        ax = axes[i, -1]
        for j, cell in enumerate(cfg.cells):
            v = res["variants"][cell.name]
            for k, r in enumerate(cfg.rankings):
                qs = [_point(v, r, p) for p in ps]
                ax.plot(ps, [q["norm_cycles_mean"] for q in qs], styles[j % 4], marker="o",
                        color=f"C{k}", label=f"{r}, {cell.name}")
        ax.set_xscale("symlog", linthresh=0.01)
        ax.set_xlim(0.0, 1.15)
        ax.set_yscale("log")
        ax.set_xlabel("verified fraction p")
        ax.set_ylabel("write cycles / full write-verify")
        ax.set_title(f"{mname}: normalized write cycles", fontsize=9)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    _common.save_figure(fig, path)


def markdown(results, cfg: ESwimConfig):
    lines = ["# E-swim: selective write-verify (Yan, Hu, Shi, DAC 2022)", "",
             f"Paper claim: {CLAIM}.", "",
             f"Setup: {cfg.bits}-bit sign-magnitude weights bit-sliced onto {cfg.slice_bits}-bit "
             f"D3 per-level Gaussian cells (positive and negative stacks, "
             f"{2 * cfg.bits // cfg.slice_bits} cells per weight), write-verify tolerance "
             f"{cfg.tol:g} of the conductance range, cap {cfg.max_cycles} cycles; sensitivity "
             f"½·H_ii·σ_i² with a {cfg.hessian_probes}-probe Hutchinson diagonal on the training "
             f"split; {cfg.num_chips} chips per cell variant (same chips for every ranking and p). "
             "Normalized cycles = Σ cycles / Σ cycles of full write-verify (one-shot cells count "
             "1). Accuracy on the digits test split; p1 = 1st percentile over chips.", ""]
    for mname, res in results.items():
        lines += [f"## {mname} (software {100 * res['software_accuracy']:.2f} %, "
                  f"{cfg.bits}-bit quantized {100 * res['quantized_accuracy']:.2f} %, "
                  f"{res['num_weights']} weights)", ""]
        for cell in cfg.cells:
            v = res["variants"][cell.name]
            c_full = v["full_wv_cycles_per_cell_mean"]
            lv = ", ".join(f"{x:.3g}" for x in v["level_sigma"])
            lines += [f"### {cell.name} cells: level σ = [{lv}] of the range; full "
                      f"write-verify {c_full:.2f} cycles per cell", "",
                      "| p | " + " | ".join(f"{r} mean / p1 % (cycles)" for r in cfg.rankings)
                      + " |", "|---|" + "---|" * len(cfg.rankings)]
            for p in cfg.fractions:
                cells = []
                for r in cfg.rankings:
                    q = _point(v, r, p)
                    a = q["accuracy"]
                    cells.append(f"{100 * a['mean']:.2f} / {100 * a['p1']:.2f} "
                                 f"({q['norm_cycles_mean']:.3f})")
                lines.append(f"| {p:g} | " + " | ".join(cells) + " |")
            full = _point(v, cfg.rankings[0], 1.0)
            lines.append("")
            if full is not None:
                for r in cfg.rankings:
                    q = _point(v, r, 0.1)
                    if q is None:
                        continue
                    d_mean = 100 * (full["accuracy"]["mean"] - q["accuracy"]["mean"])
                    d_p1 = 100 * (full["accuracy"]["p1"] - q["accuracy"]["p1"])
                    lines.append(f"- {r}, p = 0.1: accuracy {100 * q['accuracy']['mean']:.2f} % "
                                 f"vs full write-verify {100 * full['accuracy']['mean']:.2f} % "
                                 f"(Δ mean {d_mean:.2f} points, Δ p1 {d_p1:.2f} points; claim "
                                 f"≤ ~1); cycles {q['norm_cycles_mean']:.3f} of full "
                                 f"({1 / q['norm_cycles_mean']:.1f}× fewer; claim up to ~10×).")
                bound = 1.0 / (0.1 + 0.9 / c_full)
                lines.append(f"- With {c_full:.2f} cycles per cell for full write-verify, p = 0.1 "
                             f"can save at most 1/(0.1 + 0.9/{c_full:.2f}) = {bound:.1f}×: the "
                             "saving is set by the write-verify cost model, not by the ranking.")
            lines.append("")
        t = res["timings"]
        lines += [f"Timings ({mname}): " + ", ".join(f"{k} {v:.1f} s" for k, v in t.items()), ""]
    lines.append(f"Hessian: fraction of negative diagonal estimates "
                 + ", ".join(f"{m} {r['hessian_negative_fraction']:.3f}"
                             for m, r in results.items())
                 + " (ranked lowest by SWIM).")
    return "\n".join(lines)


def run(cfg: ESwimConfig, args):
    """Every model; writes results.json, results.csv, the figure and summary."""
    results, rows, total = _common.run_models(run_model, cfg, args.out)
    _common.write_results(args.out, cfg, claim=CLAIM, total_s=total, models=results)
    _common.write_csv(os.path.join(args.out, "results.csv"),
                      ["model", "cells", "ranking", "p", "chip", "accuracy", "norm_cycles"], rows)
    return _common.write_report(args.out, cfg, results, plot, markdown,
                                "\n" + _common.run_time(total))


def main(argv=None):
    return _common.main(argv, __doc__, load_config, run)


if __name__ == "__main__":
    sys.exit(main())
