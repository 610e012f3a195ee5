"""Hand-derived gradients against autograd; closed-form energies against Monte Carlo and quadrature.

- ``Pack._sampled_step``: from one state and one batch, the loss, the per-particle potential
  V_i = c_i . E[(f_n - f) phi_i] and the parameter update -eta * grad L (eta = n dt mean-field, dt ntk)
  equal what autograd gives for the plain loss 0.5 E|f_n - y|^2.
- The exact-energy path (Gaussian units, Gaussian-mixture target, gd): the reported loss equals
  0.5 E|f_n - f|^2 by Monte Carlo (Gaussian measure, within 3 standard errors) and by quadrature (Lebesgue
  measure, 1-D and 2-D grids); the exact step's update and potential equal quadrature gradients.
- ``gaussian_overlap`` against quadrature for both measures.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import integrate

from tests.workers.engine_ref import F64, activations, all_particles, cached_task, out_scale, raw_lr, ref_loss
from workers.engine import (
    Algorithm,
    Component,
    DataStream,
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
    gaussian_overlap,
)

MF, NTK = Parametrization.MEAN_FIELD, Parametrization.NTK


# ----------------------------------------------------------------------------- sampled step vs autograd
@pytest.mark.parametrize("par", [MF, NTK], ids=["mf", "ntk"])
@pytest.mark.parametrize(
    ("unit", "bias"),
    [(Unit.RELU, True), (Unit.RELU, False), (Unit.TANH, True), (Unit.SIGMOID, False), (Unit.GAUSSIAN, False)],
    ids=["relu-bias", "relu-nobias", "tanh", "sigmoid-nobias", "gaussian"],
)
def test_sampled_step_matches_autograd(unit: Unit, bias: bool, par: Parametrization) -> None:
    task = TaskSpec(kind=TaskKind.TEACHER, dim=4, seed=3, out_dim=2, teacher_units=3,
                    inputs=InputDist.GAUSSIAN)
    model = ModelSpec(unit=unit, bias=bias, gaussian_var=0.7, init=InitSpec(bias_std=0.4, c_mean=0.3))
    dyn = DynamicsSpec(algorithm=Algorithm.SGD, steps=10, batch_size=24)
    nets = [
        NetworkSpec(1, 5, seed=0, lr=0.07, parametrization=par),
        NetworkSpec(2, 5, seed=1, lr=0.03, parametrization=par),
        NetworkSpec(3, 11, seed=2, lr=0.05, parametrization=par),
    ]
    pack = Pack(task, model, dyn, nets, data_seed=9, dtype=F64)
    pack.step_once()  # leave the initial state so that the check is generic
    stream = DataStream(cached_task(task), dyn, 9, exact=False)
    stream.next()
    batch = stream.next()
    assert batch is not None
    x, y = batch

    before = all_particles(pack)
    expected = {}
    for sp in nets:
        z, b, c = (None if t is None else t.clone().requires_grad_(True) for t in before[sp.net_id])
        assert z is not None and c is not None
        out = out_scale(sp) * activations(unit, model.gaussian_var, x, z, b) @ c
        loss = ref_loss(out, y)
        params = [p for p in (z, b, c) if p is not None]
        grads = dict(zip(("z", "b", "c") if b is not None else ("z", "c"),
                         torch.autograd.grad(loss, params), strict=True))
        # V_i = c_i . dL/dc_i / s: the first variation of the loss at particle i.
        pot = (c.detach() * grads["c"]).sum(-1) / out_scale(sp)
        expected[sp.net_id] = (float(loss), pot, grads)

    for g in pack.groups:
        losses, potentials = pack._sampled_step(g, x, y)
        for r, nid in enumerate(g.ids):
            loss, pot, _ = expected[nid]
            assert float(losses[r]) == pytest.approx(loss, rel=1e-12)
            torch.testing.assert_close(potentials[r], pot, rtol=1e-9, atol=1e-14)

    for sp in nets:
        after = pack.particles(sp.net_id)
        eta = raw_lr(sp)
        grads = expected[sp.net_id][2]
        for name, t0, t1 in zip(("z", "b", "c"), before[sp.net_id], after, strict=True):
            if t0 is None:
                assert t1 is None and name not in grads
                continue
            assert t1 is not None
            torch.testing.assert_close(t1 - t0, -eta * grads[name], rtol=1e-9, atol=1e-14)
            assert float(grads[name].abs().max()) > 1e-6  # a real update, not 0 == 0


# ----------------------------------------------------------------------------- exact energies
def _trained_exact_pack(task: TaskSpec, model: ModelSpec, widths: tuple[int, ...], steps: int = 5) -> Pack:
    nets = [NetworkSpec(10 * i + j, w, seed=i, lr=0.05, parametrization=par)
            for i, w in enumerate(widths) for j, par in enumerate((MF, NTK))]
    dyn = DynamicsSpec(algorithm=Algorithm.GD, steps=100)
    pack = Pack(task, model, dyn, nets, dtype=F64)
    assert pack.exact
    for _ in range(steps):  # move off the initial law
        pack.step_once()
    return pack


def test_exact_energy_gaussian_measure_vs_monte_carlo() -> None:
    comps = (Component(0.8, (-1.0, 0.5), 0.4), Component(-0.5, (1.0, 0.0), 0.9),
             Component(0.3, (0.0, 1.5), 0.3))
    task = TaskSpec(kind=TaskKind.GAUSSIAN_MIXTURE, dim=2, components=comps, measure=Measure.GAUSSIAN,
                    measure_std=1.5)
    model = ModelSpec(unit=Unit.GAUSSIAN, gaussian_var=0.35, init=InitSpec(c_mean=0.5))
    pack = _trained_exact_pack(task, model, (4, 15))
    energy = pack.test_losses()

    gen = torch.Generator().manual_seed(1234)
    n_mc = 400_000
    x = task.measure_std * torch.randn(n_mc, 2, generator=gen, dtype=F64)
    target = cached_task(task).target(x)
    for nid, pred in pack.predict(x).items():
        vals = 0.5 * (pred - target).pow(2).sum(1)
        mean, se = float(vals.mean()), float(vals.std()) / math.sqrt(n_mc)
        assert se < 0.01 * mean  # the check is sharp enough to see a wrong term
        assert abs(energy[nid] - mean) < 3 * se, (nid, energy[nid], mean, se)


def _grid_energy(pack: Pack, task: TaskSpec, grid: torch.Tensor, weights: torch.Tensor) -> dict[int, float]:
    target = cached_task(task).target(grid)
    return {nid: float((0.5 * (pred - target).pow(2).sum(1) * weights).sum())
            for nid, pred in pack.predict(grid).items()}


def test_exact_energy_lebesgue_1d_vs_quadrature() -> None:
    task = TaskSpec(kind=TaskKind.GAUSSIAN_MIXTURE, dim=1)  # the example target of docs/science.md
    model = ModelSpec(unit=Unit.GAUSSIAN, gaussian_var=0.5)
    pack = _trained_exact_pack(task, model, (7, 30))
    x = torch.linspace(-25.0, 25.0, 50_001, dtype=F64)
    w = torch.full_like(x, float(x[1] - x[0]))
    w[0] = w[-1] = w[0] / 2  # trapezoid
    quad = _grid_energy(pack, task, x.unsqueeze(1), w)
    for nid, e in pack.test_losses().items():
        assert e == pytest.approx(quad[nid], rel=1e-10), nid


def test_exact_energy_lebesgue_2d_vs_quadrature() -> None:
    comps = (Component(1.0, (-1.0, 0.0), 0.5), Component(-0.7, (0.5, 1.0), 1.2))
    task = TaskSpec(kind=TaskKind.GAUSSIAN_MIXTURE, dim=2, components=comps)
    model = ModelSpec(unit=Unit.GAUSSIAN, gaussian_var=0.3)
    pack = _trained_exact_pack(task, model, (3, 9))
    t = torch.linspace(-12.0, 12.0, 481, dtype=F64)
    h = float(t[1] - t[0])
    gx, gy = torch.meshgrid(t, t, indexing="ij")
    grid = torch.stack([gx.reshape(-1), gy.reshape(-1)], 1)
    quad = _grid_energy(pack, task, grid, torch.full((grid.shape[0],), h * h, dtype=F64))
    for nid, e in pack.test_losses().items():
        assert e == pytest.approx(quad[nid], rel=1e-9), nid


def _quadrature_grid(task: TaskSpec, lim: float, points: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Trapezoid nodes (G, d) and weights (G,) times the density of the task's input measure."""
    t = torch.linspace(-lim, lim, points, dtype=F64)
    h = float(t[1] - t[0])
    w1 = torch.full_like(t, h)
    w1[0] = w1[-1] = h / 2
    if task.dim == 1:
        x, w = t.unsqueeze(1), w1
    else:
        gx, gy = torch.meshgrid(t, t, indexing="ij")
        x = torch.stack([gx.reshape(-1), gy.reshape(-1)], 1)
        w = (w1[:, None] * w1[None, :]).reshape(-1)
    if task.measure is Measure.GAUSSIAN:
        var = task.measure_std**2
        w = w * torch.exp(-0.5 * x.pow(2).sum(1) / var) / (2 * math.pi * var) ** (task.dim / 2)
    return x, w


EXACT_CASES = [
    pytest.param(TaskSpec(kind=TaskKind.GAUSSIAN_MIXTURE, dim=1), 25.0, 50_001, id="lebesgue-1d"),
    pytest.param(TaskSpec(kind=TaskKind.GAUSSIAN_MIXTURE, dim=1, measure=Measure.GAUSSIAN, measure_std=1.5),
                 25.0, 50_001, id="gaussian-1d"),
    pytest.param(TaskSpec(kind=TaskKind.GAUSSIAN_MIXTURE, dim=2, measure=Measure.GAUSSIAN, measure_std=1.2,
                          components=(Component(1.0, (-1.0, 0.5), 0.5), Component(-0.6, (0.8, -0.3), 1.1))),
                 12.0, 481, id="gaussian-2d"),
    pytest.param(TaskSpec(kind=TaskKind.GAUSSIAN_MIXTURE, dim=2,
                          components=(Component(0.7, (0.0, 1.0), 0.4), Component(0.4, (1.5, 0.0), 0.8))),
                 12.0, 481, id="lebesgue-2d"),
]


@pytest.mark.parametrize(("task", "lim", "points"), EXACT_CASES)
def test_exact_step_matches_quadrature_gradient(task: TaskSpec, lim: float, points: int) -> None:
    """The exact path's energy, update (-eta dE/dtheta) and potential (c_i int (f_n - f) phi_i dnu) equal
    quadrature on a grid, for both measures, in 1-D and 2-D, mean-field and ntk."""
    model = ModelSpec(unit=Unit.GAUSSIAN, gaussian_var=0.5, init=InitSpec(c_mean=0.3))
    pack = _trained_exact_pack(task, model, (6, 13), steps=3)
    var = model.gaussian_var
    x, w = _quadrature_grid(task, lim, points)
    target = cached_task(task).target(x)  # (G, 1)
    before = all_particles(pack)
    want = {}
    for sp in pack.networks:
        z, _, c = before[sp.net_id]
        s = out_scale(sp)
        phi = activations(Unit.GAUSSIAN, var, x, z, None)  # (G, n)
        resid = (s * phi @ c - target)[:, 0]  # f_n - f
        proj = (resid * w) @ phi  # int (f_n - f) phi_i dnu, (n,)
        grad_c = s * proj.unsqueeze(1)
        grad_z = s * c[:, 0:1] * (((resid * w).unsqueeze(1) * phi).T @ x - z * proj.unsqueeze(1)) / var
        energy = float(0.5 * (resid.pow(2) * w).sum())
        want[sp.net_id] = (energy, c[:, 0] * proj, grad_z, grad_c)
    for nid, e in pack.test_losses().items():  # the reported loss (a separate closed form)
        assert e == pytest.approx(want[nid][0], rel=1e-9), nid
    for g in pack.groups:
        energies, potentials = pack._exact_step(g)
        for r, nid in enumerate(g.ids):
            energy, pot, _, _ = want[nid]
            assert float(energies[r]) == pytest.approx(energy, rel=1e-9)
            torch.testing.assert_close(potentials[r], pot, rtol=1e-8, atol=1e-13)
    for sp in pack.networks:
        z0, _, c0 = before[sp.net_id]
        z1, _, c1 = pack.particles(sp.net_id)
        _, _, grad_z, grad_c = want[sp.net_id]
        assert float(grad_z.abs().max()) > 1e-4 and float(grad_c.abs().max()) > 1e-4
        torch.testing.assert_close(z1 - z0, -raw_lr(sp) * grad_z, rtol=1e-8, atol=1e-13)
        torch.testing.assert_close(c1 - c0, -raw_lr(sp) * grad_c, rtol=1e-8, atol=1e-13)


@pytest.mark.parametrize("measure", [Measure.LEBESGUE, Measure.GAUSSIAN])
def test_exact_step_matches_autograd_of_closed_form(measure: Measure) -> None:
    """The hand-derived exact gradients against autograd of the closed-form energy (3-D, several widths)."""
    comps = (Component(0.9, (-1.0, 0.0, 0.5), 0.6), Component(-0.4, (0.5, 1.0, -0.5), 1.3))
    task = TaskSpec(kind=TaskKind.GAUSSIAN_MIXTURE, dim=3, components=comps, measure=measure, measure_std=1.1)
    model = ModelSpec(unit=Unit.GAUSSIAN, gaussian_var=0.4, init=InitSpec(c_mean=0.4))
    pack = _trained_exact_pack(task, model, (5, 9), steps=2)
    tsk = cached_task(task)
    before = all_particles(pack)
    want = {}
    for sp in pack.networks:
        z, _, c = (t.clone().requires_grad_(True) if t is not None else None for t in before[sp.net_id])
        assert z is not None and c is not None
        s = out_scale(sp)
        f_terms, kern, c_f = tsk.energy_terms(z.unsqueeze(0), model.gaussian_var)
        c1 = c[:, 0]
        energy = c_f - s * (c1 * f_terms[0]).sum() + 0.5 * s * s * (c1 @ kern[0] @ c1)
        gz, gc = torch.autograd.grad(energy, [z, c])
        want[sp.net_id] = (float(energy), gz, gc)
    for g in pack.groups:
        energies, _ = pack._exact_step(g)
        for r, nid in enumerate(g.ids):
            assert float(energies[r]) == pytest.approx(want[nid][0], rel=1e-12)
    for sp in pack.networks:
        z0, _, c0 = before[sp.net_id]
        z1, _, c1 = pack.particles(sp.net_id)
        _, gz, gc = want[sp.net_id]
        torch.testing.assert_close(z1 - z0, -raw_lr(sp) * gz, rtol=1e-9, atol=1e-14)
        torch.testing.assert_close(c1 - c0, -raw_lr(sp) * gc, rtol=1e-9, atol=1e-14)


# ----------------------------------------------------------------------------- gaussian_overlap
def _normal_pdf(x: float, m: float, v: float) -> float:
    return math.exp(-0.5 * (x - m) ** 2 / v) / math.sqrt(2 * math.pi * v)


@pytest.mark.parametrize("measure", [Measure.LEBESGUE, Measure.GAUSSIAN])
def test_gaussian_overlap_1d_vs_scipy_quad(measure: Measure) -> None:
    a = torch.tensor([[-1.3], [0.0], [2.2]], dtype=F64)
    b = torch.tensor([[0.4], [-2.5]], dtype=F64)
    va, vb, t = 0.5, 1.7, 2.5
    got = gaussian_overlap(a, va, b, vb, measure, t)
    assert got.shape == (3, 2)
    for i in range(3):
        for j in range(2):
            def integrand(x: float, i: int = i, j: int = j) -> float:
                nu = _normal_pdf(x, 0.0, t) if measure is Measure.GAUSSIAN else 1.0
                return _normal_pdf(x, float(a[i, 0]), va) * _normal_pdf(x, float(b[j, 0]), vb) * nu
            want, _ = integrate.quad(integrand, -np.inf, np.inf, epsabs=1e-14, epsrel=1e-12)
            assert float(got[i, j]) == pytest.approx(want, rel=1e-9, abs=1e-15), (i, j)


@pytest.mark.parametrize("measure", [Measure.LEBESGUE, Measure.GAUSSIAN])
def test_gaussian_overlap_2d_batched_vs_grid(measure: Measure) -> None:
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(2, 3, 2, generator=gen, dtype=F64)  # (batch, n, d)
    b = 1.5 * torch.randn(2, 4, 2, generator=gen, dtype=F64)  # (batch, m, d)
    va, vb, t = 0.4, 0.9, 1.3
    got = gaussian_overlap(a, va, b, vb, measure, t)
    assert got.shape == (2, 3, 4)
    s = torch.linspace(-12.0, 12.0, 601, dtype=F64)
    h = float(s[1] - s[0])
    gx, gy = torch.meshgrid(s, s, indexing="ij")
    grid = torch.stack([gx.reshape(-1), gy.reshape(-1)], 1)  # (G, 2)
    nu = (torch.exp(-0.5 * grid.pow(2).sum(1) / t) / (2 * math.pi * t)
          if measure is Measure.GAUSSIAN else torch.ones(grid.shape[0], dtype=F64))
    for k in range(2):
        pa = activations(Unit.GAUSSIAN, va, grid, a[k], None)  # (G, n)
        pb = activations(Unit.GAUSSIAN, vb, grid, b[k], None)  # (G, m)
        want = (pa * nu.unsqueeze(1)).T @ pb * h * h
        torch.testing.assert_close(got[k], want, rtol=1e-9, atol=1e-15)


# ----------------------------------------------------------------------------- Langevin noise
@pytest.mark.parametrize("par", [MF, NTK], ids=["mf", "ntk"])
def test_langevin_noise_is_gaussian_with_variance_2_dt_T(par: Parametrization) -> None:
    """One step at temperature T minus the same step at T = 0 (same seed) is N(0, 2 dt T) per coordinate."""
    task = TaskSpec(kind=TaskKind.TEACHER, dim=3, seed=0, teacher_units=2)
    model = ModelSpec(unit=Unit.RELU, init=InitSpec(bias_std=0.5))
    dyn = DynamicsSpec(algorithm=Algorithm.SGD, steps=5, batch_size=32)
    dt, temp, n = 0.03, 0.7, 3000
    hot = Pack(task, model, dyn, [NetworkSpec(0, n, seed=5, lr=dt, temperature=temp, parametrization=par)],
               dtype=F64)
    cold = Pack(task, model, dyn, [NetworkSpec(0, n, seed=5, lr=dt, parametrization=par)], dtype=F64)
    hot.step_once()
    cold.step_once()
    noise = torch.cat([(a - b).reshape(-1) for a, b in zip(hot.particles(0), cold.particles(0), strict=True)
                       if a is not None and b is not None])
    assert noise.numel() == n * (3 + 1 + 1)  # z, b and c all get noise
    var = 2 * dt * temp
    m = noise.numel()
    assert abs(float(noise.mean())) < 4 * math.sqrt(var / m)
    # Sample variance: standard error sqrt(2 / m) relative for a Gaussian.
    assert float(noise.var()) / var == pytest.approx(1.0, abs=4 * math.sqrt(2 / m))
    # Gaussian shape: the fourth moment is 3 var^2 (relative standard error sqrt(96 / m)).
    assert float(noise.pow(4).mean()) / (3 * var * var) == pytest.approx(1.0, abs=4 * math.sqrt(96 / 9 / m))
