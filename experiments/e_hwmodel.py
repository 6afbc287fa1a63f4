"""E-hwmodel (DESIGN.md §11, paper B): per non-ideality accuracy loss and recovered fraction R.

Tests the claim of Han et al. (Sci. China Inf. Sci.: a non-ideality behaviour model,
hardware-aware training and weight-mapping correction recover ~95 % of the accuracy lost to
crossbar non-idealities). For every model (digits MLP, LeNet CNN, LSTM) and every non-ideality
*alone* (programming variation, conductance levels, stuck-at cells, IR drop, ADC bits, drift
time; parameters in the config), over the same ``num_chips`` chip instances (common random
numbers: chip ``i`` uses ``fold_in(k_chips, i)`` for every variant):

* software  — the trained model's accuracy (no chip);
* non-ideal — the trained model deployed on the chip (:func:`nvjax.chip.deploy`/``apply``);
* corrected — the trained model + post-programming correction
  (:func:`nvjax.correction.correct`: read-verify re-programming of cells outside ``tol``, then a
  per-column gain/offset calibration on ``calib_samples`` training images at the read time;
  IR-drop pre-distortion at programming when the non-ideality has IR drop);
* HW-aware  — the model fine-tuned through the same chip (:class:`nvjax.training.ChipNoise`: a
  fresh chip draw per step, straight-through rounding; only in the cells where
  :func:`runs_alone`: ``hwaware_alone`` of the non-ideality, else ``hwaware.alone``);
* HW-aware + correction — fine-tuned through the chip *as corrected* (IR pre-distortion at
  programming, every drawn chip calibrated on ``hwaware.calib_samples`` training images), then
  deployed and corrected (the paper's method).

**Evaluation set: all 1797 digits, k-fold.** The digits are split into ``folds`` stratified
folds; for fold f, the model is trained (and HW-aware fine-tuned) on the other folds and
evaluated on fold f, so every image is a test image exactly once, for a model that never saw it
(4 folds: 1347 training images per fold, as many as the former 75/25 split). The folds are
trained together (one compiled, fold-vmapped training per model and variant) and a chip
instance holds one programmed chip per fold (``fold_in(chip key, f)``). This quadruples the
test set (the former 450 images left a binomial error of ~0.9 points at 96 %) at little cost;
MNIST-28 would need larger models and many more tiles per chip, beyond the time budget.

**Statistics.** Every chip keeps its per-image correctness [chips, 1797]; every accuracy, loss,
R and mean R is bootstrapped over chips *and* images together (:func:`_common.bootstrap_chips_images`,
paired across arms: the software, non-ideal and mitigated arms are resampled on the same chips
and images), so the CIs include the test set's sampling error.
R = (acc_mitigated − acc_nonideal)/(acc_reference − acc_nonideal), where acc_reference is, per
cell, the stronger of the plain software model and the cell's fine-tuned model(s) evaluated
without hardware (the HW-aware models train ``hwaware.epochs`` more epochs, which alone can raise
the software accuracy; plain software would be a weaker reference than the arm it judges). The
software arms repeat their per-image row on every chip inside the same paired bootstrap, and the
stronger one is taken in every resample. The non-idealities are
reported in groups (``group`` in the config): *analog* (variation, stuck cells, drift: errors of
the programmed or read conductances, which read-verify and calibration can measure) and
*quantization* (1-bit cells, 4-bit ADC: a loss of resolution rather than an error to measure). The
IR-drop cell is marked ``evidence: false``: first-order IR drop is a deterministic linear
distortion that pre-distortion inverts and calibration re-fits, so R ≈ 1 holds by construction
and is reported (claim kind ``construction``), not counted. Group means are over the cells
that cost at least ``min_loss_points``.

Writes ``results.json`` (CIs, claim rows), ``results.csv`` (one row per model, non-ideality and
chip: accuracy of each variant), ``e_hwmodel.png`` and ``summary.md`` into ``--out``.

    python experiments/e_hwmodel.py configs/e_hwmodel.yaml --out runs/e_hwmodel
"""
import functools
import os
import sys
import time
from dataclasses import dataclass
from typing import Literal, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from nvjax import chip as chip_mod
from nvjax import correction as corr
from nvjax import crossbar as xb
from nvjax import data as data_mod
from nvjax import devices as dev_mod
from nvjax import models as models_mod
from nvjax import sweep
from nvjax import training as tr
from nvjax.config import load_yaml, to_dict

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)
import _common  # noqa: E402

CLAIM = "hardware-aware training plus weight-mapping correction recovers ~95 % of the accuracy " \
        "lost to each non-ideality, R ≈ 0.95 (Han et al., Sci. China Inf. Sci.)"
PAPER_R = 0.95
VARIANTS = ("nonideal", "corrected", "hwaware", "hwaware_corrected")
MITIGATIONS = VARIANTS[1:]
LABELS = {"nonideal": "non-ideal", "corrected": "correction", "hwaware": "HW-aware",
          "hwaware_corrected": "HW-aware + correction"}
# LLVM optimization level 1 for the compile-dominated trainings (nvjax's sweeps use the same
# option through ``compile_chunk(optimize=False)``)
FAST_COMPILE = {"xla_backend_optimization_level": 1}


# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class NonIdeality:
    """One non-ideality, everything else ideal.

    Attributes:
        name: label.
        group: 'analog' (a deviation of the programmed conductances or of the read: variation,
            stuck cells, drift, IR drop) or 'quantization' (cell levels, ADC bits).
        evidence: False for a cell whose recovery holds by construction (IR drop: a
            deterministic linear distortion, pre-distorted and calibrated); it is reported but
            left out of its group's mean R.
        device: 'ideal', 'pcm' (D1) or 'levels' (D3, ``level_bits``-bit cells, σ ``level_sigma``).
        prog_scale: PCM: factor on the programming σ_p (0: exact programming).
        pcm_drift: PCM: draw drift exponents (False: ν = 0).
        pcm_read_noise: PCM: 1/f read noise.
        level_bits, level_sigma: D3 cell bits and level σ (relative to the range).
        p_stuck: fraction of stuck cells (half at g_min, half at g_max).
        ir_drop: 'none' or 'first_order'; r_wire: Ω per segment.
        adc_bits, dac_bits: None = ideal; adc_range, adc_bound: as in TileConfig.
        t_read_s: read time after programming, s.
        drift_compensation: global drift compensation.
        hwaware_alone: run HW-aware training alone (through the raw chip, no correction) for
            this cell; None follows ``hwaware.alone``.
    """
    name: str
    group: Literal["analog", "quantization"]
    evidence: bool = True
    device: Literal["ideal", "pcm", "levels"] = "ideal"
    prog_scale: float = 1.0
    pcm_drift: bool = True
    pcm_read_noise: bool = True
    level_bits: int = 2
    level_sigma: float = 0.0
    p_stuck: float = 0.0
    ir_drop: Literal["none", "first_order"] = "none"
    r_wire: float = 1.0
    adc_bits: Optional[int] = None
    adc_range: Literal["fixed", "max", "percentile"] = "fixed"
    adc_bound: float = 12.0
    dac_bits: Optional[int] = None
    t_read_s: float = 0.0
    drift_compensation: bool = True
    hwaware_alone: Optional[bool] = None

    def validate(self):
        for key in ("prog_scale", "level_sigma", "r_wire", "t_read_s"):
            if getattr(self, key) < 0:
                raise ValueError(f"{key} must be >= 0, got {getattr(self, key)}")
        if not 0 <= self.p_stuck <= 1:
            raise ValueError(f"p_stuck must be in [0, 1], got {self.p_stuck}")


@dataclass(frozen=True)
class HWAwareOptions:
    """Fine-tuning through the chip: epochs, minibatch, Adam step; calibration images per drawn
    chip when training for the corrected chip; ``alone``: also fine-tune through the raw chip
    and deploy without correction (the HW-aware-alone variant; a second training per cell)."""
    epochs: int = 15
    batch_size: int = 64
    learning_rate: float = 3e-4
    calib_samples: int = 64
    alone: bool = True

    def validate(self):
        _common.check_at_least_one(self, "epochs", "batch_size", "calib_samples")
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}")


@dataclass(frozen=True)
class CorrectionOptions:
    """Post-programming correction: read-verify tolerance (fraction of the range; None = no
    re-programming), rounds, calibration on/off, IR pre-distortion iterations."""
    tol: Optional[float] = 0.05
    max_rounds: int = 5
    calibration: bool = True
    ir_predistort: int = 8

    def validate(self):
        if self.tol is not None and not self.tol > 0:
            raise ValueError(f"tol must be > 0 or null, got {self.tol}")
        _common.check_at_least_one(self, "max_rounds")
        if self.ir_predistort < 0:
            raise ValueError(f"ir_predistort must be >= 0, got {self.ir_predistort}")


@dataclass(frozen=True)
class EHwmodelConfig:
    """E-hwmodel run configuration (see the module docstring).

    ``folds``: k of the k-fold evaluation over the digits; ``num_images``: use only the first
    ``num_images`` digits (None: all 1797; for quick tests); ``model_epochs``: training epochs of
    the software models (None: nvjax.models' defaults, mlp 40, lenet 30, lstm 100);
    ``min_loss_points``: a cell enters its group's mean R when its non-ideal loss is at least
    this many points (R over a tiny denominator is noise)."""
    experiment: Literal["e_hwmodel"] = "e_hwmodel"
    seed: int = 0
    models: Tuple[Literal["mlp", "lenet", "lstm"], ...] = ("mlp", "lenet", "lstm")
    model_epochs: Optional[int] = None
    folds: int = 4
    num_images: Optional[int] = None
    tile_rows: int = 64
    tile_cols: int = 64
    nonidealities: Tuple[NonIdeality, ...] = ()
    hwaware: HWAwareOptions = HWAwareOptions()
    correction: CorrectionOptions = CorrectionOptions()
    calib_samples: int = 256
    num_chips: int = 200
    chunk_size: int = 50
    bootstrap: int = 1000
    min_loss_points: float = 1.0
    progress: bool = True

    def validate(self):
        _common.check_distinct("models", self.models)
        if not self.nonidealities:
            raise ValueError("nonidealities must list at least one non-ideality")
        _common.check_unique_names("non-ideality", self.nonidealities)
        _common.check_at_least_one(self, "model_epochs", "tile_rows", "tile_cols",
                                   "calib_samples", "num_chips", "chunk_size", "bootstrap")
        if self.folds < 2:
            raise ValueError(f"folds must be >= 2, got {self.folds}")
        if self.num_images is not None and self.num_images < 10 * self.folds:
            raise ValueError(f"num_images must be >= 10 * folds ({10 * self.folds}), "
                             f"got {self.num_images}")
        if self.min_loss_points < 0:
            raise ValueError(f"min_loss_points must be >= 0, got {self.min_loss_points}")


def load_config(path) -> EHwmodelConfig:
    """Strictly load an E-hwmodel YAML file (unknown or ill-typed keys raise ConfigError)."""
    return load_yaml(path, EHwmodelConfig)


def make_device(ni: NonIdeality):
    """The device of a non-ideality (stuck cells split equally between g_min and g_max)."""
    stuck = dict(p_stuck_min=ni.p_stuck / 2, p_stuck_max=ni.p_stuck / 2) if ni.p_stuck else {}
    if ni.device == "ideal":
        return dev_mod.ideal(**stuck)
    if ni.device == "levels":
        return dev_mod.levels(bits=ni.level_bits, sigma=ni.level_sigma, g_max=25.0, **stuck)
    base = dev_mod.pcm()
    over = {"prog_coeff": tuple(ni.prog_scale * c for c in base.prog_coeff)}
    if not ni.pcm_drift:
        over.update(nu_mu=(0.0, 0.0, 0.0, 0.0), nu_sigma=(0.0, 0.0, 0.0, 0.0))
    if not ni.pcm_read_noise:
        over["read_q"] = 0.0
    return dev_mod.pcm(**stuck, **over)


def make_tile(ni: NonIdeality, cfg: EHwmodelConfig, *, predistort: int = 0) -> xb.TileConfig:
    return xb.TileConfig(rows=cfg.tile_rows, cols=cfg.tile_cols, ir_drop=ni.ir_drop,
                         r_wire=ni.r_wire, adc_bits=ni.adc_bits, adc_range=ni.adc_range,
                         adc_bound=ni.adc_bound, dac_bits=ni.dac_bits,
                         drift_compensation=ni.drift_compensation,
                         ir_predistort=predistort if ni.ir_drop != "none" else 0)


# --------------------------------------------------------------------------------------------
# Data: stratified k-fold over the digits
# --------------------------------------------------------------------------------------------
def digit_folds(folds: int, seed: int, num_images: Optional[int] = None):
    """All digits (or the first ``num_images``) as flat images and a stratified fold index.

    Within each class (in a ``default_rng(seed)`` permutation) images are dealt to the folds in
    turn, continuing the turn across classes, so every fold holds each class within one image
    and the fold sizes differ by at most one.

    Returns:
        ``(x [N, 64] float32, y [N] int32, fold [N] int)``.
    """
    ds = data_mod.digits(seed=seed, flatten=True)
    x = np.concatenate([ds.x_train, ds.x_test])
    y = np.concatenate([ds.y_train, ds.y_test])
    if num_images is not None:
        x, y = x[:num_images], y[:num_images]
    rng = np.random.default_rng(seed)
    fold = np.empty(len(y), np.int64)
    turn = 0
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        fold[idx] = (turn + np.arange(len(idx))) % folds
        turn += len(idx)
    return x, y, fold


class Folds:
    """The k-fold arrays of one model: inputs shaped for it, the training images of each fold
    (truncated to the smallest fold's count, so the folds train together), the test images of
    each fold padded to the largest fold (``test_idx`` gives the real ones)."""

    def __init__(self, name: str, cfg: EHwmodelConfig):
        x, y, fold = digit_folds(cfg.folds, cfg.seed, cfg.num_images)
        self.x = x if name == "mlp" else x.reshape(-1, 8, 8, 1)
        self.y, self.fold, self.k = y, fold, cfg.folds
        self.test_idx = [np.flatnonzero(fold == f) for f in range(self.k)]
        train_idx = [np.flatnonzero(fold != f) for f in range(self.k)]
        n_train = min(len(i) for i in train_idx)
        self.train_idx = np.stack([i[:n_train] for i in train_idx])           # [k, n_train]
        width = max(len(i) for i in self.test_idx)
        self.test_pad = np.stack([np.concatenate([i, np.full(width - len(i), i[0])])
                                  for i in self.test_idx])                    # [k, width]

    def train(self):
        return jnp.asarray(self.x[self.train_idx]), jnp.asarray(self.y[self.train_idx])

    def test(self):
        return jnp.asarray(self.x[self.test_pad]), jnp.asarray(self.y[self.test_pad])

    def calibration(self, n: int):
        return jnp.asarray(self.x[self.train_idx[:, :n]])

    def scatter(self, per_fold):
        """[..., k, width] per fold → [..., N] in image order (padding dropped)."""
        out = np.zeros(per_fold.shape[:-2] + (len(self.y),), per_fold.dtype)
        for f, idx in enumerate(self.test_idx):
            out[..., idx] = per_fold[..., f, :len(idx)]
        return out


# --------------------------------------------------------------------------------------------
# Training, every fold at once
# --------------------------------------------------------------------------------------------
def train_folds(key, model, x, y, *, epochs: int, batch_size: int, learning_rate: float,
                params=None, noise_fn=None, cal=None):
    """Adam + softmax cross-entropy for every fold at once (one compiled, fold-vmapped loop).

    As :func:`nvjax.training.train` does for one data set: epoch ``e`` visits a permutation
    (``fold_in(k_shuffle, e)``) of the fold's images in ``n // batch_size`` minibatches (the
    rest skipped); step ``t`` draws its hardware noise from ``fold_in(k_noise, t)`` through
    :func:`nvjax.training.noisy_forward`.

    Args:
        key: fold ``f`` uses ``split(key, k)[f]``.
        model: the Flax module.
        x, y: training images and labels per fold, [k, n, ...] and [k, n].
        params: stacked starting parameters [k, ...] (fine-tuning); None initializes each fold.
        noise_fn: None (software training) or ``cal -> ChipNoise`` given the fold's ``cal``.
        cal: per-fold calibration images [k, m, ...] for ``noise_fn`` (or None).

    Returns:
        ``(params [k, ...], mean training loss per epoch [k, epochs])``.
    """
    k, n = y.shape
    steps = n // batch_size
    if steps < 1:
        raise ValueError(f"batch_size ({batch_size}) exceeds the {n} training images of a fold")
    keys = jax.random.split(key, k)
    if params is None:
        params = jax.jit(jax.vmap(lambda kk, xx: model.init(jax.random.split(kk)[0], xx[:1])),
                         compiler_options=FAST_COMPILE)(keys, x)
    tx = optax.adam(learning_rate)

    def one(kf, v, xf, yf, calf):
        k_shuffle, k_noise = jax.random.split(jax.random.split(kf)[1])
        noise = None if noise_fn is None else noise_fn(calf)

        def loss_fn(v, t, xb, yb):
            logits = tr.noisy_forward(jax.random.fold_in(k_noise, t), model, v, xb, noise)
            return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean()

        def epoch(carry, e):
            def step(c, inp):
                v, s = c
                idx, t = inp
                loss, g = jax.value_and_grad(loss_fn)(v, t, xf[idx], yf[idx])
                u, s = tx.update(g, s, v)
                return (optax.apply_updates(v, u), s), loss
            perm = jax.random.permutation(jax.random.fold_in(k_shuffle, e), n)
            perm = perm[: steps * batch_size].reshape(steps, batch_size)
            ts = (e * steps + jnp.arange(steps)).astype(jnp.uint32)
            carry, losses = jax.lax.scan(step, carry, (perm, ts))
            return carry, losses.mean()
        (v, _), losses = jax.lax.scan(epoch, (v, tx.init(v)), jnp.arange(epochs))
        return v, losses

    return jax.jit(jax.vmap(one), compiler_options=FAST_COMPILE)(keys, params, x, y, cal)


def fold_params(stacked, f):
    return jax.tree_util.tree_map(lambda a: a[f], stacked)


def software_correct(model, stacked, folds: Folds):
    """Per-image correctness [N] of each fold's model on its own test images."""
    xt, yt = folds.test()
    pred = np.stack([models_mod.predict(model, fold_params(stacked, f), xt[f])
                     for f in range(folds.k)])
    return folds.scatter(pred == np.asarray(yt))


# --------------------------------------------------------------------------------------------
# One chip
# --------------------------------------------------------------------------------------------
def runs_alone(cfg: EHwmodelConfig, ni: NonIdeality) -> bool:
    """Whether the cell of ``ni`` runs HW-aware training alone: ``ni.hwaware_alone`` if set,
    else ``hwaware.alone``."""
    return cfg.hwaware.alone if ni.hwaware_alone is None else ni.hwaware_alone


def variants(cfg: EHwmodelConfig, ni: Optional[NonIdeality] = None):
    """The variants measured in the cell of ``ni`` (None: in any cell): HW-aware alone
    (fine-tuned through the raw chip, deployed without correction) only where
    :func:`runs_alone` (a second fine-tuning per cell)."""
    alone = (any(runs_alone(cfg, n) for n in cfg.nonidealities) if ni is None
             else runs_alone(cfg, ni))
    return VARIANTS if alone else tuple(v for v in VARIANTS if v != "hwaware")


def make_instance(model, cfg: EHwmodelConfig, ni: NonIdeality):
    """``fn(key, device, params, params_hw, params_hwc, x, y, x_cal) -> correct [k, V, width]``
    (order of :func:`variants`): every argument but ``device`` stacked over the k folds; fold
    ``f``'s chip is programmed from ``fold_in(key, f)``, the same draw for every parameter set;
    ``params_hwc`` is the model fine-tuned through the corrected chip (pre-distortion on),
    ``params_hw`` through the raw chip (ignored unless :func:`runs_alone`). The raw and the
    corrected deployment are each compiled once and vmapped over the parameter sets."""
    tile = make_tile(ni, cfg)
    tile_c = make_tile(ni, cfg, predistort=cfg.correction.ir_predistort)
    co = cfg.correction
    t = ni.t_read_s
    alone = runs_alone(cfg, ni)

    def raw(p, k_prog, k_read, device, x, y):
        chip = chip_mod.deploy(k_prog, model, p, device, config=tile)
        return jnp.argmax(chip_mod.apply(k_read, chip, x, t), -1) == y

    def corrected(p, k_prog, k_corr, k_read, device, x, y, x_cal):
        chip = chip_mod.deploy(k_prog, model, p, device, config=tile_c)
        chip, _ = corr.correct(k_corr, chip, x_cal, t, tol=co.tol, max_rounds=co.max_rounds,
                               calibration=co.calibration)
        return jnp.argmax(chip_mod.apply(k_read, chip, x, t), -1) == y

    def stack(*trees):
        return jax.tree_util.tree_map(lambda *a: jnp.stack(a), *trees)

    def one_fold(key, device, params, params_hw, params_hwc, x, y, x_cal):
        k_prog, k_corr, k_read = jax.random.split(key, 3)
        raw_sets = stack(params, params_hw) if alone else stack(params)
        r = jax.vmap(raw, in_axes=(0,) + (None,) * 5)(raw_sets, k_prog, k_read, device, x, y)
        c = jax.vmap(corrected, in_axes=(0,) + (None,) * 7)(
            stack(params, params_hwc), k_prog, k_corr, k_read, device, x, y, x_cal)
        out = [r[0], c[0]] + ([r[1]] if alone else []) + [c[1]]
        return jnp.stack(out)

    def fn(key, device, params, params_hw, params_hwc, x, y, x_cal):
        keys = jax.vmap(lambda f: jax.random.fold_in(key, f))(jnp.arange(cfg.folds))
        return jax.vmap(one_fold, in_axes=(0, None, 0, 0, 0, 0, 0, 0))(
            keys, device, params, params_hw, params_hwc, x, y, x_cal)
    return fn


# --------------------------------------------------------------------------------------------
# Statistics over chips and images
# --------------------------------------------------------------------------------------------
def recovered(sw, non, mit):
    """R = (mit − non)/(sw − non), elementwise (NaN where sw == non)."""
    return corr.recovered_fraction(sw, non, mit)


def accuracy_stats(correct, n: int, seed: int):
    """Mean accuracy of a [chips, images] array with its chips-and-images bootstrap (std, 95 %
    CI), and the spread of the per-chip accuracies (std, 1st percentile)."""
    value, sd, ci = _common.bootstrap_chips_images(lambda a: a, [correct], n, seed)
    per_chip = np.asarray(correct, np.float64).mean(1)
    return {"mean": value, "bootstrap_std": sd, "ci95": ci,
            "chip_std": float(per_chip.std(ddof=1)) if per_chip.size > 1 else 0.0,
            "p1": float(np.percentile(per_chip, 1))}


def reference(*software):
    """The stronger software reference: the elementwise maximum of software accuracies."""
    return functools.reduce(np.maximum, software)


def _software_arms(refs, shape):
    """Software correctness rows [images] (one array, or a list) repeated on every chip."""
    refs = list(refs) if isinstance(refs, (list, tuple)) else [refs]
    return [np.broadcast_to(np.asarray(r, np.float64), shape) for r in refs]


def r_stats(sw, non, mit, n: int, seed: int, finetuned=()):
    """R with its chips-and-images bootstrap (paired: every arm shares each resample).

    ``sw`` is the plain software correctness [images], ``finetuned`` the software correctness
    [images] of the cell's fine-tuned models (evaluated without hardware); each repeats its row
    on every chip. R's reference is the strongest of these accuracies, taken on the resampled
    images in every resample: R = (mit − non)/(max(sw, *finetuned) − non)."""
    arms = _software_arms([sw, *finetuned], np.shape(non))
    k = len(arms)

    def stat(*a):
        return recovered(reference(*a[:k]), a[k], a[k + 1])
    value, sd, ci = _common.bootstrap_chips_images(stat, arms + [non, mit], n, seed)
    return {"R": value, "bootstrap_std": sd, "ci95": ci,
            "ci_includes_1": bool(ci[0] <= 1.0 <= ci[1])}


def mean_r_stats(cells, n: int, seed: int):
    """The mean over cells of R, bootstrapped over chips and images jointly: ``cells`` is a list
    of (software, non [chips, images], mit [chips, images]) on the same chips and images (every
    model is evaluated on all digits, chip i for every cell), so one resample of chips and
    images applies to all cells; ``software`` is one correctness row [images] or a list of them
    (plain software, then the fine-tuned models'), whose strongest accuracy is R's reference
    (as in :func:`r_stats`)."""
    if not cells:
        return {"R": float("nan"), "bootstrap_std": float("nan"), "ci95": [float("nan")] * 2,
                "cells": 0}
    arms, sizes = [], []
    for sw, non, mit in cells:
        refs = _software_arms(sw, np.shape(non))
        arms += refs + [non, mit]
        sizes.append(len(refs))

    def stat(*accs):
        rs, i = [], 0
        for k in sizes:
            rs.append(recovered(reference(*accs[i:i + k]), accs[i + k], accs[i + k + 1]))
            i += k + 2
        return np.mean(rs, axis=0)
    value, sd, ci = _common.bootstrap_chips_images(stat, arms, n, seed)
    return {"R": value, "bootstrap_std": sd, "ci95": ci, "cells": len(cells)}


# --------------------------------------------------------------------------------------------
# The experiment
# --------------------------------------------------------------------------------------------
def run_model(name, cfg: EHwmodelConfig, out_dir, log=print):
    """Train the model's folds, then every non-ideality: HW-aware fine-tuning and the chips.

    Returns:
        ``(result for results.json, csv rows, per-image correctness {ni: {variant or 'software':
        array}})``.
    """
    t0 = time.perf_counter()
    model = models_mod.MODELS[name][0]()
    epochs = cfg.model_epochs or models_mod.MODELS[name][2]
    folds = Folds(name, cfg)
    x_tr, y_tr = folds.train()
    x_te, y_te = folds.test()
    x_cal = folds.calibration(cfg.calib_samples)
    k_model, k_chips, k_train = _common.fold_keys(cfg.seed, 0, 1, 2)
    params, _ = train_folds(jax.random.fold_in(k_model, cfg.models.index(name)), model, x_tr,
                            y_tr, epochs=epochs, batch_size=64, learning_rate=1e-3)
    sw = software_correct(model, params, folds)
    # images only (two identical rows: resampling chips changes nothing)
    sw_stats = accuracy_stats(np.stack([sw, sw]), cfg.bootstrap, cfg.seed)
    log(f"[{name}] software accuracy {100 * sw.mean():.2f} % over {len(sw)} images, "
        f"{cfg.folds} folds ({time.perf_counter() - t0:.1f} s)")
    res, rows, arrays = {}, [], {}
    hw = cfg.hwaware
    cal_hw = folds.calibration(hw.calib_samples) if cfg.correction.calibration else None
    for j, ni in enumerate(cfg.nonidealities):
        device = make_device(ni)
        vs, ms = variants(cfg, ni), variants(cfg, ni)[1:]
        alone = runs_alone(cfg, ni)
        t1 = time.perf_counter()
        tile, tile_c = make_tile(ni, cfg), make_tile(ni, cfg, predistort=cfg.correction.ir_predistort)
        k_j = jax.random.fold_in(k_train, j)
        opts = dict(epochs=hw.epochs, batch_size=hw.batch_size, learning_rate=hw.learning_rate,
                    params=params)
        p_hw = params
        if alone:
            p_hw, _ = train_folds(k_j, model, x_tr, y_tr, **opts,
                                  noise_fn=lambda c: tr.ChipNoise(device, ni.t_read_s, tile))
        # HW-aware + correction: trained through the chip as it will be corrected (IR
        # pre-distortion at programming, per-column calibration of every drawn chip), else the
        # correction would compensate again what the model has already adapted to
        p_hwc, _ = train_folds(k_j, model, x_tr, y_tr, **opts, cal=cal_hw,
                               noise_fn=lambda c: tr.ChipNoise(device, ni.t_read_s, tile_c, c))
        train_s = time.perf_counter() - t1
        t1 = time.perf_counter()
        fn = make_instance(model, cfg, ni)
        out = sweep.run_instances(fn, k_chips, cfg.num_chips, device, params, p_hw, p_hwc,
                                  x_te, y_te, x_cal, chunk_size=cfg.chunk_size,
                                  compiled=sweep.compile_chunk(fn, optimize=False),
                                  progress=cfg.progress, desc=f"{name} {ni.name} chips")
        sim_s = time.perf_counter() - t1
        # [chips, k, V, width] -> {variant: [chips, N]}
        correct = folds.scatter(np.moveaxis(np.asarray(out, bool), 2, 0))
        cells = {v: correct[i] for i, v in enumerate(vs)}
        # the fine-tuned models' own software correctness (no hardware): R's reference is the
        # stronger of these and the plain software model (15 more epochs of training)
        finetuned = {"hwaware_corrected": software_correct(model, p_hwc, folds)}
        if alone:
            finetuned["hwaware"] = software_correct(model, p_hw, folds)
        ft = list(finetuned.values())
        arrays[ni.name] = dict(cells, software=sw, finetuned=ft)
        seed = cfg.seed + 100 * j
        non = cells["nonideal"]
        loss = _common.bootstrap_chips_images(
            lambda s, a: 100 * (s - a), [np.broadcast_to(sw.astype(np.float64), non.shape), non],
            cfg.bootstrap, seed)
        ref_name, ref_acc = max([("software", float(sw.mean()))]
                                + [(f"fine-tuned {LABELS[v]} model", float(c.mean()))
                                   for v, c in finetuned.items()], key=lambda t: t[1])
        entry = {"config": to_dict(ni), "train_s": train_s, "simulate_s": sim_s,
                 "hwaware_software_accuracy": float(finetuned["hwaware_corrected"].mean()),
                 "reference": {"used": ref_name, "accuracy": ref_acc,
                               "software": float(sw.mean()),
                               "finetuned": {v: float(c.mean()) for v, c in finetuned.items()}},
                 "accuracy": {v: accuracy_stats(cells[v], cfg.bootstrap, seed + i)
                              for i, v in enumerate(vs)},
                 "loss_points": {"mean": loss[0], "bootstrap_std": loss[1], "ci95": loss[2]},
                 "R": {v: r_stats(sw, non, cells[v], cfg.bootstrap, seed + 10 + i, ft)
                       for i, v in enumerate(ms)},
                 "R_plain_software": {v: r_stats(sw, non, cells[v], cfg.bootstrap,
                                                 seed + 10 + i) for i, v in enumerate(ms)}}
        res[ni.name] = entry
        per_chip = {v: cells[v].mean(1) for v in vs}
        rows += [[name, ni.name, c] + [f"{per_chip[v][c]:.6g}" if v in per_chip else ""
                                       for v in variants(cfg)]
                 for c in range(cfg.num_chips)]
        a, r = entry["accuracy"], entry["R"]["hwaware_corrected"]
        log(f"[{name} {ni.name}] software {100 * sw.mean():.2f} (reference {ref_name} "
            f"{100 * ref_acc:.2f}) | "
            + " | ".join(f"{LABELS[v]} {100 * a[v]['mean']:.2f}" for v in vs)
            + f" % ; R(HW+corr) = {r['R']:.3f} [{r['ci95'][0]:.3f}, {r['ci95'][1]:.3f}] "
            f"(train {train_s:.0f} s, {cfg.num_chips} chips {sim_s:.0f} s)")
    result = {"software_accuracy": sw_stats["mean"], "software": sw_stats, "epochs": epochs,
              "images": int(len(sw)), "nonidealities": res}
    return result, rows, arrays


def group_cells(cfg: EHwmodelConfig, results, group: str, evidence: bool = True):
    """The (model, non-ideality) cells of ``group`` (with ``evidence`` as given) whose non-ideal
    loss is at least ``min_loss_points``, and those left out for a small loss."""
    used, small = [], []
    for m, res in results.items():
        for ni in cfg.nonidealities:
            if ni.group != group or ni.evidence != evidence or ni.name not in res["nonidealities"]:
                continue
            loss = res["nonidealities"][ni.name]["loss_points"]["mean"]
            (used if loss >= cfg.min_loss_points else small).append((m, ni.name))
    return used, small


def group_stats(cfg: EHwmodelConfig, results, arrays):
    """Mean R per group ('analog', 'quantization', and 'by construction' for the cells with
    ``evidence: false``) and mitigation, bootstrapped over chips and images."""
    out = {}
    for label, group, evidence in (("analog", "analog", True),
                                   ("quantization", "quantization", True),
                                   ("by construction", "analog", False),
                                   ("by construction (quantization)", "quantization", False)):
        used, small = group_cells(cfg, results, group, evidence)
        if not used and not small:
            continue
        entry = {"cells": [f"{m}/{n}" for m, n in used],
                 "excluded_small_loss": [f"{m}/{n}" for m, n in small], "R": {}}
        # a mitigation enters the group when every cell of it measured it
        ms = [v for v in MITIGATIONS if all(v in arrays[m][n] for m, n in used + small)]
        for i, v in enumerate(ms):
            a = [arrays[m][n] for m, n in used]
            cells = [([c["software"], *c["finetuned"]], c["nonideal"], c[v]) for c in a]
            entry["R"][v] = mean_r_stats(cells, cfg.bootstrap, cfg.seed + 7 + i)
            if v == "hwaware_corrected":                   # against plain software, for contrast
                entry["R_plain_software"] = mean_r_stats(
                    [(c["software"], c["nonideal"], c[v]) for c in a], cfg.bootstrap,
                    cfg.seed + 7 + i)
            rs = [results[m]["nonidealities"][n]["R"][v] for m, n in used]
            entry["R"][v]["cell_range"] = [min((r["R"] for r in rs), default=float("nan")),
                                           max((r["R"] for r in rs), default=float("nan"))]
            entry["R"][v]["cells_ci_above_0.9"] = sum(r["ci95"][1] >= 0.9 for r in rs)
        out[label] = entry
    return out


def verdict(stat, n_cells: int):
    """reproduced: the CI of the mean R reaches 0.9 (within 0.05 of the paper's ~0.95) and
    every cell's CI does too ("each non-ideality"); partly: mean R ≥ 0.5 but not so;
    not reproduced otherwise."""
    lo, hi = stat["ci95"]
    if not np.isfinite(stat["R"]):
        return "not reproduced"
    if hi >= 0.9 and stat["cells_ci_above_0.9"] == n_cells:
        return "reproduced"
    return "partly" if stat["R"] >= 0.5 else "not reproduced"


def fmt_r(s):
    return f"{s['R']:.3f} [{s['ci95'][0]:.3f}, {s['ci95'][1]:.3f}]"


REFERENCE = ("R against the stronger of plain software and the fine-tuned models' own software "
             "accuracy")


def claim_rows(groups, results):
    """The paper's claim per group (kind 'paper'); the IR-drop row (kind 'construction')."""
    rows = []
    for label, what in (("analog", "each analog non-ideality (programming variation, stuck "
                                   "cells, drift)"),
                        ("quantization", "each quantization non-ideality (1-bit cells, "
                                         "4-bit ADC)")):
        if label not in groups:
            continue
        g = groups[label]
        s = g["R"]["hwaware_corrected"]
        n = len(g["cells"])
        if n == 0:
            continue
        v = verdict(s, n)
        lo_c, hi_c = s["cell_range"]
        why = (f"mean over {n} model×non-ideality cells, {REFERENCE}; cells range "
               f"{lo_c:.2f}–{hi_c:.2f}, {s['cells_ci_above_0.9']}/{n} with a CI reaching 0.9; "
               f"correction alone {fmt_r(g['R']['corrected'])}")
        if "hwaware" in g["R"]:
            why += f", HW-aware training alone {fmt_r(g['R']['hwaware'])}"
        if g.get("R_plain_software"):
            why += (f"; HW-aware + correction against plain software "
                    f"{fmt_r(g['R_plain_software'])}")
        rows.append(_common.claim(
            f"HW-aware training + correction recovers ~95 % of the accuracy lost to {what}",
            "R ≈ 0.95", fmt_r(s), v, why, value=s["R"], ci=s["ci95"], kind="paper"))
    if "by construction" in groups and groups["by construction"]["cells"]:
        g = groups["by construction"]
        s = g["R"]["hwaware_corrected"]
        plain = [results[m]["nonidealities"][n]["R_plain_software"]["corrected"]["R"]
                 for m, n in (c.split("/") for c in g["cells"])]
        rows.append(_common.claim(
            "... and to IR drop", "R ≈ 0.95", fmt_r(s), verdict(s, len(g["cells"])),
            "holds by construction (first-order IR drop is a deterministic linear distortion, "
            "pre-distorted and calibrated away: correction alone gives the plain software "
            f"model's accuracy, R against plain software {min(plain):.3f}–{max(plain):.3f} in "
            f"the {len(plain)} cells, {fmt_r(g['R']['corrected'])} against the stronger "
            "reference): not evidence for the method", value=s["R"], ci=s["ci95"],
            kind="construction"))
    return rows


def plot(path, results, cfg: EHwmodelConfig):
    plt = _common.pyplot()
    names = [n.name for n in cfg.nonidealities]
    fig, axes = plt.subplots(1, len(results), figsize=(max(6, 1.3 * len(names)) * len(results) / 1.2,
                                                       4.6), squeeze=False)
    for ax, (mname, res) in zip(axes[0], results.items()):
        xs = np.arange(len(names))
        w = 0.2
        vs = variants(cfg)
        for i, v in enumerate(vs):
            have = [j for j, n in enumerate(names) if v in res["nonidealities"][n]["accuracy"]]
            acc = [res["nonidealities"][names[j]]["accuracy"][v] for j in have]
            means = np.array([100 * a["mean"] for a in acc])
            err = np.array([[100 * (a["mean"] - a["ci95"][0]), 100 * (a["ci95"][1] - a["mean"])]
                            for a in acc]).T.reshape(2, -1)
            x = xs[have] + (i - (len(vs) - 1) / 2) * w
            ax.bar(x, means, w, color=f"C{i}", label=LABELS[v], yerr=err,
                   capsize=2, error_kw={"lw": 0.8})
            ax.plot(x, [100 * a["p1"] for a in acc], "v", color="k", ms=3,
                    label="1st percentile over chips" if i == 0 else None)
        ax.axhline(100 * res["software_accuracy"], color="k", ls="--", lw=1, label="software")
        ax.set_xticks(xs)
        ax.set_xticklabels(names, rotation=20)
        lo = min(100 * a["p1"] for n in names for a in res["nonidealities"][n]["accuracy"].values())
        ax.set_ylim(max(0, lo - 5), 100)
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(f"{mname}: {cfg.num_chips} chips × {res['images']} images, 95 % CI",
                     fontsize=10)
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize=7, loc="lower left")
    _common.save_figure(fig, path)


def markdown(results, cfg: EHwmodelConfig, groups, claims):
    vs = variants(cfg)
    ms = vs[1:]
    first = next(iter(results.values()))
    alone_cells = [n.name for n in cfg.nonidealities if runs_alone(cfg, n)]
    if len(alone_cells) == len(cfg.nonidealities):
        alone_text = " HW-aware training alone (through the raw chip, deployed without " \
                     "correction) is run in every cell."
    elif alone_cells:
        alone_text = (" HW-aware training alone (through the raw chip, deployed without "
                      f"correction) is run for {', '.join(alone_cells)} only (`hwaware_alone` "
                      "per non-ideality; every other cell would need a second fine-tuning); "
                      "elsewhere its column shows –.")
    else:
        alone_text = (" HW-aware training alone (through the raw chip, no correction) is not run "
                      "(`hwaware.alone: false`): the paper's method is the combination, and a "
                      "second fine-tuning per cell would not fit the time budget.")
    lines = ["# E-hwmodel: per non-ideality loss and recovered fraction (Han et al.)", "",
             f"Paper claim: {CLAIM}.", "", "## Claims", "", _common.claims_table(claims),
             "Verdict rule: *reproduced* when the 95 % CI of the mean R reaches 0.9 and so does "
             "every cell's CI (the claim is for *each* non-ideality); *partly* when the mean R "
             "is at least 0.5; else *not reproduced*. The IR-drop row holds by construction "
             "(kind *construction*): reported, not evidence.", "",
             "## Setup", "",
             f"Digits models on {cfg.tile_rows}×{cfg.tile_cols} differential-pair tiles, each "
             f"non-ideality alone. Evaluation on all {first['images']} digits by "
             f"{cfg.folds}-fold cross-validation: every model (and every HW-aware fine-tuning) "
             "is trained separately per fold on the other folds and tested on its own fold, so "
             f"every image is tested once by a model that never saw it. {cfg.num_chips} chips "
             "per cell, the same chips for every variant. HW-aware = "
             f"{cfg.hwaware.epochs} epochs of fine-tuning through the chip (fresh chip draw per "
             f"step). Correction = read-verify re-programming (tol {cfg.correction.tol} of the "
             f"range, {cfg.correction.max_rounds} rounds) + per-column gain/offset calibration "
             f"on {cfg.calib_samples} training images at the read time + IR pre-distortion "
             f"({cfg.correction.ir_predistort} iterations) where IR drop is on." + alone_text, "",
             "Every number is a mean over chips and images with a 95 % CI from a bootstrap that "
             "resamples chips and test images together (paired across variants), so the CIs "
             "include the test set's own sampling error, not only the chips'. "
             "Severities are stress values chosen so "
             "that each non-ideality alone costs several points on these small models (4× the "
             "PCM programming σ, 10 % stuck cells, r_wire 50 Ω on 64-row tiles, drift at 1 year "
             "without global compensation, 1-bit cells, a 4-bit ADC).", "",
             "**R and its reference.** R = (acc_mitigated − acc_nonideal)/(acc_reference − "
             "acc_nonideal). A HW-aware model is the software model fine-tuned "
             f"{cfg.hwaware.epochs} more epochs, and that extra training alone can raise its "
             "accuracy without any hardware; plain software would then be a weaker reference "
             "than the arm it judges. So acc_reference is, per cell, the stronger of the plain "
             "software model and the cell's fine-tuned model(s) evaluated without hardware. Each "
             "software arm keeps its per-image correctness, repeated on every chip, inside the "
             "same paired chip×image bootstrap, and the stronger one is taken in every resample "
             "(the table's *reference* column names the stronger on all images). The loss "
             "column is the plain software model's loss (the model that is deployed). "
             "R against plain software alone is kept in results.json (`R_plain_software`).", "",
             "## Mean R per group (HW-aware + correction is the paper's method)", "",
             "| group | cells | " + " | ".join(LABELS[v] for v in ms)
             + " | HW-aware + correction, R against plain software |",
             "|---|---|" + "---|" * len(ms) + "---|"]
    for label, g in groups.items():
        plain = g.get("R_plain_software")
        lines.append(f"| {label} | {len(g['cells'])} | "
                     + " | ".join(fmt_r(g["R"][v]) if g["cells"] and v in g["R"] else "–"
                                  for v in ms)
                     + f" | {fmt_r(plain) if g['cells'] and plain else '–'} |")
    for label, g in groups.items():
        if g["excluded_small_loss"]:
            lines.append(f"\n{label}: left out for a non-ideal loss under {cfg.min_loss_points} "
                         f"point(s): {', '.join(g['excluded_small_loss'])}.")
    lines.append("")
    for mname, res in results.items():
        s = res["software"]
        lines += [f"## {mname} (software {100 * s['mean']:.2f} % [{100 * s['ci95'][0]:.2f}, "
                  f"{100 * s['ci95'][1]:.2f}], {res['epochs']} epochs per fold)", "",
                  "Accuracy, % (95 % CI; 1st percentile over chips in braces); reference: R's "
                  "software reference (the stronger of plain software and the fine-tuned "
                  "models' own software accuracy):", "",
                  "| non-ideality | group | loss (points) | reference | "
                  + " | ".join(LABELS[v] for v in vs) + " |",
                  "|---|---|---|---|" + "---|" * len(vs)]
        for n, e in res["nonidealities"].items():
            a, lp, ref = e["accuracy"], e["loss_points"], e["reference"]
            grp = e["config"]["group"] + ("" if e["config"]["evidence"] else " (by construction)")
            cells = [f"{100 * a[v]['mean']:.2f} [{100 * a[v]['ci95'][0]:.1f}, "
                     f"{100 * a[v]['ci95'][1]:.1f}] {{{100 * a[v]['p1']:.1f}}}" if v in a else "–"
                     for v in vs]
            lines.append(f"| {n} | {grp} | {lp['mean']:.2f} [{lp['ci95'][0]:.2f}, "
                         f"{lp['ci95'][1]:.2f}] | {100 * ref['accuracy']:.2f} ({ref['used']}) | "
                         + " | ".join(cells) + " |")
        lines += ["", "R against the stronger reference (95 % CI; * = the CI includes 1):", "",
                  "| non-ideality | " + " | ".join(LABELS[v] for v in ms) + " |",
                  "|---|" + "---|" * len(ms)]
        for n, e in res["nonidealities"].items():
            lines.append(f"| {n} | " + " | ".join(
                fmt_r(e["R"][v]) + (" *" if e["R"][v]["ci_includes_1"] else "")
                if v in e["R"] else "–" for v in ms) + " |")
        lines.append("")
    over = [(m, n, v, e["R"][v]) for m, res in results.items()
            for n, e in res["nonidealities"].items() for v in e["R"] if e["R"][v]["R"] > 1]
    within = [f"{m}/{n} {LABELS[v]} {fmt_r(r)}" for m, n, v, r in over if r["ci95"][0] <= 1]
    above = [f"{m}/{n} {LABELS[v]} {fmt_r(r)}" for m, n, v, r in over if r["ci95"][0] > 1]
    text = "**R > 1** (a mitigated chip above the stronger software reference): "
    if not over:
        text += "none."
    else:
        text += (f"{len(within)} cell(s) whose CI includes 1, i.e. consistent with full "
                 f"recovery ({'; '.join(within)})" if within else "no cell whose CI includes 1")
        text += (f"; {len(above)} cell(s) whose CI lies above 1, i.e. the mitigated chip beats "
                 f"both software models on these images ({'; '.join(above)})." if above
                 else "; none whose CI lies above 1.")
    lines += [text, ""]
    return "\n".join(lines)


def run(cfg: EHwmodelConfig, args):
    """Every model and non-ideality; writes results.json, results.csv, the figure and summary."""
    t0 = time.perf_counter()
    results, rows, arrays = {}, [], {}
    for m in cfg.models:
        results[m], r, arrays[m] = run_model(m, cfg, args.out)
        rows += r
    groups = group_stats(cfg, results, arrays)
    claims = claim_rows(groups, results)
    total = time.perf_counter() - t0
    _common.write_results(args.out, cfg, claim=CLAIM, total_s=total, claims=claims,
                          groups=groups, models=results)
    _common.write_csv(os.path.join(args.out, "results.csv"),
                      ["model", "nonideality", "chip"] + [f"acc_{v}" for v in variants(cfg)], rows)
    plot(os.path.join(args.out, f"{cfg.experiment}.png"), results, cfg)
    text = markdown(results, cfg, groups, claims) + _common.run_time(total)
    _common.write_text(os.path.join(args.out, _common.SUMMARY_MD), text)
    return text


def main(argv=None):
    return _common.main(argv, __doc__, load_config, run)


if __name__ == "__main__":
    sys.exit(main())
