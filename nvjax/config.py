"""Run configurations: typed, frozen dataclasses loaded strictly from YAML (``configs/*.yaml``).

Unknown keys and bad values raise :class:`ConfigError` naming the key, the file and what was
expected; a key left out (a whole section included) takes its documented default (the README's
configuration reference), and the command line prints the resolved config with those keys marked.
Every value is checked by the policy of ``_checks``: numbers finite (NaN and inf never pass),
positive where the physics needs it, probabilities in [0, 1] (stuck-at probabilities summing to
at most 1), times >= 0, bounds finite, counts within what the data set holds. Units are part of
key names (``t_read_s``). This module imports ``devices``, ``disturb``, ``crossbar``,
``lifetime``, ``data`` (the size of the digits test split), ``prng``, ``_checks``, ``_strict``
(the strict loader) and yaml.
"""
from __future__ import annotations

import functools
import itertools
import math
import os
from dataclasses import dataclass, field
from typing import Dict, Literal, Optional, Tuple, Union

import yaml

from . import data as data_mod
from . import devices as dev_mod
from . import disturb as dist_mod
from . import prng as prng_mod
from ._strict import ConfigError, from_dict, load_yaml, to_dict
from .crossbar import TileConfig
from .lifetime import LifetimeConfig

__all__ = ["AUTO_OPTIMIZE_INSTANCES", "ConfigError", "ModelConfig", "DeviceConfig", "SweepConfig", "RunConfig", "load",
           "from_dict", "to_dict", "make_device", "device_points", "DisturbConfig",
           "LifetimeRunConfig", "load_lifetime", "make_disturb", "load_any",
           "DistributedConfig", "load_yaml"]

ParamValue = Union[int, float, Tuple[float, ...]]

#: ``sweep.compile: auto`` optimizes the compiled chunks from this many instances (all sweep
#: points together) on; below it, compilation costs more than the slower execution.
AUTO_OPTIMIZE_INSTANCES = 5000

#: Seeds accepted by every job: the data split needs an unsigned 32-bit seed.
_SEED_LIMIT = 2 ** 32


def _check_seed(seed) -> None:
    if not 0 <= seed < _SEED_LIMIT:
        raise ValueError(f"seed must be an int in [0, 2**32) (at most {_SEED_LIMIT - 1}), "
                         f"got {seed}")


@functools.lru_cache(maxsize=8)
def _test_samples(seed: int) -> int:
    """Size of the digits test split of a run with this seed (what ``eval_samples`` may use)."""
    return int(data_mod.digits(seed=seed).y_test.shape[0])


def _check_eval_samples(key: str, value, seed: int) -> None:
    if value is None:
        return
    if value < 1:
        raise ValueError(f"{key} must be >= 1 (or null for the whole test split), got {value}")
    n = _test_samples(seed)
    if value > n:
        raise ValueError(f"{key} = {value} exceeds the {n} samples of the digits test split; use "
                         f"at most {n}, or null for all of them")


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
        if not self.hidden or any(h < 1 for h in self.hidden):
            raise ValueError(f"hidden must list at least one width, each >= 1, got "
                             f"{list(self.hidden)}")
        if self.params_path is not None:
            if not self.params_path.strip():
                raise ValueError("params_path must be a file path or null, got an empty string")
            if os.path.isdir(self.params_path):
                raise ValueError(f"params_path {self.params_path!r} is a directory; give the path "
                                 "of a msgpack file (loaded if it exists, else written)")


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
        convention: 'pcm' only: 'physical' (default of ``devices.pcm``) or 'aihwkit' (aihwkit
            1.2's conventions, DESIGN.md §3 D1); null = the factory's default.
    """
    kind: Literal["pcm", "reram", "levels", "flash", "ideal"] = "pcm"
    params: Dict[str, ParamValue] = field(default_factory=dict)
    p_stuck_min: float = 0.0
    p_stuck_max: float = 0.0
    convention: Optional[Literal["physical", "aihwkit"]] = None

    def validate(self):
        for p in ("p_stuck_min", "p_stuck_max"):
            if not 0.0 <= getattr(self, p) <= 1.0:  # NaN fails too
                raise ValueError(f"{p} must be in [0, 1], got {getattr(self, p)}")
        if not self.p_stuck_min + self.p_stuck_max <= 1.0 + 1e-9:
            raise ValueError(f"p_stuck_min + p_stuck_max must be <= 1 (a cell is stuck at g_min, "
                             f"at g_max, or free), got {self.p_stuck_min} + {self.p_stuck_max}")
        if self.convention is not None and self.kind != "pcm":
            raise ValueError(f"convention applies to kind 'pcm' only, got kind {self.kind!r}")
        for k, v in self.params.items():
            _check_param_shape(self.kind, f"params.{k}", k, v)
        try:
            make_device(self)
        except (TypeError, ValueError) as e:  # unknown names, bad values
            raise ValueError(f"params: {e}") from e


def _check_param_shape(kind: str, key: str, name: str, value) -> None:
    """A device parameter of a config has the shape of the device's own field: a number for a
    scalar field, a list of the default's length for a coefficient table."""
    if kind == "levels":
        if name != "sigma" and isinstance(value, tuple):
            raise ValueError(f"{key} must be a number, got a list {list(value)}")
        return
    default = _FACTORIES[kind]()
    if not hasattr(default, name) or name == "faults":
        return  # unknown names are reported by the factory
    table = isinstance(getattr(default, name), tuple)
    if not table and isinstance(value, tuple):
        raise ValueError(f"{key} must be a number, got a list {list(value)}")
    if table:  # PCM's tables have a fixed length; ReRAM's polynomials any degree
        want = len(getattr(default, name)) if kind == "pcm" else None
        if not isinstance(value, tuple) or not value or (want and len(value) != want):
            raise ValueError(f"{key} must be a list of {want or 'one or more'} numbers (a "
                             f"coefficient table), got "
                             f"{list(value) if isinstance(value, tuple) else value!r}")


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
        compile: 'optimized' (XLA's default optimization), 'fast' (LLVM optimization level 1,
            :data:`nvjax._xla.FAST_COMPILE_OPTIONS`: several times faster compilation, execution
            as fast within noise on the measured workloads, same results) or 'auto' ('fast'
            below :data:`AUTO_OPTIMIZE_INSTANCES` instances in all).
    """
    num_instances: int = 1000
    chunk_size: int = 250
    t_read_s: Tuple[float, ...] = (1.0, 3600.0, 86400.0, 2592000.0, 31536000.0)
    device_grid: Dict[str, Tuple[float, ...]] = field(default_factory=dict)
    eval_samples: Optional[int] = None
    compile: Literal["auto", "fast", "optimized"] = "auto"

    def validate(self):
        if self.num_instances < 1:
            raise ValueError(f"num_instances must be >= 1, got {self.num_instances}")
        if self.chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {self.chunk_size}")
        if not self.t_read_s or not all(0.0 <= t < math.inf for t in self.t_read_s):  # NaN fails
            raise ValueError(f"t_read_s must be a non-empty list of finite times >= 0 s, got "
                             f"{list(self.t_read_s)}")
        for k, v in self.device_grid.items():
            if not v:
                raise ValueError(f"device_grid.{k} must list at least one value")
            bad = [x for x in v if not math.isfinite(x)]
            if bad:
                raise ValueError(f"device_grid.{k} must list finite numbers, got {list(v)}")
        if self.eval_samples is not None and self.eval_samples < 1:
            raise ValueError(f"eval_samples must be >= 1 (or null for the whole test split), got "
                             f"{self.eval_samples}")


@dataclass(frozen=True)
class DistributedConfig:
    """A multi-process (multi-host) run (:func:`nvjax.sweep.init_distributed`).

    Every field left null is read from the environment (``NVJAX_COORDINATOR``,
    ``NVJAX_NUM_PROCESSES``, ``NVJAX_PROCESS_ID``, ``NVJAX_STARTUP_TIMEOUT_S``); all null and no
    environment: one process. These settings do not change the results.

    Attributes:
        coordinator_address: ``'host:port'`` of process 0's coordinator, reachable by all.
        num_processes: number of processes (>= 1).
        process_id: this process's id in [0, num_processes) (usually from the environment).
        startup_timeout_s: how long the processes wait for each other at start-up before each
            gives up with an error naming the coordinator, s (null: 300).
    """
    coordinator_address: Optional[str] = None
    num_processes: Optional[int] = None
    process_id: Optional[int] = None
    startup_timeout_s: Optional[float] = None

    def validate(self):
        t = self.startup_timeout_s
        if t is not None and not (0 < t < float("inf")):
            raise ValueError(f"startup_timeout_s must be a finite number of seconds > 0, got {t}")
        if self.num_processes is not None and self.num_processes < 1:
            raise ValueError(f"num_processes must be >= 1, got {self.num_processes}")
        if self.process_id is not None and self.process_id < 0:
            raise ValueError(f"process_id must be >= 0, got {self.process_id}")
        if (self.process_id is not None and self.num_processes is not None
                and self.process_id >= self.num_processes):
            raise ValueError(f"process_id must be < num_processes ({self.num_processes}), "
                             f"got {self.process_id}")
        if self.coordinator_address is not None and ":" not in self.coordinator_address:
            raise ValueError(f"coordinator_address must be 'host:port', "
                             f"got {self.coordinator_address!r}")


@dataclass(frozen=True)
class RunConfig:
    """Configuration of ``nvjax run`` (the main Monte Carlo reliability job)."""
    seed: int = 0
    prng: str = "threefry"  # random-number generator, one of nvjax.prng.IMPLS
    model: ModelConfig = field(default_factory=ModelConfig)
    device: DeviceConfig = field(default_factory=DeviceConfig)
    tile: TileConfig = field(default_factory=TileConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)
    progress: bool = True
    distributed: DistributedConfig = field(default_factory=DistributedConfig)

    def validate(self):
        _check_seed(self.seed)
        if self.prng not in prng_mod.IMPLS:
            raise ValueError(f"prng: expected one of {list(prng_mod.IMPLS)}, got {self.prng!r}")
        for k, values in self.sweep.device_grid.items():
            for i, v in enumerate(values):  # every value alone: the message names it
                try:
                    _check_param_shape(self.device.kind, f"sweep.device_grid.{k}[{i}]", k, v)
                    make_device(self.device, **{k: v})
                except (TypeError, ValueError) as e:
                    raise ValueError(f"sweep.device_grid.{k}[{i}] = {v}: {e}") from e
        grid = self.sweep.device_grid
        if len(grid) > 1 and math.prod(len(v) for v in grid.values()) <= 100_000:
            names = sorted(grid)  # then the combinations (e.g. p_stuck_min + p_stuck_max <= 1)
            for combo in itertools.product(*(grid[n] for n in names)):
                try:
                    make_device(self.device, **dict(zip(names, combo)))
                except (TypeError, ValueError) as e:
                    point = dict(zip(names, combo))
                    raise ValueError(f"sweep.device_grid point {point}: {e}") from e
        _check_eval_samples("sweep.eval_samples", self.sweep.eval_samples, self.seed)


def make_device(cfg: DeviceConfig, **point):
    """Build the device of a :class:`DeviceConfig`, with optional per-point overrides."""
    kw = dict(cfg.params)
    kw.update(point)
    stuck = {}
    if cfg.p_stuck_min or cfg.p_stuck_max or "p_stuck_min" in kw or "p_stuck_max" in kw:
        stuck = dict(p_stuck_min=kw.pop("p_stuck_min", cfg.p_stuck_min),
                     p_stuck_max=kw.pop("p_stuck_max", cfg.p_stuck_max))
    kw = {k: (tuple(v) if isinstance(v, (list, tuple)) else v) for k, v in kw.items()}
    if cfg.kind == "levels" and isinstance(kw.get("bits"), float) and kw["bits"].is_integer():
        kw["bits"] = int(kw["bits"])  # a device_grid list holds floats
    if cfg.convention is not None:
        kw["convention"] = cfg.convention
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


_DISTURB_FIELDS = ("n_ref", "v_ref", "v0", "kappa", "g_ref", "beta", "eps_f", "sigma_ln", "g_inf")


@dataclass(frozen=True)
class DisturbConfig:
    """D7 read-disturb constants (:mod:`nvjax.disturb`).

    Attributes:
        preset: 'auto' (the preset of the device kind: PCM or ReRAM; other devices use the PCM
            constants with g_ref = g_inf = the device's g_max), 'pcm' or 'reram'.
        params: overrides of :class:`nvjax.disturb.DisturbParams` fields (n_ref, v_ref (V), v0 (V),
            kappa, g_ref (µS), beta, eps_f, sigma_ln, g_inf (µS)).
    """
    preset: Literal["auto", "pcm", "reram"] = "auto"
    params: Dict[str, float] = field(default_factory=dict)

    def validate(self):
        for k in self.params:
            if k not in _DISTURB_FIELDS:
                raise ValueError(f"params: unknown disturb parameter {k!r} "
                                 f"(known: {', '.join(_DISTURB_FIELDS)})")
        try:  # the bounds of nvjax.disturb (the same for both presets)
            dist_mod.pcm_disturb(**self.params)
        except ValueError as e:
            raise ValueError(f"params: {e}") from e


def make_disturb(cfg: DisturbConfig, device_cfg: DeviceConfig):
    """The :class:`nvjax.disturb.DisturbParams` of a config (preset, then overrides)."""
    preset = cfg.preset
    if preset == "auto":
        preset = "reram" if device_cfg.kind == "reram" else "pcm"
    over = {}
    if cfg.preset == "auto" and device_cfg.kind not in ("pcm", "reram"):
        g_max = float(dev_mod.g_range(make_device(device_cfg))[1])
        over = {"g_ref": g_max, "g_inf": g_max}
    over.update({k: float(v) for k, v in cfg.params.items()})
    factory = dist_mod.reram_disturb if preset == "reram" else dist_mod.pcm_disturb
    return factory(**over)  # checked by the factory


@dataclass(frozen=True)
class LifetimeRunConfig:
    """Configuration of ``nvjax lifetime`` (inference + drift + disturb + reprogramming).

    Attributes:
        num_chips: chip instances (chip i uses ``fold_in(key(seed), i)``).
        chunk_size: chips per compiled chunk.
        eval_samples: test samples used (None: the whole test set); steps cycle through them.
    """
    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    device: DeviceConfig = field(default_factory=DeviceConfig)
    tile: TileConfig = field(default_factory=TileConfig)
    disturb: DisturbConfig = field(default_factory=DisturbConfig)
    lifetime: LifetimeConfig = field(default_factory=LifetimeConfig)
    num_chips: int = 128
    chunk_size: int = 32
    eval_samples: Optional[int] = None
    progress: bool = True

    def validate(self):
        _check_seed(self.seed)
        if self.num_chips < 1:
            raise ValueError(f"num_chips must be >= 1, got {self.num_chips}")
        if self.chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {self.chunk_size}")
        _check_eval_samples("eval_samples", self.eval_samples, self.seed)
        n_eval = self.eval_samples if self.eval_samples is not None else _test_samples(self.seed)
        if n_eval < self.lifetime.batch_size:
            what = "" if self.eval_samples is not None else ": null, the whole test split"
            raise ValueError(f"lifetime.batch_size ({self.lifetime.batch_size}) must be <= the "
                             f"{n_eval} evaluation samples (eval_samples{what})")
        g_min, g_max = (float(v) for v in dev_mod.g_range(make_device(self.device)))
        g_inf = float(make_disturb(self.disturb, self.device).g_inf)
        if not g_min <= g_inf <= g_max:
            raise ValueError(f"disturb: g_inf = {g_inf} µS lies outside the device's range "
                             f"[{g_min}, {g_max}] µS")


def load_lifetime(path) -> LifetimeRunConfig:
    """Load and validate a :class:`LifetimeRunConfig` from a YAML file."""
    return load_yaml(path, LifetimeRunConfig)


def load_any(path):
    """Load a command-line config file of either kind: a lifetime config (it has a ``lifetime``
    section) or a run config (the reliability sweep). Experiment configs belong to their scripts
    (``experiments/*.py``), which load them with :func:`load_yaml` and their own schema."""
    with open(path) as f:
        raw = yaml.safe_load(f) or {}
    if isinstance(raw, dict) and "lifetime" in raw:
        return load_lifetime(path)
    return load(path)
