"""The authors' student-teacher notebook and mfsweep's mean-field form are the same dynamics (docs/results.md,
experiment 2), so the page's claim rests on an executable equivalence.

The notebook trains f = sum_i a_i relu(w_i . x) (two ``nn.Linear`` layers without bias, no 1/n) with
``MSELoss`` = mean (f - y)^2 and ``torch.optim.SGD(lr=0.02)``, and sets birth-death rates
rate_i = alpha a_i dL/da_i. With z_i = sqrt(n) w_i and c_i = sqrt(n) a_i the same function is mfsweep's
f = (1/n) sum_i c_i relu(z_i . x); one SGD step is one particle step with dt = 2 lr, and rate_i = (2 alpha/n) V_i.
Here both run side by side from the same particles on the same batches, in float64:

- SGD: after 300 steps the notebook's test MSE is twice mfsweep's 1/2-MSE test loss and the particles agree
  (rtol 1e-9); the readings dt = lr and dt = lr / n fail the same comparison.
- Birth-death: on one batch, the engine's per-step probability argument alpha (V_i - mean V), with the
  config's rate, equals the notebook's rate_i minus its mean (the engine subtracts the mean by design), and
  the engine's uncentred potential times that rate is the notebook's rate_i itself.
- Initial and prior laws: the config's init and prior are the notebook's draws rescaled by sqrt(n).

Every mfsweep number (dt, rates, init and prior scales) is read from configs/papers/bd_teacher_notebook.yaml,
so the test pins that config.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import torch
from scipy import stats
from torch import nn

from orchestrator import config as cfgmod
from orchestrator.config import ScalingConfig
from workers.engine import DataStream, NetworkSpec, Pack, birth_death
from workers.engine.pack import init_particles

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "papers" / "bd_teacher_notebook.yaml"
F64 = torch.float64
NOTEBOOK_LR = 2e-2
N = 50  # student width of the notebook (and of the config)
DATA_SEED = 5


class NotebookNet(nn.Module):
    """The notebook's student: f = lin2(relu(lin1 x)), both layers ``nn.Linear`` without bias, no 1/n."""

    def __init__(self, d: int, n: int, seed: int) -> None:
        super().__init__()
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            self.lin1 = nn.Linear(d, n, bias=False, dtype=F64)
            self.lin2 = nn.Linear(n, 1, bias=False, dtype=F64)  # PyTorch default: U(-1/sqrt(n), 1/sqrt(n))
            nn.init.normal_(self.lin1.weight, std=1.0 / math.sqrt(n))  # the notebook's w ~ N(0, I/n)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin2(torch.relu(self.lin1(x)))


def _variants() -> dict[str, ScalingConfig]:
    return dict(cfgmod.load(CONFIG).variant_configs())


def _pack_like(net: NotebookNet, cfg: ScalingConfig, dt: float, steps: int) -> Pack:
    """One mean-field network with the config's task, model and dynamics, started at z = sqrt(n) w, c = sqrt(n) a."""
    dyn = dataclasses.replace(cfg.dynamics.spec(), steps=steps, eval_every=steps)
    bd = cfg.dynamics.birth_death
    spec = NetworkSpec(net_id=0, width=N, seed=0, lr=dt, bd_rate=bd.rate, bd_scheme=bd.scheme)
    pack = Pack(cfg.task.spec(), cfg.model.spec(), dyn, [spec], data_seed=DATA_SEED, dtype=F64)
    group = pack.groups[0]
    assert group.b is None  # no bias, as in the notebook
    with torch.no_grad():
        group.z[0] = math.sqrt(N) * net.lin1.weight
        group.c[0] = math.sqrt(N) * net.lin2.weight.T
    return pack


def _notebook_test_mse(net: NotebookNet, pack: Pack) -> float:
    x, y = pack.task.test_set()
    with torch.no_grad():
        return float(nn.MSELoss()(net(x), y))


def _train_both(dt: float, steps: int = 300) -> tuple[float, float, float, float]:
    """(notebook test MSE at the start, at the end, 2 x mfsweep's test loss at the end, max |z - sqrt(n) w|)."""
    cfg = _variants()["sgd"]
    net = NotebookNet(cfg.task.dim, N, seed=1)
    pack = _pack_like(net, cfg, dt, steps)
    stream = DataStream(pack.task, pack.dynamics, DATA_SEED, exact=False)  # the pack's own batches
    opt = torch.optim.SGD(net.parameters(), lr=NOTEBOOK_LR)
    start = _notebook_test_mse(net, pack)
    for _ in range(steps):
        batch = stream.next()
        assert batch is not None
        x, y = batch
        opt.zero_grad()
        nn.MSELoss()(net(x), y).backward()
        opt.step()
        pack.step_once()
    z, _, _ = pack.particles(0)
    gap = float((z - math.sqrt(N) * net.lin1.weight.detach()).abs().max())
    return start, _notebook_test_mse(net, pack), 2.0 * pack.test_losses()[0], gap


def test_notebook_sgd_is_mean_field_sgd_with_dt_twice_lr() -> None:
    dt = _variants()["sgd"].dynamics.lr
    assert dt == pytest.approx(2 * NOTEBOOK_LR, rel=1e-12), "the config's dt must be 2 x the notebook's lr"
    start, nb, mf, gap = _train_both(dt)
    assert nb < 0.9 * start, (start, nb)  # the networks did train, so agreeing is not trivial
    assert mf == pytest.approx(nb, rel=1e-9, abs=0.0)
    assert gap < 1e-9
    # The readings this equivalence rules out: dt = lr (the page's old one) and dt = lr / n.
    for wrong in (NOTEBOOK_LR, NOTEBOOK_LR / N):
        _, nb_w, mf_w, _ = _train_both(wrong)
        assert abs(mf_w - nb_w) > 1e-3 * nb_w, (wrong, mf_w, nb_w)


@pytest.mark.parametrize(("variant", "alpha"), [("bd_a1", 1.0), ("bd_a0.1", 0.1), ("bd_prior_a0.01", 0.01)])
def test_notebook_birth_death_rate_is_per_step_rate(variant: str, alpha: float,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = _variants()[variant]
    assert cfg.dynamics.birth_death.convention.value == "per_step"
    net = NotebookNet(cfg.task.dim, N, seed=2)
    pack = _pack_like(net, cfg, cfg.dynamics.lr, steps=1)
    batch = DataStream(pack.task, pack.dynamics, DATA_SEED, exact=False).next()
    assert batch is not None
    x, y = batch
    nn.MSELoss()(net(x), y).backward()
    assert net.lin2.weight.grad is not None
    rate_nb = (alpha * net.lin2.weight * net.lin2.weight.grad).detach().flatten()  # the notebook's get_rates

    # The engine's uncentred potential V_i = c_i E[(f_n - f) phi_i] on the same batch and particles.
    potential = _potential(net, cfg, x, y)
    rate = cfg.dynamics.birth_death.rate
    tol = 1e-12 * float(rate_nb.abs().max())
    torch.testing.assert_close(rate * potential, rate_nb, rtol=1e-9, atol=tol)

    # What the engine turns into a probability during a real step: alpha (V_i - mean V), per step.
    seen: list[tuple[torch.Tensor, torch.Tensor, bool]] = []
    original = birth_death.probabilities

    def spy(beta: torch.Tensor, a: torch.Tensor, dt: torch.Tensor, every: int, per_time: bool) -> torch.Tensor:
        seen.append((beta.clone(), a.clone(), per_time))
        return original(beta, a, dt, every, per_time)

    monkeypatch.setattr(birth_death, "probabilities", spy)
    pack.step_once()
    assert seen, "birth-death did not run at step 0"
    beta, a, per_time = seen[0]
    assert not per_time
    torch.testing.assert_close((a.unsqueeze(1) * beta)[0], rate_nb - rate_nb.mean(), rtol=1e-9, atol=tol)


def _potential(net: NotebookNet, cfg: ScalingConfig, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """V (n,) from the engine's sampled step on a fresh copy of the pack (the step itself is discarded)."""
    pack = _pack_like(net, cfg, cfg.dynamics.lr, steps=1)
    _, potential = pack._sampled_step(pack.groups[0], x, y)
    return potential[0]


def test_initial_and_prior_laws_are_the_notebooks_rescaled() -> None:
    cfg = _variants()["sgd"]
    model = cfg.model.spec()
    # w ~ N(0, I/n) -> z = sqrt(n) w ~ N(0, I); fresh prior draws w ~ randn / n -> z ~ N(0, I/n).
    assert model.init.z == "normal" and model.init.loc == 0.0
    assert model.init.scale == pytest.approx(math.sqrt(N) / math.sqrt(N), rel=1e-12)
    assert model.prior is not None and model.prior.z == "normal"
    assert model.prior.scale == pytest.approx(math.sqrt(N) / N, rel=1e-12)
    # a ~ PyTorch's default for nn.Linear(n, 1) -> c = sqrt(n) a: the engine's draws have the same law.
    with torch.random.fork_rng():
        torch.manual_seed(3)
        a = nn.Linear(N, 20_000, bias=False, dtype=F64).weight[:, 0].detach()  # fan_in = n, like lin2
    pack = _pack_like(NotebookNet(cfg.task.dim, N, seed=0), cfg, cfg.dynamics.lr, steps=1)
    _, _, c = init_particles(pack.task, model, 20_000, torch.Generator().manual_seed(4))
    assert stats.ks_2samp(c[:, 0].numpy(), math.sqrt(N) * a.numpy()).pvalue > 1e-3
    assert float(c.abs().max()) <= 1.0
