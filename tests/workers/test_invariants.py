"""Invariants of the particle picture and of packing.

- Mean-field f_n is a function of the empirical measure: duplicating every particle (n -> 2n) leaves f_n,
  the loss and (with raw lr = n dt) the whole GD/SGD trajectory unchanged.
- A network's numbers never depend on its pack-mates: alone or packed (other widths, seeds,
  hyperparameters, a diverging mate, a mate retired mid-run) it produces the same numbers: bit for bit while
  its group keeps its size, to PACK_RTOL = 1e-12 otherwise (see engine_ref.PACK_RTOL: MKL's bmm rounds a
  batch of one differently).
"""

from __future__ import annotations

import math

import pytest
import torch

from tests.workers.engine_ref import (
    DEVICE,
    F64,
    all_particles,
    assert_particles_close,
    assert_reports_close,
    only,
    run_reports,
)
from workers.engine import (
    Algorithm,
    DynamicsSpec,
    InitSpec,
    Measure,
    ModelSpec,
    NetStatus,
    NetworkSpec,
    Pack,
    Parametrization,
    RateConvention,
    Scheme,
    TaskKind,
    TaskSpec,
    Unit,
)

NTK = Parametrization.NTK
TEACHER = TaskSpec(kind=TaskKind.TEACHER, dim=5, seed=1, teacher_units=4, n_train=64, n_test=96)
MIXTURE = TaskSpec(kind=TaskKind.GAUSSIAN_MIXTURE, dim=1, measure=Measure.LEBESGUE)


def _set_particles(pack: Pack, z: torch.Tensor, b: torch.Tensor | None, c: torch.Tensor) -> None:
    (g,) = pack.groups
    g.z.copy_(z.unsqueeze(0))
    g.c.copy_(c.unsqueeze(0))
    if b is not None:
        assert g.b is not None
        g.b.copy_(b.unsqueeze(0))


@pytest.mark.parametrize(
    ("task", "unit", "algorithm"),
    [
        (TEACHER, Unit.RELU, Algorithm.GD),
        (TEACHER, Unit.TANH, Algorithm.SGD),
        (TEACHER, Unit.SIGMOID, Algorithm.GD),
        (TEACHER, Unit.GAUSSIAN, Algorithm.SGD),
        (MIXTURE, Unit.GAUSSIAN, Algorithm.GD),  # exact-energy path
    ],
    ids=["relu-gd", "tanh-sgd", "sigmoid-gd", "gaussian-sgd", "gaussian-exact"],
)
def test_duplicating_particles_leaves_f_n_and_dynamics_unchanged(task: TaskSpec, unit: Unit,
                                                                  algorithm: Algorithm) -> None:
    n = 7
    model = ModelSpec(unit=unit, gaussian_var=0.5, init=InitSpec(bias_std=0.5, c_mean=0.2))
    dyn = DynamicsSpec(algorithm=algorithm, steps=50, batch_size=16)
    single = Pack(task, model, dyn, [NetworkSpec(0, n, seed=3, lr=0.1)], data_seed=2, dtype=F64)
    double = Pack(task, model, dyn, [NetworkSpec(0, 2 * n, seed=8, lr=0.1)], data_seed=2, dtype=F64)
    z, b, c = single.particles(0)
    _set_particles(double, torch.cat([z, z]), None if b is None else torch.cat([b, b]), torch.cat([c, c]))

    x = torch.randn(200, single.task.dim, generator=torch.Generator().manual_seed(0), dtype=F64)
    for _ in range(2):
        torch.testing.assert_close(double.predict(x)[0], single.predict(x)[0], rtol=1e-12, atol=1e-14)
        assert double.test_losses()[0] == pytest.approx(single.test_losses()[0], rel=1e-12)
        for _ in range(6):  # mean-field: a duplicated cloud follows the same ODE
            single.step_once()
            double.step_once()
    z2, _, c2 = double.particles(0)
    z1, _, c1 = single.particles(0)
    torch.testing.assert_close(z2, torch.cat([z1, z1]), rtol=1e-10, atol=1e-13)
    torch.testing.assert_close(c2, torch.cat([c1, c1]), rtol=1e-10, atol=1e-13)
    assert not torch.equal(z1, z)  # the trajectory was not trivial


def test_duplication_changes_f_n_under_ntk() -> None:
    """Control: the invariance is specific to the 1/n scaling (under n^-1/2, f_2n = sqrt(2) f_n)."""
    model = ModelSpec(unit=Unit.TANH)
    dyn = DynamicsSpec(algorithm=Algorithm.GD, steps=5)
    single = Pack(TEACHER, model, dyn, [NetworkSpec(0, 5, seed=3, parametrization=NTK)], dtype=F64)
    double = Pack(TEACHER, model, dyn, [NetworkSpec(0, 10, seed=3, parametrization=NTK)], dtype=F64)
    z, b, c = single.particles(0)
    assert b is not None
    _set_particles(double, torch.cat([z, z]), torch.cat([b, b]), torch.cat([c, c]))
    x = torch.randn(50, TEACHER.dim, generator=torch.Generator().manual_seed(1), dtype=F64)
    torch.testing.assert_close(double.predict(x)[0], math.sqrt(2) * single.predict(x)[0])


def _rich_dynamics(steps: int = 12) -> DynamicsSpec:
    return DynamicsSpec(algorithm=Algorithm.SGD, steps=steps, batch_size=16, eval_every=3,
                        bd_convention=RateConvention.PER_STEP, bd_quench=2)


def test_network_trains_the_same_alone_or_packed() -> None:
    model = ModelSpec(unit=Unit.RELU, init=InitSpec(bias_std=0.3))
    dyn = _rich_dynamics()
    target = NetworkSpec(7, 10, seed=4, lr=0.05, temperature=1e-3, bd_rate=2.0, bd_scheme=Scheme.PRIOR)
    mates = [
        NetworkSpec(1, 10, seed=4, lr=0.1, bd_rate=3.0),  # same width and seed, other hyperparameters
        NetworkSpec(2, 3, seed=9, lr=0.2, parametrization=NTK, temperature=1e-2),
        NetworkSpec(3, 25, seed=1, lr=0.01, bd_rate=1.0, bd_scheme=Scheme.PRIOR),
        NetworkSpec(4, 10, seed=5, lr=0.05),
    ]
    alone = Pack(TEACHER, model, dyn, [target], data_seed=6, dtype=F64, device=DEVICE)
    packed = Pack(TEACHER, model, dyn, [*mates[:2], target, *mates[2:]], data_seed=6, dtype=F64, device=DEVICE)
    rep_alone, rep_packed = run_reports(alone), run_reports(packed)
    assert_reports_close(only(rep_packed, [7]), rep_alone)
    assert alone.retired[7].final_test_loss == pytest.approx(packed.retired[7].final_test_loss, rel=1e-12)


def test_network_trains_the_same_alone_or_packed_exact_energy() -> None:
    model = ModelSpec(unit=Unit.GAUSSIAN, gaussian_var=0.5, init=InitSpec(z="uniform"))
    dyn = DynamicsSpec(algorithm=Algorithm.GD, steps=10, eval_every=5, bd_convention=RateConvention.PER_STEP)
    target = NetworkSpec(0, 12, seed=2, lr=0.01, bd_rate=0.5)
    mates = [NetworkSpec(1, 12, seed=3, lr=0.02, bd_rate=0.5, bd_scheme=Scheme.PRIOR),
             NetworkSpec(2, 30, seed=2, lr=0.01, parametrization=NTK)]
    alone = Pack(MIXTURE, model, dyn, [target], dtype=F64, device=DEVICE)
    packed = Pack(MIXTURE, model, dyn, [*mates, target], dtype=F64, device=DEVICE)
    for _ in range(dyn.steps - 1):
        alone.step_once()
        packed.step_once()
    assert_particles_close(alone, packed, [0])
    assert alone.test_losses()[0] == pytest.approx(packed.test_losses()[0], rel=1e-12)


def test_diverging_network_is_retired_and_mates_unaffected() -> None:
    model = ModelSpec(unit=Unit.RELU, init=InitSpec(bias_std=0.3))
    dyn = DynamicsSpec(algorithm=Algorithm.SGD, steps=12, batch_size=16, eval_every=3)
    good = [NetworkSpec(1, 8, seed=1, lr=0.05), NetworkSpec(2, 20, seed=2, lr=0.05, parametrization=NTK)]
    bad = NetworkSpec(3, 8, seed=3, lr=1e6)  # same width as net 1: shares its (S, P, n) tensors
    with_bad = Pack(TEACHER, model, dyn, [good[0], bad, good[1]], data_seed=1, dtype=F64, device=DEVICE)
    without = Pack(TEACHER, model, dyn, good, data_seed=1, dtype=F64, device=DEVICE)

    reports = list(with_bad.train())
    retired = [r for rep in reports for r in rep.retired if r.net_id == 3]
    assert len(retired) == 1 and retired[0].status is NetStatus.DIVERGED
    assert retired[0].step < dyn.steps
    assert with_bad.retired[3].status is NetStatus.DIVERGED
    assert all(m.net_id != 3 for rep in reports if rep.step > retired[0].step for m in rep.metrics)
    # ReLU units killed by the huge step give a finite test loss: the blow-up shows in the train loss.
    last = [m for rep in reports for m in rep.metrics if m.net_id == 3][-1]
    worst = max(last.test_loss, last.train_loss or 0.0)
    assert not math.isfinite(worst) or worst > dyn.diverge_threshold

    got = [{m.net_id: (m.train_loss, m.test_loss) for m in rep.metrics} for rep in reports]
    assert_reports_close(only(got, [1, 2]), run_reports(without))
    for nid in (1, 2):
        assert with_bad.retired[nid].status is NetStatus.FINISHED
        assert with_bad.retired[nid].final_test_loss == pytest.approx(without.retired[nid].final_test_loss,
                                                                      rel=1e-12)


def test_retire_leaves_other_trajectories_unchanged() -> None:
    model = ModelSpec(unit=Unit.TANH)
    dyn = _rich_dynamics(steps=14)
    nets = [
        NetworkSpec(1, 6, seed=1, lr=0.05, temperature=1e-3, bd_rate=2.0),
        NetworkSpec(2, 6, seed=2, lr=0.07, bd_rate=2.0, bd_scheme=Scheme.PRIOR),  # retired mid-run
        NetworkSpec(3, 6, seed=3, lr=0.03, temperature=1e-3, bd_rate=1.0, bd_scheme=Scheme.PRIOR),
        NetworkSpec(4, 11, seed=4, lr=0.05, parametrization=NTK),
    ]
    full = Pack(TEACHER, model, dyn, nets, data_seed=3, dtype=F64, device=DEVICE)
    cut = Pack(TEACHER, model, dyn, nets, data_seed=3, dtype=F64, device=DEVICE)
    for _ in range(5):
        full.step_once()
        cut.step_once()
    cut.retire(2, NetStatus.PRUNED, "pruned by the search", 0.5)
    assert cut.running == [1, 3, 4] and cut.retired[2].status is NetStatus.PRUNED
    with pytest.raises(KeyError):
        cut.particles(2)
    rest_full, rest_cut = run_reports(full), run_reports(cut)
    # Reductions over a group's (P, S, n) view may round differently when S changes: PACK_RTOL, not bits.
    assert_reports_close(rest_cut, only(rest_full, [1, 3, 4]))
    assert cut.retired[2].step == 5 and cut.retired[2].final_test_loss == 0.5
    for nid in (1, 3, 4):
        assert full.retired[nid].final_test_loss == pytest.approx(cut.retired[nid].final_test_loss, rel=1e-12)

    # Retiring every network of a group removes the group; the others still match.
    a = Pack(TEACHER, model, dyn, nets, data_seed=3, dtype=F64, device=DEVICE)
    b = Pack(TEACHER, model, dyn, nets, data_seed=3, dtype=F64, device=DEVICE)
    for nid in (1, 2, 3):
        b.retire(nid, NetStatus.PRUNED, "test")
    assert len(b.groups) == 1
    for _ in range(4):
        a.step_once()
        b.step_once()
    assert_particles_close(a, b, [4], exact=True)  # its own group is untouched
    assert set(all_particles(b)) == {4}
