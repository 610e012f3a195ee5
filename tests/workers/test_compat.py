"""The spec-level task traits the config validator uses (no torch) agree with the tasks the engine builds,
and the compatibility rules give the same verdict on either."""

from __future__ import annotations

import itertools

import pytest

from workers.engine import (
    Algorithm,
    DataSpec,
    DynamicsSpec,
    Measure,
    ModelSpec,
    TaskKind,
    TaskSpec,
    Unit,
    check_compatible,
    make_task,
    traits,
)

SPECS = [
    TaskSpec(kind=TaskKind.TEACHER, dim=5, out_dim=3),
    TaskSpec(kind=TaskKind.SPHERICAL_3SPIN, dim=4, out_dim=2),
    TaskSpec(kind=TaskKind.GAUSSIAN_MIXTURE, dim=2, measure=Measure.LEBESGUE),
    TaskSpec(kind=TaskKind.GAUSSIAN_MIXTURE, dim=3, measure=Measure.GAUSSIAN),
    TaskSpec(kind=TaskKind.DIGITS, dim=7, out_dim=2),
    TaskSpec(kind=TaskKind.DATASET, dim=3, out_dim=2, data=DataSpec(path="/data.npz")),  # sizes only, no arrays
]


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s.kind.value}-{s.measure.value}")
def test_traits_match_built_task(spec: TaskSpec) -> None:
    task = make_task(spec)
    tr = traits(spec)
    assert (tr.has_closed_form, tr.samplable, tr.dim, tr.out_dim) == (
        task.has_closed_form, task.samplable, task.dim, task.out_dim)


def _verdict(task: object, model: ModelSpec, dyn: DynamicsSpec) -> str | None:
    try:
        check_compatible(task, model, dyn)  # type: ignore[arg-type]
    except ValueError as err:
        return str(err)
    return None


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s.kind.value}-{s.measure.value}")
def test_same_verdict_on_traits_and_task(spec: TaskSpec) -> None:
    task = make_task(spec)
    verdicts = []
    for unit, algo, finite in itertools.product(Unit, Algorithm, (False, True)):
        model, dyn = ModelSpec(unit=unit), DynamicsSpec(algorithm=algo, finite_set=finite)
        a, b = _verdict(traits(spec), model, dyn), _verdict(task, model, dyn)
        assert a == b
        verdicts.append(a)
    # Every task kind is trainable somehow, and the Lebesgue mixture and digits refuse something.
    assert None in verdicts
    lebesgue = spec.kind is TaskKind.GAUSSIAN_MIXTURE and spec.measure is Measure.LEBESGUE
    if spec.kind in (TaskKind.DIGITS, TaskKind.DATASET) or lebesgue:
        assert any(v is not None for v in verdicts)
