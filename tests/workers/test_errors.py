"""Bad inputs raise ValueError with a message that names the problem (and, where there is one, the fix)."""

from __future__ import annotations

import math
import re
from typing import Any

import pytest

from workers.engine import (
    Algorithm,
    DynamicsSpec,
    Measure,
    ModelSpec,
    NetworkSpec,
    Pack,
    TaskKind,
    TaskSpec,
    Unit,
    from_dict,
    to_dict,
)

MIXTURE = TaskSpec(kind=TaskKind.GAUSSIAN_MIXTURE, dim=1, measure=Measure.LEBESGUE)


@pytest.mark.parametrize("width", [0, -1, -100])
def test_non_positive_width(width: int) -> None:
    with pytest.raises(ValueError, match=rf"width must be a positive integer, got {width}"):
        NetworkSpec(0, width, seed=0)


def test_unknown_unit() -> None:
    # The engine's own parsing of a spec dict (what a worker receives), not Python's Enum lookup.
    with pytest.raises(ValueError, match="'foo' is not a valid Unit"):
        from_dict(ModelSpec, {"unit": "foo"})
    assert from_dict(ModelSpec, {"unit": "tanh"}).unit is Unit.TANH


@pytest.mark.parametrize("rate", [-1e-9, -1.0, math.nan])
def test_negative_or_nan_bd_rate(rate: float) -> None:
    with pytest.raises(ValueError, match="birth-death rate must be >= 0"):
        NetworkSpec(0, 5, seed=0, bd_rate=rate)


@pytest.mark.parametrize("lr", [0.0, -0.1, math.nan, math.inf, -math.inf])
def test_bad_learning_rate(lr: float) -> None:
    with pytest.raises(ValueError, match=r"learning rate \(dt\) must be finite and > 0"):
        NetworkSpec(0, 5, seed=0, lr=lr)


@pytest.mark.parametrize("temperature", [-1.0, math.nan])
def test_bad_temperature(temperature: float) -> None:
    with pytest.raises(ValueError, match="temperature must be >= 0"):
        NetworkSpec(0, 5, seed=0, temperature=temperature)


@pytest.mark.parametrize("unit", [Unit.RELU, Unit.TANH, Unit.SIGMOID])
def test_ridge_units_on_lebesgue_mixture(unit: Unit) -> None:
    with pytest.raises(ValueError, match=rf"only for gaussian units, not model.unit={unit.value}.*"
                                         "set model.unit=gaussian or task.measure=gaussian"):
        Pack(MIXTURE, ModelSpec(unit=unit), DynamicsSpec(algorithm=Algorithm.GD), [NetworkSpec(0, 4, seed=0)])


def test_sgd_on_lebesgue() -> None:
    msg = "sgd needs samples but task.measure=lebesgue cannot be sampled"
    with pytest.raises(ValueError, match=re.escape(msg)):
        Pack(MIXTURE, ModelSpec(unit=Unit.GAUSSIAN), DynamicsSpec(algorithm=Algorithm.SGD),
             [NetworkSpec(0, 4, seed=0)])
    # The same task under a Gaussian input measure can be sampled: no error.
    Pack(TaskSpec(kind=TaskKind.GAUSSIAN_MIXTURE, dim=1, measure=Measure.GAUSSIAN),
         ModelSpec(unit=Unit.GAUSSIAN), DynamicsSpec(algorithm=Algorithm.SGD), [NetworkSpec(0, 4, seed=0)])


def test_sgd_on_finite_dataset_needs_finite_set() -> None:
    with pytest.raises(ValueError, match=re.escape("set dynamics.finite_set=true for sgd")):
        Pack(TaskSpec(kind=TaskKind.DIGITS), ModelSpec(), DynamicsSpec(algorithm=Algorithm.SGD),
             [NetworkSpec(0, 4, seed=0)])


@pytest.mark.parametrize(
    ("cls", "data", "bad"),
    [
        (NetworkSpec, {"net_id": 0, "width": 3, "seed": 0, "widht": 4}, "widht"),
        (DynamicsSpec, {"steps": 10, "learning_rate": 0.1}, "learning_rate"),
        (TaskSpec, {"kind": "teacher", "dims": 3}, "dims"),
        (ModelSpec, {"unit": "relu", "init": {"scale": 1.0, "sclae": 2.0}}, "sclae"),  # nested
        (TaskSpec, {"kind": "gaussian_mixture", "dim": 1,
                    "components": [{"weight": 1.0, "mean": [0.0], "var": 1.0, "sd": 1.0}]}, "sd"),
    ],
)
def test_from_dict_unknown_keys(cls: type, data: dict[str, Any], bad: str) -> None:
    with pytest.raises(ValueError, match=rf"unknown keys for \w+: \['{bad}'\]"):
        from_dict(cls, data)


def test_from_dict_round_trip_and_bad_values() -> None:
    spec = NetworkSpec(3, 7, seed=2, lr=0.2, bd_rate=1.0)
    assert from_dict(NetworkSpec, to_dict(spec)) == spec
    with pytest.raises(ValueError, match="width must be a positive integer, got 0"):
        from_dict(NetworkSpec, {**to_dict(spec), "width": 0})
    with pytest.raises(ValueError, match="'nope' is not a valid Parametrization"):
        from_dict(NetworkSpec, {**to_dict(spec), "parametrization": "nope"})


def test_other_spec_checks() -> None:
    with pytest.raises(ValueError, match=re.escape("task.dim must be >= 1")):
        TaskSpec(dim=0)
    with pytest.raises(ValueError, match=re.escape("dynamics.steps must be >= 1")):
        DynamicsSpec(steps=0)
    with pytest.raises(ValueError, match=re.escape("model.gaussian_var must be > 0")):
        ModelSpec(gaussian_var=0.0)
    with pytest.raises(ValueError, match="a pack needs at least one network"):
        Pack(TaskSpec(), ModelSpec(), DynamicsSpec(), [])
    with pytest.raises(ValueError, match=r"network ids must be unique.*\[1, 1\]"):
        Pack(TaskSpec(), ModelSpec(), DynamicsSpec(), [NetworkSpec(1, 3, seed=0), NetworkSpec(1, 4, seed=1)])
