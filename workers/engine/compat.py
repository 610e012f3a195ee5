"""Which engine settings go together, decided from the specs alone (no torch, no tensors).

The config validator runs this on every ``mfsweep validate`` and every variant of a sweep, so it must answer
in microseconds: building a task (teacher weights, the digits data set) just to ask whether it can be
sampled would import torch and scikit-learn. :class:`workers.engine.tasks.Task` reports the same traits
(tests/workers/test_compat.py checks that they agree).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from .specs import Algorithm, DynamicsSpec, Measure, ModelSpec, TaskKind, TaskSpec, Unit


class TaskTraits(Protocol):
    """What compatibility depends on: a :class:`Task` has these properties, and so has :func:`traits`."""

    @property
    def has_closed_form(self) -> bool: ...

    @property
    def samplable(self) -> bool: ...


@dataclass(frozen=True)
class SpecTraits:
    has_closed_form: bool
    """Whether the population loss of Gaussian units is closed form (the Gaussian-mixture target)."""
    samplable: bool
    """Whether fresh inputs x ~ nu can be drawn (not on Lebesgue measure, not for a finite data set)."""
    dim: int
    """Input dimension d (digits: 64 whatever the spec says)."""
    out_dim: int
    """Output dimension k (teacher: the spec's; digits: 10; others 1)."""


def traits(spec: TaskSpec) -> SpecTraits:
    """The traits of the task ``spec`` names, without building it."""
    kind = TaskKind(spec.kind)
    if kind is TaskKind.GAUSSIAN_MIXTURE:
        return SpecTraits(True, Measure(spec.measure) is Measure.GAUSSIAN, spec.dim, 1)
    if kind is TaskKind.DIGITS:
        return SpecTraits(False, False, 64, 10)
    if kind is TaskKind.DATASET:  # a finite set of samples: sgd needs finite_set (dims filled in by the driver)
        return SpecTraits(False, False, spec.dim, spec.out_dim)
    return SpecTraits(False, True, spec.dim, spec.out_dim if kind is TaskKind.TEACHER else 1)


def check_compatible(task: TaskTraits, model: ModelSpec, dynamics: DynamicsSpec) -> None:
    """Raise a clear one-line ValueError for impossible combinations (``task``: a Task or :func:`traits`)."""
    if task.has_closed_form and model.unit is not Unit.GAUSSIAN and not task.samplable:
        raise ValueError(
            f"task.kind=gaussian_mixture on Lebesgue measure has a closed-form energy only for gaussian units, "
            f"not model.unit={model.unit.value}; set model.unit=gaussian or task.measure=gaussian"
        )
    if dynamics.algorithm is Algorithm.SGD and not task.samplable and not dynamics.finite_set:
        if task.has_closed_form:
            raise ValueError(
                "sgd needs samples but task.measure=lebesgue cannot be sampled; "
                "use dynamics.algorithm=gd (exact energy) or task.measure=gaussian"
            )
        raise ValueError("this task is a finite dataset: set dynamics.finite_set=true for sgd")
