"""What the five reproduction scripts (``e_disturb``, ``e_hwmodel``, ``e_swim``, ``e_biased``,
``e_rowprog``) share: their command line (:func:`main`), the checks their configs repeat, their trained models
and data splits, the chip keys and the bootstrap over chips, and the writing of their outputs
(``results.json`` with the config and versions, the per-chip CSV, the figure and ``summary.md``).

Each script owns its config dataclass (with an ``experiment`` field naming the script) and its
physics; this module holds only what they would otherwise each repeat. It is imported by the
scripts as ``import _common`` (each script puts its own folder on ``sys.path`` first, so this
works whether the script is run as ``python experiments/e_x.py ...`` or loaded from its file by
the tests).
"""
import argparse
import csv
import json
import os
import time
import warnings
from typing import Callable, Mapping, NamedTuple, Optional, Sequence, Tuple

import jax
import numpy as np

from nvjax import data as data_mod
from nvjax import jobs
from nvjax import models as models_mod
from nvjax import stats
from nvjax.config import to_dict

RESULTS_JSON = "results.json"
SUMMARY_MD = "summary.md"


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------
def main(argv, doc: str, load_config: Callable, run: Callable, *,
         from_results: Optional[Tuple[Callable, Callable]] = None,
         claims: Optional[Callable] = None,
         add_arguments: Optional[Callable[[argparse.ArgumentParser], None]] = None) -> int:
    """The command line of an experiment script: ``CONFIG --out DIR`` (+ its own options).

    Parses ``argv`` (the description is the first line of ``doc``, the script's docstring),
    loads the config with ``load_config(path)``, creates ``--out`` and prints the text that
    ``run(cfg, args)`` returns (the summary; ``args.out`` is the output folder).

    Args:
        argv: the arguments (None: ``sys.argv[1:]``).
        doc: the script's module docstring.
        load_config: ``path -> config``.
        run: ``(cfg, args) -> text`` — the experiment: simulates, writes its outputs, returns the
            text to print.
        from_results: ``(plot, markdown)`` of the script: it then takes ``--from-results``,
            which rewrites the figure and summary (:func:`write_report`, footer
            :func:`run_time`) from the ``models`` and ``total_s`` of ``DIR/results.json``
            without simulating.
        claims: ``(results, cfg) -> claim rows`` of the script: with ``--from-results`` the
            ``claims`` of ``DIR/results.json`` are recomputed from its ``models`` too.
        add_arguments: adds the script's own options to the parser.

    Returns:
        0 (the exit status).
    """
    ap = argparse.ArgumentParser(description=doc.split("\n")[0])
    ap.add_argument("config")
    ap.add_argument("--out", required=True)
    if from_results is not None:
        ap.add_argument("--from-results", action="store_true",
                        help="rewrite the figure and summary from OUT/results.json (no simulation)")
    if add_arguments is not None:
        add_arguments(ap)
    args = ap.parse_args(argv)
    cfg = load_config(args.config)
    os.makedirs(args.out, exist_ok=True)
    if from_results is not None and args.from_results:
        path = os.path.join(args.out, RESULTS_JSON)
        saved = read_json(path)
        if claims is not None:
            saved["claims"] = claims(saved["models"], cfg)
            write_json(path, saved)
        text = write_report(args.out, cfg, saved["models"], *from_results,
                            footer=run_time(saved["total_s"]))
    else:
        text = run(cfg, args)
    print(text, end="" if text.endswith("\n") else "\n")
    return 0


# --------------------------------------------------------------------------------------------
# Config checks (for the ``validate`` methods of the scripts' config dataclasses)
# --------------------------------------------------------------------------------------------
def check_at_least_one(obj, *names: str, prefix: str = "") -> None:
    """Raise ValueError ``"<prefix><name> must be >= 1, got <value>"`` for the first field of
    ``obj`` in ``names`` below 1 (a field left None, an unset optional, passes)."""
    for name in names:
        v = getattr(obj, name)
        if v is not None and v < 1:
            raise ValueError(f"{prefix}{name} must be >= 1, got {v}")


def check_distinct(name: str, values) -> None:
    """Raise ValueError unless ``values`` (the field ``name``) is non-empty without duplicates."""
    if not values or len(set(values)) != len(values):
        raise ValueError(f"{name} must be a non-empty list without duplicates, got {values}")


def check_unique_names(what: str, items) -> list:
    """The ``name`` of each item; ValueError ``"<what> names must be unique"`` on a repeat."""
    names = [i.name for i in items]
    if len(set(names)) != len(names):
        raise ValueError(f"{what} names must be unique, got {names}")
    return names


# --------------------------------------------------------------------------------------------
# Trained models and data
# --------------------------------------------------------------------------------------------
def first(n: Optional[int], *arrays):
    """The first ``n`` entries of each array (all of them when ``n`` is None), as a tuple."""
    return tuple(a if n is None else a[:n] for a in arrays)


def digits_split(name: str, seed: int, eval_samples: Optional[int] = None):
    """The digits data of model ``name`` (flat images for 'mlp', 8×8×1 otherwise; split
    ``seed``, :func:`nvjax.data.digits`) and its first ``eval_samples`` test images.

    Returns:
        ``(ds, x_test, y_test)``.
    """
    ds = data_mod.digits(seed=seed, flatten=name == "mlp")
    x, y = first(eval_samples, ds.x_test, ds.y_test)
    return ds, x, y


def trained_model(name: str, cfg, out_dir: str):
    """``(model, params)`` of :func:`nvjax.models.get_trained` for ``name`` with the config's
    ``seed`` and ``model_epochs``, cached in ``cfg.model_cache_dir`` (None: ``out_dir/models``)."""
    cache = cfg.model_cache_dir or os.path.join(out_dir, "models")
    os.makedirs(cache, exist_ok=True)
    return models_mod.get_trained(name, cache_dir=cache, seed=cfg.seed, epochs=cfg.model_epochs)


class Trained(NamedTuple):
    """A trained model with its data: ``ds`` the digits split, ``(x, y)`` the evaluated test
    images, ``software_accuracy`` the model's accuracy on them."""
    model: object
    params: object
    ds: object
    x: np.ndarray
    y: np.ndarray
    software_accuracy: float


def load_trained(name: str, cfg, out_dir: str) -> Trained:
    """:func:`trained_model` and :func:`digits_split` (``cfg.seed``, ``cfg.eval_samples``) of
    model ``name``, and its software accuracy on the evaluated test images."""
    model, params = trained_model(name, cfg, out_dir)
    ds, x, y = digits_split(name, cfg.seed, cfg.eval_samples)
    return Trained(model, params, ds, x, y, float(models_mod.accuracy(model, params, x, y)))


# --------------------------------------------------------------------------------------------
# Chips and statistics over chips
# --------------------------------------------------------------------------------------------
def fold_keys(seed: int, *indices: int):
    """``fold_in(key(seed), i)`` for each index: the independent streams of a run (chips,
    training, probes, ...), as a tuple."""
    root = jax.random.key(seed)
    return tuple(jax.random.fold_in(root, i) for i in indices)


def bootstrap(statistic: Callable, samples, n: int, seed: int, *, ignore_nan: bool = False):
    """A statistic of per-chip means and its bootstrap spread over chips.

    The chips are resampled with replacement ``n`` times (``np.random.default_rng(seed)``), the
    *same* resample for every array of ``samples`` (paired: the arms were read on the same
    chips); ``statistic(*means)`` is evaluated on the full means and, vectorised, on the ``n``
    resampled means.

    Args:
        statistic: ``(*means) -> value``, elementwise on arrays of resampled means.
        samples: arrays [chips], one per arm.
        n: bootstrap resamples.
        seed: seed of the resampling.
        ignore_nan: spread over the resamples whose statistic is not NaN.

    Returns:
        ``(value, bootstrap std, [2.5th, 97.5th percentile])`` as Python floats.
    """
    rng = np.random.default_rng(seed)
    chips = samples[0].shape[0]
    idx = rng.integers(0, chips, size=(n, chips))
    resampled = statistic(*(a[idx].mean(1) for a in samples))
    std, percentile = (np.nanstd, np.nanpercentile) if ignore_nan else (np.std, np.percentile)
    return float(statistic(*(a.mean() for a in samples))), float(std(resampled)), \
        [float(v) for v in percentile(resampled, [2.5, 97.5])]


def bootstrap_chips_images(statistic: Callable, correct, n: int, seed: int):
    """A statistic of accuracies and its bootstrap over chips *and* test images.

    An accuracy measured on a fixed test set has two sources of noise: the chips (each draws
    its own programming noise) and the images (the test set is a sample of the task). Each
    resample draws the chips with replacement and, independently, the images with replacement
    (:func:`nvjax.stats.two_way_bootstrap`), the same chips and images for every arm (paired),
    and evaluates ``statistic`` on each arm's accuracy over the resampled chips and images. For
    an additive ``correct = a[chip] + b[image]`` the variance of the mean is
    ``var(a)/chips + var(b)/images`` (tested).

    Args:
        statistic: ``(*accuracies) -> value``, elementwise on arrays of resampled accuracies.
        correct: arrays [chips, images] of 0/1 (or scores), one per arm, same shape.
        n: bootstrap resamples.
        seed: seed of the resampling.

    Returns:
        ``(value, bootstrap std, [2.5th, 97.5th percentile])`` as Python floats; NaN resamples
        (e.g. a ratio over a zero) are left out of the spread, with a warning saying how many.
    """
    r = stats.two_way_bootstrap(statistic, list(correct), seed=seed, num_resamples=n)
    if r["num_valid"] < n:
        warnings.warn(f"bootstrap_chips_images: {n - r['num_valid']} of {n} resamples gave a "
                      "NaN or infinite statistic and were left out of the interval",
                      stacklevel=2)
    return r["estimate"], r["std"], r["ci95"]


def run_models(run_model: Callable, cfg, out_dir: str):
    """``run_model(name, cfg, out_dir) -> (result, csv rows)`` for every name of
    ``cfg.models``, in order.

    Returns:
        ``(results {name: result}, rows of all models, wall time in s)``.
    """
    t0 = time.perf_counter()
    results, rows = {}, []
    for m in cfg.models:
        results[m], r = run_model(m, cfg, out_dir)
        rows += r
    return results, rows, time.perf_counter() - t0


# --------------------------------------------------------------------------------------------
# Outputs
# --------------------------------------------------------------------------------------------
def read_json(path):
    """The JSON document at ``path``."""
    with open(path) as f:
        return json.load(f)


def write_json(path, doc) -> None:
    """Write ``doc`` as indented JSON."""
    with open(path, "w") as f:
        json.dump(doc, f, indent=2)


def write_results(out_dir: str, cfg, *, claim: Optional[str] = None, **fields) -> None:
    """``out_dir/results.json``: ``experiment`` and ``claim`` (when a paper's claim is given),
    the config (:func:`nvjax.config.to_dict`), the versions (:func:`nvjax.jobs.versions`), then
    ``fields`` in order."""
    doc = {} if claim is None else {"experiment": cfg.experiment, "claim": claim}
    doc.update(config=to_dict(cfg), versions=jobs.versions(), **fields)
    write_json(os.path.join(out_dir, RESULTS_JSON), doc)


VERDICTS = ("reproduced", "partly", "not reproduced")
#: What a claim row tests: ``paper`` (a claim the source paper makes: counted in the verdict
#: tally), ``extension`` (a question the paper does not claim, e.g. a worst case or another
#: cell type), ``control`` (a check of our own set-up), ``construction`` (holds by construction
#: of the simulator, reported but not evidence).
KINDS = ("paper", "extension", "control", "construction")


def claim(claim: str, paper: str, ours: str, verdict: str, why: str, *,
          value: Optional[float] = None, ci: Optional[Sequence[float]] = None,
          kind: str = "paper") -> dict:
    """One claim of a paper and our verdict on it: a row of ``summary.md``'s claim table, of
    ``results.json``'s ``claims`` and of ``experiments/README.md``.

    Args:
        claim: the claim in one line (what the paper says).
        paper: the paper's number or statement (e.g. "R ~ 0.95").
        ours: our number with its 95 % CI, as it should read in the table.
        verdict: one of :data:`VERDICTS`.
        why: one line.
        value: our number, machine-readable (optional).
        ci: its 95 % CI ``[low, high]`` (optional).
        kind: one of :data:`KINDS` (only ``paper`` rows count in the verdict tally).

    Returns:
        The row as a dict (``claim, paper, ours, verdict, why, value, ci, kind``).
    """
    if verdict not in VERDICTS:
        raise ValueError(f"verdict must be one of {VERDICTS}, got {verdict!r}")
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if ci is not None and len(ci) != 2:
        raise ValueError(f"ci must be [low, high], got {ci!r}")
    return {"claim": claim, "paper": paper, "ours": ours, "verdict": verdict, "why": why,
            "value": None if value is None else float(value),
            "ci": None if ci is None else [float(c) for c in ci], "kind": kind}


def claims_table(claims: Sequence[dict]) -> str:
    """The markdown table of :func:`claim` rows (claim | paper | ours | verdict | why); a row
    that is not a paper claim says its kind after the verdict, e.g. "reproduced (control)"."""
    def cell(text):
        return str(text).replace("|", "\\|").replace("\n", " ")

    def verdict(c):
        kind = c.get("kind", "paper")
        return c["verdict"] if kind == "paper" else f"{c['verdict']} ({kind})"
    lines = ["| claim | paper | ours (95 % CI) | verdict | why |", "|---|---|---|---|---|"]
    lines += ["| " + " | ".join(cell(c[k]) for k in ("claim", "paper", "ours")) + " | "
              + cell(verdict(c)) + " | " + cell(c["why"]) + " |" for c in claims]
    return "\n".join(lines) + "\n"


def write_csv(path, header, rows) -> None:
    """A CSV file: the ``header`` row, then ``rows`` (sequences, or mappings by header name with
    missing names left empty), written as given (format numbers before)."""
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows([r.get(k, "") for k in header] if isinstance(r, Mapping) else r
                     for r in rows)


def write_text(path, text: str) -> None:
    """Write ``text`` to ``path``."""
    with open(path, "w") as f:
        f.write(text)


def pyplot():
    """``matplotlib.pyplot`` on the non-interactive Agg backend (figures only go to files)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save_figure(fig, path, dpi: int = 120) -> None:
    """Lay out ``fig``, save it to ``path`` and close it."""
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    pyplot().close(fig)


def write_report(out_dir: str, cfg, results, plot: Callable, markdown: Callable,
                 footer: str = "\n") -> str:
    """The figure ``out_dir/<cfg.experiment>.png`` (``plot(path, results, cfg)``) and
    ``out_dir/summary.md`` (``markdown(results, cfg) + footer``).

    Returns:
        The summary's text.
    """
    plot(os.path.join(out_dir, f"{cfg.experiment}.png"), results, cfg)
    text = markdown(results, cfg) + footer
    write_text(os.path.join(out_dir, SUMMARY_MD), text)
    return text


def time_label(t: float, units=(("y", 365 * 86400.0), ("d", 86400.0), ("h", 3600.0),
                                ("s", 1.0))) -> str:
    """A read time in seconds as a tick label in the largest unit it reaches ("1 d", "30 d")."""
    for unit, s in units:
        if t >= s:
            return f"{t / s:g} {unit}"
    return f"{t:g} s"


def run_time(total_s: float) -> str:
    """The footer of a summary that states the run's wall time."""
    return f"\nTotal run time {total_s:.1f} s.\n"
