"""Run configurations: typed, frozen dataclasses loaded strictly from YAML (``configs/*.yaml``).

Unknown or missing keys and bad values raise :class:`ConfigError` naming the key, the file and
what was expected. Units are part of key names (``t_read_s``). This module imports ``devices``,
``crossbar`` and the strict loader.
"""
from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass, field
from typing import Dict, Literal, Optional, Tuple, Union

from . import devices as dev_mod
from ._strict import ConfigError, from_dict, load_yaml, to_dict
from .crossbar import TileConfig

__all__ = ["ConfigError", "ModelConfig", "DeviceConfig", "SweepConfig", "RunConfig", "load",
           "from_dict", "to_dict", "make_device", "device_points"]

ParamValue = Union[int, float, Tuple[float, ...]]


@dataclass(frozen=True)
class ModelConfig:
    """Which network to deploy and how to get its weights.

    Attributes:
        name: 'mlp' (digits MLP) or 'lenet' (LeNet-style CNN on digits).
        hidden: hidden-layer widths of the MLP.
        epochs: training epochs when the weights are trained.
        params_path: a msgpack file of trained parameters: loaded when it exists, else the model
            is trained and saved there. None: trained and saved in the output folder.
    """
    name: Literal["mlp", "lenet"] = "mlp"
    hidden: Tuple[int, ...] = (64,)
    epochs: int = 40
    params_path: Optional[str] = None

    def validate(self):
        if self.epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {self.epochs}")
        if any(h < 1 for h in self.hidden):
            raise ValueError(f"hidden widths must be >= 1, got {self.hidden}")


_FACTORIES = {"pcm": dev_mod.pcm, "reram": dev_mod.reram, "levels": dev_mod.levels,
              "flash": dev_mod.flash, "ideal": dev_mod.ideal}


@dataclass(frozen=True)
class DeviceConfig:
    """The device model and its parameter overrides.

    Attributes:
        kind: 'pcm' (D1), 'reram' (D2), 'levels' (D3), 'flash' (D5) or 'ideal'.
        params: keyword overrides of the device factory (e.g. ``g_max: 25.0``; for 'levels':
            ``bits``, ``sigma``, ``nonuniform``, ``g_min``, ``g_max``).
        p_stuck_min, p_stuck_max: D6 stuck-at-fault probabilities.
    """
    kind: Literal["pcm", "reram", "levels", "flash", "ideal"] = "pcm"
    params: Dict[str, ParamValue] = field(default_factory=dict)
    p_stuck_min: float = 0.0
    p_stuck_max: float = 0.0

    def validate(self):
        for p in ("p_stuck_min", "p_stuck_max"):
            if not 0.0 <= getattr(self, p) <= 1.0:
                raise ValueError(f"{p} must be in [0, 1], got {getattr(self, p)}")
        try:
            make_device(self)
        except TypeError as e:  # unknown parameter names
            raise ValueError(f"params: {e}") from e


@dataclass(frozen=True)
class SweepConfig:
    """The Monte Carlo sweep.

    Attributes:
        num_instances: chip instances per sweep point.
        chunk_size: instances per compiled chunk (memory bound; results do not depend on it).
        t_read_s: read times after programming, s.
        device_grid: device parameter name → list of values; the sweep runs the cartesian product
            of all lists (each point on the same instance keys).
        eval_samples: test samples used per accuracy evaluation (None: the whole test set).
    """
    num_instances: int = 1000
    chunk_size: int = 250
    t_read_s: Tuple[float, ...] = (1.0, 3600.0, 86400.0, 2592000.0, 31536000.0)
    device_grid: Dict[str, Tuple[float, ...]] = field(default_factory=dict)
    eval_samples: Optional[int] = None

    def validate(self):
        if self.num_instances < 1:
            raise ValueError(f"num_instances must be >= 1, got {self.num_instances}")
        if self.chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {self.chunk_size}")
        if not self.t_read_s or any(t < 0 for t in self.t_read_s):
            raise ValueError(f"t_read_s must be a non-empty list of times >= 0 s, got {self.t_read_s}")
        for k, v in self.device_grid.items():
            if not v:
                raise ValueError(f"device_grid.{k} must list at least one value")
        if self.eval_samples is not None and self.eval_samples < 1:
            raise ValueError(f"eval_samples must be >= 1, got {self.eval_samples}")


@dataclass(frozen=True)
class RunConfig:
    """Configuration of ``nvjax run`` (the main Monte Carlo reliability job)."""
    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    device: DeviceConfig = field(default_factory=DeviceConfig)
    tile: TileConfig = field(default_factory=TileConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)
    progress: bool = True

    def validate(self):
        for k in self.sweep.device_grid:
            try:
                make_device(self.device, **{k: self.sweep.device_grid[k][0]})
            except (TypeError, ValueError) as e:
                raise ValueError(f"sweep.device_grid.{k}: {e}") from e


def make_device(cfg: DeviceConfig, **point):
    """Build the device of a :class:`DeviceConfig`, with optional per-point overrides."""
    kw = dict(cfg.params)
    kw.update(point)
    stuck = {}
    if cfg.p_stuck_min or cfg.p_stuck_max or "p_stuck_min" in kw or "p_stuck_max" in kw:
        stuck = dict(p_stuck_min=kw.pop("p_stuck_min", cfg.p_stuck_min),
                     p_stuck_max=kw.pop("p_stuck_max", cfg.p_stuck_max))
    kw = {k: (tuple(v) if isinstance(v, (list, tuple)) else v) for k, v in kw.items()}
    return _FACTORIES[cfg.kind](**kw, **stuck)


def device_points(cfg: RunConfig):
    """The sweep points: a list of (dict of overrides, device), cartesian product of the grid."""
    names = sorted(cfg.sweep.device_grid)
    pts = []
    for combo in itertools.product(*(cfg.sweep.device_grid[n] for n in names)):
        point = dict(zip(names, combo))
        pts.append((point, make_device(cfg.device, **point)))
    return pts


def load(path) -> RunConfig:
    """Load and validate a :class:`RunConfig` from a YAML file."""
    return load_yaml(path, RunConfig)
