"""Tests for nvjax._strict (strict YAML/dict -> frozen dataclass loader)."""

from __future__ import annotations  # exercises string annotations

import dataclasses
import json
from typing import Literal, Optional

import pytest
import yaml

from nvjax.config import ConfigError, from_dict, load_yaml, to_dict


@dataclasses.dataclass(frozen=True)
class Layer:
    name: str
    width: int = 8


@dataclasses.dataclass(frozen=True)
class Sweep:
    num_instances: int
    sigma: float = 0.1
    mode: Literal["fast", "exact"] = "fast"
    bits: Literal[4, 8] = 8

    def validate(self) -> None:
        if self.num_instances <= 0:
            raise ValueError("num_instances must be positive")


@dataclasses.dataclass(frozen=True)
class Config:
    sweep: Sweep
    layers: tuple[Layer, ...] = ()
    seed: Optional[int] = None
    tag: str | None = None
    enabled: bool = True
    shape: tuple[int, float] = (1, 2.0)
    extras: dict[str, float] = dataclasses.field(default_factory=dict)
    groups: dict[str, Sweep] = dataclasses.field(default_factory=dict)


SRC = "configs/x.yaml"


def load(data, cls=Config):
    return from_dict(data, cls, source=SRC)


def error(data, cls=Config) -> str:
    with pytest.raises(ConfigError) as info:
        load(data, cls)
    return str(info.value)


def test_config_error_is_value_error():
    assert issubclass(ConfigError, ValueError)


def test_minimal_defaults():
    cfg = load({"sweep": {"num_instances": 3}})
    assert cfg == Config(sweep=Sweep(num_instances=3))
    assert cfg.extras == {}
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.seed = 1  # type: ignore[misc]


def test_full_nested():
    cfg = load({
        "sweep": {"num_instances": 10, "sigma": 1, "mode": "exact", "bits": 4},
        "layers": [{"name": "a"}, {"name": "b", "width": 16}],
        "seed": 7,
        "tag": "t",
        "enabled": False,
        "shape": [3, 4],
        "extras": {"lr": 0.5},
        "groups": {"g": {"num_instances": 2}},
    })
    assert cfg.sweep == Sweep(10, 1.0, "exact", 4)
    assert isinstance(cfg.sweep.sigma, float)
    assert cfg.layers == (Layer("a"), Layer("b", 16))
    assert isinstance(cfg.layers, tuple)
    assert cfg.shape == (3, 4.0) and isinstance(cfg.shape[1], float)
    assert cfg.extras == {"lr": 0.5}
    assert cfg.groups == {"g": Sweep(2)}


def test_unknown_key_with_suggestion():
    msg = error({"sweep": {"num_instance": 10}})
    assert msg.startswith(SRC + ":")
    assert "'sweep.num_instance'" in msg
    assert "did you mean 'num_instances'" in msg
    assert "num_instances, sigma, mode, bits" in msg


def test_unknown_key_without_suggestion():
    msg = error({"sweep": {"num_instances": 1}, "zzzzzz": 1})
    assert "unknown key 'zzzzzz'" in msg
    assert "did you mean" not in msg
    assert "valid keys: sweep, layers" in msg


def test_unknown_key_in_tuple_element():
    msg = error({"sweep": {"num_instances": 1}, "layers": [{"nam": "a"}]})
    assert "'layers[0].nam'" in msg and "did you mean 'name'" in msg


def test_missing_key():
    msg = error({})
    assert msg == f"{SRC}: missing required key 'sweep'"
    msg = error({"sweep": {"num_instances": 1}, "layers": [{"width": 2}]})
    assert "missing required key 'layers[0].name'" in msg


def test_wrong_type_message():
    msg = error({"sweep": {"num_instances": "10"}})
    assert msg == (f"{SRC}: key 'sweep.num_instances': "
                   "expected int, got '10' (str)")


@pytest.mark.parametrize("value", [True, 1.0, "10", None, [1]])
def test_int_is_strict(value):
    assert "expected int" in error({"sweep": {"num_instances": value}})


@pytest.mark.parametrize("value", [True, "0.5", "abc", "1e", None])
def test_float_is_strict(value):
    assert "expected float" in error(
        {"sweep": {"num_instances": 1, "sigma": value}})


def test_bool_and_str_strict():
    assert "expected bool, got 1 (int)" in error(
        {"sweep": {"num_instances": 1}, "enabled": 1})
    assert "expected str, got 3 (int)" in error(
        {"sweep": {"num_instances": 1}, "layers": [{"name": 3}]})


@pytest.mark.parametrize("text,expected",
                         [("1e-3", 1e-3), ("1.5e2", 150.0), ("-2e3", -2000.0)])
def test_scientific_notation_from_yaml(tmp_path, text, expected):
    path = tmp_path / "c.yaml"
    path.write_text(f"sweep:\n  num_instances: 1\n  sigma: {text}\n")
    assert isinstance(yaml.safe_load(path.read_text())["sweep"]["sigma"], str)
    assert load_yaml(path, Config).sweep.sigma == expected


def test_scientific_string_rejected_for_int():
    assert "expected int" in error({"sweep": {"num_instances": "1e3"}})


def test_literal_rejection_lists_allowed_values():
    msg = error({"sweep": {"num_instances": 1, "mode": "slow"}})
    assert "key 'sweep.mode'" in msg
    assert "expected one of 'fast', 'exact', got 'slow' (str)" in msg


def test_int_literal_is_type_strict():
    assert load({"sweep": {"num_instances": 1, "bits": 4}}).sweep.bits == 4
    for bad in ("4", 4.0, 16):
        assert "expected one of 4, 8" in error(
            {"sweep": {"num_instances": 1, "bits": bad}})


def test_optional():
    cfg = load({"sweep": {"num_instances": 1}, "seed": None, "tag": None})
    assert cfg.seed is None and cfg.tag is None
    cfg = load({"sweep": {"num_instances": 1}, "seed": 5, "tag": "x"})
    assert cfg.seed == 5 and cfg.tag == "x"
    msg = error({"sweep": {"num_instances": 1}, "seed": "5"})
    assert "key 'seed': expected int, got '5' (str)" in msg


def test_optional_without_default_is_still_required():
    @dataclasses.dataclass(frozen=True)
    class C:
        x: Optional[int]

    assert "missing required key 'x'" in error({}, C)
    assert from_dict({"x": None}, C).x is None


def test_tuple_errors():
    msg = error({"sweep": {"num_instances": 1}, "layers": {"name": "a"}})
    assert "key 'layers': expected list of mapping (Layer)" in msg
    msg = error({"sweep": {"num_instances": 1}, "shape": [1]})
    assert "expected list of length 2 [int, float], got [1] (list)" in msg
    msg = error({"sweep": {"num_instances": 1}, "shape": [1, "x"]})
    assert "key 'shape[1]': expected float" in msg


def test_dict_errors():
    msg = error({"sweep": {"num_instances": 1}, "extras": {"lr": "x"}})
    assert "key 'extras.lr': expected float, got 'x' (str)" in msg
    msg = error({"sweep": {"num_instances": 1}, "extras": {1: 0.5}})
    assert "mapping keys must be str" in msg
    msg = error({"sweep": {"num_instances": 1}, "groups": {"g": {}}})
    assert "missing required key 'groups.g.num_instances'" in msg
    assert "expected mapping (Sweep)" in error({"sweep": 3})


def test_validate_hook():
    msg = error({"sweep": {"num_instances": 0}})
    assert msg == f"{SRC}: key 'sweep': num_instances must be positive"
    msg = error({"sweep": {"num_instances": 1},
                 "groups": {"g": {"num_instances": -1}}})
    assert msg == f"{SRC}: key 'groups.g': num_instances must be positive"


def test_validate_hook_top_level():
    @dataclasses.dataclass(frozen=True)
    class C:
        lo: int
        hi: int

        def validate(self):
            if self.lo > self.hi:
                raise ValueError("lo must be <= hi")

    assert error({"lo": 2, "hi": 1}, C) == f"{SRC}: top level: lo must be <= hi"
    assert from_dict({"lo": 1, "hi": 2}, C) == C(1, 2)


def test_round_trip():
    cfg = load({
        "sweep": {"num_instances": 10, "sigma": 1e-3, "mode": "exact"},
        "layers": [{"name": "a"}, {"name": "b", "width": 16}],
        "seed": None,
        "shape": [3, 4.5],
        "extras": {"lr": 0.5},
        "groups": {"g": {"num_instances": 2}},
    })
    d = to_dict(cfg)
    assert d["layers"] == [{"name": "a", "width": 8},
                           {"name": "b", "width": 16}]
    assert d["shape"] == [3, 4.5]
    assert d["groups"]["g"]["num_instances"] == 2
    json.dumps(d)  # plain data only
    assert load(d) == cfg
    assert load(yaml.safe_load(yaml.safe_dump(d))) == cfg


def test_to_dict_rejects_non_dataclass():
    with pytest.raises(TypeError):
        to_dict({"a": 1})


def test_from_dict_top_level_must_be_mapping():
    assert error([1, 2]) == f"{SRC}: top level must be a mapping, got [1, 2] (list)"


def test_load_yaml_ok(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("sweep:\n  num_instances: 4\nlayers:\n  - name: a\n")
    cfg = load_yaml(path, Config)
    assert cfg.sweep.num_instances == 4 and cfg.layers == (Layer("a"),)
    assert load_yaml(str(path), Config) == cfg


def test_load_yaml_errors_name_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("sweep:\n  num_instances: '10'\n")
    with pytest.raises(ConfigError, match=r"c\.yaml: key 'sweep\.num_instances'"):
        load_yaml(path, Config)


def test_load_yaml_missing_file(tmp_path):
    path = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match="not found") as info:
        load_yaml(path, Config)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("text", ["", "# only a comment\n"])
def test_load_yaml_empty(tmp_path, text):
    path = tmp_path / "e.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match="empty"):
        load_yaml(path, Config)


def test_load_yaml_non_mapping(tmp_path):
    path = tmp_path / "l.yaml"
    path.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_yaml(path, Config)


def test_load_yaml_invalid_yaml(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("a: [1, 2\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_yaml(path, Config)


def test_non_dataclass_cls():
    with pytest.raises(TypeError):
        from_dict({}, dict)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf"), "1e999", 10 ** 400])
def test_float_must_be_finite(value):
    """NaN and infinity are refused wherever a float is expected, naming the key."""
    msg = error({"sweep": {"num_instances": 1, "sigma": value}})
    assert "key 'sweep.sigma': expected a finite float" in msg and SRC in msg
    msg = error({"sweep": {"num_instances": 1}, "shape": [1, value]})
    assert "key 'shape[1]': expected a finite float" in msg
    msg = error({"sweep": {"num_instances": 1}, "extras": {"lr": value}})
    assert "key 'extras.lr': expected a finite float" in msg


def test_finite_floats_still_load():
    cfg = load({"sweep": {"num_instances": 1, "sigma": 1e308}, "extras": {"a": -0.0, "b": 3}})
    assert cfg.sweep.sigma == 1e308 and cfg.extras == {"a": -0.0, "b": 3.0}
