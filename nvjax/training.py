"""Training-side mitigations: hardware-aware (noise-injection) training and biased training.

DESIGN.md §7.1, §7.4.

* **Hardware-aware (noise-injection) training** (§7.1). :func:`noisy_forward` runs any Flax
  model with its weights perturbed by a noise model drawn from an explicit key:
  :class:`WeightNoise` (additive σ·max|W| or multiplicative σ·|W| Gaussian weight noise, the cheap
  classic) or :class:`ChipNoise` (the chip itself: :func:`nvjax.chip.deploy` of the current
  weights on a device — any device model, per-level tables included — then
  :func:`nvjax.chip.apply` at read time ``t`` with its DAC/ADC quantization, output noise, stuck
  cells and first-order IR drop). Rounding (DAC, ADC, level quantization) is straight-through
  (:func:`round_ste`), so gradients flow to the weights. :func:`train` is the optax loop: one
  jitted ``lax.scan`` per epoch, step ``s`` draws its noise with ``fold_in(key_noise, s)``.
* **Biased (favorable-state) training** (§7.4, Diware et al., AICAS 2023): :func:`favorable_levels`
  picks the cell levels with the smallest σ_ℓ, :func:`favorable_codebook` the M-bit weight codes
  whose every K-bit slice sits on them, :func:`top_mask` selects the top-p % of a weight ranking
  (:func:`nvjax.sensitivity.importance`: saliency, magnitude or Hessian), and :func:`quantize`
  constrains them (``mask``) to the codebook (projection + straight-through) and rounds the others
  to the plain M-bit grid. ``mask=None`` is conventional quantization-aware training.
  :func:`sliced_read` deploys quantized weights on bit-sliced cells for a Monte Carlo "hardware
  accuracy".

Post-programming correction (read-verify reprogramming, gain/offset calibration, IR-drop
pre-distortion) is :mod:`nvjax.correction`.

This module imports ``devices``, ``encoding``, ``crossbar``, ``layers``, ``chip``, ``models``,
``programming``, ``correction``, ``_checks``, ``_ops``, ``_train_loop``, flax and optax.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct
from flax.traverse_util import flatten_dict, unflatten_dict

from . import chip as chip_mod
from . import layers
from . import crossbar as xb
from . import devices as dev_mod
from . import encoding
from . import models as models_mod
from . import programming
from ._checks import is_concrete
from ._ops import round_ste, straight_through
from ._train_loop import as_key, check_positive, fit, init_variables, train_data
from .correction import calibrate

__all__ = ["WeightNoise", "ChipNoise", "perturb", "noisy_forward", "train", "round_ste", "straight_through",
           "quantize", "weight_codes", "favorable_levels", "favorable_codebook", "top_mask",
           "sliced_read"]

Array = jax.Array
Params = Any


# --------------------------------------------------------------------------------------------
# Noise models and the noisy forward pass
# --------------------------------------------------------------------------------------------
@struct.dataclass
class WeightNoise:
    """Gaussian weight-noise injection on every Dense/Conv kernel (biases stay exact).

    Attributes:
        sigma: noise σ; 'additive': relative to the layer's max|W| (w + σ·max|W|·ξ);
            'multiplicative': relative to each weight (w·(1 + σ·ξ)).
        kind: 'additive' or 'multiplicative' (static).
    """
    sigma: Any = 0.0
    kind: str = struct.field(pytree_node=False, default="additive")

    def __post_init__(self):
        if self.kind not in ("additive", "multiplicative"):
            raise ValueError(f"WeightNoise.kind must be 'additive' or 'multiplicative', got "
                             f"{self.kind!r}")
        if is_concrete(self.sigma) and np.any(np.asarray(self.sigma) < 0):
            raise ValueError(f"WeightNoise.sigma must be >= 0, got {self.sigma}")


@struct.dataclass
class ChipNoise:
    """The chip as the noise model: deploy on ``device`` with ``config``, read at ``t`` seconds.

    Attributes:
        device: a device model from :mod:`nvjax.devices` (pytree).
        t: read time since programming, s.
        config: :class:`nvjax.crossbar.TileConfig` (static). ``ir_drop='solver'`` and
            ``bound_management='iterative'`` are not reverse-differentiable (``while_loop``);
            train with 'first_order' and 'none'.
        calibration: None, or model inputs [N, ...]: every drawn chip is first calibrated on
            them (:func:`nvjax.correction.calibrate`, per-column gain/offset at ``t``; differentiable), so the
            model is trained for the chip as it will be corrected.
    """
    device: Any
    t: Any = 0.0
    config: xb.TileConfig = struct.field(pytree_node=False, default=xb.TileConfig())
    calibration: Any = None


def _kernel_paths(params):
    return [k for k in flatten_dict(params) if k[-1] == "kernel"]


def _wrap(variables, inner):
    return {"params": inner} if isinstance(variables, dict) and set(variables) == {"params"} else inner


def perturb(key, params, noise: WeightNoise):
    """Draw one weight-noise perturbation of every kernel (biases unchanged).

    Args:
        key: PRNG key; the k-th kernel uses ``fold_in(key, k)``.
        params: the inner parameter dict (no ``{'params': ...}`` wrapper).
        noise: a :class:`WeightNoise`.

    Returns:
        The perturbed parameter dict (differentiable in ``params``).
    """
    flat = flatten_dict(params)
    for i, path in enumerate(p for p in flat if p[-1] == "kernel"):
        w = flat[path]
        xi = jax.random.normal(jax.random.fold_in(key, i), w.shape, w.dtype)
        if noise.kind == "additive":
            flat[path] = w + noise.sigma * jax.lax.stop_gradient(jnp.max(jnp.abs(w))) * xi
        else:
            flat[path] = w * (1.0 + noise.sigma * xi)
    return unflatten_dict(flat)


def _check_noise(noise):
    if noise is not None and not isinstance(noise, (WeightNoise, ChipNoise)):
        raise TypeError(f"noise must be None, WeightNoise or ChipNoise, got {type(noise).__name__}")


def noisy_forward(key, model: nn.Module, params, x, noise=None):
    """Logits of ``model`` on ``x`` with hardware noise drawn from ``key``.

    Args:
        key: PRNG key of this forward pass (:class:`ChipNoise`: programming draw
            ``split(key, 3)[0]``, read and output noise ``[1]``, calibration reads ``[2]``).
        model: a Flax module whose parametrized layers are ``nn.Dense``/``nn.Conv``.
        params: its parameters (``{'params': ...}`` or the inner dict), or its whole variables
            dict (``{'params': ..., 'batch_stats': ...}``: BatchNorm runs on its running
            statistics).
        x: inputs [B, ...].
        noise: None (the ideal forward), :class:`WeightNoise` or :class:`ChipNoise`.

    Returns:
        Logits [B, classes]. Differentiable in ``params`` (straight-through through every
        rounding); with zero noise and an ideal periphery it equals ``model.apply``.
    """
    _check_noise(noise)
    inner, state = layers.split_variables(params)
    if noise is None:
        return model.apply({"params": inner, **state}, x)
    if isinstance(noise, WeightNoise):
        return model.apply({"params": perturb(key, inner, noise), **state}, x)
    k_prog, k_read, k_cal = jax.random.split(key, 3)
    chip = chip_mod.deploy(k_prog, model, {"params": inner, **state}, noise.device,
                           config=noise.config)
    if noise.calibration is not None:
        chip = calibrate(k_cal, chip, noise.calibration, noise.t)
    return chip_mod.apply(k_read, chip, x, noise.t)


# --------------------------------------------------------------------------------------------
# The training loop
# --------------------------------------------------------------------------------------------
def train(key, model: nn.Module, data, *, params=None, noise=None,
          transform: Optional[Callable[[Params], Params]] = None, epochs: int,
          batch_size: int = 64, learning_rate: float = 1e-3,
          optimizer: Optional[optax.GradientTransformation] = None,
          progress: bool = False) -> Tuple[Params, Dict[str, List[float]]]:
    """Hardware-aware training (or fine-tuning) with optax and softmax cross-entropy.

    Every minibatch step draws its hardware noise from ``fold_in(key_noise, step)`` (step counted
    over all epochs), runs :func:`noisy_forward` on ``transform(params)`` and updates the latent,
    full-precision ``params``. One epoch is one jitted ``lax.scan``; the result is deterministic
    for a given key.

    Args:
        key: PRNG key (or int seed): init (when ``params`` is None), shuffling and noise.
        model: the Flax module.
        data: a :class:`nvjax.data.Dataset`.
        params: starting parameters (fine-tuning), or the model's whole variables dict: other
            collections (a BatchNorm model's ``'batch_stats'``) are held fixed — the model runs
            in inference mode on them — and returned unchanged; None initializes the model.
        noise: None, :class:`WeightNoise` or :class:`ChipNoise`.
        transform: optional straight-through weight transform applied in the forward pass, e.g.
            ``lambda p: quantize(p, bits=8, mask=m, codebook=cb)[0]`` (biased training) or
            ``lambda p: quantize(p, bits=8)[0]`` (conventional QAT).
        epochs, batch_size, learning_rate: as in :func:`nvjax.models.train`.
        optimizer: an optax transformation (default ``optax.adam(learning_rate)``).
        progress: print one line per epoch.

    Returns:
        ``(params, history)``: the latent parameters (``{'params': ...}``, plus the fixed
        collections of ``params``; deploy
        ``transform(params)`` when a transform was used) and per-epoch lists ``train_loss``,
        ``test_accuracy`` (software accuracy of ``transform(params)``), ``time_s``.
    """
    for name, value, integer in (("epochs", epochs, True), ("batch_size", batch_size, True),
                                 ("learning_rate", learning_rate, False)):
        check_positive(name, value, integer, prefix="train: ")
    _check_noise(noise)
    if isinstance(noise, ChipNoise) and noise.config.ir_drop == "solver":
        raise ValueError("train: ChipNoise with ir_drop='solver' is not reverse-differentiable "
                         "(while_loop); train with TileConfig(ir_drop='first_order')")
    if isinstance(noise, ChipNoise) and noise.config.bound_management != "none":
        raise ValueError("train: ChipNoise with bound_management='iterative' is not "
                         "reverse-differentiable (its re-reads are a while_loop); train with "
                         "TileConfig(bound_management='none'), then read the trained model with "
                         "bound management on")
    x_train, y_train, steps = train_data(data, batch_size, prefix="train: ")
    key = as_key(key)
    k_init, k_shuffle, k_noise = jax.random.split(key, 3)
    if params is None:
        params = init_variables(model, k_init, x_train[:1])
    inner, state = layers.split_variables(params)     # state (batch_stats) is held fixed
    variables = {"params": inner}
    tform = transform if transform is not None else (lambda p: p)
    tx = optimizer if optimizer is not None else optax.adam(learning_rate)

    def forward_vars(v):
        return {"params": layers.strip_params(tform(v)), **state}

    def loss_fn(v, t, xb_, yb, noise_):
        logits = noisy_forward(jax.random.fold_in(k_noise, t), model, forward_vars(v), xb_,
                               noise_)
        return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean()
    trained, history = fit(
        loss_fn, variables, tx, x_train, y_train, steps=steps, batch_size=batch_size,
        epochs=epochs, shuffle_key=k_shuffle, progress=progress, extra=(noise,),
        evaluate=lambda v: models_mod.accuracy(model, forward_vars(v), data.x_test, data.y_test),
        what="software test accuracy")
    return {**trained, **state}, history


# --------------------------------------------------------------------------------------------
# Quantization, favorable states and biased training
# --------------------------------------------------------------------------------------------
def _check_bits(bits):
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 16:
        raise ValueError(f"bits must be an int in 1..16, got {bits!r}")


def quantize(params, *, bits: int = 8, mask=None, codebook=None):
    """Sign-magnitude M-bit quantization of every kernel, top weights on a codebook (STE).

    Each kernel is quantized on its own grid: ``w_max`` = max|W| of the layer (held constant for
    gradients), code q = sign(w)·round(|w|/w_max·(2^M − 1)). Weights selected by ``mask`` get
    the nearest signed codebook magnitude instead (:func:`nvjax.encoding.project_to_codebook`).
    The forward value is the quantized weight ``q·w_max/(2^M − 1)`` exactly; the gradient is the
    identity (straight-through). Biases and other leaves are returned unchanged.

    Args:
        params: parameter tree (``{'params': ...}`` or inner).
        bits: M, weight bits (magnitude; the sign is the pair).
        mask: None (no weight constrained: conventional QAT) or a tree of boolean arrays shaped
            like the kernels (flat dict path → mask, or the params structure restricted to
            kernels, e.g. from :func:`top_mask`).
        codebook: allowed integer magnitudes (from :func:`favorable_codebook`); required with a
            mask.

    Returns:
        ``(params_q, w_max)``: the quantized tree (same structure) and a dict '/'-joined layer
        name → w_max (weight units).
    """
    _check_bits(bits)
    if mask is not None and codebook is None:
        raise ValueError("quantize: a mask needs a codebook")
    inner = layers.strip_params(params)
    flat = flatten_dict(inner)
    masks = {} if mask is None else _flat_masks(mask)
    n = 2 ** bits - 1
    w_maxes = {}
    for path in [p for p in flat if p[-1] == "kernel"]:
        w = flat[path]
        w_max = jax.lax.stop_gradient(jnp.max(jnp.abs(w)))
        w_max = jnp.where(w_max > 0, w_max, 1.0)
        q = jnp.clip(jnp.round(jax.lax.stop_gradient(w) / w_max * n), -n, n)
        name = "/".join(path[:-1])
        if name in masks:
            m = jnp.asarray(masks[name])
            if m.shape != w.shape:
                raise ValueError(f"quantize: mask of {name!r} has shape {tuple(m.shape)}, kernel "
                                 f"{tuple(w.shape)}")
            q = jnp.where(m, encoding.project_to_codebook(q, codebook).astype(q.dtype), q)
        flat[path] = straight_through(w, q * (w_max / n))
        w_maxes[name] = w_max
    return _wrap(params, unflatten_dict(flat)), w_maxes


def _flat_masks(mask):
    if isinstance(mask, dict) and all(isinstance(k, str) and not isinstance(v, dict)
                                      for k, v in mask.items()):
        return dict(mask)
    flat = flatten_dict(layers.strip_params(mask))
    return {"/".join(k[:-1]): v for k, v in flat.items() if k[-1] == "kernel"}


def weight_codes(w, w_max, *, bits: int = 8) -> Array:
    """Integer sign-magnitude codes of (already quantized) weights: round(w/w_max·(2^M − 1))."""
    _check_bits(bits)
    return jnp.round(jnp.asarray(w) / w_max * (2 ** bits - 1)).astype(jnp.int32)


def favorable_levels(device, num: int = 2) -> np.ndarray:
    """The ``num`` levels of a per-level cell with the smallest σ_ℓ (sorted level indices).

    Ties are broken toward the extreme levels (then the lower index), so a uniform table gives
    the two extremes — the states real devices hold best (cf. the ReRAM fit of DESIGN.md D2).

    Args:
        device: a :class:`nvjax.devices.Levels` device, or a σ table (1-D).
        num: number of favorable levels, 1 ≤ num ≤ L.
    """
    sigma = np.asarray(device.sigma if isinstance(device, dev_mod.Levels) else device, np.float64)
    if sigma.ndim != 1 or sigma.size < 2:
        raise ValueError(f"favorable_levels: expected a Levels device or a 1-D σ table, got shape "
                         f"{sigma.shape}")
    if isinstance(num, bool) or not isinstance(num, int) or not 1 <= num <= sigma.size:
        raise ValueError(f"favorable_levels: num must be an int in 1..{sigma.size}, got {num!r}")
    mid = (sigma.size - 1) / 2
    order = sorted(range(sigma.size), key=lambda l: (sigma[l], -abs(l - mid), l))
    return np.sort(np.asarray(order[:num]))


def favorable_codebook(device, *, bits: int = 8, slice_bits: int = 2, num: int = 2) -> np.ndarray:
    """Integer magnitudes whose every K-bit slice sits on a favorable level of ``device``."""
    lv = favorable_levels(device, num)
    if isinstance(device, dev_mod.Levels) and device.num_levels != 2 ** slice_bits:
        raise ValueError(f"favorable_codebook: the device has {device.num_levels} levels, "
                         f"slice_bits={slice_bits} needs {2 ** slice_bits}")
    return encoding.favorable_codebook(bits=bits, slice_bits=slice_bits, allowed=lv.tolist())


def top_mask(scores, p):
    """Boolean masks of the global top fraction ``p`` of ``scores`` (all layers ranked together;
    :func:`nvjax.programming.swim_mask`), e.g. of :func:`nvjax.sensitivity.importance`: a dict
    layer name → kernel-shaped mask, as :func:`quantize` takes."""
    return programming.swim_mask(scores, p)


def sliced_read(key, device, w, *, w_max, bits: int = 8, slice_bits: int = 2) -> Array:
    """Weights after programming their bit slices on per-level cells and reading them back.

    ``w`` (already on the M-bit grid of ``w_max``) is split into M/K K-bit slices on a positive
    and a negative stack (:func:`nvjax.encoding.to_slices`, 'pair'), every cell is programmed
    with ``device`` (one draw each) and the slices are added back with their significance
    (:func:`nvjax.encoding.from_slices`).

    Args:
        key: PRNG key.
        device: a :class:`nvjax.devices.Levels` device with 2^K levels.
        w: weights, any shape.
        w_max: the weight of the full-scale code (from :func:`quantize`).

    Returns:
        Read-back weights, shape of ``w``.
    """
    if not isinstance(device, dev_mod.Levels) or device.num_levels != 2 ** slice_bits:
        raise ValueError(f"sliced_read: needs a Levels device with 2**slice_bits = {2 ** slice_bits} "
                         f"levels, got {type(device).__name__}")
    g_min, g_max = dev_mod.g_range(device)
    s = encoding.to_slices(w, bits=bits, slice_bits=slice_bits, w_max=w_max, g_min=g_min,
                           g_max=g_max, signed="pair")
    k_p, k_n = jax.random.split(key)
    gp = dev_mod.program(k_p, device, s.g_pos).g
    gn = dev_mod.program(k_n, device, s.g_neg).g
    return encoding.from_slices(encoding.Sliced(gp, gn, s.w_step), bits=bits,
                                slice_bits=slice_bits, g_min=g_min, g_max=g_max, signed="pair")
