"""The packed engine against a plain per-network PyTorch loop (nn.Module + torch.optim.SGD).

Every network of a pack (several widths, seeds, learning rates and both parametrizations in ONE pack) is
re-trained alone from the pack's initial particles, on an independent copy of the pack's data stream, and
must reach the same test loss, the same per-report train loss and the same particles (float64, rtol 1e-8).
"""

from __future__ import annotations

import pytest
import torch

from tests.workers.engine_ref import DEVICE, F64, all_particles, ref_test_loss, train_reference
from workers.engine import (
    Algorithm,
    DynamicsSpec,
    InitSpec,
    InputDist,
    Measure,
    ModelSpec,
    NetworkSpec,
    Pack,
    Parametrization,
    TaskKind,
    TaskSpec,
    Unit,
)

MF, NTK = Parametrization.MEAN_FIELD, Parametrization.NTK
STEPS = 12
RTOL, ATOL = 1e-8, 1e-12


def _networks(widths: tuple[int, ...], lr_mf: float, lr_ntk: float) -> list[NetworkSpec]:
    nets = []
    for i, (w, seed, par) in enumerate(
        [(w, s, p) for w in widths for s in (3, 11) for p in (MF, NTK)]
    ):
        lr = (lr_mf if par is MF else lr_ntk) * (1.0 + 0.25 * (i % 3))  # per-network hyperparameters
        nets.append(NetworkSpec(net_id=100 + i, width=w, seed=seed, lr=lr, parametrization=par))
    return nets


def _check_against_loop(task: TaskSpec, model: ModelSpec, dyn: DynamicsSpec, nets: list[NetworkSpec],
                        data_seed: int = 5) -> None:
    pack = Pack(task, model, dyn, nets, data_seed=data_seed, dtype=F64, device=DEVICE)
    init = all_particles(pack)
    reports = []
    for rep in pack.train():
        reports.append({m.net_id: m for m in rep.metrics})
    assert pack.done and reports[-1][nets[0].net_id].step == STEPS
    final = reports[-1]
    moved = 0.0
    for sp in nets:
        net, losses = train_reference(task, model, dyn, sp, init[sp.net_id], STEPS, data_seed)
        # Test loss after training (the engine's held-out loss vs the loop's).
        assert final[sp.net_id].test_loss == pytest.approx(ref_test_loss(task, net), rel=RTOL, abs=ATOL)
        # Train loss of the report = mean batch loss of the steps since the previous report.
        for rep in reports[1:]:
            m = rep[sp.net_id]
            prev = m.step - (m.step - 1) % dyn.eval_every - 1
            want = sum(losses[prev : m.step]) / (m.step - prev)
            assert m.train_loss == pytest.approx(want, rel=RTOL, abs=ATOL), (sp, m.step)
        moved = max(moved, float((net.z.detach() - init[sp.net_id][0]).abs().max()))
    # The particles must have moved, or the comparison would be empty.
    assert moved > 1e-5


def _final_particles_equal(task: TaskSpec, model: ModelSpec, dyn: DynamicsSpec, nets: list[NetworkSpec],
                           data_seed: int = 5) -> None:
    pack = Pack(task, model, dyn, nets, data_seed=data_seed, dtype=F64, device=DEVICE)
    init = all_particles(pack)
    for _ in range(STEPS):
        pack.step_once()
    for sp in nets:
        net, _ = train_reference(task, model, dyn, sp, init[sp.net_id], STEPS, data_seed)
        z, b, c = pack.particles(sp.net_id)
        torch.testing.assert_close(z, net.z.detach(), rtol=RTOL, atol=ATOL)
        torch.testing.assert_close(c, net.c.detach(), rtol=RTOL, atol=ATOL)
        if net.b is None:
            assert b is None
        else:
            assert b is not None
            torch.testing.assert_close(b, net.b.detach(), rtol=RTOL, atol=ATOL)


UNITS = [
    pytest.param(Unit.RELU, True, id="relu-bias"),
    pytest.param(Unit.RELU, False, id="relu-nobias"),
    pytest.param(Unit.TANH, True, id="tanh"),
    pytest.param(Unit.SIGMOID, True, id="sigmoid"),
    pytest.param(Unit.GAUSSIAN, False, id="gaussian"),
]


@pytest.mark.parametrize("algorithm", [Algorithm.SGD, Algorithm.GD], ids=["sgd", "gd"])
@pytest.mark.parametrize(("unit", "bias"), UNITS)
def test_packed_equals_per_network_loop(unit: Unit, bias: bool, algorithm: Algorithm) -> None:
    task = TaskSpec(kind=TaskKind.TEACHER, dim=5, seed=2, teacher_units=4, inputs=InputDist.GAUSSIAN,
                    n_train=96, n_test=128)
    model = ModelSpec(unit=unit, bias=bias, gaussian_var=0.8, init=InitSpec(bias_std=0.5))
    dyn = DynamicsSpec(algorithm=algorithm, steps=STEPS, batch_size=16, eval_every=5)
    nets = _networks((3, 8, 20), lr_mf=0.05, lr_ntk=0.05)
    _check_against_loop(task, model, dyn, nets)


@pytest.mark.parametrize(("unit", "bias"), UNITS)
def test_packed_particles_equal_loop(unit: Unit, bias: bool) -> None:
    """Stronger than losses: every parameter after training equals the loop's (sgd, both scalings)."""
    task = TaskSpec(kind=TaskKind.TEACHER, dim=4, seed=7, teacher_units=3, n_train=64, n_test=64)
    model = ModelSpec(unit=unit, bias=bias, gaussian_var=0.3, init=InitSpec(bias_std=0.3))
    dyn = DynamicsSpec(algorithm=Algorithm.SGD, steps=STEPS, batch_size=8)
    _final_particles_equal(task, model, dyn, _networks((2, 9), lr_mf=0.1, lr_ntk=0.1))


@pytest.mark.parametrize("algorithm", [Algorithm.SGD, Algorithm.GD], ids=["sgd", "gd"])
def test_vector_output_teacher(algorithm: Algorithm) -> None:
    task = TaskSpec(kind=TaskKind.TEACHER, dim=6, seed=1, out_dim=3, teacher_units=5, n_train=80, n_test=100)
    model = ModelSpec(unit=Unit.RELU, init=InitSpec(bias_std=0.2))
    dyn = DynamicsSpec(algorithm=algorithm, steps=STEPS, batch_size=12, eval_every=4)
    nets = _networks((4, 10), lr_mf=0.1, lr_ntk=0.1)
    _check_against_loop(task, model, dyn, nets)
    _final_particles_equal(task, model, dyn, nets)


def test_vector_output_digits_finite_set_sgd() -> None:
    task = TaskSpec(kind=TaskKind.DIGITS, seed=4)
    model = ModelSpec(unit=Unit.TANH, init=InitSpec(bias_std=0.1))
    dyn = DynamicsSpec(algorithm=Algorithm.SGD, finite_set=True, steps=STEPS, batch_size=24, eval_every=6)
    nets = [
        NetworkSpec(1, 6, seed=0, lr=0.2),
        NetworkSpec(2, 6, seed=1, lr=0.1, parametrization=NTK),
        NetworkSpec(3, 15, seed=2, lr=0.3),
    ]
    _check_against_loop(task, model, dyn, nets)


def test_gaussian_units_on_sampled_gaussian_mixture() -> None:
    """SGD on the Gaussian-measure mixture task: sampled steps, particles vs the loop."""
    task = TaskSpec(kind=TaskKind.GAUSSIAN_MIXTURE, dim=1, measure=Measure.GAUSSIAN, measure_std=2.0)
    model = ModelSpec(unit=Unit.GAUSSIAN, gaussian_var=0.5, init=InitSpec(z="uniform", low=-2, high=2))
    dyn = DynamicsSpec(algorithm=Algorithm.SGD, steps=STEPS, batch_size=32)
    _final_particles_equal(task, model, dyn, _networks((5, 12), lr_mf=0.5, lr_ntk=0.5))
