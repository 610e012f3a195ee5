"""Pack.save -> Pack.load -> continue equals an uninterrupted run, bit for bit on CPU.

Every random stream is exercised (SGD batches, Langevin noise, birth-death uniforms, prior re-injections),
the save falls between two reports (so the train-loss and event accumulators are mid-interval), and the
reports, particles and generator states must all match exactly.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from tests.workers.engine_ref import DEVICE
from workers.engine import (
    Algorithm,
    Component,
    DynamicsSpec,
    InitSpec,
    InputDist,
    Measure,
    ModelSpec,
    NetStatus,
    NetworkSpec,
    Pack,
    Parametrization,
    RateConvention,
    Report,
    Scheme,
    TaskKind,
    TaskSpec,
    Unit,
)

NTK = Parametrization.NTK


def _drive(pack: Pack, upto: int) -> list[Report]:
    """step_once until ``upto`` (not finishing), reporting every eval_every steps."""
    out = []
    while pack.step < upto:
        pack.step_once()
        if pack.step % pack.dynamics.eval_every == 0:
            out.append(pack.report())
    return out


def _assert_identical(a: Pack, b: Pack) -> None:
    assert a.step == b.step and a.running == b.running
    assert a.retired == b.retired
    assert torch.equal(a.data.gen.get_state(), b.data.gen.get_state())
    for ga, gb in zip(a.groups, b.groups, strict=True):
        assert ga.ids == gb.ids
        for ta, tb in ((ga.z, gb.z), (ga.c, gb.c), (ga.loss_sum, gb.loss_sum), (ga.bd_kills, gb.bd_kills),
                       (ga.bd_clones, gb.bd_clones)):
            assert ta.dtype == tb.dtype and torch.equal(ta, tb)
        assert (ga.b is None) == (gb.b is None)
        if ga.b is not None and gb.b is not None:
            assert torch.equal(ga.b, gb.b)
        for sa, sb in zip(ga.gens, gb.gens, strict=True):
            assert torch.equal(sa.get_state(), sb.get_state())


def _roundtrip(pack: Pack, tmp_path: Path, name: str) -> Pack:
    path = tmp_path / "ckpt" / f"{name}.pt"
    pack.save(path)
    assert path.exists() and not path.with_suffix(".pt.tmp").exists()
    loaded = Pack.load(path, device=DEVICE)
    _assert_identical(pack, loaded)
    return loaded


def _resume_equals_uninterrupted(make: Callable[[], Pack], save_at: int, stop_at: int,
                                 tmp_path: Path) -> None:
    full, part = make(), make()
    ref = _drive(full, stop_at)
    early = _drive(part, save_at)
    assert part.step % part.dynamics.eval_every != 0  # mid-interval: accumulators are non-empty
    loaded = _roundtrip(part, tmp_path, "mid")
    del part
    late = _drive(loaded, stop_at)
    assert early + late == ref  # every report: losses, events, retirements
    _assert_identical(full, loaded)
    # And to the end through train(): the same reports and final records.
    assert list(full.train()) == list(loaded.train())
    assert full.retired == loaded.retired and full.done and loaded.done


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_resume_sgd_langevin_birth_death(dtype: torch.dtype, tmp_path: Path) -> None:
    task = TaskSpec(kind=TaskKind.TEACHER, dim=4, seed=3, teacher_units=3, inputs=InputDist.GAUSSIAN)
    model = ModelSpec(unit=Unit.RELU, init=InitSpec(bias_std=0.2),
                      prior=InitSpec(z="uniform", low=-1.0, high=1.0, bias_std=0.1))
    dyn = DynamicsSpec(algorithm=Algorithm.SGD, steps=24, batch_size=16, eval_every=4, bd_every=2,
                       bd_quench=3, bd_convention=RateConvention.PER_STEP)
    nets = [
        NetworkSpec(1, 8, seed=1, lr=0.05, temperature=1e-3, bd_rate=3.0, bd_scheme=Scheme.PRIOR),
        NetworkSpec(2, 8, seed=2, lr=0.05, temperature=1e-3, bd_rate=3.0, bd_scheme=Scheme.CLONE),
        NetworkSpec(3, 15, seed=3, lr=0.1, parametrization=NTK, temperature=1e-2, bd_rate=1.0,
                    bd_scheme=Scheme.PRIOR),
        NetworkSpec(4, 15, seed=4, lr=0.02),
    ]

    def make() -> Pack:
        return Pack(task, model, dyn, nets, data_seed=7, dtype=dtype, device=DEVICE)

    probe = make()
    events = [rep.bd_events for rep in _drive(probe, 12)]
    assert any(k > 0 for ev in events for k, _ in ev.values())  # birth-death really fired
    _resume_equals_uninterrupted(make, save_at=10, stop_at=19, tmp_path=tmp_path)


def test_resume_exact_energy_with_prior_and_components(tmp_path: Path) -> None:
    """Exact path; non-default mixture components and a birth-death prior survive the JSON round trip."""
    comps = (Component(0.6, (-1.0,), 0.4), Component(-0.3, (1.5,), 0.7))
    task = TaskSpec(kind=TaskKind.GAUSSIAN_MIXTURE, dim=1, components=comps, measure=Measure.GAUSSIAN,
                    measure_std=1.7)
    model = ModelSpec(unit=Unit.GAUSSIAN, gaussian_var=0.3, init=InitSpec(z="normal", loc=-1.0, scale=0.2),
                      prior=InitSpec(z="uniform", low=-3.0, high=3.0))
    dyn = DynamicsSpec(algorithm=Algorithm.GD, steps=20, eval_every=3, bd_convention=RateConvention.PER_TIME)
    nets = [NetworkSpec(0, 20, seed=0, lr=0.05, bd_rate=20.0, bd_scheme=Scheme.PRIOR, temperature=1e-4),
            NetworkSpec(1, 20, seed=1, lr=0.05, bd_rate=20.0)]

    def make() -> Pack:
        return Pack(task, model, dyn, nets, data_seed=2, dtype=torch.float64, device=DEVICE)

    loaded = _roundtrip(make(), tmp_path, "specs")
    assert loaded.task_spec == task and loaded.model == model and loaded.dynamics == dyn
    assert loaded.networks == tuple(nets)
    _resume_equals_uninterrupted(make, save_at=7, stop_at=16, tmp_path=tmp_path)


RETIRE_TASK = TaskSpec(kind=TaskKind.TEACHER, dim=3, seed=1, teacher_units=2)
RETIRE_DYN = DynamicsSpec(algorithm=Algorithm.SGD, steps=16, batch_size=8, eval_every=3,
                          bd_convention=RateConvention.PER_STEP)
RETIRE_NETS = [
    NetworkSpec(1, 6, seed=1, lr=0.05, temperature=1e-3, bd_rate=2.0),
    NetworkSpec(2, 6, seed=2, lr=1e6),  # diverges: retired by the report at step 3
    NetworkSpec(3, 6, seed=3, lr=0.05, bd_rate=2.0, bd_scheme=Scheme.PRIOR),  # pruned at step 4
    NetworkSpec(4, 9, seed=4, lr=0.05),  # its whole group is pruned at step 5
]


def _with_retirements(upto: int) -> tuple[Pack, list[Report]]:
    pack = Pack(RETIRE_TASK, ModelSpec(unit=Unit.TANH), RETIRE_DYN, RETIRE_NETS, data_seed=1,
                dtype=torch.float64, device=DEVICE)
    reports = _drive(pack, 4)
    pack.retire(3, NetStatus.PRUNED, "pruned by the search", 0.25)
    reports += _drive(pack, 5)
    pack.retire(4, NetStatus.PRUNED, "pruned by the search")
    reports += _drive(pack, upto)
    return pack, reports


def _check_loaded_retirements(loaded: Pack) -> None:
    assert loaded.running == [1] and [g.ids for g in loaded.groups] == [[1]]
    assert {k: v.status for k, v in loaded.retired.items()} == {
        2: NetStatus.DIVERGED, 3: NetStatus.PRUNED, 4: NetStatus.PRUNED}
    assert loaded.retired[3].final_test_loss == 0.25 and loaded.retired[3].step == 4
    with pytest.raises(KeyError):
        loaded.particles(3)


def test_checkpoint_after_retirement(tmp_path: Path) -> None:
    """Saved after the report that emitted the retirements (what the Ray actor does)."""
    full, ref = _with_retirements(upto=7)
    part, early = _with_retirements(upto=6)
    assert early == ref[: len(early)] and any(r.retired for r in early)
    loaded = _roundtrip(part, tmp_path, "retired")
    _check_loaded_retirements(loaded)
    assert list(full.train()) == _drive(loaded, 7) + list(loaded.train())
    _assert_identical(full, loaded)


def _metrics_only(reports: list[Report]) -> list[tuple[int, tuple[object, ...], dict[int, tuple[int, int]]]]:
    return [(r.step, r.metrics, r.bd_events) for r in reports]


def test_checkpoint_between_retire_and_report_keeps_the_numbers(tmp_path: Path) -> None:
    """Saved right after retire(), before the next report: the trajectories still resume exactly."""
    full, _ = _with_retirements(upto=5)
    part, _ = _with_retirements(upto=5)
    loaded = _roundtrip(part, tmp_path, "pending")
    _check_loaded_retirements(loaded)
    assert _metrics_only(list(full.train())) == _metrics_only(list(loaded.train()))
    _assert_identical(full, loaded)


def test_checkpoint_between_retire_and_report_keeps_pending_records(tmp_path: Path) -> None:
    full, _ = _with_retirements(upto=5)
    part, _ = _with_retirements(upto=5)
    loaded = _roundtrip(part, tmp_path, "pending")
    assert list(full.train()) == list(loaded.train())
