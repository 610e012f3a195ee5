"""Oracles for the engine tests: a plain per-network PyTorch model and small helpers.

Nothing here imports the engine's private math: the reference network is written from docs/science.md
(f_n(x) = s * sum_i c_i phi(x; z_i), s = 1/n mean-field or n^-1/2 ntk) and trained with torch.optim.SGD.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Sequence

import pytest
import torch
from torch import nn

from workers.engine import (
    DataStream,
    DynamicsSpec,
    ModelSpec,
    NetworkSpec,
    Pack,
    Parametrization,
    Task,
    TaskSpec,
    Unit,
    make_task,
)

F64 = torch.float64
#: Where the device-generic oracle tests run: `MFSWEEP_TEST_DEVICE=cuda python -m pytest tests/workers` on a GPU
#: machine runs them against the same reference loop, computed on that device.
DEVICE = torch.device(os.environ.get("MFSWEEP_TEST_DEVICE", "cpu"))


@functools.lru_cache(maxsize=16)
def cached_task(spec: TaskSpec) -> Task:
    """A float64 task on DEVICE (deterministic given its spec, so one instance can serve every oracle)."""
    return make_task(spec, DEVICE, F64)


def out_scale(spec: NetworkSpec) -> float:
    n = spec.width
    return 1.0 / n if spec.parametrization is Parametrization.MEAN_FIELD else 1.0 / math.sqrt(n)


def raw_lr(spec: NetworkSpec) -> float:
    """The learning rate a plain optimizer uses: n * dt (mean-field) or dt (ntk)."""
    return spec.lr * spec.width if spec.parametrization is Parametrization.MEAN_FIELD else spec.lr


def activations(unit: Unit, gaussian_var: float, x: torch.Tensor, z: torch.Tensor,
                b: torch.Tensor | None) -> torch.Tensor:
    """phi(x; z_i) for x (P, d), z (n, d) -> (P, n), computed the direct way (no distance trick)."""
    if unit is Unit.GAUSSIAN:
        d = x.shape[1]
        sq = (x[:, None, :] - z[None, :, :]).pow(2).sum(-1)
        return torch.exp(-0.5 * sq / gaussian_var) / (2 * math.pi * gaussian_var) ** (d / 2)
    pre = x @ z.T
    if b is not None:
        pre = pre + b
    if unit is Unit.RELU:
        return torch.relu(pre)
    if unit is Unit.TANH:
        return torch.tanh(pre)
    return torch.sigmoid(pre)


class RefNet(nn.Module):
    """One two-layer network, an ordinary nn.Module."""

    def __init__(self, model: ModelSpec, spec: NetworkSpec, z: torch.Tensor, b: torch.Tensor | None,
                 c: torch.Tensor) -> None:
        super().__init__()
        self.unit = model.unit
        self.var = model.gaussian_var
        self.scale = out_scale(spec)
        self.z = nn.Parameter(z.clone())
        self.b = None if b is None else nn.Parameter(b.clone())
        self.c = nn.Parameter(c.clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * activations(self.unit, self.var, x, self.z, self.b) @ self.c


def ref_loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """0.5 * mean over samples of the sum over outputs of (f - y)^2."""
    return 0.5 * (out - y).pow(2).sum(1).mean()


def train_reference(task: TaskSpec, model: ModelSpec, dynamics: DynamicsSpec, spec: NetworkSpec,
                    particles: tuple[torch.Tensor, torch.Tensor | None, torch.Tensor], steps: int,
                    data_seed: int) -> tuple[RefNet, list[float]]:
    """Train one network with torch.optim.SGD on its own copy of the pack's data stream."""
    stream = DataStream(cached_task(task), dynamics, data_seed, exact=False)
    net = RefNet(model, spec, *particles)
    opt = torch.optim.SGD(net.parameters(), lr=raw_lr(spec))
    losses = []
    for _ in range(steps):
        batch = stream.next()
        assert batch is not None
        x, y = batch
        opt.zero_grad()
        loss = ref_loss(net(x), y)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return net, losses


@torch.no_grad()
def ref_test_loss(task: TaskSpec, net: RefNet) -> float:
    x, y = cached_task(task).test_set()
    return float(ref_loss(net(x), y))


def all_particles(pack: Pack) -> dict[int, tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]]:
    return {i: pack.particles(i) for i in pack.running}


def run_reports(pack: Pack) -> list[dict[int, tuple[float | None, float]]]:
    """Drive ``pack.train()`` to the end; per report: net_id -> (train_loss, test_loss)."""
    out = []
    for rep in pack.train():
        out.append({m.net_id: (m.train_loss, m.test_loss) for m in rep.metrics})
    return out


def only(reports: Sequence[dict[int, tuple[float | None, float]]], ids: Sequence[int]
         ) -> list[dict[int, tuple[float | None, float]]]:
    keep = set(ids)
    return [{k: v for k, v in r.items() if k in keep} for r in reports]


# Cross-pack comparisons (a network alone vs packed) use this relative tolerance instead of bit equality:
# MKL's CPU bmm with a single output column (k = 1) rounds differently for a batch of one than for a batch
# of two or more (seen with torch 2.13 + MKL 2024.2, e.g. (1, 96, 8) @ (1, 8, 1) vs the same row inside
# (2, 96, 8) @ (2, 8, 1)), so a group that shrinks to one network moves by an ulp. Any real cross-talk
# between networks shows at far larger relative sizes.
PACK_RTOL = 1e-12


def assert_reports_close(got: Sequence[dict[int, tuple[float | None, float]]],
                         want: Sequence[dict[int, tuple[float | None, float]]]) -> None:
    assert len(got) == len(want)
    for rg, rw in zip(got, want, strict=True):
        assert rg.keys() == rw.keys()
        for nid, (tr_g, te_g) in rg.items():
            tr_w, te_w = rw[nid]
            assert (tr_g is None) == (tr_w is None)
            if tr_g is not None:
                assert tr_g == pytest.approx(tr_w, rel=PACK_RTOL, abs=1e-300), nid
            assert te_g == pytest.approx(te_w, rel=PACK_RTOL, abs=1e-300), nid


def assert_particles_close(a: Pack, b: Pack, ids: Sequence[int], exact: bool = False) -> None:
    for nid in ids:
        for ta, tb in zip(a.particles(nid), b.particles(nid), strict=True):
            assert (ta is None) == (tb is None)
            if ta is None or tb is None:
                continue
            if exact:
                assert torch.equal(ta, tb), nid
            else:
                torch.testing.assert_close(ta, tb, rtol=PACK_RTOL, atol=1e-15)
