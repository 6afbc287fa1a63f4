"""E-biased (DESIGN.md §11, paper D): mapping-aware biased training vs conventional QAT.

Reproduces the claim of Diware et al. (AICAS 2023): constraining the most important weights to
*favorable* conductance states — the levels with the smallest programming σ — during fine-tuning
raises the Monte-Carlo "hardware accuracy" over conventional quantization-aware training, up to
2.4× when the variation is severe.

Setup (our choices, documented): M-bit sign-magnitude weights (max|W| per layer) bit-sliced
onto K-bit D3 per-level Gaussian cells (positive and negative stacks; :func:`nvjax.training.
sliced_read`). The cell's σ table is uniform ``sigma`` times a factor ``s`` (the variation
strength) on every mid-range level — the "non-uniform" cells of DESIGN.md D3, where the extreme
states are the favorable ones (as in the ReRAM data of D2). For each K:

* conventional — QAT: fine-tune with every kernel rounded to the M-bit grid (straight-through);
* biased(p)    — the top-p fraction of weights by importance (config ``importance``,
  :func:`nvjax.sensitivity.importance`: saliency |w·∂L/∂w| of the trained model on the training
  split, one global ranking) is projected onto the favorable codebook (codes whose every K-bit
  slice is a favorable level, :func:`nvjax.training.favorable_codebook`) and the rest rounded to
  the M-bit grid, with straight-through gradients, while fine-tuning
  (:func:`nvjax.training.train`, same epochs and optimizer as QAT).

Fine-tuning does not see the device noise (both arms alike). Every trained variant is then read
on the same ``num_chips`` chips per (K, s) (chip i uses ``fold_in(k_chips, i)``), and the ratio
biased/conventional of the mean hardware accuracy is reported, with its bootstrap std over chips.

Writes ``results.json``, ``results.csv`` (one row per model, K, s, variant and chip),
``e_biased.png`` and ``summary.md`` into ``--out``.

    python experiments/e_biased.py configs/e_biased.yaml --out runs/e_biased
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
from nvjax import models as models_mod
from nvjax import sensitivity as sens
from nvjax import sweep
from nvjax import training as tr
from nvjax.config import load_yaml

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)
import _common  # noqa: E402

CLAIM = "biased training toward favorable states gives up to 2.4× the hardware accuracy of " \
        "conventional quantization-aware training when the variation is severe (Diware et al., " \
        "AICAS 2023)"


@dataclass(frozen=True)
class CellOptions:
    """K-bit cells and the number of favorable levels among their 2^K."""
    bits: int = 2
    favorable: int = 2

    def validate(self):
        if not 1 <= self.bits <= 8:
            raise ValueError(f"bits must be in 1..8, got {self.bits}")
        if not 1 <= self.favorable <= 2 ** self.bits:
            raise ValueError(f"favorable must be in 1..{2 ** self.bits}, got {self.favorable}")


@dataclass(frozen=True)
class FinetuneOptions:
    epochs: int = 10
    batch_size: int = 64
    learning_rate: float = 3e-4

    def validate(self):
        if self.epochs < 1 or self.batch_size < 1 or not self.learning_rate > 0:
            raise ValueError("epochs and batch_size must be >= 1, learning_rate > 0")


@dataclass(frozen=True)
class EBiasedConfig:
    """E-biased run configuration (see the module docstring)."""
    experiment: Literal["e_biased"] = "e_biased"
    seed: int = 0
    models: Tuple[Literal["mlp", "lenet"], ...] = ("mlp",)
    model_epochs: Optional[int] = None
    model_cache_dir: Optional[str] = None
    bits: int = 8
    cells: Tuple[CellOptions, ...] = (CellOptions(2, 2),)
    sigma: float = 0.04
    strengths: Tuple[float, ...] = (1.0, 2.0, 4.0, 6.0)
    fractions: Tuple[float, ...] = (0.1, 0.3, 0.5, 1.0)
    importance: Literal["saliency", "magnitude", "hessian"] = "saliency"
    importance_samples: Optional[int] = None
    finetune: FinetuneOptions = FinetuneOptions()
    num_chips: int = 500
    chunk_size: int = 125
    eval_samples: Optional[int] = None
    bootstrap: int = 1000
    progress: bool = True

    def validate(self):
        _common.check_distinct("models", self.models)
        if not self.cells:
            raise ValueError("cells must list at least one cell option")
        for c in self.cells:
            if self.bits % c.bits:
                raise ValueError(f"bits ({self.bits}) must be a multiple of every cell's bits "
                                 f"({c.bits})")
        if self.sigma < 0 or not self.strengths or any(s <= 0 for s in self.strengths):
            raise ValueError("sigma must be >= 0 and strengths a non-empty list of values > 0")
        if not self.fractions or any(not 0 < p <= 1 for p in self.fractions):
            raise ValueError(f"fractions must be values in (0, 1], got {self.fractions}")
        _common.check_at_least_one(self, "num_chips", "chunk_size", "bootstrap")


def load_config(path) -> EBiasedConfig:
    """Strictly load an E-biased YAML file (unknown or ill-typed keys raise ConfigError)."""
    return load_yaml(path, EBiasedConfig)


def make_device(cfg: EBiasedConfig, cell: CellOptions, strength: float):
    return dev_mod.levels(bits=cell.bits, sigma=cfg.sigma, nonuniform=strength)


def make_instance(model, variants, x, y, bits, slice_bits):
    """``fn(key, device, qparams [V], w_max [V]) -> accuracy [V]`` (sliced cells, one draw)."""
    x, y = jnp.asarray(x), jnp.asarray(y)

    def fn(key, device, qparams, w_maxes):
        accs = []
        for v, (qp, wm) in enumerate(zip(qparams, w_maxes)):
            flat = flatten_dict(qp)
            for l, path in enumerate(p for p in list(flat) if p[-1] == "kernel"):
                k = jax.random.fold_in(key, l)      # same cells for every variant (CRN)
                flat[path] = tr.sliced_read(k, device, flat[path], w_max=wm["/".join(path[:-1])],
                                            bits=bits, slice_bits=slice_bits)
            logits = model.apply({"params": unflatten_dict(flat)}, x)
            accs.append(jnp.mean(jnp.argmax(logits, -1) == y))
        return jnp.stack(accs)
    return fn


def bootstrap_ratio(a_b, a_c, n, seed):
    """mean(biased)/mean(conventional) over the chips, its bootstrap std over chips (same
    resample for both arms) and 95 % interval."""
    return _common.bootstrap(lambda b, c: b / np.maximum(c, 1e-12), (a_b, a_c), n, seed)


def run_model(name, cfg: EBiasedConfig, out_dir, log=print):
    t0 = time.perf_counter()
    model, params, ds, x, y, sw = _common.load_trained(name, cfg, out_dir)
    xi, yi = _common.first(cfg.importance_samples, ds.x_train, ds.y_train)
    k_chips, k_train, k_imp = _common.fold_keys(cfg.seed, 1, 2, 3)
    scores = sens.importance(k_imp, model, params, xi, yi, method=cfg.importance)
    log(f"[{name}] software accuracy {100 * sw:.2f} % ({time.perf_counter() - t0:.1f} s)")
    ft = cfg.finetune
    out, rows = {"software_accuracy": sw, "cells": {}}, []
    for c_i, cell in enumerate(cfg.cells):
        dev0 = make_device(cfg, cell, max(cfg.strengths))
        fav = tr.favorable_levels(dev0, cell.favorable)
        cb = tr.favorable_codebook(dev0, bits=cfg.bits, slice_bits=cell.bits, num=cell.favorable)
        labels = ["conventional"] + [f"biased p={p:g}" for p in cfg.fractions]
        masks = [None] + [tr.top_mask(scores, p) for p in cfg.fractions]
        qps, wms, sw_q, train_s = [], [], [], 0.0
        for v, mask in enumerate(masks):
            tform = (lambda p, m=mask: tr.quantize(p, bits=cfg.bits, mask=m,
                                                   codebook=None if m is None else cb)[0])
            t1 = time.perf_counter()
            latent, _ = tr.train(jax.random.fold_in(k_train, 100 * c_i + v), model, ds,
                                 params=params, transform=tform, epochs=ft.epochs,
                                 batch_size=ft.batch_size, learning_rate=ft.learning_rate)
            train_s += time.perf_counter() - t1
            qp, wm = tr.quantize(latent, bits=cfg.bits, mask=mask,
                                 codebook=None if mask is None else cb)
            qps.append(qp["params"])
            wms.append(wm)
            sw_q.append(float(models_mod.accuracy(model, qp, x, y)))
        fn = make_instance(model, labels, x, y, cfg.bits, cell.bits)
        compiled = sweep.compile_chunk(fn)
        per_s = {}
        for s in cfg.strengths:
            device = make_device(cfg, cell, s)
            t1 = time.perf_counter()
            acc = np.asarray(sweep.run_instances(fn, k_chips, cfg.num_chips, device, qps, wms,
                                                 chunk_size=cfg.chunk_size, progress=cfg.progress,
                                                 desc=f"{name} K={cell.bits} s={s:g}",
                                                 compiled=compiled), np.float64)   # [chips, V]
            dt = time.perf_counter() - t1
            entry = {"level_sigma": np.asarray(device.sigma).tolist(), "simulate_s": dt,
                     "accuracy": {l: sweep.summarize(acc[:, v]) for v, l in enumerate(labels)},
                     "ratio": {}}
            for v, l in enumerate(labels[1:], start=1):
                r, sd, ci = bootstrap_ratio(acc[:, v], acc[:, 0], cfg.bootstrap, cfg.seed + v)
                entry["ratio"][l] = {"ratio": r, "bootstrap_std": sd, "ci95": ci}
            per_s[f"{s:g}"] = entry
            for c in range(acc.shape[0]):
                for v, l in enumerate(labels):
                    rows.append([name, cell.bits, s, l, c, f"{acc[c, v]:.6g}"])
            best = max(entry["ratio"].items(), key=lambda kv: kv[1]["ratio"])
            log(f"[{name} K={cell.bits} s={s:g}] conventional "
                f"{100 * entry['accuracy']['conventional']['mean']:.2f} %, best {best[0]} "
                f"{100 * entry['accuracy'][best[0]]['mean']:.2f} % (ratio {best[1]['ratio']:.3f} "
                f"± {best[1]['bootstrap_std']:.3f}; {cfg.num_chips} chips {dt:.0f} s)")
        out["cells"][str(cell.bits)] = {
            "favorable_levels": fav.tolist(), "codebook_size": int(len(cb)),
            "variants": labels, "software_accuracy_quantized": dict(zip(labels, sw_q)),
            "train_s": train_s, "strengths": per_s}
    return out, rows


def best_ratio(results, min_conventional=0.0):
    """The largest biased/conventional ratio over the grid, among points whose conventional
    hardware accuracy is at least ``min_conventional`` (a ratio over an arm at chance level, 10 %,
    says little)."""
    best = None
    for m, res in results.items():
        for k, c in res["cells"].items():
            for s, e in c["strengths"].items():
                if e["accuracy"]["conventional"]["mean"] < min_conventional:
                    continue
                for l, r in e["ratio"].items():
                    if best is None or r["ratio"] > best[0]["ratio"]:
                        best = (r, m, k, s, l)
    return best


def plot(path, results, cfg: EBiasedConfig):
    plt = _common.pyplot()
    panels = [(m, k) for m, res in results.items() for k in res["cells"]]
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.4), squeeze=False)
    ss = np.asarray(cfg.strengths)
    for ax, (m, k) in zip(axes[0], panels):
        c = results[m]["cells"][k]
        for v, l in enumerate(c["variants"]):
            mean = [100 * c["strengths"][f"{s:g}"]["accuracy"][l]["mean"] for s in ss]
            p1 = [100 * c["strengths"][f"{s:g}"]["accuracy"][l]["p1"] for s in ss]
            ax.plot(ss, mean, "o-" if v else "s-", color="k" if v == 0 else f"C{v}",
                    label=l + " (mean)")
            ax.plot(ss, p1, "v:", color="k" if v == 0 else f"C{v}", alpha=0.6)
        ax.axhline(100 * results[m]["software_accuracy"], color="gray", ls="--", lw=1,
                   label="software")
        ax.set_xlabel("variation strength s (σ of mid levels / σ of extremes)")
        ax.set_ylabel("hardware accuracy (%)  [dotted: 1st percentile]")
        ax.set_title(f"{m}, {cfg.bits}-bit weights on {k}-bit cells, σ = {cfg.sigma:g}, "
                     f"{cfg.num_chips} chips", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    _common.save_figure(fig, path)


def markdown(results, cfg: EBiasedConfig):
    lines = ["# E-biased: mapping-aware biased training vs conventional QAT (Diware et al.)", "",
             f"Paper claim: {CLAIM}.", "",
             f"Setup: {cfg.bits}-bit sign-magnitude weights bit-sliced on K-bit D3 cells (two "
             f"stacks), σ = {cfg.sigma:g} of the range at the favorable levels and s·σ at the "
             f"others; importance = {cfg.importance}; fine-tuning {cfg.finetune.epochs} epochs "
             f"(both arms, no device noise in training); {cfg.num_chips} chips per (K, s), the "
             "same chips for every variant. Hardware accuracy = mean over chips (1st percentile "
             "in brackets), %. Ratio = biased/conventional mean, ± bootstrap std over chips.", ""]
    for m, res in results.items():
        for k, c in res["cells"].items():
            lines += [f"## {m}, {k}-bit cells (favorable levels {c['favorable_levels']}, "
                      f"{c['codebook_size']} codebook magnitudes; software "
                      f"{100 * res['software_accuracy']:.2f} %)", "",
                      "Software accuracy of the quantized models: " + ", ".join(
                          f"{l} {100 * a:.2f} %" for l, a in c["software_accuracy_quantized"].items()),
                      "", "| s | " + " | ".join(c["variants"]) + " | best ratio |",
                      "|---" * (len(c["variants"]) + 2) + "|"]
            for s, e in c["strengths"].items():
                cells = [f"{100 * e['accuracy'][l]['mean']:.2f} [{100 * e['accuracy'][l]['p1']:.1f}]"
                         for l in c["variants"]]
                b = max(e["ratio"].items(), key=lambda kv: kv[1]["ratio"])
                lines.append(f"| {s} | " + " | ".join(cells) +
                             f" | {b[1]['ratio']:.3f} ± {b[1]['bootstrap_std']:.3f} ({b[0]}) |")
            lines.append("")
    for floor, what in ((0.0, "Best ratio"),
                        (0.4, "Best ratio where conventional QAT keeps ≥ 40 % (4× chance)")):
        b = best_ratio(results, floor)
        if b is not None:
            r, m, k, s, l = b
            lines += [f"**{what}: {r['ratio']:.3f} ± {r['bootstrap_std']:.3f} (95 % CI "
                      f"{r['ci95'][0]:.3f}–{r['ci95'][1]:.3f}) — {m}, {k}-bit cells, s = {s}, "
                      f"{l}.** Paper: up to 2.4×.", ""]
    return "\n".join(lines)


def run(cfg: EBiasedConfig, args):
    """Every model, cell, strength and variant; writes results.json, results.csv, the figure and
    summary."""
    results, rows, total = _common.run_models(run_model, cfg, args.out)
    b = best_ratio(results)
    _common.write_results(args.out, cfg, claim=CLAIM, total_s=total, best_ratio=None if b is None
                          else {"model": b[1], "cell_bits": b[2], "strength": b[3],
                                "variant": b[4], **b[0]},
                          models=results)
    _common.write_csv(os.path.join(args.out, "results.csv"),
                      ["model", "cell_bits", "strength", "variant", "chip", "accuracy"], rows)
    return _common.write_report(args.out, cfg, results, plot, markdown, _common.run_time(total))


def main(argv=None):
    return _common.main(argv, __doc__, load_config, run, from_results=(plot, markdown))


if __name__ == "__main__":
    sys.exit(main())
