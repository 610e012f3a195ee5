"""The fused Triton kernels against autograd, the torch path and the per-network nn.Module loop.

Without a GPU they run under Triton's interpreter (TRITON_INTERPRET=1, set below before triton is first
imported); `MFSWEEP_TEST_DEVICE=cuda python -m pytest tests/workers/test_kernels.py` runs the same tests
compiled on a GPU. Shapes are tiny (the interpreter is slow) but hit the edges: widths that are not a multiple
of the block, several forward splits, d not a multiple of 16, one-network groups, vector outputs, every unit.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
import torch

from tests.workers.engine_ref import DEVICE, F64, activations, all_particles, ref_test_loss, train_reference

if DEVICE.type != "cuda":
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from workers.engine import (
    Algorithm,
    DynamicsSpec,
    InitSpec,
    InputDist,
    ModelSpec,
    NetStatus,
    NetworkSpec,
    Pack,
    Parametrization,
    Scheme,
    TaskKind,
    TaskSpec,
    Unit,
)
from workers.engine.kernels import fused

MF, NTK = Parametrization.MEAN_FIELD, Parametrization.NTK
STEPS = 6
RTOL, ATOL = 1e-9, 1e-12  # float64: kernel vs torch path vs loop differ only in the order of the sums

UNITS = [
    pytest.param(Unit.RELU, True, id="relu-bias"),
    pytest.param(Unit.RELU, False, id="relu-nobias"),
    pytest.param(Unit.TANH, True, id="tanh"),
    pytest.param(Unit.SIGMOID, True, id="sigmoid"),
    pytest.param(Unit.GAUSSIAN, False, id="gaussian"),
]


def _nets(**extra: object) -> list[NetworkSpec]:
    """Width 3 alone in its group; 20 (< one block) and 70 (> one 64-block, not a multiple) with both
    parametrizations and per-network learning rates."""
    plan = [(3, MF, 0.05), (20, MF, 0.04), (20, NTK, 0.06), (70, NTK, 0.05), (70, MF, 0.03)]
    return [NetworkSpec(100 + i, w, seed=7 + i, lr=lr, parametrization=p, **extra)  # type: ignore[arg-type]
            for i, (w, p, lr) in enumerate(plan)]


def _reports(pack: Pack) -> list[dict[int, tuple[float | None, float]]]:
    return [{m.net_id: (m.train_loss, m.test_loss) for m in rep.metrics} for rep in pack.train()]


def _close(a: float | None, b: float | None, rtol: float = RTOL) -> bool:
    return (a is None and b is None) or (a is not None and b is not None and math.isclose(a, b, rel_tol=rtol,
                                                                                          abs_tol=ATOL))


def _assert_reports(got: list[dict[int, tuple[float | None, float]]],
                    want: list[dict[int, tuple[float | None, float]]], rtol: float = RTOL) -> None:
    assert len(got) == len(want)
    for rg, rw in zip(got, want, strict=True):
        assert rg.keys() == rw.keys()
        for nid in rg:
            assert _close(rg[nid][0], rw[nid][0], rtol) and _close(rg[nid][1], rw[nid][1], rtol), (nid, rg, rw)


def _assert_same_particles(a: Pack, b: Pack, rtol: float = RTOL, atol: float = ATOL) -> None:
    assert a.running == b.running
    for nid in a.running:
        for ta, tb in zip(a.particles(nid), b.particles(nid), strict=True):
            assert (ta is None) == (tb is None)
            if ta is not None and tb is not None:
                torch.testing.assert_close(ta, tb, rtol=rtol, atol=atol)


def _pair(task: TaskSpec, model: ModelSpec, dyn: DynamicsSpec, nets: list[NetworkSpec],
          dtype: torch.dtype = F64, precision: str = "ieee") -> tuple[Pack, Pack]:
    tri = Pack(task, model, dyn, nets, data_seed=5, device=DEVICE, dtype=dtype, kernel="triton",
               precision=precision)
    ref = Pack(task, model, dyn, nets, data_seed=5, device=DEVICE, dtype=dtype, kernel="torch")
    assert tri.kernel == "triton" and ref.kernel == "torch"
    return tri, ref


def _teacher(dim: int = 5, out_dim: int = 1) -> TaskSpec:
    return TaskSpec(kind=TaskKind.TEACHER, dim=dim, seed=2, out_dim=out_dim, teacher_units=4,
                    inputs=InputDist.GAUSSIAN, n_train=40, n_test=48)


# ----------------------------------------------------------------------------- one step vs autograd
@pytest.mark.parametrize("k", [1, 3], ids=["k1", "k3"])
@pytest.mark.parametrize(("unit", "bias"), UNITS)
def test_step_equals_autograd(unit: Unit, bias: bool, k: int) -> None:
    """One fused step on random particles: loss, potential and updated particles vs autograd of
    L = 1/2 E|s sum_i c_i phi(x; z_i) - y|^2 with a per-network step (move / s) * grad."""
    gen = torch.Generator(device="cpu").manual_seed(3)
    s, n, d, p, var = 3, 37, 21, 29, 0.7

    def rnd(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, dtype=F64).to(DEVICE)

    z, c, x, y = rnd(s, n, d) * 0.4, rnd(s, n, k), rnd(p, d), rnd(p, k)
    b = rnd(s, n) * 0.3 if bias else None
    scale = torch.tensor([1 / n, n**-0.5, 0.3], dtype=F64, device=DEVICE)
    move = torch.tensor([0.05, 0.2, 0.01], dtype=F64, device=DEVICE)
    ops = fused.FusedOps(unit.value, bias, var, d, k, F64, "ieee", DEVICE)
    z1, c1 = z.clone(), c.clone()
    b1 = None if b is None else b.clone()
    loss, potential = ops.step(z1, b1, c1, scale, move, x, y)
    for r in range(s):
        params = [t[r].clone().requires_grad_(True) for t in (z, c)]
        bp = None if b is None else b[r].clone().requires_grad_(True)
        phi = activations(unit, var, x, params[0], bp)
        err = scale[r] * phi @ params[1] - y
        ref_loss = 0.5 * err.square().sum(1).mean()
        grads = torch.autograd.grad(ref_loss, [*params, *([bp] if bp is not None else [])])
        step = move[r] / scale[r]  # the raw learning rate eta
        torch.testing.assert_close(loss[r], ref_loss.detach(), rtol=RTOL, atol=ATOL)
        # V_i = c_i . E[(f_n - f) phi_i]
        v = (params[1].detach() * (phi.detach().T @ (err.detach() / p))).sum(1)
        torch.testing.assert_close(potential[r], v, rtol=RTOL, atol=ATOL)
        torch.testing.assert_close(z1[r], z[r] - step * grads[0], rtol=RTOL, atol=ATOL)
        torch.testing.assert_close(c1[r], c[r] - step * grads[1], rtol=RTOL, atol=ATOL)
        if b is not None and b1 is not None:
            torch.testing.assert_close(b1[r], b[r] - step * grads[2], rtol=RTOL, atol=ATOL)
    pred = ops.predict(z, b, c, scale, x)
    for r in range(s):
        want = scale[r] * activations(unit, var, x, z[r], None if b is None else b[r]) @ c[r]
        torch.testing.assert_close(pred[r], want, rtol=RTOL, atol=ATOL)


# ----------------------------------------------------------------------------- packs vs torch and loop
@pytest.mark.parametrize("algorithm", [Algorithm.SGD, Algorithm.GD], ids=["sgd", "gd"])
@pytest.mark.parametrize(("unit", "bias"), UNITS)
def test_pack_equals_torch_path_and_loop(unit: Unit, bias: bool, algorithm: Algorithm) -> None:
    task = _teacher()
    model = ModelSpec(unit=unit, bias=bias, gaussian_var=0.8, init=InitSpec(bias_std=0.5))
    dyn = DynamicsSpec(algorithm=algorithm, steps=STEPS, batch_size=16, eval_every=3)
    nets = _nets()
    tri, ref = _pair(task, model, dyn, nets)
    init = all_particles(tri)
    got, want = _reports(tri), _reports(ref)
    _assert_reports(got, want)
    # The loop oracle (nn.Module + torch.optim.SGD) for the one-network group and a two-block network.
    for sp in (nets[0], nets[3]):
        net, losses = train_reference(task, model, dyn, sp, init[sp.net_id], STEPS, 5)
        assert got[-1][sp.net_id][1] == pytest.approx(ref_test_loss(task, net), rel=RTOL, abs=ATOL)
        assert got[-1][sp.net_id][0] == pytest.approx(sum(losses[3:]) / 3, rel=RTOL, abs=ATOL)
    assert tri.kernel == "triton"


@pytest.mark.parametrize("finite_set", [False, True], ids=["online", "finite-set"])
def test_vector_output_wide_input(finite_set: bool) -> None:
    """k = 3 outputs, d = 21 (a 32-wide input tile, 11 padded columns); particles after training too."""
    task = _teacher(dim=21, out_dim=3)
    model = ModelSpec(unit=Unit.TANH, init=InitSpec(bias_std=0.2))
    dyn = DynamicsSpec(algorithm=Algorithm.SGD, finite_set=finite_set, steps=STEPS, batch_size=12, eval_every=3)
    nets = _nets()[1:4]
    tri, ref = _pair(task, model, dyn, nets)
    init = all_particles(tri)
    for _ in range(STEPS):
        tri.step_once()
        ref.step_once()
    _assert_same_particles(tri, ref)
    sp = nets[2]
    net, _ = train_reference(task, model, dyn, sp, init[sp.net_id], STEPS, 5)
    z, b, c = tri.particles(sp.net_id)
    torch.testing.assert_close(z, net.z.detach(), rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(c, net.c.detach(), rtol=RTOL, atol=ATOL)
    assert net.b is not None and b is not None
    torch.testing.assert_close(b, net.b.detach(), rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("out_dim", [1, 2])
def test_small_tiles_and_forward_splits(monkeypatch: pytest.MonkeyPatch, out_dim: int) -> None:
    """16-wide tiles and three forward splits: many partial tiles, an empty split for the narrow group."""
    monkeypatch.setattr(fused, "choose_tiles", lambda *a: fused.Tiles(16, 16, 16, 16, splits=3))
    task = _teacher(dim=6, out_dim=out_dim)
    model = ModelSpec(unit=Unit.SIGMOID, init=InitSpec(bias_std=0.3))
    dyn = DynamicsSpec(algorithm=Algorithm.SGD, steps=3, batch_size=24, eval_every=3)
    nets = [NetworkSpec(1, 37, seed=1, lr=0.1), NetworkSpec(2, 37, seed=2, lr=0.1, parametrization=NTK),
            NetworkSpec(3, 5, seed=3, lr=0.2)]
    tri, ref = _pair(task, model, dyn, nets)
    _assert_reports(_reports(tri), _reports(ref))


def test_retire_mid_run_and_birth_death() -> None:
    """Birth-death (both schemes, Langevin noise on one network) driven by the kernels' potentials, and a
    network retired between reports: the same events, losses and particles as the torch path."""
    task = _teacher()
    model = ModelSpec(unit=Unit.RELU, init=InitSpec(bias_std=0.5))
    dyn = DynamicsSpec(algorithm=Algorithm.SGD, steps=8, batch_size=16, eval_every=2, bd_every=2)
    nets = [NetworkSpec(1, 20, seed=1, lr=0.1, bd_rate=40.0),
            NetworkSpec(2, 20, seed=2, lr=0.1, bd_rate=40.0, bd_scheme=Scheme.PRIOR),
            NetworkSpec(3, 20, seed=3, lr=0.1, temperature=1e-4),
            NetworkSpec(4, 70, seed=4, lr=0.1, bd_rate=40.0, parametrization=NTK)]
    tri, ref = _pair(task, model, dyn, nets)
    runs = []
    for pack in (tri, ref):
        out = []
        for rep in pack.train():
            out.append(({m.net_id: m.test_loss for m in rep.metrics}, dict(rep.bd_events)))
            if rep.step == 4:
                pack.retire(3, NetStatus.PRUNED, "retired by the test")
        runs.append(out)
    assert len(runs[0]) == len(runs[1])
    for (lt, bt), (lr, br) in zip(*runs, strict=True):
        assert bt == br
        assert lt.keys() == lr.keys()
        for nid in lt:
            assert lt[nid] == pytest.approx(lr[nid], rel=RTOL, abs=ATOL)
    moved = sum(k + c for _, bd in runs[0] for k, c in bd.values())
    assert moved > 0, "birth-death moved nothing: the comparison would be empty"
    assert 3 in tri.retired and tri.retired[3].step == 4


def test_checkpoint_resume_with_kernels(tmp_path: Path) -> None:
    path = tmp_path / "pack.pt"
    task = _teacher()
    model = ModelSpec(unit=Unit.GAUSSIAN, gaussian_var=0.6)
    dyn = DynamicsSpec(algorithm=Algorithm.SGD, steps=4, batch_size=16, eval_every=2)
    nets = _nets()[:3]
    whole = Pack(task, model, dyn, nets, data_seed=5, device=DEVICE, dtype=F64, kernel="triton")
    want = _reports(whole)
    part = Pack(task, model, dyn, nets, data_seed=5, device=DEVICE, dtype=F64, kernel="triton")
    it = part.train()
    got = [next(it), next(it)]
    part.save(path)
    resumed = Pack.load(path, device=DEVICE, kernel="triton")
    assert resumed.kernel == "triton"
    rest = [{m.net_id: (m.train_loss, m.test_loss) for m in r.metrics} for r in resumed.train()]
    first = [{m.net_id: (m.train_loss, m.test_loss) for m in r.metrics} for r in got]
    _assert_reports(first + rest, want, rtol=0.0 if DEVICE.type == "cpu" else RTOL)


# ----------------------------------------------------------------------------- float32, tf32
@pytest.mark.parametrize("precision", ["ieee", "tf32"])
def test_float32_close_to_torch_path(precision: str) -> None:
    """float32: the kernels' losses stay within 1e-5 (ieee) of the torch path's; tf32 (a GPU-only mode: the
    interpreter computes exact dots) within 1e-2."""
    task = _teacher()
    model = ModelSpec(unit=Unit.RELU, init=InitSpec(bias_std=0.5))
    dyn = DynamicsSpec(algorithm=Algorithm.SGD, steps=STEPS, batch_size=16, eval_every=3)
    tri, ref = _pair(task, model, dyn, _nets()[1:4], dtype=torch.float32, precision=precision)
    _assert_reports(_reports(tri), _reports(ref), rtol=1e-5 if precision == "ieee" else 1e-2)


# ----------------------------------------------------------------------------- selection
def test_selection_and_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    task, model, dyn = _teacher(), ModelSpec(), DynamicsSpec(steps=2, batch_size=8)
    nets = [NetworkSpec(0, 4, seed=0)]
    cpu = torch.device("cpu")
    assert Pack(task, model, dyn, nets, device=cpu, kernel="auto").kernel == "torch"  # auto: CUDA only
    with pytest.raises(ValueError, match=r"execution\.kernel must be one of auto, torch, triton"):
        Pack(task, model, dyn, nets, kernel="cuda")
    with pytest.raises(ValueError, match=r"execution\.precision must be one of ieee, tf32"):
        Pack(task, model, dyn, nets, precision="fp16")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match=r"needs a CUDA device.*set execution\.kernel=auto or torch"):
        Pack(task, model, dyn, nets, device=cpu, kernel="triton")


def test_wide_input_falls_back_with_a_notice() -> None:
    task = TaskSpec(kind=TaskKind.TEACHER, dim=300, n_test=16)
    dyn = DynamicsSpec(steps=1, batch_size=4)
    with pytest.warns(RuntimeWarning, match=r"d <= 256.*torch path"):
        pack = Pack(task, ModelSpec(), dyn, [NetworkSpec(0, 4, seed=0)], device=DEVICE, kernel="triton")
    assert pack.kernel == "torch"
